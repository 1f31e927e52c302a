"""The network half of tests/netns_farm.py: namespaces, veths, a bridge and ``tbf`` caps, and their teardown.

Built with iproute2's ``ip``/``tc`` (the maintained tools), in ``-batch`` mode to keep the
process count low on this 2-core machine. Only addresses from 198.18.0.0/15 (RFC 2544) are
used; :func:`free_subnet` picks a /24 of 198.19.0.0/16 that no host address or route covers.
:func:`teardown` kills every process in the namespaces by PID and deletes them, which removes
every veth in them and the bridge; a host link left behind is deleted by name.
"""

from __future__ import annotations

import ipaddress
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

BENCH_RANGE = ipaddress.ip_network("198.18.0.0/15")


def run(argv: list[str], stdin: str | None = None, timeout: float = 30) -> str:
    proc = subprocess.run(argv, check=False, input=stdin, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])}...: exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    return proc.stdout


def build_network(sw_ns: str, host_link: str, origin_cidr: str, nodes: list[tuple[str, str, str]],
                  tbf: list[str]) -> None:
    """Namespaces ``sw_ns`` (bridge ``br0``) and one per node; the origin veth ``host_link`` on the host.

    ``nodes`` are ``(namespace, switch port name, ADDR/PREFIX)``; each node's ``eth0`` is
    joined to the bridge by a veth, and ``tbf`` caps both ends of every link, the origin's too.
    """
    run(["ip", "-batch", "-"], "".join(f"netns add {ns}\n" for ns in [sw_ns, *(n[0] for n in nodes)]))
    host = [f"link add {host_link} type veth peer name origin netns {sw_ns}",
            f"addr add {origin_cidr} dev {host_link}", f"link set {host_link} up"]
    host += [f"link add eth0 netns {ns} type veth peer name {port} netns {sw_ns}" for ns, port, _ in nodes]
    run(["ip", "-batch", "-"], "\n".join(host) + "\n")
    Path(f"/proc/sys/net/ipv6/conf/{host_link}/disable_ipv6").write_text("1")
    ports = ["origin", *(port for _, port, _ in nodes)]
    swcmds = ["link add br0 type bridge", "link set br0 up", "link set lo up"]
    swcmds += [f"link set {p} master br0\nlink set {p} up" for p in ports]
    run(["ip", "-n", sw_ns, "-batch", "-"], "\n".join(swcmds) + "\n")
    for ns, _, cidr in nodes:
        run(["ip", "-n", ns, "-batch", "-"], f"addr add {cidr} dev eth0\nlink set eth0 up\nlink set lo up\n")
        run(["tc", "-n", ns, "qdisc", "replace", "dev", "eth0", "root", *tbf])
    run(["tc", "-n", sw_ns, "-batch", "-"], "".join(f"qdisc replace dev {p} root {' '.join(tbf)}\n" for p in ports))
    run(["tc", "qdisc", "replace", "dev", host_link, "root", *tbf])


def connects(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=1):
            return True
    except OSError:
        return False


def banner(addr: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 198.19.0.0/16 that no host address or route overlaps (random start: parallel runs)."""
    used = []
    for line in run(["ip", "-4", "-o", "addr", "show"]).splitlines() + run(["ip", "-4", "route", "show"]).splitlines():
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    start = random.randrange(256)
    for k in range(256):
        net = ipaddress.ip_network(f"198.19.{(start + k) % 256}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free /24 in 198.19.0.0/16")


def ns_pids(ns: str) -> list[int]:
    try:
        out = subprocess.run(["ip", "netns", "pids", ns], check=False, capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def teardown(namespaces: list[str], host_links: list[str]) -> None:
    """Kill every process in ``namespaces`` (by PID, twice: a dying sshd may fork), delete them and the links."""
    listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True, timeout=10)
    existing = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    namespaces = [ns for ns in namespaces if ns in existing]
    for _ in range(3):
        pids = [p for ns in namespaces for p in ns_pids(ns)]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    if namespaces:
        subprocess.run(["ip", "-force", "-batch", "-"], check=False, input="".join(f"netns del {ns}\n" for ns in namespaces),
                       capture_output=True, text=True, timeout=60)
    for link in host_links:
        if Path(f"/sys/class/net/{link}").exists():
            subprocess.run(["ip", "link", "del", link], check=False, capture_output=True, timeout=10)
