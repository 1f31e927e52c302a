"""The socket layer of the HIL client: HTTP connections whose every operation gets the time
left of one deadline for the whole call (see :mod:`rhaas.adapters.hil` for why it is written
here rather than taken from a library), and a one-word reason for a transport failure.
"""

from __future__ import annotations

import http.client
import io
import socket
import time

MAX_SOCKET_TIMEOUT = 1e6  # socket.settimeout refuses huge values; no call is meant to last longer
READ_CHUNK = 64 * 1024


class _CallTimedOut(TimeoutError):
    """The call's deadline passed (raised between socket operations)."""


class _DeadlineReader(io.RawIOBase):
    """The socket's incoming bytes; each read waits at most until the owner's deadline.

    It reads through the socket's own raw file (``makefile(buffering=0)``), which keeps the
    socket open while a response still reads from it, as http.client expects of ``makefile``.
    """

    def __init__(self, sock: socket.socket, owner: _Bounded):
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        self._sock.settimeout(self._owner.time_left())
        return self._raw.readinto(buf)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """The connection's socket as http.client sees it: sends and reads bounded by the deadline."""

    def __init__(self, sock: socket.socket, owner: _Bounded):
        self._sock = sock
        self._owner = owner

    def makefile(self, mode: str = "rb", *args, **kwargs):
        return io.BufferedReader(_DeadlineReader(self._sock, self._owner))

    def sendall(self, data, *flags):
        self._sock.settimeout(self._owner.time_left())  # a bound on the whole sendall since 3.5
        return self._sock.sendall(data, *flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Bounded:
    """Mixin for http.client connections: connect and every socket operation end by `deadline`."""

    deadline = 0.0  # time.monotonic() value; set before each call

    def time_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _CallTimedOut()
        return min(left, MAX_SOCKET_TIMEOUT)

    def connect(self) -> None:
        self.timeout = self.time_left()
        super().connect()  # type: ignore[misc]  # TCP connect, and the TLS handshake for https
        self.sock = _DeadlineSocket(self.sock, self)  # type: ignore[has-type]


class BoundedHTTP(_Bounded, http.client.HTTPConnection):
    pass


class BoundedHTTPS(_Bounded, http.client.HTTPSConnection):
    pass


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):  # socket.timeout is an alias of TimeoutError
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return "the answer was cut short"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "host name not found"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
