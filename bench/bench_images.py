"""Benchmark: a new image to many nodes (`rhaas kexec` pulling over HTTP, peers serving peers)
against Fabric pushing the same files, and the cached-image cycle against Fabric's `true`.

    python bench/bench_images.py                      # 25 and 100 simulated nodes, 64 MB image
    RHAAS_BENCH_IMAGES_NODES=25,100 RHAAS_BENCH_IMAGE_MB=8,56 python bench/bench_images.py

On one simulated farm (one asyncssh process; the nodes' fetches run the host's curl, their
peer servers the host's busybox httpd, each on its node's own 127.x address):

* ``first``: a new image (8 MB kernel + 56 MB initrd of random bytes; new bytes for each node
  count) reaches N nodes by the real ``rhaas kexec sim-[..] --kernel K --initrd I --json``
  (fetch from the origin or peers, ``blob-chain auto``: no chain on loopback; verify, build
  the node's initrd, ``kexec -l``, jump, verify the boot), against
  Fabric putting the same two files on the same N nodes in parallel (``Connection.put``,
  a thread per node, as ``ThreadingGroup`` would; host keys pinned). Printed: both walls,
  the ratio rhaas/Fabric (target <= 0.1) and the bytes rhaas's origin sent (target <= 3 x
  the image, whatever N);
* ``first ... _chain`` (largest N only, with ``RHAAS_BENCH_IMAGES_CHAIN=1``): the same with
  ``blob-chain on``: the nodes relay the image along 2 chains as it arrives (busybox nc and
  tee). On loopback there is no link to spare and every relay's 1 KB copies share this
  machine's cores (and the one farm process's SSH server), so ``auto`` does not chain here;
  the figure shows that cost;
* ``cached``: the same image again on the largest N (every node holds it: check, load, jump,
  verify) against Fabric's ``ThreadingGroup.run("true")`` on the same nodes (target <= 1.0).

Prints ``name value`` lines. The machine's cores are shared: read the ratios of one run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def fabric_put(farm_json: str, key: str, count: str, kernel: str, initrd: str) -> None:
    """Child mode: Fabric Connection.put of both files to each of the first COUNT nodes, a thread
    per node (what ThreadingGroup does for run()); prints JSON."""
    import base64
    import threading

    import paramiko
    from fabric import Config, Connection
    from paramiko.config import SSHConfig

    nodes = json.loads(Path(farm_json).read_text())["nodes"][: int(count)]
    conns = []
    for n in nodes:
        c = Connection(n["ssh"], config=Config(ssh_config=SSHConfig()), connect_timeout=60,
                       connect_kwargs={"key_filename": key, "look_for_keys": False, "allow_agent": False,
                                       "banner_timeout": 60, "auth_timeout": 60})
        typ, blob = n["host_key"].split()[:2]
        c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        c.client.get_host_keys().add(f"[{c.host}]:{c.port}", typ, paramiko.PKey.from_type_string(typ, base64.b64decode(blob)))
        conns.append(c)
    errors: list[str] = []
    ok = [0]
    lock = threading.Lock()

    def one(c) -> None:
        try:
            for d in ("/run", "/run/fabric"):
                try:
                    c.sftp().mkdir(d)
                except OSError:
                    pass  # there already
            c.put(kernel, "/run/fabric/vmlinuz")
            c.put(initrd, "/run/fabric/initrd")
            with lock:
                ok[0] += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}"[:120])

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    for c in conns:
        c.close()
    print(json.dumps({"wall": wall, "ok": ok[0], "errors": sorted(set(errors))[:5]}))


def _cpu_of(cmd: list[str]) -> float:
    """User+system CPU seconds of one child command."""
    import resource

    def used() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    before = used()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
    return used() - before


def main() -> int:
    if len(sys.argv) == 7 and sys.argv[1] == "--fabric-put":
        fabric_put(*sys.argv[2:])
        return 0

    from bench_kexec import timed

    from rhaas.adapters.hostkeys import ensure_client_key
    from rhaas.model import new_node
    from rhaas.sim.control import launch
    from rhaas.store import Store

    counts = [int(x) for x in os.environ.get("RHAAS_BENCH_IMAGES_NODES", "25,100").split(",")]
    k_mb, i_mb = (int(x) for x in os.environ.get("RHAAS_BENCH_IMAGE_MB", "8,56").split(","))
    image_bytes = (k_mb + i_mb) << 20
    n_max = max(counts)
    # the nodes' files go where a node keeps them (node-cache-dir /run/rhaas: a tmpfs), so in
    # /dev/shm when it has room for every node's copy and Fabric's; RHAAS_BENCH_TMP overrides
    where = os.environ.get("RHAAS_BENCH_TMP")
    if where is None and os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 3 * n_max * image_bytes:
            where = "/dev/shm"
    tmp = Path(tempfile.mkdtemp(prefix="rhaas-bench-images-", dir=where))
    farm = None
    try:
        home = tmp / "home"
        key, public = ensure_client_key(home)
        (tmp / "authorized_keys").write_text(public + "\n")
        farm = launch(tmp / "farm", n_max, tmp / "authorized_keys", down_time=0.5)
        store = Store(home)
        store.create()
        with store.transaction("bench") as tx:
            tx.put_nodes([new_node(x["name"], "registered", ssh=x["ssh"], ssh_host_key=x["host_key"])
                          for x in farm.nodes])
        env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
        env.update(RHAAS_HOME=str(home), RHAAS_TIMEOUT="300")
        print(f"# images: {k_mb} MB kernel + {i_mb} MB initrd, farm of {n_max} nodes in {tmp} "
              "(in /dev/shm when it has room: a node's cache dir /run/rhaas is in memory; RHAAS_BENCH_TMP=DIR "
              "to choose)", flush=True)

        for n in counts:
            for x in farm.nodes:  # the previous count's image is not this one's: free the space
                shutil.rmtree(Path(x["root"]) / "run/rhaas", ignore_errors=True)
            kernel, initrd = tmp / f"vmlinuz-{n}", tmp / f"initrd-{n}"
            for path, mb in ((kernel, k_mb), (initrd, i_mb)):
                with open(path, "wb") as fh:
                    fh.writelines(os.urandom(1 << 20) for _ in range(mb))
            nodeset = f"sim-[0001-{n:04d}]"
            fab_cmd = [sys.executable, __file__, "--fabric-put", str(farm.dir / "farm.json"), str(key), str(n),
                       str(kernel), str(initrd)]
            fwall, fab, _, _ = timed(fab_cmd, env, 3600, farm.proc.pid)
            doc = json.loads(fab.stdout.strip().splitlines()[-1]) if fab.stdout.strip() else {"wall": fwall, "ok": 0}
            if doc.get("errors"):
                print(f"# fabric errors: {doc['errors']}", flush=True)
            for x in farm.nodes[:n]:  # Fabric's copies are not the image rhaas deploys: free the disk
                shutil.rmtree(Path(x["root"]) / "run/fabric", ignore_errors=True)
            # blob-chain auto (off on loopback: store-and-forward), last: the cached cycle below needs
            # every node to hold the image; with RHAAS_BENCH_IMAGES_CHAIN=1, first the chain
            variants = [("", {})]
            if n == n_max and os.environ.get("RHAAS_BENCH_IMAGES_CHAIN"):
                variants.insert(0, ("_chain", {"RHAAS_BLOB_CHAIN": "on"}))
            for tag, extra in variants:
                for x in farm.nodes[:n]:  # a first deploy each time: no node holds the image
                    shutil.rmtree(Path(x["root"]) / "run/rhaas", ignore_errors=True)
                cmd = [sys.executable, "-m", "rhaas", "kexec", nodeset, "--kernel", str(kernel), "--initrd", str(initrd),
                       "--append", "console=ttyS0", "--json"]
                wall, done, _, cpu = timed(cmd, {**env, **extra}, 3600, farm.proc.pid)
                results = json.loads(done.stdout or "[]")
                ok = sum(1 for r in results if r["outcome"] == "ok")
                paths: dict[str, int] = {}
                for r in results:
                    p = (r.get("transfer") or {}).get("path", "none")
                    paths[p] = paths.get(p, 0) + 1
                summary = next((json.loads(ln)["rhaas_kexec_transfer"] for ln in done.stderr.splitlines()
                                if "rhaas_kexec_transfer" in ln), {"origin_bytes": -1})
                if ok < n:
                    reasons = sorted({r["reason"] for r in results if r["outcome"] != "ok"})
                    print(f"# kexec failures: {reasons[:5]} {done.stderr[-300:]}", flush=True)
                ratio = wall / doc["wall"]
                origin = summary["origin_bytes"]
                # every simulated node shares this machine's cores: the sha256 each node must check
                # (and its copies) are a floor that real nodes, each with its own CPU, do not share
                sha_cpu = _cpu_of(["sha256sum", str(initrd), str(kernel)])
                print(f"kexec.first_deploy_{n}{tag}_verify_floor_s {sha_cpu * n / (os.cpu_count() or 1):.2f} "
                      f"(sha256 of the image on every node, spread over {os.cpu_count()} cores)", flush=True)
                if not tag:
                    print(f"fabric.put_64mb_{n}_wall_s {doc['wall']:.2f}", flush=True)
                    print(f"fabric.put_64mb_{n}_ok {doc['ok']}", flush=True)
                print(f"kexec.first_deploy_{n}{tag}_wall_s {wall:.2f}", flush=True)
                print(f"kexec.first_deploy_{n}{tag}_ok {ok}", flush=True)
                print(f"kexec.first_deploy_{n}{tag}_paths {json.dumps(paths, sort_keys=True)}", flush=True)
                print(f"kexec.first_deploy_{n}{tag}_cpu_s {cpu[0]:.1f} (farm and its curl/httpd {cpu[1]:.1f})", flush=True)
                print(f"kexec_vs_fabric_put_{n}{tag}_ratio {ratio:.3f}  (target <= 0.1: {'ok' if ratio <= 0.1 else 'MISSED'})",
                      flush=True)
                verdict = "ok" if 0 <= origin <= 3 * image_bytes else "MISSED"
                print(f"kexec.first_deploy_{n}{tag}_origin_bytes {origin} ({origin / image_bytes:.2f} images; "
                      f"target <= 3: {verdict})", flush=True)

        # the cached cycle on the largest count: every node holds the image already
        nodeset = f"sim-[0001-{n_max:04d}]"
        true_cmd = [sys.executable, str(ROOT / "bench" / "bench_kexec.py"), "--fabric-true", str(farm.dir / "farm.json"),
                    str(key)]
        fwall, fab, _, _ = timed(true_cmd, env, 600, farm.proc.pid)
        doc = json.loads(fab.stdout.strip().splitlines()[-1]) if fab.stdout.strip() else {"wall": fwall, "ok": 0}
        cmd = [sys.executable, "-m", "rhaas", "kexec", nodeset, "--kernel", str(tmp / f"vmlinuz-{n_max}"),
               "--initrd", str(tmp / f"initrd-{n_max}"), "--append", "console=ttyS0", "--json"]
        wall, done, _, _ = timed(cmd, env, 600, farm.proc.pid)
        results = json.loads(done.stdout or "[]")
        ok = sum(1 for r in results if r["outcome"] == "ok")
        cached = sum(1 for r in results if (r.get("transfer") or {}).get("path") == "cache")
        ratio = wall / doc["wall"]
        print(f"fabric.threadinggroup_true_{n_max}_wall_s {doc['wall']:.2f}", flush=True)
        print(f"kexec.cached_{n_max}_wall_s {wall:.2f}", flush=True)
        print(f"kexec.cached_{n_max}_ok {ok} (from cache: {cached})", flush=True)
        print(f"kexec_cached_vs_fabric_true_{n_max}_ratio {ratio:.2f}  (target <= 1.0: "
              f"{'ok' if ratio <= 1.0 else 'MISSED'})", flush=True)
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
