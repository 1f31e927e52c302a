"""A client for HIL's v0 REST API (a real HIL, or another `rhaas serve`).

It follows the quirks in shared/hil-api.md: JSON bodies sent raw, Basic credentials sent up
front (HIL's 401 has no challenge), status codes trusted over Content-Type, empty 200 bodies
meaning "done", double-encoded metadata, 307 redirects for power calls re-sent with the same
method and body (and the Location never logged), and every call bounded in time.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from urllib.parse import urlencode, urlsplit

from rhaas import protocol
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
    base = parts.path.rstrip("/")
    if base.endswith("/v0"):
        base = base[:-3]
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), base


def decode_metadata(meta: dict) -> dict:
    out = {}
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # a non-HIL server sent it raw; keep the string
        out[key] = value
    return out


class HILClient:
    def __init__(self, url: str, user: str | None, password: str | None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.scheme, self.host, self.port, self.base = parse_upstream_url(url)
        self.user = user
        self.timeout = timeout
        self._auth = None
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self._auth = f"Basic {token}"
        self._local = threading.local()

    # -- transport --------------------------------------------------------------------------
    def _conn(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        return cls(host, port, timeout=self.timeout)

    def _pooled(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._conn(self.scheme, self.host, self.port)
        return conn

    def _send(self, conn, method: str, path: str, body: bytes | None, auth: bool):
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if auth and self._auth:
            headers["Authorization"] = self._auth
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheader("Location"), data

    def _request(self, method: str, path: str, body: bytes | None):
        deadline = time.monotonic() + self.timeout
        for attempt in (1, 2):
            conn = self._pooled()
            try:
                return self._send(conn, method, self.base + path, body, auth=True)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # a kept-alive connection the server closed: retry once on a fresh one
                conn.close()
                self._local.conn = None
                if attempt == 2 or time.monotonic() > deadline:
                    raise UpstreamUnreachable(f"upstream {self.url} dropped the connection: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                raise UpstreamUnreachable(f"upstream {self.url} unreachable: {_why(exc)}") from None
        raise AssertionError("unreachable")

    # -- calls --------------------------------------------------------------------------------
    def call(self, name: str, body: dict | None = None, query: dict | None = None, **path_args):
        route = protocol.BY_NAME[name]
        path = route.url_path(**path_args)
        if query:
            path += "?" + urlencode(query)
        raw = json.dumps(body).encode() if body is not None else None
        status, location, data = self._request(route.method, path, raw)
        if status == 307 and route.redirectable and location:
            status, data = self._follow(route.method, location, raw)
        if 200 <= status < 300:
            if not data.strip():
                return None
            try:
                return json.loads(data)
            except ValueError:
                raise HTTPError(f"upstream answered {status} with a body that is not JSON", status=status) from None
        err = error_from_body(status, data)
        if is_auth_failure(err):
            raise AuthorizationError(
                f"upstream {self.url} rejected the credentials of user {self.user!r}", status=401
            ) from None
        raise err

    def _follow(self, method: str, location: str, raw: bytes | None):
        """Re-send a power/boot call to the obmd-like Location (a token URL: never logged)."""
        parts = urlsplit(location)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # a relative Location is resolved against the upstream
            scheme, host, port = self.scheme, self.host, self.port
            target = location
        else:
            scheme, host = parts.scheme, parts.hostname
            port = parts.port or (443 if scheme == "https" else 80)
            target = parts.path + ("?" + parts.query if parts.query else "")
        conn = self._conn(scheme, host, port)
        try:
            status, _, data = self._send(conn, method, target, raw, auth=False)
        except (OSError, http.client.HTTPException) as exc:
            raise UpstreamUnreachable(f"the power endpoint of {self.url} is unreachable: {_why(exc)}") from None
        finally:
            conn.close()
        if status >= 300 and not data.strip():
            raise OBMError(f"power endpoint answered HTTP {status}", status=status)
        return status, data

    # -- the calls rhaas uses --------------------------------------------------------------------
    def free_nodes(self) -> list[str]:
        return self.call("list_nodes", is_free="free")

    def all_nodes(self) -> list[str]:
        return self.call("list_nodes", is_free="all")

    def project_nodes(self, project: str) -> list[str]:
        return sorted(self.call("project_nodes", project=project))

    def show_node(self, node: str) -> dict:
        doc = self.call("show_node", node=node)
        doc["metadata"] = decode_metadata(doc.get("metadata") or {})
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
            doc = self.call("node_power_status", node=node)
            return (doc or {}).get("power_status")
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
            if doc.get("status") in ("DONE", "ERROR"):
                return doc["status"]
            if time.monotonic() > deadline:
                return "PENDING"
            time.sleep(delay)
            delay = min(delay * 2, 2.0)  # poll sparingly: each call costs a real HIL ~0.4 s

    # -- the rhaas.kexec extension (only another `rhaas serve` offers it) --------------------------
    def active_extensions(self) -> list[str]:
        doc = self.call("list_active_extensions")
        return [e for e in doc if isinstance(e, str)] if isinstance(doc, list) else []

    def blob_held(self, sha256: str) -> bool:
        try:
            self.call("rhaas_blob_show", sha256=sha256)
        except APIError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def blob_upload(self, sha256: str, path: str) -> int:
        """Stream a local file as blob ``sha256`` (raw body, never read whole); returns its size."""
        import os

        route = protocol.BY_NAME["rhaas_blob_put"]
        size = os.path.getsize(path)
        headers = {"Accept": "application/json", "Content-Type": "application/octet-stream",
                   "Content-Length": str(size)}
        if self._auth:
            headers["Authorization"] = self._auth
        conn = self._conn(self.scheme, self.host, self.port)
        try:
            with open(path, "rb") as fh:
                conn.request(route.method, self.base + route.url_path(sha256=sha256), body=fh, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise UpstreamUnreachable(f"upstream {self.url}: blob upload failed: {_why(exc)}") from None
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            raise error_from_body(resp.status, data)
        return size

    def kexec_start(self, nodes: list[str], kernel: str, initrd: str, append: str, ssh_keys: list[str],
                    timeout: float | None = None, fallback: bool = True, blob_url: str | None = None) -> str:
        body: dict = {"nodes": list(nodes), "kernel": kernel, "initrd": initrd, "append": append,
                      "ssh_keys": list(ssh_keys), "fallback": bool(fallback)}
        if timeout is not None:
            body["timeout"] = float(timeout)
        if blob_url:
            body["blob_url"] = blob_url
        doc = self.call("rhaas_kexec", body)
        action = doc.get("action_id") if isinstance(doc, dict) else None
        if not isinstance(action, str) or not protocol.valid_name(action):
            raise HTTPError("upstream answered a kexec without a valid action_id", status=502)
        return action

    def kexec_status(self, action_id: str) -> dict:
        doc = self.call("rhaas_kexec_status", action_id=action_id)
        if not isinstance(doc, dict) or doc.get("status") not in ("PENDING", "DONE", "ERROR"):
            raise HTTPError("upstream answered a kexec status that is not one", status=502)
        return doc


def _why(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout) or isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "host name not found"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
