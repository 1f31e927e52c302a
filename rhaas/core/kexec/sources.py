"""Where each node fetches a new image from: the origin first, then nodes that already hold it.

rhaas's own part of moving images is only this choice; the bytes go over maintained pieces
(the run's :class:`~rhaas.adapters.blobserver.BlobServer`, ``curl``/``wget`` on the node,
``busybox httpd`` on peers). One :class:`Sources` per run, shared by the worker processes
(it lives in shared memory made before they are forked; one lock):

* the origin serves at most :data:`ORIGIN_SLOTS` nodes at once (``fanout`` when peers are
  off), and only while no peer
  that this node has not tried holds the image, so the bytes it sends stay near
  ``ORIGIN_SLOTS`` images whatever the node count;
* a node that fetched and verified the image and started its server becomes a source;
  each source serves at most ``fanout`` nodes at once, so the sources grow wave by wave;
* a node that finds no free source waits (in the timer queue, holding no thread);
* a source that failed or was too slow for a node is dropped for the whole run, and the
  node moves to another peer, then to the origin; with none left, to SFTP;
* serving nodes do not jump until no node is left to fetch (:meth:`Sources.settled`).
"""

from __future__ import annotations

import multiprocessing as mp

ORIGIN_SLOTS = 2
WAIT = -2  # acquire(): no source free now, ask again soon
NONE = -1  # acquire(): no source left for this node

_IDLE, _HOLDS, _DROPPED = 0, 1, -1


class Sources:
    """Shared state for ``n`` nodes (by job index) plus the origin (index ``n``)."""

    def __init__(self, n: int, fanout: int, peers: bool):
        ctx = mp.get_context("fork")
        self.n = n
        self.fanout = max(1, fanout)
        self.peers = peers
        self._lock = ctx.Lock()
        self._state = ctx.RawArray("b", n)  # per node: idle / holds (serving) / dropped
        self._load = ctx.RawArray("i", n + 1)  # fetches in flight per source; [n] is the origin
        self._unsettled = ctx.RawValue("i", n)  # nodes whose staging is not decided yet

    @property
    def origin(self) -> int:
        return self.n

    def acquire(self, me: int, tried: set[int]) -> int:
        """A source index for node ``me`` (its load counted), :data:`WAIT` or :data:`NONE`."""
        with self._lock:
            best, best_load = None, None
            live_untried = False
            busy_possible = False
            for i in range(self.n) if self.peers else ():
                if i == me or i in tried or self._state[i] != _HOLDS:
                    continue
                live_untried = True
                if self._load[i] < self.fanout and (best_load is None or self._load[i] < best_load):
                    best, best_load = i, self._load[i]
            if best is not None:
                self._load[best] += 1
                return best
            if self.origin not in tried and not live_untried:
                if self._load[self.origin] < (ORIGIN_SLOTS if self.peers else self.fanout):
                    self._load[self.origin] += 1
                    return self.origin
                busy_possible = True
            if live_untried:
                busy_possible = True
            if self.peers and self.origin not in tried and self._load[self.origin] > 0:
                busy_possible = True  # a wave in flight will bring new sources
            return WAIT if busy_possible else NONE

    def release(self, source: int, ok: bool) -> None:
        """A fetch from ``source`` ended; a failed or slow peer is dropped for the run."""
        with self._lock:
            self._load[source] = max(0, self._load[source] - 1)
            if not ok and source != self.origin:
                self._state[source] = _DROPPED

    def holds(self, me: int) -> None:
        """Node ``me`` verified the image and serves it."""
        with self._lock:
            if self._state[me] == _IDLE:
                self._state[me] = _HOLDS

    def stop_serving(self, me: int) -> None:
        with self._lock:
            if self._state[me] == _HOLDS:
                self._state[me] = _DROPPED

    def settle(self, me: int) -> None:
        """Node ``me`` needs no source any more (cached, fetched, pushed over SFTP, or failed).
        Call once per node."""
        with self._lock:
            self._unsettled.value -= 1

    def settled(self) -> bool:
        """No node is left that may still fetch: serving nodes may stop and jump."""
        with self._lock:
            return self._unsettled.value <= 0


class Pull:
    """How the nodes of one run pull the image: the origin's URL base, the peers' addresses,
    the shared :class:`Sources`. Plain data plus shared memory: inherited by forked workers."""

    def __init__(self, origin_base: str, names: list[str], hosts: list[str], fanout: int, peers: bool,
                 peer_port: int, peer_token: str, run_id: str, fetch_timeout: float, cache_dir: str):
        self.origin_base = origin_base
        self.names = names
        self.hosts = hosts
        self.peers = peers
        self.peer_port = peer_port
        self.peer_token = peer_token
        self.run_id = run_id
        self.fetch_timeout = fetch_timeout
        self.cache_dir = cache_dir
        self.sources = Sources(len(names), fanout, peers)

    def base(self, source: int) -> str:
        if source == self.sources.origin:
            return self.origin_base
        return f"http://{self.hosts[source]}:{self.peer_port}/{self.peer_token}"

    def label(self, source: int) -> str:
        return "origin" if source == self.sources.origin else self.names[source]

    def serve_for(self, index: int):
        """The node's :class:`~rhaas.core.kexec.commands.Serve` when peers serve, else None."""
        from rhaas.core.kexec.commands import Serve

        if not self.peers:
            return None
        return Serve(self.cache_dir, self.run_id, self.peer_token, f"{self.hosts[index]}:{self.peer_port}")


def peers_possible(hosts: list[str]) -> bool:
    """Peers can reach each other only if each node has its own (IPv4) address: nodes behind
    one NAT address with different SSH ports (the lab's VMs) cannot."""
    import ipaddress

    try:
        addrs = [ipaddress.IPv4Address(h) for h in hosts]
    except ValueError:
        return False
    return len(set(addrs)) == len(addrs) > 1
