"""One simulated node: its boot id, kernel command line, what ``kexec -l`` loaded, power.

A node answers the few virtual files rhaas reads (``/proc/cmdline``, the boot id,
``/sys/kernel/kexec_loaded``, ``/etc/rhaas-image``, read from the booted initrd), maps every
other path into its root directory, and plays ``kexec -e`` (gone for the farm's down time,
back with a new boot id and the loaded command line) and the power button.  Faults
(:meth:`rhaas.sim.farm.Farm.fault`) bend what kexec and a reboot do.
"""

from __future__ import annotations

import asyncio
import posixpath
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from rhaas.sim.shell import NodeGone
from rhaas.sim.syntax import ShellError

if TYPE_CHECKING:
    import asyncssh

    from rhaas.sim.farm import Farm

BOOT_ID = "/proc/sys/kernel/random/boot_id"
CMDLINE = "/proc/cmdline"
IMAGE_FILE = "/etc/rhaas-image"
KEXEC_LOADED = "/sys/kernel/kexec_loaded"


class SimNode:
    def __init__(self, farm: Farm, index: int, name: str, address: str, key: asyncssh.SSHKey):
        self.farm = farm
        self.index = index
        self.name = name
        self.address = address
        self.key = key
        self.root = farm.dir / "nodes" / name
        self.boot_id = str(uuid.uuid4())
        self.cmdline = f"BOOT_IMAGE=/vmlinuz console=ttyS0 rhaas_sim={name}"
        self.image = "standby"
        self.boot_initrd: str | None = None  # the initrd of the running "kernel", to read /etc/rhaas-image
        self.loaded: dict | None = None
        self.boots = 0
        self.up = False
        self.powered = True
        self.acceptor = None
        self.conns: set = set()
        self.frozen: list = []  # connections of a node that vanished (never_returns)
        self.stuck = False  # down for good until its never_returns fault is lifted
        self.dying = False  # between kexec -e and going down, with the dies_slowly fault
        self.cuts = 0  # sessions cut while dying (picks the next way to cut one)
        self.load_failures = 0  # kexec -l refused by load_fails_first so far
        self.options: asyncssh.SSHServerConnectionOptions | None = None
        self.listen_options: asyncssh.SSHServerConnectionOptions | None = None  # built from options once

    @property
    def ssh(self) -> str:
        return f"root@{self.address}:{self.farm.port}"

    @property
    def host_key_line(self) -> str:
        typ, blob = self.key.export_public_key("openssh").decode().split()[:2]
        return f"{typ} {blob}"

    # -- files -----------------------------------------------------------------------------------
    def virtual(self, path: str) -> bytes | None:
        p = posixpath.normpath("/" + path.lstrip("/"))
        if p == BOOT_ID:
            return (self.boot_id + "\n").encode()
        if p == CMDLINE:
            return (self.cmdline + "\n").encode()
        if p == KEXEC_LOADED:
            return b"1\n" if self.loaded else b"0\n"
        if p == IMAGE_FILE:
            return (self.image_id() + "\n").encode()
        if p == "/etc/hostname":
            return (self.name + "\n").encode()
        return None

    def image_id(self) -> str:
        if self.boot_initrd:
            try:
                from rhaas.core.overlay import overlay_files

                with open(self.boot_initrd, "rb") as fh:
                    files = overlay_files(fh.read())
                self.image = files.get(IMAGE_FILE, b"unknown\n").decode().strip() or "unknown"
            except (OSError, ValueError):
                self.image = "unknown"
            self.boot_initrd = None
        return self.image

    def real_path(self, path: str, for_write: bool = False) -> Path:
        """``path`` inside this node's root; nothing may resolve outside it."""
        p = posixpath.normpath("/" + path.lstrip("/"))
        if p.startswith(("/proc/", "/sys/", "/dev/")) or p in ("/proc", "/sys", "/dev"):
            raise ShellError(f"{path}: Permission denied")
        # normpath has removed every "..", and no symlink can exist under the root (neither
        # the shell nor the SFTP server (_NodeSFTP) makes one), so the path stays inside it
        return self.root / p.lstrip("/")

    # -- kexec -----------------------------------------------------------------------------------
    async def kexec(self, args: list[str], fds) -> int:
        action, kernel, initrd, cmdline = None, None, None, None
        i = 0
        while i < len(args):
            a = args[i]
            if a in ("-l", "--load", "-s", "--kexec-file-syscall"):
                action = "load" if a in ("-l", "--load") else action
            elif a in ("-e", "--exec"):
                action = "exec"
            elif a in ("-u", "--unload"):
                action = "unload"
            elif a in ("-i", "--no-checks", "-f", "--force"):
                pass
            elif a.startswith(("--initrd=", "--ramdisk=")):
                initrd = a.split("=", 1)[1]
            elif a in ("--initrd", "--ramdisk") and i + 1 < len(args):
                initrd = args[i + 1]
                i += 1
            elif a.startswith(("--command-line=", "--append=")):
                cmdline = a.split("=", 1)[1]
            elif a in ("--command-line", "--append") and i + 1 < len(args):
                cmdline = args[i + 1]
                i += 1
            elif a.startswith("-"):
                fds[2].write(f"kexec: unrecognized option '{a}'\n".encode())
                return 1
            elif kernel is None:
                kernel = a
            else:
                fds[2].write(b"kexec: too many arguments\n")
                return 1
            i += 1
        if action == "unload":
            self.loaded = None
            self.farm.save_state(self)
            return 0
        if action == "exec":
            if not self.loaded:
                fds[2].write(b"Nothing has been loaded!\n")
                return 1
            self.farm.spawn(self.reboot())
            raise NodeGone()
        if action != "load" or kernel is None:
            fds[2].write(b"kexec: usage: kexec -l KERNEL [--initrd=FILE] [--command-line=ARGS] | -e | -u\n")
            return 1
        for what, path in (("kernel", kernel), ("initrd", initrd)):
            if path is None:
                continue
            try:
                ok = self.real_path(path).is_file()
            except ShellError:
                ok = False
            if not ok:
                fds[2].write(f"kexec: cannot open {what} {path}: No such file or directory\n".encode())
                return 1
        if self.farm.fault(self.name, "load_fails") or self.load_failures < int(
                self.farm.fault(self.name, "load_fails_first") or 0):
            self.load_failures += 1
            fds[2].write(b"kexec_load failed: Device or resource busy\n")
            return 1
        self.loaded = {"kernel": kernel, "initrd": initrd, "cmdline": cmdline or ""}
        self.farm.save_state(self)
        return 0

    def _drop_connections(self, freeze: bool) -> None:
        for conn in list(self.conns):
            if freeze:
                # a vanished host: no FIN, no answer; the client must rely on its timeouts
                transport = getattr(conn, "_transport", None)
                if transport is not None:
                    transport.pause_reading()
                self.frozen.append(conn)
            else:
                conn.abort()
        self.conns.clear()

    async def go_down(self, freeze: bool = False) -> None:
        self.up = False
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
        self._drop_connections(freeze)

    async def reboot(self) -> None:
        """``kexec -e``: the node vanishes, stays away for the down time, then the new kernel runs."""
        loaded = self.loaded
        dying = float(self.farm.fault(self.name, "dies_slowly") or 0)
        if dying > 0:  # the old kernel goes away slowly, cutting the sessions it still accepts
            self.dying = True
            await asyncio.sleep(dying)
            self.dying = False
        from rhaas.sim.pull import kill_helpers

        kill_helpers(self)  # a new kernel: no process of the old one survives
        await self.go_down(freeze=bool(self.farm.fault(self.name, "never_returns")))
        if self.farm.fault(self.name, "never_returns"):
            self.stuck = True
            self.farm.save_state(self)
            return
        await asyncio.sleep(self.farm.down_time + float(self.farm.fault(self.name, "slow") or 0))
        if not self.farm.fault(self.name, "old_boot_id"):
            self.boot_id = str(uuid.uuid4())
            self.cmdline = loaded["cmdline"]
            self.boot_initrd = str(self.real_path(loaded["initrd"])) if loaded.get("initrd") else None
            self.image = "unknown"
            self.boots += 1
        self.loaded = None
        await self.come_up()

    async def power_off(self) -> None:
        from rhaas.sim.pull import kill_helpers

        kill_helpers(self)
        self.powered = False
        self.loaded = None
        await self.go_down()
        self.farm.save_state(self)

    async def power_on(self) -> None:
        self.powered = True
        await asyncio.sleep(min(0.2, self.farm.down_time))
        self.boot_id = str(uuid.uuid4())
        self.cmdline = f"BOOT_IMAGE=pxe console=ttyS0 rhaas_sim={self.name}"
        self.image = "pxe"
        self.boot_initrd = None
        self.boots += 1
        await self.come_up()

    async def come_up(self) -> None:
        await self.farm.listen(self)
        self.up = True
        self.farm.save_state(self)

    def cut_way(self) -> int:
        """dies_slowly: how to cut the next session (0 no exit status, 1 half an answer,
        2 a reset, 3 the login cut short)."""
        self.cuts += 1
        return self.cuts % 4

    def cut(self, process) -> None:
        """dies_slowly: a session of a dying kernel, cut before it can answer."""
        way = self.cut_way()
        if way == 1:
            process.stdout.write(self.boot_id[:9].encode())
        if way in (2, 3):
            process.get_extra_info("connection").abort()
            return
        process.close()  # the channel closes without an exit status

    def state(self) -> dict:
        return {
            "name": self.name,
            "ssh": self.ssh,
            "up": self.up,
            "powered": self.powered,
            "boot_id": self.boot_id,
            "cmdline": self.cmdline,
            "loaded": self.loaded,
            "boots": self.boots,
        }

