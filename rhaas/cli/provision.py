"""`rhaas kexec`: parse, call rhaas.core.kexec, render.

Nothing here touches SSH: paramiko and rich are imported inside the code paths that use them.
"""

from __future__ import annotations

import sys
from typing import Self

import click

from rhaas.cli.common import (
    App,
    CommandError,
    dry_run_option,
    emit_json,
    expand_nodes,
    fail_on,
    is_terminal,
    json_option,
    pass_app,
)
from rhaas.cli.complete import complete_images, complete_nodes
from rhaas.cli.output import phases_text, table
from rhaas.errors import RhaasError, UsageError

OK_OUTCOMES = {"ok", "loaded"}


# -- rhaas kexec ------------------------------------------------------------------------------------
@click.command()
@click.argument("nodes", nargs=-1, required=True, metavar="NODE...", shell_complete=complete_nodes)
@click.option("--image", "image_name", metavar="NAME", shell_complete=complete_images,
              help="Image to boot (default: the standby image).")
@click.option("--kernel", metavar="PATH", help="Boot this kernel instead of a recorded image.")
@click.option("--initrd", metavar="PATH", help="The initrd that goes with --kernel.")
@click.option("--append", default=None, metavar="ARGS", help="Kernel arguments with --kernel (passed intact).")
@click.option("--parallel", type=click.IntRange(min=1), default=None, help="Nodes in flight at once (default: setting 'parallel').")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds a node may take to come back after the jump (default: setting 'timeout').")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds for one SSH connect (default: setting 'connect-timeout').")
@click.option("--no-fallback", is_flag=True, help="Do not power cycle into PXE when kexec fails.")
@click.option("--load-only", is_flag=True, help="Stage and load only; jump later with --exec.")
@click.option("--exec", "do_exec", is_flag=True, help="Jump into what --load-only loaded, and verify.")
@click.option("--retries", type=click.IntRange(min=0, max=100), default=0, show_default=True,
              help="Kexec a failed node again up to N times before the fallback.")
@click.option("--ok-file", type=click.Path(dir_okay=False, writable=True), default=None, metavar="PATH",
              help="Write the names of the nodes that verified (or loaded), one a line.")
@click.option("--failed-file", type=click.Path(dir_okay=False, writable=True), default=None, metavar="PATH",
              help="Write the names of the other nodes, one a line: the input of a retry.")
@click.option("--via", type=click.Choice(["auto", "ssh", "upstream"]), default="auto", show_default=True,
              help="Kexec over SSH, or through the upstream's rhaas.kexec (auto: upstream when it offers it).")
@json_option
@dry_run_option
@pass_app
def kexec(app: App, nodes, image_name, kernel, initrd, append, parallel, timeout, connect_timeout,
          no_fallback, load_only, do_exec, retries, ok_file, failed_file, via, as_json, dry_run):
    """Jump nodes into a new kernel over SSH, and verify they booted it.

    Per node: stage the kernel and initrd in the node's cache (setting node-cache-dir,
    default /run/rhaas/<sha256>; nothing is sent twice; a node pulls them over HTTP from
    this run or from peers and checks their sha256, else they go over SFTP), add an overlay
    with rhaas's and the tenant's SSH keys (always over SSH), `kexec -l` with
    the image's arguments plus rhaas.nonce=<random>, jump, and wait until the node answers
    with a new boot id and the nonce in /proc/cmdline. A node that fails is set to boot
    from PXE and power cycled through its BMC or upstream (unless --no-fallback), at most
    'fallback-window' nodes at a time (setting). --retries N kexecs a failed node again
    first. A node whose metadata has rhaas.kexec=no goes straight to the power path.

    Nodes leased from another `rhaas serve` that offers rhaas.kexec are kexec'd by the level
    that holds their SSH access: the image is uploaded there once and the upstream does the
    above (--via ssh|upstream forces a path; auto takes the upstream when it offers it).

    NODE is a name, a node set such as node-[01-16], or '-' to read names from stdin.

    \b
    Examples:
      rhaas kexec node-[01-16] --image debian
      rhaas kexec node-07 --kernel ./vmlinuz --initrd ./initrd.gz --append "console=ttyS0"
      rhaas kexec node-[01-64] --image debian --load-only && rhaas kexec node-[01-64] --exec
      rhaas list -q | rhaas kexec - --image debian --json
      rhaas kexec node-[01-64] --image debian --retries 1 --failed-file failed
      rhaas kexec --image debian - < failed

    Exit status: 0 if every node verified (or loaded, with --load-only); 1 if any node
    failed or came back only through the fallback (named on stderr); 2 for usage errors.
    """
    from rhaas.core import kexec as core

    try:
        opts, img, name = _kexec_setup(app, image_name, kernel, initrd, append, parallel, timeout,
                                       connect_timeout, no_fallback, load_only, do_exec, retries)
        _check_list_files(ok_file, failed_file)
        names = expand_nodes(nodes)
        if dry_run:
            steps = core.plan(app.snapshot(), names, img, opts, name)
            _render_plan(steps, as_json)
            if any(s["reason"] for s in steps):
                sys.exit(1)
            return
        stats: dict = {}
        with _Progress(len(names), opts.mode) as progress:
            from rhaas.core.kexec.via_upstream import kexec_routed

            results = kexec_routed(app.store, app.settings, names, img, opts, name, on_result=progress.update, via=via,
                                   stats=stats)
    except RhaasError as exc:
        raise fail_on(exc) from None
    _render(results, as_json)
    _transfer_summary(results, stats, as_json)
    bad = [r for r in results if r.outcome not in OK_OUTCOMES]
    _write_lists(results, ok_file, failed_file)
    if bad:
        shown = ", ".join(f"{r.node} ({r.outcome})" for r in bad[:20]) + (
            f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        )
        click.echo(f"rhaas: kexec did not verify on {len(bad)} of {len(results)} nodes: {shown}", err=True)
        click.echo(f"rhaas: next: {_retry_hint(bad, image_name, kernel, initrd, append, failed_file)}",
                   err=True)
        sys.exit(1)


def _check_list_files(*paths) -> None:
    """Refuse before the run a list file that could not be written after it."""
    import os

    for path in paths:
        if path is None:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise UsageError(f"cannot write {path}: {directory} is not a writable directory")


def _write_lists(results, ok_file, failed_file) -> None:
    """The node names that worked and those that did not, one a line, each file replaced atomically."""
    from rhaas.atomic import write_atomic

    for path, want_ok in ((ok_file, True), (failed_file, False)):
        if path is None:
            continue
        names = [r.node for r in results if (r.outcome in OK_OUTCOMES) == want_ok]
        try:
            write_atomic(path, "".join(n + "\n" for n in names), mode=0o644)
        except OSError as exc:
            raise CommandError(f"cannot write {path}: {exc.strerror or exc}", 2) from None


def _retry_hint(bad, image_name, kernel, initrd, append, failed_file) -> str:
    """The command that runs the failed nodes again."""
    import shlex

    if kernel:
        src = f"--kernel {shlex.quote(kernel)} --initrd {shlex.quote(initrd)}"
        if append is not None:
            src += f" --append {shlex.quote(append)}"
    else:
        image = image_name or (bad[0].image if len({r.image for r in bad}) == 1 else None)
        src = f"--image {shlex.quote(image)}" if image else "--image IMAGE"
    if failed_file:
        return f"rhaas kexec {src} - < {shlex.quote(failed_file)}"
    if len(bad) <= 20:
        return f"rhaas kexec {src} " + " ".join(r.node for r in bad)
    return f"rerun with --failed-file PATH, then: rhaas kexec {src} - < PATH"


def _kexec_setup(app, image_name, kernel, initrd, append, parallel, timeout, connect_timeout,
                 no_fallback, load_only, do_exec, retries=0):
    from rhaas.core import images
    from rhaas.core.kexec import KexecOptions, adhoc_image_name

    if load_only and do_exec:
        raise UsageError("--load-only and --exec exclude each other")
    if image_name and (kernel or initrd):
        raise UsageError("give either --image or --kernel/--initrd, not both")
    if append is not None and not kernel:
        raise UsageError("--append goes with --kernel/--initrd; an image carries its own arguments")
    if (kernel or initrd) and not (kernel and initrd):
        raise UsageError("--kernel and --initrd go together")
    if append is not None:
        images.check_append(append)
    mode = "exec" if do_exec else "load" if load_only else "full"
    img = name = None
    if do_exec:
        if image_name or kernel:
            raise UsageError("--exec boots what --load-only loaded; it takes no image")
    elif kernel:
        img = images.make_image("adhoc", kernel, initrd, append)
        name = adhoc_image_name(img)
    else:
        image_name = image_name or app.setting("standby-image")
        if not image_name:
            raise UsageError("give --image NAME or --kernel/--initrd (no standby-image is set)")
        img = images.get_image(app.snapshot(), image_name)
        name = img.name
    opts = KexecOptions.from_settings(
        app.settings, mode=mode, timeout=timeout, connect_timeout=connect_timeout, parallel=parallel,
        fallback=not no_fallback, retries=retries,
    )
    return opts, img, name


class _Progress:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int, mode: str):
        self.total = total
        self.mode = mode
        self.bar = None
        self.counts = {"ok": 0, "loaded": 0, "fallback": 0, "failed": 0}

    def __enter__(self) -> Self:
        if sys.stderr.isatty() and self.total > 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            # no refresh thread: worker processes are forked while this is open
            self.bar = Progress(
                TextColumn("kexec {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), auto_refresh=False, transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(self._text(), total=self.total)
            self.bar.refresh()
        return self

    def _text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.counts.items() if v) or self.mode

    def update(self, result) -> None:
        self.counts[result.outcome] = self.counts.get(result.outcome, 0) + 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=self._text())
            self.bar.refresh()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _transfer_text(transfer: dict | None) -> str | None:
    """``peer:sim-0003 64.0MB``, ``origin 64.0MB``, ``sftp 64.0MB``, ``cache``."""
    if not transfer or not transfer.get("path"):
        return None
    path, n = transfer["path"], transfer.get("bytes") or 0
    where = f"peer:{transfer.get('source')}" if path == "peer" else path
    return where if path == "cache" else f"{where} {n / 1e6:.1f}MB"


def _transfer_summary(results, stats: dict, as_json: bool) -> None:
    """One stderr line for the run: the bytes the origin sent and how many nodes took each path."""
    if "origin_bytes" not in stats:
        return
    paths: dict[str, int] = {}
    for r in results:
        if r.transfer.get("path"):
            paths[r.transfer["path"]] = paths.get(r.transfer["path"], 0) + 1
    fetched = sum(r.transfer.get("bytes") or 0 for r in results)
    if as_json:
        import json

        doc = {"origin_bytes": stats["origin_bytes"], "node_bytes": fetched, "paths": paths}
        click.echo(json.dumps({"rhaas_kexec_transfer": doc}, sort_keys=True), err=True)
        return
    counts = ", ".join(f"{k} {v}" for k, v in sorted(paths.items())) or "none"
    click.echo(f"rhaas: image transfer: origin sent {stats['origin_bytes']} bytes, nodes received {fetched} "
               f"bytes; paths: {counts}", err=True)


def _render(results, as_json: bool) -> None:
    if as_json:
        emit_json([r.public() for r in results])
        return
    rows = [
        [r.node, r.outcome, r.image, (r.boot_id or "")[:8] or None, phases_text(r.phases) or None,
         _transfer_text(r.transfer), r.reason]
        for r in results
    ]
    if is_terminal():
        from rich.console import Console
        from rich.table import Table

        t = Table(show_edge=False, header_style="bold")
        for c in ("node", "outcome", "image", "boot id", "phases (s)", "transfer", "reason"):
            t.add_column(c, overflow="fold")
        for row in rows:
            style = "green" if row[1] in OK_OUTCOMES else "yellow" if row[1] == "fallback" else "red"
            row[1] = f"[{style}]{row[1]}[/{style}]"
            t.add_row(*["" if v is None else str(v) for v in row])
        Console().print(t)
    else:
        table(["node", "outcome", "image", "boot_id", "phases", "transfer", "reason"], rows)


def _render_plan(steps: list[dict], as_json: bool) -> None:
    if as_json:
        emit_json([{**s, "dry_run": True} for s in steps])
        return
    for s in steps:
        if s["reason"]:
            click.echo(f"{s['node']}\tcannot kexec\t{s['reason']}")
        else:
            verb = {"full": "would kexec", "load": "would load", "exec": "would jump into"}[s["mode"]]
            if s.get("power_only"):
                verb = "would power cycle into PXE (rhaas.kexec=no), not kexec"
            click.echo(f"{s['node']}\t{verb}\t{s['image']}\t{s['ssh']}")
