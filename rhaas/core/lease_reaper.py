"""Leases on the serving side: batch assignment (rhaas.batch), lease ends, and the reaper.

An assignment is bookkeeping only: the project, the tenant's SSH keys (they ride in the node's
next kexec: the tenant's own, or the standby return) and, for a lease with an end, the time it
ends (``assign_until``, epoch seconds; a per-call ``for_seconds`` or the project's ``lease_for``).

The reaper is a background thread of `rhaas serve`, never part of a request. Each pass, with no
lock held while it waits on anything:

- reclaims nodes whose lease ended: their networks are detached (upstream first, for a derived
  instance), then one short transaction frees them with an ``expired`` event, and they go back
  to the standby image in the background (held out of the free list until back);
- restarts standby returns left unfinished (``returning``) by a dead process, or failed ones
  after STANDBY_RETRY_S;
- settles networking intents left half-way (rhaas.core.net_actions);
- for a derived instance, drops its own leases from the upstream that have ended
  (rhaas.core.batch_lease.drop_expired).
"""

from __future__ import annotations

import math
import threading
import time

from rhaas.errors import APIError, AuthorizationError, BadArgumentError, RhaasError, UpstreamUnreachable
from rhaas.protocol import valid_name

MAX_BATCH = 100_000  # nodes in one rhaas.batch call
MAX_LEASE_S = 10 * 365 * 86400.0
PASS_S = 1.0  # the reaper's longest sleep between passes
STANDBY_RETRY_S = 300.0  # a failed standby return is tried again this late
RECLAIM_RETRY_S = 30.0  # a reclaim the upstream refused (networks still attached) is tried again this late


def assigned(doc: dict, project: str, keys: list[str], lease_for: float | None) -> dict:
    """The node document once ``project`` holds it (keys recorded, the lease's end if it has one)."""
    until = time.time() + float(lease_for) if lease_for else None
    return dict(doc, project=project, tenant_ssh_keys=list(keys), assign_until=until)


def check_lease_for(value: object) -> float | None:
    """A requested lease length in seconds, checked (BadArgumentError, 400, otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_LEASE_S:
        raise BadArgumentError(f"for_seconds must be a positive number of seconds up to {MAX_LEASE_S:g}")
    return float(value)


def connect_nodes(service, caller, project: str, count: int | None = None, nodes: list | None = None,
                  for_seconds: float | None = None) -> dict:
    """Assign ``count`` free nodes, or the named ones, to ``project`` in one transaction."""
    if (count is None) == (nodes is None):
        raise BadArgumentError("give exactly one of count and nodes")
    if count is not None and not 0 < count <= MAX_BATCH:
        raise BadArgumentError(f"count must be from 1 to {MAX_BATCH}")
    if nodes is not None:
        if not 0 < len(nodes) <= MAX_BATCH or not all(isinstance(n, str) and valid_name(n) for n in nodes):
            raise BadArgumentError(f"nodes must be 1 to {MAX_BATCH} valid node names")
        if len(set(nodes)) != len(nodes):
            raise BadArgumentError("a node is named twice")
    lease_for = check_lease_for(for_seconds)
    from rhaas.core.service import RETURNING

    refused: dict[str, str] = {}
    with service.store.transaction(caller.name) as tx:
        proj = service._project(tx, project)
        caller.require_project(project)
        lease_for = lease_for or proj.get("lease_for")
        if nodes is None:
            free = sorted(d["name"] for d in tx.data["nodes"].values() if not d.get("project") and not d.get("returning"))
            wanted = free[:count]
        else:
            wanted = []
            for n in nodes:
                doc = tx.node(n)
                if doc is None:
                    refused[n] = f"Node {n} does not exist."
                elif doc.get("project"):
                    refused[n] = "Node is already owned by a project."
                elif doc.get("returning"):
                    refused[n] = RETURNING
                else:
                    wanted.append(n)
        keys = service._project_keys(tx, project)
        docs = [assigned(tx.node(n), project, keys, lease_for) for n in wanted]
        tx.put_nodes(docs)
        for d in docs:
            tx.event("assign", d["name"], "ok", project=project, by=caller.name, until=d["assign_until"])
    return {
        "nodes": wanted,
        "refused": refused,
        "until": docs[0]["assign_until"] if docs else None,
        "shown": {d["name"]: service.shown(d) for d in docs},
    }


# -- the end of a lease ---------------------------------------------------------------------------
def _detach_upstream(service, doc: dict) -> None:
    """A derived instance's node leaving its tenant: its networks are detached upstream first."""
    up = service.upstream
    name = doc.get("upstream_name") or doc["name"]
    for nic in doc.get("nics", []):
        for network in sorted(set((nic.get("networks") or {}).values())):
            try:
                state = up.wait_action(up.detach_network(name, nic["label"], network))
            except APIError:
                state = "ERROR"
            if state in ("ERROR", "PENDING"):
                shown = up.show_node(name)
                still = any(network in (n.get("networks") or {}).values()
                            for n in shown.get("nics") or [] if n.get("label") == nic["label"])
                if still:
                    raise RhaasError(f"detaching {network} from {nic['label']} upstream did not finish")


def reclaim(service, name: str) -> str:
    """Free one node whose lease ended: "done", "later" (an action is running) or "failed" (recorded)."""
    view = service.store.snapshot()
    doc = view.node(name)
    now = time.time()
    if doc is None or not doc.get("project") or not doc.get("assign_until") or doc["assign_until"] > now:
        return "done"
    if service._pending(view, name):
        return "later"  # a networking action is still running: the next pass
    project, until = doc["project"], doc["assign_until"]
    if service.upstream is not None and any(nic.get("networks") for nic in doc.get("nics", [])):
        try:
            _detach_upstream(service, doc)
        except (RhaasError, UpstreamUnreachable) as exc:
            with service.store.transaction("reaper") as tx:
                tx.event("expired", name, "retry", project=project, reason=str(exc))
            return "failed"
    with service.store.transaction("reaper") as tx:
        cur = tx.node(name)
        if cur is None or cur.get("project") != project or cur.get("assign_until") != until:
            return "done"  # freed, or given a new lease, meanwhile
        cur = dict(cur, obm_enabled=False, nics=[dict(n, networks={}) for n in cur.get("nics", [])])
        cur = service.released(cur)
        tx.put_node(cur)
        tx.event("expired", name, "ok", project=project, reclaimed=True, until=until)
    if cur.get("returning"):
        service.on_detach(name)
    return "done"


def standby_done(store, name: str, ok: bool, reason: str | None = None) -> None:
    """The end of a standby return: the node is free again, or held back with the reason."""
    with store.transaction("standby") as tx:
        doc = tx.node(name)
        if doc is None or not doc.get("returning"):
            return
        if ok:
            tx.put_node({k: v for k, v in doc.items() if k != "returning"})
        else:
            tx.put_node(dict(doc, returning=dict(doc["returning"], failed=reason or "failed", at=time.time())))
        tx.event("standby", name, "ok" if ok else "failed", reason=reason)


class Reaper:
    """The serving instance's background thread (see the module docstring)."""

    def __init__(self, service, interval: float = PASS_S):
        self.service = service
        self.interval = interval
        self._stop = threading.Event()
        self._retry_at: dict[str, float] = {}  # node -> when a failed reclaim may be tried again
        self._thread = threading.Thread(target=self._loop, name="rhaas-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - recorded; the reaper lives on
                try:
                    with self.service.store.transaction("reaper") as tx:
                        tx.event("reaper", None, "failed", reason=f"{type(exc).__name__}: {exc}")
                except RhaasError:
                    pass
            self._stop.wait(self.interval)

    def run_once(self) -> None:
        svc = self.service
        view = svc.store.snapshot()
        now = time.time()
        for doc in view.nodes():
            if doc.get("project") and doc.get("assign_until") and doc["assign_until"] <= now:
                if self._retry_at.get(doc["name"], 0.0) <= now:
                    outcome = reclaim(svc, doc["name"])
                    if outcome == "failed":  # recorded once per RECLAIM_RETRY_S, not every pass
                        self._retry_at[doc["name"]] = now + RECLAIM_RETRY_S
                    else:
                        self._retry_at.pop(doc["name"], None)
            elif doc.get("returning") and not doc.get("project") and svc.on_detach is None:
                standby_done(svc.store, doc["name"], True, "no standby image is set")
            elif doc.get("returning") and not doc.get("project"):
                failed_at = doc["returning"].get("at")
                if failed_at is None or now - failed_at >= STANDBY_RETRY_S:
                    svc.on_detach(doc["name"])  # a no-op while this process is already at it
        svc.net.resume()
        if svc.upstream is not None:
            from rhaas.core.batch_lease import drop_expired

            try:
                drop_expired(svc.store)
            except (AuthorizationError, RhaasError):
                pass


def set_lease_for(store, project: str, seconds: float | None) -> None:
    """A project's default lease length on this serving instance (None: leases without an end)."""
    from rhaas.errors import UsageError

    with store.transaction() as tx:
        doc = tx.get("projects", project)
        if doc is None:
            raise UsageError(f"unknown project {project!r}")
        tx.put("projects", dict(doc, lease_for=seconds))
        tx.event("project-lease-for", outcome="ok", project=project, seconds=seconds)
