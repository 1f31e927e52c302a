"""The console of a node through HIL's API (``GET /v0/node/<n>/console``), mixed into
:class:`rhaas.adapters.hil.HILClient`.

The answer is a byte stream, not a JSON document: connecting and the headers are bounded by
the client's call deadline as every call; the body is then read until the caller stops or an
overall bound passes. A 307 (HIL's hand-off to obmd) is followed once, without credentials.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from urllib.parse import urlencode, urlsplit

from rhaas import protocol
from rhaas.adapters.hil_answers import UpstreamMisbehaved
from rhaas.adapters.hil_transport import READ_CHUNK, failure_reason
from rhaas.errors import (
    APIError,
    AuthorizationError,
    OBMError,
    UpstreamUnreachable,
    error_from_body,
    is_auth_failure,
)

MAX_CONSOLE_SECONDS = 3600.0  # the longest a console stream is read, unless the caller says


class ConsoleCalls:
    # -- the console (a byte stream, not a JSON answer) ---------------------------------------------
    def console(self, node: str, follow: bool = True, lines: int | None = None,
                max_seconds: float | None = None) -> ConsoleStream:
        """Open ``GET /v0/node/<node>/console`` (following a 307 to an obmd-like endpoint).

        Connecting and the answer's headers are bounded by ``timeout``, as every call here; the
        body is then read until the caller stops (:meth:`ConsoleStream.close`) or for at most
        ``max_seconds`` (``MAX_CONSOLE_SECONDS`` if None). ``lines``/``follow`` are rhaas
        serve's own query keys; a HIL that refuses them (400) gets HIL's plain form instead.
        """
        query = {}
        if lines is not None:
            query["lines"] = str(int(lines))
        if lines is not None or not follow:  # following everything kept is HIL's own form: no query
            query["follow"] = "yes" if follow else "no"
        try:
            return self._open_console(node, query, max_seconds)
        except APIError as exc:
            if not (query and exc.status == 400):
                raise
        return self._open_console(node, {}, max_seconds)

    def console_tail(self, node: str, lines: int | None, cap: int = 64 * 1024, wait: float = 3.0) -> bytes:
        """The node's last console bytes (about ``lines`` lines, or all the upstream keeps; at
        most ``cap`` bytes kept).

        rhaas serve ends the answer itself; HIL's endless stream is read for ``wait`` seconds.
        """
        stream = self.console(node, follow=False, lines=lines, max_seconds=wait)
        buf = bytearray()
        try:
            while True:
                data = stream.read(wait)
                if not data:
                    break
                buf += data
                if len(buf) > cap:
                    del buf[: len(buf) - cap]
        finally:
            stream.close()
        return bytes(buf)

    def _open_console(self, node: str, query: dict, max_seconds: float | None) -> ConsoleStream:
        path = self.base + protocol.BY_NAME["node_console"].url_path(node=node)
        if query:
            path += "?" + urlencode(query)
        what = f"GET {path}"
        bound = max_seconds or MAX_CONSOLE_SECONDS
        scheme, host, port, auth = self.scheme, self.host, self.port, True
        for _hop in (1, 2):
            conn = self._conn(scheme, host, port)
            conn.deadline = time.monotonic() + self.timeout
            try:
                headers = {"Authorization": self._auth} if auth and self._auth else {}
                conn.request("GET", path, headers=headers)
                sock = conn.sock  # getresponse() lets go of it when the answer will close the connection
                resp = conn.getresponse()
                location = resp.getheader("Location")
                if 200 <= resp.status < 300:
                    conn.deadline = time.monotonic() + bound  # the body: until the caller stops, or this
                    return ConsoleStream(conn, resp, sock)
                data = self._read_capped(resp, self.max_doc_bytes, what)
            except TimeoutError:
                conn.close()
                raise UpstreamUnreachable(
                    f"upstream {self.url} unreachable: no console answer within {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise UpstreamUnreachable(f"upstream {self.url} unreachable: {failure_reason(exc)}") from None
            except BaseException:
                conn.close()
                raise
            conn.close()
            if resp.status == 307 and location and auth:
                parts = urlsplit(location)  # a token URL: followed, never logged
                if parts.scheme in ("http", "https") and parts.hostname:
                    scheme, host = parts.scheme, parts.hostname
                    port = parts.port or (443 if scheme == "https" else 80)
                path = parts.path + ("?" + parts.query if parts.query else "")
                auth = False
                continue
            if not auth and not data.strip():
                raise OBMError(f"console endpoint answered HTTP {resp.status}", status=resp.status)
            err = error_from_body(resp.status, data)
            if is_auth_failure(err):
                raise AuthorizationError(
                    f"upstream {self.url} rejected the credentials of user {self.user!r}", status=401) from None
            raise err
        raise UpstreamMisbehaved(f"upstream {self.url} misbehaved: the console redirected more than once")


class ConsoleStream:
    """An open console answer: bytes as they come, until the server ends it, the caller
    closes it, or the overall bound passes (then :meth:`read` gives None)."""

    def __init__(self, conn, resp: http.client.HTTPResponse, sock):
        self._conn = conn
        self._resp = resp
        self._sock = sock
        self._closed = False

    def read(self, timeout: float | None = None) -> bytes | None:
        """Blocks until bytes arrive (``timeout`` is not used: a timed-out read could cut a
        chunk header in half); :meth:`interrupt` from another thread wakes it."""
        if self._closed:
            return None
        try:
            data = self._resp.read1(READ_CHUNK)
        except (OSError, http.client.HTTPException, ValueError, AttributeError):
            return None  # the bound passed, the server or the caller cut the connection
        return data or None

    def interrupt(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError, AttributeError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        for part in (self._resp, self._conn, self._sock):
            with contextlib.suppress(Exception):
                part.close()
