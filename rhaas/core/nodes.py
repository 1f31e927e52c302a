"""The nodes a root instance owns: register, unregister, change, and pin SSH host keys.

Every change runs in one store transaction that re-checks what it relies on, and leaves an
event. Secrets (the BMC password) come from a callable the caller supplies, asked for only
after every other argument has been checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from rhaas.core.instance import is_derived, require_node, require_nodes
from rhaas.errors import UsageError
from rhaas.model import check_name, fingerprint, new_node, parse_meta_pairs, parse_ssh


def read_host_key(value: str | None) -> str | None:
    """A --host-key value: an OpenSSH public key line, or a file holding one -> ``TYPE B64``."""
    if not value:
        return None
    if os.path.exists(value):
        with open(value, encoding="utf-8") as fh:
            value = fh.read().strip()
    parts = value.split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-")) or "\n" in value:
        raise UsageError("invalid --host-key: expected an OpenSSH public key line ('ssh-ed25519 AAAA...') or a file")
    return " ".join(parts[:2])


def register_node(store, name: str, *, ssh: str | None = None, ipmi: str | None = None,
                  ipmi_password: Callable[[], str] | None = None, ipmi_interface: str | None = None,
                  cipher_suite: int | None = None, nics: Iterable[str] = (), metas: Iterable[str] = (),
                  host_key: str | None = None) -> dict:
    """Add a node to a root instance from CLI-shaped arguments; returns its document."""
    check_name(name, "node name")
    view = store.snapshot()
    if is_derived(view):
        raise UsageError("this instance is derived: its nodes come from 'rhaas lease', not 'node register'")
    if view.node(name) is not None:
        raise UsageError(f"node {name} is already registered")
    ssh_addr = str(parse_ssh(ssh)) if ssh else None
    nic_docs = []
    for label, mac in parse_meta_pairs(nics, "--nic").items():
        check_name(label, "NIC label")
        nic_docs.append({"label": label, "macaddr": mac, "networks": {}})
    ipmi_doc = None
    if ipmi:
        if "@" not in ipmi:
            raise UsageError(f"invalid --ipmi {ipmi!r}: expected USER@HOST[:PORT]")
        if ipmi_password is None:
            raise UsageError("--ipmi needs a BMC password")
        addr = parse_ssh(ipmi, default_port=623)
        ipmi_doc = {
            "host": addr.host,
            "port": addr.port,
            "user": addr.user,
            "password": ipmi_password(),
            "interface": ipmi_interface,
            "cipher_suite": cipher_suite,
        }
    doc = new_node(
        name,
        "registered",
        ssh=ssh_addr,
        ssh_host_key=read_host_key(host_key),
        ipmi=ipmi_doc,
        nics=nic_docs,
        metadata=parse_meta_pairs(metas, "--meta"),
    )
    with store.transaction() as tx:
        if tx.node(name) is not None:
            raise UsageError(f"node {name} is already registered")
        tx.put_node(doc)
        tx.event("register", name, "ok")
    return doc


def unregister_nodes(store, names: list[str]) -> None:
    """Remove registered nodes that no project holds; leased nodes go back with 'rhaas free'."""
    if not names:
        raise UsageError("no nodes given")
    for n in names:
        check_name(n, "node name")
    docs = require_nodes(store.snapshot(), names)
    leased = [d["name"] for d in docs if d.get("source") == "leased"]
    if leased:
        raise UsageError(f"leased from the upstream: {', '.join(leased)}; use 'rhaas free'")
    busy = [d["name"] for d in docs if d.get("project")]
    if busy:
        raise UsageError(f"assigned to a project: {', '.join(busy)}; detach them first")
    with store.transaction() as tx:
        tx.remove_nodes(names)
        for n in names:
            tx.event("unregister", n, "ok")


def set_node(store, name: str, ssh: str | None = None, host_key: str | None = None,
             metas: Iterable[str] = ()) -> None:
    """Change a node's SSH address, pinned host key (line or file) or metadata."""
    metas = list(metas)
    if not (ssh or host_key or metas):
        raise UsageError("nothing to set: give --ssh, --host-key or --meta")
    ssh_addr = str(parse_ssh(ssh)) if ssh else None
    key = read_host_key(host_key)
    meta = parse_meta_pairs(metas, "--meta")
    with store.transaction() as tx:
        doc = dict(require_node(tx, name))
        if ssh_addr:
            doc["ssh"] = ssh_addr
        if key:
            doc["ssh_host_key"] = key
        if meta:
            doc["metadata"] = dict(doc.get("metadata") or {}, **meta)
        tx.put_node(doc)
        tx.event("node-set", name, "ok", fields=[f for f, v in (("ssh", ssh), ("host_key", key), ("meta", meta)) if v])


def offered_host_key(store, name: str, timeout: float) -> tuple[str, str, str]:
    """Ask a node for its SSH host key, unauthenticated: (ssh address, key line, fingerprint).

    Nothing is pinned: the caller shows the fingerprint and decides (see :func:`trust_host_key`).
    """
    doc = require_node(store.snapshot(), name)
    if not doc.get("ssh"):
        raise UsageError(f"node {name} has no SSH address; set one with 'rhaas node set {name} --ssh ...'")
    from rhaas.adapters.hostkeys import fetch_host_key

    key = fetch_host_key(doc["ssh"], timeout=timeout)
    return doc["ssh"], key, fingerprint(key)


def trust_host_key(store, name: str, key: str) -> None:
    """Pin ``key`` as the node's SSH host key: strict checking from now on."""
    with store.transaction() as tx:
        cur = require_node(tx, name)
        tx.put_node(dict(cur, ssh_host_key=key))
        tx.event("trust", name, "ok", fingerprint=fingerprint(key))


__all__ = ["offered_host_key", "read_host_key", "register_node", "set_node", "trust_host_key", "unregister_nodes"]
