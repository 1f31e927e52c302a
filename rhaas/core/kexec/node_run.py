"""One node's way through a kexec, one step at a time: load, jump, poll, verify, fall back.

Per node, over SSH (:mod:`rhaas.adapters.ssh`), with the commands of
:mod:`rhaas.core.kexec.commands`:

1. one session reads the boot id and, if the node's cache (``node-cache-dir``) already
   holds the kernel and this node's initrd (the image's initrd + the node's overlay), runs
   ``kexec -l`` and fires the detached ``kexec -e`` in the same command. Otherwise the node
   gets the image (:mod:`rhaas.core.kexec.staging`: pulled over HTTP from the run's origin or a
   peer, or pushed over SFTP), builds its initrd and loads it;
2. the node is polled until it answers with a new boot id (the old kernel's sshd may still
   answer for a moment: its boot id means "not yet"), and ``/proc/cmdline`` must hold the
   run's ``rhaas.nonce=``;
3. a node that fails any step after it was asked to jump, or before it could be, tries
   again up to ``retries`` times, then goes through its power backend (boot device PXE,
   power cycle) unless ``fallback`` is off. A node whose metadata says ``rhaas.kexec=no``
   goes to its power backend at once. At most ``fallback_window`` nodes of the run are in a
   power cycle at once (from the cycle until the new boot is verified or given up), and at
   most ``bmc_parallel`` BMC calls are in flight: both are semaphores shared by every
   thread and worker process of the run (:class:`~rhaas.core.kexec.plan.Context`).

After the jump only a readable boot id decides: a poll that connects and then loses its
session (no exit status, EOF, a reset, a cut banner or login) or reads nothing usable is
"not yet", like a refused connection; the deadline alone turns "not yet" into a failure.

A step returns when the node's next step is due (or None once it is done), so that
:mod:`rhaas.core.kexec.scheduler` can keep a waiting node off its threads.
"""

from __future__ import annotations

import time

from rhaas.core.kexec.commands import Commands, cmdline_has
from rhaas.core.kexec.plan import Context, Job, KexecResult
from rhaas.core.kexec.staging import Staging
from rhaas.errors import RhaasError


class NodeRun(Staging):
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
        self.hold_until = 0.0
        self.wait_s = 0.0  # staging: waiting for a source, then running fetch commands
        self.fetch_s = 0.0
        self.retries_left = self.opts.retries
        self.attempts = 1
        self.holds_cycle_slot = False
        self.failed_at: float | None = None  # when the kexec failed (the run's console tail ends there)
        self._next = self._load
        if job.skip_kexec:  # metadata rhaas.kexec=no: straight to the power path
            self.kexec_reason = "skipped"
            self._next = self._fallback
            self._settle()  # it fetches nothing: serving nodes need not wait for it

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
        if self.holds_cycle_slot:
            self.holds_cycle_slot = False
            self.ctx.cycle_slots.release()
        self.result = KexecResult(
            self.name, outcome, self.job.image, self.job.nonce, boot_id, reason, dict(self.phases),
            fired=self.fired_at is not None, uploaded=self.uploaded, finished=time.time(), polls=dict(self.polls),
            attempts=self.attempts, failed_at=self.failed_at, transfer=dict(self.transfer),
        )
        self.link = None

    def _why_fallback(self) -> str:
        if self.job.skip_kexec:
            return "kexec skipped: node metadata rhaas.kexec=no"
        return f"kexec failed: {self.kexec_reason}"

    def _failed(self, reason: str, fallback: bool = True) -> float | None:
        self._settle()
        self._close_sess()
        if self.kexec_reason is None:
            self.failed_at = time.time()
        if self.kexec_reason is not None:  # the fallback itself failed
            return self._finish("failed", self.old_boot_id, f"{self._why_fallback()}; fallback failed: {reason}")
        if fallback and self.retries_left > 0:
            return self._retry()
        if not (fallback and self.opts.fallback and self.opts.mode != "load"):
            return self._finish("failed", self.old_boot_id, reason)
        self.kexec_reason = reason
        self._next = self._fallback
        return time.monotonic()

    def _forget_wait(self) -> None:
        """A new attempt (a retry, or the fallback's power cycle) waits for its own boot afresh."""
        self.down_at = None
        self.saw_old = False
        self.last_poll_error = None
        self.busy_wait = self.opts.poll_interval
        for k in ("down", "up", "verify"):
            self.phases.pop(k, None)

    def _retry(self) -> float:
        """Start the kexec over (``--retries``): stage/load/jump again, then wait as before."""
        self.retries_left -= 1
        self.attempts += 1
        self._forget_wait()
        self._next = self._load
        return time.monotonic() + self.opts.poll_interval

    # -- steps -------------------------------------------------------------------------------------
    def _connect(self, connect_timeout: float, command_timeout: float, tcp_timeout: float | None = None):
        from rhaas.adapters.ssh import Link

        if self.link is None:  # one Fabric Connection per node, for all of its sessions
            self.link = Link(self.job.endpoint, self.ctx.pkey)
        return self.link.open(connect_timeout, command_timeout, tcp_timeout)

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
        # A SYN sent while the node's link is down is lost, and TCP would send it again only after
        # a second: the TCP connect gets a shorter bound, and the next poll sends a fresh SYN.
        elapsed = now - self.fired_at
        poll_timeout = min(self.opts.connect_timeout, max(self.opts.poll_connect_timeout, 0.1 * elapsed))
        tcp_timeout = min(poll_timeout, max(self.opts.poll_tcp_timeout, 0.05 * elapsed))
        try:
            sess = self._connect(min(poll_timeout, max(0.5, left)), min(self.opts.command_timeout, max(1.0, left)),
                                 tcp_timeout)
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
        except (Unreachable, CommandTimeout) as exc:
            # an sshd dying under us (the old kernel going away): not an answer yet
            self.polls["down"] += 1
            self.last_poll_error = str(exc)
            return self._again(self.opts.poll_interval)
        if boot_id is None:
            # the session closed without an exit status (-1), or the answer is empty or not a
            # boot id: a dying kernel cuts sessions like this. Not an answer; the deadline decides.
            self.polls["down"] += 1
            self.last_poll_error = f"cannot read the boot id: {r.why()}"
            return self._again(self.opts.poll_interval)
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
            return self._finish("fallback", boot_id, self._why_fallback())
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
            return self._finish("failed", self.old_boot_id, f"{self._why_fallback()}; no power backend")
        try:
            backend = backend_for(self.job.doc, self.ctx.settings, self.ctx.store)
        except RhaasError:
            backend = None
        if backend is None:
            return self._finish("failed", self.old_boot_id, f"{self._why_fallback()}; no power backend")
        # the reboot window: a slot from the power cycle until the new boot is verified or
        # given up (released in _finish). A node without one waits off the threads.
        if not self.holds_cycle_slot:
            if self.ctx.cycle_slots is not None and not self.ctx.cycle_slots.acquire(False):
                return time.monotonic() + self.opts.poll_interval
            self.holds_cycle_slot = self.ctx.cycle_slots is not None
        if self.old_boot_id is None:
            self.old_boot_id = self._current_boot_id()
        self._bmc(backend.set_bootdev, "pxe")
        self._bmc(backend.power, "cycle")
        self.fired_at = time.monotonic()
        self.deadline = self.fired_at + self.opts.timeout
        self._forget_wait()
        self._next = self._poll
        return self.fired_at + self.opts.first_poll

    def _bmc(self, call, arg: str) -> None:
        """One BMC call, within the run's bound on BMC calls in flight."""
        slots = self.ctx.bmc_slots
        if slots is None:
            call(arg)
            return
        with slots:
            call(arg)

    def _current_boot_id(self) -> str | None:
        """The boot id before a power cycle, when the kexec never got far enough to read it."""
        from rhaas.adapters.ssh import SSHError

        try:
            with self._connect(min(self.opts.connect_timeout, 3.0), min(self.opts.command_timeout, 5.0)) as sess:
                return Commands.parse_boot(sess.run(Commands.read_boot()))[0]
        except SSHError:
            return None
