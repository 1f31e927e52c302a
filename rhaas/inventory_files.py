"""Opening the inventory's files safely, and saying in one line why one cannot be used.

The inventory holds BMC passwords and password hashes, so its home must be a directory of
the user running rhaas, mode 0700, and ``rhaas.json`` a regular file of that user, mode 0600.
:func:`open_inventory` refuses anything else with the ``chmod``/``chown`` that fixes it,
rather than silently reading (and later rewriting) a store other users can read or replace.
Every OSError on these paths (RHAAS_HOME a file, the store or lock a directory, permission
denied, a read-only or full file system) becomes a :class:`StoreError` naming the path; none
reaches the operator as a traceback. The checks cost one ``stat`` and one ``fstat`` a load.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from rhaas.errors import NoInventoryError, StoreError

RECOVER = "restore it from a backup, or see 'Exit codes' in the README"


def _user(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def os_problem(exc: OSError, path: Path | str, doing: str) -> StoreError:
    """The one-line error for an OSError met while ``doing`` something to ``path``."""
    code = exc.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return StoreError(f"no space left to {doing} {path}; nothing was changed")
    if code == errno.EROFS:
        return StoreError(f"cannot {doing} {path}: the file system is read-only; nothing was changed")
    if code == errno.EISDIR:
        return StoreError(f"cannot {doing} {path}: it is a directory, not a file; move it aside")
    if code == errno.ENOTDIR:
        return StoreError(f"cannot {doing} {path}: a part of that path (RHAAS_HOME?) is a file, not a directory")
    if code in (errno.EACCES, errno.EPERM):
        return StoreError(f"cannot {doing} {path}: permission denied; run rhaas as the inventory's owner")
    return StoreError(f"cannot {doing} {path}: {exc.strerror or exc}; nothing was changed")


def check_private(path: Path, st: os.stat_result, what: str, mode: int) -> None:
    """Refuse a file or directory another user owns or can read, write or enter."""
    me = os.geteuid()
    if st.st_uid != me:
        raise StoreError(
            f"{what} {path} belongs to {_user(st.st_uid)} (uid {st.st_uid}), not to you ({_user(me)}): "
            f"run rhaas as its owner, or 'chown -R {_user(me)} {path}'"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StoreError(
            f"{what} {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"run 'chmod {mode:o} {path}'"
        )


NOT_A_DIRECTORY = "RHAAS_HOME {home} is not a directory; point RHAAS_HOME at the inventory's directory"


def check_home(home: Path) -> None:
    """The inventory's directory is a directory, is ours and is private (0700)."""
    try:
        st = os.stat(home)
    except OSError as exc:
        raise os_problem(exc, home, "open the inventory directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(NOT_A_DIRECTORY.format(home=home))
    check_private(home, st, "inventory directory", 0o700)


def open_inventory(home: Path, path: Path):
    """``path`` opened for reading (a binary file object) and its stat, after every check.

    Opened non-blocking, so a FIFO put in its place cannot hang the command. A missing file
    is reported as such (run 'rhaas init') before anything is said about the directory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoInventoryError(f"no rhaas inventory at {home}; run 'rhaas init' first (or set RHAAS_HOME)") from None
    except NotADirectoryError:
        raise StoreError(NOT_A_DIRECTORY.format(home=home)) from None
    except OSError as exc:
        raise os_problem(exc, path, "read the inventory") from None
    try:
        check_home(home)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise StoreError(f"inventory {path} is {kind}; move it aside and {RECOVER}")
        check_private(path, st, "inventory", 0o600)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), st


def read_all(fh, path: Path) -> bytes:
    try:
        return fh.read()
    except OSError as exc:
        raise os_problem(exc, path, "read the inventory") from None


def open_lock(lock_path: Path) -> int:
    """The lock file's descriptor (created 0600 if missing)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise os_problem(exc, lock_path, "open the lock file") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(f"cannot open the lock file {lock_path}: it is not a regular file; remove it")
    except BaseException:
        os.close(fd)
        raise
    return fd


__all__ = ["RECOVER", "check_home", "check_private", "open_inventory", "open_lock", "os_problem", "read_all"]
