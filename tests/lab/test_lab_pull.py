"""Lab VMs pull a new image over HTTP from the run's origin; a repeat deploy comes from their disk cache.

The lab fixes one loopback port per lab (``blob_port`` in lab.json); each VM's 10.0.2.100:80
is forwarded there by QEMU's user networking (``guestfwd`` with a per-connection relay,
rhaas/lab/scripts/blobrelay.py; ``restrict=on`` stays), and the root instance kexecs with
``blob-listen 127.0.0.1:PORT`` and ``blob-url http://10.0.2.100:80``. A run that finds the
port held (another run at the same time) pushes the image over SFTP instead.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading

import pytest
from lab_helpers import node_state


def test_a_vm_forwards_the_origin_address_to_the_labs_fixed_loopback_port(tmp_path):
    from rhaas.lab.lab import relay_command
    from rhaas.lab.vm import VM, LabError, VMConfig, mac_for

    cfg = VMConfig(name="lab-01", node_dir=str(tmp_path / "n"), ssh_port=2222, mac=mac_for("lab-01"),
                   kernel="/k", initrds={"standby": "/a"}, blob_port=40123, blob_relay=relay_command(40123))
    argv = VM.create(cfg).qemu_argv("standby", "n0nce")
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev.startswith("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,")
    assert f",guestfwd=tcp:10.0.2.100:80-cmd:{sys.executable} -I " in netdev
    assert netdev.endswith("blobrelay.py 40123")
    plain = VM.create(VMConfig(**{**cfg.__dict__, "node_dir": str(tmp_path / "m"), "blob_port": 0}))
    assert "guestfwd" not in " ".join(plain.qemu_argv("standby", "x"))
    bad = VM.create(VMConfig(**{**cfg.__dict__, "node_dir": str(tmp_path / "b"), "blob_relay": "x,y 1"}))
    with pytest.raises(LabError):
        bad.qemu_argv("standby", "x")


def _relay(port: int, request: bytes) -> tuple[bytes, int]:
    """Run the relay the way QEMU does (the guest's connection on stdin/stdout); returns its answer."""
    from rhaas.lab.vm import RELAY_SCRIPT

    guest, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-I", str(RELAY_SCRIPT), str(port)], stdin=theirs, stdout=theirs,
                            stderr=subprocess.DEVNULL)
    theirs.close()
    guest.settimeout(30)
    guest.sendall(request)
    guest.shutdown(socket.SHUT_WR)
    data = b""
    try:
        while chunk := guest.recv(65536):
            data += chunk
    except ConnectionResetError:  # closed with our request unread: the guest sees a reset
        pass
    guest.close()
    return data, proc.wait(timeout=30)


def test_the_relay_copies_both_ways_and_closes_at_once_when_no_run_listens():
    body = os.urandom(3 * 1024 * 1024)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        got: list[bytes] = []

        def serve_one() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(30)
                req = b""
                while chunk := conn.recv(4096):
                    req += chunk
                got.append(req)
                conn.sendall(body)

        t = threading.Thread(target=serve_one, daemon=True)
        t.start()
        answer, rc = _relay(port, b"GET /x HTTP/1.1\r\n\r\n")
        t.join(30)
    assert got == [b"GET /x HTTP/1.1\r\n\r\n"] and answer == body and rc == 0
    answer, rc = _relay(port, b"GET /x HTTP/1.1\r\n\r\n")  # the listener is gone now
    assert answer == b"" and rc == 1


def _new_image(stack, tmp_path, tag: str) -> tuple[str, str]:
    """A new image (the lab's kernel, its initrd plus a marker file): (name, marker)."""
    from rhaas.lab.initrd import make_overlay

    base = stack.images["second"]
    marker = secrets.token_hex(8)
    name = f"pull-{tag}-{marker[:6]}"
    initrd = tmp_path / f"{name}.initrd"
    with open(base["initrd"], "rb") as src, open(initrd, "wb") as out:
        out.write(src.read())
        out.write(make_overlay({"etc/rhaas-pull-marker": marker + "\n", "etc/rhaas-pull-pad": os.urandom(1 << 20)}))
    stack.root("image", "add", name, "--kernel", base["kernel"], "--initrd", initrd, "--append", base["append"])
    return name, marker


def _idle(stack, timeout: float = 300.0) -> None:
    """Wait until the root runs no kexec on the lab's nodes (an earlier test's ``free`` starts a
    standby kexec in the background, which holds the node and the lab's origin port)."""
    import time

    deadline = time.monotonic() + timeout
    busy = list(stack.names)
    while busy and time.monotonic() < deadline:
        busy = [n for n in stack.names
                if json.loads(stack.root("show", n, "--json").stdout).get("status") == "provisioning"]
        if busy:
            time.sleep(1)
    assert not busy, f"still provisioning after {timeout:g}s: {busy}"


def _kexec(stack, *args) -> tuple[int, dict, dict]:
    from rhaas.lab.stack import run_rhaas

    proc = run_rhaas(stack.root_home, "kexec", *args, "--json", check=False)
    assert proc.stdout.strip(), proc.stderr
    summary = {}
    for line in proc.stderr.splitlines():
        if line.startswith("{") and "rhaas_kexec_transfer" in line:
            summary = json.loads(line)["rhaas_kexec_transfer"]
    return proc.returncode, json.loads(proc.stdout)[0], summary


def _runs(node, name: str, marker: str, r: dict, before: dict) -> None:
    now = node_state(node)
    assert now["boot_id"] == r["boot_id"] != before["boot_id"]
    assert f"rhaas.nonce={r['nonce']}" in now["cmdline"].split()
    rc, out, err = node.run("cat /etc/rhaas-pull-marker")
    assert rc == 0 and out.strip() == marker, (name, out, err)


@pytest.mark.lab
def test_a_new_image_comes_over_http_from_the_origin_and_a_repeat_from_the_disk_cache(lab_stack, tmp_path,
                                                                                     timings):
    info = json.loads((lab_stack.dir / "lab.json").read_text())
    assert info["blob_url"] == "http://10.0.2.100:80" and info["blob_listen"] == f"127.0.0.1:{info['blob_port']}"
    node = lab_stack.node("lab-01")
    name, marker = _new_image(lab_stack, tmp_path, "origin")
    _idle(lab_stack)

    before = node_state(node)
    rc, r, summary = _kexec(lab_stack, node.name, "--image", name)
    assert rc == 0 and r["outcome"] == "ok", r
    assert r["transfer"]["path"] == "origin", r["transfer"]
    assert r["transfer"]["bytes"] > 1 << 20, r["transfer"]  # at least the new initrd
    assert summary["origin_bytes"] >= r["transfer"]["bytes"] and summary["paths"] == {"origin": 1}, summary
    _runs(node, name, marker, r, before)  # verified: the new boot runs the pulled bytes
    timings["kexec of a new image, pulled from the origin"] = sum(r["phases"].values())

    before = node_state(node)
    rc, r, summary = _kexec(lab_stack, node.name, "--image", name)
    assert rc == 0 and r["outcome"] == "ok", r
    assert r["transfer"] == {"path": "cache", "bytes": 0}, r["transfer"]
    assert summary.get("origin_bytes", 0) == 0, summary
    _runs(node, name, marker, r, before)
    timings["kexec of the same image, from the disk cache"] = sum(r["phases"].values())


@pytest.mark.lab
def test_a_run_that_finds_the_labs_origin_port_busy_pushes_over_sftp(lab_stack, tmp_path):
    info = json.loads((lab_stack.dir / "lab.json").read_text())
    node = lab_stack.node("lab-02")
    name, marker = _new_image(lab_stack, tmp_path, "busy")
    _idle(lab_stack)
    before = node_state(node)
    with socket.create_server(("127.0.0.1", info["blob_port"]), reuse_port=False) as other_run:
        assert other_run.getsockname()[1] == info["blob_port"]
        rc, r, summary = _kexec(lab_stack, node.name, "--image", name)
    assert rc == 0 and r["outcome"] == "ok", r
    assert summary == {}, summary  # this run had no origin
    assert r["transfer"]["path"] == "sftp" and r["transfer"]["bytes"] > 1 << 20, r["transfer"]
    _runs(node, name, marker, r, before)
