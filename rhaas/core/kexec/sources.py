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

Before all that, for a large image (``blob-chain``), the nodes that lack it may get it from a
:class:`Chain` instead: relayed node to node as it arrives (README "Images at scale"); a node
the chain does not serve falls back to the sources above.
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
        self.chain: Chain | None = None  # set by the run when the nodes relay the image (blob-chain)

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


    def relay_for(self, index: int, shas: list[str]):
        """The node's :class:`~rhaas.core.kexec.relay.Relay` when the run chains, else None."""
        from rhaas.core.kexec.relay import Relay

        if self.chain is None:
            return None
        return Relay(self.cache_dir, self.run_id, self.chain.token, self.hosts[index], self.chain.port(index),
                     2 * self.fetch_timeout + 30, shas)


def chain_count(mode: str, peers: bool, hosts: list[str], image_bytes: int) -> int:
    """How many chains a run uses (``blob-chain``): 0 for none. ``on``/``auto`` need peers
    (each node its own address); ``auto`` also an image of :data:`CHAIN_MIN_BYTES` or more and
    nodes off loopback. Nodes on loopback share this machine (a simulated farm): there is no
    link to spare, and the relays' small copies (busybox nc and tee move 1 KB at a time) would
    only take the CPU every node shares."""
    import ipaddress

    if mode == "off" or not peers or len(hosts) < 2:
        return 0
    if mode == "auto" and (image_bytes < CHAIN_MIN_BYTES or any(ipaddress.ip_address(h).is_loopback for h in hosts)):
        return 0
    return max(1, min(ORIGIN_SLOTS, -(-len(hosts) // CHAIN_NODES)))


def peers_possible(hosts: list[str]) -> bool:
    """Peers can reach each other only if each node has its own (IPv4) address: nodes behind
    one NAT address with different SSH ports (the lab's VMs) cannot."""
    import ipaddress

    try:
        addrs = [ipaddress.IPv4Address(h) for h in hosts]
    except ValueError:
        return False
    return len(set(addrs)) == len(addrs) > 1


# -- the chain ------------------------------------------------------------------------------------
CHAIN_MIN_BYTES = 8 << 20  # blob-chain auto: below this, the set-up round trip is not worth it
CHAIN_NODES = 50  # auto: one chain per this many nodes, at most ORIGIN_SLOTS chains
CHAIN_QUIET = 1.0  # s: with some relays armed and none arming for this long, the chain starts

_UNDECIDED, _ARMED, _OUT, _IN, _LATE = 0, 1, 2, 3, 4


class Chain:
    """Pipelined broadcast (Kadeploy's Kastafior/Kascade): nodes missing the image relay the
    bytes to each other as they arrive, instead of each holding the whole file before serving.

    Each such node starts a relay (:data:`~rhaas.core.kexec.relay.RELAY_SCRIPT`, one
    ``busybox nc`` listening on the node's own address) and says so here (:meth:`armed`); a
    node that will not take part (cached, failed, no relay) says :meth:`out`. The
    :class:`ChainFeeder` (in the rhaas process, next to the origin) waits until every node
    has decided, or until no relay armed for :data:`CHAIN_QUIET` s, then orders the armed
    nodes into chains and streams the image into the head of each. Nodes that arm after that
    are :data:`_LATE` and pull over HTTP as before. Every node verifies what its relay
    wrote (sha256) and pulls over HTTP (origin, peers) when its stream was cut or altered.

    Security: the relays are not authenticated beyond a per-run random token on the stream's
    first line (a stray connection is dropped). The image is not secret (keys stay on SSH)
    and nothing reaches the cache unverified, so a hostile or broken relay can at worst cause
    a fallback to HTTP.
    """

    def __init__(self, n: int, hosts: list[str], port_base: int, token: str, chains: int):
        ctx = mp.get_context("fork")
        self.n = n
        self.hosts = hosts
        self.port_base = port_base
        self.token = token
        self.chains = max(1, chains)
        self._lock = ctx.Lock()
        self._state = ctx.RawArray("b", n)
        self._closed = ctx.RawValue("b", 0)
        self._changed = ctx.RawValue("d", 0.0)  # monotonic time of the last decision

    def port(self, i: int) -> int:
        return self.port_base + i

    def _set(self, i: int, state: int) -> None:
        import time

        self._state[i] = state
        self._changed.value = time.monotonic()

    def armed(self, i: int) -> bool:
        """Node ``i``'s relay listens. False: too late, the chain has started without it."""
        with self._lock:
            if self._state[i] != _UNDECIDED:
                return False
            if self._closed.value:
                self._set(i, _LATE)
                return False
            self._set(i, _ARMED)
            return True

    def out(self, i: int) -> None:
        """Node ``i`` takes no part (cached, failed, no relay, or done)."""
        with self._lock:
            if self._state[i] == _UNDECIDED:
                self._set(i, _OUT)

    def leave(self, i: int) -> None:
        """Node ``i`` gave up waiting for the chain to start: it is not streamed to."""
        with self._lock:
            if self._state[i] in (_UNDECIDED, _ARMED):
                self._set(i, _OUT)

    def turn(self, i: int) -> str:
        """``wait`` (not started), ``in`` (its stream is coming), ``out``."""
        with self._lock:
            st = self._state[i]
        return "in" if st == _IN else "wait" if st == _ARMED else "out"

    def close(self, quiet: float, now: float) -> list[list[int]] | None:
        """The chains (node indexes, head first) once every node decided or none did for
        ``quiet`` s with some armed; None to wait longer. Marks the chained nodes ``in``."""
        with self._lock:
            states = list(self._state)
            armed = [i for i, s in enumerate(states) if s == _ARMED]
            if _UNDECIDED in states and not (armed and now - self._changed.value >= quiet):
                return None
            return self._close(armed)

    def close_now(self) -> list[list[int]]:
        with self._lock:
            return self._close([i for i, s in enumerate(self._state) if s == _ARMED])

    def _close(self, armed: list[int]) -> list[list[int]]:
        self._closed.value = 1
        for i in armed:
            self._state[i] = _IN
        k = min(self.chains, len(armed)) or 1
        return [c for c in (armed[j::k] for j in range(k)) if c]


class ChainFeeder:
    """The rhaas side of :class:`Chain`: a thread that starts the chains and streams the image
    into each head (:meth:`~rhaas.adapters.blobserver.BlobServer.push_chain`), every wait bounded
    by ``deadline`` seconds from :meth:`start`."""

    def __init__(self, chain: Chain, server, shas: list[str], deadline: float):
        import threading

        self.chain = chain
        self.server = server
        self.shas = shas
        self.deadline = deadline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent: list[tuple[int, int | str]] = []  # (head index, bytes sent or why not)

    def start(self) -> None:
        import threading

        self._thread = threading.Thread(target=self._run, name="rhaas-blob-chain", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _header(self, route: list[int]) -> bytes:
        hops = " ".join(f"{self.chain.hosts[i]}:{self.chain.port(i)}" for i in route[1:])
        blobs = " ".join(f"{sha}:{self.server.blobs[sha].size}" for sha in self.shas)
        return f"{self.chain.token}\n{hops}\n{blobs}\n".encode()

    def _run(self) -> None:
        import threading
        import time

        end = time.monotonic() + self.deadline
        chains = None
        while chains is None and not self._stop.is_set():
            now = time.monotonic()
            chains = self.chain.close_now() if now >= end else self.chain.close(CHAIN_QUIET, now)
            if chains is None:
                self._stop.wait(0.02)
        if not chains:
            if chains is None:
                self.chain.close_now()
            return
        pushers = [threading.Thread(target=self._push, args=(c, end), name="rhaas-blob-chain-push", daemon=True)
                   for c in chains]
        for t in pushers:
            t.start()
        for t in pushers:
            t.join()

    def _push(self, route: list[int], end: float) -> None:
        head = route[0]
        try:
            header = self._header(route)
            n = self.server.push_chain(self.chain.hosts[head], self.chain.port(head), header, self.shas, end)
            self.sent.append((head, n))
        except OSError as exc:  # the nodes find their streams cut and pull over HTTP
            self.sent.append((head, str(exc)))
