"""The fan-out of a kexec run: worker processes, each with a fixed pool of threads and a timer queue.

Nodes are split over up to ``os.cpu_count()`` forked worker processes (the SSH handshakes
are CPU-bound Python), each running a fixed pool of threads (:class:`Pool`). A node that
waits for its reboot holds no thread: its next poll sits in a timer heap. Results come back
to the parent over a pipe per worker, as they finish.

The run's limits on power cycles and BMC calls are semaphores made here, before the fork,
so every worker shares them. A worker dies with its parent: it asks the kernel for SIGKILL
when the parent goes (``prctl(PR_SET_PDEATHSIG)``, Linux) and otherwise watches its parent's
PID, so a SIGKILL of ``rhaas kexec`` leaves no worker behind.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator

from rhaas.core.kexec.node_run import NodeRun
from rhaas.core.kexec.plan import Context, Job, KexecOptions, KexecResult

# a worker process pays for itself only with enough handshakes to spread: a fork costs a few
# ms, a node two handshakes (before and after its jump) of ~5 ms CPU each; at 100 nodes two
# processes cut the run by ~0.5 s on two cores (bench/bench_images.py, the cached cycle)
NODES_PER_PROCESS = 40


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


def run_jobs(jobs: list[Job], ctx: Context) -> Iterator[KexecResult]:
    """Yield a KexecResult per job as nodes finish, in the calling thread."""
    if not jobs:
        return
    procs = _process_count(len(jobs), ctx.opts)
    if procs == 1:
        ctx.cycle_slots = threading.BoundedSemaphore(max(1, ctx.opts.fallback_window))
        ctx.bmc_slots = threading.BoundedSemaphore(max(1, ctx.opts.bmc_parallel))
        if ctx.after_fork:
            ctx.after_fork()
        yield from _run_in_threads(jobs, ctx, max(1, min(ctx.opts.parallel, len(jobs))))
        return
    yield from _run_in_processes(jobs, ctx, procs)


def _run_in_threads(jobs: list[Job], ctx: Context, threads: int):
    pool = Pool(threads, ctx.opts.poll_lag)
    for job in jobs:
        pool.add(NodeRun(job, ctx))
    pool.start()
    try:
        for _ in jobs:
            yield pool.results.get()
    finally:
        pool.stop()


def _run_in_processes(jobs: list[Job], ctx: Context, procs: int):
    import multiprocessing as mp
    from multiprocessing.connection import wait

    import fabric  # noqa: F401 - imported once here, so no worker spends its first 0.2 s on it

    fork = mp.get_context("fork")
    # shared by all workers (inherited over the fork)
    ctx.cycle_slots = fork.BoundedSemaphore(max(1, ctx.opts.fallback_window))
    ctx.bmc_slots = fork.BoundedSemaphore(max(1, ctx.opts.bmc_parallel))
    parent = os.getpid()
    per_proc = max(1, -(-ctx.opts.parallel // procs))
    children = []
    for i in range(procs):
        share = jobs[i::procs]
        recv, send = fork.Pipe(duplex=False)
        p = fork.Process(target=_child_main, args=(share, ctx, per_proc, send, parent), daemon=True)
        p.start()
        send.close()
        children.append((p, recv, {j.doc["name"] for j in share}))
    if ctx.after_fork:  # threads of the parent (the image listener) start only now that no fork is left
        ctx.after_fork()
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


def _die_with_parent(parent: int) -> None:
    """End this worker when its parent ends, however it ends (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent:  # the parent was gone before the signal was armed
        os._exit(1)
    if armed:
        return

    def watch() -> None:  # no prctl: a thread notices that the worker was re-parented
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="kexec-parent-watch", daemon=True).start()


def _child_main(jobs: list[Job], ctx: Context, threads: int, send, parent: int) -> None:
    _die_with_parent(parent)
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


class Pool:
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
        self._urgent: list = []  # due steps of nodes fetching an image: before fresh nodes and polls
        self._seq = itertools.count()
        self._pending = 0
        self._stopped = False
        self._threads: list[threading.Thread] = []

    def add(self, run: NodeRun) -> None:
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
                if self._urgent and self._urgent[0][0] <= now:
                    return heapq.heappop(self._urgent)[2]
                if self._timed and self._timed[0][0] <= now - self.lag:
                    return heapq.heappop(self._timed)[2]
                if self._fresh:
                    return self._fresh.popleft()
                if self._timed and self._timed[0][0] <= now:
                    return heapq.heappop(self._timed)[2]
                if self._pending == 0:
                    return None
                due = min([h[0][0] for h in (self._timed, self._urgent) if h], default=None)
                self._cv.wait(due - now if due is not None else None)
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
                    heap = self._urgent if getattr(run, "urgent", False) else self._timed
                    heapq.heappush(heap, (due, next(self._seq), run))
                    self._cv.notify()
            if due is None:
                self.results.put(run.result)
