"""A client for HIL's v0 REST API (a real HIL, or another `rhaas serve`).

It follows the quirks in shared/hil-api.md: JSON bodies sent raw, Basic credentials sent up
front (HIL's 401 has no challenge), status codes trusted over Content-Type, empty 200 bodies
meaning "done", double-encoded metadata, 307 redirects for power calls re-sent with the same
method and body (and the Location never logged).

An upstream is untrusted input, so every call is bounded three ways:

- **Time: one deadline for the whole call** (connect, send, status line, headers, body, the
  retry on a dropped kept-alive connection and a followed 307). Every socket operation gets the
  time left as its timeout, so a server trickling one byte a second ends the call at the deadline
  (:class:`UpstreamUnreachable`, exit 3). This is written here on top of ``http.client`` because
  the maintained clients bound each read, not the call: urllib3's ``Timeout(total=...)`` only
  sets the read timeout to what is left after connecting and documents that it measures the time
  *between* reads, and httpx has no total timeout at all. (Name resolution is not bounded:
  ``getaddrinfo`` takes no timeout; upstreams are normally given as addresses.)
- **Size: a cap per answer** (``max_list_bytes`` for a list of names, ``max_doc_bytes`` for
  anything else). A Content-Length over the cap is refused before the body is read; otherwise
  at most cap + 1 bytes are read, so a huge answer is never held in memory.
- **Shape:** every answer is checked by :mod:`rhaas.adapters.hil_answers` before it is
  returned; names the upstream sends that rhaas cannot store are left out of lists and reported
  through the ``warn`` callback (and kept in :attr:`HILClient.refused`), never printed here.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

from rhaas import protocol
from rhaas.adapters.hil_answers import Checker, UpstreamMisbehaved
from rhaas.adapters.hil_console import ConsoleCalls
from rhaas.adapters.hil_kexec import KexecCalls
from rhaas.adapters.hil_transport import READ_CHUNK, BoundedHTTP, BoundedHTTPS, failure_reason
from rhaas.errors import (
    APIError,
    AuthorizationError,
    HTTPError,
    OBMError,
    UpstreamUnreachable,
    UsageError,
    error_from_body,
    is_auth_failure,
)

MiB = 1024 * 1024
DEFAULT_MAX_LIST_BYTES = 8 * MiB  # the defaults of the settings upstream-max-list-bytes / -doc-bytes
DEFAULT_MAX_DOC_BYTES = 1 * MiB
# calls whose answer is a list of names (the larger cap), and what the names are
NAME_LISTS = {"list_nodes": "node", "project_nodes": "node",
              "project_networks": "network", "list_networks": "network"}

__all__ = ["HILClient", "UpstreamMisbehaved", "decode_metadata", "parse_upstream_url"]


def parse_upstream_url(url: str) -> tuple[str, str, int, str]:
    """Split and check an upstream URL: (scheme, host, port, base path)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UsageError(f"malformed upstream URL {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise UsageError(f"malformed upstream URL {url!r}: expected http(s)://HOST[:PORT][/PATH]")
    if parts.username or parts.password:
        raise UsageError("put no credentials in the upstream URL; use --user and the password prompt")
    base = parts.path.rstrip("/").removesuffix("/v0")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), base


def decode_metadata(meta: dict) -> dict:
    out = {}
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                pass  # a non-HIL server sent it raw (or nested absurdly deep); keep the string
        out[key] = value
    return out


class HILClient(KexecCalls, ConsoleCalls):
    """HIL's v0 calls (and rhaas serve's extensions), each bounded in time and size."""

    def __init__(self, url: str, user: str | None, password: str | None, timeout: float = 30.0,
                 max_list_bytes: int = DEFAULT_MAX_LIST_BYTES, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
                 warn: Callable[[str], None] | None = None):
        self.url = url.rstrip("/")
        self.scheme, self.host, self.port, self.base = parse_upstream_url(url)
        self.user = user
        for what, value in (("timeout", timeout), ("size cap", max_list_bytes), ("size cap", max_doc_bytes)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise UsageError(f"upstream {what} must be a positive, finite number, got {value!r}")
        self.timeout = float(timeout)
        self.max_list_bytes = int(max_list_bytes)
        self.max_doc_bytes = int(max_doc_bytes)
        self.refused: list[str] = []  # one line per name the upstream sent and rhaas refused
        self._warn = warn
        self._auth = None
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self._auth = f"Basic {token}"
        self._local = threading.local()

    # -- transport --------------------------------------------------------------------------
    def _conn(self, scheme: str, host: str, port: int) -> BoundedHTTP | BoundedHTTPS:
        cls = BoundedHTTPS if scheme == "https" else BoundedHTTP
        return cls(host, port, timeout=self.timeout)

    def _pooled(self) -> BoundedHTTP | BoundedHTTPS:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._conn(self.scheme, self.host, self.port)
        return conn

    def _drop(self, conn) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _send(self, conn, method: str, path: str, body: bytes | None, auth: bool, deadline: float,
              cap: int, what: str, content_type: str = "application/json"):
        conn.deadline = deadline
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        if auth and self._auth:
            headers["Authorization"] = self._auth
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = self._read_capped(resp, cap if 200 <= resp.status < 300 else self.max_doc_bytes, what)
        return resp.status, resp.getheader("Location"), data

    def _read_capped(self, resp: http.client.HTTPResponse, cap: int, what: str) -> bytes:
        """The body, read in chunks up to cap + 1 bytes: a larger answer is refused, not held."""
        def too_big(size: str) -> UpstreamMisbehaved:
            return UpstreamMisbehaved(f"upstream {self.url} misbehaved: {what} answered {size}, over the cap of "
                                      f"{cap} bytes")

        if resp.length is not None and resp.length > cap:
            raise too_big(f"{resp.length} bytes (Content-Length)")
        buf = bytearray()
        while len(buf) <= cap:
            chunk = resp.read(min(READ_CHUNK, cap + 1 - len(buf)))
            if not chunk:
                break
            buf += chunk
        if len(buf) > cap:
            raise too_big("more bytes")
        if resp.length:  # the connection ended before Content-Length was reached
            raise http.client.IncompleteRead(bytes(buf), resp.length)
        return bytes(buf)

    def _request(self, method: str, path: str, body: bytes | None, deadline: float, cap: int, what: str,
                 content_type: str = "application/json"):
        for attempt in (1, 2):
            conn = self._pooled()
            try:
                return self._send(conn, method, self.base + path, body, True, deadline, cap, what, content_type)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # a kept-alive connection the server closed: retry once on a fresh one
                self._drop(conn)
                if attempt == 2 or time.monotonic() >= deadline:
                    raise UpstreamUnreachable(f"upstream {self.url} dropped the connection: {exc}") from None
            except TimeoutError:  # the call's deadline (socket.timeout is TimeoutError too)
                self._drop(conn)
                raise UpstreamUnreachable(
                    f"upstream {self.url} unreachable: no complete answer within {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop(conn)
                raise UpstreamUnreachable(f"upstream {self.url} unreachable: {failure_reason(exc)}") from None
            except BaseException:
                self._drop(conn)  # a refused answer: the rest of it may still be on the wire
                raise
        raise AssertionError("unreachable")

    def _refused(self, line: str) -> None:
        self.refused.append(line)
        if self._warn is not None:
            self._warn(line)

    # -- calls --------------------------------------------------------------------------------
    def call(self, name: str, body: dict | None = None, query: dict | None = None, **path_args):
        """One API call, within one deadline of `timeout` seconds; the JSON answer or None."""
        route = protocol.BY_NAME[name]
        path = route.url_path(**path_args)
        if query:
            path += "?" + urlencode(query)
        raw = json.dumps(body).encode() if body is not None else None
        deadline = time.monotonic() + self.timeout
        cap = self.max_list_bytes if name in NAME_LISTS else self.max_doc_bytes
        what = f"{route.method} {path}"
        status, location, data = self._request(route.method, path, raw, deadline, cap, what)
        if status == 307 and route.redirectable and location:
            status, data = self._follow(route.method, location, raw, deadline, cap, what)
        if 200 <= status < 300:
            if not data.strip():
                answer = None
            else:
                try:
                    answer = json.loads(data)
                except (ValueError, RecursionError):
                    raise HTTPError(f"upstream answered {status} with a body that is not JSON", status=status) from None
            return self._checked(name, answer, what, path_args)
        err = error_from_body(status, data)
        if status == 429:  # rhaas serve's login throttling (HIL itself never answers 429)
            raise AuthorizationError(
                f"upstream {self.url} refused the login of user {self.user!r} for now: too many failed logins "
                f"({err.msg or 'HTTP 429'})", status=429
            ) from None
        if is_auth_failure(err):
            raise AuthorizationError(
                f"upstream {self.url} rejected the credentials of user {self.user!r}", status=401
            ) from None
        raise err

    def _checked(self, name: str, answer, what: str, path_args: dict):
        """The answer after the shape check of its call (hil_answers); calls without one pass as is."""
        check = Checker(self.url, what, self._refused)
        if name in NAME_LISTS:
            return check.names(answer, NAME_LISTS[name])
        if name == "show_node":
            return check.node(answer, path_args["node"])
        if name == "node_power_status":
            return {"power_status": check.power_status(answer)}
        if name in ("node_connect_network", "node_detach_network"):
            return {"status_id": check.status_id(answer)}
        if name == "show_networking_action":
            return check.action(answer)
        if name == "show_network":
            return check.network(answer)
        return answer

    def _follow(self, method: str, location: str, raw: bytes | None, deadline: float, cap: int, what: str):
        """Re-send a power/boot call to the obmd-like Location (a token URL: never logged)."""
        parts = urlsplit(location)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # a relative Location is resolved against the upstream
            scheme, host, port = self.scheme, self.host, self.port
            target = location
        else:
            scheme, host = parts.scheme, parts.hostname
            try:
                port = parts.port or (443 if scheme == "https" else 80)
            except ValueError:
                raise UpstreamMisbehaved(f"upstream {self.url} misbehaved: {what} redirected to a malformed URL") from None
            target = parts.path + ("?" + parts.query if parts.query else "")
        conn = self._conn(scheme, host, port)
        try:
            status, _, data = self._send(conn, method, target, raw, False, deadline, cap, what)
        except TimeoutError:
            raise UpstreamUnreachable(
                f"the power endpoint of {self.url} gave no complete answer within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise UpstreamUnreachable(f"the power endpoint of {self.url} is unreachable: {failure_reason(exc)}") from None
        finally:
            conn.close()
        if status >= 300 and not data.strip():
            raise OBMError(f"power endpoint answered HTTP {status}", status=status)
        return status, data

    # -- the calls rhaas uses --------------------------------------------------------------------
    def free_nodes(self) -> list[str]:
        """Names of the upstream's free nodes; names rhaas cannot store are left out (see `refused`)."""
        return self.call("list_nodes", is_free="free")

    def all_nodes(self) -> list[str]:
        return self.call("list_nodes", is_free="all")

    def project_nodes(self, project: str) -> list[str]:
        return sorted(self.call("project_nodes", project=project))

    def show_node(self, node: str) -> dict:
        """The node object (name, project, nics, metadata), checked, with metadata decoded."""
        doc = self.call("show_node", node=node)
        doc["metadata"] = decode_metadata(doc["metadata"])
        return doc

    def connect_node(self, project: str, node: str) -> None:
        self.call("project_connect_node", {"node": node}, project=project)

    def detach_node(self, project: str, node: str) -> None:
        self.call("project_detach_node", {"node": node}, project=project)

    def set_obm(self, node: str, enabled: bool) -> None:
        try:
            self.call("node_set_obm", {"enabled": bool(enabled)}, node=node)
        except HTTPError as exc:
            if exc.status in (404, 405):
                return  # HIL 0.3 and older: no OBM switch
            raise

    def power(self, node: str, op: str):
        if op == "cycle":
            return self.call("node_power_cycle", {"force": True}, node=node)
        if op == "on":
            return self.call("node_power_on", node=node)
        if op == "off":
            return self.call("node_power_off", node=node)
        if op == "status":
            return self.call("node_power_status", node=node)["power_status"]
        raise UsageError(f"unknown power operation {op!r}")

    def set_bootdev(self, node: str, dev: str) -> None:
        self.call("node_set_bootdev", {"bootdev": dev}, node=node)

    def connect_network(self, node: str, nic: str, network: str, channel: str | None = None) -> str:
        body = {"network": network}
        if channel:
            body["channel"] = channel
        return self.call("node_connect_network", body, node=node, nic=nic)["status_id"]

    def detach_network(self, node: str, nic: str, network: str) -> str:
        return self.call("node_detach_network", {"network": network}, node=node, nic=nic)["status_id"]

    def wait_action(self, status_id: str, timeout: float = 120.0, interval: float = 0.2) -> str:
        """Poll a networking action to DONE/ERROR; a vanished id means 'finished, unknown'."""
        deadline = time.monotonic() + timeout
        delay = interval
        while True:
            try:
                doc = self.call("show_networking_action", status_id=status_id)
            except APIError as exc:
                if exc.status == 404:
                    return "UNKNOWN"
                raise
            if doc["status"] in ("DONE", "ERROR"):
                return doc["status"]
            if time.monotonic() > deadline:
                return "PENDING"
            time.sleep(delay)
            delay = min(delay * 2, 2.0)  # poll sparingly: each call costs a real HIL ~0.4 s
