"""A node's serial console over IPMI Serial-over-LAN, read with Debian's ``ipmitool``.

This module owns one protocol: SOL to one BMC. It knows nothing of buffers, readers or the
inventory; :mod:`rhaas.core.console` decides who reads which node and for how long.

Why ``ipmitool -I lanplus ... sol activate`` as a subprocess, not pyghmi's console: ipmitool is
the maintained SOL client every operator already has (Debian package ``ipmitool``, next to
``openipmi`` whose ``ipmi_sim`` the lab and the tests use), it needs no new Python dependency,
and it was verified end to end against ``ipmi_sim``: it reads the live console (instance 1)
and the BMC's history buffer (instance 2, ``<End Of History>`` at its end). pyghmi would add a
dependency with its own process-wide I/O thread for a single feature. python-ipmi, which
rhaas uses for power, has no SOL.

How the session ends matters: the BMC allows one SOL session per instance, so a killed
ipmitool leaves the payload active ("SOL payload already active on another session") until
the BMC times it out. ipmitool deactivates SOL and closes its session cleanly when its
standard input ends, so :meth:`SolSession.close` closes the pipe first and waits; only if
ipmitool is still there after ``CLOSE_WAIT`` seconds is it terminated, and a ``sol deactivate``
is then sent so the next reader is not locked out.

The password goes to ipmitool through the environment (``-E`` reads ``IPMITOOL_PASSWORD``),
never on its command line. Nothing is ever written to the console: the pipe to ipmitool's
standard input only carries its end.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time

from rhaas.errors import RhaasError

CLOSE_WAIT = 5.0  # seconds ipmitool gets to deactivate SOL and log out after its stdin ends
HISTORY_WAIT = 5.0  # the whole read of the BMC's history buffer
OPEN_GRACE = 3.0  # a refused login ends ipmitool well within this; a silent BMC takes longer
BANNER = b"[SOL Session operational.  Use ~? for help]"
END_OF_HISTORY = b"<End Of History>"
TERMINATED = b"[terminated ipmitool]"
READ_CHUNK = 4096


class SolError(RhaasError):
    """SOL could not be started or failed; one line, no secrets."""


def _ipmitool() -> str:
    exe = shutil.which("ipmitool")
    if exe is None:
        raise SolError("ipmitool is not installed (apt-get install ipmitool); it reads consoles over SOL")
    return exe


class SolSession:
    """One ``ipmitool sol activate`` for one BMC: console bytes out, nothing in.

    ``instance=1`` is the live console; ``instance=2`` is ``ipmi_sim``'s history buffer (see
    :func:`read_history`). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, host: str, port: int, user: str, password: str, cipher_suite: int = 3,
                 instance: int = 1):
        self.where = f"{user}@{host}:{port}"
        self._base = [_ipmitool(), "-I", "lanplus", "-C", str(int(cipher_suite)), "-H", str(host),
                      "-p", str(int(port)), "-U", str(user), "-E"]
        self._env = {**os.environ, "IPMITOOL_PASSWORD": password or ""}
        argv = self._base + ["sol", "activate"] + ([f"instance={int(instance)}"] if instance != 1 else [])
        stdbuf = shutil.which("stdbuf")
        if stdbuf:  # ipmitool's banner waits in its stdio buffer otherwise (stdout is a pipe)
            argv = [stdbuf, "-o0"] + argv
        self.instance = instance
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=self._env, start_new_session=True)
        except OSError as exc:
            raise SolError(f"cannot start ipmitool for {self.where}: {exc.strerror}") from None
        self._head = b""  # the start of the output until the banner is past
        self._banner_seen = False
        self._pending = b""  # console bytes read while waiting for the session to open

    def __enter__(self) -> SolSession:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def wait_open(self, grace: float = OPEN_GRACE) -> None:
        """Return once the BMC has accepted the session (ipmitool's banner) or ipmitool is still
        trying after ``grace`` seconds (a BMC that does not answer ends the console later);
        raise :class:`SolError` with ipmitool's reason if it gave up (wrong password, payload
        busy)."""
        deadline = time.monotonic() + grace
        while not self._banner_seen:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            data = self._read_raw(min(left, 0.5))
            if data is None:
                why = self.failure()
                self.close()
                raise SolError(f"SOL to {self.where}: {why}")
            self._pending += self._strip(data)

    def read(self, timeout: float) -> bytes | None:
        """Console bytes that arrived within ``timeout`` seconds (maybe b""); None once it ended."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        data = self._read_raw(timeout)
        return data if data is None else self._strip(data)

    def _read_raw(self, timeout: float) -> bytes | None:
        out = self._proc.stdout
        if out is None or out.closed:
            return None
        ready, _, _ = select.select([out], [], [], max(0.0, timeout))
        if not ready:
            return b""
        data = os.read(out.fileno(), READ_CHUNK)
        return data or None

    def _strip(self, data: bytes) -> bytes:
        """Drop ipmitool's own banner lines from the console bytes."""
        if not self._banner_seen:
            self._head += data
            if BANNER not in self._head:
                if len(self._head) < 4 * len(BANNER):
                    return b""
                self._banner_seen = True  # no banner after all: pass everything on
                data, self._head = self._head, b""
                return data
            self._banner_seen = True
            data = self._head.split(BANNER, 1)[1].lstrip(b"\r\n")
            self._head = b""
        return data.replace(TERMINATED, b"")

    def failure(self) -> str:
        """ipmitool's complaint once it has ended (first meaningful line of its stderr)."""
        err = b""
        if self._proc.stderr is not None and not self._proc.stderr.closed:
            with contextlib.suppress(OSError, ValueError):
                if select.select([self._proc.stderr], [], [], 0)[0]:
                    err = os.read(self._proc.stderr.fileno(), 4096)
        for line in err.decode(errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith("tcgetattr"):
                return line[:200]
        return f"ipmitool exited with status {self._proc.poll()}"

    def close(self) -> None:
        """End the session cleanly (stdin EOF), else terminate ipmitool and deactivate SOL."""
        proc = self._proc
        if proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()
            try:
                proc.wait(CLOSE_WAIT)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(CLOSE_WAIT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                self._deactivate()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()

    def _deactivate(self) -> None:
        argv = self._base + ["sol", "deactivate"] + ([f"instance={self.instance}"] if self.instance != 1 else [])
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL,
                           env=self._env, timeout=CLOSE_WAIT)


def read_history(host: str, port: int, user: str, password: str, cipher_suite: int = 3,
                 limit: int = 64 * 1024, wait: float = HISTORY_WAIT) -> bytes:
    """The BMC's console history (``ipmi_sim``'s SOL instance 2), at most ``limit`` bytes.

    Best effort: a BMC without a history instance gives b"" (never an error), and the whole
    read ends after ``wait`` seconds.
    """
    buf = bytearray()
    try:
        sess = SolSession(host, port, user, password, cipher_suite, instance=2)
    except SolError:
        return b""
    with sess:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            data = sess.read(min(0.5, deadline - time.monotonic()))
            if data is None:
                break
            buf += data
            if END_OF_HISTORY in buf:
                buf = buf.split(END_OF_HISTORY, 1)[0]
                if buf.endswith(b"\r\n"):  # the BMC's own line break before its marker
                    del buf[-2:]
                break
            if len(buf) > 2 * limit:
                del buf[: len(buf) - limit]
    return bytes(buf[-limit:])
