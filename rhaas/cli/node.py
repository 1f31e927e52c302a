"""`rhaas node register|unregister|set|trust`: the nodes a root instance owns."""

from __future__ import annotations

import click

from rhaas.cli.common import App, expand_nodes, pass_app
from rhaas.cli.complete import complete_nodes
from rhaas.errors import UsageError


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
    from rhaas.cli.setup import read_secret
    from rhaas.core.nodes import register_node

    register_node(app.store, name, ssh=ssh, ipmi=ipmi,
                  ipmi_password=lambda: read_secret("RHAAS_IPMI_PASSWORD", "BMC password"),
                  ipmi_interface=ipmi_interface, cipher_suite=cipher_suite, nics=nics, metas=metas,
                  host_key=host_key)
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
    from rhaas.core.nodes import unregister_nodes

    names = expand_nodes(names)
    unregister_nodes(app.store, names)
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
    from rhaas.core.nodes import set_node as do_set

    do_set(app.store, name, ssh=ssh, host_key=host_key, metas=metas)


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
    from rhaas.core.nodes import offered_host_key, trust_host_key

    address, key, fp = offered_host_key(app.store, name, timeout=app.setting("connect-timeout"))
    click.echo(f"{name} {address} {key.split()[0]} {fp}")
    if not yes and not click.confirm("Trust this key?", default=False, err=True):
        raise UsageError("not trusted; nothing recorded")
    trust_host_key(app.store, name, key)
