"""QEMU nodes for the lab: start, stop, reset, and wait for SSH.

Each VM lives in its own *node directory* holding:

``vm.json``       static configuration (:class:`VMConfig`)
``bootdev``       boot device last set (``pxe``, ``default``, ``none``, ...)
``disk-image``    optional: image id that "disk" boots (see :meth:`VM.disk_image`)
``running.json``  what the current QEMU process was started with
``qemu.pid``      QEMU's own pidfile; ``monitor.sock`` its HMP monitor
``console.log``   serial console (appended across restarts)
``qemu.log``      QEMU's stderr; ``lock`` serialises power operations
``cache-disk.raw`` image cache disk: sparse, virtio-blk serial ``rhaas-cache``; the guest's rc.sh
                  formats it once and mounts it at /run/rhaas, so images survive kexec (``cache_disk_mb``)

Boot device -> image: ``pxe`` boots the standby image; anything else is a
"disk" boot and boots :meth:`VM.disk_image`: the id in ``disk-image`` if that
file exists (written by :meth:`VM.set_disk_image`), otherwise the image the
node last reported running (last ``RHAAS-READY image=...`` line on its
console, i.e. whatever was last kexec'd counts as installed), otherwise the
standby image.

Networking is QEMU's user mode with ``restrict=on`` (no way out), plus two explicit forwards
that restrict does not affect: the host's loopback ``ssh_port`` to the guest's sshd, and, with
a ``blob_port``, the guest's ``10.0.2.100:80`` to the host's ``127.0.0.1:blob_port``, where a
``rhaas kexec`` run serves its image (:meth:`VM.blob_forward`).

QEMU boots the kernel directly (``-kernel/-initrd``); firmware time is
modelled with SeaBIOS' boot menu wait (``-boot menu=on,splash-time=MS``), so
power-on and reset pay it while kexec does not.

This module must stay importable on its own (the chassis-control script loads
it by path, without the ``rhaas`` package), so it only imports the standard
library and :mod:`rhaas.lab.hostproc` (loaded by path there too) at module level.
SSH to the guest is :mod:`rhaas.lab.guestssh`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

try:
    from .hostproc import (
        LabError,
        MissingToolError,
        atomic_write_text,
        free_port,
        kill_pid,
        mac_for,
        pid_alive,
        pid_cmdline,
        pid_matches,
        proc_list,
        read_pidfile,
        require_tool,
    )
except ImportError:  # loaded by file path (chassis.py), which has loaded hostproc.py the same way
    from _rhaas_lab_hostproc import (  # type: ignore[no-redef]
        LabError,
        MissingToolError,
        atomic_write_text,
        free_port,
        kill_pid,
        mac_for,
        pid_alive,
        pid_cmdline,
        pid_matches,
        proc_list,
        read_pidfile,
        require_tool,
    )

__all__ = [
    "DEFAULT_CMDLINE", "QEMU_BINARY", "VM", "LabError", "MissingToolError", "VMConfig", "free_port", "kill_pid",
    "mac_for", "pid_alive", "pid_cmdline", "pid_matches", "proc_list", "read_pidfile", "require_tool",
]

QEMU_BINARY = "qemu-system-x86_64"
DEFAULT_CMDLINE = "console=ttyS0 quiet panic=5"
#: where a lab VM reaches the host's run origin (slirp guestfwd; blob-url http://10.0.2.100:80)
GUEST_ORIGIN = "10.0.2.100"
RELAY_SCRIPT = Path(__file__).resolve().parent / "scripts" / "blobrelay.py"
READY_RE = re.compile(rb"RHAAS-READY image=(\S+)")


# ---------------------------------------------------------------------------
# the VM
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class VMConfig:
    name: str
    node_dir: str
    ssh_port: int
    mac: str
    kernel: str
    initrds: dict[str, str]
    standby_image: str = "standby"
    memory_mb: int = 256
    firmware_delay_ms: int = 0
    cache_disk_mb: int = 256
    cmdline: str = DEFAULT_CMDLINE
    qemu: str = QEMU_BINARY
    serial_port: int = 0  # >0: the serial port is a loopback TCP server its BMC's SOL connects to
    blob_port: int = 0  # >0: the guest's GUEST_ORIGIN:80 reaches 127.0.0.1:blob_port (a run's image origin)
    blob_relay: str = ""  # the per-connection command for that forward (see blob_forward)

    @classmethod
    def load(cls, path: Path) -> VMConfig:
        data = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


class VM:
    """One QEMU node, controlled through the files in its node directory."""

    def __init__(self, node_dir: str | os.PathLike):
        self.dir = Path(node_dir).resolve()
        self.config = VMConfig.load(self.dir / "vm.json")

    # -- creation ---------------------------------------------------------
    @classmethod
    def create(cls, config: VMConfig, boot_device: str = "pxe") -> VM:
        d = Path(config.node_dir).resolve()
        if any(c in str(d) for c in " \t\n'\""):
            raise LabError(f"node directory must not contain blanks or quotes: {d}")
        d.mkdir(parents=True, exist_ok=True)
        config.node_dir = str(d)
        atomic_write_text(d / "vm.json", json.dumps(dataclasses.asdict(config), indent=2))
        atomic_write_text(d / "bootdev", boot_device + "\n")
        return cls(d)

    # -- paths ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def marker(self) -> str:
        """String that only our QEMU's command line contains (its pidfile path)."""
        return str(self.pidfile)

    @property
    def monitor(self) -> Path:
        return self.dir / "monitor.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def ssh_port(self) -> int:
        return self.config.ssh_port

    @property
    def cache_disk(self) -> Path:
        return self.dir / "cache-disk.raw"

    def _ensure_cache_disk(self) -> Path | None:
        """The node's cache disk file, made sparse on first use (None if the node has none)."""
        size = int(self.config.cache_disk_mb) * 1024 * 1024
        if size <= 0:
            return None
        if "," in str(self.cache_disk):
            raise LabError(f"{self.name}: node directory must not contain a comma: {self.dir}")
        if not self.cache_disk.exists():
            tmp = self.dir / f".cache-disk.{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.truncate(size)
            os.replace(tmp, self.cache_disk)
        return self.cache_disk

    @contextlib.contextmanager
    def _lock(self):
        with open(self.dir / "lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -- boot device / image selection -------------------------------------
    def boot_device(self) -> str:
        try:
            return (self.dir / "bootdev").read_text().strip() or "pxe"
        except OSError:
            return "pxe"

    def set_boot_device(self, device: str) -> None:
        atomic_write_text(self.dir / "bootdev", device.strip() + "\n")

    def set_disk_image(self, image_id: str | None) -> None:
        """Pin what a disk boot starts (``None`` returns to the console-log rule)."""
        p = self.dir / "disk-image"
        if image_id is None:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            return
        if image_id not in self.config.initrds:
            raise LabError(f"unknown image {image_id!r}; have {sorted(self.config.initrds)}")
        atomic_write_text(p, image_id + "\n")

    def last_reported_image(self) -> str | None:
        """Image id of the last ``RHAAS-READY`` line on the console."""
        try:
            with open(self.console_log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 512 * 1024))
                data = fh.read()
        except OSError:
            return None
        found = READY_RE.findall(data)
        return found[-1].decode() if found else None

    def disk_image(self) -> str:
        with contextlib.suppress(OSError):
            pinned = (self.dir / "disk-image").read_text().strip()
            if pinned in self.config.initrds:
                return pinned
        last = self.last_reported_image()
        if last in self.config.initrds:
            return last  # type: ignore[return-value]
        return self.config.standby_image

    def image_for_boot(self) -> str:
        return self.config.standby_image if self.boot_device() == "pxe" else self.disk_image()

    # -- state ------------------------------------------------------------
    def pid(self) -> int | None:
        """PID of our QEMU if it is running (verified against /proc)."""
        pid = read_pidfile(self.pidfile)
        return pid if pid_matches(pid, self.marker) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def running_info(self) -> dict | None:
        """What the current QEMU was started with (image, nonce, ...) or None."""
        if not self.is_running():
            return None
        try:
            return json.loads((self.dir / "running.json").read_text())
        except (OSError, ValueError):
            return None

    # -- power ------------------------------------------------------------
    def qemu_argv(self, image_id: str, nonce: str) -> list[str]:
        c = self.config
        d = self.dir
        argv = [
            c.qemu, "-name", f"{c.name},process=rhaas-lab-{c.name}",
            "-accel", "tcg,tb-size=256", "-cpu", "max", "-machine", "q35",
            "-m", str(c.memory_mb), "-smp", "1",
            "-display", "none", "-nodefaults", "-no-user-config",
            # the serial port: console.log always; with a serial_port also a TCP server on
            # loopback that the node's ipmi_sim connects to for Serial-over-LAN
            "-chardev", (f"socket,id=ser0,host=127.0.0.1,port={int(c.serial_port)},server=on,wait=off,"
                         f"logfile={d / 'console.log'},logappend=on") if c.serial_port
            else f"file,id=ser0,path={d / 'console.log'},append=on",
            "-serial", "chardev:ser0",
            "-monitor", f"unix:{self.monitor},server=on,wait=off",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{c.ssh_port}-:22{self.blob_forward()}",
            "-device", f"virtio-net-pci,netdev=n0,mac={c.mac}",
            "-device", "virtio-rng-pci",
            "-kernel", c.kernel,
            "-initrd", c.initrds[image_id],
            "-append", f"{c.cmdline} rhaas.nonce={nonce}",
            "-pidfile", str(self.pidfile),
            "-daemonize",
        ]
        if int(c.cache_disk_mb) > 0:
            argv[argv.index("-kernel"):argv.index("-kernel")] = [
                "-drive", f"file={self.cache_disk},if=none,id=cache0,format=raw,discard=unmap",
                "-device", "virtio-blk-pci,drive=cache0,serial=rhaas-cache"]
        if c.firmware_delay_ms > 0:
            argv[argv.index("-kernel"):argv.index("-kernel")] = [
                "-boot", f"menu=on,splash-time={int(c.firmware_delay_ms)}"]
        return argv

    def blob_forward(self) -> str:
        """``,guestfwd=...`` so the guest's GUEST_ORIGIN:80 reaches loopback ``blob_port``, or "".

        restrict=on keeps the guest from the host and the world, except for explicit forwarding
        rules like this one. ``cmd:`` runs :data:`RELAY_SCRIPT` once per guest connection.
        """
        c = self.config
        if int(c.blob_port) <= 0 or not c.blob_relay:
            return ""
        if any(ch in c.blob_relay for ch in ",\n'\"\\$`;|&<>"):
            raise LabError(f"{c.name}: blob relay command must not contain commas or shell characters: "
                           f"{c.blob_relay!r}")
        return f",guestfwd=tcp:{GUEST_ORIGIN}:80-cmd:{c.blob_relay}"

    def start(self, image_id: str | None = None) -> int:
        """Power on: boot ``image_id`` (default: what the boot device selects)."""
        with self._lock():
            return self._start(image_id)

    def _start(self, image_id: str | None) -> int:
        pid = self.pid()
        if pid:
            return pid
        image_id = image_id or self.image_for_boot()
        if image_id not in self.config.initrds:
            raise LabError(f"{self.name}: unknown image {image_id!r}")
        require_tool(self.config.qemu, "qemu-system-x86")
        if len(str(self.monitor).encode()) > 100:
            raise LabError(f"{self.name}: node directory path too long for a unix socket "
                           f"({self.monitor}); use a shorter lab directory")
        for stale in (self.pidfile, self.monitor):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self._ensure_cache_disk()
        nonce = secrets.token_hex(6)
        argv = self.qemu_argv(image_id, nonce)
        with open(self.dir / "qemu.log", "ab") as log:
            log.write(f"--- {time.strftime('%F %T')} start image={image_id}\n".encode())
            log.flush()
            proc = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  cwd=self.dir, timeout=60)
        if proc.returncode != 0:
            raise LabError(f"{self.name}: qemu failed to start (rc={proc.returncode}): "
                           + self._tail(self.dir / "qemu.log"))
        pid = read_pidfile(self.pidfile)
        if not pid_matches(pid, self.marker):
            raise LabError(f"{self.name}: qemu started but pidfile {self.pidfile} is not usable")
        assert pid is not None
        info = {"pid": pid, "image": image_id, "initrd": self.config.initrds[image_id],
                "nonce": nonce, "boot_device": self.boot_device(),
                "started_at": time.time(), "resets": 0}
        atomic_write_text(self.dir / "running.json", json.dumps(info, indent=2))
        return pid

    def stop(self, timeout: float = 5.0) -> bool:
        """Power off (SIGTERM, then SIGKILL). Returns True if it was running."""
        with self._lock():
            return self._stop(timeout)

    def _stop(self, timeout: float) -> bool:
        pid = read_pidfile(self.pidfile)
        was = kill_pid(pid, self.marker, timeout=timeout)
        for stale in (self.pidfile, self.monitor):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        return was

    def reset(self) -> bool:
        """Hard reset honouring the boot device.

        If the boot device selects the image QEMU was started with, this is
        an HMP ``system_reset``; otherwise the VM is stopped and started with
        the new image.  Returns False (and does nothing) if powered off.
        """
        with self._lock():
            info = self.running_info()
            if info is None:
                return False
            target = self.image_for_boot()
            if target == info.get("image"):
                self.hmp("system_reset")
                info["resets"] = int(info.get("resets", 0)) + 1
                info["reset_at"] = time.time()
                atomic_write_text(self.dir / "running.json", json.dumps(info, indent=2))
            else:
                self._stop(timeout=2.0)
                self._start(target)
            return True

    def power_cycle(self, off_seconds: float = 0.0) -> int:
        with self._lock():
            self._stop(timeout=2.0)
            if off_seconds:
                time.sleep(off_seconds)
            return self._start(None)

    # -- monitor ----------------------------------------------------------
    def hmp(self, command: str, timeout: float = 5.0) -> str:
        """Run one human-monitor command and return its (raw) output."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.monitor))
            buf = b""
            while not buf.endswith(b"(qemu) "):
                chunk = s.recv(4096)
                if not chunk:
                    raise LabError(f"{self.name}: monitor closed")
                buf += chunk
            s.sendall(command.encode() + b"\n")
            out = b""
            while not out.endswith(b"(qemu) "):
                try:
                    chunk = s.recv(4096)
                except TimeoutError:
                    break
                if not chunk:
                    break
                out += chunk
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace"))
        return text.rsplit("(qemu)", 1)[0].strip()

    # -- diagnostics ------------------------------------------------------
    @staticmethod
    def _tail(path: Path, n: int = 2000) -> str:
        try:
            return path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def console_tail(self, n: int = 2000) -> str:
        return self._tail(self.console_log, n)

    def wait_ready(self, key_file: str | os.PathLike, host_key: str, timeout: float = 120.0,
                   until: Callable[[str], bool] | None = None,
                   command: str = "cat /proc/sys/kernel/random/boot_id") -> str:
        """:func:`rhaas.lab.guestssh.wait_ssh_ready` for this VM; the console tail is added on timeout."""
        from rhaas.lab.guestssh import wait_ssh_ready  # not at import: chassis.py loads this file alone

        try:
            return wait_ssh_ready(self.ssh_port, timeout, key_file=key_file, host_key=host_key,
                                  until=until, command=command)
        except TimeoutError as e:
            raise TimeoutError(f"{self.name}: {e}\n--- console tail ---\n"
                               f"{self.console_tail()}") from None
