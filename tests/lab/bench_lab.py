"""Measure the lab's timings (not a test; run by hand).

    .venv/bin/python tests/lab/bench_lab.py [--delays 0,10] [--cold]

Prints: guest image build (cold with an empty cache when --cold, and cached),
lab up -> SSH, kexec (sftp, kexec -l, kexec -e -> verified), and IPMI power
cycle -> SSH, for each firmware delay.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab_helpers import STATE_CMD, parse_state

from rhaas.lab import Lab, build_guest, default_cache_dir


def bench_lab(delay: float, cache: Path, workdir: Path) -> dict[str, float]:
    from pyipmi.chassis import BootDevice

    r: dict[str, float] = {}
    t0 = time.monotonic()
    lab = Lab.up(1, firmware_delay=delay, dir=workdir / f"lab-delay{delay:g}", cache_dir=cache)
    try:
        r["lab up -> SSH"] = time.monotonic() - t0
        node = lab.nodes[0]
        boot_id = parse_state(node.run(STATE_CMD)[1])["boot_id"]
        nonce = secrets.token_hex(4)
        c = node.ssh()
        t0 = time.monotonic()
        sftp = c.open_sftp()
        sftp.put(lab.info["images"]["kernel"], "/run/vmlinuz")
        sftp.put(lab.info["images"]["initrds"]["second"], "/run/initrd")
        sftp.close()
        r["sftp kernel+initrd"] = time.monotonic() - t0
        t0 = time.monotonic()
        _i, o, _e = c.exec_command("kexec -l /run/vmlinuz --initrd=/run/initrd --command-line="
                                   f'"console=ttyS0 quiet panic=5 rhaas.nonce={nonce}"')
        assert o.channel.recv_exit_status() == 0
        r["kexec -l"] = time.monotonic() - t0
        _i, o, _e = c.exec_command('setsid sh -c "sleep 0.2; kexec -e" </dev/null >/dev/null 2>&1 &')
        o.channel.recv_exit_status()
        c.close()
        t0 = time.monotonic()
        time.sleep(0.5)
        out = node.wait_ssh(180, command=STATE_CMD, until=lambda t: parse_state(t)["boot_id"] != boot_id
                            and f"rhaas.nonce={nonce}" in parse_state(t)["cmdline"])
        r["kexec -e -> verified"] = time.monotonic() - t0
        assert parse_state(out)["image"] == "second"
        boot_id = parse_state(out)["boot_id"]
        conn = node.ipmi_connection()
        with conn:
            conn.set_boot_options(BootDevice.PXE, "legacy", False)
            t0 = time.monotonic()
            conn.chassis_control_power_cycle()
        out = node.wait_ssh(240, command=STATE_CMD, until=lambda t: parse_state(t)["boot_id"] != boot_id)
        r["ipmi power cycle -> SSH"] = time.monotonic() - t0
        assert parse_state(out)["image"] == "standby"
    finally:
        lab.down()
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delays", default="0,10")
    ap.add_argument("--cold", action="store_true", help="also time a build into an empty cache")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rhaas-bench-") as tmp:
        work = Path(tmp)
        key = work / "k.pub"
        key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEw1Np3hF3t/6X0ZtC6jQn0mPzqF3r0P1Yb8m3y0jX4N x\n")
        if args.cold:
            t0 = time.monotonic()
            build_guest(work / "cold-cache", key)
            print(f"{'image build, cold (download+build)':40s} {time.monotonic() - t0:6.2f}")
            t0 = time.monotonic()
            build_guest(work / "cold-cache", key)
            print(f"{'image build, cached (same process)':40s} {time.monotonic() - t0:6.2f}")
        cache = default_cache_dir()
        t0 = time.monotonic()
        build_guest(cache, key)
        print(f"{'image build, cached (default cache)':40s} {time.monotonic() - t0:6.2f}")
        for delay in (float(x) for x in args.delays.split(",")):
            for k, v in bench_lab(delay, cache, work).items():
                print(f"delay {delay:4g}s  {k:30s} {v:6.2f}", flush=True)


if __name__ == "__main__":
    main()
