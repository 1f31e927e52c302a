"""What can go wrong in an SSH session to a node, each as one line phrased for the operator."""

from __future__ import annotations

import socket

from rhaas.errors import RhaasError


class SSHError(RhaasError):
    """Any SSH failure, with a one-line reason."""


class Unreachable(SSHError):
    """Nothing usable answered: refused, timed out, reset, or no SSH banner.

    ``transient`` is set when something did answer but dropped the handshake (an
    overloaded sshd does that): worth one more try, unlike a refused or silent port.
    """

    def __init__(self, msg: str, transient: bool = False):
        super().__init__(msg)
        self.transient = transient


class HostKeyUnknown(SSHError):
    pass


class HostKeyChanged(SSHError):
    pass


class AuthFailed(SSHError):
    pass


class CommandTimeout(SSHError):
    pass



def why(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, EOFError):
        return "connection closed"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
