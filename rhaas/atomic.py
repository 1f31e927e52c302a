"""Crash-safe file replacement: the one way rhaas rewrites a file it keeps.

A reader (or the next process, after a crash at any line) sees either the old file or the
new one, never a mix: the data goes to a temporary file in the same directory, is fsync'ed,
renamed over the target with ``os.replace`` and the directory is fsync'ed so the rename
itself survives a power cut. The standard library has the pieces but no single call for it.
"""

from __future__ import annotations

import os
import threading


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8), created with ``mode``.

    ``durable=False`` skips both fsyncs, for caches that are rebuilt when lost: the rename is
    still atomic, so a reader never sees half a file. Raises OSError when anything fails; the
    temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not loosen (or tighten) what the caller asked for
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if not durable:
        return
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


__all__ = ["write_atomic"]
