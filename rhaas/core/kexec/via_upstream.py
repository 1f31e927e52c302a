"""`rhaas kexec` through the upstream's ``rhaas.kexec`` extension, and the choice of path.

A leased node whose upstream is another ``rhaas serve`` that offers ``rhaas.kexec`` is
provisioned by the level that holds its SSH access: this instance uploads the kernel and
initrd once (skipped when the upstream already holds them), posts one batch with the node
names the upstream knows, the kernel arguments and the SSH keys for the node's overlay, and
polls the action until every node is done. Against a real HIL (no such extension) the nodes
are kexec'd over SSH as before. :func:`kexec_routed` picks the path (``via``: ``auto``,
``ssh`` or ``upstream``); the same pass-down is used by ``rhaas serve`` when it has leased the
node itself (:mod:`rhaas.core.provision_service`).

The results are :class:`~rhaas.core.kexec.plan.KexecResult` s, recorded in this inventory the
same way as an SSH run (one write before, one after), so the table, JSON and exit codes of
``rhaas kexec`` do not depend on the path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from rhaas import model
from rhaas.core.console_run import TAIL_LINES
from rhaas.core.images import Image, check_files
from rhaas.core.kexec.plan import KexecOptions, KexecResult, authorized_keys_for, lookup_nodes
from rhaas.errors import APIError, RhaasError, UpstreamUnreachable, UsageError
from rhaas.protocol import KEXEC_EXTENSION

VIAS = ("auto", "ssh", "upstream")
POLL_FIRST, POLL_MAX = 0.1, 0.25


def upstream_offers_kexec(client) -> bool:
    """Whether the upstream serves ``rhaas.kexec`` (a real HIL answers without it, or 404)."""
    try:
        return KEXEC_EXTENSION in (client.active_extensions() or [])
    except APIError:
        return False


def push_blobs(client, files: Iterable[tuple[str, str]]) -> int:
    """Upload each ``(sha256, path)`` the upstream does not hold yet; returns the bytes sent."""
    sent = 0
    for sha, path in files:
        if not client.blob_held(sha):
            sent += client.blob_upload(sha, path)
    return sent


def batch_budget(n: int, timeout: float, command_timeout: float) -> float:
    """Seconds a whole batch may take upstream before its unfinished nodes count as failed."""
    return timeout + 3 * command_timeout + 60.0 + 0.5 * n


def _result(name: str, entry: dict, image: str | None) -> KexecResult:
    outcome = entry.get("outcome")
    if outcome not in ("ok", "fallback", "failed"):
        outcome = "ok" if entry.get("status") == "DONE" else "failed"
    phases = entry.get("phases") if isinstance(entry.get("phases"), dict) else {}
    # the level that ran the kexec kept the node's console: its last lines come up with the result
    tail = entry.get("console_tail") if isinstance(entry.get("console_tail"), list) else []
    return KexecResult(
        name, outcome, image, _str(entry.get("nonce")), _str(entry.get("boot_id")),
        _str(entry.get("reason")) if outcome != "ok" else None,
        phases={str(k): float(v) for k, v in phases.items() if isinstance(v, (int, float))},
        fired=bool(entry.get("fired", outcome != "failed")),
        finished=time.time(),
        console_tail=[line for line in (_str(t) for t in tail[-TAIL_LINES:]) if line is not None]
        if outcome != "ok" else [],
    )


def _str(v) -> str | None:
    return v[:500] if isinstance(v, str) else None


def run_upstream_batches(
    client,
    batches: list[tuple[dict[str, str], list[str]]],
    kernel: str,
    initrd: str,
    append: str,
    image: str | None,
    budget: float,
    timeout: float | None = None,
    fallback: bool = True,
    on_result: Callable[[KexecResult], None] | None = None,
    on_started: Callable[[list[str]], None] | None = None,
    into: dict[str, KexecResult] | None = None,
) -> dict[str, KexecResult]:
    """Start one upstream action per batch ``({upstream name: local name}, ssh_keys)`` and poll them.

    Returns a result per local node name. A batch the upstream refused gives failed results
    marked ``keep_status`` (nothing was done to those nodes); ``on_started`` gets the local
    names of each batch the upstream accepted, before it is polled. ``into`` (optional) is
    filled as results arrive, so a caller interrupted half-way still holds what came back.
    """
    results: dict[str, KexecResult] = {} if into is None else into
    running: list[tuple[str, dict[str, str]]] = []

    def done(r: KexecResult) -> None:
        results[r.node] = r
        if on_result:
            on_result(r)

    for names, keys in batches:
        try:
            action = client.kexec_start(sorted(names), kernel, initrd, append, keys, timeout=timeout,
                                        fallback=fallback)
        except UpstreamUnreachable:
            if not running:
                raise
            action = None
            why = "upstream unreachable"
        except APIError as exc:
            action, why = None, f"upstream refused the kexec: {exc.msg or exc}"
        if action is None:
            for local in names.values():
                done(KexecResult(local, "failed", image, None, None, why, keep_status=True, finished=time.time()))
            continue
        running.append((action, names))
        if on_started:
            on_started(list(names.values()))

    deadline = time.monotonic() + budget
    delay = POLL_FIRST
    last_error = None
    while running:
        for action, names in list(running):
            try:
                doc = client.kexec_status(action)
                last_error = None
            except (UpstreamUnreachable, APIError) as exc:
                last_error = str(exc)
                continue
            nodes = doc.get("nodes") if isinstance(doc, dict) else None
            for up, entry in (nodes or {}).items():
                local = names.get(up)
                if local is None or local in results or not isinstance(entry, dict):
                    continue
                if entry.get("status") in ("DONE", "ERROR"):
                    done(_result(local, entry, image))
            if all(local in results for local in names.values()) or (
                isinstance(doc, dict) and doc.get("status") in ("DONE", "ERROR")
            ):
                running.remove((action, names))
        if not running:
            break
        if time.monotonic() > deadline:
            why = f"no result from the upstream within {budget:g} s" + (f" ({last_error})" if last_error else "")
            for _, names in running:
                for local in names.values():
                    if local not in results:
                        done(KexecResult(local, "failed", image, None, None, why, fired=True, finished=time.time()))
            break
        time.sleep(delay)
        delay = min(delay * 1.5, POLL_MAX)
    for _, names in running:  # an action that ended without naming some node
        for local in names.values():
            if local not in results:
                done(KexecResult(local, "failed", image, None, None, "the upstream gave no result for this node",
                                 fired=True, finished=time.time()))
    return results


def choose_path(store, settings: dict, docs: list[dict], opts: KexecOptions, via: str) -> str:
    """``"ssh"`` or ``"upstream"`` for this run (asks the upstream about its extensions once)."""
    if via not in VIAS:
        raise UsageError(f"--via must be one of {', '.join(VIAS)}")
    if via == "ssh":
        return "ssh"
    from rhaas.core.instance import is_derived, upstream_client

    leased = bool(docs) and all(d.get("source") == "leased" for d in docs)
    if via == "upstream":
        if opts.mode != "full":
            raise UsageError("--via upstream does a whole kexec; --load-only and --exec go over SSH")
        if not leased:
            bad = next(d["name"] for d in docs if d.get("source") != "leased")
            raise UsageError(f"--via upstream: node {bad} is not leased from an upstream")
        if not upstream_offers_kexec(upstream_client(store)):
            raise UsageError(f"--via upstream: the upstream does not offer {KEXEC_EXTENSION}")
        return "upstream"
    if opts.mode != "full" or not leased or not is_derived(store.snapshot()):
        return "ssh"
    try:
        return "upstream" if upstream_offers_kexec(upstream_client(store)) else "ssh"
    except UpstreamUnreachable:
        return "ssh"  # the nodes may still answer over SSH, as before the extension existed


def kexec_routed(
    store,
    settings: dict,
    names: Iterable[str],
    image: Image | None,
    opts: KexecOptions,
    image_name: str | None = None,
    on_result: Callable[[KexecResult], None] | None = None,
    via: str = "auto",
    stats: dict | None = None,
) -> list[KexecResult]:
    """``rhaas kexec``: over SSH (:func:`~rhaas.core.kexec.batch.kexec_nodes`) or through the upstream.
    ``stats`` gets the SSH path's run figures (``origin_bytes``)."""
    from rhaas.core.kexec.batch import kexec_nodes

    names = list(names)
    docs = lookup_nodes(store.snapshot(), names)
    if choose_path(store, settings, docs, opts, via) == "ssh":
        return kexec_nodes(store, settings, names, image, opts, image_name, on_result=on_result, stats=stats)
    return kexec_via_upstream(store, settings, docs, image, opts, image_name or image.name, on_result)


def kexec_via_upstream(store, settings: dict, docs: list[dict], image: Image, opts: KexecOptions,
                       image_name: str, on_result=None) -> list[KexecResult]:
    """Provision leased nodes through the upstream's ``rhaas.kexec``; two inventory writes as an SSH run."""
    from rhaas.adapters import hostkeys
    from rhaas.core.images import check_append
    from rhaas.core.instance import upstream_client
    from rhaas.core.kexec.batch import _record

    check_files(image)
    check_append(image.append)
    client = upstream_client(store)
    _, public = hostkeys.ensure_client_key(store.home, settings.get("ssh-key"))
    groups: dict[tuple[str, ...], dict[str, str]] = {}
    for doc in docs:
        keys = tuple(authorized_keys_for(doc, public))
        groups.setdefault(keys, {})[doc.get("upstream_name") or doc["name"]] = doc["name"]
    push_blobs(client, [(image.kernel.sha256, image.kernel.path), (image.initrd.sha256, image.initrd.path)])

    def mark(names: list[str]) -> None:
        now = time.time()
        with store.transaction() as tx:
            tx.put_nodes([{**cur, "status": model.STATUS_PROVISIONING, "updated": now}
                          for n in names if (cur := tx.node(n)) is not None])

    budget = batch_budget(len(docs), opts.timeout, opts.command_timeout)
    results: dict[str, KexecResult] = {}
    try:
        run_upstream_batches(
            client, [(names, list(keys)) for keys, names in groups.items()],
            image.kernel.sha256, image.initrd.sha256, image.append, image_name, budget,
            timeout=opts.timeout, fallback=opts.fallback, on_result=on_result, on_started=mark, into=results,
        )
    finally:
        _record(store, results, None, opts.mode)
    if not results:
        raise RhaasError("the upstream gave no result")
    return [results[d["name"]] for d in docs if d["name"] in results]
