"""One kexec run over a batch of nodes, and its two inventory writes.

:func:`kexec_nodes` builds a :class:`~rhaas.core.kexec.plan.Job` per node (checking
everything that can be checked without contacting it), marks them provisioning in one
transaction, hands them to :mod:`rhaas.core.kexec.scheduler`, and records all results in one
more transaction at the end, whatever the number of nodes (and also when interrupted).

The first write also names the run's owner (:mod:`rhaas.core.kexec.owner`): if this process
dies before the second write, readers show its nodes ``interrupted``, not ``provisioning``.
A node another live run is provisioning is refused (only an event).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable

from rhaas import model
from rhaas.core.images import Image, check_files, file_sha256
from rhaas.core.kexec import owner as run_owner
from rhaas.core.kexec.plan import (
    MODES,
    Context,
    Job,
    KexecOptions,
    KexecResult,
    kernel_cmdline,
    kexec_disabled,
    lookup_nodes,
    new_nonce,
    node_overlay,
    power_only_refusal,
)
from rhaas.core.kexec.scheduler import run_jobs
from rhaas.errors import RhaasError, UsageError

_STATUS = {
    "ok": model.STATUS_READY,
    "loaded": model.STATUS_LOADED,
    "fallback": model.STATUS_FALLBACK,
    "failed": model.STATUS_FAILED,
}


def kexec_nodes(
    store,
    settings: dict,
    names: Iterable[str],
    image: Image | None,
    opts: KexecOptions,
    image_name: str | None = None,
    on_result: Callable[[KexecResult], None] | None = None,
    actor: str | None = None,
    tenant_keys: list[str] | None = None,
    stats: dict | None = None,
) -> list[KexecResult]:
    """Provision ``names`` with ``image`` (None for ``exec`` mode); results in input order.

    The inventory is written twice: before any node is contacted (status provisioning, the
    nonce) and after all have finished (the results and one ``kexec`` event per node).
    ``stats``, if given, receives ``origin_bytes``: what the run's image listener sent.
    """
    from rhaas.adapters import hostkeys

    if opts.mode not in MODES:
        raise UsageError(f"unknown kexec mode {opts.mode!r}")
    if opts.mode != "exec" and image is None:
        raise UsageError("give --image NAME or --kernel/--initrd")
    _chain_mode(settings)
    snap = store.snapshot()
    docs = lookup_nodes(snap, names)
    if image is not None:
        check_files(image)
        image_name = image_name or image.name
    key_path, public = hostkeys.ensure_client_key(store.home, settings.get("ssh-key"))
    pkey = hostkeys.load_client_key(key_path)
    known = hostkeys.read_known_hosts(hostkeys.known_hosts_path(store.home))

    jobs: list[Job] = []
    early: dict[str, KexecResult] = {}
    # the node's initrd is the image's plus its overlay: hash the shared part once
    initrd_hash = file_sha256(image.initrd.path) if image is not None and opts.mode != "exec" else None
    for doc in docs:
        name = doc["name"]
        try:
            endpoint = hostkeys.endpoint_for(doc, known)
        except RhaasError as exc:
            early[name] = KexecResult(name, "failed", image_name, None, doc.get("boot_id"), str(exc))
            continue
        skip = kexec_disabled(doc)
        refusal = power_only_refusal(opts) if skip else None
        if refusal:
            early[name] = KexecResult(
                name, "failed", image_name if opts.mode != "exec" else doc.get("loaded_image"), None,
                doc.get("boot_id"), refusal, keep_status=True,
            )
            continue
        if opts.mode == "exec":
            if not (doc.get("status") == model.STATUS_LOADED and doc.get("nonce")):
                early[name] = KexecResult(
                    name, "failed", doc.get("loaded_image"), doc.get("nonce"), doc.get("boot_id"),
                    f"not loaded (status {doc.get('status')}); run 'rhaas kexec --load-only' first",
                    keep_status=True,
                )
                continue
            jobs.append(Job(doc, endpoint, doc["nonce"], image=doc.get("loaded_image")))
            continue
        nonce = new_nonce()
        try:
            # tenant_keys: the overlay keys a `rhaas serve` caller asked for, instead of the node's
            overlay = node_overlay(doc if tenant_keys is None else {**doc, "tenant_ssh_keys": tenant_keys}, public)
        except (RhaasError, ValueError) as exc:
            early[name] = KexecResult(name, "failed", image_name, None, doc.get("boot_id"), str(exc))
            continue
        combined = initrd_hash.copy()
        combined.update(overlay)
        jobs.append(
            Job(
                doc, endpoint, nonce,
                cmdline=kernel_cmdline(image.append, nonce),
                overlay=overlay,
                overlay_sha=hashlib.sha256(overlay).hexdigest(),
                initrd_sha=combined.hexdigest(),
                image=image_name,
                skip_kexec=skip,
            )
        )

    started = time.time()
    me = run_owner.current(started)
    with store.transaction(actor) as tx:
        marked, mine = [], []
        for job in jobs:
            cur = tx.node(job.doc["name"])
            if cur is None:
                mine.append(job)
                continue
            other = cur.get("kexec_run")
            if cur.get("status") == model.STATUS_PROVISIONING and run_owner.alive(other) and other.get("pid") != me["pid"]:
                early[job.doc["name"]] = KexecResult(
                    job.doc["name"], "failed", job.image, None, cur.get("boot_id"),
                    f"another kexec run (pid {other['pid']}, started {run_owner.started_text(other)}) is provisioning it",
                    keep_status=True,
                )
                continue
            mine.append(job)
            marked.append({
                **cur, "status": model.STATUS_PROVISIONING, "nonce": job.nonce, "updated": started, "kexec_run": me,
            })
        tx.put_nodes(marked)
    jobs = mine
    for i, job in enumerate(jobs):  # places in the run's shared source table (rhaas.core.kexec.sources)
        job.index = i

    origin, pull = _origin(image, opts, jobs, settings) if jobs and opts.mode != "exec" else (None, None)
    feeder = _chain_feeder(origin, pull, image, opts)
    consoles = _watch_consoles(store, settings, jobs, opts)

    def after_fork() -> None:
        # threads and subprocesses of the parent start once the workers are forked
        if origin is not None:
            origin.start()
        if feeder is not None:
            feeder.start()
        if consoles is not None:
            try:
                consoles.start()
            except RhaasError:  # a console that cannot be read explains nothing; the run goes on
                pass

    ctx = Context(opts, image, pkey, settings, store, pull=pull, after_fork=after_fork)
    results: dict[str, KexecResult] = dict(early)
    for r in early.values():
        if on_result:
            on_result(r)
    interrupted = False
    try:
        for r in run_jobs(jobs, ctx):
            results[r.node] = r
            _explain(consoles, r)
            if on_result:
                on_result(r)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if consoles is not None:
            consoles.stop()
        if feeder is not None:
            feeder.stop()
        if origin is not None:
            origin.stop()
            if stats is not None:
                stats["origin_bytes"] = origin.bytes_sent
        _record(store, results, actor, opts.mode)
    if interrupted:
        raise KeyboardInterrupt
    return [results[d["name"]] for d in docs if d["name"] in results]


def _watch_consoles(store, settings: dict, jobs: list[Job], opts: KexecOptions):
    """The consoles of the nodes that will jump (rhaas.core.console; started after the fork), or None."""
    if opts.mode == "load" or not jobs:
        return None
    from rhaas.core.console_run import RunConsoles

    try:
        return RunConsoles(store, settings, [j.doc for j in jobs])
    except RhaasError:
        return None


def _explain(consoles, r: KexecResult) -> None:
    """A node that failed after its jump carries its last console lines; the last one ends its reason."""
    if consoles is None or r.outcome not in ("failed", "fallback") or not r.fired:
        return
    r.console_tail = consoles.tail(r.node, r.failed_at)
    if r.console_tail and r.reason:
        r.reason = f"{r.reason}: {r.console_tail[-1][:200]}"


def _chain_mode(settings: dict) -> str:
    mode = str(settings.get("blob-chain") or "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        raise UsageError(f"blob-chain is auto, on or off, not {mode!r}")
    return mode


def _chain_feeder(origin, pull, image: Image | None, opts: KexecOptions):
    """The thread that starts the run's chains (rhaas.core.kexec.sources.Chain), or None."""
    if pull is None or pull.chain is None:
        return None
    from rhaas.core.kexec.sources import ChainFeeder

    return ChainFeeder(pull.chain, origin, [image.kernel.sha256, image.initrd.sha256],
                       opts.connect_timeout + opts.command_timeout + 2 * opts.blob_fetch_timeout)


def _origin(image: Image, opts: KexecOptions, jobs: list[Job], settings: dict | None = None):
    """The run's image listener (bound, not yet serving: its threads start once the workers are
    forked) and the pull plan, or (None, None) when blob-listen is off."""
    import secrets

    from rhaas.adapters.blobserver import PREFIX, BlobServer
    from rhaas.core.kexec.sources import Chain, Pull, chain_count, peers_possible

    if opts.blob_listen.strip().lower() == "off" or image.kernel.size + image.initrd.size < opts.blob_min_bytes:
        return None, None
    files = {image.kernel.sha256: image.kernel.path, image.initrd.sha256: image.initrd.path}
    server = BlobServer(files, opts.blob_listen, opts.blob_url, workers=max(2, min(16, opts.blob_fanout * 2)))
    try:
        server.bind()
    except RhaasError:  # a fixed blob-listen port held by another run: the nodes get SFTP
        return None, None
    hosts = [j.endpoint.address.host for j in jobs]
    peers = opts.blob_peers != "off" and peers_possible(hosts)
    pull = Pull(
        f"{server.base_url}{PREFIX}{server.token}", [j.doc["name"] for j in jobs], hosts, opts.blob_fanout, peers,
        peer_port=secrets.SystemRandom().randrange(40000, 60000), peer_token=secrets.token_urlsafe(18),
        run_id=secrets.token_hex(6), fetch_timeout=opts.blob_fetch_timeout, cache_dir=opts.cache_dir,
    )
    chains = chain_count(_chain_mode(settings or {}), peers, hosts, image.kernel.size + image.initrd.size)
    if chains:
        pull.chain = Chain(len(jobs), hosts, secrets.SystemRandom().randrange(30000, 39000 - len(jobs)),
                           secrets.token_urlsafe(18), chains)
    return server, pull


def _record(store, results: dict[str, KexecResult], actor: str | None, mode: str) -> None:
    """One transaction for the whole batch: node fields and an event per node."""
    if not results:
        return
    with store.transaction(actor) as tx:
        docs = []
        for r in results.values():
            detail = {"image": r.image, "nonce": r.nonce, "mode": mode}
            if r.reason:
                detail["reason"] = r.reason
            if r.phases:
                detail["phases"] = {k: round(v, 3) for k, v in r.phases.items()}
            if r.attempts > 1:
                detail["attempts"] = r.attempts
            if r.console_tail:
                detail["console_tail"] = r.console_tail
            tx.event("kexec", r.node, r.outcome, **detail)
            cur = tx.node(r.node)
            if cur is None or r.keep_status:  # unregistered meanwhile, or left as it was
                continue
            doc = dict(cur)
            doc.pop("kexec_run", None)
            doc.update(status=_STATUS[r.outcome], reason=r.reason, updated=r.finished or time.time())
            if r.phases:
                doc["phases"] = dict(r.phases)
            if r.outcome == "ok":
                doc.update(image=r.image, boot_id=r.boot_id, nonce=r.nonce, last_boot=r.finished, loaded_image=None)
            elif r.outcome == "loaded":
                doc.update(boot_id=r.boot_id or doc.get("boot_id"), nonce=r.nonce, loaded_image=r.image)
            elif r.outcome == "fallback":
                doc.update(image=None, boot_id=r.boot_id, last_boot=r.finished, bootdev="pxe", loaded_image=None)
            else:
                if r.fired:  # it jumped or was power cycled: what runs there now is unknown
                    doc.update(image=None, loaded_image=None)
                if r.boot_id:
                    doc["boot_id"] = r.boot_id
            docs.append(doc)
        tx.put_nodes(docs)
