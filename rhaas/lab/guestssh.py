"""Reaching a lab guest over SSH: banner probe, paramiko client with the host key pinned, and
waiting until a command succeeds (e.g. the boot id changed after a kexec).

paramiko is imported only when a connection is made.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from .hostproc import LabError


def ssh_banner(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    """True if something on ``host:port`` sends an ``SSH-`` banner promptly.

    slirp accepts TCP before the guest is up, so a connect alone proves nothing.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def ssh_connect(port: int, key_file: str | os.PathLike, host_key: str,
                host: str = "127.0.0.1", user: str = "root", timeout: float = 10.0):
    """paramiko SSHClient with the host key pinned (RejectPolicy; no agent, no key search)."""
    import logging

    import paramiko

    # paramiko's transport thread logs a traceback for every connection a booting guest
    # drops; the callers report failures themselves
    plog = logging.getLogger("paramiko")
    if not plog.handlers:
        plog.addHandler(logging.NullHandler())
    client = paramiko.SSHClient()
    keytype, b64 = host_key.split()[:2]
    entry = paramiko.hostkeys.HostKeyEntry.from_line(
        f"{host if port == 22 else f'[{host}]:{port}'} {keytype} {b64}")
    if entry is None:
        raise LabError(f"cannot parse host key {host_key!r}")
    client.get_host_keys().add(entry.hostnames[0], keytype, entry.key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host, port=port, username=user, key_filename=str(key_file),
                   look_for_keys=False, allow_agent=False, timeout=timeout,
                   banner_timeout=timeout, auth_timeout=timeout)
    return client


def ssh_run(client, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``command``; return (exit status, stdout, stderr)."""
    _stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode(errors="replace")
    err = stderr.read().decode(errors="replace")
    return stdout.channel.recv_exit_status(), out, err


def wait_ssh_ready(port: int, timeout: float, *, key_file: str | os.PathLike, host_key: str,
                   host: str = "127.0.0.1", user: str = "root",
                   command: str = "cat /proc/sys/kernel/random/boot_id",
                   until: Callable[[str], bool] | None = None) -> str:
    """Wait for an ``SSH-`` banner, then for ``command`` to succeed over SSH.

    If ``until`` is given, keep polling until ``until(stdout)`` is true (e.g.
    the boot id changed after a kexec).  Returns the command's stdout.
    """
    deadline = time.monotonic() + timeout
    last_err: object = "no SSH banner"
    while time.monotonic() < deadline:
        if not ssh_banner(port, host):
            time.sleep(0.05)
            continue
        try:
            client = ssh_connect(port, key_file, host_key, host=host, user=user,
                                 timeout=max(1.0, min(10.0, deadline - time.monotonic())))
            try:
                rc, out, err = ssh_run(client, command, timeout=30)
            finally:
                client.close()
        except Exception as e:
            if type(e).__name__ == "BadHostKeyException":
                raise
            last_err = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
            continue
        if rc == 0 and (until is None or until(out)):
            return out
        last_err = f"command rc={rc} out={out.strip()[:200]!r} err={err.strip()[:200]!r}"
        time.sleep(0.2)
    raise TimeoutError(f"SSH on {host}:{port} not ready after {timeout:.0f}s ({last_err})")
