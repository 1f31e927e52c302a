"""Leasing nodes from the upstream, freeing them, and reconciling the two views.

Whatever happens half-way (a node refused, the upstream gone), the inventory is written once
at the end with exactly the nodes the upstream confirmed, and every node gets its own result.
Before its first upstream call a lease or free writes its intent to the journal
(rhaas.core.journal), so a run killed in between leaves a record the next command resolves.
Node names from the upstream are checked (rhaas.model.name_ok) before they are used or stored;
a refused one is skipped with a one-line reason.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from rhaas.core.batch_lease import connect_batch, lease_until_of
from rhaas.core.instance import NodeResult, require_project, upstream_client
from rhaas.errors import (
    APIError,
    AuthorizationError,
    BlockedError,
    NotFoundError,
    RhaasError,
    UpstreamUnreachable,
    UsageError,
)
from rhaas.model import NAME_MAX, check_name, name_ok, new_node, parse_ssh

DETAIL_WORKERS = 8  # parallel show_node calls; a real HIL spends ~0.4 s of CPU on each
CONNECT_WORKERS = 8  # connect_node calls in flight at once
HOST_KEY_RE = re.compile(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-nistp[0-9]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,3}$")
Notify = Callable[[str], None]
RECONCILE_HINT = "run 'rhaas reconcile' once the upstream answers"


def _stderr(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _warner(notify: Notify | None) -> Notify:
    """Where the HIL client's refused upstream names go: one ``rhaas: skipped ...`` line each."""
    return lambda line: (notify or _stderr)(f"rhaas: skipped: {line}")


def checked_names(names, notify: Notify | None = None, what: str = "upstream node") -> list[str]:
    """The valid names of an upstream list; each refused one is skipped with a one-line reason."""
    if not isinstance(names, list):
        from rhaas.errors import HTTPError

        raise HTTPError("upstream answered a node list with something that is not a list")
    out = []
    for n in names:
        if name_ok(n):
            out.append(n)
        else:
            shown = repr(n[:NAME_MAX]) + ("..." if len(n) > NAME_MAX else "") if isinstance(n, str) else repr(n)
            (notify or _stderr)(f"rhaas: skipped {what} {shown}: not a valid node name")
    return out


def node_from_upstream(name: str, shown: dict | None, upstream_url: str) -> dict:
    """An inventory record for a node just leased, from the upstream's show_node."""
    shown = shown if isinstance(shown, dict) else {}
    meta = dict(shown.get("metadata") if isinstance(shown.get("metadata"), dict) else {})
    ssh = meta.get("rhaas.ssh")
    try:
        ssh = str(parse_ssh(ssh)) if isinstance(ssh, str) else None
    except UsageError:
        ssh = None  # malformed: "no SSH path known", never guess
    host_key = meta.get("rhaas.ssh_host_key")
    if not (isinstance(host_key, str) and HOST_KEY_RE.match(host_key)):
        host_key = None  # not a "TYPE BASE64" key line: no pinned key, never a mangled one
    image = meta.get("rhaas.image")
    nics = []
    for n in shown.get("nics") or []:  # labels and networks are names too: a bad one is left out
        if not isinstance(n, dict) or not name_ok(n.get("label")):
            continue
        nets = n.get("networks") if isinstance(n.get("networks"), dict) else {}
        nics.append({
            "label": n["label"],
            "macaddr": n.get("macaddr") if isinstance(n.get("macaddr"), str) else None,
            "networks": {str(ch): net for ch, net in nets.items() if name_ok(net)},
        })
    return new_node(
        name,
        "leased",
        upstream_name=name,
        ssh=ssh,
        ssh_host_key=host_key,
        nics=nics,
        metadata={k: v for k, v in meta.items() if not k.startswith("rhaas.")},
        image=image if name_ok(image) else None,
        upstream={"endpoint": upstream_url, "node": name},
        lease_until=lease_until_of(meta),
    )


def _details(client, names: list[str], notify: Notify | None = None) -> dict[str, dict | None]:
    """show_node for each name. A node whose document cannot be read is recorded without details,
    and said once per reason on stderr (an upstream gone mid-way is one line, not one per node)."""

    def show(name):
        try:
            return name, client.show_node(name), None
        except RhaasError as exc:
            return name, None, str(exc)

    with ThreadPoolExecutor(max_workers=min(DETAIL_WORKERS, max(1, len(names)))) as pool:
        answers = list(pool.map(show, names))
    why: dict[str, list[str]] = {}
    for name, _, reason in answers:
        if reason:
            why.setdefault(reason, []).append(name)
    for reason, nodes in why.items():
        shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
        (notify or _stderr)(f"rhaas: recorded without details: {shown}: {reason}")
    return {name: doc for name, doc, _ in answers}


def lease_nodes(store, count: int | None = None, names: list[str] | None = None, dry_run: bool = False,
                notify: Notify | None = None, lease_for: float | None = None):
    """Take COUNT free nodes, or the named ones, into our upstream project (for ``lease_for`` s)."""
    from rhaas.core import journal

    if not names and (count is None or isinstance(count, bool) or not isinstance(count, int) or count <= 0):
        raise UsageError("lease wants a positive COUNT or node names")
    for n in names or []:
        check_name(n, "node name")
    view = store.snapshot()
    project = require_project(view)
    client = upstream_client(store, warn=_warner(notify))
    results: list[NodeResult] = []
    if not dry_run:
        recorded = {c["node"] for c in journal.resolve(store, client, notify) if c["change"].startswith("recorded")}
        view = store.snapshot()
        if names and recorded & set(names):  # the interrupted lease had taken them: done
            results = [NodeResult.ok(n, note="recorded from an interrupted lease") for n in names if n in recorded]
            names = [n for n in names if n not in recorded]
            if not names:
                return results
    if names:
        held_here = [n for n in names if view.node(n) is not None]
        if held_here:
            raise UsageError(f"already leased: {', '.join(held_here)}")
    free = checked_names(client.free_nodes(), notify)
    if names:
        candidates = list(names)
    else:
        candidates = [n for n in free if view.node(n) is None]
    if dry_run:
        if names:
            return [NodeResult(node=n, outcome="would-lease" if n in free else "not-free", reason=None) for n in names]
        take = candidates[:count]
        out = [NodeResult(node=n, outcome="would-lease", reason=None) for n in take]
        if len(take) < count:
            out.append(NodeResult.failed(f"({count - len(take)} more)", "not enough free nodes upstream"))
        return out
    entry = journal.begin(store, "lease", names or [], count=count, project=project)
    unsure: list[str] = []  # connect calls whose answer was lost: the upstream may hold them
    held: list[str] = []
    stop_reason = None

    def connect(name):
        try:
            client.connect_node(project, name)
            return name, None
        except BlockedError:
            return name, "already leased by another project"
        except (UpstreamUnreachable, AuthorizationError) as exc:
            return name, exc
        except APIError as exc:
            return name, exc.msg or str(exc)

    # waves of concurrent connect_node calls: each wave asks for exactly what is still missing,
    # and a node someone else took (409) is replaced by the next candidate in the next wave
    queue = list(candidates)
    # another rhaas takes them all in one call (rhaas.batch); a real HIL: one connect_node each
    batch = connect_batch(store, client, project, candidates, count, bool(names), lease_for)
    if batch is not None:
        held, queue, stop_reason = batch.held, [], batch.stop_reason
        results += batch.failed
        if batch.answer_lost:
            unsure.append("*")
            stop_reason = f"{stop_reason}; {RECONCILE_HINT}"
    try:
        with ThreadPoolExecutor(max_workers=CONNECT_WORKERS) as pool:
            while queue and not stop_reason:
                need = len(queue) if names else count - len(held)
                if need <= 0:
                    break
                wave, queue = queue[:need], queue[need:]
                for name, err in pool.map(connect, wave):
                    if err is None:
                        held.append(name)
                    elif isinstance(err, (UpstreamUnreachable, AuthorizationError)):
                        stop_reason = str(err)
                        if isinstance(err, UpstreamUnreachable):
                            unsure.append(name)
                            stop_reason = f"{err}; {RECONCILE_HINT}"
                        if names:
                            results.append(NodeResult.failed(name, err))
                    elif names:
                        results.append(NodeResult.failed(name, err))
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        unsure.append("*")  # connect calls in flight finished unseen
    if names and stop_reason:
        results.extend(NodeResult.failed(n, stop_reason) for n in queue)
    if not names and len(held) < count:
        results.append(NodeResult.failed(f"({count - len(held)} more)", stop_reason or "not enough free nodes upstream"))
    shown = batch.shown if batch is not None else (_details(client, held, notify) if held else {})
    docs = [node_from_upstream(n, shown.get(n), client.url) for n in held]
    with store.transaction() as tx:
        tx.put_nodes(docs)
        for d in docs:
            tx.event("lease", d["name"], "ok", project=project)
        journal.finish(tx, entry, unresolved=unsure)
    results = [r for r in results if r.get("note")] + [NodeResult.ok(n) for n in held] + [
        r for r in results if not r.get("note")
    ]
    if stop_reason == "interrupted":
        raise KeyboardInterrupt
    return results


ALREADY_RELEASED = "already released upstream; removed here"


def _not_ours(client, project: str, up: str) -> bool:
    """True when the upstream says ``up`` is not in ``project`` (its list, not an error, decides)."""
    try:
        return up not in client.project_nodes(project)
    except RhaasError:
        return False


def release_upstream(client, project: str, node: dict) -> str | None:
    """HIL's release order: detach every network (wait DONE), disable OBM, detach the node.

    Returns None, or a note when the node was already not ours upstream (released by hand, or
    by a free that was killed before it recorded it): that counts as done.
    """
    up = node.get("upstream_name") or node["name"]
    try:
        shown = client.show_node(up)
        if isinstance(shown, dict) and shown.get("project") != project:
            return ALREADY_RELEASED
        nics = shown.get("nics") or []
    except (AuthorizationError, NotFoundError):
        if _not_ours(client, project, up):
            return ALREADY_RELEASED
        nics = node.get("nics") or []
    except APIError:
        nics = node.get("nics") or []
    try:
        for nic in nics:
            for network in sorted(set((nic.get("networks") or {}).values())):
                sid = client.detach_network(up, nic["label"], network)
                state = client.wait_action(sid)
                if state == "ERROR":
                    raise RhaasError(f"detaching {network} from {nic['label']} failed upstream")
                if state == "PENDING":
                    raise RhaasError(f"detaching {network} from {nic['label']} did not finish in time")
        client.set_obm(up, False)
        client.detach_node(project, up)
    except APIError as exc:
        if exc.status in (401, 403, 404) and _not_ours(client, project, up):
            return ALREADY_RELEASED
        raise
    return None


def free_nodes(store, names: list[str], dry_run: bool = False, force: bool = False, parallel: int = 8,
               before_release=None, notify: Notify | None = None):
    from rhaas.core import journal
    from rhaas.core.instance import require_nodes

    for n in names:
        check_name(n, "node name")
    view = store.snapshot()
    project = require_project(view)
    done: list[NodeResult] = []
    if not dry_run and journal.stale_entries(view):
        changes = journal.resolve(store, upstream_client(store, warn=_warner(notify)), notify)
        removed = {c["node"] for c in changes if c["change"].startswith("removed")}
        done = [NodeResult.ok(n, note="released by an interrupted free") for n in names if n in removed]
        names = [n for n in names if n not in removed]
        if not names:
            return done
        view = store.snapshot()
    docs = require_nodes(view, names)
    bad = [d["name"] for d in docs if d.get("source") != "leased"]
    if bad:
        raise UsageError(f"not leased from the upstream (registered here): {', '.join(bad)}; use 'rhaas node unregister'")
    busy = [d["name"] for d in docs if d.get("project") and not force]
    if busy:
        raise UsageError(
            f"assigned to a downstream project: {', '.join(busy)}; release them there first (or --force)"
        )
    if dry_run:
        return [NodeResult(node=d["name"], outcome="would-free", reason=None) for d in docs]
    client = upstream_client(store, warn=_warner(notify))
    if before_release:
        before_release(docs)
    entry = journal.begin(store, "free", [d["name"] for d in docs], project=project)
    unsure: list[str] = []

    def release(doc):
        try:
            note = release_upstream(client, project, doc)
            return NodeResult.ok(doc["name"], note=note) if note else NodeResult.ok(doc["name"])
        except UpstreamUnreachable as exc:
            unsure.append(doc["name"])
            return NodeResult.failed(doc["name"], f"{exc}; {RECONCILE_HINT}")
        except RhaasError as exc:
            return NodeResult.failed(doc["name"], f"{exc}; retry with 'rhaas free {doc['name']}'")

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(docs)))) as pool:
        results = list(pool.map(release, docs))
    freed = [r["node"] for r in results if r["outcome"] == "ok"]
    with store.transaction() as tx:
        tx.remove_nodes(freed)
        for r in results:
            detail = {"reason": r["reason"]}
            if r.get("note"):
                detail["note"] = r["note"]
            tx.event("free", r["node"], r["outcome"], **detail)
        journal.finish(tx, entry, unresolved=unsure)
    for r in results:
        if r.get("note"):
            (notify or _stderr)(f"rhaas: {r['node']}: {r['note']}")
    return done + results


def reconcile(store, dry_run: bool = False, notify: Notify | None = None):
    """Make the inventory's leased nodes match the upstream project's nodes exactly."""
    from rhaas.core import journal

    view = store.snapshot()
    project = require_project(view)
    client = upstream_client(store, warn=_warner(notify))
    if not dry_run and journal.stale_entries(view):
        journal.resolve(store, client, notify)
        view = store.snapshot()
    upstream = set(checked_names(client.project_nodes(project), notify))
    local = {d["name"] for d in view.nodes() if d.get("source") == "leased"}
    missing_here = sorted(upstream - local)
    gone_upstream = sorted(local - upstream)
    changes = [{"node": n, "change": "added (held upstream, missing here)"} for n in missing_here]
    changes += [{"node": n, "change": "removed (no longer held upstream)"} for n in gone_upstream]
    if dry_run or not changes:
        return changes
    shown = _details(client, missing_here, notify)
    docs = [node_from_upstream(n, shown.get(n), client.url) for n in missing_here]
    with store.transaction() as tx:
        tx.put_nodes(docs)
        tx.remove_nodes(gone_upstream)
        for c in changes:
            tx.event("reconcile", c["node"], "ok", change=c["change"])
    return changes
