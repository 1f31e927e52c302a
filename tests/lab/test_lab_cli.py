"""`rhaas lab` without QEMU: missing tools are named, and a SIMULATED lab goes up and down.

The simulated lab is the asyncssh node farm (rhaas.sim.farm) with state-only ipmi_sim BMCs
when ipmi_sim is installed; it needs no VM, so these tests are not marked `lab`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lab_helpers import assert_loopback_only

from rhaas.sim.control import read_state

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, env=None, home=None, input=None, timeout=300):
    e = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    if home:
        e["RHAAS_HOME"] = str(home)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "rhaas", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout, input=input, cwd=str(ROOT), check=False)


def test_lab_up_names_the_missing_package(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = cli("lab", "up", "--dir", tmp_path / "lab", env={"PATH": str(empty)})
    assert proc.returncode != 0
    assert "qemu-system-x86" in proc.stderr and "apt-get install" in proc.stderr
    assert "--sim" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "lab" / "lab.json").exists()

    (empty / "qemu-system-x86_64").symlink_to(shutil.which("true") or "/bin/true")
    proc = cli("lab", "up", "--dir", tmp_path / "lab", env={"PATH": str(empty)})
    assert proc.returncode != 0 and "openipmi" in proc.stderr


def test_lab_down_without_a_lab(tmp_path):
    proc = cli("lab", "down", "--dir", tmp_path)
    assert proc.returncode == 1 and "no lab in" in proc.stderr
    proc = cli("lab", "status", "--dir", tmp_path, env={"RHAAS_LAB_DIR": str(tmp_path)})
    assert proc.returncode == 1


def test_simulated_lab_up_derive_down(tmp_path):
    from rhaas.lab.vm import pid_alive

    d = tmp_path / "simlab"
    pids: list[int] = []
    proc = cli("lab", "up", "--sim", "3", "--dir", d, env={"RHAAS_LAB_DIR": str(tmp_path / "unused")})
    try:
        assert proc.returncode == 0, proc.stderr
        assert "SIMULATED" in proc.stdout and "SIMULATED" in proc.stderr
        info = json.loads((d / "lab.json").read_text())
        assert info["simulated"] is True and info["label"] == "SIMULATED" and info["rhaas"]["simulated"] is True
        url = info["rhaas"]["url"]
        assert f"--upstream {url} --project lab --user tenant" in proc.stdout
        assert oct((d / "tenant.password").stat().st_mode & 0o777) == "0o600"

        st = json.loads(cli("lab", "status", "--json", env={"RHAAS_LAB_DIR": str(d)}).stdout)
        assert st["simulated"] and st["serve"]["running"] and st["farm"]["running"]
        assert [n["name"] for n in st["nodes"]] == ["sim-0001", "sim-0002", "sim-0003"]
        assert "SIMULATED" in cli("lab", "status", "--dir", d).stdout

        pids = [info["rhaas"]["serve"]["pid"], info["farm"]["pid"]]
        pids += [n["pids"]["ipmi_sim"] for n in info["nodes"] if n["pids"].get("ipmi_sim")]
        assert assert_loopback_only(pids) >= 2

        # a derived instance, exactly as `lab up` told us
        home = tmp_path / "derived"
        pw = (d / "tenant.password").read_text().strip()
        assert cli("init", "--upstream", url, "--project", "lab", "--user", "tenant", home=home,
                   env={"RHAAS_UPSTREAM_PASSWORD": pw}).returncode == 0
        assert cli("config", "set", "ssh-key", d / "id_ed25519", home=home).returncode == 0
        r = cli("lease", "2", home=home, env={"RHAAS_UPSTREAM_TIMEOUT": "60"})
        assert r.returncode == 0, r.stdout + r.stderr
        img = info["rhaas"]["images"]["second"]
        assert cli("image", "add", "second", "--kernel", img["kernel"], "--initrd", img["initrd"],
                   "--append", img["append"], home=home).returncode == 0
        r = cli("kexec", "sim-0001", "--image", "second", "--json", home=home)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)[0]
        state = read_state(d / "farm", "sim-0001", info["farm"]["pid"])
        assert res["outcome"] == "ok" and f"rhaas.nonce={res['nonce']}" in state["cmdline"]
        if shutil.which("ipmi_sim"):
            old = read_state(d / "farm", "sim-0002", info["farm"]["pid"])["boot_id"]
            r = cli("power", "cycle", "sim-0002", "--json", home=home)
            assert r.returncode == 0 and json.loads(r.stdout)[0]["outcome"] == "ok", r.stderr
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                st2 = read_state(d / "farm", "sim-0002", info["farm"]["pid"])
                if st2["boot_id"] != old and st2["up"]:
                    break
                time.sleep(0.1)
            assert st2["boot_id"] != old and "BOOT_IMAGE=pxe" in st2["cmdline"]
    finally:
        down = cli("lab", "down", "--dir", d)
    assert down.returncode == 0, down.stderr
    for pid in pids:
        assert not pid_alive(pid)
    again = cli("lab", "down", "--dir", d)
    assert again.returncode == 0 and "nothing was running" in again.stderr
    assert json.loads((d / "lab.json").read_text())["state"] == "down"
