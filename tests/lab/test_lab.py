"""End-to-end lab tests: kexec, IPMI power control, clean up/down."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import pytest
from lab_helpers import STATE_CMD, assert_loopback_only, node_state, parse_state, sockets_of

pytestmark = pytest.mark.lab



# ---------------------------------------------------------------------------
# (a) kexec into the second image
# ---------------------------------------------------------------------------

def test_kexec_into_second_image(lab, timings):
    import paramiko

    node = lab.nodes[0]
    images = lab.info["images"]
    before = node_state(node)
    assert before["image"] in ("standby", "second")
    assert len(before["boot_id"]) == 36

    nonce = "kx" + secrets.token_hex(4)
    client = node.ssh()  # pinned host key, RejectPolicy
    try:
        t0 = time.monotonic()
        sftp = client.open_sftp()
        sftp.put(images["kernel"], "/run/vmlinuz")
        sftp.put(images["initrds"]["second"], "/run/initrd-second")
        sftp.close()
        timings["kexec: sftp kernel+initrd"] = time.monotonic() - t0

        t0 = time.monotonic()
        _in, out, err = client.exec_command(
            "kexec -l /run/vmlinuz --initrd=/run/initrd-second "
            f'--command-line="console=ttyS0 quiet panic=5 rhaas.nonce={nonce}"', timeout=120)
        assert out.channel.recv_exit_status() == 0, err.read().decode()
        timings["kexec: kexec -l"] = time.monotonic() - t0

        _in, out, _err = client.exec_command(
            'setsid sh -c "sleep 0.2; kexec -e" </dev/null >/dev/null 2>&1 &', timeout=30)
        assert out.channel.recv_exit_status() == 0
    finally:
        client.close()
    t0 = time.monotonic()
    time.sleep(0.5)

    def switched(text: str) -> bool:
        st = parse_state(text)
        return st["boot_id"] != before["boot_id"] and f"rhaas.nonce={nonce}" in st["cmdline"].split()

    after = parse_state(node.wait_ssh(timeout=120, until=switched, command=STATE_CMD))
    timings["kexec: kexec -e -> verified"] = time.monotonic() - t0
    assert after["image"] == "second"
    assert after["boot_id"] != before["boot_id"]
    assert f"rhaas.nonce={nonce}" in after["cmdline"].split()
    # kexec is not a power event: the same QEMU process is still running
    assert node.vm.pid() == node.vm.running_info()["pid"]
    assert node.vm.last_reported_image() == "second"

    # the pinned host key survived the kexec, and a wrong pin is rejected
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from rhaas.lab.guestssh import ssh_connect

    wrong = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    with pytest.raises(paramiko.BadHostKeyException):
        ssh_connect(node.ssh_port, node.ssh_key, wrong).close()


# ---------------------------------------------------------------------------
# (b) IPMI: status, boot device, power cycle, reset
# ---------------------------------------------------------------------------

def test_ipmi_power_cycle_pxe(lab, timings):
    from pyipmi.chassis import BootDevice

    node = lab.nodes[0]
    before = node_state(node)
    pid_before = node.vm.pid()

    conn = node.ipmi_connection()
    with conn:
        assert conn.get_chassis_status().power_on is True
        conn.set_boot_options(BootDevice.PXE, "legacy", False)
        assert conn.get_boot_device() == BootDevice.PXE
        assert node.vm.boot_device() == "pxe"
        t0 = time.monotonic()
        conn.chassis_control_power_cycle()

    def rebooted(text: str) -> bool:
        return parse_state(text)["boot_id"] != before["boot_id"]

    after = parse_state(node.wait_ssh(timeout=180, until=rebooted, command=STATE_CMD))
    timings["ipmi: power cycle -> SSH"] = time.monotonic() - t0
    assert after["image"] == "standby"
    assert after["boot_id"] != before["boot_id"]
    assert node.vm.pid() not in (None, pid_before)  # a new QEMU process: power was cut
    with conn:
        assert conn.get_chassis_status().power_on is True

    log = (Path(node.node_dir) / "chassis.log").read_text()
    assert "set power 0" in log and "set power 1" in log


def test_ipmi_bootdev_disk_reset_and_power_off_on(lab, timings):
    from pyipmi.chassis import BootDevice

    node = lab.nodes[0]
    vm = node.vm
    vm.set_disk_image("second")  # what is "installed on disk"
    try:
        before = node_state(node)
        conn = node.ipmi_connection()
        with conn:
            conn.set_boot_options(BootDevice.DEFAULT_HDD, "legacy", False)
            assert vm.boot_device() != "pxe"
            t0 = time.monotonic()
            conn.chassis_control_hard_reset()
        after = parse_state(node.wait_ssh(
            timeout=180, command=STATE_CMD,
            until=lambda t: parse_state(t)["boot_id"] != before["boot_id"]))
        timings["ipmi: bootdev disk + reset -> SSH"] = time.monotonic() - t0
        assert after["image"] == "second"

        # same boot device again: a reset is an in-place system_reset
        pid = vm.pid()
        with conn:
            t0 = time.monotonic()
            conn.chassis_control_hard_reset()
        again = parse_state(node.wait_ssh(
            timeout=180, command=STATE_CMD,
            until=lambda t: parse_state(t)["boot_id"] != after["boot_id"]))
        timings["ipmi: reset (system_reset) -> SSH"] = time.monotonic() - t0
        assert again["image"] == "second"
        assert vm.pid() == pid
        assert vm.running_info()["resets"] >= 1

        # power off / on through the BMC, back to PXE
        with conn:
            conn.chassis_control_power_down()
            deadline = time.monotonic() + 20
            while conn.get_chassis_status().power_on and time.monotonic() < deadline:
                time.sleep(0.2)
            assert conn.get_chassis_status().power_on is False
            assert not vm.is_running()
            conn.set_boot_options(BootDevice.PXE, "legacy", False)
            t0 = time.monotonic()
            conn.chassis_control_power_up()
        final = parse_state(node.wait_ssh(timeout=180, command=STATE_CMD))
        timings["ipmi: power on -> SSH"] = time.monotonic() - t0
        assert final["image"] == "standby"
    finally:
        vm.set_disk_image(None)


def test_ipmi_wrong_password_rejected(lab):
    from pyipmi.errors import AuthenticationError

    from rhaas.lab.bmc import ipmi_connection

    node = lab.nodes[0]
    conn = ipmi_connection(node.ipmi["host"], node.ipmi["port"], "admin", "wrongpassword")
    with pytest.raises(AuthenticationError), conn:
        conn.get_chassis_status()


# ---------------------------------------------------------------------------
# (c) what lab.json records, secrets, and loopback only
# ---------------------------------------------------------------------------

def test_lab_json_secrets_and_loopback_only(lab_stack):
    d = lab_stack.dir
    info = json.loads((d / "lab.json").read_text())
    assert info["state"] == "up" and info["simulated"] is False
    node = info["nodes"][0]
    assert node["name"] == "lab-01"
    assert node["ssh"] == f"root@127.0.0.1:{node['ssh_port']}"
    assert node["host_key"].startswith("ssh-ed25519 ")
    assert node["ipmi"]["host"] == "127.0.0.1" and node["ipmi"]["user"] == "admin"
    for secret in (node["ipmi"]["password_file"], info["ssh_key"], d / "admin.password", d / "tenant.password"):
        assert oct(os.stat(secret).st_mode & 0o777) == "0o600", secret
    secrets_ = [Path(p).read_text().strip() for p in
                (node["ipmi"]["password_file"], d / "admin.password", d / "tenant.password")]

    pids = lab_stack.running()
    kinds = {k.split("/")[1] if "/" in k else k for k in pids}
    assert {"qemu", "ipmi_sim", "serve"} <= kinds, pids
    for name, pid in pids.items():
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read()
        for secret in secrets_:
            assert secret.encode() not in argv, f"a password on {name}'s command line"
    # every VM's hostfwd, every BMC's UDP port, serve's HTTP port: all on loopback
    assert assert_loopback_only(pids.values()) >= 2 * len(info["nodes"]) + 1
    listening = [s for s in sockets_of(pids.values()) if s[1].startswith("tcp") and s[3] == "0A"]
    assert len(listening) >= len(info["nodes"]) + 1  # hostfwd per VM + serve

