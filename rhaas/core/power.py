"""Power and boot-device policy: which backend drives a node, and fanning out over nodes.

A node's power goes one of two ways:

* a node this (root) instance registered with a BMC (``node["ipmi"]``) is driven over IPMI
  by :class:`IPMIPower` (:mod:`rhaas.adapters.bmc`);
* a node leased from an upstream HaaS (``node["source"] == "leased"``) is driven through the
  upstream's HIL API by :class:`UpstreamPower`, which enables the node's OBM first, as HIL
  requires, and leaves it enabled; the free path disables it before the detach.

:func:`power_nodes` and :func:`set_bootdev_nodes` run one operation over many nodes in a
bounded thread pool, each node bounded in time, and record the outcome in the inventory in
one transaction at the end: an event per node, and the boot device for ``bootdev``.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from rhaas.errors import RhaasError, UsageError
from rhaas.protocol import BOOT_DEVICES

POWER_OPS = ("on", "off", "cycle", "reset", "status")

# HIL has power_cycle (always sent with force: true, which obmd's IPMI driver carries out as
# a chassis hard reset), power_on and power_off; there is no separate reset call.
_UPSTREAM_OPS = {"on": "on", "off": "off", "cycle": "cycle", "reset": "cycle", "status": "status"}


class PowerBackend(Protocol):
    def power(self, op: str) -> str | None:
        """Run ``op`` (one of POWER_OPS); ``"on"``/``"off"`` for status, else None."""

    def set_bootdev(self, dev: str) -> None:
        """Persistently boot from ``pxe``, ``disk`` or ``none``."""

    def describe(self) -> str:
        """One line naming the backend, without secrets; never contacts anything."""

    @property
    def time_limit(self) -> float:
        """Seconds one call may take before the caller gives up on it."""


class IPMIPower:
    """A root-registered node: its own BMC over IPMI."""

    def __init__(self, node: str, bmc):
        self.node = node
        self.bmc = bmc

    @property
    def time_limit(self) -> float:
        return self.bmc.timeout

    def power(self, op: str) -> str | None:
        _check_op(op)
        if op == "status":
            return self.bmc.power_status()
        {
            "on": self.bmc.power_on,
            "off": self.bmc.power_off,
            "cycle": self.bmc.power_cycle,
            "reset": self.bmc.power_reset,
        }[op]()
        return None

    def set_bootdev(self, dev: str) -> None:
        _check_dev(dev)
        self.bmc.set_bootdev(dev)

    def describe(self) -> str:
        return f"ipmi {self.bmc.user}@{self.bmc.address} ({self.bmc.describe_interface()})"


class UpstreamPower:
    """A leased node: power and boot calls go to the upstream HaaS's API for the node."""

    def __init__(self, node: str, upstream_name: str, client_factory: Callable[[], object], time_limit: float):
        self.node = node
        self.upstream_name = upstream_name
        self._client_factory = client_factory
        self._client = None
        self._obm_ready = False
        self._time_limit = time_limit
        self.obm_enabled_here = False  # True once this backend has turned OBM on upstream

    @property
    def time_limit(self) -> float:
        return self._time_limit

    @property
    def client(self):
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _ensure_obm(self) -> None:
        """HIL answers every power call with 409 unless the node's OBM is enabled."""
        if self._obm_ready:
            return
        try:
            self.client.set_obm(self.upstream_name, True)
            self.obm_enabled_here = True
        except RhaasError as exc:
            if "already" not in str(exc).lower():
                raise
        self._obm_ready = True

    def power(self, op: str) -> str | None:
        _check_op(op)
        self._ensure_obm()
        answer = self.client.power(self.upstream_name, _UPSTREAM_OPS[op])
        if op != "status":
            return None
        word = str(answer).strip().lower()
        if word not in ("on", "off"):
            raise RhaasError(f"upstream reported power status {answer!r} for node {self.upstream_name}")
        return word

    def set_bootdev(self, dev: str) -> None:
        _check_dev(dev)
        self._ensure_obm()
        self.client.set_bootdev(self.upstream_name, dev)

    def describe(self) -> str:
        return f"upstream node {self.upstream_name}"


def _check_op(op: str) -> None:
    if op not in POWER_OPS:
        raise UsageError(f"unknown power operation {op!r}: use one of {', '.join(POWER_OPS)}")


def _check_dev(dev: str) -> None:
    if dev not in BOOT_DEVICES:
        raise UsageError(f"unknown boot device {dev!r}: use one of {', '.join(BOOT_DEVICES)}")


def _default_client_factory(store) -> Callable[[], object]:
    def make():
        from rhaas.core.instance import upstream_client

        return upstream_client(store)

    return make


def backend_for(node: dict, settings: dict, store, client_factory: Callable[[], object] | None = None) -> PowerBackend:
    """The backend that drives ``node``'s power and boot device. Contacts nothing.

    ``client_factory`` (optional) makes the upstream client for leased nodes; by default it
    is ``rhaas.core.instance.upstream_client(store)``, created on first use.
    """
    name = node.get("name", "?")
    if node.get("source") == "leased":
        upstream_name = node.get("upstream_name") or name
        # one OBM enable, the call itself, and a redirect to follow
        limit = 3 * float(settings.get("upstream-timeout") or 30.0)
        return UpstreamPower(name, upstream_name, client_factory or _default_client_factory(store), limit)
    ipmi = node.get("ipmi")
    if ipmi and ipmi.get("host"):
        from rhaas.adapters.bmc import IPMIBmc

        bmc = IPMIBmc(
            ipmi["host"],
            int(ipmi.get("port") or 623),
            ipmi.get("user") or "",
            ipmi.get("password") or "",
            interface=ipmi.get("interface") or settings.get("ipmi-interface") or "rmcpplus",
            cipher_suite=ipmi.get("cipher_suite") or settings.get("ipmi-cipher-suite") or 3,
            timeout=float(settings.get("connect-timeout") or 10.0),
        )
        return IPMIPower(name, bmc)
    raise RhaasError(f"node {name} has no power backend: register it with --ipmi or lease it from an upstream")


# -- fan-out ----------------------------------------------------------------------------------


def _lookup(store, names: Iterable[str]) -> list[dict]:
    from rhaas.core.instance import require_nodes

    names = list(names)
    if not names:
        raise UsageError("no nodes given")
    return [dict(d) for d in require_nodes(store.snapshot(), names)]


def _thread_client_factory(store) -> Callable[[], object]:
    """One upstream client per worker thread: no assumption that a client is thread-safe."""
    local = threading.local()
    make = _default_client_factory(store)

    def get():
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = make()
        return client

    return get


def plan(store, settings: dict, names: Iterable[str], action: str) -> list[dict]:
    """What an operation would do, node by node, without contacting anything (--dry-run)."""
    out = []
    for doc in _lookup(store, names):
        try:
            backend = backend_for(doc, settings, store, client_factory=lambda: None)
            out.append({"node": doc["name"], "action": action, "backend": backend.describe(), "reason": None})
        except RhaasError as exc:
            out.append({"node": doc["name"], "action": action, "backend": None, "reason": str(exc)})
    return out


def _fan_out(
    store,
    settings: dict,
    names: Iterable[str],
    parallel: int | None,
    action: str,
    work: Callable[[PowerBackend], dict],
) -> list[tuple[dict, dict, PowerBackend | None]]:
    """Run ``work(backend)`` per node; returns (node doc, result, backend) in input order."""
    docs = _lookup(store, names)
    factory = _thread_client_factory(store)
    jobs: list[tuple[dict, PowerBackend | None, dict | None]] = []
    for doc in docs:
        try:
            jobs.append((doc, backend_for(doc, settings, store, client_factory=factory), None))
        except RhaasError as exc:
            jobs.append((doc, None, {"outcome": "failed", "reason": str(exc)}))

    def run(backend: PowerBackend) -> dict:
        try:
            return {"outcome": "ok", "reason": None, **work(backend)}
        except RhaasError as exc:
            return {"outcome": "failed", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001  # a bug or an adapter's stray exception: one line, no trace
            return {"outcome": "failed", "reason": f"internal error: {type(exc).__name__}: {exc}"}

    runnable = [(i, b) for i, (_, b, r) in enumerate(jobs) if r is None]
    results: dict[int, dict] = {i: r for i, (_, _, r) in enumerate(jobs) if r is not None}
    if runnable:
        workers = max(1, min(int(parallel or settings.get("parallel") or 16), len(runnable)))
        # every node is bounded by its backend; this is the safety net over the whole batch
        waves = -(-len(runnable) // workers)
        budget = max(b.time_limit for _, b in runnable) * waves + 2.0
        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"power-{action}")
        futures = {pool.submit(run, b): i for i, b in runnable}
        try:
            for fut in cf.as_completed(futures, timeout=budget):
                results[futures[fut]] = fut.result()
        except cf.TimeoutError:
            for fut, i in futures.items():
                if i not in results:
                    fut.cancel()
                    results[i] = {"outcome": "failed", "reason": f"no answer within {budget:g} s"}
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    return [(doc, results[i], backend) for i, (doc, backend, _) in enumerate(jobs)]


def _backend_detail(backend: PowerBackend | None) -> dict:
    detail: dict = {}
    if backend is not None:
        detail["backend"] = backend.describe()
        if getattr(backend, "obm_enabled_here", False):
            detail["obm"] = "enabled"
    return detail


def power_nodes(store, settings: dict, names: Iterable[str], op: str, parallel: int | None = None) -> list[dict]:
    """Run power ``op`` on every named node; one result dict per node, in order.

    A result is ``{"node", "op", "outcome": "ok"|"failed", "reason", "backend"}`` plus
    ``"power": "on"|"off"|None`` for ``status``. Unknown names raise UsageError before
    anything is contacted. The inventory gets one ``power-<op>`` event per node, written in
    a single transaction after every node has finished.
    """
    _check_op(op)

    def work(backend: PowerBackend) -> dict:
        answer = backend.power(op)
        return {"power": answer} if op == "status" else {}

    done = _fan_out(store, settings, names, parallel, op, work)
    results = []
    for doc, res, backend in done:
        r = {"node": doc["name"], "op": op, "outcome": res["outcome"], "reason": res.get("reason")}
        r["backend"] = backend.describe() if backend is not None else None
        if op == "status":
            r["power"] = res.get("power")
        results.append(r)

    with store.transaction() as tx:
        for r, (_, _, backend) in zip(results, done):
            detail = _backend_detail(backend)
            if r["reason"]:
                detail["reason"] = r["reason"]
            if op == "status" and r.get("power"):
                detail["power"] = r["power"]
            tx.event("power-" + op, r["node"], r["outcome"], **detail)
    return results


def set_bootdev_nodes(store, settings: dict, names: Iterable[str], dev: str, parallel: int | None = None) -> list[dict]:
    """Persistently set boot device ``dev`` on every named node; results as power_nodes.

    Nodes that took it get ``node["bootdev"] = dev`` in the inventory, together with a
    ``bootdev`` event per node, in one transaction.
    """
    _check_dev(dev)

    def work(backend: PowerBackend) -> dict:
        backend.set_bootdev(dev)
        return {}

    done = _fan_out(store, settings, names, parallel, "bootdev", work)
    results = []
    for doc, res, backend in done:
        results.append(
            {
                "node": doc["name"],
                "op": "bootdev",
                "bootdev": dev,
                "outcome": res["outcome"],
                "reason": res.get("reason"),
                "backend": backend.describe() if backend is not None else None,
            }
        )

    with store.transaction() as tx:
        changed = []
        now = time.time()
        for r, (_, _, backend) in zip(results, done):
            detail = {"bootdev": dev, **_backend_detail(backend)}
            if r["reason"]:
                detail["reason"] = r["reason"]
            tx.event("bootdev", r["node"], r["outcome"], **detail)
            current = tx.node(r["node"])
            if r["outcome"] == "ok" and current is not None:
                changed.append({**current, "bootdev": dev, "updated": now})
        tx.put_nodes(changed)
    return results


__all__ = [
    "BOOT_DEVICES",
    "POWER_OPS",
    "IPMIPower",
    "PowerBackend",
    "UpstreamPower",
    "backend_for",
    "plan",
    "power_nodes",
    "set_bootdev_nodes",
]
