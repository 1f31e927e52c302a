"""rhaas on the lab's real VMs: kexec, the IPMI fallback, host keys, power through nesting.

Everything goes through the `rhaas` CLI of the lab's root instance (DIR/root), or of
derived instances leasing from the lab's `rhaas serve`. What the nodes really run is
checked over the lab's own SSH helper (pinned host key): boot id, /etc/rhaas-image and
/proc/cmdline. The session lab has two VMs: lab-01 and lab-02.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from lab_helpers import STATE_CMD, assert_loopback_only, node_state, parse_state, wait_free

pytestmark = pytest.mark.lab


def kexec(stack, *args, home=None):
    from rhaas.lab.stack import run_rhaas

    proc = run_rhaas(home or stack.root_home, "kexec", *args, "--json", check=False)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def chassis_mark(node) -> int:
    path = Path(node.node_dir) / "chassis.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


def chassis_since(node, mark: int) -> list[str]:
    path = Path(node.node_dir) / "chassis.log"  # written at the BMC's first chassis call
    lines = path.read_text().splitlines()[mark:] if path.exists() else []
    return [ln.split(" ", 2)[2] for ln in lines]


def test_lab_up_registered_everything(lab_stack):
    """`rhaas lab up` left a root instance that knows the nodes, images, users; and said how to derive."""
    out = lab_stack.up_stdout
    assert f"rhaas init --upstream {lab_stack.url} --project lab --user tenant" in out
    assert f"RHAAS_UPSTREAM_PASSWORD=$(cat {lab_stack.dir / 'tenant.password'})" in out
    assert f"config set ssh-key {lab_stack.client_key}" in out

    nodes = {n["name"]: n for n in json.loads(lab_stack.root("list", "--json").stdout)}
    assert sorted(nodes) == ["lab-01", "lab-02"]
    for info in lab_stack.info["nodes"]:
        n = nodes[info["name"]]
        assert n["ssh"] == info["ssh"] and n["ssh_host_key"] == info["host_key"]
        assert n["bmc"] == f"admin@127.0.0.1:{info['ipmi']['port']}"
        assert n["nics"][0]["macaddr"] == info["mac"]
    images = {i["name"]: i for i in json.loads(lab_stack.root("image", "list", "--json").stdout)}
    assert images["standby"]["standby"] is True and not images["second"]["standby"]
    assert images["second"]["append"] == "console=ttyS0 quiet panic=5"
    assert lab_stack.root("config", "get", "ssh-key").stdout.strip() == str(lab_stack.client_key)
    users = json.loads(lab_stack.root("user", "list", "--json").stdout)
    assert users["admin"]["is_admin"] and users["tenant"]["projects"] == ["lab"]

    status = json.loads(lab_stack.root("lab", "status", "--dir", lab_stack.dir, "--json").stdout)
    assert status["serve"]["running"] and status["url"] == lab_stack.url
    assert [n["name"] for n in status["nodes"] if n["power"]] == ["lab-01", "lab-02"]
    for name in ("lab-01", "lab-02"):  # and they answer SSH with the pinned key
        assert node_state(lab_stack.node(name))["image"] in ("standby", "second")


# ---------------------------------------------------------------------------
# (a) rhaas kexec of a VM, verified by boot id and nonce
# ---------------------------------------------------------------------------

def test_kexec_through_the_cli(lab_stack, timings):
    node = lab_stack.node("lab-01")
    before = node_state(node)
    qemu = node.vm.pid()

    t0 = time.monotonic()
    rc, results, err = kexec(lab_stack, "lab-01", "--image", "second")
    timings["rhaas kexec lab-01 --image second"] = time.monotonic() - t0
    assert rc == 0, err
    r = results[0]
    assert r["outcome"] == "ok" and r["image"] == "second" and r["reason"] is None
    assert set(r["phases"]) >= {"connect", "stage", "load", "down", "up", "verify"}

    after = node_state(node)  # the lab's own SSH, not rhaas's word
    assert after["boot_id"] == r["boot_id"] != before["boot_id"]
    assert f"rhaas.nonce={r['nonce']}" in after["cmdline"].split()
    assert after["image"] == "second"
    assert node.vm.pid() == qemu  # a kexec is no power event: the same QEMU process
    doc = json.loads(lab_stack.root("show", "lab-01", "--json").stdout)
    assert doc["status"] == "ready" and doc["image"] == "second" and doc["boot_id"] == r["boot_id"]


# ---------------------------------------------------------------------------
# (b) a VM whose kexec is broken comes back through IPMI
# ---------------------------------------------------------------------------

def test_broken_kexec_falls_back_to_ipmi(lab_stack, timings):
    node = lab_stack.node("lab-02")
    rc, _out, err = node.run("mv /sbin/kexec /sbin/kexec.broken")
    assert rc == 0, err
    before = node_state(node)
    qemu = node.vm.pid()
    mark = chassis_mark(node)

    t0 = time.monotonic()
    rc, results, err = kexec(lab_stack, "lab-02", "--image", "second")
    timings["rhaas kexec with broken kexec -> fallback"] = time.monotonic() - t0
    r = results[0]
    assert rc == 1 and r["outcome"] == "fallback", (r, err)
    assert "kexec" in r["reason"]

    after = node_state(node)
    assert after["boot_id"] == r["boot_id"] != before["boot_id"]
    assert after["image"] == "standby"  # PXE boots the standby image
    assert node.vm.pid() not in (None, qemu)  # power was really cut
    calls = chassis_since(node, mark)
    assert "set boot pxe" in " ".join(calls)
    assert any(c.startswith("set power 0") for c in calls) and any(c.startswith("set power 1") for c in calls)
    assert node.run("test -x /sbin/kexec")[0] == 0  # a fresh standby boot has it again
    doc = json.loads(lab_stack.root("show", "lab-02", "--json").stdout)
    assert doc["status"] == "fallback" and doc["bootdev"] == "pxe"


# ---------------------------------------------------------------------------
# (d) the pinned host key holds across a kexec; a wrong pin is refused
# ---------------------------------------------------------------------------

def test_host_key_pinned_across_kexec(lab_stack, timings):
    import paramiko
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from rhaas.lab.guestssh import ssh_connect

    node = lab_stack.node("lab-02")
    pinned = json.loads(lab_stack.root("show", "lab-02", "--json").stdout)["ssh_host_key"]
    assert pinned == node.host_key
    before = node_state(node)

    # pipelined: load now, jump later; both sessions check the pinned key strictly
    rc, results, err = kexec(lab_stack, "lab-02", "--image", "second", "--load-only")
    assert rc == 0 and results[0]["outcome"] == "loaded", (results, err)
    assert node_state(node)["boot_id"] == before["boot_id"]
    t0 = time.monotonic()
    rc, results, err = kexec(lab_stack, "lab-02", "--exec")
    timings["rhaas kexec --exec (pre-loaded)"] = time.monotonic() - t0
    r = results[0]
    assert rc == 0 and r["outcome"] == "ok", (r.get("reason"), r, err)
    after = node_state(node)
    assert after["boot_id"] == r["boot_id"] != before["boot_id"]
    assert f"rhaas.nonce={r['nonce']}" in after["cmdline"].split() and after["image"] == "second"
    # the new kernel presents the same key: the pin still matches, nothing was re-trusted
    assert json.loads(lab_stack.root("show", "lab-02", "--json").stdout)["ssh_host_key"] == pinned
    ssh_connect(node.ssh_port, node.ssh_key, pinned).close()

    wrong = "ssh-ed25519 " + Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode().split()[1]
    with pytest.raises(paramiko.BadHostKeyException):
        ssh_connect(node.ssh_port, node.ssh_key, wrong).close()
    mark = chassis_mark(node)
    lab_stack.root("node", "set", "lab-02", "--host-key", wrong)
    try:
        rc, results, err = kexec(lab_stack, "lab-02", "--image", "second")
    finally:
        lab_stack.root("node", "set", "lab-02", "--host-key", pinned)
    r = results[0]
    assert rc == 1 and r["outcome"] == "failed", (r, err)
    assert "host key" in r["reason"]
    assert node_state(node)["boot_id"] == after["boot_id"]  # nothing happened to the node
    assert chassis_since(node, mark) == []  # and no power cycle was tried


# ---------------------------------------------------------------------------
# (c) a power cycle through two levels of nesting reaches ipmi_sim and the VM
# ---------------------------------------------------------------------------

def test_power_cycle_through_two_levels(lab_stack, tmp_path, timings):
    from rhaas.lab.stack import run_rhaas, start_serve, stop_serve

    node = lab_stack.node("lab-01")
    d1 = lab_stack.derive(tmp_path / "d1")
    wait_free(lab_stack, "lab-01")  # an earlier test gave it back: it returns to the standby first
    run_rhaas(d1, "lease", "lab-01")
    run_rhaas(d1, "project", "add", "p2")
    run_rhaas(d1, "user", "add", "bob", "--project", "p2", "--password-stdin", input="bobs-pw\n")
    s1 = start_serve(d1)
    try:
        assert assert_loopback_only([s1.pid]) >= 1
        d2 = lab_stack.derive(tmp_path / "d2", user="bob", project="p2", password="bobs-pw", url=s1.url)
        run_rhaas(d2, "lease", "lab-01")
        assert [n["name"] for n in json.loads(run_rhaas(d2, "list", "--json").stdout)] == ["lab-01"]

        before = node_state(node)
        qemu = node.vm.pid()
        mark = chassis_mark(node)
        t0 = time.monotonic()
        proc = run_rhaas(d2, "power", "cycle", "lab-01", "--json", check=False)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)[0]["outcome"] == "ok"
        after = parse_state(node.wait_ssh(timeout=180, command=STATE_CMD,
                                          until=lambda t: parse_state(t)["boot_id"] != before["boot_id"]))
        timings["power cycle d2 -> d1 -> root -> ipmi_sim -> SSH"] = time.monotonic() - t0
        assert after["boot_id"] != before["boot_id"]
        assert node.vm.pid() not in (None, qemu)  # the VM really restarted
        calls = chassis_since(node, mark)
        assert any(c.startswith("set power 0") for c in calls) and any(c.startswith("set power 1") for c in calls)
        status = run_rhaas(d2, "power", "status", "lab-01", "--json")
        assert json.loads(status.stdout)[0]["power"] == "on"
        # the root saw the cycle as the tenant's, knowing nothing of d1's downstream
        events = json.loads(lab_stack.root("events", "lab-01", "--json").stdout)
        assert any(e["action"] == "power-cycle" and e["outcome"] == "ok" for e in events)

        proc = run_rhaas(d2, "free", "lab-01", "--json", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(run_rhaas(d1, "list", "--json").stdout)[0]["project"] is None
    finally:
        stop_serve(s1.pid, d1)
    from rhaas.lab.vm import pid_alive

    assert not pid_alive(s1.pid)
    run_rhaas(d1, "free", "lab-01", timeout=300, check=False)
    wait_free(lab_stack, "lab-01")  # back on the standby image before the next test uses it
