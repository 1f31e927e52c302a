"""Helpers for the lab tests: which sockets processes hold, and node state over SSH."""

from __future__ import annotations

import os
from pathlib import Path

STATE_CMD = "cat /proc/sys/kernel/random/boot_id; cat /etc/rhaas-image; cat /proc/cmdline"


def parse_state(out: str) -> dict:
    lines = out.strip().splitlines()
    return {"boot_id": lines[0].strip(), "image": lines[1].strip(), "cmdline": lines[2].strip()}


def node_state(node) -> dict:
    rc, out, err = node.run(STATE_CMD)
    assert rc == 0, err
    return parse_state(out)


def wait_free(stack, name: str, timeout: float = 300.0) -> None:
    """Wait until the lab's root lists ``name`` as free again: a node given back goes to the
    standby image in the background first, and is not free (nor leasable) until it is back."""
    import time

    from rhaas.adapters.hil import HILClient

    client = HILClient(stack.url, "tenant", stack.password(), timeout=30)
    deadline = time.monotonic() + timeout
    while name not in client.free_nodes():
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not come back to the free list within {timeout:g}s")
        time.sleep(0.5)


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def inet_sockets() -> dict[str, tuple[str, str, str]]:
    """inode -> (proto, local address as in /proc/net, state) for every IPv4/IPv6 socket."""
    found = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            found[f[9]] = (proto, f[1], f[3])
    return found


def is_loopback(local: str) -> bool:
    """``local`` is /proc/net's ``HEXADDR:PORT``: 127.0.0.0/8, ::1 or ::ffff:127.x.y.z."""
    addr = local.split(":")[0]
    if len(addr) == 8:  # IPv4, host byte order (little endian): the first octet is the last byte
        return int(addr, 16) & 0xFF == 0x7F
    words = [addr[i:i + 8] for i in range(0, 32, 8)]
    if words == ["00000000", "00000000", "00000000", "01000000"]:
        return True
    return words[:3] == ["00000000", "00000000", "FFFF0000"] and int(words[3], 16) & 0xFF == 0x7F


def sockets_of(pids) -> list[tuple[int, str, str, str]]:
    """(pid, proto, local address, state) of every inet socket the processes hold."""
    table = inet_sockets()
    out = []
    for pid in pids:
        for inode in socket_inodes(pid):
            if inode in table:
                proto, local, st = table[inode]
                out.append((pid, proto, local, st))
    return out


def assert_loopback_only(pids) -> int:
    """Fail if any of ``pids`` holds an inet socket bound beyond loopback; returns the count."""
    socks = sockets_of(pids)
    bad = [s for s in socks if not is_loopback(s[2])]
    assert not bad, f"sockets beyond loopback: {bad}"
    return len(socks)
