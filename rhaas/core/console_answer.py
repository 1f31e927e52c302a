"""A node's console as the body of ``GET /v0/node/<n>/console`` on ``rhaas serve``.

HIL's own client sends no query and reads an endless byte stream (what is kept, then the live
console); rhaas's client may add ``lines=N`` (only the last N lines of what is kept) and
``follow=yes|no``. The answer is a WSGI iterable held by one of waitress's worker threads for
its whole life (waitress runs the application's iterator in a worker thread), so:

* at most a bounded number of streams run at once (the caller's semaphore; beyond it a 503
  before any byte), so API calls always find a thread;
* a stream ends when its client goes away (waitress's ``waitress.client_disconnected``, checked
  at least once a second, also while the console is quiet), when the node's OBM is turned off
  or it leaves the caller's project (checked every ``ALLOWED_EVERY`` seconds), or after
  ``MAX_STREAM_SECONDS``; closing it lets go of the node's console, so the BMC session ends
  with the last reader.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from rhaas.core.console import MAX_STREAM_SECONDS, READY_WAIT, ConsoleHub, NodeConsole, last_lines

MAX_LINES = 10000
ALLOWED_EVERY = 2.0  # seconds between checks that a streaming reader may still read the node


def parse_console_query(lines: str | None, follow: str | None) -> tuple[int | None, bool]:
    """``?lines=N&follow=yes|no`` as (lines, follow); HIL's plain form (neither) follows."""
    from rhaas.errors import ValidationError

    n = None
    if lines is not None:
        if not lines.isdigit() or not 0 <= int(lines) <= MAX_LINES:
            raise ValidationError(f"lines must be a whole number from 0 to {MAX_LINES}")
        n = int(lines)
    if follow is None:
        return n, n is None
    word = follow.lower()
    if word not in ("yes", "no", "true", "false", "1", "0"):
        raise ValidationError("follow must be yes or no")
    return n, word in ("yes", "true", "1")


class ConsoleAnswer:
    """A console as a WSGI body: the kept part (or its last ``lines``), then live bytes if
    ``follow``. It ends when the console ends, after ``max_seconds``, or as soon as
    ``gone()`` says the client left (checked at least once a second); closing it (waitress
    does, whatever happened) lets go of the node's console and of the stream slot."""

    def __init__(self, hub: ConsoleHub, con: NodeConsole, lines: int | None, follow: bool,
                 slot: threading.Semaphore | None = None, max_seconds: float = MAX_STREAM_SECONDS):
        self._hub, self._con, self._slot = hub, con, slot
        self.lines, self.follow = lines, follow
        self.deadline = time.monotonic() + max_seconds
        self.gone: Callable[[], bool] = lambda: False
        self.allowed: Callable[[], bool] = lambda: True  # e.g. the node's OBM is still on
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        data, offset = self._con.snapshot()
        yield data if self.lines is None else last_lines(data, self.lines)
        if not self.follow:
            return
        checked = time.monotonic()
        for chunk in self._con.follow(offset, self.deadline):
            if self.gone():
                return
            if time.monotonic() - checked > ALLOWED_EVERY:
                checked = time.monotonic()
                if not self.allowed():
                    return
            yield chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.release(self._con)
        if self._slot is not None:
            self._slot.release()


def open_console_answer(hub: ConsoleHub, slots: threading.Semaphore, node: str, lines: int | None,
                        follow: bool) -> ConsoleAnswer:
    """Open ``node``'s console for one HTTP answer, or raise before any byte is sent: 503 when
    every stream slot is taken (each stream holds a server thread), 500 if it cannot open."""
    from rhaas.errors import APIError, OBMError

    if not slots.acquire(blocking=False):
        raise APIError("Too many console streams are open; try again later.", status=503)
    try:
        con = hub.acquire(node)
    except BaseException:
        slots.release()
        raise
    con.ready.wait(READY_WAIT)
    if con.ended and con.error:
        why = con.error
        hub.release(con)
        slots.release()
        raise OBMError(f"console of {node} failed: {why}")
    return ConsoleAnswer(hub, con, lines, follow, slots)
