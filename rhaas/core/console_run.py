"""The consoles of a kexec run: kept while the run lasts, so a node that fails carries its last
console lines in its result (``console_tail``) and the end of its reason."""

from __future__ import annotations

import threading
from collections.abc import Callable

from rhaas.core.console import STOP_WAIT, ConsoleHub, NodeConsole, node_source, text_lines
from rhaas.errors import RhaasError

UPSTREAM_STREAMS_PER_RUN = 8  # live upstream console streams one kexec run keeps open
TAIL_LINES = 20  # console lines kept in a failed node's kexec result


class RunConsoles:
    """The consoles of a kexec run's nodes, kept while the run lasts (64 KB each at most).

    A root node is read over SOL; a leased node from the upstream, for at most
    ``UPSTREAM_STREAMS_PER_RUN`` nodes of a run: each such stream holds a worker thread of
    the upstream's server, so the rest are asked for their last lines once they have failed.
    """

    def __init__(self, store, settings: dict, docs: list[dict]):
        from rhaas.core.instance import upstream_client

        self._factory = lambda: upstream_client(store)
        self._settings = settings
        self._docs = {d["name"]: d for d in docs}
        self.hub = ConsoleHub(lambda node: self._sources[node])
        self._sources: dict[str, Callable[[], object]] = {}
        self._held: dict[str, NodeConsole] = {}
        streams = 0
        for doc in docs:
            leased = doc.get("source") == "leased"
            if leased and streams >= UPSTREAM_STREAMS_PER_RUN:
                continue
            src = node_source(doc, settings, self._factory)
            if src is not None:
                self._sources[doc["name"]] = src
                streams += leased

    def start(self) -> RunConsoles:
        for node in self._sources:
            self._held[node] = self.hub.acquire(node)
        return self

    def tail(self, node: str, until: float | None = None, n: int = TAIL_LINES) -> list[str]:
        """The node's last ``n`` console lines (as they stood at wall time ``until``)."""
        con = self._held.get(node)
        if con is not None:
            with con.cond:
                data = con.ring.until(until) if until else con.ring.since(0)[0]
            return text_lines(data, n)
        doc = self._docs.get(node)
        if doc is None or doc.get("source") != "leased":
            return []
        try:  # not streamed during the run: ask the upstream for its last lines now
            client = self._factory()
            client.set_obm(doc.get("upstream_name") or node, True)
            return text_lines(client.console_tail(doc.get("upstream_name") or node, n), n)
        except RhaasError:
            return []

    def stop(self) -> None:
        held, self._held = self._held, {}
        threads = [threading.Thread(target=self.hub.release, args=(c,), daemon=True) for c in held.values()]
        for t in threads:  # SOL sessions close in parallel: each may take a moment
            t.start()
        for t in threads:
            t.join(STOP_WAIT + 2)
