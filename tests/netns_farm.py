"""A farm of kexec-ready standby nodes in network namespaces, on links capped by ``tc`` (lab notes §8, §17).

Each node is a network namespace of its own with a veth pair to a bridge (in a switch
namespace), an address from 198.18.0.0/15, and a real OpenSSH server (Debian's
``/usr/sbin/sshd -D -f CONFIG``, own host key, ``UsePAM no``, ``MaxStartups`` raised). The
origin, where ``rhaas kexec`` runs and its blob listener binds, is a veth on the host joined
to the same bridge. Every link, node and origin, has ``tbf rate 100mbit burst 64kb latency
50ms`` on both ends, so the origin cannot send more than one node can receive.

Inside its own mount namespace each node looks like a standby enough for rhaas's kexec
pipeline (rhaas/core/kexec/commands.py): a private tmpfs on ``/run`` (the cache dir
``/run/rhaas``), files bind-mounted over ``/proc/sys/kernel/random/boot_id``,
``/proc/cmdline`` and ``/sys/kernel/kexec_loaded``, a ``passwd`` whose root has ``/bin/sh``
and an empty home, and a ``PATH`` (sshd's ``SetEnv``) that holds only busybox applets
(``wget``, ``httpd``, ``sha256sum``, ``setsid``, ...) and a fake ``kexec``. The fake records
``-l`` and, on ``-e``, does what a real jump does to what rhaas can see: the link goes down
for ``down_time`` seconds, every process of the node but its sshd listener is killed, the
RAM cache is emptied, and ``boot_id`` (a new uuid) and ``cmdline`` (the loaded one) change.

The network (tests/netns_net.py) is built with iproute2's ``ip``/``tc``. Teardown
(:meth:`NetnsFarm.cleanup`, idempotent, also from ``__exit__``) kills every process in the
farm's namespaces by PID and deletes the namespaces, which removes every veth and the bridge
with them. Each run uses a random prefix and a /24 from 198.19.0.0/16 no host route already
covers; what was created is written to ``farm.json`` first, so ``python tests/netns_farm.py
cleanup DIR`` can finish a run that died.

    with NetnsFarm(tmp, authorized_keys=pub, nodes_wanted=16) as farm:
        farm.nodes[0].addr, farm.nodes[0].host_key, farm.register_args(farm.nodes[0])
        farm.node_run(farm.nodes[0], "cat /proc/sys/kernel/random/boot_id")
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

from netns_net import BENCH_RANGE, banner, build_network, connects, free_subnet, run, teardown

RATE, BURST, LATENCY = "100mbit", "64kb", "50ms"
CACHE_DIR = "/run/rhaas"
SSHD = "/usr/sbin/sshd"
FAKE_KEXEC = Path(__file__).with_name("netns_fake_kexec.py")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def unavailable() -> str | None:
    """Why a farm cannot be built here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "netns farm needs root (ip netns, mounts)"
    for tool in ("ip", "tc", "unshare", "nsenter", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"netns farm needs {tool} (iproute2/util-linux/openssh-client)"
    if not os.access(SSHD, os.X_OK):
        return f"netns farm needs {SSHD} (Debian openssh-server)"
    if busybox() is None:
        return "netns farm needs busybox (Debian busybox-static)"
    probe = f"rnfprobe{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "ip netns is not usable here"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True, timeout=10)
    return None


def busybox() -> str | None:
    return next((p for p in BUSYBOX_CANDIDATES if os.access(p, os.X_OK)), None)


@dataclass
class Node:
    name: str
    ns: str
    addr: str
    dir: str
    host_key: str = ""  # "ssh-ed25519 AAAA..."
    pid: int | None = None  # the sshd listener

    @property
    def ssh(self) -> str:
        return f"root@{self.addr}:22"

    def state(self, what: str) -> str:
        return (Path(self.dir) / "state" / what).read_text()


@dataclass
class NetnsFarm:
    """``nodes`` standby nodes behind a bridge, the origin on the host; see the module docstring."""

    workdir: Path
    authorized_keys: str
    nodes_wanted: int = 16
    origin_addr: str | None = None  # default: .1 of the chosen /24
    subnet: str | None = None  # a /24 (or larger) inside 198.18.0.0/15; default: a free 198.19.K.0/24
    rate: str = RATE
    down_time: float = 0.5
    without: dict = field(default_factory=dict)  # node name -> applets to leave out (e.g. ("wget",))
    name_prefix: str = "nf"
    prefix: str = field(default_factory=lambda: "rnf" + secrets.token_hex(3))
    nodes: list[Node] = field(default_factory=list)
    _procs: list = field(default_factory=list)
    _created: dict = field(default_factory=lambda: {"namespaces": [], "host_links": []})

    # -- life cycle ---------------------------------------------------------------------------
    def __post_init__(self):
        self.workdir = Path(self.workdir)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    @property
    def sw_ns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def host_link(self) -> str:
        return f"{self.prefix}o"

    def start(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        net = ipaddress.ip_network(self.subnet) if self.subnet else free_subnet()
        if not net.subnet_of(BENCH_RANGE):
            raise ValueError(f"{net} is not inside {BENCH_RANGE}")
        hosts = list(net.hosts())
        origin = ipaddress.ip_address(self.origin_addr) if self.origin_addr else hosts[0]
        if origin not in net:
            raise ValueError(f"origin {origin} is not in {net}")
        pool = [a for a in hosts[9:] if a != origin]
        if len(pool) < self.nodes_wanted:
            raise ValueError(f"{net} is too small for {self.nodes_wanted} nodes")
        self.net, self.origin_addr = net, str(origin)
        width = max(2, len(str(self.nodes_wanted)))
        self.nodes = [
            Node(f"{self.name_prefix}-{i + 1:0{width}d}", f"{self.prefix}-n{i + 1:0{width}d}", str(pool[i]),
                 str(self.workdir / f"n{i + 1:0{width}d}"))
            for i in range(self.nodes_wanted)
        ]
        (self.workdir / "authorized_keys").write_text(self.authorized_keys.strip() + "\n")
        # record before creating, so a crash at any line leaves what to undo
        self._created["namespaces"] = [self.sw_ns] + [n.ns for n in self.nodes]
        self._created["host_links"] = [self.host_link]
        self._save()
        self._build_network()
        self._write_nodes()
        for n in self.nodes:
            self._start_node(n)
        self._save()
        self.wait_ssh(self.nodes, deadline - time.monotonic())

    def _build_network(self) -> None:
        prefix = self.net.prefixlen
        build_network(self.sw_ns, self.host_link, f"{self.origin_addr}/{prefix}",
                      [(n.ns, n.ns.rsplit("-", 1)[1], f"{n.addr}/{prefix}") for n in self.nodes], self.tbf_args())
        bb = busybox()
        self.applets = ["busybox"] + [a for a in run([bb, "--list"]).split() if a not in ("kexec", "busybox")]

    def tbf_args(self) -> list[str]:
        return ["tbf", "rate", self.rate, "burst", BURST, "latency", LATENCY]

    def _write_nodes(self) -> None:
        bb = busybox()
        passwd = Path("/etc/passwd").read_text().splitlines()
        for n in self.nodes:
            d = Path(n.dir)
            for sub in ("bin", "state", "home"):
                (d / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
            key = d / "ssh_host_ed25519_key"
            if not key.exists():
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", n.name, "-f", str(key)])
            n.host_key = " ".join(Path(f"{key}.pub").read_text().split()[:2])
            (d / "passwd").write_text("\n".join(
                f"root:x:0:0:root:{d / 'home'}:/bin/sh" if line.startswith("root:") else line for line in passwd) + "\n")
            (d / "shadow").write_text("root:*:20000:0:99999:7:::\n")
            os.chmod(d / "shadow", 0o600)
            (d / "state" / "boot_id").write_text(_uuid() + "\n")
            (d / "state" / "cmdline").write_text("console=ttyS0 rhaas.standby\n")
            (d / "state" / "kexec_loaded").write_text("0\n")
            (d / "state" / "kexec.log").write_text("")
            (d / "state" / "loaded_cmdline").write_text("")
            skip = set(self.without.get(n.name, ()))
            for applet in self.applets:
                link = d / "bin" / applet
                if applet not in skip and not link.exists():
                    link.symlink_to(bb)
            (d / "kexec.json").write_text(json.dumps({"state": str(d / "state"), "cache": CACHE_DIR,
                                                      "down": self.down_time}))
            shutil.copy(FAKE_KEXEC, d / "bin" / "kexec")
            (d / "bin" / "kexec").chmod(0o755)
            (d / "sshd_config").write_text(SSHD_CONFIG.format(
                addr=n.addr, key=key, keys=self.workdir / "authorized_keys", path=d / "bin"))

    def _start_node(self, n: Node) -> None:
        d, q = Path(n.dir), shlex.quote
        script = "\n".join([
            "set -e",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 || true",
            "mount -t tmpfs -o mode=0755,size=1g rhaas-node /run",
            f"mkdir -p /run/sshd {q(CACHE_DIR)}",
            "mount -t tmpfs -o mode=0755,size=1m rhaas-node /sys/kernel",
            ": > /sys/kernel/kexec_loaded",
            f"mount --bind {q(str(d / 'state' / 'kexec_loaded'))} /sys/kernel/kexec_loaded",
            f"mount --bind {q(str(d / 'state' / 'boot_id'))} /proc/sys/kernel/random/boot_id",
            f"mount --bind {q(str(d / 'state' / 'cmdline'))} /proc/cmdline",
            f"mount --bind {q(str(d / 'passwd'))} /etc/passwd",
            f"mount --bind {q(str(d / 'shadow'))} /etc/shadow",
            f"exec {SSHD} -D -f {q(str(d / 'sshd_config'))} -E {q(str(d / 'sshd.log'))}",
        ])
        with open(d / "start.log", "wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", n.ns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append(proc)
        n.pid = proc.pid  # ip netns exec and unshare exec in place: this is the sshd listener
        (d / "state" / "sshd.pid").write_text(f"{proc.pid}\n")

    def wait_ssh(self, nodes: list[Node], timeout: float) -> None:
        """Until every node's sshd answers with its banner (one deadline for all)."""
        deadline = time.monotonic() + max(timeout, 1)
        todo = list(nodes)
        while todo:
            n = todo[0]
            proc = next((p for p in self._procs if p.pid == n.pid), None)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{n.name}: sshd exited {proc.returncode}: {_tail(Path(n.dir) / 'start.log')}"
                                   f" {_tail(Path(n.dir) / 'sshd.log')}")
            if banner(n.addr, 22, min(2.0, max(0.1, deadline - time.monotonic()))):
                todo.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(todo)} node(s) never answered SSH, first {n.name} at {n.addr}")
            time.sleep(0.05)

    def cleanup(self) -> None:
        """Kill every process in the farm's namespaces (by PID), delete namespaces and links. Idempotent."""
        teardown(self._created["namespaces"], self._created["host_links"])
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        self._created = {"namespaces": [], "host_links": []}
        self._save()

    def _save(self) -> None:
        if self.workdir.exists():
            doc = dict(self._created, prefix=self.prefix, origin=self.origin_addr,
                       nodes=[asdict(n) for n in self.nodes])
            tmp = self.workdir / "farm.json.tmp"
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(self.workdir / "farm.json")

    # -- what tests and benches use ------------------------------------------------------------
    def known_hosts(self) -> str:
        return "".join(f"{n.addr} {n.host_key}\n" for n in self.nodes)

    def register_args(self, n: Node) -> list[str]:
        """``rhaas`` arguments that register ``n`` with its host key pinned."""
        return ["node", "register", n.name, "--ssh", n.ssh, "--host-key", n.host_key]

    def nodeset(self) -> str:
        first, last = self.nodes[0].name, self.nodes[-1].name
        pre = first.rsplit("-", 1)[0]
        return f"{pre}-[{first.rsplit('-', 1)[1]}-{last.rsplit('-', 1)[1]}]"

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def node_run(self, n: Node, command: str, timeout: float = 30, check: bool = True) -> str:
        """Run ``command`` with the node's view (its mount and network namespace, its PATH), not over SSH."""
        env = {"PATH": f"{Path(n.dir) / 'bin'}", "HOME": str(Path(n.dir) / "home")}
        proc = subprocess.run(["nsenter", "-t", str(n.pid), "-m", "-n", "--", "/bin/sh", "-c", command],
                              check=False, capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{n.name}: {command!r}: exit {proc.returncode}: {proc.stderr.strip()[:300]}")
        return proc.stdout

    def node_popen(self, n: Node, argv: list[str]) -> subprocess.Popen:
        env = {"PATH": f"{Path(n.dir) / 'bin'}"}
        return subprocess.Popen(["nsenter", "-t", str(n.pid), "-m", "-n", "--", *argv], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def qdiscs(self) -> dict[str, str]:
        """``tc qdisc show`` of every farm link end, keyed ``ns/dev`` (``host/<link>`` for the origin)."""
        out = {f"host/{self.host_link}": run(["tc", "qdisc", "show", "dev", self.host_link])}
        for n in self.nodes:
            out[f"{n.ns}/eth0"] = run(["tc", "-n", n.ns, "qdisc", "show", "dev", "eth0"])
        for port in ["origin"] + [n.ns.rsplit("-", 1)[1] for n in self.nodes]:
            out[f"{self.sw_ns}/{port}"] = run(["tc", "-n", self.sw_ns, "qdisc", "show", "dev", port])
        return out

    def transfer_seconds(self, src: Node, dst: Node, nbytes: int, timeout: float = 60) -> float:
        """Seconds ``dst`` takes to fetch ``nbytes`` random bytes from ``src`` (busybox httpd and wget)."""
        self.node_run(src, f"mkdir -p /run/xfer && head -c {int(nbytes)} /dev/urandom > /run/xfer/blob")
        httpd = self.node_popen(src, [str(Path(src.dir) / "bin" / "httpd"), "-f", "-p", f"{src.addr}:8080",
                                      "-h", "/run/xfer"])
        try:
            deadline = time.monotonic() + 10
            while not connects(src.addr, 8080):
                if httpd.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"httpd on {src.name} did not start: {httpd.stderr.read()[:200]!r}")
                time.sleep(0.05)
            t0 = time.monotonic()
            self.node_run(dst, f"wget -q -O /dev/null http://{src.addr}:8080/blob", timeout=timeout)
            return time.monotonic() - t0
        finally:
            httpd.kill()
            httpd.wait(timeout=10)
            self.node_run(src, "rm -rf /run/xfer", check=False)


SSHD_CONFIG = """\
ListenAddress {addr}:22
HostKey {key}
PidFile none
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {keys}
StrictModes no
MaxStartups 1000:100:1000
MaxSessions 100
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PermitTunnel no
Subsystem sftp internal-sftp
SetEnv PATH={path}
LogLevel ERROR
"""

def _uuid() -> str:
    return Path("/proc/sys/kernel/random/uuid").read_text().strip()


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-300:].strip()
    except OSError:
        return ""


def cleanup_dir(workdir: Path) -> None:
    """Undo a farm from its ``farm.json`` (a run that died before its own cleanup)."""
    doc = json.loads((Path(workdir) / "farm.json").read_text())
    teardown(doc.get("namespaces", []), doc.get("host_links", []))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "cleanup":
        cleanup_dir(Path(sys.argv[2]))
    else:
        sys.exit("usage: python tests/netns_farm.py cleanup WORKDIR")
