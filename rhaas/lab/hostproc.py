"""Host-side basics of the lab: its errors, required host tools, and processes it started.

Processes are found and stopped only by the PID the lab recorded, and only while their
command line still carries the lab's marker (a path of theirs): never by name.  Also free
loopback ports, stable MACs and atomic small-file writes.

Like :mod:`rhaas.lab.vm`, this module only imports the standard library: the chassis-control
script loads both by file path, without the ``rhaas`` package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path


class LabError(RuntimeError):
    """Something in the lab failed."""


class MissingToolError(LabError):
    """A host program the lab needs is not installed."""


def require_tool(name: str, package: str) -> str:
    """Absolute path of ``name`` or a :class:`MissingToolError` naming the Debian package."""
    path = shutil.which(name)
    if not path:
        raise MissingToolError(
            f"{name} not found on PATH: install the Debian package {package} "
            f"(apt-get install -y --no-install-recommends {package})")
    return path


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return False
    state = data[data.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X", b"")


def proc_list(pid: int, name: str) -> list[str]:
    """A NUL-separated /proc/PID file (cmdline, environ) as strings; [] if unreadable."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def pid_cmdline(pid: int) -> list[str]:
    return proc_list(pid, "cmdline")


def pid_matches(pid: int | None, marker: str) -> bool:
    """True if ``pid`` is alive and its command line mentions ``marker``."""
    if not pid_alive(pid):
        return False
    return any(marker in arg for arg in pid_cmdline(pid))  # type: ignore[arg-type]


def term_then_kill(pid: int, timeout: float = 5.0) -> bool:
    """SIGTERM ``pid``, SIGKILL it if it still runs after ``timeout`` s, and wait up to 5 s
    more. True once it is gone. The caller has checked that ``pid`` is the process it means."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.02)
    return not pid_alive(pid)


def kill_pid(pid: int | None, marker: str, timeout: float = 5.0) -> bool:
    """SIGTERM then SIGKILL ``pid``, only if it still matches ``marker``.

    Returns True if a matching process was found (and is now gone).
    """
    if not pid_matches(pid, marker):
        return False
    assert pid is not None
    if not term_then_kill(pid, timeout):
        raise LabError(f"process {pid} did not die")
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` happens to be our child (no zombie left)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def free_port(kind: int = socket.SOCK_STREAM, avoid: set[int] | None = None) -> int:
    """A currently free loopback port (TCP by default, UDP with SOCK_DGRAM)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not avoid or port not in avoid:
            if avoid is not None:
                avoid.add(port)
            return port
    raise LabError("no free port found")


def mac_for(name: str, salt: str = "") -> str:
    """Stable locally administered MAC in QEMU's 52:54:00 range."""
    import hashlib

    h = hashlib.sha256(f"{salt}/{name}".encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"
