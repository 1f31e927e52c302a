"""Initramfs overlays for the lab guest: small gzipped newc archives appended to an initrd.

Linux unpacks every cpio archive concatenated onto an initramfs in turn, later entries
replacing earlier ones, so root's key or an image id is added to a built image by appending
one (:func:`append_overlay`).  The newc writer is :mod:`rhaas.core.overlay`'s.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, Union

from rhaas.core.overlay import CpioEntry, write_newc

FileSpec = Union[bytes, str, "tuple[bytes | str, int]"]


def overlay_bytes(files: Mapping[str, FileSpec], dirs: Mapping[str, int] | None,
                   devices: Mapping[str, tuple[int, int, int]] | None = None) -> bytes:
    dirs = {k.strip("/"): v for k, v in (dirs or {}).items()}
    entries: list[CpioEntry] = []
    seen_dirs: set[str] = set()

    def add_parents(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in seen_dirs:
                seen_dirs.add(d)
                entries.append(CpioEntry(d, stat.S_IFDIR | dirs.get(d, 0o755)))

    for d in sorted(dirs):
        add_parents(d + "/x")
    for path, spec in files.items():
        path = path.strip("/")
        if isinstance(spec, tuple):
            data, mode = spec
        else:
            data, mode = spec, 0o644
        if isinstance(data, str):
            data = data.encode()
        add_parents(path)
        entries.append(CpioEntry(path, stat.S_IFREG | mode, data))
    for path, (mode, major, minor) in (devices or {}).items():
        path = path.strip("/")
        add_parents(path)
        entries.append(CpioEntry(path, stat.S_IFCHR | mode, b"", (major, minor)))
    return gzip.compress(write_newc(entries), compresslevel=6, mtime=0)


def make_overlay(files: Mapping[str, FileSpec], out: str | os.PathLike | BinaryIO | None = None,
                 *, dirs: Mapping[str, int] | None = None) -> bytes:
    """Write a gzipped newc cpio archive holding ``files`` and return its bytes.

    ``files`` maps a path inside the guest (``"root/.ssh/authorized_keys"``)
    to its content, or to ``(content, mode)``; the default mode is 0644.
    Parent directories are emitted automatically with mode 0755 unless
    ``dirs`` gives a mode (e.g. ``{"root/.ssh": 0o700}``).  Linux accepts such
    an archive appended to an initramfs (``cat base overlay > new``); later
    entries replace earlier ones.  ``out`` may be a path or a binary file.
    """
    data = overlay_bytes(files, dirs)
    if out is not None:
        if hasattr(out, "write"):
            out.write(data)  # type: ignore[union-attr]
        else:
            atomic_write(Path(out), data)
    return data


def authorized_keys_overlay(pubkey: str | bytes) -> bytes:
    """Overlay that installs ``pubkey`` as root's only authorized key."""
    if isinstance(pubkey, bytes):
        pubkey = pubkey.decode()
    return overlay_bytes(
        {"root/.ssh/authorized_keys": (pubkey.strip() + "\n", 0o600)},
        {"root": 0o700, "root/.ssh": 0o700})


def append_overlay(base: Path, overlay: bytes, out: Path) -> Path:
    """Write ``base`` + ``overlay`` to ``out`` atomically."""
    atomic_write(out, base.read_bytes() + overlay)
    return out


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

