"""Benchmark: a full `rhaas kexec` against Fabric's ThreadingGroup running `true`, on the node farm.

    python bench/bench_kexec.py            # 1000 simulated nodes
    RHAAS_BENCH_NODES=100 python bench/bench_kexec.py

Both runs go against the same farm (one asyncssh process, lab notes §12) on this machine:

* ``kexec``: the image is staged once beforehand (``--load-only``, not timed); the timed run
  is the real command, ``rhaas kexec sim-[0001-N] --image img --json``: check the cache,
  ``kexec -l``, jump, wait for the node to come back, verify boot id and nonce;
* ``fabric``: ``ThreadingGroup(*hosts).run("true")`` once, with host keys pinned
  (RejectPolicy) so both sides check the same things.

Each runs as its own subprocess; RSS and threads are sampled over its process tree.
Prints ``name value`` lines. The target is ``kexec_vs_fabric_true_ratio`` <= 1.0, and it is
the strict reading: the whole ``rhaas kexec`` process (interpreter start, imports, inventory
reads and writes, worker start) against Fabric's ``group.run("true")`` call alone (its
imports, the 1,000 ``Connection`` objects and ``close()`` are outside its clock).
``kexec_vs_fabric_true_process_ratio`` compares like with like: both whole processes.

Environment: RHAAS_BENCH_NODES (1000), RHAAS_BENCH_REPEAT (1; rounds alternate Fabric and
kexec, and medians are printed), RHAAS_BENCH_DOWN_TIME (0.5 s, the simulated reboot),
RHAAS_BENCH_IMAGE_KB (256, size of the fake kernel and initrd), RHAAS_BENCH_KEEP=1 keeps
the temporary directory.

The machine's cores are shared (lab notes: timings vary up to 2x), so read the ratio of a
round, not absolute seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class TreeSampler:
    """Peak summed RSS and thread count of a process and its descendants (from /proc)."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid = pid
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_threads = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as fh:
                        todo.extend(int(c) for c in fh.read().split())
            except OSError:
                pass
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = threads = procs = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/status") as fh:
                        for line in fh:
                            if line.startswith("VmRSS:"):
                                rss += int(line.split()[1])
                            elif line.startswith("Threads:"):
                                threads += int(line.split()[1])
                    procs += 1
                except OSError:
                    pass
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_threads = max(self.peak_threads, threads)
            self.peak_procs = max(self.peak_procs, procs)
            self._stop.wait(self.interval)


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict, timeout: float, farm_pid: int | None = None):
    """Run ``cmd``; return wall seconds, the result, the sampler and CPU seconds (client, farm)."""
    c0, f0 = children_cpu(), cpu_seconds(farm_pid) if farm_pid else 0.0
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    with TreeSampler(proc.pid) as sampler:
        out, err = proc.communicate(timeout=timeout)
    wall = time.monotonic() - t0
    cpu = (children_cpu() - c0, (cpu_seconds(farm_pid) - f0) if farm_pid else 0.0)
    return wall, subprocess.CompletedProcess(cmd, proc.returncode, out, err), sampler, cpu


def fabric_true(farm_json: str, key: str) -> None:
    """Child mode: Fabric ThreadingGroup.run('true') on every farm node; prints JSON."""
    import base64

    import paramiko
    from fabric import Config, ThreadingGroup
    from fabric.exceptions import GroupException
    from paramiko.config import SSHConfig

    nodes = json.loads(Path(farm_json).read_text())["nodes"]
    t_group = time.monotonic()
    config = Config(ssh_config=SSHConfig())  # no ~/.ssh/config
    group = ThreadingGroup(
        *[n["ssh"] for n in nodes],
        config=config,
        connect_timeout=60,
        connect_kwargs={"key_filename": key, "look_for_keys": False, "allow_agent": False,
                        "banner_timeout": 60, "auth_timeout": 60},
    )
    for conn, n in zip(group, nodes):
        typ, blob = n["host_key"].split()[:2]
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        conn.client.get_host_keys().add(f"[{conn.host}]:{conn.port}", typ, paramiko.PKey.from_type_string(typ, base64.b64decode(blob)))
    t0 = time.monotonic()
    try:
        results = group.run("true", hide=True, timeout=120)
        ok, errors = len(results), []
    except GroupException as exc:
        ok = sum(1 for r in exc.result.values() if not isinstance(r, BaseException))
        errors = sorted({f"{type(r).__name__}: {r}"[:120] for r in exc.result.values() if isinstance(r, BaseException)})
    wall = time.monotonic() - t0
    group.close()
    print(json.dumps({"wall": wall, "group_wall": time.monotonic() - t_group, "ok": ok, "errors": errors[:5]}))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--fabric-true":
        fabric_true(sys.argv[2], sys.argv[3])
        return 0

    from rhaas.adapters.hostkeys import ensure_client_key
    from rhaas.core.images import add_image, make_image
    from rhaas.model import new_node
    from rhaas.sim.control import launch
    from rhaas.store import Store

    n = int(os.environ.get("RHAAS_BENCH_NODES", "1000"))
    down = float(os.environ.get("RHAAS_BENCH_DOWN_TIME", "0.5"))
    kb = int(os.environ.get("RHAAS_BENCH_IMAGE_KB", "256"))
    repeat = max(1, int(os.environ.get("RHAAS_BENCH_REPEAT", "1")))
    tmp = Path(tempfile.mkdtemp(prefix="rhaas-bench-"))
    farm = None
    try:
        home = tmp / "home"
        key, public = ensure_client_key(home)
        (tmp / "authorized_keys").write_text(public + "\n")
        t0 = time.monotonic()
        farm = launch(tmp / "farm", n, tmp / "authorized_keys", down_time=down)
        print(f"farm.start_{n}_s {time.monotonic() - t0:.2f}", flush=True)

        store = Store(home)
        store.create()
        with store.transaction("bench") as tx:
            tx.put_nodes([new_node(x["name"], "registered", ssh=x["ssh"], ssh_host_key=x["host_key"]) for x in farm.nodes])
        (tmp / "vmlinuz").write_bytes(os.urandom(kb * 1024))
        (tmp / "initrd").write_bytes(os.urandom(kb * 1024))
        add_image(store, make_image("img", str(tmp / "vmlinuz"), str(tmp / "initrd"), "console=ttyS0 quiet"))

        env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
        env.update(RHAAS_HOME=str(home), RHAAS_TIMEOUT="120")
        nodeset = f"sim-[0001-{n:04d}]"
        rhaas = [sys.executable, "-m", "rhaas", "kexec", nodeset]

        # stage once (not part of the comparison): uploads and the per-node initrd
        wall, done, _, _ = timed(rhaas + ["--image", "img", "--load-only", "--json"], env, 1800)
        loaded = sum(1 for r in json.loads(done.stdout or "[]") if r["outcome"] == "loaded")
        print(f"kexec.stage_load_only_{n}_wall_s {wall:.2f}", flush=True)
        print(f"kexec.stage_load_only_{n}_loaded {loaded}", flush=True)

        fabric_cmd = [sys.executable, __file__, "--fabric-true", str(farm.dir / "farm.json"), str(key)]
        fab_runs, kx_runs = [], []
        for _ in range(repeat):  # alternate, so both see the same neighbours on this shared machine
            fab_wall, fab, fab_s, fab_cpu = timed(fabric_cmd, env, 1800, farm.proc.pid)
            doc = json.loads(fab.stdout.strip().splitlines()[-1]) if fab.stdout.strip() else {"wall": fab_wall, "ok": 0}
            fab_runs.append((doc["wall"], doc["ok"], fab_s, fab_cpu, doc.get("group_wall", doc["wall"]), fab_wall))
            if doc.get("errors"):
                print(f"# fabric errors: {doc['errors']}", flush=True)
            wall, done, s, cpu = timed(rhaas + ["--image", "img", "--json"], env, 1800, farm.proc.pid)
            results = json.loads(done.stdout or "[]")
            ok = sum(1 for r in results if r["outcome"] == "ok")
            kx_runs.append((wall, ok, s, cpu))
            if ok < n:
                reasons = sorted({r["reason"] for r in results if r["outcome"] != "ok"})
                print(f"# kexec failures: {reasons[:5]} {done.stderr[-300:]}", flush=True)
            print(f"# round: fabric run {doc['wall']:.2f}s (process {fab_wall:.2f}s), kexec {wall:.2f}s", flush=True)

        def report(prefix: str, runs) -> float:
            wall = statistics.median(r[0] for r in runs)
            print(f"{prefix}_wall_s {wall:.2f}", flush=True)
            print(f"{prefix}_ok {min(r[1] for r in runs)}", flush=True)
            print(f"{prefix}_peak_rss_mb {max(r[2].peak_rss_kb for r in runs) / 1024:.0f}", flush=True)
            print(f"{prefix}_peak_threads {max(r[2].peak_threads for r in runs)}", flush=True)
            print(f"{prefix}_processes {max(r[2].peak_procs for r in runs)}", flush=True)
            print(f"{prefix}_cpu_s {statistics.median(r[3][0] for r in runs):.1f}", flush=True)
            print(f"{prefix}_farm_cpu_s {statistics.median(r[3][1] for r in runs):.1f}", flush=True)
            return wall

        fab_wall = report(f"fabric.threadinggroup_true_{n}", fab_runs)
        fab_group = statistics.median(r[4] for r in fab_runs)
        fab_process = statistics.median(r[5] for r in fab_runs)
        print(f"fabric.threadinggroup_true_{n}_group_wall_s {fab_group:.2f}", flush=True)
        print(f"fabric.threadinggroup_true_{n}_process_wall_s {fab_process:.2f}", flush=True)
        kx_wall = report(f"kexec.full_{n}", kx_runs)
        ratio = kx_wall / fab_wall
        print(f"kexec_vs_fabric_true_ratio {ratio:.2f}  (target <= 1.0: {'ok' if ratio <= 1.0 else 'MISSED'})",
              flush=True)
        print(f"kexec_vs_fabric_true_process_ratio {kx_wall / fab_process:.2f}", flush=True)
        with open(f"/proc/{farm.proc.pid}/status") as fh:
            rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        print(f"farm.rss_{n}_mb {rss / 1024:.0f}", flush=True)
    finally:
        if farm is not None:
            farm.stop()
        if not os.environ.get("RHAAS_BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"# kept {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
