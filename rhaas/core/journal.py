"""The lease/free journal: intents written before upstream calls, resolved after a kill.

A lease or free writes one ``journal`` entry for its batch (one store write) before its first
upstream call, and removes it in the same write that records the outcome. An entry whose
owning process is gone (SIGKILL, power loss, the upstream dying mid-call) is resolved by the
next lease, free, reconcile or list, by asking the upstream what the project holds:

* lease: every node the project holds upstream but the inventory lacks becomes an inventory
  record (a lease by COUNT does not know in advance which nodes it will connect, so this is
  judged on the project's nodes, not on a list); intents not held upstream are dropped;
* free: each node of the entry no longer held upstream is removed from the inventory; one
  still held stays, with a line saying to run ``rhaas free`` again.

An owner is a (pid, process start time) pair read from /proc, so a recycled pid is not
mistaken for the run that wrote the entry. A killed run's last requests may still be applied
upstream after it died, so the resolution reads the project's nodes until two reads agree
(:func:`settled_project_nodes`); a request the upstream applies later still is found by
``rhaas reconcile``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

Notify = Callable[[str], None]


def _stderr(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process ``pid``, or None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):  # a zombie has finished its work
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        pass
    if not os.path.isdir("/proc/self"):  # no procfs: fall back to "a process with that pid exists"
        try:
            os.kill(pid, 0)
            return 0
        except PermissionError:
            return 0
        except OSError:
            return None
    return None


def owner() -> dict:
    """This process, as recorded in a journal entry."""
    pid = os.getpid()
    return {"pid": pid, "pid_start": process_start(pid), "time": time.time()}


def owner_alive(entry: dict) -> bool:
    pid = entry.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False  # an entry handed over for resolution (e.g. upstream unreachable)
    start = process_start(pid)
    return start is not None and (entry.get("pid_start") in (None, 0) or start == entry.get("pid_start"))


def begin(store, op: str, nodes: list[str], **fields) -> int:
    """Write the intent of a batch (one store write); returns its journal id."""
    entry = dict(owner(), op=op, nodes=list(nodes), **fields)
    with store.transaction() as tx:
        return tx.table("journal").insert(entry)


def finish(tx, entry_id: int, unresolved: list[str] | None = None) -> None:
    """Inside the caller's confirming transaction: drop the entry, or hand the ``unresolved``
    nodes over to the next command (the upstream could not say what happened to them)."""
    tbl = tx.table("journal")
    if str(entry_id) not in tx.data.get("journal", {}):
        return
    if unresolved:
        tbl.update({"pid": None, "nodes": list(unresolved)}, doc_ids=[entry_id])
    else:
        tbl.remove(doc_ids=[entry_id])


def stale_entries(view) -> dict[str, dict]:
    """Journal entries whose owner is gone (cheap: no upstream call, usually an empty table)."""
    entries = view.data.get("journal")
    if not isinstance(entries, dict):
        return {}
    return {k: e for k, e in entries.items() if isinstance(e, dict) and not owner_alive(e)}


SETTLE_PAUSE = 0.3  # least pause between two reads of the project's nodes
SETTLE_PAUSE_MAX = 2.0
SETTLE_DEADLINE = 10.0  # at most this long waiting for the upstream to settle


def _project_nodes(client, project: str, notify: Notify) -> set[str]:
    from rhaas.core.lease import checked_names

    return set(checked_names(client.project_nodes(project), notify))


def settled_project_nodes(client, project: str, notify: Notify) -> set[str]:
    """The project's nodes once two reads SETTLE_PAUSE apart agree (within SETTLE_DEADLINE).

    A killed run's last requests may still be in the upstream's hands (sent, not yet applied):
    judging on the first read would miss a node connected a moment later. Only a resolution
    (rare: after a kill) pays this pause.
    """
    deadline = time.monotonic() + SETTLE_DEADLINE
    started = time.monotonic()
    last = _project_nodes(client, project, notify)
    # a loaded upstream applies requests more slowly: pause three times what one read took
    pause = min(SETTLE_PAUSE_MAX, max(SETTLE_PAUSE, 3 * (time.monotonic() - started)))
    while time.monotonic() < deadline:
        time.sleep(pause)
        now = _project_nodes(client, project, lambda msg: None)
        if now == last:
            break
        last = now
    return last


def resolve(store, client=None, notify: Notify | None = None) -> list[dict]:
    """Resolve stale journal entries against the upstream; one line per resolved node.

    Returns [{"node", "change"}]. Does nothing (and asks nothing) when there is no stale entry.
    """
    from rhaas.core.instance import require_project, upstream_client
    from rhaas.core.lease import _details, node_from_upstream

    notify = notify or _stderr
    view = store.snapshot()
    stale = stale_entries(view)
    if not stale:
        return []
    project = require_project(view)
    client = client or upstream_client(store)
    held = settled_project_nodes(client, project, notify)
    ops = {e.get("op") for e in stale.values()}
    local = {d["name"] for d in view.nodes()}
    add = sorted(held - local) if "lease" in ops else []
    remove: list[str] = []
    still: list[str] = []
    for e in stale.values():
        if e.get("op") != "free":
            continue
        for n in e.get("nodes") or []:
            if not isinstance(n, str) or n not in local:
                continue
            (still if n in held else remove).append(n)
    shown = _details(client, add, notify) if add else {}
    docs = [node_from_upstream(n, shown.get(n), client.url) for n in add]
    changes = [{"node": n, "change": "recorded (an interrupted lease connected it upstream)"} for n in add]
    changes += [{"node": n, "change": "removed (an interrupted free released it upstream)"} for n in sorted(set(remove))]
    with store.transaction() as tx:
        current = stale_entries(tx)
        ids = [int(k) for k in stale if k in current]
        if ids:
            tx.table("journal").remove(doc_ids=ids)
        fresh = [d for d in docs if tx.node(d["name"]) is None]
        tx.put_nodes(fresh)
        tx.remove_nodes(sorted(set(remove)))
        for c in changes:
            tx.event("journal", c["node"], "ok", change=c["change"])
    for c in changes:
        notify(f"rhaas: {c['node']}: {c['change']}")
    for n in sorted(set(still)):
        notify(f"rhaas: {n}: an interrupted free did not release it upstream; run 'rhaas free {n}' again")
    return changes


__all__ = ["begin", "finish", "owner", "owner_alive", "process_start", "resolve", "stale_entries"]
