"""Rendering: JSON, plain tab-separated lines for pipes, rich tables for terminals."""

from __future__ import annotations

import os
import sys

import click

from rhaas.cli.common import emit_json, is_terminal


def table(columns: list[str], rows: list[list], title: str | None = None) -> None:
    """A rich table on a terminal, tab-separated text (with a header) when piped."""
    if is_terminal():
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, show_edge=False, header_style="bold")
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*["" if v is None else str(v) for v in r])
        Console(no_color=bool(os.environ.get("NO_COLOR"))).print(t)
    else:
        click.echo("\t".join(c.upper() for c in columns))
        for r in rows:
            click.echo("\t".join("-" if v is None else str(v) for v in r))


def results(rows: list[dict], as_json: bool, what: str, extra_cols: tuple = ()) -> int:
    """Print per-node results; return the exit code (0 all ok, 1 otherwise)."""
    ok_words = {"ok", "would-lease", "would-free", "would-run"}
    if as_json:
        emit_json(rows)
    elif rows:
        cols = ["node", "outcome"] + list(extra_cols) + ["reason"]
        table(cols, [[r.get(c) for c in cols] for r in rows])
    bad = [r["node"] for r in rows if r.get("outcome") not in ok_words]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        click.echo(f"rhaas: {what} failed for {len(bad)} of {len(rows)}: {shown}", err=True)
        return 1
    return 0


def human_time(ts) -> str | None:
    if not ts:
        return None
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def stderr(msg: str) -> None:
    click.echo(msg, err=True)


def phases_text(phases: dict) -> str:
    return " ".join(f"{k}={v:.1f}" for k, v in (phases or {}).items() if isinstance(v, (int, float)))


__all__ = ["human_time", "phases_text", "results", "stderr", "sys", "table"]
