"""Benchmark: `rhaas kexec` through one level of ``rhaas.kexec`` against the same kexec over SSH.

    python bench/bench_kexec_service.py            # 1000 simulated nodes
    RHAAS_BENCH_NODES=100 python bench/bench_kexec_service.py

One farm, one root instance that holds the nodes' SSH access (``rhaas serve`` on loopback),
and one derived instance whose inventory holds the same nodes as leased from the root:

* ``ssh``: at the root, ``rhaas kexec sim-[0001-N] --image img --json`` (the pipeline over
  SSH, as today);
* ``service``: at the derived instance, ``rhaas kexec ... --via upstream --json``: the blobs
  are checked (already held), one batch is posted to the root's serve, which runs the same
  pipeline in its worker, and the derived instance polls the action until every node is done.

Both put the same keys in the overlay (the root's and the tenant's), so both find the same
initrd in the nodes' cache; each path runs once untimed first (uploads, caches), then the
timed rounds alternate. Prints ``name value`` lines; the target is
``kexec_service_vs_ssh_ratio`` <= 1.2. Environment: RHAAS_BENCH_NODES (1000),
RHAAS_BENCH_REPEAT (1), RHAAS_BENCH_DOWN_TIME (0.5 s), RHAAS_BENCH_KEEP=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], env: dict, timeout: float) -> tuple[float, list[dict], str]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=timeout, check=False)
    wall = time.monotonic() - t0
    try:
        results = json.loads(proc.stdout or "[]")
    except ValueError:
        results = []
    return wall, results, proc.stderr


def main() -> int:
    from rhaas.adapters.hostkeys import ensure_client_key
    from rhaas.core.images import add_image, make_image
    from rhaas.core.users import hash_password
    from rhaas.model import new_node
    from rhaas.sim.control import launch
    from rhaas.store import Store

    n = int(os.environ.get("RHAAS_BENCH_NODES", "1000"))
    down = float(os.environ.get("RHAAS_BENCH_DOWN_TIME", "0.5"))
    repeat = max(1, int(os.environ.get("RHAAS_BENCH_REPEAT", "1")))
    tmp = Path(tempfile.mkdtemp(prefix="rhaas-bench-svc-"))
    farm = serve = None
    try:
        root, tenant = tmp / "root", tmp / "tenant"
        _, root_pub = ensure_client_key(root)
        _, tenant_pub = ensure_client_key(tenant)
        (tmp / "authorized_keys").write_text(root_pub + "\n")  # only the root reaches the nodes
        farm = launch(tmp / "farm", n, tmp / "authorized_keys", down_time=down)
        kernel, initrd = tmp / "vmlinuz", tmp / "initrd"
        kernel.write_bytes(os.urandom(256 * 1024))
        initrd.write_bytes(os.urandom(256 * 1024))

        rstore = Store(root)
        rstore.create()
        with rstore.transaction("bench") as tx:
            tx.put_nodes([new_node(x["name"], "registered", ssh=x["ssh"], ssh_host_key=x["host_key"], project="p1",
                                   tenant_ssh_keys=[tenant_pub]) for x in farm.nodes])
            tx.put("projects", {"name": "p1"})
            tx.put("users", {"name": "alice", "password_hash": hash_password("pw"), "is_admin": False,
                             "projects": ["p1"], "ssh_keys": [tenant_pub]})
        add_image(rstore, make_image("img", str(kernel), str(initrd), "console=ttyS0 quiet"))

        env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
        env["RHAAS_TIMEOUT"] = "120"
        serve = subprocess.Popen([sys.executable, "-m", "rhaas", "serve", "--listen", "127.0.0.1:0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 env={**env, "RHAAS_HOME": str(root)}, cwd=str(ROOT))
        m = re.search(r"http://127\.0\.0\.1:\d+", serve.stdout.readline())
        if not m:
            print("# serve did not start")
            return 1
        tstore = Store(tenant)
        tstore.create()
        with tstore.transaction("bench") as tx:
            tx.put_nodes([new_node(x["name"], "leased", upstream_name=x["name"], ssh=x["ssh"],
                                   ssh_host_key=x["host_key"]) for x in farm.nodes])
            for key, value in (("upstream", m.group(0)), ("project", "p1"), ("user", "alice")):
                tx.set_config(key, value)
        add_image(tstore, make_image("img", str(kernel), str(initrd), "console=ttyS0 quiet"))

        nodeset = f"sim-[0001-{n:04d}]"
        base = [sys.executable, "-m", "rhaas", "kexec", nodeset, "--image", "img", "--json"]
        ssh_cmd = (base, {**env, "RHAAS_HOME": str(root)})
        svc_cmd = (base + ["--via", "upstream"], {**env, "RHAAS_HOME": str(tenant), "RHAAS_UPSTREAM_PASSWORD": "pw"})

        for label, (cmd, e) in (("ssh", ssh_cmd), ("service", svc_cmd)):  # warm: uploads and caches
            wall, results, err = timed(cmd, e, 1800)
            ok = sum(1 for r in results if r.get("outcome") == "ok")
            print(f"# warm-up {label}: {wall:.2f}s, {ok}/{n} ok {err[-200:] if ok < n else ''}", flush=True)

        runs: dict[str, list[tuple[float, int]]] = {"ssh": [], "service": []}
        for _ in range(repeat):  # alternate, so both see the same neighbours on this shared machine
            for label, (cmd, e) in (("ssh", ssh_cmd), ("service", svc_cmd)):
                wall, results, err = timed(cmd, e, 1800)
                ok = sum(1 for r in results if r.get("outcome") == "ok")
                runs[label].append((wall, ok))
                if ok < n:
                    reasons = sorted({str(r.get("reason")) for r in results if r.get("outcome") != "ok"})
                    print(f"# {label} failures: {reasons[:5]} {err[-300:]}", flush=True)
            print(f"# round: ssh {runs['ssh'][-1][0]:.2f}s, service {runs['service'][-1][0]:.2f}s", flush=True)
        walls = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
        for label in ("ssh", "service"):
            print(f"kexec_service.{label}_{n}_wall_s {walls[label]:.2f}", flush=True)
            print(f"kexec_service.{label}_{n}_ok {min(ok for _, ok in runs[label])}", flush=True)
        ratio = walls["service"] / walls["ssh"]
        print(f"kexec_service_vs_ssh_ratio {ratio:.2f}  (target <= 1.2: {'ok' if ratio <= 1.2 else 'MISSED'})",
              flush=True)
    finally:
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGTERM)  # our own child, by its PID
            try:
                serve.wait(timeout=10)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
        if farm is not None:
            farm.stop()
        if not os.environ.get("RHAAS_BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"# kept {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
