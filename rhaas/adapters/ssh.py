"""SSH to nodes: strict host keys, rhaas's own client key, bounded waits, and the remote commands.

Everything rhaas says to a node's shell is built by :class:`Commands` in this module and
nowhere else; every variable part goes through ``shlex.quote``.

Every node session is a Fabric ``Connection`` (connect, ``run``, ``sftp``), set up so that
Fabric's conveniences cannot loosen anything:

* host keys are checked strictly. Fabric installs paramiko's ``AutoAddPolicy`` and never
  loads ``known_hosts`` (lab notes section 13), so before the connection is opened its
  ``client`` gets ``RejectPolicy`` and only the keys pinned for that node
  (``RHAAS_HOME/known_hosts`` plus the node's ``ssh_host_key``);
* nothing of the user's is read: a lazy ``fabric.Config`` per connection with an empty
  ``SSHConfig`` (no ``~/.ssh/config``, ``/etc/ssh/ssh_config`` or Fabric/Invoke config
  files), no ``known_hosts``, agent or ``~/.ssh`` keys, no agent forwarding;
* every wait is bounded: TCP connect, banner, authentication, channel open and each command.

paramiko and Fabric are imported inside the functions that need them (~0.15 s and ~0.3 s).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from rhaas.errors import RhaasError
from rhaas.model import SSHAddress, parse_ssh

KNOWN_HOSTS = "known_hosts"
CLIENT_KEY = "id_ed25519"


# -- errors: one line each, phrased for the operator ------------------------------------------
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


# -- rhaas's client key -------------------------------------------------------------------------
def ensure_client_key(home: str | os.PathLike, key_path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """rhaas's SSH identity: ``(private key path, public key line)``.

    With ``key_path`` (the ``ssh-key`` setting) that key must exist. Otherwise
    ``HOME/id_ed25519`` is used and generated (0600, with ``.pub`` beside it) if missing.
    """
    if key_path:
        path = Path(key_path).expanduser()
        if not path.is_file():
            raise SSHError(f"ssh-key {path} does not exist")
        return path, _public_line(path)
    home = Path(home)
    path = home / CLIENT_KEY
    if not path.exists():
        _generate_ed25519(path)
    return path, _public_line(path)


def _generate_ed25519(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    comment = f"rhaas@{socket.gethostname()}"
    # link() publishes the private key atomically: of two processes racing here, one wins and
    # the other uses the winner's key
    won = _publish(path, private, 0o600, replace=False)
    if won:
        _publish(path.with_name(path.name + ".pub"), public + b" " + comment.encode() + b"\n", 0o644, replace=True)


def _publish(path: Path, data: bytes, mode: int, replace: bool) -> bool:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _public_line(private_path: Path) -> str:
    pub = private_path.with_name(private_path.name + ".pub")
    if pub.is_file():
        line = pub.read_text().strip()
        if line:
            return line
    key = load_client_key(private_path)
    return f"{key.get_name()} {key.get_base64()}"


def load_client_key(path: str | os.PathLike):
    """The private key as a paramiko ``PKey`` (type detected from the file)."""
    import paramiko

    try:
        return paramiko.PKey.from_path(str(path))
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise SSHError(f"cannot read SSH key {path}: {exc}") from None


# -- host keys ------------------------------------------------------------------------------------
def host_pattern(address: SSHAddress | str) -> str:
    """The known_hosts name of an address: ``host`` on port 22, ``[host]:port`` otherwise."""
    addr = address if isinstance(address, SSHAddress) else parse_ssh(address)
    return addr.host if addr.port == 22 else f"[{addr.host}]:{addr.port}"


def parse_key_line(line: str) -> tuple[str, str]:
    """``(type, base64)`` from ``TYPE B64 [comment]`` or a known_hosts line ``HOST TYPE B64``."""
    parts = (line or "").split()
    for i in range(min(2, max(0, len(parts) - 1))):
        typ, blob = parts[i], parts[i + 1]
        if typ.startswith(("ssh-", "ecdsa-", "sk-")):
            try:
                raw = base64.b64decode(blob, validate=True)
            except ValueError:
                continue
            # the blob starts with its own type name: a cheap consistency check
            if raw[4 : 4 + len(typ)] == typ.encode():
                return typ, blob
    raise SSHError(f"not an SSH public key line: {line[:60]!r}")


def key_fingerprint(line_or_blob: str) -> str:
    blob = parse_key_line(line_or_blob)[1] if " " in line_or_blob.strip() else line_or_blob
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_path(home: str | os.PathLike) -> Path:
    return Path(home) / KNOWN_HOSTS


def read_known_hosts(home: str | os.PathLike) -> dict[str, list[str]]:
    """``{host pattern: ["TYPE B64", ...]}`` from ``HOME/known_hosts`` (plain entries only)."""
    out: dict[str, list[str]] = {}
    try:
        text = known_hosts_path(home).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "@")):
            continue
        parts = line.split()
        if len(parts) < 3:
            continue
        try:
            typ, blob = parse_key_line(" ".join(parts[1:3]))
        except SSHError:
            continue
        for host in parts[0].split(","):
            out.setdefault(host, []).append(f"{typ} {blob}")
    return out


def known_hosts_add(home: str | os.PathLike, address: SSHAddress | str, key_line: str) -> None:
    """Pin ``key_line`` for ``address`` in ``HOME/known_hosts`` (0600), replacing older entries."""
    typ, blob = parse_key_line(key_line)
    pattern = host_pattern(address)
    path = known_hosts_path(home)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    from rhaas.store import Store

    # the store's lock file serialises writers of known_hosts too
    with Store(home)._locked():
        try:
            old = path.read_text().splitlines()
        except FileNotFoundError:
            old = []
        keep = [ln for ln in old if not (ln.split() and pattern in ln.split()[0].split(","))]
        keep.append(f"{pattern} {typ} {blob}")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".known_hosts.")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, ("\n".join(keep) + "\n").encode())
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def fetch_host_key(address: SSHAddress | str, timeout: float = 10.0) -> str:
    """Ask a node for its SSH host key (no authentication): one ``TYPE B64`` line.

    This trusts whatever answers; ``rhaas node trust`` shows the fingerprint it pins.
    """
    import paramiko

    addr = address if isinstance(address, SSHAddress) else parse_ssh(address)
    sock = _connect_socket(addr, timeout)
    t = paramiko.Transport(sock)
    try:
        t.banner_timeout = timeout
        t.start_client(timeout=timeout)
        key = t.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise Unreachable(f"cannot read the host key of {addr}: {_why(exc)}") from None
    finally:
        t.close()


def _connect_socket(addr: SSHAddress, timeout: float, node: str | None = None) -> socket.socket:
    """A TCP connection with Nagle off: SSH's handshake is many small writes and reads, and
    with Nagle plus delayed ACKs each connect would stall for ~0.1 s."""
    try:
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    except OSError as exc:
        who = f"{node} ({addr.host}:{addr.port})" if node else f"{addr.host}:{addr.port}"
        raise Unreachable(f"cannot connect to {who}: {_why(exc)}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _why(exc: BaseException) -> str:
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

            typ, blob = parse_key_line(line)
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

    @classmethod
    def for_node(cls, doc: dict, known: dict[str, list[str]]) -> Endpoint:
        if not doc.get("ssh"):
            raise SSHError(f"node {doc['name']} has no SSH address; set it with 'rhaas node set'")
        addr = parse_ssh(doc["ssh"])
        keys: list[str] = []
        if doc.get("ssh_host_key"):
            typ, blob = parse_key_line(doc["ssh_host_key"])
            keys.append(f"{typ} {blob}")
        for line in known.get(host_pattern(addr), []):
            if line.split()[0] not in {k.split()[0] for k in keys}:
                keys.append(line)
        return cls(doc["name"], addr, keys)


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
            raise Unreachable(f"{node}: cannot open a session: {_why(exc)}") from None
        try:
            chan.exec_command(command)
            chan.shutdown_write()
            if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                raise CommandTimeout(f"{node}: command did not finish within {timeout:g}s")
            out = _drain(chan.recv, chan, deadline)
            err = _drain(chan.recv_stderr, chan, deadline)
            return Result(chan.exit_status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        except socket.timeout:
            raise CommandTimeout(f"{node}: command did not finish within {timeout:g}s") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise Unreachable(f"{node}: session lost: {_why(exc)}") from None
        finally:
            chan.close()

    def sftp(self):
        if self._sftp is None:
            import paramiko

            self._require_open("cannot start SFTP")
            try:
                self._sftp = self.conn.sftp()
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise Unreachable(f"{self.endpoint.node}: cannot start SFTP: {_why(exc)}") from None
            self._sftp.get_channel().settimeout(self.command_timeout)
        return self._sftp

    def exists(self, remote: str) -> bool:
        try:
            self.sftp().stat(remote)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise SSHError(f"{self.endpoint.node}: cannot stat {remote}: {_why(exc)}") from None

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
            raise SSHError(f"{self.endpoint.node}: upload of {what} failed: {_why(exc)}") from None



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

    def open(self, connect_timeout: float, command_timeout: float) -> Session:
        """Connect and authenticate with strict host key checking; raise an SSHError subclass."""
        import paramiko

        node, addr = self.endpoint.node, self.endpoint.address
        conn = self._connection()
        sock = _connect_socket(addr, connect_timeout, node)
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
                f"host key for {node} changed: expected {key_fingerprint(want)}, got {key_fingerprint(got)}; "
                f"if the node was reinstalled, run 'rhaas node trust {node}'"
            ) from None
        except paramiko.AuthenticationException:
            _discard(conn, sock)
            raise AuthFailed(f"{node}: authentication as {addr.user} failed (rhaas's key is not authorized)") from None
        except paramiko.SSHException as exc:
            _discard(conn, sock)
            if "not found in known_hosts" in str(exc):
                raise HostKeyUnknown(f"host key for {node} not known; run 'rhaas node trust {node}'") from None
            raise Unreachable(f"cannot connect to {node} ({addr.host}:{addr.port}): {_why(exc)}", True) from None
        except (OSError, EOFError) as exc:
            _discard(conn, sock)
            raise Unreachable(f"cannot connect to {node} ({addr.host}:{addr.port}): {_why(exc)}", True) from None
        except BaseException:
            _discard(conn, sock)
            raise
        finally:
            conn.connect_kwargs.pop("sock", None)  # never reused: the next open brings its own
        return Session(conn, self.endpoint, command_timeout)


def open_session(endpoint: Endpoint, pkey, connect_timeout: float, command_timeout: float) -> Session:
    """One session to a node over a fresh :class:`Link`."""
    return Link(endpoint, pkey).open(connect_timeout, command_timeout)


# -- the remote commands --------------------------------------------------------------------------
class Commands:
    """Every command line rhaas sends to a node. Variable parts are always shlex-quoted.

    A node's pre-kexec answer is parsed by :meth:`parse_load`: the boot id on the first line,
    then ``rhaas:cached`` once the files are there and ``rhaas:loaded`` after ``kexec -l``.
    """

    CACHE_DIR = "/run/rhaas"
    BOOT_ID = "/proc/sys/kernel/random/boot_id"
    CMDLINE = "/proc/cmdline"
    KEXEC_LOADED = "/sys/kernel/kexec_loaded"
    CACHED = "rhaas:cached"
    LOADED = "rhaas:loaded"
    # A synchronous `kexec -e` never returns; the jump is detached from the SSH session with all
    # three standard streams closed, so the session ends at once (lab notes §7).
    FIRE = 'setsid sh -c "sleep 0.2; kexec -e" </dev/null >/dev/null 2>&1 &'

    @classmethod
    def cache_path(cls, sha256: str) -> str:
        if not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return f"{cls.CACHE_DIR}/{sha256}"

    @classmethod
    def _kexec_load(cls, kernel_sha: str, initrd_sha: str, cmdline: str) -> str:
        q = shlex.quote
        return (
            f"kexec -l {q(cls.cache_path(kernel_sha))} --initrd={q(cls.cache_path(initrd_sha))} "
            f"{q('--command-line=' + cmdline)}"
        )

    @classmethod
    def _tail(cls, fire: bool) -> str:
        tail = f" && echo {cls.LOADED}"
        if fire:
            # `sh -c` keeps the trailing `&` from backgrounding the whole && list
            tail += f" && sh -c {shlex.quote(cls.FIRE)}"
        return tail

    @classmethod
    def load_cached(cls, kernel_sha: str, initrd_sha: str, cmdline: str, fire: bool) -> str:
        """Read the boot id; if both files are cached, ``kexec -l`` (and fire) in the same session."""
        q = shlex.quote
        return (
            f"cat {cls.BOOT_ID} && test -f {q(cls.cache_path(kernel_sha))} && test -f {q(cls.cache_path(initrd_sha))}"
            f" && echo {cls.CACHED} && {cls._kexec_load(kernel_sha, initrd_sha, cmdline)}{cls._tail(fire)}"
        )

    @classmethod
    def combine_and_load(
        cls, kernel_sha: str, base_sha: str, overlay_sha: str, initrd_sha: str, cmdline: str, fire: bool, tag: str
    ) -> str:
        """Build the node's initrd (base + overlay) in its cache, then ``kexec -l`` (and fire)."""
        q = shlex.quote
        target = cls.cache_path(initrd_sha)
        tmp = f"{target}.tmp.{tag}"
        return (
            f"cat {cls.BOOT_ID} && cat {q(cls.cache_path(base_sha))} {q(cls.cache_path(overlay_sha))} > {q(tmp)}"
            f" && mv -f {q(tmp)} {q(target)} && echo {cls.CACHED}"
            f" && {cls._kexec_load(kernel_sha, initrd_sha, cmdline)}{cls._tail(fire)}"
        )

    @classmethod
    def fire_loaded(cls) -> str:
        """Read the boot id; jump only if a kernel is loaded (the pipelined ``--exec``)."""
        return f"cat {cls.BOOT_ID} && grep -qx 1 {cls.KEXEC_LOADED} && echo {cls.LOADED} && sh -c {shlex.quote(cls.FIRE)}"

    @classmethod
    def read_boot(cls) -> str:
        """The boot id, then the kernel command line."""
        return f"cat {cls.BOOT_ID} {cls.CMDLINE}"

    @classmethod
    def parse_load(cls, result: Result) -> tuple[str | None, bool, bool]:
        """``(boot id, files cached, kernel loaded)`` from a load/fire command's answer."""
        lines = [ln.strip() for ln in result.lines]
        boot_id = lines[0] if lines and _looks_like_boot_id(lines[0]) else None
        return boot_id, cls.CACHED in lines, cls.LOADED in lines

    @classmethod
    def parse_boot(cls, result: Result) -> tuple[str | None, str]:
        lines = result.lines
        boot_id = lines[0].strip() if lines and _looks_like_boot_id(lines[0].strip()) else None
        cmdline = lines[1] if len(lines) > 1 else ""
        return boot_id, cmdline


def _looks_like_boot_id(text: str) -> bool:
    return len(text) == 36 and text.count("-") == 4


def cmdline_has(cmdline: str, arg: str) -> bool:
    """Whether ``arg`` is one of the whitespace-separated words of a kernel command line."""
    return arg in cmdline.split()
