"""`rhaas console NODE`: a node's serial console (parse, call rhaas.core.console, write bytes)."""

from __future__ import annotations

import sys

import click

from rhaas.cli.common import App, pass_app
from rhaas.cli.complete import complete_nodes


@click.command("console")
@click.argument("node", shell_complete=complete_nodes)
@click.option("-f", "--follow", is_flag=True, help="Go on with the live console until Ctrl-C.")
@click.option("-n", "--lines", type=click.IntRange(1, 10000), default=None,
              help="Only the last N lines of what is kept (default: all of it, up to 64 KB).")
@pass_app
def console(app: App, node: str, follow: bool, lines: int | None) -> None:
    """Show NODE's serial console: from its BMC (Serial-over-LAN) at a root instance, from
    the upstream's console at a derived one. Ctrl-C ends --follow (exit 130)."""
    from rhaas.core.console import show_console

    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    try:
        show_console(app.store, app.settings, node, lines, follow, write)
    except KeyboardInterrupt:
        out.flush()
        click.echo("", err=True)
        sys.exit(130)
