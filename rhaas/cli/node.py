"""`rhaas node register|unregister|set|trust`: the nodes a root instance owns."""

from __future__ import annotations

import os

import click

from rhaas.cli.common import App, expand_nodes, pass_app
from rhaas.cli.complete import complete_nodes
from rhaas.errors import UsageError
from rhaas.model import check_name, new_node, parse_meta_pairs, parse_ssh


def _host_key_arg(value: str | None) -> str | None:
    """--host-key takes an OpenSSH public key line, or a file holding one."""
    if not value:
        return None
    if os.path.exists(value):
        with open(value, encoding="utf-8") as fh:
            value = fh.read().strip()
    parts = value.split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-")) or "\n" in value:
        raise UsageError("invalid --host-key: expected an OpenSSH public key line ('ssh-ed25519 AAAA...') or a file")
    return " ".join(parts[:2])


@click.group()
def node():
    """Register, change and trust nodes."""


@node.command("register")
@click.argument("name")
@click.option("--ssh", "ssh", metavar="[USER@]HOST[:PORT]", help="Where the node's Linux answers SSH.")
@click.option("--ipmi", metavar="USER@HOST[:PORT]", help="The node's BMC (password: RHAAS_IPMI_PASSWORD or a prompt).")
@click.option("--ipmi-interface", type=click.Choice(["rmcpplus", "rmcp"]), default=None,
              help="rmcpplus (IPMI 2.0, default) or rmcp (IPMI 1.5).")
@click.option("--cipher-suite", type=int, default=None, help="RMCP+ cipher suite (default: setting ipmi-cipher-suite).")
@click.option("--nic", "nics", multiple=True, metavar="LABEL=MAC", help="A NIC (repeatable).")
@click.option("--meta", "metas", multiple=True, metavar="KEY=VALUE", help="Metadata (repeatable).")
@click.option("--host-key", metavar="KEY|FILE", help="The node's SSH host key, pinned for strict checking.")
@pass_app
def register(app: App, name, ssh, ipmi, ipmi_interface, cipher_suite, nics, metas, host_key):
    """Register a node this root instance owns.

    \b
    Example:
      RHAAS_IPMI_PASSWORD=secret rhaas node register node-01 --ssh root@10.0.0.11 \\
          --ipmi admin@10.0.1.11:623 --nic eth0=52:54:00:00:00:01 --meta rack=r1
    """
    check_name(name, "node name")
    view = app.snapshot()
    if view.config().get("upstream"):
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
        addr = parse_ssh(ipmi, default_port=623)
        from rhaas.cli.setup import read_secret

        ipmi_doc = {
            "host": addr.host,
            "port": addr.port,
            "user": addr.user,
            "password": read_secret("RHAAS_IPMI_PASSWORD", "BMC password"),
            "interface": ipmi_interface,
            "cipher_suite": cipher_suite,
        }
    doc = new_node(
        name,
        "registered",
        ssh=ssh_addr,
        ssh_host_key=_host_key_arg(host_key),
        ipmi=ipmi_doc,
        nics=nic_docs,
        metadata=parse_meta_pairs(metas, "--meta"),
    )
    with app.store.transaction() as tx:
        if tx.node(name) is not None:
            raise UsageError(f"node {name} is already registered")
        tx.put_node(doc)
        tx.event("register", name, "ok")
    click.echo(f"registered {name}", err=True)


@node.command("unregister")
@click.argument("names", nargs=-1, required=True, shell_complete=complete_nodes)
@pass_app
def unregister(app: App, names):
    """Remove registered nodes (not leased ones: use 'rhaas free').

    \b
    Example:
      rhaas node unregister node-[01-04]
    """
    names = expand_nodes(names)
    from rhaas.core.instance import require_nodes

    docs = require_nodes(app.snapshot(), names)
    leased = [d["name"] for d in docs if d.get("source") == "leased"]
    if leased:
        raise UsageError(f"leased from the upstream: {', '.join(leased)}; use 'rhaas free'")
    busy = [d["name"] for d in docs if d.get("project")]
    if busy:
        raise UsageError(f"assigned to a project: {', '.join(busy)}; detach them first")
    with app.store.transaction() as tx:
        tx.remove_nodes(names)
        for n in names:
            tx.event("unregister", n, "ok")
    click.echo(f"unregistered {len(names)} node(s)", err=True)


@node.command("set")
@click.argument("name", shell_complete=complete_nodes)
@click.option("--ssh", "ssh", metavar="[USER@]HOST[:PORT]", help="Where the node answers SSH.")
@click.option("--host-key", metavar="KEY|FILE", help="Pin this SSH host key.")
@click.option("--meta", "metas", multiple=True, metavar="KEY=VALUE", help="Set metadata (repeatable).")
@pass_app
def set_node(app: App, name, ssh, host_key, metas):
    """Change a node's SSH address, pinned host key or metadata.

    \b
    Example:
      rhaas node set node-01 --ssh root@127.0.0.1:2201 --host-key ./node-01.pub
    """
    if not (ssh or host_key or metas):
        raise UsageError("nothing to set: give --ssh, --host-key or --meta")
    ssh_addr = str(parse_ssh(ssh)) if ssh else None
    key = _host_key_arg(host_key)
    meta = parse_meta_pairs(metas, "--meta")
    with app.store.transaction() as tx:
        doc = tx.node(name)
        if doc is None:
            raise UsageError(f"unknown node: {name} (see 'rhaas list')")
        doc = dict(doc)
        if ssh_addr:
            doc["ssh"] = ssh_addr
        if key:
            doc["ssh_host_key"] = key
        if meta:
            doc["metadata"] = dict(doc.get("metadata") or {}, **meta)
        tx.put_node(doc)
        tx.event("node-set", name, "ok", fields=[f for f, v in (("ssh", ssh), ("host_key", key), ("meta", meta)) if v])


@node.command("trust")
@click.argument("name", shell_complete=complete_nodes)
@click.option("--yes", is_flag=True, help="Record the key without asking.")
@pass_app
def trust(app: App, name, yes):
    """Fetch a node's SSH host key, show its fingerprint, and pin it.

    \b
    Example:
      rhaas node trust node-01
    """
    doc = app.snapshot().node(name)
    if doc is None:
        raise UsageError(f"unknown node: {name} (see 'rhaas list')")
    if not doc.get("ssh"):
        raise UsageError(f"node {name} has no SSH address; set one with 'rhaas node set {name} --ssh ...'")
    from rhaas.adapters.ssh import fetch_host_key
    from rhaas.model import fingerprint

    key = fetch_host_key(doc["ssh"], timeout=app.setting("connect-timeout"))
    click.echo(f"{name} {doc['ssh']} {key.split()[0]} {fingerprint(key)}")
    if not yes and not click.confirm("Trust this key?", default=False, err=True):
        raise UsageError("not trusted; nothing recorded")
    with app.store.transaction() as tx:
        cur = tx.node(name)
        if cur is None:
            raise UsageError(f"unknown node: {name}")
        tx.put_node(dict(cur, ssh_host_key=key))
        tx.event("trust", name, "ok", fingerprint=fingerprint(key))
