"""Options and helpers shared by the command modules (output, node arguments, the app)."""

from __future__ import annotations

import json
import os
import sys
from functools import cached_property

import click

from rhaas.errors import UsageError


class CommandError(click.ClickException):
    """A RhaasError on its way out: one line on stderr, the error's own exit code."""

    prefix = "rhaas"

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"{self.prefix}: error: {self.format_message()}", err=True)


def fail_on(exc) -> CommandError:
    """A RhaasError as the CLI's one-line error, with the error's own exit code."""
    return CommandError(str(exc), exc.exit_code)


class App:
    """What a command needs: the store, the settings, the upstream client (all lazy)."""

    def __init__(self):
        from rhaas.core.instance import open_store  # not at import time: tab completion never needs TinyDB

        self.store = open_store()

    def snapshot(self):
        return self.store.snapshot()

    @cached_property
    def settings(self) -> dict:
        from rhaas import settings

        return settings.effective(self.snapshot().config())

    def setting(self, key: str):
        return self.settings[key]

    @cached_property
    def upstream(self):
        from rhaas.core.instance import upstream_client

        return upstream_client(self.store)


pass_app = click.make_pass_decorator(App, ensure=True)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(f)


def quiet_option(f):
    return click.option("-q", "--quiet", is_flag=True, help="Print node names only, one a line.")(f)


def dry_run_option(f):
    return click.option("--dry-run", is_flag=True, help="Print what would happen; change nothing.")(f)


def emit_json(doc) -> None:
    """JSON on stdout. A list prints one element a line: C-encoder fast for 10k nodes, and
    still readable and greppable."""
    if isinstance(doc, list):
        body = ",\n".join(json.dumps(item, sort_keys=True, default=str) for item in doc)
        sys.stdout.write("[\n" + body + "\n]\n" if doc else "[]\n")
    else:
        click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def expand_nodes(args, what: str = "nodes") -> list[str]:
    """Node arguments: names, nodesets like ``node-[01-16]``, or ``-`` for names on stdin, one a line.

    Every name is checked (rhaas.model.check_name) before anything is done: one bad name, on the
    command line or on a line of stdin, is a one-line usage error (exit 2). Nothing at all is a
    usage error too ("no nodes given").
    """
    from rhaas.model import check_name

    out: list[str] = []
    for arg in args:
        if arg == "-":
            # one name (or node set) a line, as `rhaas list -q` prints them; a line is never split
            # further, so a name with a space or a newline cannot turn into two other names
            for lineno, line in enumerate(sys.stdin.read().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    out.extend(_expand_one(line.strip()))
                except UsageError as exc:
                    raise UsageError(f"stdin line {lineno}: {exc}") from None
            continue
        out.extend(_expand_one(arg))
    seen = set()
    uniq = [n for n in out if not (n in seen or seen.add(n))]
    if not uniq:
        raise UsageError(f"no {what} given")
    for n in uniq:
        check_name(n, "node name")
    return uniq


def _expand_one(arg: str) -> list[str]:
    from rhaas.model import check_name

    if any(c in arg for c in "[],"):
        from ClusterShell.NodeSet import NodeSet, NodeSetParseError

        try:
            names = list(NodeSet(arg))
        except NodeSetParseError as exc:
            raise UsageError(f"invalid node set {arg!r}: {exc}") from None
        return [check_name(n, "node name") for n in names]
    return [check_name(arg, "node name")]


def is_terminal() -> bool:
    return sys.stdout.isatty() and not os.environ.get("RHAAS_PLAIN")
