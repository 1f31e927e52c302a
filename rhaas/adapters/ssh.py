"""SSH sessions to nodes: connect, authenticate, run a command, SFTP; strict host keys, bounded waits.

Which host keys a node may present, rhaas's client key and ``known_hosts`` are
:mod:`rhaas.adapters.hostkeys`' business; what is said to a node's shell is the caller's
(kexec's commands are :mod:`rhaas.core.kexec.commands`).

Every node session is a Fabric ``Connection`` (connect, ``run``, ``sftp``), set up so that
Fabric's conveniences cannot loosen anything:

* host keys are checked strictly. Fabric installs paramiko's ``AutoAddPolicy`` and never
  loads ``known_hosts`` (lab notes section 13), so before the connection is opened its
  ``client`` gets ``RejectPolicy`` and only the keys pinned in the node's :class:`Endpoint`;
* nothing of the user's is read: a lazy ``fabric.Config`` per connection with an empty
  ``SSHConfig`` (no ``~/.ssh/config``, ``/etc/ssh/ssh_config`` or Fabric/Invoke config
  files), no ``known_hosts``, agent or ``~/.ssh`` keys, no agent forwarding;
* every wait is bounded: TCP connect, banner, authentication, channel open and each command.

paramiko and Fabric are imported inside the functions that need them (~0.15 s and ~0.3 s).
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Self

from rhaas.adapters.ssh_errors import (
    AuthFailed,
    CommandTimeout,
    HostKeyChanged,
    HostKeyUnknown,
    SSHError,
    Unreachable,
    why,
)
from rhaas.model import SSHAddress, fingerprint, parse_ssh


# -- addressing and connecting --------------------------------------------------------------------
def host_pattern(address: SSHAddress | str) -> str:
    """The known_hosts name of an address: ``host`` on port 22, ``[host]:port`` otherwise."""
    addr = address if isinstance(address, SSHAddress) else parse_ssh(address)
    return addr.host if addr.port == 22 else f"[{addr.host}]:{addr.port}"


def connect_socket(addr: SSHAddress, timeout: float, node: str | None = None) -> socket.socket:
    """A TCP connection with Nagle off: SSH's handshake is many small writes and reads, and
    with Nagle plus delayed ACKs each connect would stall for ~0.1 s."""
    try:
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    except OSError as exc:
        who = f"{node} ({addr.host}:{addr.port})" if node else f"{addr.host}:{addr.port}"
        raise Unreachable(f"cannot connect to {who}: {why(exc)}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _quiet_paramiko() -> None:
    """paramiko's transport threads log tracebacks for dropped connections; rhaas reports
    each failure as one line itself, so keep them off stderr (unless logging is set up)."""
    import logging

    log = logging.getLogger("paramiko")
    if not log.handlers:
        log.addHandler(logging.NullHandler())


class _KeyCache:
    """Decoded public keys, shared by the threads of one process (a verify reconnect reuses them)."""

    def __init__(self):
        self._keys: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, line: str):
        with self._lock:
            key = self._keys.get(line)
        if key is None:
            import paramiko

            typ, blob = line.split()[:2]  # checked where the Endpoint was built (hostkeys.endpoint_for)
            key = paramiko.PKey.from_type_string(typ, base64.b64decode(blob))
            with self._lock:
                self._keys[line] = key
        return key


_keys = _KeyCache()


# -- sessions -------------------------------------------------------------------------------------
@dataclass
class Endpoint:
    """Where a node answers and which host keys it may present."""

    node: str
    address: SSHAddress
    host_keys: list[str] = field(default_factory=list)  # "TYPE B64" lines


@dataclass
class Result:
    exit: int  # -1 when the session ended without an exit status
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def why(self) -> str:
        """The last line of stderr, or the exit code."""
        err = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return err[-1].strip() if err else f"exit {self.exit}"


class Session:
    """One authenticated SSH connection to a node: an opened ``fabric.Connection``."""

    def __init__(self, conn, endpoint: Endpoint, command_timeout: float):
        self.conn = conn
        self.endpoint = endpoint
        self.command_timeout = command_timeout
        self._sftp = None

    @property
    def client(self):
        """The paramiko ``SSHClient`` inside the Fabric connection."""
        return self.conn.client

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sftp = None
        _discard(self.conn)

    def _require_open(self, what: str) -> None:
        # Fabric reconnects a Connection whose transport died on its next run()/sftp(); with
        # our pre-connected socket (already closed) that can only fail, and a node that
        # dropped us must be reported as such, so refuse here, as paramiko itself would
        if not self.conn.is_connected:
            raise Unreachable(f"{self.endpoint.node}: {what}: SSH session not active")

    def run(self, command: str, timeout: float | None = None) -> Result:
        """Run one command; raise CommandTimeout if it does not finish within ``timeout``.

        The session is a channel of the Fabric ``Connection`` (``create_session``) read here
        directly: Invoke's runner behind ``Connection.run`` starts three threads per command
        and costs ~2.5 ms of CPU against ~1 ms, which at a thousand nodes is seconds of the
        GIL. No stdin, no pty; a session that ends without an exit status gives exit -1.
        """
        import paramiko

        timeout = timeout or self.command_timeout
        node = self.endpoint.node
        self._require_open("cannot open a session")
        deadline = time.monotonic() + timeout
        try:
            chan = self.conn.create_session()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise Unreachable(f"{node}: cannot open a session: {why(exc)}") from None
        try:
            chan.exec_command(command)
            chan.shutdown_write()
            if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                raise CommandTimeout(f"{node}: command did not finish within {timeout:g}s")
            out = _drain(chan.recv, chan, deadline)
            err = _drain(chan.recv_stderr, chan, deadline)
            return Result(chan.exit_status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        except TimeoutError:  # socket.timeout
            raise CommandTimeout(f"{node}: command did not finish within {timeout:g}s") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise Unreachable(f"{node}: session lost: {why(exc)}") from None
        finally:
            chan.close()

    def sftp(self):
        if self._sftp is None:
            import paramiko

            self._require_open("cannot start SFTP")
            try:
                self._sftp = self.conn.sftp()
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise Unreachable(f"{self.endpoint.node}: cannot start SFTP: {why(exc)}") from None
            self._sftp.get_channel().settimeout(self.command_timeout)
        return self._sftp

    def exists(self, remote: str) -> bool:
        try:
            self.sftp().stat(remote)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise SSHError(f"{self.endpoint.node}: cannot stat {remote}: {why(exc)}") from None

    def makedirs(self, remote_dir: str, mode: int = 0o700) -> None:
        sftp = self.sftp()
        path = ""
        for part in remote_dir.strip("/").split("/"):
            path += "/" + part
            try:
                sftp.stat(path)
            except FileNotFoundError:
                try:
                    sftp.mkdir(path, mode)
                except OSError:
                    sftp.stat(path)  # created meanwhile by someone else, or a real error

    def put(self, source: str | bytes, remote: str) -> int:
        """Upload a local file (path) or ``bytes`` to ``remote`` atomically: a temporary name,
        then a rename over the target. Returns the bytes sent."""
        import io

        import paramiko

        sftp = self.sftp()
        tmp = f"{remote}.part.{os.getpid()}.{threading.get_ident()}"
        what = "data" if isinstance(source, bytes) else source
        try:
            if isinstance(source, bytes):
                attrs = sftp.putfo(io.BytesIO(source), tmp, file_size=len(source), confirm=True)
            else:
                attrs = sftp.put(source, tmp, confirm=True)
            try:
                sftp.posix_rename(tmp, remote)
            except OSError:
                sftp.rename(tmp, remote)
            return attrs.st_size or 0
        except TimeoutError:
            raise CommandTimeout(f"{self.endpoint.node}: upload of {what} stalled") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SSHError(f"{self.endpoint.node}: upload of {what} failed: {why(exc)}") from None


def _drain(read, chan, deadline: float) -> bytes:
    """Read one stream of a finished command to its end (bounded by the deadline)."""
    parts = []
    while True:
        chan.settimeout(max(0.05, deadline - time.monotonic()))
        data = read(65536)
        if not data:
            return b"".join(parts)
        parts.append(data)


def _fabric_config():
    """A Fabric config for one Connection: no config files of any kind are read.

    ``lazy=True`` loads no Fabric/Invoke config files (``/etc/fabric.yaml``, ``~/.fabric.*``)
    and the explicit empty ``SSHConfig`` keeps ``~/.ssh/config`` and ``/etc/ssh/ssh_config``
    out. One per Connection, never shared: ``Connection.__init__`` writes into its config
    (``inline_ssh_env``), which re-merges it from an empty dict, so a config shared between
    threads is briefly empty for the others (seen: "No attribute or config key found for
    'gateway'" on 10 of 1000 nodes). A fresh one costs ~0.1 ms.
    """
    import fabric
    import paramiko

    return fabric.Config(ssh_config=paramiko.SSHConfig(), lazy=True)


def _discard(conn, sock: socket.socket | None = None) -> None:
    """Close a Connection whatever state it is in (Fabric's close() skips a dead transport)."""
    for close in (conn.close, conn.client.close, sock.close if sock is not None else None):
        if close is None:
            continue
        try:
            close()
        except Exception:  # noqa: BLE001, S110 - closing a dead connection may raise anything
            pass


class Link:
    """A node's Fabric ``Connection``, built once and opened again for every session.

    Building a ``fabric.Connection`` costs about 0.4 ms of pure Python (Invoke's config
    merging); a kexec opens two or more sessions per node (load, then the post-jump polls),
    so the connection object, its pinned host keys and its policy are kept and only the
    socket is new each time. Not for use by two threads at once.
    """

    def __init__(self, endpoint: Endpoint, pkey):
        self.endpoint = endpoint
        self.pkey = pkey
        self._conn = None

    def _connection(self):
        if self._conn is not None:
            return self._conn
        import fabric
        import paramiko

        _quiet_paramiko()
        addr = self.endpoint.address
        conn = fabric.Connection(
            addr.host,
            user=addr.user,
            port=addr.port,
            config=_fabric_config(),
            forward_agent=False,
            connect_kwargs={
                "pkey": self.pkey,
                "look_for_keys": False,
                "allow_agent": False,
            },
        )
        # Fabric's AutoAddPolicy would trust anything: reject keys not pinned here
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        pinned = conn.client.get_host_keys()
        pattern = host_pattern(addr)
        for line in self.endpoint.host_keys:
            key = _keys.get(line)
            pinned.add(pattern, key.get_name(), key)
        self._conn = conn
        return conn

    def open(self, connect_timeout: float, command_timeout: float, tcp_timeout: float | None = None) -> Session:
        """Connect and authenticate with strict host key checking; raise an SSHError subclass.
        ``tcp_timeout`` bounds the TCP connect alone (default: ``connect_timeout``)."""
        import paramiko

        node, addr = self.endpoint.node, self.endpoint.address
        conn = self._connection()
        sock = connect_socket(addr, tcp_timeout or connect_timeout, node)
        conn.connect_kwargs.update(
            sock=sock,  # connected already, with TCP_NODELAY (see _connect_socket)
            banner_timeout=connect_timeout,
            auth_timeout=connect_timeout,
            channel_timeout=connect_timeout,
        )
        # bounds the key exchange (with our own socket there is no TCP connect left to bound);
        # set on the object, as Fabric's constructor would truncate 0.5 to 0 (no bound at all)
        conn.connect_timeout = connect_timeout
        try:
            conn.open()
        except paramiko.BadHostKeyException as exc:
            _discard(conn, sock)
            got = f"{exc.key.get_name()} {exc.key.get_base64()}"
            want = f"{exc.expected_key.get_name()} {exc.expected_key.get_base64()}"
            raise HostKeyChanged(
                f"host key for {node} changed: expected {fingerprint(want)}, got {fingerprint(got)}; "
                f"if the node was reinstalled, run 'rhaas node trust {node}'"
            ) from None
        except paramiko.AuthenticationException:
            _discard(conn, sock)
            raise AuthFailed(f"{node}: authentication as {addr.user} failed (rhaas's key is not authorized)") from None
        except paramiko.SSHException as exc:
            _discard(conn, sock)
            if "not found in known_hosts" in str(exc):
                raise HostKeyUnknown(f"host key for {node} not known; run 'rhaas node trust {node}'") from None
            raise Unreachable(f"cannot connect to {node} ({addr.host}:{addr.port}): {why(exc)}", True) from None
        except (OSError, EOFError) as exc:
            _discard(conn, sock)
            raise Unreachable(f"cannot connect to {node} ({addr.host}:{addr.port}): {why(exc)}", True) from None
        except BaseException:
            _discard(conn, sock)
            raise
        finally:
            conn.connect_kwargs.pop("sock", None)  # never reused: the next open brings its own
        return Session(conn, self.endpoint, command_timeout)


def open_session(endpoint: Endpoint, pkey, connect_timeout: float, command_timeout: float) -> Session:
    """One session to a node over a fresh :class:`Link`."""
    return Link(endpoint, pkey).open(connect_timeout, command_timeout)
