"""Leasing nodes from the upstream, freeing them, and reconciling the two views.

Whatever happens half-way (a node refused, the upstream gone), the inventory is written once
at the end with exactly the nodes the upstream confirmed, and every node gets its own result.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from rhaas.core.batch_lease import connect_batch, lease_until_of
from rhaas.core.instance import NodeResult, require_project, upstream_client
from rhaas.errors import APIError, AuthorizationError, BlockedError, RhaasError, UpstreamUnreachable, UsageError
from rhaas.model import check_name, new_node, parse_ssh

DETAIL_WORKERS = 8  # parallel show_node calls; a real HIL spends ~0.4 s of CPU on each
CONNECT_WORKERS = 8  # connect_node calls in flight at once


def node_from_upstream(name: str, shown: dict | None, upstream_url: str) -> dict:
    """An inventory record for a node just leased, from the upstream's show_node."""
    shown = shown or {}
    meta = dict(shown.get("metadata") or {})
    ssh = meta.get("rhaas.ssh")
    try:
        ssh = str(parse_ssh(ssh)) if isinstance(ssh, str) else None
    except UsageError:
        ssh = None  # malformed: "no SSH path known", never guess
    host_key = meta.get("rhaas.ssh_host_key")
    nics = [
        {"label": n.get("label"), "macaddr": n.get("macaddr"), "networks": dict(n.get("networks") or {})}
        for n in shown.get("nics") or []
    ]
    return new_node(
        name,
        "leased",
        upstream_name=name,
        ssh=ssh,
        ssh_host_key=host_key if isinstance(host_key, str) else None,
        nics=nics,
        metadata={k: v for k, v in meta.items() if not k.startswith("rhaas.")},
        image=meta.get("rhaas.image") if isinstance(meta.get("rhaas.image"), str) else None,
        upstream={"endpoint": upstream_url, "node": name},
        lease_until=lease_until_of(meta),
    )


def _details(client, names: list[str]) -> dict[str, dict | None]:
    def show(name):
        try:
            return name, client.show_node(name)
        except RhaasError:
            return name, None

    with ThreadPoolExecutor(max_workers=min(DETAIL_WORKERS, max(1, len(names)))) as pool:
        return dict(pool.map(show, names))


def lease_nodes(store, count: int | None = None, names: list[str] | None = None, dry_run: bool = False,
                lease_for: float | None = None):
    """Take COUNT free nodes, or the named ones, into our upstream project (for ``lease_for`` s)."""
    view = store.snapshot()
    project = require_project(view)
    client = upstream_client(store)
    results: list[NodeResult] = []
    for n in names or []:
        check_name(n, "node name")
    if names:
        held_here = [n for n in names if view.node(n) is not None]
        if held_here:
            raise UsageError(f"already leased: {', '.join(held_here)}")
    free = client.free_nodes()
    if names:
        candidates = list(names)
    else:
        candidates = [n for n in free if view.node(n) is None]
        if count is None or count <= 0:
            raise UsageError("lease wants a positive COUNT or node names")
    if dry_run:
        if names:
            return [NodeResult(node=n, outcome="would-lease" if n in free else "not-free", reason=None) for n in names]
        take = candidates[:count]
        out = [NodeResult(node=n, outcome="would-lease", reason=None) for n in take]
        if len(take) < count:
            out.append(NodeResult.failed(f"({count - len(take)} more)", "not enough free nodes upstream"))
        return out
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
                        if names:
                            results.append(NodeResult.failed(name, err))
                    elif names:
                        results.append(NodeResult.failed(name, err))
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    if names and stop_reason:
        results.extend(NodeResult.failed(n, stop_reason) for n in queue)
    if not names and len(held) < count:
        results.append(NodeResult.failed(f"({count - len(held)} more)", stop_reason or "not enough free nodes upstream"))
    shown = batch.shown if batch is not None else (_details(client, held) if held else {})
    docs = [node_from_upstream(n, shown.get(n), client.url) for n in held]
    if docs:
        with store.transaction() as tx:
            tx.put_nodes(docs)
            for d in docs:
                tx.event("lease", d["name"], "ok", project=project)
    results = [NodeResult.ok(n) for n in held] + results
    if stop_reason == "interrupted":
        raise KeyboardInterrupt
    return results


def release_upstream(client, project: str, node: dict) -> None:
    """HIL's release order: detach every network (wait DONE), disable OBM, detach the node."""
    up = node.get("upstream_name") or node["name"]
    try:
        shown = client.show_node(up)
        nics = shown.get("nics") or []
    except APIError:
        nics = node.get("nics") or []
    for nic in nics:
        for network in sorted(set((nic.get("networks") or {}).values())):
            sid = client.detach_network(up, nic["label"], network)
            state = client.wait_action(sid)
            if state == "ERROR":
                raise RhaasError(f"detaching {network} from {nic['label']} failed upstream")
            if state == "PENDING":
                raise RhaasError(f"detaching {network} from {nic['label']} did not finish in time")
    client.set_obm(up, False)
    try:
        client.detach_node(project, up)
    except APIError as exc:
        if exc.status == 404 and "not in project" in exc.msg:
            return  # already released upstream: the inventory was stale
        raise


def free_nodes(store, names: list[str], dry_run: bool = False, force: bool = False, parallel: int = 8,
               before_release=None):
    view = store.snapshot()
    project = require_project(view)
    from rhaas.core.instance import require_nodes

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
    client = upstream_client(store)
    if before_release:
        before_release(docs)

    def release(doc):
        try:
            release_upstream(client, project, doc)
            return NodeResult.ok(doc["name"])
        except RhaasError as exc:
            return NodeResult.failed(doc["name"], exc)

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(docs)))) as pool:
        results = list(pool.map(release, docs))
    freed = [r["node"] for r in results if r["outcome"] == "ok"]
    with store.transaction() as tx:
        tx.remove_nodes(freed)
        for r in results:
            tx.event("free", r["node"], r["outcome"], reason=r["reason"])
    return results


def reconcile(store, dry_run: bool = False):
    """Make the inventory's leased nodes match the upstream project's nodes exactly."""
    view = store.snapshot()
    project = require_project(view)
    client = upstream_client(store)
    upstream = set(client.project_nodes(project))
    local = {d["name"] for d in view.nodes() if d.get("source") == "leased"}
    missing_here = sorted(upstream - local)
    gone_upstream = sorted(local - upstream)
    changes = [{"node": n, "change": "added (held upstream, missing here)"} for n in missing_here]
    changes += [{"node": n, "change": "removed (no longer held upstream)"} for n in gone_upstream]
    if dry_run or not changes:
        return changes
    shown = _details(client, missing_here)
    docs = [node_from_upstream(n, shown.get(n), client.url) for n in missing_here]
    with store.transaction() as tx:
        tx.put_nodes(docs)
        tx.remove_nodes(gone_upstream)
        for c in changes:
            tx.event("reconcile", c["node"], "ok", change=c["change"])
    return changes

