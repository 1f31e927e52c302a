"""A real IPMI BMC per lab VM: Debian's ``ipmi_sim`` (package openipmi).

Each BMC has its own directory with ``lan.conf`` (0600: it holds the
password), ``bmc.emu``, a ``state/`` directory, ``ipmi_sim.pid`` and
``ipmi_sim.log``.  ipmi_sim listens on one loopback UDP port and drives the
VM through ``chassis_control`` -> :mod:`rhaas.lab.chassis`.  The password is
only ever in the 0600 files, never on a command line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from .vm import LabError, kill_pid, pid_matches, read_pidfile, require_tool

CHASSIS_SCRIPT = Path(__file__).resolve().parent / "chassis.py"
IPMI_USER = "admin"

EMU = """\
mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""


def new_password() -> str:
    """16 hex characters: fits IPMI 1.5's 16-byte limit, no quoting issues."""
    return secrets.token_hex(8)


def write_password_file(path: Path, password: str | None = None) -> str:
    password = password or new_password()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    os.chmod(path, 0o600)
    return password


def read_password_file(path: str | os.PathLike) -> str:
    return Path(path).read_text().strip()


def rmcp_ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """ASF presence ping; True if the BMC answers with a pong."""
    ping = bytes([0x06, 0x00, 0xFF, 0x06, 0x00, 0x00, 0x11, 0xBE, 0x80, 0x42, 0x00, 0x00])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(ping, (host, port))
            data, _ = s.recvfrom(512)
        except OSError:
            return False
    return len(data) >= 9 and data[0] == 0x06 and data[3] == 0x06 and data[8] == 0x40


class BMC:
    """ipmi_sim for one node; files under ``bmc_dir``."""

    def __init__(self, bmc_dir: str | os.PathLike, port: int):
        self.dir = Path(bmc_dir).resolve()
        self.port = port

    @property
    def pidfile(self) -> Path:
        return self.dir / "ipmi_sim.pid"

    @property
    def lan_conf(self) -> Path:
        return self.dir / "lan.conf"

    @classmethod
    def create(cls, name: str, bmc_dir: str | os.PathLike, port: int, password: str,
               node_dir: str | os.PathLike, python: str | None = None,
               script: str | os.PathLike | None = None) -> BMC:
        """Write the BMC's files.  ``script`` replaces the VM chassis script (e.g.
        :mod:`rhaas.lab.simchassis` for a state-only BMC); it is run as
        ``python SCRIPT NODE_DIR get|set ...``."""
        d = Path(bmc_dir).resolve()
        d.mkdir(parents=True, exist_ok=True)
        (d / "state").mkdir(exist_ok=True)
        python = python or sys.executable
        node_dir = str(Path(node_dir).resolve())
        script = str(Path(script).resolve()) if script else str(CHASSIS_SCRIPT)
        for part in (python, script, node_dir):
            if any(c in part for c in " \t\n'\""):
                raise LabError(f"path unusable in ipmi_sim's chassis_control: {part!r}")
        if not password.isalnum() or len(password) > 16:
            raise LabError("IPMI password must be 1-16 alphanumeric characters")
        guid = secrets.token_hex(16)
        auths = "none md2 md5 straight"
        conf = f"""\
name "{name}"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {int(port)}
    priv_limit admin
    allowed_auths_callback {auths}
    allowed_auths_user {auths}
    allowed_auths_operator {auths}
    allowed_auths_admin {auths}
    guid {guid}
  endlan
  chassis_control "{python} {script} {node_dir}"
  user 2 true "{IPMI_USER}" "{password}" admin 10 {auths}
"""
        fd = os.open(d / "lan.conf", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(conf)
        (d / "bmc.emu").write_text(EMU)
        return cls(d, port)

    def pid(self) -> int | None:
        pid = read_pidfile(self.pidfile)
        return pid if pid_matches(pid, str(self.lan_conf)) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self, timeout: float = 10.0) -> int:
        pid = self.pid()
        if pid:
            return pid
        exe = require_tool("ipmi_sim", "openipmi")
        argv = [exe, "-c", str(self.lan_conf), "-f", str(self.dir / "bmc.emu"),
                "-s", str(self.dir / "state"), "-n"]
        with open(self.dir / "ipmi_sim.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=self.dir, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True)
        self.pidfile.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"ipmi_sim exited with {proc.returncode}: "
                               + (self.dir / "ipmi_sim.log").read_text()[-2000:])
            if rmcp_ping(self.port, timeout=0.2):
                return proc.pid
            time.sleep(0.05)
        kill_pid(proc.pid, str(self.lan_conf))
        raise LabError(f"ipmi_sim on UDP 127.0.0.1:{self.port} did not answer RMCP ping")

    def stop(self, timeout: float = 5.0) -> bool:
        was = kill_pid(read_pidfile(self.pidfile), str(self.lan_conf), timeout=timeout)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        return was


def ipmi_connection(host: str, port: int, user: str, password: str, cipher_suite: int = 3):
    """A python-ipmi RMCP+ connection (not yet opened; use ``with conn:``)."""
    import pyipmi
    import pyipmi.interfaces

    intf = pyipmi.interfaces.create_interface(
        "rmcpplus", slave_address=0x81, host_target_address=0x20,
        keep_alive_interval=0, cipher_suite=cipher_suite)
    conn = pyipmi.create_connection(intf)
    conn.session.set_session_type_rmcp(host, port=port)
    conn.session.set_auth_type_user(user, password)
    conn.target = pyipmi.Target(ipmb_address=0x20)
    return conn
