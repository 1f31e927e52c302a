"""Login throttling for `rhaas serve`: failed logins slow down, the right password is never locked out.

Two kinds of key are watched: the client address (an IPv6 client by its /64, so one host cannot
rotate addresses) and the user name (only names that exist, so made-up names cannot fill the
table). Each key keeps its failures inside a window (``window`` seconds after the last failure).
Once a key has ``limit`` failures, it is blocked for a back-off that starts at one second and
doubles with each further failure, capped at ``window``; while blocked, every login on that key is
answered 429 with Retry-After, without looking at the password (so a block cannot be used to
test passwords).

Why this cannot lock the right password out for good: a block never lasts longer than
``window``; a key forgets its failures once ``window`` has passed without a new one; and a
successful login clears its user's record. Under a sustained attack on one user name, that user's
logins are delayed by at most ``window`` per try; the address key slows the attacker itself.

Memory is bounded: each table keeps at most ``max_keys`` records, dropping the least recently
touched one when full. Written here rather than taken from a library because it is a few dozen
lines over an OrderedDict and no maintained rate limiter has this shape (per-key failure windows
with a bounded in-memory table and no external store).
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Record:
    failures: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class LoginThrottle:
    """Counts failed logins per address and per user; says how long a blocked key must wait."""

    def __init__(self, limit: int = 10, window: float = 60.0, max_keys: int = 10000, clock=time.monotonic):
        self.limit = max(1, int(limit))
        self.window = float(window)
        self.max_keys = max(16, int(max_keys))
        self.clock = clock
        self._lock = threading.Lock()
        self._tables: dict[str, OrderedDict[str, _Record]] = {"addr": OrderedDict(), "user": OrderedDict()}

    @staticmethod
    def address_key(addr: str | None) -> str:
        try:
            ip = ipaddress.ip_address((addr or "").split("%")[0])
        except ValueError:
            return addr or "?"
        if ip.version == 6:
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def _get(self, kind: str, key: str, now: float, create: bool) -> _Record | None:
        table = self._tables[kind]
        rec = table.get(key)
        if rec is not None and now - rec.last > self.window and now >= rec.blocked_until:
            del table[key]  # the window passed without a failure: forgotten
            rec = None
        if rec is None and create:
            if len(table) >= self.max_keys:
                table.popitem(last=False)
            rec = table[key] = _Record()
        if rec is not None:
            table.move_to_end(key)
        return rec

    def retry_after(self, addr: str | None, user: str | None) -> int:
        """Seconds the caller must wait before a login is looked at (0: go ahead)."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for kind, key in (("addr", self.address_key(addr)), ("user", user)):
                if key is None:
                    continue
                rec = self._get(kind, key, now, create=False)
                if rec is not None and rec.blocked_until > now:
                    wait = max(wait, rec.blocked_until - now)
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, addr: str | None, user: str | None) -> None:
        """Record a failed login (``user`` None when the name does not exist)."""
        now = self.clock()
        with self._lock:
            for kind, key in (("addr", self.address_key(addr)), ("user", user)):
                if key is None:
                    continue
                rec = self._get(kind, key, now, create=True)
                rec.failures += 1
                rec.last = now
                if rec.failures >= self.limit:
                    backoff = min(2.0 ** (rec.failures - self.limit), self.window)
                    rec.blocked_until = max(rec.blocked_until, now + backoff)

    def succeeded(self, user: str) -> None:
        """The right password: that user's record is cleared (the address keeps its own)."""
        with self._lock:
            self._tables["user"].pop(user, None)

    def size(self) -> int:
        with self._lock:
            return sum(len(t) for t in self._tables.values())
