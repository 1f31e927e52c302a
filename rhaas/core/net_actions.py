"""A derived `rhaas serve`'s networking, done with the upstream outside the store's lock.

Each change is three steps, so a process that dies at any line leaves a record:

1. the request records the intent under the lock (a PENDING networking action carrying ``op``,
   ``up_node``..., or a network document with ``pending`` "create"/"delete") and returns;
2. the upstream is asked with no lock held (its status id is recorded as soon as it is known);
3. the outcome is applied in a short transaction (the action DONE/ERROR and the NIC's networks,
   or the network kept/removed).

Networking actions run in background threads (the caller polls show_networking_action, as with
HIL). Network create/delete answer only once the upstream has, as HIL's do, but no lock is held
meanwhile. Whatever was left half-way by a dead process is finished by :meth:`NetActions.resume`,
which the serving reaper calls (rhaas.core.lease_reaper): a recorded upstream status id is waited
for; without one, the upstream's own view of the NIC or network decides, and an unfinished
connect/detach is asked again.
"""

from __future__ import annotations

import threading
import time

from rhaas.errors import APIError, NotFoundError, RhaasError, UpstreamUnreachable

UPSTREAM_PARALLEL = 8  # networking actions in flight upstream at once
WAIT_ACTION_S = 120.0  # how long one upstream action is polled before it is retried later
RETRY_S = 30.0  # an action or network left unsettled (upstream unreachable) is retried this late


class NetActions:
    def __init__(self, store, upstream, project_upstream: str | None):
        self.store = store
        self.upstream = upstream
        self.project_upstream = project_upstream
        self._slots = threading.BoundedSemaphore(UPSTREAM_PARALLEL)
        self._lock = threading.Lock()
        self._busy: set[str] = set()  # action ids and network names being worked on in this process
        self._tried: dict[str, float] = {}  # key -> when resume last gave up on it

    # -- networking actions ----------------------------------------------------------------------
    def _claim(self, key: str) -> bool:
        with self._lock:
            if key in self._busy:
                return False
            self._busy.add(key)
            return True

    def _release(self, key: str, settled: bool) -> None:
        with self._lock:
            self._busy.discard(key)
            if settled:
                self._tried.pop(key, None)
            else:
                self._tried[key] = time.monotonic()

    def start(self, status_id: str) -> None:
        """Settle one PENDING action in the background (the request has already answered)."""
        if self._claim(status_id):
            threading.Thread(target=self._run, args=(status_id,), name=f"netaction-{status_id[:8]}",
                             daemon=True).start()

    def _run(self, status_id: str) -> None:
        settled = False
        try:
            with self._slots:
                settled = self._settle(status_id)
        except Exception as exc:  # noqa: BLE001 - recorded; serve goes on, resume retries later
            self._record_failure(status_id, exc)
        finally:
            self._release(status_id, settled)

    def _settle(self, status_id: str) -> bool:
        act = self.store.snapshot().get("actions", status_id)
        if act is None or act.get("status") != "PENDING" or not act.get("op"):
            return True
        up = self.upstream
        sid = act.get("upstream_sid")
        try:
            if sid is None:
                if act.get("asked") and self._upstream_has(act):  # a dead process had asked already
                    return self._apply(status_id, "DONE")
                self._mark(status_id, asked=True)
                if act["op"] == "connect":
                    sid = up.connect_network(act["up_node"], act["nic"], act["new_network"], act.get("up_channel"))
                else:
                    sid = up.detach_network(act["up_node"], act["nic"], act["old_network"])
                self._mark(status_id, upstream_sid=sid)
            state = up.wait_action(sid, timeout=WAIT_ACTION_S)
        except UpstreamUnreachable:
            return False  # left PENDING with its intent: resume asks again
        except APIError as exc:
            # refused upstream; a lost answer to an earlier ask shows as the upstream's view
            try:
                done = self._upstream_has(act)
            except (APIError, UpstreamUnreachable):
                return False
            return self._apply(status_id, "DONE" if done else "ERROR", None if done else exc.msg or str(exc))
        if state == "PENDING":
            return False
        return self._apply(status_id, "DONE" if state in ("DONE", "UNKNOWN") else "ERROR")

    def _upstream_has(self, act: dict) -> bool:
        """Whether the upstream's NIC already shows the action's outcome."""
        shown = self.upstream.show_node(act["up_node"])
        nets = {}
        for nic in shown.get("nics") or []:
            if nic.get("label") == act["nic"]:
                nets = nic.get("networks") or {}
        if act["op"] == "connect":
            return act["new_network"] in nets.values()
        return act["old_network"] not in nets.values()

    def _mark(self, status_id: str, **fields) -> None:
        with self.store.transaction("serve") as tx:
            act = tx.get("actions", status_id)
            if act is not None:
                tx.put("actions", dict(act, **fields))

    def _apply(self, status_id: str, status: str, reason: str | None = None) -> bool:
        with self.store.transaction("serve") as tx:
            act = tx.get("actions", status_id)
            if act is None or act.get("status") != "PENDING":
                return True
            node = tx.node(act["node"])
            if status == "DONE" and node is not None:
                doc = dict(node)
                nics = []
                for nic in doc.get("nics", []):
                    if nic["label"] == act["nic"]:
                        networks = dict(nic.get("networks") or {})
                        if act["op"] == "connect":
                            networks[act["channel"]] = act["new_network"]
                        else:
                            networks = {c: n for c, n in networks.items() if n != act["old_network"]}
                        nic = dict(nic, networks=networks)
                    nics.append(nic)
                doc["nics"] = nics
                tx.put_node(doc)
            tx.put("actions", dict(act, status=status))
            network = act["new_network"] if act["op"] == "connect" else act.get("old_network")
            detail = {"nic": act["nic"], "network": network}
            if reason:
                detail["reason"] = reason
            tx.event("network-" + act["op"], act["node"], "ok" if status == "DONE" else "error", **detail)
        return True

    def _record_failure(self, status_id: str, exc: Exception) -> None:
        try:
            with self.store.transaction("serve") as tx:
                act = tx.get("actions", status_id)
                tx.event("network-action", act and act.get("node"), "failed", reason=f"{type(exc).__name__}: {exc}")
        except RhaasError:
            pass

    # -- network create / delete --------------------------------------------------------------------
    def network_upstream(self, network: str, op: str, actor: str) -> None:
        """Create or delete ``network`` upstream (no lock held), then apply; the upstream's error is raised."""
        self._claim("net:" + network)
        settled = False
        try:
            try:
                if op == "create":
                    self.upstream.call("network_create", {"owner": self.project_upstream,
                                                          "access": self.project_upstream, "net_id": ""},
                                       network=network)
                else:
                    self.upstream.call("network_delete", network=network)
            except APIError:
                self._network_outcome(network, op, done=False, actor=actor)
                settled = True
                raise
            self._network_outcome(network, op, done=True, actor=actor)
            settled = True
        finally:
            self._release("net:" + network, settled)

    def _network_outcome(self, network: str, op: str, done: bool, actor: str) -> None:
        with self.store.transaction(actor) as tx:
            doc = tx.get("networks", network)
            if doc is None or doc.get("pending") != op:
                return
            if (op == "create") == done:  # created, or the delete refused: the network stays
                tx.put("networks", {k: v for k, v in doc.items() if k != "pending"})
            else:
                tx.remove("networks", network)
            tx.event("network-" + op, outcome="ok" if done else "error", network=network, by=actor)

    def _upstream_network_exists(self, network: str) -> bool:
        try:
            shown = self.upstream.call("show_network", network=network)
        except NotFoundError:
            return False
        except APIError as exc:
            if exc.status in (401, 403, 404):
                return False  # not ours to see: our create did not happen
            raise
        return isinstance(shown, dict)  # our project can see it: our create happened

    # -- resuming what a dead process left ------------------------------------------------------------
    def resume(self) -> None:
        """Settle intents left by a dead process (or by an unreachable upstream), each at most every RETRY_S."""
        if self.upstream is None:
            return
        view = self.store.snapshot()
        now = time.monotonic()

        def due(key: str) -> bool:
            with self._lock:
                return key not in self._busy and now - self._tried.get(key, -RETRY_S) >= RETRY_S

        for act in list(view.data["actions"].values()):
            if act.get("status") == "PENDING" and act.get("op") and due(act["name"]):
                self.start(act["name"])
        for net in view.all("networks"):
            key = "net:" + net["name"]
            if net.get("pending") and due(key) and self._claim(key):
                settled = False
                try:
                    exists = self._upstream_network_exists(net["name"])
                    op = net["pending"]
                    if op == "delete" and exists:
                        self._release(key, True)
                        self.network_upstream(net["name"], "delete", "serve")
                        continue
                    self._network_outcome(net["name"], op, done=exists if op == "create" else True, actor="serve")
                    settled = True
                except (APIError, UpstreamUnreachable):
                    pass
                finally:
                    self._release(key, settled)
