"""`rhaas power` and `rhaas bootdev`: parse, call rhaas.core.power, render."""

from __future__ import annotations

import click

from rhaas.cli.common import (
    App,
    CommandError,
    dry_run_option,
    emit_json,
    expand_nodes,
    is_terminal,
    json_option,
    pass_app,
)
from rhaas.cli.complete import complete_nodes
from rhaas.errors import RhaasError
from rhaas.protocol import BOOT_DEVICES

POWER_OPS = ("on", "off", "cycle", "reset", "status")  # mirrors rhaas.core.power (not imported: startup)

_DONE = {"on": "powered on", "off": "powered off", "cycle": "power cycled", "reset": "reset"}
_WHAT = {"on": "power on", "off": "power off", "cycle": "power cycle", "reset": "reset", "status": "read power status"}


def _parallel_option(f):
    return click.option(
        "--parallel",
        type=click.IntRange(min=1),
        default=None,
        help="Nodes driven at once (default: the 'parallel' setting).",
    )(f)


def _nodes_argument(f):
    return click.argument("nodes", nargs=-1, required=True, metavar="NODE...", shell_complete=complete_nodes)(f)


def _detail(r: dict) -> str:
    if r["outcome"] != "ok":
        return r.get("reason") or "failed"
    if r["op"] == "status":
        return r.get("power") or ""
    if r["op"] == "bootdev":
        return f"boot device {r['bootdev']}"
    return _DONE.get(r["op"], r["op"])


def _render(results: list[dict], as_json: bool, title: str) -> None:
    if as_json:
        emit_json(results)
        return
    if is_terminal():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        table.add_column("node")
        table.add_column("outcome")
        table.add_column("detail", overflow="fold")
        for r in results:
            style = "green" if r["outcome"] == "ok" else "red"
            table.add_row(r["node"], f"[{style}]{r['outcome']}[/{style}]", _detail(r))
        Console().print(table)
        return
    for r in results:
        click.echo(f"{r['node']}\t{r['outcome']}\t{_detail(r)}")


def _render_plan(steps: list[dict], as_json: bool, what: str) -> None:
    if as_json:
        emit_json([{**s, "dry_run": True} for s in steps])
        return
    for s in steps:
        if s["backend"]:
            click.echo(f"{s['node']}\twould {what}\t{s['backend']}")
        else:
            click.echo(f"{s['node']}\tcannot {what}\t{s['reason']}")


def _finish(failed: list[str], what: str) -> None:
    if failed:
        shown = ", ".join(failed[:20]) + (f" and {len(failed) - 20} more" if len(failed) > 20 else "")
        raise CommandError(f"{what} failed on {len(failed)} node{'s' if len(failed) > 1 else ''}: {shown}")


def _run(app: App, nodes: tuple[str, ...], parallel: int | None, as_json: bool, dry_run: bool, what: str, action):
    from rhaas.core import power as core

    try:
        names = expand_nodes(nodes)
        if dry_run:
            steps = core.plan(app.store, app.settings, names, what)
            _render_plan(steps, as_json, what)
            _finish([s["node"] for s in steps if not s["backend"]], what)
            return
        results = action(core, names)
    except RhaasError as exc:
        raise CommandError(str(exc), exc.exit_code) from None
    _render(results, as_json, what)
    _finish([r["node"] for r in results if r["outcome"] != "ok"], what)


@click.command()
@click.argument("op", type=click.Choice(POWER_OPS), metavar="on|off|cycle|reset|status")
@_nodes_argument
@_parallel_option
@json_option
@dry_run_option
@pass_app
def power(app: App, op: str, nodes: tuple[str, ...], parallel: int | None, as_json: bool, dry_run: bool):
    """Power nodes on or off, power cycle or reset them, or read their power status.

    A node registered with a BMC is driven over IPMI; a leased node through its upstream
    (its OBM is enabled first, and stays enabled until the node is freed). NODE is a name,
    a node set such as node-[01-04], or '-' to read names from stdin.

    \b
    Examples:
      rhaas power status node-[01-04]
      rhaas power cycle node-07 --json
      rhaas list -q | rhaas power off -
      rhaas power on node-[01-16] --dry-run

    Exit status: 0 if every node succeeded, 1 if any failed (named on stderr),
    2 for usage errors such as an unknown node (then nothing is done).
    """
    _run(
        app,
        nodes,
        parallel,
        as_json,
        dry_run,
        _WHAT[op],
        lambda core, names: core.power_nodes(app.store, app.settings, names, op, parallel),
    )


@click.command()
@click.argument("dev", type=click.Choice(BOOT_DEVICES), metavar="pxe|disk|none")
@_nodes_argument
@_parallel_option
@json_option
@dry_run_option
@pass_app
def bootdev(app: App, dev: str, nodes: tuple[str, ...], parallel: int | None, as_json: bool, dry_run: bool):
    """Set nodes' boot device, persistently: pxe, disk, or none (the firmware's order).

    The new device is used from the next boot on; follow with `rhaas power cycle`.
    NODE is a name, a node set such as node-[01-04], or '-' to read names from stdin.

    \b
    Examples:
      rhaas bootdev pxe node-[01-04]
      rhaas bootdev disk node-07 --json && rhaas power cycle node-07
      rhaas bootdev none node-[01-16] --dry-run
    """
    _run(
        app,
        nodes,
        parallel,
        as_json,
        dry_run,
        f"set boot device {dev}",
        lambda core, names: core.set_bootdev_nodes(app.store, app.settings, names, dev, parallel),
    )
