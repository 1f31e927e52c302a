"""What each HIL v0 call does to this instance's inventory (the policy behind `rhaas serve`).

The HTTP side (rhaas.adapters.hilserver) parses, validates and authenticates; this module
decides. Messages and the order of checks follow real HIL (shared/hil-api.md), so HIL's own
clients and a nested rhaas see the same answers they would get from HIL.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

from rhaas import protocol
from rhaas.core.users import hash_password
from rhaas.errors import (
    APIError,
    AuthorizationError,
    BadArgumentError,
    BlockedError,
    DuplicateError,
    IllegalStateError,
    NotFoundError,
    OBMError,
    ProjectMismatchError,
    RhaasError,
    ValidationError,
)
from rhaas.model import new_node

ADMIN_ONLY = "This operation is administrator-only."
RETURNING = "Node is returning to the standby image; it is free again once back."
# what list_active_extensions answers; each rhaas extension adds its name here
ACTIVE_EXTENSIONS: list[str] = ["rhaas.auth.basic", "rhaas.network.vlan_pool", "rhaas.power",
                                protocol.BATCH_EXTENSION, protocol.KEXEC_EXTENSION]
NO_PROJECT_ACCESS = "You do not have access to the required project."


class Caller:
    def __init__(self, name: str, is_admin: bool, projects):
        self.name = name
        self.is_admin = is_admin
        self.projects = set(projects or ())

    def require_admin(self):
        if not self.is_admin:
            raise AuthorizationError(ADMIN_ONLY)

    def require_project(self, project: str | None):
        if self.is_admin:
            return
        if project is None:
            raise AuthorizationError(ADMIN_ONLY)
        if project not in self.projects:
            raise AuthorizationError(NO_PROJECT_ACCESS)


def encode_metadata(doc: dict) -> dict:
    """HIL returns every metadata value as the JSON text of the value (double-encoded)."""
    meta = dict(doc.get("metadata") or {})
    if doc.get("ssh"):
        meta["rhaas.ssh"] = doc["ssh"]
    if doc.get("ssh_host_key"):
        meta["rhaas.ssh_host_key"] = doc["ssh_host_key"]
    if doc.get("image"):
        meta["rhaas.image"] = doc["image"]
    if doc.get("assign_until"):  # the project's lease ends then (epoch seconds), see rhaas.batch
        meta["rhaas.lease_until"] = doc["assign_until"]
    return {k: json.dumps(v) for k, v in meta.items()}


class Service:
    """One instance's answers to the HIL API. `upstream` is a HILClient for a derived one.

    Every call returns as soon as the inventory says so: what needs the upstream (networking
    actions, network create/delete) runs outside the store's lock (rhaas.core.net_actions), and
    the standby return of a detached node runs in the background (``on_detach``); the node is
    held back from the free list (``returning``) until it is back.
    """

    def __init__(self, store, settings: dict, upstream=None, power_backend=None, on_detach=None):
        from rhaas.core.net_actions import NetActions

        self.store = store
        self.settings = settings
        self.upstream = upstream
        self.project_upstream = settings.get("project")
        self._power_backend = power_backend  # callable(node_doc) -> backend, for tests/lab
        self.on_detach = on_detach  # callable(node_name): the background return to the standby image
        self._power_lock = threading.Lock()
        self.net = NetActions(store, upstream, self.project_upstream)

    # -- helpers ------------------------------------------------------------------------------
    def _node(self, view, name: str) -> dict:
        doc = view.node(name)
        if doc is None:
            raise NotFoundError(f"Node {name} does not exist.")
        return doc

    def _project(self, view, name: str) -> dict:
        doc = view.get("projects", name)
        if doc is None:
            raise NotFoundError(f"Project {name} does not exist.")
        return doc

    def _network(self, view, name: str) -> dict:
        doc = view.get("networks", name)
        if doc is None or doc.get("pending"):  # being created or deleted upstream: not usable
            raise NotFoundError(f"Network {name} does not exist.")
        return doc

    def _nic(self, node: dict, label: str) -> dict:
        for nic in node.get("nics", []):
            if nic["label"] == label:
                return nic
        raise NotFoundError(f"Nic {label} on Node {node['name']} does not exist.")

    @staticmethod
    def _pending(view, node: str, nic: str | None = None) -> bool:
        return any(
            a["node"] == node and a["status"] == "PENDING" and (nic is None or a["nic"] == nic)
            for a in view.data["actions"].values()
        )

    # -- projects ------------------------------------------------------------------------------
    def list_projects(self, caller, view):
        caller.require_admin()
        return sorted(p["name"] for p in view.all("projects"))

    def project_create(self, caller, project):
        caller.require_admin()
        with self.store.transaction(caller.name) as tx:
            if tx.get("projects", project):
                raise DuplicateError(f"Project {project} already exists.")
            tx.put("projects", {"name": project})
            tx.event("project-create", outcome="ok", project=project)

    def project_delete(self, caller, project):
        caller.require_admin()
        with self.store.transaction(caller.name) as tx:
            self._project(tx, project)
            if any(n.get("project") == project for n in tx.data["nodes"].values()):
                raise BlockedError("Project has nodes still")
            nets = tx.all("networks")
            if any(n["owner"] == project for n in nets):
                raise BlockedError("Project still has networks")
            if any(project in (n.get("access") or []) for n in nets):
                raise BlockedError("Project can still access networks")
            tx.remove("projects", project)
            tx.event("project-delete", outcome="ok", project=project)

    def project_nodes(self, caller, view, project):
        self._project(view, project)
        caller.require_project(project)
        return [n["name"] for n in view.data["nodes"].values() if n.get("project") == project]

    def project_networks(self, caller, view, project):
        self._project(view, project)
        caller.require_project(project)
        return sorted(n["name"] for n in view.all("networks")
                      if project in (n.get("access") or []) and not n.get("pending"))

    def project_connect_node(self, caller, project, node):
        """Assign at once: the tenant's keys are recorded, and ride in the next kexec of the node."""
        from rhaas.core.lease_reaper import assigned

        with self.store.transaction(caller.name) as tx:
            proj = self._project(tx, project)
            doc = self._node(tx, node)
            caller.require_project(project)
            if doc.get("project"):
                raise BlockedError("Node is already owned by a project.")
            if doc.get("returning"):
                raise BlockedError(RETURNING)
            doc = assigned(doc, project, self._project_keys(tx, project), proj.get("lease_for"))
            tx.put_node(doc)
            tx.event("assign", node, "ok", project=project, by=caller.name, until=doc.get("assign_until"))

    def rhaas_connect_nodes(self, caller, project, count=None, nodes=None, for_seconds=None):
        """The rhaas.batch extension: many nodes in one call and one write (rhaas.core.lease_reaper)."""
        from rhaas.core.lease_reaper import connect_nodes

        return connect_nodes(self, caller, project, count=count, nodes=nodes, for_seconds=for_seconds)

    @staticmethod
    def _project_keys(view, project) -> list[str]:
        keys = []
        for user in view.all("users"):
            if project in user.get("projects", []):
                keys.extend(user.get("ssh_keys", []))
        return keys

    def project_detach_node(self, caller, project, node):
        with self.store.transaction(caller.name) as tx:
            self._project(tx, project)
            doc = dict(self._node(tx, node))
            caller.require_project(project)
            if doc.get("project") != project:
                raise NotFoundError("Node not in project")
            if doc.get("obm_enabled"):
                raise BlockedError("Node's obm is enabled.")
            if any(nic.get("networks") for nic in doc.get("nics", [])):
                raise BlockedError("Node attached to a network")
            if self._pending(tx, node):
                raise BlockedError("Node has pending network actions")
            doc = self.released(doc)
            tx.put_node(doc)
            tx.event("unassign", node, "ok", project=project, by=caller.name)
        if doc.get("returning"):
            self.on_detach(node)

    def released(self, doc: dict) -> dict:
        """The node document once its project lets go: held back while it returns to the standby."""
        doc = dict(doc, project=None, tenant_ssh_keys=[], assign_until=None)
        if self.on_detach is not None and doc.get("ssh"):
            doc["returning"] = {"since": time.time()}
        return doc

    # -- nodes ------------------------------------------------------------------------------------
    def list_nodes(self, caller, view, is_free):
        nodes = view.data["nodes"].values()
        if is_free == "free":
            return sorted(n["name"] for n in nodes if not n.get("project") and not n.get("returning"))
        return sorted(n["name"] for n in nodes)

    def show_node(self, caller, view, node):
        doc = self._node(view, node)
        caller.require_project(doc.get("project")) if doc.get("project") else None
        return self.shown(doc)

    @staticmethod
    def shown(doc: dict) -> dict:
        """A node as show_node answers it (also inside a rhaas.batch answer)."""
        nics = [
            {"label": nic["label"], "macaddr": nic.get("macaddr", ""), "networks": dict(nic.get("networks") or {})}
            for nic in doc.get("nics", [])
        ]
        return {"metadata": encode_metadata(doc), "name": doc["name"], "nics": nics, "project": doc.get("project")}

    def node_register(self, caller, node, obmd=None, metadata=None):
        caller.require_admin()
        if obmd is not None:
            uri = obmd.get("uri")
            if set(obmd) != {"uri", "admin_token"} or not isinstance(uri, str) or not isinstance(
                obmd.get("admin_token"), str
            ) or not uri.startswith(("http://", "https://")):
                raise ValidationError("Request arguments are not valid for this request")
        with self.store.transaction(caller.name) as tx:
            if tx.node(node):
                raise DuplicateError(f"Node {node} already exists.")
            tx.put_node(new_node(node, "registered", metadata=dict(metadata or {})))
            tx.event("register", node, "ok", by=caller.name)

    def node_delete(self, caller, node):
        caller.require_admin()
        with self.store.transaction(caller.name) as tx:
            doc = self._node(tx, node)
            if doc.get("project"):
                raise BlockedError(
                    f"Node '{node}' is part of project '{doc['project']}'; remove from project before deleting"
                )
            if doc.get("nics"):
                raise BlockedError(f"Node '{node}' has nics; remove them before deleting '{node}'.")
            tx.remove_nodes([node])
            tx.event("unregister", node, "ok", by=caller.name)

    def node_register_nic(self, caller, node, nic, macaddr):
        caller.require_admin()
        with self.store.transaction(caller.name) as tx:
            doc = dict(self._node(tx, node))
            if any(n["label"] == nic for n in doc.get("nics", [])):
                raise DuplicateError(f"Nic {nic} on Node {node} already exists")
            doc["nics"] = list(doc.get("nics", [])) + [{"label": nic, "macaddr": macaddr, "networks": {}}]
            tx.put_node(doc)

    def node_delete_nic(self, caller, node, nic):
        caller.require_admin()
        with self.store.transaction(caller.name) as tx:
            doc = dict(self._node(tx, node))
            self._nic(doc, nic)
            if doc.get("project"):
                raise BlockedError("Nic is on a node that belongs to a project. Remove node from project and try again")
            doc["nics"] = [n for n in doc["nics"] if n["label"] != nic]
            tx.put_node(doc)

    def node_set_metadata(self, caller, node, label, value):
        caller.require_admin()
        with self.store.transaction(caller.name) as tx:
            doc = dict(self._node(tx, node))
            doc["metadata"] = dict(doc.get("metadata") or {}, **{label: value})
            tx.put_node(doc)

    def node_delete_metadata(self, caller, node, label):
        caller.require_admin()
        with self.store.transaction(caller.name) as tx:
            doc = dict(self._node(tx, node))
            meta = dict(doc.get("metadata") or {})
            if label not in meta:
                raise NotFoundError(f"Metadata {label} on Node {node} does not exist.")
            del meta[label]
            doc["metadata"] = meta
            tx.put_node(doc)

    # -- OBM and power ------------------------------------------------------------------------------
    def node_set_obm(self, caller, node, enabled):
        with self.store.transaction(caller.name) as tx:
            doc = dict(self._node(tx, node))
            caller.require_project(doc.get("project"))
            if bool(doc.get("obm_enabled")) != enabled:
                doc["obm_enabled"] = enabled
                tx.put_node(doc)
                tx.event("obm-" + ("enable" if enabled else "disable"), node, "ok", by=caller.name)

    def _power_target(self, caller, view, node) -> dict:
        doc = self._node(view, node)
        caller.require_project(doc.get("project"))
        if not doc.get("obm_enabled"):
            raise BlockedError("OBM is not enabled")
        return doc

    def backend(self, doc: dict):
        if self._power_backend:
            return self._power_backend(doc)
        from rhaas.core.power import backend_for

        return backend_for(doc, self.settings, self.store)

    def power(self, caller, view, node, op):
        doc = self._power_target(caller, view, node)
        try:
            result = self.backend(doc).power(op)
        except APIError as exc:
            raise OBMError(f"power {op} of {node} failed: {exc.msg or exc}") from None
        except RhaasError as exc:
            raise OBMError(f"power {op} of {node} failed: {exc}") from None
        with self.store.transaction(caller.name) as tx:
            tx.event("power-" + op, node, "ok", by=caller.name)
        return result

    def set_bootdev(self, caller, view, node, bootdev):
        doc = self._power_target(caller, view, node)
        if bootdev not in protocol.BOOT_DEVICES:
            raise BadArgumentError(f"Unknown boot device {bootdev!r}; use one of pxe, disk, none")
        try:
            self.backend(doc).set_bootdev(bootdev)
        except APIError as exc:
            raise OBMError(f"boot device of {node} failed: {exc.msg or exc}") from None
        except RhaasError as exc:
            raise OBMError(f"boot device of {node} failed: {exc}") from None
        with self.store.transaction(caller.name) as tx:
            cur = tx.node(node)
            if cur is not None:
                tx.put_node(dict(cur, bootdev=bootdev))
            tx.event("bootdev", node, "ok", bootdev=bootdev, by=caller.name)

    # -- networks ------------------------------------------------------------------------------------
    def network_create(self, caller, network, owner, access, net_id):
        with self.store.transaction(caller.name) as tx:
            if tx.get("networks", network):
                raise DuplicateError(f"Network {network} already exists.")
            if owner == "admin":
                caller.require_admin()
                if access:
                    self._project(tx, access)
                used = {n["net_id"] for n in tx.all("networks")}
                if net_id:
                    if not net_id.isdigit() or not 1 <= int(net_id) <= 4096:
                        raise BadArgumentError("Invalid net_id")
                    if net_id in used:
                        raise DuplicateError("Network ID is not available. Please choose a different ID.")
            else:
                self._project(tx, owner)
                caller.require_project(owner)
                if access != owner:
                    raise BadArgumentError("Project-owned networks must be accessible by the owner.")
                if net_id:
                    raise BadArgumentError("Project-owned networks must use network ID allocation")
                used = {n["net_id"] for n in tx.all("networks")}
            if not net_id:
                net_id = next(str(i) for i in range(1000, 5000) if str(i) not in used)
            doc = {
                "name": network,
                "owner": owner,
                "access": [access] if access else None,
                "net_id": net_id,
                "channels": [protocol.DEFAULT_CHANNEL, f"vlan/{net_id}"],
            }
            if self.upstream is not None:
                # a derived instance's networks are the upstream's: the intent is recorded here,
                # the upstream asked outside the lock, and the outcome applied after
                doc["pending"] = "create"
            tx.put("networks", doc)
            if self.upstream is None:
                tx.event("network-create", outcome="ok", network=network, by=caller.name)
        if self.upstream is not None:
            self.net.network_upstream(network, "create", caller.name)

    def network_delete(self, caller, network):
        with self.store.transaction(caller.name) as tx:
            net = self._network(tx, network)
            caller.require_project(None if net["owner"] == "admin" else net["owner"])
            if self._connected(tx, network):
                raise BlockedError("Network still connected to nodes")
            if any(a["status"] == "PENDING" and a.get("new_network") == network for a in tx.data["actions"].values()):
                raise BlockedError("There are pending actions on this network")
            if self.upstream is None:
                tx.remove("networks", network)
                tx.event("network-delete", outcome="ok", network=network, by=caller.name)
                return
            tx.put("networks", dict(net, pending="delete"))
        self.net.network_upstream(network, "delete", caller.name)

    @staticmethod
    def _connected(view, network) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for node in view.data["nodes"].values():
            for nic in node.get("nics", []):
                if network in (nic.get("networks") or {}).values():
                    out.setdefault(node["name"], []).append(nic["label"])
        return out

    def show_network(self, caller, view, network):
        net = self._network(view, network)
        access = net.get("access")
        if access is not None and not caller.is_admin and not (caller.projects & set(access)):
            raise AuthorizationError("You do not have access to this network.")
        connected = self._connected(view, network)
        if not caller.is_admin and net["owner"] not in caller.projects:
            connected = {
                n: nics for n, nics in connected.items() if (view.node(n) or {}).get("project") in caller.projects
            }
        return {
            "access": access,
            "channels": net["channels"],
            "connected-nodes": connected,
            "name": net["name"],
            "owner": net["owner"],
        }

    def list_networks(self, caller, view):
        return {
            n["name"]: {"network_id": n["net_id"], "projects": n.get("access")}
            for n in view.all("networks")
            if (caller.is_admin or n.get("access") is None) and not n.get("pending")
        }

    def list_network_attachments(self, caller, view, network, project=None):
        net = self._network(view, network)
        if project is not None:
            if project not in (net.get("access") or []):
                raise AuthorizationError("You do not have access to this network.")
            caller.require_project(project)
        elif not caller.is_admin:
            caller.require_project(None if net["owner"] == "admin" else net["owner"])
        out = {}
        for node in view.data["nodes"].values():
            if project is not None and node.get("project") != project:
                continue
            for nic in node.get("nics", []):
                for channel, name in (nic.get("networks") or {}).items():
                    if name == network:
                        out[node["name"]] = {"channel": channel, "nic": nic["label"], "project": node.get("project")}
        return out

    def network_grant_project_access(self, caller, network, project):
        with self.store.transaction(caller.name) as tx:
            net = dict(self._network(tx, network))
            self._project(tx, project)
            caller.require_project(None if net["owner"] == "admin" else net["owner"])
            access = list(net.get("access") or [])
            if project in access:
                raise BlockedError(f"Network {network} is already in project {project}")
            net["access"] = access + [project]
            tx.put("networks", net)

    def network_revoke_project_access(self, caller, network, project):
        with self.store.transaction(caller.name) as tx:
            net = dict(self._network(tx, network))
            self._project(tx, project)
            if not (caller.is_admin or net["owner"] in caller.projects or project in caller.projects):
                raise AuthorizationError(NO_PROJECT_ACCESS)
            access = list(net.get("access") or [])
            if project not in access:
                raise NotFoundError(f"Network {network} is not in project {project}")
            if project == net["owner"]:
                raise BlockedError("Cannot revoke access from the owner project")
            net["access"] = [p for p in access if p != project]
            tx.put("networks", net)

    def _new_action(self, tx, node, nic, channel, network, status, intent: dict | None = None) -> str:
        # HIL keeps only a NIC's latest action: a new one deletes the earlier record
        for key, act in list(tx.data["actions"].items()):
            if act["node"] == node and act["nic"] == nic:
                tx.table("actions").remove(doc_ids=[int(key)])
        status_id = str(uuid.uuid4())
        tx.table("actions").insert(
            {
                "name": status_id,
                "node": node,
                "nic": nic,
                "type": "modify_port",
                "channel": channel,
                "new_network": network,
                "status": status,
                **(intent or {}),
            }
        )
        return status_id

    def node_connect_network(self, caller, node, nic, network, channel=None):
        with self.store.transaction(caller.name) as tx:
            doc = dict(self._node(tx, node))
            nic_doc = self._nic(doc, nic)
            net = self._network(tx, network)
            if not doc.get("project"):
                raise ProjectMismatchError("Node not in project")
            caller.require_project(doc["project"])
            if self._pending(tx, node, nic):
                raise BlockedError("A networking operation is already active on the nic.")
            if net.get("access") is not None and doc["project"] not in net["access"]:
                raise ProjectMismatchError("Project does not have access to given network.")
            networks = dict(nic_doc.get("networks") or {})
            if network in networks.values():
                raise BlockedError("The network is already attached to the nic.")
            if channel is None:  # only an omitted channel is the default; "" is illegal, as in HIL
                channel = protocol.DEFAULT_CHANNEL
            if channel not in net["channels"]:
                raise BadArgumentError(f"Channel '{channel}', is not legal for this network.")
            if channel in networks:
                raise BlockedError("The channel is already in use on the nic.")
            if self.upstream is not None:
                # PENDING, with the intent: the upstream is asked outside the lock (net_actions)
                up_channel = None if channel == protocol.DEFAULT_CHANNEL else channel
                sid = self._new_action(tx, node, nic, channel, network, "PENDING",
                                       {"op": "connect", "up_node": doc.get("upstream_name") or node,
                                        "up_channel": up_channel})
                tx.event("network-connect", node, "pending", nic=nic, network=network)
            else:
                networks[channel] = network
                self._set_nic_networks(doc, nic, networks)
                tx.put_node(doc)
                tx.event("network-connect", node, "ok", nic=nic, network=network)
                return {"status_id": self._new_action(tx, node, nic, channel, network, "DONE")}
        self.net.start(sid)
        return {"status_id": sid}

    def node_detach_network(self, caller, node, nic, network):
        with self.store.transaction(caller.name) as tx:
            doc = dict(self._node(tx, node))
            nic_doc = self._nic(doc, nic)
            self._network(tx, network)
            if not doc.get("project"):
                raise ProjectMismatchError("Node not in project")
            caller.require_project(doc["project"])
            if self._pending(tx, node, nic):
                raise BlockedError("A networking operation is already active on the nic.")
            networks = dict(nic_doc.get("networks") or {})
            channels = [c for c, n in networks.items() if n == network]
            if not channels:
                raise BadArgumentError("The network is not attached to the nic.")
            if self.upstream is not None:
                sid = self._new_action(tx, node, nic, channels[0], None, "PENDING",
                                       {"op": "detach", "up_node": doc.get("upstream_name") or node,
                                        "old_network": network})
                tx.event("network-detach", node, "pending", nic=nic, network=network)
            else:
                for c in channels:
                    del networks[c]
                self._set_nic_networks(doc, nic, networks)
                tx.put_node(doc)
                tx.event("network-detach", node, "ok", nic=nic, network=network)
                return {"status_id": self._new_action(tx, node, nic, channels[0], None, "DONE")}
        self.net.start(sid)
        return {"status_id": sid}

    @staticmethod
    def _set_nic_networks(doc, label, networks):
        doc["nics"] = [dict(n, networks=networks) if n["label"] == label else n for n in doc.get("nics", [])]

    def show_networking_action(self, caller, view, status_id):
        act = view.get("actions", status_id)
        if act is None:
            raise NotFoundError("status_id not found")
        node = view.node(act["node"])
        caller.require_project((node or {}).get("project"))
        return {k: act[k] for k in ("status", "node", "nic", "type", "channel", "new_network")}

    # -- users ----------------------------------------------------------------------------------------
    @staticmethod
    def _user(view, name: str) -> dict:
        doc = view.get("users", name)
        if doc is None:
            raise NotFoundError(f"User {name} does not exist.")
        return doc

    def list_users(self, caller, view):
        caller.require_admin()
        return {
            u["name"]: {"is_admin": bool(u.get("is_admin")), "projects": sorted(u.get("projects", []))}
            for u in view.all("users")
        }

    def user_create(self, caller, user, password, is_admin=False):
        caller.require_admin()
        if not protocol.valid_name(user):
            raise BadArgumentError(f"invalid user name {user!r}")
        hashed = hash_password(password)
        with self.store.transaction(caller.name) as tx:
            if tx.get("users", user):
                raise DuplicateError(f"User {user} already exists.")
            tx.put("users", {"name": user, "password_hash": hashed, "is_admin": is_admin, "projects": [], "ssh_keys": []})
            tx.event("user-add", outcome="ok", user=user, by=caller.name)

    def user_delete(self, caller, user):
        caller.require_admin()
        with self.store.transaction(caller.name) as tx:
            if not tx.remove("users", user):
                raise NotFoundError(f"User {user} does not exist.")
            tx.event("user-rm", outcome="ok", user=user, by=caller.name)

    def user_set_admin(self, caller, user, is_admin):
        caller.require_admin()
        if user == caller.name:
            raise IllegalStateError("Cannot set own admin status")
        with self.store.transaction(caller.name) as tx:
            doc = self._user(tx, user)
            tx.put("users", dict(doc, is_admin=is_admin))

    def user_add_project(self, caller, user, project):
        caller.require_admin()
        with self.store.transaction(caller.name) as tx:
            doc = self._user(tx, user)
            self._project(tx, project)
            if project in doc.get("projects", []):
                raise DuplicateError(f"User {user} is already in project {project}")
            tx.put("users", dict(doc, projects=sorted(doc.get("projects", []) + [project])))

    def user_remove_project(self, caller, user, project):
        caller.require_admin()
        with self.store.transaction(caller.name) as tx:
            doc = self._user(tx, user)
            self._project(tx, project)
            if project not in doc.get("projects", []):
                raise NotFoundError(f"User {user} is not in project {project}")
            tx.put("users", dict(doc, projects=[p for p in doc["projects"] if p != project]))

    def list_active_extensions(self, caller, view):
        # any authenticated user: a tenant asks it to know whether rhaas.kexec is here
        self.provision  # noqa: B018 - a tenant that asks is about to use it: start its workers now
        return sorted(ACTIVE_EXTENSIONS)

    # -- the rhaas.kexec extension: rhaas.core.provision_service decides ----------------------------------
    _provision = None
    _provision_lock = threading.Lock()

    @property
    def provision(self):
        with self._provision_lock:
            if self._provision is None:
                from rhaas.core.provision_service import ProvisionService

                self._provision = ProvisionService(self.store, self.settings, self.upstream)
            return self._provision

    def rhaas_blob_show(self, caller, view, sha256):
        return self.provision.blob_show(caller, view, sha256)

    def rhaas_blob_part(self, caller, sha256, offset, stream, length):
        return self.provision.blob_part(caller, sha256, offset, stream, length)

    def rhaas_blob_commit(self, caller, sha256, size):
        return self.provision.blob_commit(caller, sha256, size)

    def rhaas_kexec(self, caller, **body):
        return self.provision.kexec(caller, **body)

    def rhaas_kexec_status(self, caller, view, action_id):
        return self.provision.kexec_status(caller, view, action_id)
