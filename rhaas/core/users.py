"""Users of `rhaas serve`: salted password hashes and a cheap repeated check.

Passwords are stored only as salted scrypt hashes (standard library). Checking scrypt costs
tens of milliseconds, as a password hash should; real HIL pays its sha512-crypt on every
call (0.35-0.6 s). `rhaas serve` instead remembers, for the life of the process, which
(user, password, stored hash) triples it already verified, keyed by an HMAC under a random
per-process key. The stored hash is no weaker, and a changed password or user invalidates the
memo because the stored hash is part of the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading

_N, _R, _P = 2**14, 8, 1
_memo_key = os.urandom(32)
_memo: set[bytes] = set()
_memo_lock = threading.Lock()
_MEMO_MAX = 10000


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _check(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(want)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(want, got)


def verify_password(user: str, password: str, stored: str | None) -> bool:
    if not stored:
        return False
    key = hmac.new(_memo_key, b"\0".join([user.encode(), password.encode(), stored.encode()]), "sha256").digest()
    with _memo_lock:
        if key in _memo:
            return True
    if not _check(password, stored):
        return False
    with _memo_lock:
        if len(_memo) >= _MEMO_MAX:
            _memo.clear()
        _memo.add(key)
    return True
