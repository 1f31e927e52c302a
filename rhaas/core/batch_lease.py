"""Leasing from another rhaas in one call (the ``rhaas.batch`` extension), and leases with an end.

Against an upstream that offers ``rhaas.batch`` in list_active_extensions, a lease of many nodes
is one request (per BATCH_CHUNK nodes) answered with the nodes taken, each as show_node would
show it, so no per-node call follows. Against a real HIL (which answers a tenant's
list_active_extensions with 401, or lists no such extension) nothing changes: rhaas.core.lease
makes one connect_node per node.

A lease with an end (``--for``) exists only through ``rhaas.batch``: the serving instance keeps
the end and reclaims the node. This side records the end it was told (``lease_until``, from the
answer or the node's ``rhaas.lease_until`` metadata), shows the time left, and drops a node
whose lease has ended at its next command (:func:`drop_expired`, with an ``expired`` event).
"""

from __future__ import annotations

import math
import re
import time

from rhaas.adapters.hil import decode_metadata
from rhaas.adapters.hil_answers import Checker, UpstreamMisbehaved
from rhaas.errors import APIError, UpstreamUnreachable, UsageError
from rhaas.protocol import BATCH_EXTENSION

OWNED = "Node is already owned by a project."  # rhaas serve's (and HIL's) words for a taken node
BATCH_CHUNK = 1000  # nodes per call: keeps each answer (node documents) under the client's 1 MiB cap
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 10 * 365 * 86400.0


def parse_duration(text: str) -> float:
    """``5s``, ``10m``, ``2h``, ``1d`` or plain seconds -> seconds; UsageError otherwise."""
    m = _DURATION.match(text or "")
    seconds = float(m.group(1)) * _UNIT[m.group(2)] if m else 0.0
    if not m or not 0 < seconds <= MAX_DURATION_S or not math.isfinite(seconds):
        raise UsageError(f"invalid duration {text!r}: expected a number with s, m, h or d (e.g. 5s, 10m, 2h)")
    return seconds


def offers_batch(client) -> bool:
    """Whether the upstream serves rhaas.batch (a real HIL: 401/404 to a tenant, or not listed)."""
    try:
        names = client.call("list_active_extensions")
    except APIError:
        return False
    return isinstance(names, list) and BATCH_EXTENSION in names


class Batch:
    """What one batch lease gave: nodes held, per-node refusals, the node documents shown."""

    def __init__(self):
        self.held: list[str] = []
        self.failed: list = []  # NodeResult.failed rows for named nodes
        self.shown: dict[str, dict] = {}
        self.stop_reason: str | None = None
        self.answer_lost = False  # a call whose answer never came: the upstream may hold its nodes


def _checked_answer(client, answer, asked: list[str], what: str) -> tuple[list[str], dict, dict]:
    check = Checker(client.url, what, client.refused.append)
    doc = check.obj(answer, "a rhaas.batch answer")
    taken, refused, shown = doc.get("nodes"), doc.get("refused") or {}, doc.get("shown") or {}
    if not isinstance(taken, list) or not isinstance(refused, dict) or not isinstance(shown, dict):
        raise UpstreamMisbehaved(f"upstream {client.url} misbehaved: {what} answered no list of nodes")
    asked_set = set(asked)
    if any(not isinstance(n, str) or n not in asked_set for n in taken) or len(set(taken)) != len(taken):
        raise UpstreamMisbehaved(f"upstream {client.url} misbehaved: {what} answered nodes it was not asked for")
    out = {}
    for name in taken:
        node = check.node(shown.get(name), name)
        node["metadata"] = decode_metadata(node["metadata"])
        out[name] = node
    why = {n: (r if isinstance(r, str) else "refused")[:200] for n, r in refused.items() if n in asked_set}
    # the words of the one-call-per-node path (a 409 on connect_node)
    why = {n: "already leased by another project" if r == OWNED else r for n, r in why.items()}
    return taken, why, out


def connect_batch(store, client, project: str, candidates: list[str], count: int | None, named: bool,
                  lease_for: float | None = None) -> Batch | None:
    """Lease through rhaas.batch; None when the upstream does not offer it (then: one call per node).

    ``named``: take exactly ``candidates`` (each refused one is reported); otherwise take ``count``
    of them, a refused one replaced by the next candidate.
    """
    from rhaas import settings
    from rhaas.core.instance import NodeResult

    mode = settings.resolve(store.snapshot().config(), "upstream-batch")[0]
    if mode not in ("auto", "off"):
        raise UsageError(f"setting upstream-batch wants auto or off, got {mode[:40]!r}")
    if mode == "off" or not offers_batch(client):
        if lease_for is not None:
            raise UsageError("the upstream does not offer leases with an end (rhaas.batch); lease without --for")
        return None
    batch = Batch()
    queue = list(candidates)
    while queue:
        need = len(queue) if named else count - len(batch.held)
        if need <= 0:
            break
        wave, queue = queue[:min(need, BATCH_CHUNK)], queue[min(need, BATCH_CHUNK):]
        body: dict = {"nodes": wave}
        if lease_for is not None:
            body["for_seconds"] = lease_for
        what = f"POST /v0/rhaas/project/{project}/connect_nodes"
        try:
            answer = client.call("rhaas_connect_nodes", body, project=project)
            taken, refused, shown = _checked_answer(client, answer, wave, what)
        except (APIError, UpstreamUnreachable) as exc:
            # what earlier waves took is kept (and recorded by the caller); the rest failed
            batch.stop_reason = getattr(exc, "msg", None) or str(exc)
            batch.answer_lost = isinstance(exc, UpstreamUnreachable)
            if named:
                batch.failed += [NodeResult.failed(n, batch.stop_reason) for n in wave + queue]
            break
        batch.held += taken
        batch.shown.update(shown)
        if named:
            batch.failed += [NodeResult.failed(n, refused.get(n, "not taken upstream")) for n in wave if n not in shown]
    return batch


def lease_until_of(meta: dict) -> float | None:
    """The end of a lease as the upstream's metadata gives it (``rhaas.lease_until``), checked."""
    value = (meta or {}).get("rhaas.lease_until")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def drop_expired(store, now: float | None = None) -> list[str]:
    """Remove the nodes whose lease from the upstream has ended (one ``expired`` event each)."""
    now = time.time() if now is None else now

    def ended(d: dict) -> bool:
        until = d.get("lease_until")
        return d.get("source") == "leased" and isinstance(until, (int, float)) and until <= now

    if not any(ended(d) for d in store.snapshot().data["nodes"].values()):
        return []
    with store.transaction() as tx:
        gone = [d["name"] for d in tx.nodes() if ended(d)]
        tx.remove_nodes(gone)
        for name in gone:
            tx.event("expired", name, "ok", reason="the lease from the upstream ended")
    return gone


def time_left(until, now: float | None = None) -> str | None:
    """``4m10s``-style time left until ``until`` (epoch), ``ended`` after it, None for no end."""
    if not isinstance(until, (int, float)) or isinstance(until, bool):
        return None
    left = int(until - (time.time() if now is None else now))
    if left <= 0:
        return "ended"
    days, rest = divmod(left, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    shown = [f"{v}{u}" for v, u in parts if v]
    return "".join(shown[:2])
