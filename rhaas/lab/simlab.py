"""A SIMULATED lab: N nodes of the asyncssh farm (:mod:`rhaas.sim.farm`, a child process) with
a state-only ipmi_sim BMC each when ipmi_sim is installed, stand-in images, and the same root
instance and serve as a VM lab.  Needs the ``rhaas[lab]`` extra (asyncssh), not QEMU.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .handle import LabStack
from .labinfo import APPEND, IMAGE_NAMES, ROOT_HOME, SIM_CHASSIS, SIM_LABEL, Log, update_info, write_info
from .rhaasproc import children
from .rootinstance import fresh_home, setup_root, start_root_serve
from .vm import LabError, free_port, kill_pid, mac_for


def fake_images(d: Path) -> dict[str, dict]:
    """A stand-in kernel and two initrds naming their image (the farm reads /etc/rhaas-image)."""
    from .guest import make_overlay

    img = d / "images"
    img.mkdir(parents=True, exist_ok=True)
    kernel = img / "vmlinuz-sim"
    if not kernel.exists():
        kernel.write_bytes(b"RHAAS SIMULATED KERNEL\n" + os.urandom(64 * 1024))
    out = {}
    for name in IMAGE_NAMES:
        initrd = img / f"initrd-{name}-sim.cpio.gz"
        make_overlay({"etc/rhaas-image": name + "\n"}, initrd)
        out[name] = {"kernel": str(kernel), "initrd": str(initrd), "append": APPEND}
    return out


def start_farm(d: Path, n: int, pubkey: Path, log: Log, timeout: float = 60.0) -> dict:
    farm_dir = d / "farm"
    farm_dir.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(5):
        port = free_port()
        base = f"127.{random.randint(100, 250)}.0.0"
        argv = [sys.executable, "-m", "rhaas.sim.farm", "--nodes", str(n), "--dir", str(farm_dir),
                "--port", str(port), "--base", base, "--down-time", "0.5",
                "--authorized-keys", str(pubkey)]
        out_path = farm_dir / "farm.out"
        with open(out_path, "wb") as out, open(farm_dir / "farm.err", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        children[proc.pid] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if out_path.read_text(errors="replace").startswith("READY"):
                doc = json.loads((farm_dir / "farm.json").read_text())
                log(f"SIMULATED node farm: {n} node(s) on {base}/16 port {port} (pid {proc.pid})")
                return {"pid": proc.pid, "dir": str(farm_dir), "port": port, "base": base,
                        "nodes": doc["nodes"]}
            time.sleep(0.05)
        kill_pid(proc.pid, str(farm_dir))
        children.pop(proc.pid, None)
        last = (farm_dir / "farm.err").read_text(errors="replace")[-500:]
    raise LabError(f"the simulated node farm did not start: {last.strip() or 'no output'}")


def up_sim(d: Path, n: int, log: Log) -> LabStack:
    from .bmc import BMC, IPMI_USER, write_password_file
    from .lab import generate_client_key

    if n < 1:
        raise LabError("need at least one simulated node")
    fresh_home(d / ROOT_HOME)
    key = d / "id_ed25519"
    generate_client_key(key)
    info: dict = {
        "version": 1, "kind": "simulated", "simulated": True, "label": SIM_LABEL, "state": "up",
        "dir": str(d), "created_at": time.time(), "firmware_delay": 0.0,
        "ssh_key": str(key), "ssh_pubkey": f"{key}.pub", "nodes": [],
    }
    write_info(d, info)
    try:
        farm = start_farm(d, n, Path(f"{key}.pub"), log)
        info["farm"] = {k: farm[k] for k in ("pid", "dir", "port", "base")}
        write_info(d, info)
        have_bmc = shutil.which("ipmi_sim") is not None
        password_file = d / "ipmi-password"
        password = write_password_file(password_file) if have_bmc else None
        faults: dict = {}
        used: set[int] = set()
        for fn in farm["nodes"]:
            name = fn["name"]
            nd = {"name": name, "ssh": fn["ssh"], "host_key": fn["host_key"], "mac": mac_for(name, str(d)),
                  "ipmi": None, "bmc_dir": None, "pids": {}, "simulated": True}
            if have_bmc:
                bdir = d / "bmcs" / name
                bdir.mkdir(parents=True, exist_ok=True)
                (bdir / "power").write_text("1\n")
                (bdir / "boot").write_text("pxe\n")
                port = free_port(socket.SOCK_DGRAM, avoid=used)
                bmc = BMC.create(name, bdir, port, password, bdir, script=SIM_CHASSIS)  # type: ignore[arg-type]
                nd["bmc_dir"] = str(bdir)
                nd["ipmi"] = {"host": "127.0.0.1", "port": port, "user": IPMI_USER,
                              "password_file": str(password_file)}
                nd["pids"]["ipmi_sim"] = bmc.start()
                faults[name] = {"power_file": str(bdir / "power")}
            info["nodes"].append(nd)
            write_info(d, info)
        if faults:
            tmp = Path(farm["dir"]) / ".faults.json.tmp"
            tmp.write_text(json.dumps(faults))
            os.replace(tmp, Path(farm["dir"]) / "faults.json")
            log(f"{len(faults)} state-only ipmi_sim BMC(s) (SIMULATED chassis)")
        else:
            log("ipmi_sim not installed: SIMULATED nodes have no BMC (install openipmi for one)")
        if have_bmc:
            info["ipmi_password_file"] = str(password_file)
        write_info(d, info)
        (d / ROOT_HOME).mkdir(parents=True, exist_ok=True)
        rh = setup_root(d, d / ROOT_HOME, info["nodes"], fake_images(d), timeout_setting=60.0, log=log)
        rh["simulated"] = True
        update_info(d, rhaas=rh)
        start_root_serve(d, rh, log)
    except BaseException:
        from .stack import down

        with contextlib.suppress(Exception):
            down(d)
        raise
    return LabStack(d)
