"""Per-node initramfs overlays: a small gzipped ``newc`` cpio archive, written in pure Python.

Linux unpacks every cpio archive it finds in the initramfs, one after the other, and later
files replace earlier ones (lab notes §5). So instead of rebuilding an image per node, rhaas
appends a few hundred bytes to the shared initrd: root's ``authorized_keys`` and, when rhaas
holds the private half, the node's pinned SSH host key.

The archive is deterministic (fixed inode numbers, mtime 0, gzip mtime 0): the same inputs
give the same bytes, so the overlay can be cached on the node under its sha256 like the image.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
S_IFDIR = 0o040000
S_IFREG = 0o100000

# where the lab image's dropbear reads its host key (lab notes §5)
DEFAULT_HOST_KEY_TARGET = "/etc/dropbear/dropbear_ed25519_host_key"


@dataclass(frozen=True)
class CpioEntry:
    name: str  # relative, no leading "/"
    mode: int  # full st_mode (type bits + permissions)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node

    @property
    def is_dir(self) -> bool:
        return self.mode & 0o170000 == S_IFDIR


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, mode: int, nlink: int, size: int, namesize: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def write_newc(entries: list[CpioEntry]) -> bytes:
    """An uncompressed newc archive of ``entries`` (owner root, mtime 0), with its trailer."""
    out = bytearray()
    for ino, e in enumerate(entries, start=1):
        name = e.name.strip("/").encode("utf-8")
        if not name or b"\0" in name:
            raise ValueError(f"invalid cpio member name {e.name!r}")
        data = b"" if e.is_dir else e.data
        out += _header(ino, e.mode, 2 if e.is_dir else 1, len(data), len(name) + 1, e.rdev)
        out += name + b"\0"
        out += _pad4(110 + len(name) + 1)
        out += data + _pad4(len(data))
    name = TRAILER.encode() + b"\0"
    out += _header(0, 0, 1, 0, len(name)) + name + _pad4(110 + len(name))
    return bytes(out)


def _parents(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def build_overlay(
    authorized_keys: list[str],
    host_key: bytes | None = None,
    host_key_target: str = DEFAULT_HOST_KEY_TARGET,
) -> bytes:
    """The gzipped overlay for one node.

    ``authorized_keys``: OpenSSH public key lines for ``/root/.ssh/authorized_keys``.
    ``host_key``: the node's private host key file, installed at ``host_key_target`` (0600).
    """
    for line in authorized_keys:
        if "\n" in line or "\r" in line or "\0" in line:
            raise ValueError("an authorized key line contains a line break or NUL")
    keys = "".join(line.strip() + "\n" for line in authorized_keys if line.strip()).encode()
    entries = [
        CpioEntry("root", S_IFDIR | 0o700),
        CpioEntry("root/.ssh", S_IFDIR | 0o700),
        CpioEntry("root/.ssh/authorized_keys", S_IFREG | 0o600, keys),
    ]
    if host_key is not None:
        target = host_key_target.strip("/")
        if not target or ".." in target.split("/"):
            raise ValueError(f"invalid host key target {host_key_target!r}")
        entries += [CpioEntry(d, S_IFDIR | 0o755) for d in _parents(target)]
        entries.append(CpioEntry(target, S_IFREG | 0o600, host_key))
    return gzip.compress(write_newc(entries), compresslevel=9, mtime=0)


def read_newc(blob: bytes) -> list[CpioEntry]:
    """Every member of an initramfs: concatenated newc archives, each gzipped or not.

    The inverse of :func:`build_overlay` for tests and for the simulated nodes; it follows
    the kernel's rules (zero padding between parts, later members after earlier ones).
    """
    out: list[CpioEntry] = []
    pos = 0
    while pos < len(blob):
        if blob[pos] == 0:
            pos += 1
            continue
        if blob[pos : pos + 2] == b"\x1f\x8b":
            d = zlib.decompressobj(wbits=31)
            plain = d.decompress(blob[pos:])
            if not d.eof:
                raise ValueError("truncated gzip member in initramfs")
            out += _parse_plain(plain)
            pos = len(blob) - len(d.unused_data)
            continue
        if blob[pos : pos + 6] == NEWC_MAGIC:
            entries, used = _parse_archive(blob, pos)
            out += entries
            pos = used
            continue
        raise ValueError(f"unknown data at offset {pos} of initramfs")
    return out


def _parse_plain(plain: bytes) -> list[CpioEntry]:
    out: list[CpioEntry] = []
    pos = 0
    while pos < len(plain):
        if plain[pos] == 0:
            pos += 1
            continue
        entries, pos = _parse_archive(plain, pos)
        out += entries
    return out


def _parse_archive(buf: bytes, pos: int) -> tuple[list[CpioEntry], int]:
    out: list[CpioEntry] = []
    while True:
        if buf[pos : pos + 6] != NEWC_MAGIC:
            raise ValueError(f"bad cpio header at offset {pos}")
        f = [int(buf[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name_start = pos + 110
        name = buf[name_start : name_start + namesize - 1].decode("utf-8", "replace")
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = buf[data_start : data_start + size]
        pos = data_start + size + (-size % 4)
        if name == TRAILER:
            return out, pos
        out.append(CpioEntry(name, mode, data, (f[9], f[10])))


def overlay_files(blob: bytes) -> dict[str, bytes]:
    """The final content of each regular file after all parts are unpacked in order."""
    files: dict[str, bytes] = {}
    for e in read_newc(blob):
        if e.mode & 0o170000 == S_IFREG:
            files["/" + e.name.lstrip("/")] = e.data
    return files
