"""`rhaas lease|free|reconcile|list|show|events`."""

from __future__ import annotations

import sys

import click

from rhaas.cli.common import App, dry_run_option, emit_json, expand_nodes, json_option, pass_app, quiet_option
from rhaas.cli.complete import complete_leased, complete_nodes, complete_upstream_free
from rhaas.cli.output import human_time, phases_text, results, stderr, table
from rhaas.errors import UsageError
from rhaas.model import public_node


def _drop_expired(app: App) -> None:
    """Leases from the upstream that have ended are gone: drop them first, one line each."""
    from rhaas.core.batch_lease import drop_expired

    for name in drop_expired(app.store):
        click.echo(f"{name}: the lease ended; dropped (expired)", err=True)


def _with_lease(doc: dict) -> dict:
    """The public JSON form of a node plus the ends of its leases (epoch seconds, or null)."""
    from rhaas.core.batch_lease import time_left

    return dict(public_node(doc), lease_until=doc.get("lease_until"), assign_until=doc.get("assign_until"),
                time_left=time_left(doc.get("lease_until")))


@click.command()
@click.argument("targets", nargs=-1, required=True, metavar="COUNT | NODE...", shell_complete=complete_upstream_free)
@click.option("--for", "lease_for", metavar="DURATION",
              help="The nodes come back to the upstream by themselves after DURATION (5s, 10m, 2h).")
@json_option
@dry_run_option
@pass_app
def lease(app: App, targets, lease_for, as_json, dry_run):
    """Lease COUNT free nodes from the upstream, or the named nodes.

    \b
    Examples:
      rhaas lease 8
      rhaas lease 1000 --for 10m
      rhaas lease node-[01-04]
      echo node-07 | rhaas lease -
    """
    from rhaas.core.batch_lease import parse_duration
    from rhaas.core.lease import lease_nodes

    seconds = parse_duration(lease_for) if lease_for is not None else None
    count = lease_count(targets)
    _drop_expired(app)
    if count is not None:
        rows = lease_nodes(app.store, count=count, dry_run=dry_run, notify=stderr, lease_for=seconds)
    else:
        rows = lease_nodes(app.store, names=expand_nodes(targets), dry_run=dry_run, notify=stderr,
                           lease_for=seconds)
    rc = results(rows, as_json, "lease")
    if rc and any("reconcile" in (r.get("reason") or "") for r in rows):
        stderr("rhaas: next: run 'rhaas reconcile' once the upstream answers (or any lease/free/list)")
    sys.exit(rc)


def lease_count(targets) -> int | None:
    """COUNT when TARGETS is one positive whole number; None when they are node names.

    Anything that reads as a number but is not a positive whole number ('0', '-1', '1.5', '1e3')
    is a usage error, never taken as a node name: nothing is asked of the upstream.
    """
    def numeric(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    nums = [t for t in targets if numeric(t)]
    if not nums:
        return None
    if len(targets) > 1:
        raise UsageError(f"give either COUNT or node names, not both: {' '.join(targets)!r}")
    text = targets[0]
    if not text.isdigit() or int(text) <= 0:
        raise UsageError(f"not a count or node name: {text!r} (COUNT is a positive whole number)")
    return int(text)


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=complete_leased)
@click.option("--force", is_flag=True, help="Free nodes even if a downstream project holds them.")
@click.option("--no-standby", is_flag=True, help="Do not return nodes to the standby image first.")
@json_option
@dry_run_option
@pass_app
def free(app: App, names, force, no_standby, as_json, dry_run):
    """Return leased nodes to the upstream (networks detached, OBM off, node detached).

    Before release, nodes go back to the standby image by kexec when one is set
    ('rhaas config set standby-image NAME'), so the next tenant finds a kexec-ready node.

    \b
    Examples:
      rhaas free node-01 node-02
      rhaas list -q | rhaas free -
    """
    from rhaas.core.lease import free_nodes

    _drop_expired(app)
    names = expand_nodes(names)
    before = None
    if not no_standby and app.setting("standby-image"):
        from rhaas.core.standby import return_to_standby

        def before(docs):
            return_to_standby(app.store, app.settings, [d["name"] for d in docs])

    rows = free_nodes(app.store, names, dry_run=dry_run, force=force, parallel=app.setting("parallel"),
                      before_release=before, notify=stderr)
    rc = results(rows, as_json, "free")
    failed = [r["node"] for r in rows if r.get("outcome") == "failed"]
    if failed:
        unsure = any("reconcile" in (r.get("reason") or "") for r in rows)
        stderr("rhaas: next: " + ("run 'rhaas reconcile' once the upstream answers, then " if unsure else "")
               + "retry with 'rhaas free " + " ".join(failed[:10]) + (" ..." if len(failed) > 10 else "") + "'")
    sys.exit(rc)


@click.command()
@json_option
@dry_run_option
@pass_app
def reconcile(app: App, as_json, dry_run):
    """Compare the inventory with the upstream project and repair drift.

    \b
    Example:
      rhaas reconcile --dry-run
    """
    from rhaas.core.lease import reconcile as do_reconcile

    _drop_expired(app)
    changes = do_reconcile(app.store, dry_run=dry_run, notify=stderr)
    if as_json:
        emit_json(changes)
    elif changes:
        table(["node", "change"], [[c["node"], c["change"]] for c in changes])
    else:
        click.echo("inventory matches upstream", err=True)


@click.command("list")
@click.option("--available", "which", flag_value="available", help="Only nodes no downstream project holds.")
@click.option("--assigned", "which", flag_value="assigned", help="Only nodes a downstream project holds.")
@json_option
@quiet_option
@pass_app
def list_nodes(app: App, which, as_json, quiet):
    """List nodes in the inventory.

    \b
    Examples:
      rhaas list
      rhaas list --available -q | head -8 | rhaas kexec --image b -
      rhaas list --json | jq '.[].name'
    """
    from rhaas.core.batch_lease import time_left
    from rhaas.core.kexec.owner import live_views

    _resolve_journal(app)
    _drop_expired(app)
    docs = live_views(app.snapshot().nodes())  # a dead kexec run's nodes show as interrupted
    if which == "available":
        docs = [d for d in docs if not d.get("project")]
    elif which == "assigned":
        docs = [d for d in docs if d.get("project")]
    if quiet:
        # names are valid: the store refuses an inventory holding a bad one (exit 4)
        sys.stdout.write("".join(d["name"] + "\n" for d in docs))
        return
    if as_json:
        emit_json([_with_lease(d) for d in docs])
        return
    # the lease columns appear only when some lease here has an end
    ends = any(d.get("lease_until") or d.get("assign_until") for d in docs)
    table(
        ["node", "state", "project", "status", "image", "last boot", "phases"]
        + (["time left", "project time left"] if ends else []),
        [
            [
                d["name"],
                "returning" if d.get("returning") and not d.get("project") else
                "assigned" if d.get("project") else "available",
                d.get("project"),
                d.get("status"),
                d.get("image"),
                human_time(d.get("last_boot")),
                phases_text(d.get("phases")),
            ]
            + ([time_left(d.get("lease_until")), time_left(d.get("assign_until"))] if ends else [])
            for d in docs
        ],
    )


def _resolve_journal(app: App) -> None:
    """Finish what a killed lease/free left in the journal (only then is the upstream asked)."""
    from rhaas.core import journal
    from rhaas.errors import RhaasError

    if not journal.stale_entries(app.snapshot()):
        return
    try:
        journal.resolve(app.store, notify=stderr)
    except RhaasError as exc:
        stderr(f"rhaas: warning: an interrupted lease or free is not resolved yet ({exc}); "
               "run 'rhaas reconcile' once the upstream answers")


@click.command()
@click.argument("name", shell_complete=complete_nodes)
@json_option
@pass_app
def show(app: App, name, as_json):
    """Show one node.

    \b
    Example:
      rhaas show node-01 --json
    """
    from rhaas.core.instance import require_node
    from rhaas.core.kexec.owner import live_view

    pub = public_node(live_view(require_node(app.snapshot(), name)))
    if as_json:
        emit_json(pub)
        return
    for key, value in pub.items():
        if key == "last_boot":
            value = human_time(value)
        elif key == "phases":
            value = phases_text(value)
        elif isinstance(value, (list, dict)):
            import json

            value = json.dumps(value, sort_keys=True)
        click.echo(f"{key + ':':15} {'-' if value in (None, '') else value}")


@click.command()
@click.argument("node", required=False, shell_complete=complete_nodes)
@click.option("-n", "--limit", type=int, default=50, show_default=True, help="Newest N events (0: all).")
@json_option
@pass_app
def events(app: App, node, limit, as_json):
    """Show the event log, optionally for one node.

    \b
    Example:
      rhaas events node-01 -n 10
    """
    evs = app.snapshot().events()
    if node:
        evs = [e for e in evs if e.get("node") == node]
    if limit:
        evs = evs[-limit:]
    if as_json:
        emit_json(evs)
        return
    import json

    table(
        ["time", "actor", "action", "node", "outcome", "detail"],
        [
            [human_time(e["time"]), e.get("actor"), e["action"], e.get("node"), e.get("outcome"),
             json.dumps(e.get("detail"), sort_keys=True) if e.get("detail") else None]
            for e in evs
        ],
    )
