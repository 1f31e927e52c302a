"""One node's way through a kexec, one step at a time: load, jump, poll, verify, fall back.

Per node, over SSH (:mod:`rhaas.adapters.ssh`), with the commands of
:mod:`rhaas.core.kexec.commands`:

1. one session reads the boot id and, if the node's cache (``/run/rhaas/<sha256>``) already
   holds the kernel and this node's initrd (the image's initrd + the node's overlay), runs
   ``kexec -l`` and fires the detached ``kexec -e`` in the same command. Otherwise it uploads
   what is missing over SFTP, builds the initrd on the node and loads it;
2. the node is polled until it answers with a new boot id (the old kernel's sshd may still
   answer for a moment: its boot id means "not yet"), and ``/proc/cmdline`` must hold the
   run's ``rhaas.nonce=``;
3. a node that fails any step after it was asked to jump, or before it could be, goes
   through its power backend (boot device PXE, power cycle) unless ``fallback`` is off.

A step returns when the node's next step is due (or None once it is done), so that
:mod:`rhaas.core.kexec.scheduler` can keep a waiting node off its threads.
"""

from __future__ import annotations

import time

from rhaas.core.kexec.commands import Commands, cmdline_has, parse_fetch
from rhaas.core.kexec.plan import Context, Job, KexecResult
from rhaas.errors import RhaasError


class NodeRun:
    """One node's way through the pipeline, one step at a time (see the module docstring)."""

    def __init__(self, job: Job, ctx: Context):
        self.job = job
        self.ctx = ctx
        self.opts = ctx.opts
        self.name = job.doc["name"]
        self.phases: dict[str, float] = {}
        self.old_boot_id: str | None = None
        self.fired_at: float | None = None
        self.deadline = 0.0
        self.down_at: float | None = None
        self.saw_old = False
        self.busy_wait = self.opts.poll_interval
        self.kexec_reason: str | None = None  # set once we are in the fallback
        self.uploaded = 0
        self.polls = {"down": 0, "old": 0}
        self.last_poll_error: str | None = None
        self.result: KexecResult | None = None
        self.link = None
        # staging (rhaas.core.kexec.sources): the open session, sources tried, what came from where
        self.sess = None
        self.stage_t0 = 0.0
        self.tried: set[int] = set()
        self.dropped: list[str] = []
        self.fetched = 0
        self.transfer: dict = {}
        self.settled = False
        self.serve = None
        self._next = self._load

    def step(self) -> float | None:
        from rhaas.adapters.ssh import AuthFailed, HostKeyChanged, HostKeyUnknown

        try:
            return self._next()
        except (HostKeyUnknown, HostKeyChanged, AuthFailed) as exc:
            # a node whose identity cannot be checked is never power cycled: it could not be verified
            return self._failed(str(exc), fallback=False)
        except RhaasError as exc:
            return self._failed(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the node: reported, one line
            return self._failed(f"internal error: {type(exc).__name__}: {exc}", fallback=False)

    # -- outcomes --------------------------------------------------------------------------------
    def _finish(self, outcome: str, boot_id: str | None, reason: str | None = None) -> None:
        self._settle()
        if self.serve is not None and self.ctx.pull is not None:
            self.ctx.pull.sources.stop_serving(self.job.index)
        self._close_sess()
        if self.dropped:
            self.transfer = {**self.transfer, "dropped": list(self.dropped)}
        self.result = KexecResult(
            self.name, outcome, self.job.image, self.job.nonce, boot_id, reason, dict(self.phases),
            fired=self.fired_at is not None, uploaded=self.uploaded, finished=time.time(), polls=dict(self.polls),
            transfer=dict(self.transfer),
        )
        self.link = None

    def _failed(self, reason: str, fallback: bool = True) -> float | None:
        self._settle()
        self._close_sess()
        if self.kexec_reason is not None:  # the fallback itself failed
            return self._finish("failed", self.old_boot_id, f"kexec failed: {self.kexec_reason}; fallback failed: {reason}")
        if not (fallback and self.opts.fallback and self.opts.mode != "load"):
            return self._finish("failed", self.old_boot_id, reason)
        self.kexec_reason = reason
        self._next = self._fallback
        return time.monotonic()

    # -- steps -------------------------------------------------------------------------------------
    def _connect(self, connect_timeout: float, command_timeout: float):
        from rhaas.adapters.ssh import Link

        if self.link is None:  # one Fabric Connection per node, for all of its sessions
            self.link = Link(self.job.endpoint, self.ctx.pkey)
        return self.link.open(connect_timeout, command_timeout)

    def _load(self) -> float | None:
        from rhaas.adapters.ssh import Unreachable

        t0 = time.monotonic()
        try:
            sess = self._connect(self.opts.connect_timeout, self.opts.command_timeout)
        except Unreachable as exc:
            if not exc.transient:
                raise
            time.sleep(0.2)  # a dropped handshake (a busy sshd): one more try
            sess = self._connect(self.opts.connect_timeout, self.opts.command_timeout)
        t1 = time.monotonic()
        self.phases["connect"] = t1 - t0
        fire = self.opts.mode != "load"
        self.sess = sess  # closed by the end of this step, unless staging goes on with it
        try:
            if self.opts.mode == "exec":
                r = sess.run(Commands.fire_loaded())
                boot_id, _, loaded = Commands.parse_load(r)
                self.old_boot_id = boot_id
                if not loaded:
                    return self._failed(f"no kernel loaded on the node: {r.why()}", fallback=False)
            else:
                img, job, cache = self.ctx.image, self.job, self.opts.cache_dir
                r = sess.run(Commands.load_cached(img.kernel.sha256, job.initrd_sha, job.cmdline, fire, cache))
                boot_id, cached, loaded = Commands.parse_load(r)
                self.old_boot_id = boot_id
                self.phases["stage"] = 0.0
                if boot_id is None:
                    return self._failed(f"cannot read the boot id: {r.why()}")
                if not cached:
                    # staging keeps this session for its steps, which may wait for a source
                    self.stage_t0 = time.monotonic()
                    return self._stage_start()
                self._settle()
                self.transfer = {"path": "cache", "bytes": 0}
                self.phases["load"] = time.monotonic() - t1
                if not loaded:
                    return self._failed(f"kexec -l failed: {r.why()}")
            self._close_sess()
            return self._loaded(r, fire)
        except BaseException:
            self._close_sess()
            raise

    def _loaded(self, r, fire: bool) -> float | None:
        """``kexec -l`` done (and the jump started, with ``fire``): finish or start polling."""
        # -1: the session dropped before its exit status came; the jump may have beaten it
        if fire and r.exit not in (0, -1):
            return self._failed(f"cannot start kexec -e: {r.why()}")
        if not fire:
            return self._finish("loaded", self.old_boot_id)
        self.fired_at = time.monotonic()
        self.deadline = self.fired_at + self.opts.timeout
        self._next = self._poll
        return self.fired_at + self.opts.first_poll

    # -- staging: pull over HTTP (origin or peers), or push over SFTP ---------------------------------
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
        self._next = self._fetch
        return self._fetch()

    @property
    def urgent(self) -> bool:
        """A node fetching an image (or serving it) goes before nodes not started and polls:
        its source's slot, or the nodes waiting for it as a source, depend on it."""
        return getattr(self._next, "__func__", None) in (NodeRun._fetch, NodeRun._hold)

    def _close_sess(self) -> None:
        sess, self.sess = self.sess, None
        if sess is not None:
            sess.close()

    def _settle(self) -> None:
        """This node no longer needs a source (once per node)."""
        if not self.settled and self.ctx.pull is not None:
            self.settled = True
            self.ctx.pull.sources.settle(self.job.index)

    def _fetch(self) -> float | None:
        """Ask for a source; pull, verify, build the initrd and load in one command."""
        from rhaas.core.kexec.sources import NONE, WAIT

        pull, job, img = self.ctx.pull, self.job, self.ctx.image
        src = pull.sources.acquire(job.index, self.tried)
        if src == WAIT:
            if time.monotonic() - self.stage_t0 > self.opts.command_timeout + pull.fetch_timeout:
                self.dropped.append("no source became free in time")
                return self._push()
            return time.monotonic() + 0.05
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
        said = parse_fetch(r)
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
        }
        self._settle()
        _, cached, loaded = Commands.parse_load(r)
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
            pull.sources.holds(job.index)
            self._next = self._hold
            return time.monotonic()
        if serve is not None:  # loaded but could not serve: jump now, as a non-serving node
            return self._release_and_fire(serve)
        return self._loaded(r, fire)

    def _hold(self) -> float | None:
        """A serving node waits (holding no thread) until no node is left to fetch, then stops its
        server and jumps."""
        if not self.ctx.pull.sources.settled():
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

    def _poll(self) -> float | None:
        """One attempt to reach the node after the jump: down, old kernel, or the new boot."""
        from rhaas.adapters.ssh import AuthFailed, CommandTimeout, Unreachable

        now = time.monotonic()
        # a poll that ran late (behind other nodes' work) still gets its attempt; the deadline
        # is judged after it, in _again
        left = max(0.0, self.deadline - now)
        # A booting node may accept TCP long before its sshd answers (QEMU's slirp does, so do
        # some BMC-NAT set-ups): a poll waits for the banner only briefly at first, then longer
        # as the wait grows, so a slow machine is not mistaken for a dead node.
        poll_timeout = min(self.opts.connect_timeout, max(self.opts.poll_connect_timeout, 0.1 * (now - self.fired_at)))
        try:
            sess = self._connect(min(poll_timeout, max(0.5, left)), min(self.opts.command_timeout, max(1.0, left)))
        except Unreachable:
            self.polls["down"] += 1
            if self.down_at is None:
                self.down_at = now
            return self._again(self.opts.poll_interval)
        except AuthFailed as exc:
            # the node vanished in the middle of the login (the jump under way), or the new
            # image does not let us in: not an answer yet; the deadline decides
            self.polls["down"] += 1
            self.last_poll_error = str(exc)
            return self._again(self.opts.poll_interval)
        t_up = time.monotonic()
        try:
            with sess:
                t_v = time.monotonic()
                r = sess.run(Commands.read_boot())
                boot_id, cmdline = Commands.parse_boot(r)
                t_end = time.monotonic()
        except (Unreachable, CommandTimeout):
            # an sshd dying under us (the old kernel going away): not an answer yet
            self.polls["down"] += 1
            return self._again(self.opts.poll_interval)
        if boot_id is None:
            return self._failed(f"cannot read the boot id: {r.why()}")
        if boot_id == self.old_boot_id:
            # still the old kernel (or it came back unchanged): ask again later, more slowly
            self.saw_old = True
            self.polls["old"] += 1
            self.busy_wait = min(self.busy_wait * 2, self.opts.busy_poll_max)
            return self._again(self.busy_wait)
        down_at = self.down_at if self.down_at is not None else now
        self.phases["down"] = down_at - self.fired_at
        self.phases["up"] = t_up - down_at
        self.phases["verify"] = t_end - t_v
        if self.kexec_reason is not None:
            return self._finish("fallback", boot_id, f"kexec failed: {self.kexec_reason}")
        nonce_arg = f"rhaas.nonce={self.job.nonce}"
        if not cmdline_has(cmdline, nonce_arg):
            self.old_boot_id = boot_id  # a fallback must see yet another boot
            return self._failed(f"booted without {nonce_arg} (cmdline: {cmdline[:200]})")
        return self._finish("ok", boot_id)

    def _again(self, delay: float) -> float | None:
        """When to poll next; once the deadline has passed, the node has failed to verify."""
        now = time.monotonic()
        if now < self.deadline:
            return min(now + delay, self.deadline)
        if self.saw_old:
            return self._failed(f"came back with old boot id {self.old_boot_id}")
        if self.last_poll_error:
            return self._failed(f"did not come back within {self.opts.timeout:g}s (last: {self.last_poll_error})")
        return self._failed(f"did not come back within {self.opts.timeout:g}s")

    def _fallback(self) -> float | None:
        """Boot device PXE and a power cycle through the node's backend, then wait for a new boot."""
        try:
            from rhaas.core.power import backend_for
        except ImportError:
            return self._finish("failed", self.old_boot_id, f"kexec failed: {self.kexec_reason}; no power backend")
        try:
            backend = backend_for(self.job.doc, self.ctx.settings, self.ctx.store)
        except RhaasError:
            backend = None
        if backend is None:
            return self._finish("failed", self.old_boot_id, f"kexec failed: {self.kexec_reason}; no power backend")
        if self.old_boot_id is None:
            self.old_boot_id = self._current_boot_id()
        backend.set_bootdev("pxe")
        backend.power("cycle")
        self.fired_at = time.monotonic()
        self.deadline = self.fired_at + self.opts.timeout
        self.down_at = None
        self.saw_old = False
        self.last_poll_error = None
        self.busy_wait = self.opts.poll_interval
        for k in ("down", "up", "verify"):
            self.phases.pop(k, None)
        self._next = self._poll
        return self.fired_at + self.opts.first_poll

    def _current_boot_id(self) -> str | None:
        """The boot id before a power cycle, when the kexec never got far enough to read it."""
        from rhaas.adapters.ssh import SSHError

        try:
            with self._connect(min(self.opts.connect_timeout, 3.0), min(self.opts.command_timeout, 5.0)) as sess:
                return Commands.parse_boot(sess.run(Commands.read_boot()))[0]
        except SSHError:
            return None
