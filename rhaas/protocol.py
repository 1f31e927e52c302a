"""HIL's v0 REST API, declared once for both the client and ``rhaas serve``.

Each route names one API call: its HTTP method, its path template under ``/v0`` and the
exact argument schema of its JSON body (or query string for GETs). The client builds
requests from these declarations and the server validates and dispatches with them, so the
two sides cannot drift. rhaas's own extension (``rhaas.kexec``) is declared the same way,
under ``/v0/rhaas/``; its blob upload is the one route with a raw body (``raw_body``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from rhaas.errors import ValidationError

PREFIX = "/v0"
REQUIRED = True
OPTIONAL = False


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    path: str  # e.g. "/node/<node>/nic/<nic>/connect_network"
    schema: dict = field(default_factory=dict)  # key -> (type or tuple of types, required)
    query: tuple = ()  # allowed query-string keys (GET only)
    redirectable: bool = False  # power/boot calls may answer 307 to an obmd-like endpoint
    raw_body: bool = False  # the body is raw bytes (a blob upload), streamed, never parsed as JSON

    @property
    def params(self) -> list[str]:
        return re.findall(r"<(\w+)>", self.path)

    def url_path(self, **args: str) -> str:
        def sub(m: re.Match) -> str:
            return quote(str(args[m.group(1)]), safe="")

        return PREFIX + re.sub(r"<(\w+)>", sub, self.path)

    def check_body(self, body: dict, path_args: dict) -> dict:
        """HIL's strict argument check: exact keys, right types, nothing twice."""
        if not isinstance(body, dict):
            raise ValidationError("Request arguments are not valid for this request")
        for key, value in body.items():
            if key not in self.schema or key in path_args:
                raise ValidationError("Request arguments are not valid for this request")
            types, _ = self.schema[key]
            if not _has_type(value, types):
                raise ValidationError("Request arguments are not valid for this request")
        for key, (_, required) in self.schema.items():
            if required and key not in body:
                raise ValidationError("Request arguments are not valid for this request")
        return body


def _has_type(value, types) -> bool:
    if types is object:
        return True
    if not isinstance(types, tuple):
        types = (types,)
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


S = str
R = REQUIRED
OPT = OPTIONAL

ROUTES: list[Route] = [
    # projects
    Route("list_projects", "GET", "/projects"),
    Route("project_create", "PUT", "/project/<project>"),
    Route("project_delete", "DELETE", "/project/<project>"),
    Route("project_nodes", "GET", "/project/<project>/nodes"),
    Route("project_networks", "GET", "/project/<project>/networks"),
    Route("project_connect_node", "POST", "/project/<project>/connect_node", {"node": (S, R)}),
    Route("project_detach_node", "POST", "/project/<project>/detach_node", {"node": (S, R)}),
    # nodes
    Route("list_nodes", "GET", "/nodes/<is_free>"),
    Route("show_node", "GET", "/node/<node>"),
    Route("node_register", "PUT", "/node/<node>", {"obmd": (dict, OPT), "metadata": (dict, OPT)}),
    Route("node_delete", "DELETE", "/node/<node>"),
    Route("node_register_nic", "PUT", "/node/<node>/nic/<nic>", {"macaddr": (S, R)}),
    Route("node_delete_nic", "DELETE", "/node/<node>/nic/<nic>"),
    Route("node_set_metadata", "PUT", "/node/<node>/metadata/<label>", {"value": (object, R)}),
    Route("node_delete_metadata", "DELETE", "/node/<node>/metadata/<label>"),
    # networking
    Route(
        "node_connect_network",
        "POST",
        "/node/<node>/nic/<nic>/connect_network",
        {"network": (S, R), "channel": (S, OPT)},
    ),
    Route(
        "node_detach_network",
        "POST",
        "/node/<node>/nic/<nic>/detach_network",
        {"network": (S, R)},
    ),
    Route("show_networking_action", "GET", "/networking_action/<status_id>"),
    Route(
        "network_create",
        "PUT",
        "/network/<network>",
        {"owner": (S, R), "access": (S, R), "net_id": (S, R)},
    ),
    Route("network_delete", "DELETE", "/network/<network>"),
    Route("show_network", "GET", "/network/<network>"),
    Route("list_networks", "GET", "/networks"),
    Route("list_network_attachments", "GET", "/network/<network>/attachments", query=("project",)),
    Route("network_grant_project_access", "PUT", "/network/<network>/access/<project>"),
    Route("network_revoke_project_access", "DELETE", "/network/<network>/access/<project>"),
    # OBM and power
    Route("node_set_obm", "PUT", "/node/<node>/obm", {"enabled": (bool, R)}),
    Route("node_power_cycle", "POST", "/node/<node>/power_cycle", {"force": (bool, OPT)}, redirectable=True),
    Route("node_power_on", "POST", "/node/<node>/power_on", redirectable=True),
    Route("node_power_off", "POST", "/node/<node>/power_off", redirectable=True),
    Route("node_power_status", "GET", "/node/<node>/power_status", redirectable=True),
    Route("node_set_bootdev", "PUT", "/node/<node>/boot_device", {"bootdev": (S, R)}, redirectable=True),
    # users
    Route("list_users", "GET", "/auth/basic/users"),
    Route("user_create", "PUT", "/auth/basic/user/<user>", {"password": (S, R), "is_admin": (bool, OPT)}),
    Route("user_delete", "DELETE", "/auth/basic/user/<user>"),
    Route("user_set_admin", "PATCH", "/auth/basic/user/<user>", {"is_admin": (bool, R)}),
    Route("user_add_project", "POST", "/auth/basic/user/<user>/add_project", {"project": (S, R)}),
    Route("user_remove_project", "POST", "/auth/basic/user/<user>/remove_project", {"project": (S, R)}),
    Route("list_active_extensions", "GET", "/active_extensions"),
]

# rhaas's own extension "rhaas.kexec" (offered in list_active_extensions by `rhaas serve`):
# blobs are content-addressed by sha256 and uploaded once per level; a kexec is one batch
# call answered 202 with an action id, polled like a networking action. A blob goes up in parts
# of at most BLOB_PART bytes (each one bounded request, so serve's body limit stays small for
# everything else), then a commit names its size and the server checks the sha256 of the whole.
KEXEC_EXTENSION = "rhaas.kexec"
BLOB_PART = 8 << 20
ROUTES += [
    Route("rhaas_blob_show", "GET", "/rhaas/blob/<sha256>"),
    Route("rhaas_blob_part", "PUT", "/rhaas/blob/<sha256>/part/<offset>", raw_body=True),
    Route("rhaas_blob_commit", "POST", "/rhaas/blob/<sha256>", {"size": (int, R)}),
    Route(
        "rhaas_kexec",
        "POST",
        "/rhaas/kexec",
        {
            "nodes": (list, R),
            "kernel": (S, R),
            "initrd": (S, R),
            "append": (S, R),
            "ssh_keys": (list, R),
            "blob_url": (S, OPT),
            "timeout": ((int, float), OPT),
            "fallback": (bool, OPT),
        },
    ),
    Route("rhaas_kexec_status", "GET", "/rhaas/kexec/<action_id>"),
]

# rhaas's own extension "rhaas.batch" (offered in list_active_extensions by `rhaas serve`): many
# nodes assigned to a project in one call and one store write, optionally for a limited time.
# Exactly one of "count" (that many free nodes) or "nodes" (these names, each refused or taken);
# the answer is {"nodes": [taken], "refused": {name: why}, "until": epoch|null, "shown": {name: node}}.
BATCH_EXTENSION = "rhaas.batch"
ROUTES += [
    Route(
        "rhaas_connect_nodes",
        "POST",
        "/rhaas/project/<project>/connect_nodes",
        {"count": (int, OPT), "nodes": (list, OPT), "for_seconds": ((int, float), OPT)},
    ),
]

BY_NAME: dict[str, Route] = {r.name: r for r in ROUTES}

BOOT_DEVICES = ("pxe", "disk", "none")
DEFAULT_CHANNEL = "vlan/native"


def _compile(route: Route) -> re.Pattern:
    pattern = re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", re.escape(route.path).replace(r"\<", "<").replace(r"\>", ">"))
    return re.compile("^" + pattern + "$")


_MATCHERS = [(r, _compile(r)) for r in ROUTES]


def match(method: str, path: str) -> tuple[Route, dict] | tuple[None, str]:
    """Find the route for a request path (without query). Returns (route, args) or (None, why)."""
    if not path.startswith(PREFIX + "/"):
        return None, "not-found"
    rel = path[len(PREFIX):]
    seen_path = False
    for route, rx in _MATCHERS:
        m = rx.match(rel)
        if not m:
            continue
        seen_path = True
        if route.method == method:
            return route, {k: unquote(v) for k, v in m.groupdict().items()}
    # the fixed /nodes/free route may also be matched by other list forms; the first match wins
    return None, ("method" if seen_path else "not-found")


NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name or "")) and name not in (".", "..")
