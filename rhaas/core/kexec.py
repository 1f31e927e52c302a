"""The kexec pipeline: stage, load, jump, wait, verify, and the power-cycle fallback.

Per node, over SSH (:mod:`rhaas.adapters.ssh`):

1. one session reads the boot id and, if the node's cache (``/run/rhaas/<sha256>``) already
   holds the kernel and this node's initrd (the image's initrd + the node's overlay), runs
   ``kexec -l`` and fires the detached ``kexec -e`` in the same command. Otherwise it uploads
   what is missing over SFTP, builds the initrd on the node and loads it;
2. the node is polled until it answers with a new boot id (the old kernel's sshd may still
   answer for a moment: its boot id means "not yet"), and ``/proc/cmdline`` must hold the
   run's ``rhaas.nonce=``;
3. a node that fails any step after it was asked to jump, or before it could be, goes
   through its power backend (boot device PXE, power cycle) unless ``fallback`` is off.

Fan-out: nodes are split over up to ``os.cpu_count()`` forked worker processes (the SSH
handshakes are CPU-bound Python), each running a fixed pool of threads. A node that waits
for its reboot holds no thread: its next poll sits in a timer queue. The parent collects
results and writes the inventory: once before any node is touched (status provisioning
and the nonce) and once at the end (the results), whatever the number of nodes.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import itertools
import os
import queue
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from rhaas import model
from rhaas.core.images import Image, check_append, check_files, file_sha256
from rhaas.core.overlay import DEFAULT_HOST_KEY_TARGET, build_overlay
from rhaas.errors import RhaasError, UsageError

OUTCOMES = ("ok", "fallback", "failed", "loaded")
MODES = ("full", "load", "exec")
_STATUS = {
    "ok": model.STATUS_READY,
    "loaded": model.STATUS_LOADED,
    "fallback": model.STATUS_FALLBACK,
    "failed": model.STATUS_FAILED,
}
# a worker process pays for itself only with enough handshakes to spread
NODES_PER_PROCESS = 64


@dataclass
class KexecOptions:
    mode: str = "full"  # full | load (stage+load only) | exec (fire what --load-only loaded)
    timeout: float = 120.0  # from the jump (or power cycle) until the node must have verified
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    parallel: int = 64
    fallback: bool = True
    first_poll: float = 0.5  # the jump happens 0.2 s after the command returns
    poll_connect_timeout: float = 1.0  # banner wait of a post-jump poll at first (grows with the wait)
    poll_interval: float = 0.25  # while the node refuses connections (cheap)
    busy_poll_max: float = 2.0  # back-off cap while the old kernel still answers (a handshake each)
    poll_lag: float = 2.0  # a due poll may wait this long behind nodes that have not started
    processes: int | None = None  # None: decided by the number of nodes and CPUs


@dataclass
class KexecResult:
    node: str
    outcome: str  # ok | fallback | failed | loaded
    image: str | None
    nonce: str | None
    boot_id: str | None
    reason: str | None = None
    phases: dict = field(default_factory=dict)
    fired: bool = False  # the node was asked to jump (or power cycled): its old state is gone
    uploaded: int = 0  # bytes sent to the node
    finished: float = 0.0
    polls: dict = field(default_factory=dict)  # after the jump: {"down": n, "old": n} attempts
    keep_status: bool = False  # refused before anything was asked of the node: only an event

    def public(self) -> dict:
        """The stable JSON form (``rhaas kexec --json``)."""
        return {
            "node": self.node,
            "outcome": self.outcome,
            "image": self.image,
            "nonce": self.nonce,
            "boot_id": self.boot_id,
            "reason": self.reason,
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
        }


@dataclass
class _Job:
    """What a worker needs for one node; plain data, inherited by forked workers."""

    doc: dict
    endpoint: object  # rhaas.adapters.ssh.Endpoint
    nonce: str
    cmdline: str | None = None
    overlay: bytes | None = None
    overlay_sha: str | None = None
    initrd_sha: str | None = None  # of the node's initrd: image initrd + overlay
    image: str | None = None


@dataclass
class _Context:
    opts: KexecOptions
    image: Image | None
    pkey: object
    settings: dict
    store: object


def new_nonce() -> str:
    return secrets.token_hex(8)


def kernel_cmdline(append: str, nonce: str) -> str:
    append = check_append(append).strip()
    return f"{append} rhaas.nonce={nonce}" if append else f"rhaas.nonce={nonce}"


def adhoc_image_name(image: Image) -> str:
    h = hashlib.sha256(f"{image.kernel.sha256}:{image.initrd.sha256}:{image.append}".encode()).hexdigest()
    return f"adhoc-{h[:12]}"


def authorized_keys_for(doc: dict, client_public: str) -> list[str]:
    """rhaas's own key, then the tenant's keys (``tenant_ssh_keys``: a line or a list)."""
    tenant = doc.get("tenant_ssh_keys") or []
    if isinstance(tenant, str):
        tenant = tenant.splitlines()
    return [client_public] + [k.strip() for k in tenant if k and k.strip()]


def node_overlay(doc: dict, client_public: str) -> bytes:
    host_key = None
    path = doc.get("host_key_file")
    if path:
        try:
            with open(path, "rb") as fh:
                host_key = fh.read()
        except OSError as exc:
            raise RhaasError(f"node {doc['name']}: cannot read host_key_file {path}: {exc.strerror}") from None
    target = doc.get("host_key_target") or DEFAULT_HOST_KEY_TARGET
    return build_overlay(authorized_keys_for(doc, client_public), host_key, target)


# -- planning (shared by the real run and --dry-run) -------------------------------------------------
def lookup_nodes(snapshot, names: Iterable[str]) -> list[dict]:
    names = list(names)
    if not names:
        raise UsageError("no nodes given")
    for n in names:
        model.check_name(n, "node name")
    docs, unknown = [], []
    for n in names:
        doc = snapshot.node(n)
        if doc is None:
            unknown.append(n)
        else:
            docs.append(dict(doc))
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise UsageError(f"unknown node{'s' if len(unknown) > 1 else ''}: {shown}")
    return docs


def plan(snapshot, names: Iterable[str], image: Image | None, opts: KexecOptions, image_name: str | None) -> list[dict]:
    """What a kexec would do per node, contacting nothing and changing nothing."""
    out = []
    for doc in lookup_nodes(snapshot, names):
        step = {
            "node": doc["name"],
            "ssh": doc.get("ssh"),
            "mode": opts.mode,
            "image": image_name if image else doc.get("loaded_image"),
            "reason": None,
        }
        if image is not None:
            step.update(
                kernel=image.kernel.path,
                initrd=image.initrd.path,
                cmdline=kernel_cmdline(image.append, "<nonce>"),
                cache=f"/run/rhaas/{image.kernel.sha256}",
            )
        if not doc.get("ssh"):
            step["reason"] = "no SSH address"
        elif opts.mode == "exec" and not (doc.get("status") == model.STATUS_LOADED and doc.get("nonce")):
            step["reason"] = f"not loaded (status {doc.get('status')}); run 'rhaas kexec --load-only' first"
        out.append(step)
    return out


# -- the run ------------------------------------------------------------------------------------------
def kexec_nodes(
    store,
    settings: dict,
    names: Iterable[str],
    image: Image | None,
    opts: KexecOptions,
    image_name: str | None = None,
    on_result: Callable[[KexecResult], None] | None = None,
    actor: str | None = None,
) -> list[KexecResult]:
    """Provision ``names`` with ``image`` (None for ``exec`` mode); results in input order.

    The inventory is written twice: before any node is contacted (status provisioning, the
    nonce) and after all have finished (the results and one ``kexec`` event per node).
    """
    from rhaas.adapters import ssh

    if opts.mode not in MODES:
        raise UsageError(f"unknown kexec mode {opts.mode!r}")
    if opts.mode != "exec" and image is None:
        raise UsageError("give --image NAME or --kernel/--initrd")
    snap = store.snapshot()
    docs = lookup_nodes(snap, names)
    if image is not None:
        check_files(image)
        image_name = image_name or image.name
    key_path, public = ssh.ensure_client_key(store.home, settings.get("ssh-key"))
    pkey = ssh.load_client_key(key_path)
    known = ssh.read_known_hosts(store.home)

    jobs: list[_Job] = []
    early: dict[str, KexecResult] = {}
    # the node's initrd is the image's plus its overlay: hash the shared part once
    initrd_hash = file_sha256(image.initrd.path) if image is not None and opts.mode != "exec" else None
    for doc in docs:
        name = doc["name"]
        try:
            endpoint = ssh.Endpoint.for_node(doc, known)
        except RhaasError as exc:
            early[name] = KexecResult(name, "failed", image_name, None, doc.get("boot_id"), str(exc))
            continue
        if opts.mode == "exec":
            if not (doc.get("status") == model.STATUS_LOADED and doc.get("nonce")):
                early[name] = KexecResult(
                    name, "failed", doc.get("loaded_image"), doc.get("nonce"), doc.get("boot_id"),
                    f"not loaded (status {doc.get('status')}); run 'rhaas kexec --load-only' first",
                    keep_status=True,
                )
                continue
            jobs.append(_Job(doc, endpoint, doc["nonce"], image=doc.get("loaded_image")))
            continue
        nonce = new_nonce()
        try:
            overlay = node_overlay(doc, public)
        except (RhaasError, ValueError) as exc:
            early[name] = KexecResult(name, "failed", image_name, None, doc.get("boot_id"), str(exc))
            continue
        combined = initrd_hash.copy()
        combined.update(overlay)
        jobs.append(
            _Job(
                doc, endpoint, nonce,
                cmdline=kernel_cmdline(image.append, nonce),
                overlay=overlay,
                overlay_sha=hashlib.sha256(overlay).hexdigest(),
                initrd_sha=combined.hexdigest(),
                image=image_name,
            )
        )

    started = time.time()
    with store.transaction(actor) as tx:
        marked = []
        for job in jobs:
            cur = tx.node(job.doc["name"])
            if cur is not None:
                marked.append({**cur, "status": model.STATUS_PROVISIONING, "nonce": job.nonce, "updated": started})
        tx.put_nodes(marked)

    ctx = _Context(opts, image, pkey, settings, store)
    results: dict[str, KexecResult] = dict(early)
    for r in early.values():
        if on_result:
            on_result(r)
    interrupted = False
    try:
        for r in _run_jobs(jobs, ctx):
            results[r.node] = r
            if on_result:
                on_result(r)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        _record(store, results, actor, opts.mode)
    if interrupted:
        raise KeyboardInterrupt
    return [results[d["name"]] for d in docs if d["name"] in results]


def _record(store, results: dict[str, KexecResult], actor: str | None, mode: str) -> None:
    """One transaction for the whole batch: node fields and an event per node."""
    if not results:
        return
    with store.transaction(actor) as tx:
        docs = []
        for r in results.values():
            detail = {"image": r.image, "nonce": r.nonce, "mode": mode}
            if r.reason:
                detail["reason"] = r.reason
            if r.phases:
                detail["phases"] = {k: round(v, 3) for k, v in r.phases.items()}
            tx.event("kexec", r.node, r.outcome, **detail)
            cur = tx.node(r.node)
            if cur is None or r.keep_status:  # unregistered meanwhile, or left as it was
                continue
            doc = dict(cur)
            doc.update(status=_STATUS[r.outcome], reason=r.reason, updated=r.finished or time.time())
            if r.phases:
                doc["phases"] = dict(r.phases)
            if r.outcome == "ok":
                doc.update(image=r.image, boot_id=r.boot_id, nonce=r.nonce, last_boot=r.finished, loaded_image=None)
            elif r.outcome == "loaded":
                doc.update(boot_id=r.boot_id or doc.get("boot_id"), nonce=r.nonce, loaded_image=r.image)
            elif r.outcome == "fallback":
                doc.update(image=None, boot_id=r.boot_id, last_boot=r.finished, bootdev="pxe", loaded_image=None)
            else:
                if r.fired:  # it jumped or was power cycled: what runs there now is unknown
                    doc.update(image=None, loaded_image=None)
                if r.boot_id:
                    doc["boot_id"] = r.boot_id
            docs.append(doc)
        tx.put_nodes(docs)


# -- fan-out: processes, each with a bounded pool of threads -------------------------------------------
def _process_count(n_jobs: int, opts: KexecOptions) -> int:
    """Worker processes for this run: one per CPU once there are enough nodes to share.

    Forking is only safe from a single-threaded process (a thread holding a lock at fork
    time leaves it held in the child forever), so a threaded caller such as ``rhaas serve``
    keeps everything in its own threads. ``opts.processes`` or ``RHAAS_KEXEC_PROCESSES``
    (tests, benchmarks) override the choice.
    """
    env = os.environ.get("RHAAS_KEXEC_PROCESSES")
    if opts.processes:
        want = opts.processes
    elif env and env.isdigit():
        want = int(env)
    elif threading.active_count() > 1:
        want = 1
    else:
        want = min(os.cpu_count() or 1, max(1, n_jobs // NODES_PER_PROCESS))
    return max(1, min(want, n_jobs, opts.parallel))


def _run_jobs(jobs: list[_Job], ctx: _Context):
    """Yield a KexecResult per job as nodes finish, in the calling thread."""
    if not jobs:
        return
    procs = _process_count(len(jobs), ctx.opts)
    if procs == 1:
        yield from _run_in_threads(jobs, ctx, max(1, min(ctx.opts.parallel, len(jobs))))
        return
    yield from _run_in_processes(jobs, ctx, procs)


def _run_in_threads(jobs: list[_Job], ctx: _Context, threads: int):
    pool = _Pool(threads, ctx.opts.poll_lag)
    for job in jobs:
        pool.add(_NodeRun(job, ctx))
    pool.start()
    try:
        for _ in jobs:
            yield pool.results.get()
    finally:
        pool.stop()


def _run_in_processes(jobs: list[_Job], ctx: _Context, procs: int):
    import multiprocessing as mp
    from multiprocessing.connection import wait

    import fabric  # noqa: F401 - imported once here, so no worker spends its first 0.2 s on it

    fork = mp.get_context("fork")
    per_proc = max(1, -(-ctx.opts.parallel // procs))
    children = []
    for i in range(procs):
        share = jobs[i::procs]
        recv, send = fork.Pipe(duplex=False)
        p = fork.Process(target=_child_main, args=(share, ctx, per_proc, send), daemon=True)
        p.start()
        send.close()
        children.append((p, recv, {j.doc["name"] for j in share}))
    open_pipes = {recv: (p, names) for p, recv, names in children}
    done: set[str] = set()
    try:
        while open_pipes:
            for conn in wait(list(open_pipes)):
                p, names = open_pipes[conn]
                try:
                    item = conn.recv()
                except EOFError:
                    item = None
                if item is None:
                    del open_pipes[conn]
                    conn.close()
                    # a worker that died leaves its unfinished nodes failed, not forgotten
                    for name in sorted(names - done):
                        job = next(j for j in jobs if j.doc["name"] == name)
                        done.add(name)
                        yield KexecResult(
                            name, "failed", job.image, job.nonce, None, "internal error: worker process exited",
                            finished=time.time(),
                        )
                    continue
                r = KexecResult(**item)
                done.add(r.node)
                yield r
    finally:
        for p, recv, _ in children:
            if p.is_alive():
                p.terminate()  # our own child, by its Process handle (its PID)
            p.join(timeout=5)


def _child_main(jobs: list[_Job], ctx: _Context, threads: int, send) -> None:
    # the parent handles Ctrl-C and stops its workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker lives for one run. What it inherited from the parent is not garbage, so the
    # collector stops scanning it; paramiko leaves a few reference cycles per connection, and
    # collecting them in larger batches saves ~10 % of a worker's CPU at a thousand nodes.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        for r in _run_in_threads(jobs, ctx, max(1, min(threads, len(jobs)))):
            send.send(r.__dict__)
        send.send(None)
    finally:
        send.close()


class _Pool:
    """A fixed number of threads running node steps.

    A step returns the monotonic time of the node's next step, or None when the node is
    done. Nodes waiting for a reboot sit in a timer heap and hold no thread.

    Nodes that have not started go before due polls, unless a poll has been due for more
    than ``lag`` seconds. Every jump then starts as early as it can, and the reboots of the
    last nodes to jump overlap with the verification of the others, instead of leaving the
    cores idle at the end of the run; ``lag`` bounds how late a node is looked at.
    """

    def __init__(self, size: int, lag: float = 2.0):
        self.size = size
        self.lag = lag
        self.results: queue.Queue = queue.Queue()
        self._cv = threading.Condition()
        self._fresh: deque = deque()
        self._timed: list = []
        self._seq = itertools.count()
        self._pending = 0
        self._stopped = False
        self._threads: list[threading.Thread] = []

    def add(self, run: _NodeRun) -> None:
        with self._cv:
            self._fresh.append(run)
            self._pending += 1

    def start(self) -> None:
        for i in range(self.size):
            t = threading.Thread(target=self._work, name=f"kexec-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def _next(self):
        with self._cv:
            while not self._stopped:
                now = time.monotonic()
                if self._timed and self._timed[0][0] <= now - self.lag:
                    return heapq.heappop(self._timed)[2]
                if self._fresh:
                    return self._fresh.popleft()
                if self._timed and self._timed[0][0] <= now:
                    return heapq.heappop(self._timed)[2]
                if self._pending == 0:
                    return None
                self._cv.wait(self._timed[0][0] - now if self._timed else None)
            return None

    def _work(self) -> None:
        while True:
            run = self._next()
            if run is None:
                return
            due = run.step()
            with self._cv:
                if due is None:
                    self._pending -= 1
                    if self._pending == 0:
                        self._cv.notify_all()
                else:
                    heapq.heappush(self._timed, (due, next(self._seq), run))
                    self._cv.notify()
            if due is None:
                self.results.put(run.result)


class _NodeRun:
    """One node's way through the pipeline, one step at a time (see the module docstring)."""

    def __init__(self, job: _Job, ctx: _Context):
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
        self.result = KexecResult(
            self.name, outcome, self.job.image, self.job.nonce, boot_id, reason, dict(self.phases),
            fired=self.fired_at is not None, uploaded=self.uploaded, finished=time.time(), polls=dict(self.polls),
        )
        self.link = None

    def _failed(self, reason: str, fallback: bool = True) -> float | None:
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
        from rhaas.adapters.ssh import Commands, Unreachable

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
        with sess:
            if self.opts.mode == "exec":
                r = sess.run(Commands.fire_loaded())
                boot_id, _, loaded = Commands.parse_load(r)
                self.old_boot_id = boot_id
                if not loaded:
                    return self._failed(f"no kernel loaded on the node: {r.why()}", fallback=False)
            else:
                img, job = self.ctx.image, self.job
                r = sess.run(Commands.load_cached(img.kernel.sha256, job.initrd_sha, job.cmdline, fire))
                boot_id, cached, loaded = Commands.parse_load(r)
                self.old_boot_id = boot_id
                self.phases["stage"] = 0.0
                if boot_id is None:
                    return self._failed(f"cannot read the boot id: {r.why()}")
                if not cached:
                    t2 = time.monotonic()
                    self._stage(sess)
                    t1 = time.monotonic()
                    self.phases["stage"] = t1 - t2
                    r = sess.run(
                        Commands.combine_and_load(
                            img.kernel.sha256, img.initrd.sha256, job.overlay_sha, job.initrd_sha,
                            job.cmdline, fire, job.nonce,
                        )
                    )
                    _, cached, loaded = Commands.parse_load(r)
                    if not cached:
                        return self._failed(f"cannot build the initrd on the node: {r.why()}")
                self.phases["load"] = time.monotonic() - t1
                if not loaded:
                    return self._failed(f"kexec -l failed: {r.why()}")
            # -1: the session dropped before its exit status came; the jump may have beaten it
            if fire and r.exit not in (0, -1):
                return self._failed(f"cannot start kexec -e: {r.why()}")
        if not fire:
            return self._finish("loaded", self.old_boot_id)
        self.fired_at = time.monotonic()
        self.deadline = self.fired_at + self.opts.timeout
        self._next = self._poll
        return self.fired_at + self.opts.first_poll

    def _stage(self, sess) -> None:
        from rhaas.adapters.ssh import Commands

        img, job = self.ctx.image, self.job
        sess.makedirs(Commands.CACHE_DIR)
        for sha, source in (
            (img.kernel.sha256, img.kernel.path),
            (img.initrd.sha256, img.initrd.path),
            (job.overlay_sha, job.overlay),
        ):
            remote = Commands.cache_path(sha)
            if not sess.exists(remote):
                self.uploaded += sess.put(source, remote)

    def _poll(self) -> float | None:
        """One attempt to reach the node after the jump: down, old kernel, or the new boot."""
        from rhaas.adapters.ssh import AuthFailed, Commands, CommandTimeout, Unreachable, cmdline_has

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
        from rhaas.adapters.ssh import Commands, SSHError

        try:
            with self._connect(min(self.opts.connect_timeout, 3.0), min(self.opts.command_timeout, 5.0)) as sess:
                return Commands.parse_boot(sess.run(Commands.read_boot()))[0]
        except SSHError:
            return None


__all__ = [
    "OUTCOMES",
    "KexecOptions",
    "KexecResult",
    "adhoc_image_name",
    "authorized_keys_for",
    "kernel_cmdline",
    "kexec_nodes",
    "lookup_nodes",
    "new_nonce",
    "node_overlay",
    "plan",
]
