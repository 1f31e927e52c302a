"""The lab: N QEMU nodes that really kexec, each behind a real ipmi_sim BMC.

``up()`` builds or reuses the guest images, generates the lab's SSH client
key, starts the VMs (standby image, boot device ``pxe``) and their BMCs on
free loopback ports, waits for SSH and writes ``lab.json``. It also fixes one loopback port
per lab, ``blob_port``: every VM's ``10.0.2.100:80`` (slirp ``guestfwd``, see
:meth:`rhaas.lab.vm.VM.blob_forward`) reaches ``127.0.0.1:blob_port``, where a ``rhaas kexec``
of the lab's nodes serves the run's image (``blob-listen``/``blob-url``, set by the stack).  ``down()`` stops
exactly the processes recorded there (after checking each PID still belongs
to this lab), and ``status()`` reports what is running.

Layout of a lab directory::

    lab.json              description of every node (see Lab.up)
    id_ed25519[.pub]      SSH client key (0600) authorised on every node
    known_hosts           pinned host keys, "[127.0.0.1]:PORT ssh-ed25519 ..."
    ipmi-password         BMC password (0600), same for all nodes of the lab
    images/               initrds with the lab key baked in
    nodes/lab-01/         VM files (see rhaas.lab.vm) and bmc/ (see rhaas.lab.bmc)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import guest as guestmod
from .bmc import BMC, IPMI_USER, ipmi_connection, read_password_file, write_password_file
from .guestssh import ssh_banner, ssh_connect, ssh_run
from .vm import (
    GUEST_ORIGIN,
    RELAY_SCRIPT,
    VM,
    LabError,
    VMConfig,
    free_port,
    kill_pid,
    mac_for,
    pid_matches,
    require_tool,
)

LAB_JSON = "lab.json"
BLOB_URL = f"http://{GUEST_ORIGIN}:80"  # what the lab's rhaas tells its VMs (blob-url)
Log = Callable[[str], None]


def relay_command(port: int) -> str:
    """The command QEMU runs per guest connection to the origin (no blanks inside its parts)."""
    exe, script = sys.executable, str(RELAY_SCRIPT)
    if any(c.isspace() or c == "," for c in exe + script):
        raise LabError(f"the blob relay needs paths without blanks or commas: {exe} {script}")
    return f"{exe} -I {script} {int(port)}"


def check_host_tools() -> None:
    """Raise MissingToolError (naming the Debian package) if a host tool is missing."""
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("ipmi_sim", "openipmi"),
                      ("cpio", "cpio"), ("apt-get", "apt"), ("dpkg", "dpkg"),
                      ("modinfo", "kmod")):
        require_tool(tool, pkg)


def generate_client_key(path: Path) -> str:
    """ed25519 key pair at ``path`` (0600) and ``path.pub``; returns the public line."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:  # pragma: no cover - cryptography comes with paramiko
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rhaas-lab",
                        "-f", str(path)], check=True)
        return path.with_suffix(".pub").read_text().strip()
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH).decode()
    pub = f"{pub} rhaas-lab"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    os.chmod(path, 0o600)
    Path(f"{path}.pub").write_text(pub + "\n")
    return pub


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lab.json.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


@dataclasses.dataclass
class LabNode:
    """One node as described in lab.json, with helpers to reach it."""

    name: str
    ssh_host: str
    ssh_port: int
    host_key: str
    ssh_key: str
    mac: str
    console_log: str
    node_dir: str
    ipmi: dict
    pids: dict

    @property
    def ssh_target(self) -> str:
        return f"root@{self.ssh_host}:{self.ssh_port}"

    @property
    def vm(self) -> VM:
        return VM(self.node_dir)

    @property
    def bmc(self) -> BMC:
        return BMC(Path(self.node_dir) / "bmc", self.ipmi["port"])

    def ssh(self, timeout: float = 10.0):
        """Connected paramiko SSHClient with this node's host key pinned."""
        return ssh_connect(self.ssh_port, self.ssh_key, self.host_key, host=self.ssh_host,
                           timeout=timeout)

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
        client = self.ssh()
        try:
            return ssh_run(client, command, timeout=timeout)
        finally:
            client.close()

    def wait_ssh(self, timeout: float = 120.0, until: Callable[[str], bool] | None = None,
                 command: str = "cat /proc/sys/kernel/random/boot_id") -> str:
        return self.vm.wait_ready(self.ssh_key, self.host_key, timeout=timeout, until=until,
                                  command=command)

    def ipmi_password(self) -> str:
        return read_password_file(self.ipmi["password_file"])

    def ipmi_connection(self):
        """python-ipmi RMCP+ (cipher suite 3) connection to this node's BMC."""
        return ipmi_connection(self.ipmi["host"], self.ipmi["port"], self.ipmi["user"],
                               self.ipmi_password())

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["ssh"] = self.ssh_target
        return d

    @classmethod
    def from_json(cls, d: dict) -> LabNode:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


class Lab:
    """A lab directory with its lab.json."""

    def __init__(self, dir: str | os.PathLike):
        self.dir = Path(dir).resolve()
        path = self.dir / LAB_JSON
        try:
            self.info = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no {LAB_JSON} in {self.dir}") from None
        self.nodes = [LabNode.from_json(n) for n in self.info["nodes"]]

    def node(self, name: str) -> LabNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def ssh_key(self) -> Path:
        return Path(self.info["ssh_key"])

    # ------------------------------------------------------------------
    @classmethod
    def up(cls, n: int = 1, firmware_delay: float = 0.0, dir: str | os.PathLike | None = None,
           *, cache_dir: str | os.PathLike | None = None, memory_mb: int = 256,
           wait: bool = True, ssh_timeout: float | None = None,
           log: Log | None = None) -> Lab:
        """Start ``n`` nodes; returns the :class:`Lab` once all answer SSH."""
        log = log or (lambda msg: None)
        if n < 1:
            raise LabError("need at least one node")
        check_host_tools()
        d = Path(dir) if dir else Path(tempfile.mkdtemp(prefix="rhaas-lab-"))
        d = d.expanduser().resolve()
        d.mkdir(parents=True, exist_ok=True)
        if (d / LAB_JSON).exists():
            old = Lab(d)
            if old.info.get("state") == "up" and any(old._running_pids().values()):
                raise LabError(f"a lab is already up in {d}; run down first")

        t0 = time.monotonic()
        key = d / "id_ed25519"
        generate_client_key(key)
        images = guestmod.build_guest(cache_dir, f"{key}.pub", out_dir=d / "images", log=log)
        t_images = time.monotonic() - t0
        password_file = d / "ipmi-password"
        password = write_password_file(password_file)

        used: set[int] = set()
        blob_port = free_port(avoid=used)
        relay = relay_command(blob_port)
        nodes: list[LabNode] = []
        for i in range(1, n + 1):
            name = f"lab-{i:02d}"
            node_dir = d / "nodes" / name
            ssh_port = free_port(avoid=used)
            ipmi_port = free_port(socket.SOCK_DGRAM, avoid=used)
            serial_port = free_port(avoid=used)
            cfg = VMConfig(name=name, node_dir=str(node_dir), ssh_port=ssh_port,
                           mac=mac_for(name, str(d)), kernel=str(images.kernel),
                           initrds={k: str(v) for k, v in images.initrds.items()},
                           standby_image=guestmod.STANDBY, memory_mb=memory_mb,
                           firmware_delay_ms=round(firmware_delay * 1000),
                           cmdline=guestmod.KERNEL_CMDLINE, serial_port=serial_port,
                           blob_port=blob_port, blob_relay=relay)
            vm = VM.create(cfg, boot_device="pxe")
            BMC.create(name, node_dir / "bmc", ipmi_port, password, node_dir, serial_port=serial_port)
            nodes.append(LabNode(
                name=name, ssh_host="127.0.0.1", ssh_port=ssh_port,
                host_key=images.host_key_pub, ssh_key=str(key), mac=cfg.mac,
                console_log=str(vm.console_log), node_dir=str(vm.dir),
                ipmi={"host": "127.0.0.1", "port": ipmi_port, "user": IPMI_USER,
                      "password_file": str(password_file)},
                pids={}))

        info = {
            "version": 1,
            "state": "up",
            "dir": str(d),
            "created_at": time.time(),
            "firmware_delay": firmware_delay,
            "ssh_key": str(key),
            "ssh_pubkey": f"{key}.pub",
            "known_hosts": str(d / "known_hosts"),
            "ipmi_password_file": str(password_file),
            "images": images.to_json(),
            "blob_port": blob_port,
            "blob_listen": f"127.0.0.1:{blob_port}",
            "blob_url": BLOB_URL,
            "nodes": [nd.to_json() for nd in nodes],
        }
        (d / "known_hosts").write_text("".join(
            f"[{nd.ssh_host}]:{nd.ssh_port} {nd.host_key}\n" for nd in nodes))
        _write_json(d / LAB_JSON, info)

        try:
            for nd in nodes:
                nd.pids["qemu"] = nd.vm.start()
                nd.pids["ipmi_sim"] = nd.bmc.start()
                info["nodes"] = [x.to_json() for x in nodes]
                _write_json(d / LAB_JSON, info)  # record PIDs as soon as they exist
            t_started = time.monotonic()
            log(f"started {n} VM(s) and BMC(s); waiting for SSH")
            if wait:
                timeout = ssh_timeout or (90.0 + 2 * firmware_delay + 20.0 * n)
                with concurrent.futures.ThreadPoolExecutor(max_workers=min(n, 16)) as ex:
                    list(ex.map(lambda nd: nd.wait_ssh(timeout=timeout), nodes))
            info["timings"] = {"images_s": round(t_images, 2),
                               "start_s": round(t_started - t0 - t_images, 2),
                               "ssh_ready_s": round(time.monotonic() - t_started, 2)}
            _write_json(d / LAB_JSON, info)
        except BaseException:
            with contextlib.suppress(Exception):
                down(d)
            raise
        log(f"lab up in {d}")
        return cls(d)

    # ------------------------------------------------------------------
    def _running_pids(self) -> dict[str, int]:
        """Every recorded or pidfile PID of this lab that is still ours and alive."""
        found: dict[str, int] = {}
        for nd in self.nodes:
            vm_marker = str(Path(nd.node_dir) / "qemu.pid")
            bmc_marker = str(Path(nd.node_dir) / "bmc" / "lan.conf")
            cands = [("qemu", nd.pids.get("qemu"), vm_marker),
                     ("ipmi_sim", nd.pids.get("ipmi_sim"), bmc_marker),
                     ("qemu", nd.vm.pid(), vm_marker),
                     ("ipmi_sim", nd.bmc.pid(), bmc_marker)]
            for kind, pid, marker in cands:
                if pid and pid_matches(pid, marker):
                    found[f"{nd.name}/{kind}/{pid}"] = pid
        return found

    def down(self) -> list[int]:
        """Stop every process of this lab (BMCs first, then VMs); returns the PIDs."""
        stopped: list[int] = []
        for nd in self.nodes:
            bmc = nd.bmc
            bmc_marker = str(bmc.lan_conf)
            for pid in {bmc.pid(), nd.pids.get("ipmi_sim")}:
                if pid and kill_pid(pid, bmc_marker):
                    stopped.append(pid)
            bmc.stop()
        for nd in self.nodes:
            vm = nd.vm
            marker = str(vm.pidfile)
            pid = vm.pid()
            if vm.stop():
                stopped.append(pid)  # type: ignore[arg-type]
            old = nd.pids.get("qemu")
            if old and old != pid and kill_pid(old, marker):
                stopped.append(old)
            for stale in (vm.monitor, vm.pidfile, vm.dir / "running.json"):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        self.info["state"] = "down"
        self.info["down_at"] = time.time()
        _write_json(self.dir / LAB_JSON, self.info)
        return stopped

    def status(self) -> dict:
        nodes = []
        for nd in self.nodes:
            vm = nd.vm
            run = vm.running_info()
            nodes.append({
                "name": nd.name,
                "ssh": nd.ssh_target,
                "power": vm.is_running(),
                "qemu_pid": vm.pid(),
                "ipmi_sim_pid": nd.bmc.pid(),
                "ipmi_port": nd.ipmi["port"],
                "boot_device": vm.boot_device(),
                "started_image": run.get("image") if run else None,
                "reported_image": vm.last_reported_image(),
                "ssh_banner": ssh_banner(nd.ssh_port) if run else False,
            })
        return {"dir": str(self.dir), "state": self.info.get("state"), "nodes": nodes}


# module-level conveniences --------------------------------------------------

def up(n: int = 1, firmware_delay: float = 0.0, dir: str | os.PathLike | None = None,
       **kw) -> Lab:
    return Lab.up(n, firmware_delay, dir, **kw)


def down(dir: str | os.PathLike) -> list[int]:
    return Lab(dir).down()


def status(dir: str | os.PathLike) -> dict:
    return Lab(dir).status()
