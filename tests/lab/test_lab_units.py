"""Fast lab checks that need no VM: cpio overlays and the chassis-control script."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rhaas.lab.guest import authorized_keys_overlay, make_overlay
from rhaas.lab.vm import VM, VMConfig, mac_for

CHASSIS = Path(__file__).resolve().parents[2] / "rhaas" / "lab" / "chassis.py"


def _cpio_list(data: bytes) -> list[str]:
    proc = subprocess.run(["cpio", "-itv", "--quiet"], input=gzip.decompress(data),
                          capture_output=True, check=True)
    return proc.stdout.decode().splitlines()


@pytest.mark.skipif(not shutil.which("cpio"), reason="cpio missing (Debian package cpio)")
def test_make_overlay_is_newc_cpio(tmp_path):
    out = tmp_path / "ov.cpio.gz"
    data = make_overlay({"etc/rhaas-image": b"second\n",
                         "root/.ssh/authorized_keys": (b"ssh-ed25519 AAAA x\n", 0o600)},
                        out, dirs={"root": 0o700, "root/.ssh": 0o700})
    assert out.read_bytes() == data
    listing = _cpio_list(data)
    names = [line.split()[-1] for line in listing]
    assert sorted(names) == ["etc", "etc/rhaas-image", "root", "root/.ssh",
                             "root/.ssh/authorized_keys"]
    for i, name in enumerate(names):  # every parent directory comes before its children
        if "/" in name:
            assert name.rsplit("/", 1)[0] in names[:i]
    modes = {line.split()[-1]: line.split()[0] for line in listing}
    assert modes["root/.ssh"] == "drwx------"
    assert modes["root/.ssh/authorized_keys"] == "-rw-------"
    assert all(" root " in line for line in listing)  # uid 0
    # extract and compare content
    subprocess.run(["cpio", "-id", "--quiet"], input=gzip.decompress(data), cwd=tmp_path, check=True)
    assert (tmp_path / "etc/rhaas-image").read_bytes() == b"second\n"
    assert stat.S_IMODE((tmp_path / "root/.ssh/authorized_keys").stat().st_mode) == 0o600


@pytest.mark.skipif(not shutil.which("cpio"), reason="cpio missing (Debian package cpio)")
def test_authorized_keys_overlay():
    names = [line.split()[-1] for line in _cpio_list(authorized_keys_overlay("ssh-ed25519 AAAA c"))]
    assert names == ["root", "root/.ssh", "root/.ssh/authorized_keys"]


def _chassis(node_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHASSIS), str(node_dir), *args],
                          capture_output=True, text=True, timeout=30, check=False)


def test_chassis_script_state_only(tmp_path):
    """get/set boot and get power against a node that is powered off (no QEMU needed)."""
    nd = tmp_path / "node"
    VM.create(VMConfig(name="lab-01", node_dir=str(nd), ssh_port=1, mac=mac_for("lab-01"),
                       kernel="/nonexistent", initrds={"standby": "/x", "second": "/y"}))
    r = _chassis(nd, "get", "power", "boot")
    assert r.returncode == 0 and r.stdout.split() == ["power:0", "boot:pxe"]
    assert _chassis(nd, "set", "boot", "default").returncode == 0
    assert _chassis(nd, "get", "boot").stdout.strip() == "boot:default"
    assert VM(nd).image_for_boot() == "standby"  # nothing installed yet
    (nd / "console.log").write_text("junk\nRHAAS-READY image=second uptime=3\n")
    assert VM(nd).image_for_boot() == "second"  # last image the node ran
    VM(nd).set_disk_image("standby")
    assert VM(nd).image_for_boot() == "standby"  # pinned wins
    assert _chassis(nd, "set", "reset", "1").returncode == 0  # off: reset is a no-op
    assert _chassis(nd, "set", "power", "0").returncode == 0
    bad = _chassis(nd, "get", "bogus")
    assert bad.returncode == 1 and bad.stdout.strip()
    assert "get power boot -> rc=0" in (nd / "chassis.log").read_text()


def test_firmware_delay_is_seabios_menu_wait(tmp_path):
    from rhaas.lab.vm import VM, VMConfig, mac_for

    cfg = VMConfig(name="lab-01", node_dir=str(tmp_path / "n"), ssh_port=2222, mac=mac_for("lab-01"),
                   kernel="/k", initrds={"standby": "/a", "second": "/b"}, firmware_delay_ms=2000)
    argv = VM.create(cfg).qemu_argv("standby", "n0nce")
    assert "menu=on,splash-time=2000" in argv
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in " ".join(argv)
    cfg0 = VMConfig(**{**cfg.__dict__, "node_dir": str(tmp_path / "m"), "firmware_delay_ms": 0})
    assert not any("splash-time" in a for a in VM.create(cfg0).qemu_argv("standby", "x"))
