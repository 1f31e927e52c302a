"""Networks for this instance's own use: passed to the upstream when derived, recorded at a root."""

from __future__ import annotations

from rhaas import protocol
from rhaas.core.instance import require_project, upstream_client
from rhaas.core.service import Caller, Service
from rhaas.errors import RhaasError, UsageError
from rhaas.model import check_name

LOCAL = Caller("local-admin", True, [])


def _derived(store) -> bool:
    return bool(store.snapshot().config().get("upstream"))


def create(store, settings, name: str) -> None:
    check_name(name, "network name")
    if _derived(store):
        project = require_project(store.snapshot())
        client = upstream_client(store)
        with store.transaction() as tx:
            if tx.get("networks", name):
                raise UsageError(f"network {name} already exists")
            client.call("network_create", {"owner": project, "access": project, "net_id": ""}, network=name)
            shown = client.call("show_network", network=name) or {}
            tx.put("networks", {
                "name": name, "owner": "admin", "access": None, "net_id": "",
                "channels": shown.get("channels") or [protocol.DEFAULT_CHANNEL],
                "upstream": True,
            })
            tx.event("network-create", outcome="ok", network=name)
    else:
        Service(store, settings).network_create(LOCAL, name, "admin", "", "")


def delete(store, settings, name: str) -> None:
    if _derived(store):
        client = upstream_client(store)
        with store.transaction() as tx:
            if not tx.get("networks", name):
                raise UsageError(f"unknown network {name}")
            if Service._connected(tx, name):
                raise UsageError(f"network {name} is still attached to nodes; detach them first")
            client.call("network_delete", network=name)
            tx.remove("networks", name)
            tx.event("network-delete", outcome="ok", network=name)
    else:
        Service(store, settings).network_delete(LOCAL, name)


def _set_nic(tx, node: str, nic: str, change) -> None:
    doc = dict(tx.node(node))
    nics = []
    for n in doc.get("nics", []):
        if n["label"] == nic:
            n = dict(n, networks=change(dict(n.get("networks") or {})))
        nics.append(n)
    doc["nics"] = nics
    tx.put_node(doc)


def _check(view, node: str, nic: str, network: str) -> dict:
    from rhaas.core.instance import require_node

    doc = require_node(view, node)
    if not any(n["label"] == nic for n in doc.get("nics", [])):
        raise UsageError(f"node {node} has no NIC {nic}")
    if view.get("networks", network) is None:
        raise UsageError(f"unknown network {network} (see 'rhaas network list')")
    return doc


def connect(store, node: str, nic: str, network: str, channel: str | None) -> str:
    doc = _check(store.snapshot(), node, nic, network)
    net = store.snapshot().get("networks", network)
    channel = channel or protocol.DEFAULT_CHANNEL
    if channel not in net.get("channels", [protocol.DEFAULT_CHANNEL]):
        raise UsageError(f"channel {channel!r} is not legal for {network}: {', '.join(net['channels'])}")
    state = "DONE"
    if doc.get("source") == "leased":
        client = upstream_client(store)
        sid = client.connect_network(doc.get("upstream_name") or node, nic, network,
                                     None if channel == protocol.DEFAULT_CHANNEL else channel)
        state = client.wait_action(sid)
        if state == "ERROR":
            raise RhaasError(f"upstream could not attach {network} to {node}/{nic}")
        if state == "PENDING":
            raise RhaasError(f"attaching {network} to {node}/{nic} did not finish in time; see 'rhaas reconcile'")
    with store.transaction() as tx:
        _set_nic(tx, node, nic, lambda nets: dict(nets, **{channel: network}))
        tx.event("network-connect", node, "ok", nic=nic, network=network, channel=channel)
    return state


def detach(store, node: str, nic: str, network: str) -> str:
    doc = _check(store.snapshot(), node, nic, network)
    nic_doc = next(n for n in doc["nics"] if n["label"] == nic)
    if network not in (nic_doc.get("networks") or {}).values():
        raise UsageError(f"{network} is not attached to {node}/{nic}")
    state = "DONE"
    if doc.get("source") == "leased":
        client = upstream_client(store)
        state = client.wait_action(client.detach_network(doc.get("upstream_name") or node, nic, network))
        if state in ("ERROR", "PENDING"):
            raise RhaasError(f"detaching {network} from {node}/{nic} ended {state} upstream")
    with store.transaction() as tx:
        _set_nic(tx, node, nic, lambda nets: {c: n for c, n in nets.items() if n != network})
        tx.event("network-detach", node, "ok", nic=nic, network=network)
    return state
