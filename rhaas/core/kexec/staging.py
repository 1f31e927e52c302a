"""How a node that lacks the image gets it: pulled over HTTP (origin or peer), or pushed over SFTP.

A :class:`~rhaas.core.kexec.node_run.NodeRun` step, split out of the state machine: the
overlay (keys) is always written over SSH; the kernel and initrd come from the source that
:mod:`rhaas.core.kexec.sources` assigns (:meth:`Staging._fetch`: fetch, verify, build the
initrd and ``kexec -l`` in one command), or over SFTP when the node has no HTTP client or no
source is left (:meth:`Staging._push`). A node that serves the image to peers waits, holding
no thread, until no node is left to fetch, then stops its server and jumps (:meth:`Staging._hold`).
When the run chains (:class:`~rhaas.core.kexec.sources.Chain`), a node first arms its relay
(:meth:`Staging._arm`), waits for the chain to start (:meth:`Staging._chain_turn`), and its
fetch command waits for the relay (:meth:`Staging._fetch_chained`); a node the chain did not
serve pulls as above. Each node records ``transfer``: the path it took, the bytes, the
source, dropped sources (and for the chain ``chain_uptimes``: the node's uptime when its stream
began, ended, was verified, was seen, and when its relay finished).
"""

from __future__ import annotations

import time

from rhaas.core.kexec.commands import Commands, parse_fetch


class Staging:
    """Mixin of :class:`~rhaas.core.kexec.node_run.NodeRun`: its staging steps."""

    relay = None  # the node's armed chain relay (commands.Relay) until its fetch command stops it
    chain_turn = "out"  # in: the chain streams to this node; out: it pulls over HTTP

    def _stage_start(self) -> float | None:
        """The node lacks the image: the overlay (keys) goes over SSH, the rest is pulled if we can."""
        from rhaas.adapters.ssh import SSHError

        job = self.job
        remote = Commands.cache_path(job.overlay_sha, self.opts.cache_dir)
        try:
            try:  # a few KB, written atomically: sending it is cheaper than asking whether it is there
                self.uploaded += self.sess.put(job.overlay, remote)
            except SSHError:
                self.sess.makedirs(self.opts.cache_dir)  # the first image this node gets
                self.uploaded += self.sess.put(job.overlay, remote)
        except BaseException:
            self._close_sess()
            raise
        if self.ctx.pull is None:
            return self._push()
        if self.ctx.pull.chain is not None:
            return self._arm()
        self._next = self._fetch
        return self._fetch()

    def _arm(self) -> float | None:
        """Start this node's chain relay; then wait (holding no thread) for the chain to start."""
        pull, i = self.ctx.pull, self.job.index
        relay = pull.relay_for(i, [self.ctx.image.kernel.sha256, self.ctx.image.initrd.sha256])
        try:
            r = self.sess.run(Commands.arm_relay(relay), timeout=self.opts.command_timeout)
        except BaseException:
            pull.chain.out(i)
            self._close_sess()
            raise
        if "rhaas:armed" not in [ln.strip() for ln in r.lines]:
            pull.chain.out(i)
            why = next((ln.strip()[12:] for ln in r.lines if ln.startswith("rhaas:noarm")), r.why())
            self.dropped.append(f"chain: cannot relay: {why}")
            self._next = self._fetch
            return self._fetch()
        self.relay = relay
        self.chain_turn = "in" if pull.chain.armed(i) else "out"
        self._next = self._chain_turn
        return self._chain_turn()

    def _chain_turn(self) -> float | None:
        """Wait until the chain starts with this node in it (then its fetch command waits for the
        relay), or without it (then the relay is stopped and the node pulls over HTTP)."""
        pull = self.ctx.pull
        turn = pull.chain.turn(self.job.index) if self.chain_turn == "in" else "out"
        if turn == "wait":
            if time.monotonic() - self.stage_t0 > self.opts.command_timeout + pull.fetch_timeout:
                pull.chain.leave(self.job.index)
                turn = "out"
            else:
                return time.monotonic() + 0.02
        self.chain_turn = turn
        self._next = self._fetch
        return self._fetch()

    @property
    def urgent(self) -> bool:
        """A node fetching an image (or serving it) goes before nodes not started and polls:
        its source's slot, or the nodes waiting for it as a source, depend on it."""
        return getattr(self._next, "__func__", None) in (Staging._fetch, Staging._hold, Staging._chain_turn)

    def _close_sess(self) -> None:
        sess, self.sess = self.sess, None
        if sess is not None:
            sess.close()

    def _settle(self) -> None:
        """This node no longer needs a source (once per node)."""
        if not self.settled and self.ctx.pull is not None:
            self.settled = True
            self.ctx.pull.sources.settle(self.job.index)
            if self.ctx.pull.chain is not None:
                self.ctx.pull.chain.out(self.job.index)

    def _fetch(self) -> float | None:
        """Ask for a source; pull, verify, build the initrd and load in one command."""
        from rhaas.core.kexec.sources import NONE, WAIT

        pull, job, img = self.ctx.pull, self.job, self.ctx.image
        if self.relay is not None:
            return self._fetch_chained()
        src = pull.sources.acquire(job.index, self.tried)
        if src == WAIT:
            if time.monotonic() - self.stage_t0 > self.opts.command_timeout + pull.fetch_timeout:
                self.dropped.append("no source became free in time")
                return self._push()
            return time.monotonic() + 0.05
        t_cmd = time.monotonic()
        if not self.fetch_s:  # time spent waiting for a first source
            self.wait_s = t_cmd - self.stage_t0
        if src == NONE:
            return self._push()
        serve = pull.serve_for(job.index)
        fire = self.opts.mode != "load" and serve is None
        cmd = Commands.fetch_and_load(
            img.kernel.sha256, img.initrd.sha256, job.overlay_sha, job.initrd_sha, job.cmdline, fire, job.nonce,
            [pull.base(src)], pull.fetch_timeout, self.opts.cache_dir, serve,
        )
        try:
            r = self.sess.run(cmd, timeout=self.opts.command_timeout + 2 * pull.fetch_timeout)
        except BaseException:
            pull.sources.release(src, ok=True)  # our session failed, not the source
            self._close_sess()
            raise
        self.fetch_s += time.monotonic() - t_cmd
        return self._fetched(r, src, serve, fire)

    def _fetch_chained(self) -> float | None:
        """The chain's turn: one command waits for the relay (if the node is in the chain), stops
        it, and goes on like a fetch with no source (all blobs verified in the cache) to the
        load (and the peer server). If the relay did not bring both blobs, the node pulls over
        HTTP (the next :meth:`_fetch`) in the same session."""
        pull, job, img = self.ctx.pull, self.job, self.ctx.image
        relay, self.relay = self.relay, None
        serve = pull.serve_for(job.index)
        fire = self.opts.mode != "load" and serve is None
        wait = pull.fetch_timeout if self.chain_turn == "in" else 0
        cmd = Commands.fetch_and_load(
            img.kernel.sha256, img.initrd.sha256, job.overlay_sha, job.initrd_sha, job.cmdline, fire, job.nonce,
            [], pull.fetch_timeout, self.opts.cache_dir, serve, chain=relay, chain_wait=wait,
        )
        t_cmd = time.monotonic()
        if not self.fetch_s:
            self.wait_s = t_cmd - self.stage_t0
        try:
            r = self.sess.run(cmd, timeout=self.opts.command_timeout + 2 * pull.fetch_timeout)
        except BaseException:
            self._close_sess()
            raise
        self.fetch_s += time.monotonic() - t_cmd
        said = parse_fetch(r)
        if said["chain"] != "ok" or said["nosource"]:
            why = (said["chain"] or "no answer").removeprefix("bad ")
            if self.chain_turn == "in" or said["chain"] == "ok":
                self.dropped.append(f"chain: {why}")
            if said["client"] in (None, "none") and not said["nosource"]:
                self.dropped.append("no HTTP client on the node" if said["client"] == "none" else f"fetch: {r.why()}")
                return self._push()
            return time.monotonic()  # pull over HTTP
        return self._fetched(r, None, serve, fire)

    def _fetched(self, r, src: int | None, serve, fire: bool) -> float | None:
        """A fetch command's answer (``src`` None: the chain brought the blobs)."""
        pull, img = self.ctx.pull, self.ctx.image
        said = parse_fetch(r)
        _, cached, loaded = Commands.parse_load(r)
        if said["serving"] and cached and loaded:
            # a source before the slot it used frees: a node waiting for that slot finds this
            # peer, not the origin (the other order let the origin send a third image)
            pull.sources.holds(self.job.index)
        if src is None:
            self.fetched += img.kernel.size + img.initrd.size
            self.transfer = {"path": "chain", "bytes": self.fetched, "source": "chain",
                             "wait_s": round(self.wait_s, 3), "fetch_s": round(self.fetch_s, 3)}
            if said.get("chain_times"):
                self.transfer["chain_uptimes"] = said["chain_times"]
            return self._after_fetch(r, said, cached, loaded, serve, fire)
        if said["client"] in (None, "none") and not said["got"]:
            pull.sources.release(src, ok=True)
            self.dropped.append("no HTTP client on the node" if said["client"] == "none" else f"fetch: {r.why()}")
            return self._push()
        sizes = {img.kernel.sha256: img.kernel.size, img.initrd.sha256: img.initrd.size}
        got = sum(sizes.get(sha, 0) for sha, _ in said["got"])
        if said["nosource"] or (said["bad"] and not said["got"]):
            why = said["bad"][-1][1] if said["bad"] else "no answer"
            pull.sources.release(src, ok=False)
            self.tried.add(src)
            self.dropped.append(f"{pull.label(src)}: {why}")
            self.fetched += got
            return time.monotonic()
        pull.sources.release(src, ok=True)
        self.fetched += got
        self.transfer = {
            "path": "origin" if src == pull.sources.origin else "peer",
            "bytes": self.fetched, "source": pull.label(src),
            "wait_s": round(self.wait_s, 3), "fetch_s": round(self.fetch_s, 3),  # fetch_s: fetch+load
        }
        return self._after_fetch(r, said, cached, loaded, serve, fire)

    def _after_fetch(self, r, said: dict, cached: bool, loaded: bool, serve, fire: bool) -> float | None:
        pull = self.ctx.pull
        self._settle()
        if not cached:
            self._close_sess()
            return self._failed(f"cannot build the initrd on the node: {r.why()}")
        # fetch, verify, build and kexec -l are one command: all of it counts as stage
        self.phases["stage"] = time.monotonic() - self.stage_t0
        self.phases["load"] = 0.0
        if not loaded:
            self._close_sess()
            return self._failed(f"kexec -l failed: {r.why()}")
        self._close_sess()
        if said["serving"]:
            self.serve = serve
            # bounded even if a node never settles (its worker process died)
            self.hold_until = time.monotonic() + self.opts.command_timeout + 2 * pull.fetch_timeout
            self._next = self._hold  # a source already (_fetched)
            return time.monotonic()
        if serve is not None:  # loaded but could not serve: jump now, as a non-serving node
            return self._release_and_fire(serve)
        return self._loaded(r, fire)

    def _hold(self) -> float | None:
        """A serving node waits (holding no thread) until no node is left to fetch, then stops its
        server and jumps."""
        if not self.ctx.pull.sources.settled() and time.monotonic() < self.hold_until:
            return time.monotonic() + 0.1
        return self._release_and_fire(self.serve)

    def _release_and_fire(self, serve) -> float | None:
        self.ctx.pull.sources.stop_serving(self.job.index)
        fire = self.opts.mode != "load"
        with self._connect(self.opts.connect_timeout, self.opts.command_timeout) as sess:
            r = sess.run(Commands.stop_serving(serve, fire))
        if fire and Commands.LOADED not in [ln.strip() for ln in r.lines]:
            return self._failed(f"kexec -e after serving: no kernel loaded: {r.why()}")
        return self._loaded(r, fire)

    def _push(self) -> float | None:
        """Today's path: upload what the node lacks over SFTP, build the initrd, load (and fire)."""
        img, job, cache = self.ctx.image, self.job, self.opts.cache_dir
        fire = self.opts.mode != "load"
        try:
            before = self.uploaded
            self._stage(self.sess)
            t1 = time.monotonic()
            self.phases["stage"] = t1 - self.stage_t0
            self.transfer = {"path": "sftp", "bytes": self.fetched + self.uploaded - before}
            self._settle()
            r = self.sess.run(
                Commands.combine_and_load(
                    img.kernel.sha256, img.initrd.sha256, job.overlay_sha, job.initrd_sha,
                    job.cmdline, fire, job.nonce, cache,
                )
            )
        finally:
            self._close_sess()
        _, cached, loaded = Commands.parse_load(r)
        if not cached:
            return self._failed(f"cannot build the initrd on the node: {r.why()}")
        self.phases["load"] = time.monotonic() - t1
        if not loaded:
            return self._failed(f"kexec -l failed: {r.why()}")
        return self._loaded(r, fire)

    def _stage(self, sess) -> None:
        img, job, cache = self.ctx.image, self.job, self.opts.cache_dir
        sess.makedirs(cache)
        for sha, source in (
            (img.kernel.sha256, img.kernel.path),
            (img.initrd.sha256, img.initrd.path),
            (job.overlay_sha, job.overlay),
        ):
            remote = Commands.cache_path(sha, cache)
            if not sess.exists(remote):
                self.uploaded += sess.put(source, remote)
