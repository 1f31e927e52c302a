"""SSH identities: rhaas's client key, node host keys, ``known_hosts``, and fetching a host key.

What a node may present is decided here (:func:`endpoint_for`): the key pinned in its
inventory document (``ssh_host_key``, set by ``rhaas node trust``), then the keys
``RHAAS_HOME/known_hosts`` holds for its address. :mod:`rhaas.adapters.ssh` enforces the
result when it connects.

``known_hosts`` lines are parsed and written by paramiko (``HostKeyEntry``, and
``HostKeys.hash_host`` to match hashed ``|1|salt|hash`` names), so OpenSSH's files work as
they are. ``paramiko.HostKeys.load``/``lookup`` themselves are not used: both compare every
entry with every other (load) or every entry per lookup, which at a thousand nodes is a
million comparisons; here plain names are indexed once and only hashed entries are scanned.

paramiko and cryptography are imported inside the functions that need them.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import os
import socket
import tempfile
from pathlib import Path

from rhaas.adapters.ssh import Endpoint, SSHError, Unreachable, connect_socket, host_pattern, why
from rhaas.model import SSHAddress, parse_ssh

KNOWN_HOSTS = "known_hosts"
CLIENT_KEY = "id_ed25519"


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


# -- public key lines -----------------------------------------------------------------------------
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
    """OpenSSH's ``SHA256:...`` fingerprint of a key line or a bare base64 blob."""
    blob = parse_key_line(line_or_blob)[1] if " " in line_or_blob.strip() else line_or_blob
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# -- known_hosts ----------------------------------------------------------------------------------
def known_hosts_path(home: str | os.PathLike) -> Path:
    return Path(home) / KNOWN_HOSTS


class KnownHosts:
    """The keys of one known_hosts file: plain names in a dict, hashed names in a list."""

    def __init__(self) -> None:
        self._plain: dict[str, list[str]] = {}
        self._hashed: list[tuple[str, str]] = []  # (|1|salt|hash, "TYPE B64")

    def add(self, names: list[str], key_line: str) -> None:
        for name in names:
            if name.startswith("|1|"):
                self._hashed.append((name, key_line))
            else:
                self._plain.setdefault(name, []).append(key_line)

    def get(self, pattern: str, default: list[str] | None = None) -> list[str]:
        """``["TYPE B64", ...]`` pinned for a host pattern (``host`` or ``[host]:port``)."""
        found = self._plain.get(pattern)
        if self._hashed:
            from paramiko import HostKeys

            found = list(found or ())
            for hashed, line in self._hashed:
                if hmac.compare_digest(HostKeys.hash_host(pattern, hashed), hashed):
                    found.append(line)
        return found if found else ([] if default is None else default)

    def __len__(self) -> int:
        return sum(len(v) for v in self._plain.values()) + len(self._hashed)


def _entry(line: str):
    """paramiko's reading of one known_hosts line, or None (comment, marker, unknown type, bad key)."""
    from paramiko.hostkeys import HostKeyEntry

    line = line.strip()
    if not line or line.startswith(("#", "@")):  # @cert-authority / @revoked: not used by rhaas
        return None
    try:
        return HostKeyEntry.from_line(line)
    except Exception:  # noqa: BLE001 - a malformed line is skipped, as before and as OpenSSH does
        return None


def read_known_hosts(path: str | os.PathLike) -> KnownHosts:
    """The host keys of a known_hosts file (plain and hashed names); empty if there is none."""
    known = KnownHosts()
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return known
    for line in text.splitlines():
        entry = _entry(line)
        if entry is not None:
            known.add(entry.hostnames, f"{entry.key.get_name()} {entry.key.get_base64()}")
    return known


def _names_match(names: list[str], pattern: str) -> bool:
    from paramiko import HostKeys

    for name in names:
        if name == pattern:
            return True
        if name.startswith("|1|") and hmac.compare_digest(HostKeys.hash_host(pattern, name), name):
            return True
    return False


def known_hosts_add(path: str | os.PathLike, address: SSHAddress | str, key_line: str) -> None:
    """Pin ``key_line`` for ``address`` in the known_hosts file ``path`` (0600), replacing the
    lines that named that address (plain or hashed). Other lines are kept as they are.

    Writers are serialised by ``flock`` on ``PATH.lock``; the file is replaced atomically.
    """
    import paramiko
    from paramiko.hostkeys import HostKeyEntry

    typ, blob = parse_key_line(key_line)
    key = paramiko.PKey.from_type_string(typ, base64.b64decode(blob))
    pattern = host_pattern(address)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = path.read_text().splitlines()
        except FileNotFoundError:
            old = []
        keep = []
        for ln in old:
            fields = ln.split()
            if fields and not fields[0].startswith(("#", "@")) and _names_match(fields[0].split(","), pattern):
                continue
            keep.append(ln)
        text = "".join(ln + "\n" for ln in keep) + HostKeyEntry([pattern], key).to_line()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text.encode())
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    finally:
        os.close(lock)  # releases the flock


# -- what a node may present --------------------------------------------------------------------------
def endpoint_for(doc: dict, known: KnownHosts) -> Endpoint:
    """A node's :class:`Endpoint`: its address and the host keys it may present (the key in
    its document first, then known_hosts keys of other types)."""
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
    return Endpoint(doc["name"], addr, keys)


def fetch_host_key(address: SSHAddress | str, timeout: float = 10.0) -> str:
    """Ask a node for its SSH host key (no authentication): one ``TYPE B64`` line.

    This trusts whatever answers; ``rhaas node trust`` shows the fingerprint it pins.
    """
    import paramiko

    addr = address if isinstance(address, SSHAddress) else parse_ssh(address)
    sock = connect_socket(addr, timeout)
    t = paramiko.Transport(sock)
    try:
        t.banner_timeout = timeout
        t.start_client(timeout=timeout)
        key = t.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise Unreachable(f"cannot read the host key of {addr}: {why(exc)}") from None
    finally:
        t.close()
