"""A run's image files over HTTP, read-only and by sha256: the origin nodes pull from.

``rhaas kexec`` starts one :class:`BlobServer` for a run that stages an image and stops it
when the run ends. It answers only::

    GET|HEAD /rhaas/v0/blobs/<token>/<sha256>

where ``<token>`` is a random secret made for this run (never the same twice, compared in
constant time) and ``<sha256>`` one of the run's files. A wrong or missing token gets 403,
a digest outside the run 404, anything else 404/405/400; none of them sends a byte of a
blob. ``Range: bytes=A-B`` (one range) gets 206, an unsatisfiable one 416. The body goes
out with ``socket.sendfile`` (zero-copy on Linux).

Why stdlib ``http.server`` and not aiohttp: aiohttp is not a dependency of rhaas (and not
installable here), and the listener must cost nothing measurable for a run whose nodes
already hold the image (it starts before we know). What we need of HTTP is one GET/HEAD
route with one range; ``BaseHTTPRequestHandler`` parses requests, we add the routing,
the range and ``sendfile``. Connections are served by one bounded pool of threads
(``workers``); each connection has a socket timeout, so a stalled client frees its worker.
The listener binds loopback unless told otherwise (``blob-listen``); nodes are given
``blob-url`` (default: the listen address) as the base of their URLs.

:meth:`BlobServer.push_chain` is the other way out: the run's blobs streamed (``sendfile``)
into the first node of a chain of relays (README "Images at scale"); its bytes count in
:attr:`BlobServer.bytes_sent` like the HTTP answers.
"""

from __future__ import annotations

import hmac
import http.server
import os
import re
import secrets
import socket
import socketserver
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlsplit

from rhaas.errors import RhaasError, UsageError
from rhaas.model import is_sha256

PREFIX = "/rhaas/v0/blobs/"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_CHAIN_LOCK = threading.Lock()


@dataclass
class Blob:
    path: str
    size: int


class _Server(socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, addr, handler, blobs: dict[str, Blob], token: str, workers: int, io_timeout: float):
        self.blobs = blobs
        self.token = token
        self.io_timeout = io_timeout
        self.sent = 0
        self.requests = 0
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rhaas-blob")
        super().__init__(addr, handler)

    def process_request(self, request, client_address) -> None:
        # one bounded pool for all connections (ThreadingMixIn would start a thread each)
        self.pool.submit(self._serve_one, request, client_address)

    def _serve_one(self, request, client_address) -> None:
        try:
            request.settimeout(self.io_timeout)
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001, S110 - a client that went away mid-answer is not our error
            pass
        finally:
            self.shutdown_request(request)

    def count(self, n: int) -> None:
        with self._lock:
            self.sent += n
            self.requests += 1


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "rhaas-blobs"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format, *args) -> None:
        pass  # nodes' requests are counted, not logged to the operator's terminal

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _refuse(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _answer(self, body: bool) -> None:
        path = urlsplit(self.path).path
        if not path.startswith(PREFIX):
            return self._refuse(404)
        parts = path[len(PREFIX):].split("/")
        if len(parts) != 2:
            return self._refuse(404)
        token, sha = parts
        if not hmac.compare_digest(token.encode(), self.server.token.encode()):
            return self._refuse(403)
        blob = self.server.blobs.get(sha) if is_sha256(sha) else None
        if blob is None:
            return self._refuse(404)
        start, end = 0, blob.size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng is not None:
            m = _RANGE.fullmatch(rng.strip())
            if m is None or m.group(1) == m.group(2) == "":
                return self._refuse(416)
            if m.group(1) == "":  # the last N bytes
                start = max(0, blob.size - int(m.group(2)))
            else:
                start = int(m.group(1))
                if m.group(2):
                    end = min(end, int(m.group(2)))
            if start >= blob.size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{blob.size}")
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                return None
            status = 206
        length = end - start + 1 if blob.size else 0
        try:
            fh = open(blob.path, "rb")  # noqa: SIM115 - closed below, after sendfile
        except OSError:
            return self._refuse(404)
        with fh:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{sha}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{blob.size}")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if body and length:
                self.wfile.flush()
                sent = self.connection.sendfile(fh, start, length)
                self.server.count(sent)
            else:
                self.server.count(0)
        return None


class BlobServer:
    """The run's origin: files by sha256 behind a per-run token, on a thread pool (see module doc).

    ``files`` maps sha256 -> local path. ``listen`` is ``HOST`` or ``HOST:PORT`` (port 0 or
    none: any free port). ``url`` is what nodes are told (``blob-url``); default: the listen
    address. Use as a context manager, or :meth:`start` / :meth:`stop`.
    """

    def __init__(self, files: dict[str, str], listen: str = "127.0.0.1", url: str | None = None,
                 workers: int = 8, io_timeout: float = 30.0):
        self.token = secrets.token_urlsafe(24)
        self.blobs: dict[str, Blob] = {}
        for sha, path in files.items():
            if not is_sha256(sha):
                raise ValueError(f"not a sha256 digest: {sha!r}")
            self.blobs[sha] = Blob(path, os.path.getsize(path))
        self.listen = parse_listen(listen)
        self._url = url
        self.workers = workers
        self.io_timeout = io_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def bind(self) -> BlobServer:
        """Listen (connections wait in the backlog); no thread yet, so the caller may still fork."""
        if self._server is None:
            host, port = self.listen
            try:
                self._server = _Server((host, port), _Handler, self.blobs, self.token, self.workers, self.io_timeout)
            except OSError as exc:
                raise RhaasError(f"cannot listen for image downloads on {host}:{port}: {exc.strerror}") from None
        return self

    def start(self) -> BlobServer:
        """Serve (binding first if :meth:`bind` was not called)."""
        self.bind()
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="rhaas-blob-listener", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, wait for the pool's connections to end (each bounded by its timeout)."""
        srv, self._server = self._server, None
        if srv is None:
            return
        if self._thread is not None:
            srv.shutdown()
        srv.server_close()
        srv.pool.shutdown(wait=True, cancel_futures=True)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stats = (srv.sent, srv.requests)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("blob server not started")
        return self._server.server_address[:2]

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` as nodes see it: ``blob-url`` if set (its port 0 -> ours)."""
        host, port = self.address
        if self._url:
            u = urlsplit(self._url if "://" in self._url else f"http://{self._url}")
            return f"http://{u.hostname}:{u.port or port}"
        return f"http://{host}:{port}"

    def url(self, sha: str) -> str:
        return f"{self.base_url}{PREFIX}{self.token}/{sha}"

    def push_chain(self, host: str, port: int, header: bytes, shas: list[str], deadline: float) -> int:
        """Stream ``header`` then the blobs ``shas`` (in order) into the first relay of a chain
        (:mod:`rhaas.core.kexec.sources`) with ``socket.sendfile``, by monotonic ``deadline``;
        half-close, wait (until the deadline) for the relay to close. Counted in
        :attr:`bytes_sent`. Returns the blob bytes sent; OSError when the chain cannot take them."""
        import time

        sent = 0
        with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())) as sock:
            sock.sendall(header)
            for sha in shas:
                blob = self.blobs[sha]
                with open(blob.path, "rb") as fh:
                    left = blob.size
                    while left > 0:
                        sock.settimeout(max(0.1, deadline - time.monotonic()))
                        n = sock.sendfile(fh, blob.size - left, left)
                        if not n:
                            raise OSError(f"the chain took {blob.size - left} of {blob.size} bytes")
                        left -= n
                        sent += n
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            while sock.recv(4096):
                pass
        with _CHAIN_LOCK:
            self._chain_sent = getattr(self, "_chain_sent", 0) + sent
        return sent

    @property
    def bytes_sent(self) -> int:
        chain = getattr(self, "_chain_sent", 0)
        if self._server is not None:
            return self._server.sent + chain
        return getattr(self, "_stats", (0, 0))[0] + chain


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST`` or ``HOST:PORT`` (IPv4 or a name) -> (host, port)."""
    host, _, port = text.strip().rpartition(":") if ":" in text else (text.strip(), "", "0")
    host = host or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"blob-listen wants HOST or HOST:PORT, got {text!r}")
    try:
        socket.getaddrinfo(host, None, socket.AF_INET)
    except OSError:
        raise UsageError(f"blob-listen: unknown address {host!r}") from None
    return host, int(port)
