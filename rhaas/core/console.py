"""Node consoles: where a node's serial console comes from, what of it is kept, who reads it.

* **Where from.** A node with a BMC (``ipmi`` in its record) is read over Serial-over-LAN
  (:mod:`rhaas.adapters.sol`): first the BMC's history buffer where it has one (so the lines
  from before anyone looked are there), then the live console. A leased node is read from
  the upstream's ``GET /v0/node/<n>/console`` (:meth:`rhaas.adapters.hil.HILClient.console`),
  after turning its OBM on there, as HIL asks.
* **What is kept.** The last ``RING_BYTES`` (64 KB) per node, in a :class:`Ring`, and only
  while someone needs it: a reader (``rhaas serve``, ``rhaas console``) or a kexec run.
* **Who reads.** :class:`ConsoleHub` hands out one :class:`NodeConsole` per node to every
  reader at once and counts them; when the last one lets go, the node's source is closed
  (the SOL session ended, the upstream stream dropped) and its buffer freed.
* **Serving.** :mod:`rhaas.core.console_answer` turns a held console into an HTTP answer.
* **kexec.** :class:`rhaas.core.console_run.RunConsoles` keeps the console of each node of a run and gives the
  last lines of a node that failed (``console_tail`` in its result).

One pump thread per open node reads the source into the ring; readers only wait on a
condition, so a slow reader never slows the source, and what a reader missed while it was
slow is simply gone from the ring (the console is a live view, not a log).
"""

from __future__ import annotations

import collections
import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator

from rhaas.errors import RhaasError

RING_BYTES = 64 * 1024
MARKS = 256  # (offset, time) marks kept per node: when each part of the ring arrived
READY_WAIT = 12.0  # a reader waits this long for a just opened node: its history, then the live session
STOP_WAIT = 8.0  # a pump thread gets this long to close its source
MAX_STREAM_SECONDS = 3600.0  # a console read ends after this long, even if its reader is still there

_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class Ring:
    """The last ``size`` bytes written, and how many were ever written (absolute offsets)."""

    def __init__(self, size: int = RING_BYTES):
        self.size = size
        self.buf = bytearray()
        self.total = 0
        self.marks: collections.deque[tuple[int, float]] = collections.deque(maxlen=MARKS)

    def write(self, data: bytes, when: float | None = None) -> None:
        if not data:
            return
        self.buf += data[-self.size:]
        if len(self.buf) > self.size:
            del self.buf[: len(self.buf) - self.size]
        self.total += len(data)
        self.marks.append((self.total, time.time() if when is None else when))

    def since(self, offset: int) -> tuple[bytes, int]:
        """Bytes from absolute ``offset`` on (what is still kept of them), and the new offset."""
        start = max(offset, self.total - len(self.buf))
        return bytes(self.buf[len(self.buf) - (self.total - start):]), self.total

    def until(self, when: float) -> bytes:
        """What had arrived by wall-clock time ``when`` (all of it if no mark is that old)."""
        end = self.total
        for offset, stamp in reversed(self.marks):
            if stamp <= when:
                end = offset
                break
        else:
            if self.marks:
                end = self.marks[0][0]
        keep = len(self.buf) - (self.total - end)
        return bytes(self.buf[: max(0, keep)])


def text_lines(data: bytes, n: int | None = None) -> list[str]:
    """Console bytes as printable lines (escape sequences and control characters removed),
    blank lines dropped; the last ``n`` of them."""
    text = _ESCAPES.sub(b"", data).decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    lines = [_CONTROL.sub("", line).rstrip() for line in text.split("\n")]
    lines = [line for line in lines if line.strip()]
    return lines[-n:] if n else lines


def last_lines(data: bytes, n: int) -> bytes:
    """The raw bytes of the last ``n`` lines (for a reader who asked for ``--lines N``);
    blank lines at the very end do not count."""
    body = data.rstrip(b"\r\n")
    if not body or n <= 0:
        return b""
    return b"\n".join(body.replace(b"\r\n", b"\n").split(b"\n")[-n:]) + b"\n"


class NodeConsole:
    """One node's open console: a pump thread filling the ring from the source."""

    def __init__(self, name: str, open_source: Callable[[], object], ring_bytes: int = RING_BYTES):
        self.name = name
        self.ring = Ring(ring_bytes)
        self.cond = threading.Condition()
        self.ready = threading.Event()  # the source is open and its history is in the ring
        self.ended = False
        self.error: str | None = None
        self.refs = 0
        self._stop = False
        self._source = None
        self._open_source = open_source
        self._thread = threading.Thread(target=self._pump, name=f"console-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _pump(self) -> None:
        try:
            src = self._open_source()
        except Exception as exc:  # noqa: BLE001 - a console that cannot open is reported, one line
            self.error = str(exc) if isinstance(exc, RhaasError) else f"{type(exc).__name__}: {exc}"
            self._end()
            return
        self._source = src
        try:
            for chunk in getattr(src, "history", list)():
                self._put(chunk)
            self.ready.set()
            while not self._stop:
                data = src.read(0.5)
                if data is None:
                    if not self._stop:
                        self.error = getattr(src, "failure", lambda: "the console ended")()
                    break
                self._put(data)
        except Exception as exc:  # noqa: BLE001 - the source failed mid-stream
            if not self._stop:
                self.error = str(exc) if isinstance(exc, RhaasError) else f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                src.close()
            self._end()

    def _put(self, data: bytes) -> None:
        if data:
            with self.cond:
                self.ring.write(data)
                self.cond.notify_all()

    def _end(self) -> None:
        with self.cond:
            self.ended = True
            self.ready.set()
            self.cond.notify_all()

    def stop(self) -> None:
        self._stop = True
        src = self._source
        if src is not None and hasattr(src, "interrupt"):
            src.interrupt()  # a blocking reader (an HTTP stream) is woken here
        self._thread.join(STOP_WAIT)

    # -- readers --------------------------------------------------------------------------------
    def snapshot(self) -> tuple[bytes, int]:
        """All that is kept, after the history arrived (or READY_WAIT passed), and its end offset."""
        self.ready.wait(READY_WAIT)
        with self.cond:
            return self.ring.since(0)

    def follow(self, offset: int, deadline: float, tick: float = 1.0) -> Iterator[bytes]:
        """New bytes after ``offset`` as they arrive, until the console ends or ``deadline``
        (time.monotonic). Yields b"" at least every ``tick`` seconds so the caller can check
        whether its own reader is still there."""
        while True:
            with self.cond:
                data, offset = self.ring.since(offset)
                if not data and not self.ended:
                    self.cond.wait(max(0.0, min(tick, deadline - time.monotonic())))
                    data, offset = self.ring.since(offset)
                ended = self.ended
            yield data
            if (ended and not data) or time.monotonic() >= deadline:
                return


class ConsoleHub:
    """One :class:`NodeConsole` per node while anyone holds it; sources opened by ``opener``."""

    def __init__(self, opener: Callable[[str], Callable[[], object]], ring_bytes: int = RING_BYTES):
        self._opener = opener
        self._ring_bytes = ring_bytes
        self._lock = threading.Lock()
        self._open: dict[str, NodeConsole] = {}

    def acquire(self, node: str) -> NodeConsole:
        with self._lock:
            con = self._open.get(node)
            if con is None or con.ended:
                con = NodeConsole(node, self._opener(node), self._ring_bytes)
                self._open[node] = con
                con.start()
            con.refs += 1
            return con

    def release(self, con: NodeConsole) -> None:
        with self._lock:
            con.refs -= 1
            last = con.refs <= 0
            if last and self._open.get(con.name) is con:
                del self._open[con.name]
        if last:
            con.stop()  # outside the lock: closing a SOL session takes a moment

    @contextlib.contextmanager
    def hold(self, node: str) -> Iterator[NodeConsole]:
        con = self.acquire(node)
        try:
            yield con
        finally:
            self.release(con)

    def open_nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._open)

    def buffered_bytes(self) -> int:
        with self._lock:
            return sum(len(c.ring.buf) for c in self._open.values())


# -- where a node's console comes from ---------------------------------------------------------------
class SolSource:
    """A node's BMC: its history buffer (best effort), then the live SOL console."""

    def __init__(self, ipmi: dict, settings: dict):
        self.ipmi = ipmi
        self.cipher = int(ipmi.get("cipher_suite") or settings.get("ipmi-cipher-suite") or 3)
        self._live = None

    def _args(self) -> tuple:
        i = self.ipmi
        return (i["host"], int(i.get("port") or 623), i.get("user") or "", i.get("password") or "", self.cipher)

    def history(self) -> list[bytes]:
        from rhaas.adapters.sol import SolSession, read_history

        past = read_history(*self._args())
        live = SolSession(*self._args())
        live.wait_open()  # a BMC that refuses is an error now, not an empty console
        self._live = live
        return [past]

    def read(self, timeout: float) -> bytes | None:
        return self._live.read(timeout) if self._live is not None else None

    def failure(self) -> str:
        return self._live.failure() if self._live is not None else "no SOL session"

    def close(self) -> None:
        if self._live is not None:
            self._live.close()


class UpstreamSource:
    """A leased node: what the upstream keeps of its console, then the upstream's live stream."""

    def __init__(self, client, upstream_name: str, max_seconds: float | None = None):
        self.client, self.up, self.max_seconds = client, upstream_name, max_seconds
        self._live = None

    def history(self) -> list[bytes]:
        self.client.set_obm(self.up, True)  # HIL: no console without OBM on
        past = self.client.console_tail(self.up, None)
        self._live = self.client.console(self.up, follow=True, lines=0, max_seconds=self.max_seconds)
        return [past]

    def read(self, timeout: float) -> bytes | None:
        return self._live.read(timeout) if self._live is not None else None

    def interrupt(self) -> None:
        if self._live is not None:
            self._live.interrupt()

    def close(self) -> None:
        if self._live is not None:
            self._live.close()


def node_source(doc: dict, settings: dict, client_factory: Callable[[], object] | None = None,
                max_seconds: float | None = None) -> Callable[[], object] | None:
    """How to open ``doc``'s console (called in the pump thread), or None if it has no path."""
    if doc.get("source") == "leased":
        if client_factory is None:
            return None
        upstream_name = doc.get("upstream_name") or doc["name"]
        return lambda: UpstreamSource(client_factory(), upstream_name, max_seconds)
    ipmi = doc.get("ipmi")
    if ipmi and ipmi.get("host"):
        return lambda: SolSource(ipmi, settings)
    return None


def node_opener(store, settings: dict, max_seconds: float | None = None) -> Callable[[str], Callable[[], object]]:
    """A :class:`ConsoleHub` opener that looks nodes up in ``store`` when they are opened."""
    from rhaas.core.instance import upstream_client

    def opener(node: str):
        doc = store.snapshot().node(node) or {"name": node}
        src = node_source(doc, settings, lambda: upstream_client(store), max_seconds)
        if src is None:
            raise RhaasError(f"node {node} has no console: it has no BMC and is not leased from an upstream")
        return src

    return opener


# -- rhaas console ---------------------------------------------------------------------------------------
def show_console(store, settings: dict, node: str, lines: int | None, follow: bool,
                 write: Callable[[bytes], None], max_seconds: float | None = None) -> None:
    """Write ``node``'s console (its last ``lines`` lines, or all that is kept) with ``write``;
    with ``follow``, go on with the live console until it ends, ``max_seconds`` pass or the
    caller interrupts (the console is let go of in every case)."""
    from rhaas.core.instance import require_nodes, upstream_client

    doc = require_nodes(store.snapshot(), [node])[0]
    if doc.get("source") == "leased":
        client = upstream_client(store)
        up = doc.get("upstream_name") or node
        client.set_obm(up, True)
        bound = max_seconds or (MAX_STREAM_SECONDS if follow else 3.0)  # HIL's plain form never ends
        stream = client.console(up, follow=follow, lines=lines, max_seconds=bound)
        try:
            while (data := stream.read()) is not None:
                write(data)
        finally:
            stream.close()
        return
    hub = ConsoleHub(node_opener(store, settings))
    with hub.hold(node) as con:
        data, offset = con.snapshot()
        if con.ended and con.error and not data:
            raise RhaasError(f"console of {node}: {con.error}")
        write(last_lines(data, lines) if lines else data)
        if not follow:
            return
        for chunk in con.follow(offset, time.monotonic() + (max_seconds or MAX_STREAM_SECONDS)):
            if chunk:
                write(chunk)
        if con.error:
            raise RhaasError(f"console of {node}: {con.error}")
