"""The content-addressed blob store of `rhaas serve` (kernels and initrds of the ``rhaas.kexec`` extension).

A blob lives at ``RHAAS_HOME/blobs/<sha256>`` (mode 0600). It arrives by upload (an HTTP body
streamed here) or by a fetch from a URL the caller named; either way the bytes go to a
temporary file in the same directory while they are hashed, and only a file whose sha256 is
the one it was announced under is renamed into place. A body is never held in memory whole,
and an interrupted transfer leaves at most a ``.tmp-*`` file, never a wrong blob.

Which projects may use a blob is the inventory's business (the ``blobs`` table, written by
:mod:`rhaas.core.provision_service`); this module only holds bytes. Written by hand because it
is twenty lines of hashing and renaming that no library does with these guarantees.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO

from rhaas.errors import BlockedError, ValidationError
from rhaas.model import is_sha256

CHUNK = 1 << 20
# one blob at most this big (a kernel or an initrd); RHAAS_MAX_BLOB overrides it
MAX_BLOB = int(os.environ.get("RHAAS_MAX_BLOB") or 4 << 30)


def check_sha(sha: str) -> str:
    if not is_sha256(sha):
        raise ValidationError(f"not a sha256 digest (64 lower-case hex digits): {str(sha)[:80]!r}")
    return sha


class BlobStore:
    def __init__(self, home: Path | str):
        self.dir = Path(home) / "blobs"

    def path(self, sha: str) -> Path:
        return self.dir / check_sha(sha)

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def size(self, sha: str) -> int:
        return self.path(sha).stat().st_size

    def receive(self, sha: str, stream: BinaryIO, length: int) -> int:
        """Store ``length`` bytes read from ``stream`` as blob ``sha``; 400 if they do not hash to it.

        Returns the size. For a blob already held the bytes are still read and checked (a
        caller proves it has them), but nothing is written.
        """
        check_sha(sha)
        if length < 0 or length > MAX_BLOB:
            raise ValidationError(f"a blob may hold at most {MAX_BLOB} bytes")
        if self.has(sha):
            if _digest(stream, length, None) != sha:
                raise ValidationError(f"the uploaded bytes do not match sha256 {sha}")
            return length
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "xb") as out:
                os.chmod(tmp, 0o600)
                digest = _digest(stream, length, out)
                out.flush()
                os.fsync(out.fileno())
            if digest != sha:
                raise ValidationError(f"the uploaded bytes do not match sha256 {sha}")
            os.replace(tmp, self.dir / sha)
        finally:
            tmp.unlink(missing_ok=True)
        return length

    # -- uploads in parts: each caller appends to its own partial file, then commits ----------------
    def _partial(self, owner: str, sha: str) -> Path:
        check_sha(sha)
        # the owner is a user name (checked on the way in); hashed so no name shapes a path
        tag = hashlib.sha256(owner.encode()).hexdigest()[:16]
        return self.dir / f".part-{sha}-{tag}"

    def receive_part(self, owner: str, sha: str, offset: int, stream: BinaryIO, length: int) -> int:
        """Append ``length`` bytes at ``offset`` of ``owner``'s upload of ``sha``; the bytes held so far.

        Parts come in order: offset 0 starts afresh, any other offset must be what is held
        (409 otherwise, with the size held, so a client can resume or start over).
        """
        if length < 0 or offset + length > MAX_BLOB:
            raise ValidationError(f"a blob may hold at most {MAX_BLOB} bytes")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._partial(owner, sha)
        if offset == 0:
            self._drop_stale_parts()
            path.unlink(missing_ok=True)
        held = path.stat().st_size if path.exists() else 0
        if offset != held:
            raise BlockedError(f"the upload of blob {sha} holds {held} bytes; send the part at offset {held}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            try:
                _digest(stream, length, out)
            except ValidationError:
                out.truncate(held)  # a short body adds nothing
                raise
        return held + length

    def commit(self, owner: str, sha: str, size: int) -> None:
        """The upload of ``sha`` is complete at ``size`` bytes: hash it, keep it if it matches."""
        path = self._partial(owner, sha)
        held = path.stat().st_size if path.exists() else -1
        if held != size:
            raise BlockedError(f"the upload of blob {sha} holds {max(held, 0)} bytes, not {size}")
        try:
            with open(path, "rb") as fh:
                digest = _digest(fh, size, None)
            if digest != sha:
                raise ValidationError(f"the uploaded bytes do not match sha256 {sha}")
            if not self.has(sha):
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(path, self.dir / sha)
        finally:
            path.unlink(missing_ok=True)

    def _drop_stale_parts(self, older_than: float = 3600.0) -> None:
        """Partial uploads nobody finished within the hour go (a client that died mid-upload)."""
        import time

        cutoff = time.time() - older_than
        for entry in os.scandir(self.dir):
            if entry.name.startswith(".part-"):
                try:
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                except OSError:
                    pass

    def fetch(self, sha: str, url: str, timeout: float = 60.0) -> int:
        """Fetch blob ``sha`` from ``url`` (http or https), verified by hash like an upload."""
        import urllib.request
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValidationError(f"blob URL must be http(s)://HOST/...: {url[:200]!r}")
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # the scheme is checked above
            length = int(resp.headers.get("Content-Length") or -1)
            if length < 0:
                raise ValidationError(f"{url}: no Content-Length")
            return self.receive(sha, resp, length)


def _digest(stream: BinaryIO, length: int, out: BinaryIO | None) -> str:
    """Read exactly ``length`` bytes in chunks, copying them to ``out``; their sha256."""
    h = hashlib.sha256()
    left = length
    while left:
        chunk = stream.read(min(CHUNK, left))
        if not chunk:
            raise ValidationError(f"the body ended after {length - left} of {length} bytes")
        h.update(chunk)
        if out is not None:
            out.write(chunk)
        left -= len(chunk)
    return h.hexdigest()
