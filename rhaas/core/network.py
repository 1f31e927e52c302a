"""Networks for this instance's own use: passed to the upstream when derived, recorded at a root.

At a derived instance these networks belong to the instance itself (admin-owned, not a
tenant's): each is made upstream under a name unique to the instance (rhaas.core.netnames), so
two derived instances of one upstream project may both have a ``net1``. The inventory keeps
that upstream name as the network's key and the name given here as its local name; commands
take the local name. Create and delete record their intent before asking the upstream, with no
lock held while it answers; an intent left by a dead process is settled by `rhaas serve`'s
reaper (rhaas.core.net_actions.NetActions.resume).
"""

from __future__ import annotations

from rhaas import protocol
from rhaas.core import netnames
from rhaas.core.instance import require_project, upstream_client
from rhaas.core.service import Caller, Service
from rhaas.errors import APIError, RhaasError, UsageError
from rhaas.model import check_name

LOCAL = Caller("local-admin", True, [])


def _derived(store) -> bool:
    return bool(store.snapshot().config().get("upstream"))


def find(view, name: str) -> dict | None:
    """The network ``name`` means to the local operator: the instance's own first (netnames.resolve)."""
    try:
        return netnames.resolve(view.all("networks"), name, set(), True)
    except netnames.Ambiguous as exc:
        raise UsageError(f"network name {name} is shared by {', '.join(exc.args[0])}; use one of those") from None


def _local_msg(exc: APIError, key: str, name: str) -> APIError:
    if key in (exc.msg or ""):
        exc.msg = exc.msg.replace(key, name)
        exc.args = (exc.msg,)
    return exc


def create(store, settings, name: str) -> None:
    check_name(name, "network name")
    if not _derived(store):
        Service(store, settings).network_create(LOCAL, name, "admin", "", "")
        return
    project = require_project(store.snapshot())
    client = upstream_client(store)
    with store.transaction() as tx:
        key = netnames.upstream_name(netnames.instance_tag(tx), None, name)
        if netnames.taken(tx.all("networks"), name, netnames.ADMIN) or tx.get("networks", key):
            raise UsageError(f"network {name} already exists")
        tx.put("networks", {"name": key, "local": name, "owner": "admin", "access": None, "net_id": "",
                            "channels": [protocol.DEFAULT_CHANNEL], "upstream": True, "pending": "create"})
    try:
        client.call("network_create", {"owner": project, "access": project, "net_id": ""}, network=key)
    except APIError as exc:
        with store.transaction() as tx:
            tx.remove("networks", key)
        raise _local_msg(exc, key, name) from None
    try:
        shown = client.call("show_network", network=key) or {}
    except APIError:
        shown = {}
    channels = shown.get("channels") if isinstance(shown, dict) else None
    if not (isinstance(channels, list) and channels and all(isinstance(c, str) for c in channels)):
        channels = [protocol.DEFAULT_CHANNEL]
    with store.transaction() as tx:
        doc = tx.get("networks", key)
        if doc is not None:
            tx.put("networks", dict({k: v for k, v in doc.items() if k != "pending"}, channels=channels))
        tx.event("network-create", outcome="ok", network=name, upstream=key)


def delete(store, settings, name: str) -> None:
    if not _derived(store):
        Service(store, settings).network_delete(LOCAL, name)
        return
    client = upstream_client(store)
    with store.transaction() as tx:
        net = find(tx, name)
        if net is None:
            raise UsageError(f"unknown network {name}")
        key = net["name"]
        if Service._connected(tx, key):
            raise UsageError(f"network {name} is still attached to nodes; detach them first")
        tx.put("networks", dict(net, pending="delete"))
    try:
        client.call("network_delete", network=key)
    except APIError as exc:
        with store.transaction() as tx:
            doc = tx.get("networks", key)
            if doc is not None:
                tx.put("networks", {k: v for k, v in doc.items() if k != "pending"})
        raise _local_msg(exc, key, name) from None
    with store.transaction() as tx:
        tx.remove("networks", key)
        tx.event("network-delete", outcome="ok", network=name, upstream=key)


def _set_nic(tx, node: str, nic: str, change) -> None:
    doc = dict(tx.node(node))
    nics = []
    for n in doc.get("nics", []):
        if n["label"] == nic:
            n = dict(n, networks=change(dict(n.get("networks") or {})))
        nics.append(n)
    doc["nics"] = nics
    tx.put_node(doc)


def _check(view, node: str, nic: str, network: str) -> tuple[dict, dict]:
    from rhaas.core.instance import require_node

    doc = require_node(view, node)
    if not any(n["label"] == nic for n in doc.get("nics", [])):
        raise UsageError(f"node {node} has no NIC {nic}")
    net = find(view, network)
    if net is None:
        raise UsageError(f"unknown network {network} (see 'rhaas network list')")
    return doc, net


def connect(store, node: str, nic: str, network: str, channel: str | None) -> str:
    doc, net = _check(store.snapshot(), node, nic, network)
    key = net["name"]  # the upstream's name for it, at a derived instance
    channel = channel or protocol.DEFAULT_CHANNEL
    if channel not in net.get("channels", [protocol.DEFAULT_CHANNEL]):
        raise UsageError(f"channel {channel!r} is not legal for {network}: {', '.join(net['channels'])}")
    state = "DONE"
    if doc.get("source") == "leased":
        client = upstream_client(store)
        sid = client.connect_network(doc.get("upstream_name") or node, nic, key,
                                     None if channel == protocol.DEFAULT_CHANNEL else channel)
        state = client.wait_action(sid)
        if state == "ERROR":
            raise RhaasError(f"upstream could not attach {network} to {node}/{nic}")
        if state == "PENDING":
            raise RhaasError(f"attaching {network} to {node}/{nic} did not finish in time; see 'rhaas reconcile'")
    with store.transaction() as tx:
        _set_nic(tx, node, nic, lambda nets: dict(nets, **{channel: key}))
        tx.event("network-connect", node, "ok", nic=nic, network=network, channel=channel)
    return state


def detach(store, node: str, nic: str, network: str) -> str:
    doc, net = _check(store.snapshot(), node, nic, network)
    key = net["name"]
    nic_doc = next(n for n in doc["nics"] if n["label"] == nic)
    if key not in (nic_doc.get("networks") or {}).values():
        raise UsageError(f"{network} is not attached to {node}/{nic}")
    state = "DONE"
    if doc.get("source") == "leased":
        client = upstream_client(store)
        state = client.wait_action(client.detach_network(doc.get("upstream_name") or node, nic, key))
        if state in ("ERROR", "PENDING"):
            raise RhaasError(f"detaching {network} from {node}/{nic} ended {state} upstream")
    with store.transaction() as tx:
        _set_nic(tx, node, nic, lambda nets: {c: n for c, n in nets.items() if n != key})
        tx.event("network-detach", node, "ok", nic=nic, network=network)
    return state
