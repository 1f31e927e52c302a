"""`rhaas network create|delete|list|connect|detach`."""

from __future__ import annotations

import click

from rhaas.cli.common import App, emit_json, json_option, pass_app
from rhaas.cli.complete import complete_networks, complete_nodes


@click.group()
def network():
    """Create, list and attach networks (through the upstream when derived)."""


@network.command("create")
@click.argument("name")
@pass_app
def create(app: App, name):
    """Create a network (upstream, owned by our project, when derived).

    \b
    Example:
      rhaas network create render-net
    """
    from rhaas.core import network as net

    net.create(app.store, app.settings, name)


@network.command("delete")
@click.argument("name", shell_complete=complete_networks)
@pass_app
def delete(app: App, name):
    """Delete a network no node is attached to."""
    from rhaas.core import network as net

    net.delete(app.store, app.settings, name)


@network.command("list")
@json_option
@pass_app
def list_networks(app: App, as_json):
    """List networks with the nodes attached to them."""
    from rhaas.core.netnames import local_name
    from rhaas.core.service import Service

    view = app.snapshot()
    rows = []
    for n in view.all("networks"):
        if n.get("pending"):
            continue  # being created or deleted upstream
        attached = Service._connected(view, n["name"])
        rows.append({"name": local_name(n), "owner": n["owner"], "channels": n.get("channels", []),
                     "access": n.get("access"), "attached": attached,
                     "upstream_name": n["name"] if n.get("local") else None})
    if as_json:
        emit_json(rows)
        return
    from rhaas.cli.output import table

    table(["network", "owner", "channels", "attached"],
          [[r["name"], r["owner"], ",".join(r["channels"]),
            ",".join(f"{k}/{'+'.join(v)}" for k, v in r["attached"].items())] for r in rows])


@network.command("connect")
@click.argument("node", shell_complete=complete_nodes)
@click.argument("nic")
@click.argument("name", metavar="NETWORK", shell_complete=complete_networks)
@click.option("--channel", help="Channel, e.g. vlan/native (default) or vlan/<id>.")
@pass_app
def connect(app: App, node, nic, name, channel):
    """Attach NODE's NIC to NETWORK and wait for the switch to finish.

    \b
    Example:
      rhaas network connect node-01 eth0 render-net
    """
    from rhaas.core import network as net

    net.connect(app.store, node, nic, name, channel)


@network.command("detach")
@click.argument("node", shell_complete=complete_nodes)
@click.argument("nic")
@click.argument("name", metavar="NETWORK", shell_complete=complete_networks)
@pass_app
def detach(app: App, node, nic, name):
    """Detach NODE's NIC from NETWORK and wait for the switch to finish."""
    from rhaas.core import network as net

    net.detach(app.store, node, nic, name)
