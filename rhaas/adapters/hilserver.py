"""`rhaas serve`: the HIL v0 REST API over HTTP, on the standard library's threaded server.

This module owns only HTTP: it matches the route (rhaas.protocol), parses the raw body as JSON
whatever the Content-Type, validates the arguments *before* authenticating (as HIL does),
authenticates HTTP Basic against the inventory's users, and maps errors to HIL's
``{"type","msg"}`` bodies and statuses. What a call does is rhaas.core.service's business.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from rhaas import protocol
from rhaas.core.service import Caller, Service
from rhaas.core.users import verify_password
from rhaas.errors import APIError, AuthorizationError, NotFoundError, ServerError, ValidationError

AUTH_FAILED = "Authentication failed. Authentication is required to use this service."
MAX_BODY = 1 << 20

READ_ROUTES = {
    "list_projects",
    "project_nodes",
    "project_networks",
    "list_nodes",
    "show_node",
    "show_network",
    "list_networks",
    "list_network_attachments",
    "show_networking_action",
    "list_users",
    "list_active_extensions",
    "rhaas_blob_show",
    "rhaas_kexec_status",
}
POWER_OPS = {"node_power_cycle": "cycle", "node_power_on": "on", "node_power_off": "off"}
ACCEPTED = {"node_connect_network", "node_detach_network", "rhaas_kexec"}


def authenticate(view, header: str | None) -> Caller:
    if not header or not header.startswith("Basic "):
        raise AuthorizationError(AUTH_FAILED)
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise AuthorizationError(AUTH_FAILED) from None
    doc = view.get("users", user)
    if doc is None:
        raise NotFoundError(f"User {user} does not exist.")
    if not verify_password(user, password, doc.get("password_hash")):
        raise AuthorizationError(AUTH_FAILED)
    return Caller(user, bool(doc.get("is_admin")), doc.get("projects", []))


def dispatch(service: Service, route: protocol.Route, caller: Caller, view, args: dict, body: dict, query: dict):
    name = route.name
    if name in READ_ROUTES:
        return getattr(service, name)(caller, view, **args, **query)
    if name in POWER_OPS:
        return service.power(caller, view, args["node"], POWER_OPS[name])
    if name == "node_power_status":
        return {"power_status": service.power(caller, view, args["node"], "status")}
    if name == "node_set_bootdev":
        return service.set_bootdev(caller, view, args["node"], body["bootdev"])
    return getattr(service, name)(caller, **args, **body)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave at once: no 40 ms delayed-ACK stall
    server_version = "rhaas"
    sys_version = ""

    def log_message(self, fmt, *args):  # access log on stderr, never credentials
        if self.server.verbose:
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    def _reply(self, status: int, doc=None):
        payload = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(status)
        if doc is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)

    def _handle(self):
        try:
            status, doc = self._process()
        except APIError as exc:
            status, doc = exc.status, exc.body()
        except Exception as exc:  # noqa: BLE001 - the API answers every failure in JSON
            status, doc = 500, ServerError(f"internal error: {type(exc).__name__}: {exc}").body()
        self._reply(status, doc)

    def _process(self):
        parts = urlsplit(self.path)
        route, args = protocol.match(self.command, parts.path)
        if route is not None and route.raw_body:  # a blob upload: streamed, see rhaas.adapters.rawbody
            from rhaas.adapters.rawbody import receive

            return receive(self, route, args, authenticate)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            raise ValidationError("Request body too large")
        raw = self.rfile.read(length) if length else b""
        if route is None:
            if args == "method":
                raise APIError("The method is not allowed for the requested URL.", status=405)
            raise NotFoundError("The requested URL was not found on the server.")
        query: dict = {}
        if route.method == "GET":
            if raw.strip():
                raise ValidationError("GET request made with a non-empty request body")
            for key, values in parse_qs(parts.query, keep_blank_values=True).items():
                if key not in route.query or len(values) != 1:
                    raise ValidationError("Request arguments are not valid for this request")
                if values[0] == "":
                    raise ValidationError("Empty parameter specified")
                query[key] = values[0]
            body = {}
        else:
            body = {}
            if raw.strip():
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    raise ValidationError("The request body is not valid JSON") from None
            route.check_body(body, args)
        for value in args.values():
            if route.name != "list_nodes" and not value:
                raise ValidationError("Request arguments are not valid for this request")
        view = self.server.store.snapshot()
        caller = authenticate(view, self.headers.get("Authorization"))
        result = dispatch(self.server.service, route, caller, view, args, body, query)
        return (202 if route.name in ACCEPTED else 200), result

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _handle


class HILServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, store, service: Service, verbose: bool = False):
        super().__init__(address, Handler)
        self.store = store
        self.service = service
        self.verbose = verbose
