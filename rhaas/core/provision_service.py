"""The ``rhaas.kexec`` extension of `rhaas serve`: blobs, kexec actions, and which level does the work.

A member of a node's project (or an admin) uploads the kernel and initrd by sha256
(:class:`~rhaas.core.blobstore.BlobStore`; which projects hold a blob is in the ``blobs``
table), then posts a batch: node names, the two digests, the kernel arguments and the SSH
public keys for the overlay. Everything that can be checked is checked before the answer
(names, ownership, digests, control characters, blobs held), and the call returns at once
with an action id; the work runs on this service's own threads, never inside the request
and never under the store's lock. Per node:

* a node this instance registered (it holds the SSH access) goes through the ordinary kexec
  pipeline in a child of a preloaded fork server (:mod:`rhaas.core.provision_worker`), with the caller's keys
  plus this instance's own key in the overlay;
* a node this instance leased from an upstream that offers ``rhaas.kexec`` is passed down:
  the blobs are uploaded there if missing, one batch is posted with the upstream's node
  names, and it is polled (:mod:`rhaas.core.kexec.via_upstream`), as power calls pass down;
* a leased node whose upstream lacks the extension is kexec'd over SSH from here.

An action lives in memory while it runs, plus a small record in the store (``kexec_actions``,
written in short transactions when it starts and when it ends). A record left ``PENDING`` by
a serve that died is closed as ``ERROR`` by the next one. Only the project that created an
action can read it; to anyone else it does not exist.
"""

from __future__ import annotations

import re
import threading
import time
import uuid

from rhaas.core.blobstore import BlobStore, check_sha
from rhaas.errors import (
    BlockedError,
    IllegalStateError,
    NotFoundError,
    RhaasError,
    ValidationError,
)
from rhaas.protocol import valid_name

ACTIONS = "kexec_actions"
BLOBS = "blobs"
KEEP_ACTIONS = 200  # finished action records kept in the store
MAX_NODES = 10_000
MAX_KEYS = 64
_KEY_RE = re.compile(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,3}( [^\x00-\x1f\x7f]*)?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
NOT_HELD = "Node {} does not exist."


def _check_text(value: str, what: str, limit: int) -> str:
    if len(value) > limit:
        raise ValidationError(f"{what} longer than {limit} characters")
    if _CONTROL.search(value):
        raise ValidationError(f"{what} must not contain line breaks or other control characters")
    return value


class ProvisionService:
    def __init__(self, store, settings: dict, upstream=None, workers: int = 4):
        self.store = store
        self.settings = settings
        self.upstream = upstream
        self.blobs = BlobStore(store.home)
        self._lock = threading.Lock()
        self._actions: dict[str, dict] = {}
        self._busy: set[str] = set()
        self._offers: tuple[float, bool] | None = None
        # daemon threads: stopping serve does not wait for a batch (its child records the results)
        self._slots = threading.BoundedSemaphore(workers)
        self._close_stale()
        threading.Thread(target=_warm_up, name="rhaas-kexec-warm-up", daemon=True).start()

    # -- records ----------------------------------------------------------------------------------
    def _close_stale(self) -> None:
        """Records a dead serve left PENDING: their outcome is unknown, say so."""
        with self.store.transaction("rhaas-serve") as tx:
            tbl = tx.table(ACTIONS)
            stale = [int(k) for k, a in tx.data.get(ACTIONS, {}).items() if a.get("status") == "PENDING"]
            if stale:
                tbl.update({"status": "ERROR", "reason": "interrupted: the serving instance restarted"},
                           doc_ids=stale)

    def _save(self, action: dict) -> None:
        record = {k: action[k] for k in ("name", "projects", "status", "created", "finished", "by")}
        record["nodes"] = action["nodes"] if action["status"] != "PENDING" else {n: {"status": "PENDING"}
                                                                                for n in action["nodes"]}
        with self.store.transaction(action["by"]) as tx:
            tbl = tx.table(ACTIONS)
            rows = tx.data.get(ACTIONS, {})
            ids = [int(k) for k, a in rows.items() if a.get("name") == action["name"]]
            if ids:
                tbl.update(lambda d: (d.clear(), d.update(record)), doc_ids=ids)
            else:
                tbl.insert(record)
            done = sorted((a.get("created", 0), int(k)) for k, a in rows.items() if a.get("status") != "PENDING")
            if len(done) > KEEP_ACTIONS:
                tbl.remove(doc_ids=[i for _, i in done[: len(done) - KEEP_ACTIONS]])

    # -- blobs -------------------------------------------------------------------------------------
    def _blob_doc(self, view, sha: str) -> dict | None:
        return next((b for b in view.data.get(BLOBS, {}).values() if b.get("name") == sha), None)

    def _holds(self, caller, view, sha: str) -> bool:
        doc = self._blob_doc(view, sha)
        if doc is None or not self.blobs.has(sha):
            return False
        return caller.is_admin or bool(caller.projects & set(doc.get("projects", [])))

    def blob_show(self, caller, view, sha256: str) -> dict:
        check_sha(sha256)
        if not self._holds(caller, view, sha256):
            raise NotFoundError(f"Blob {sha256} does not exist.")
        return {"sha256": sha256, "size": self.blobs.size(sha256)}

    def blob_part(self, caller, sha256: str, offset: str, stream, length: int) -> dict:
        """One part of an upload (see protocol.BLOB_PART), appended to the caller's own partial file."""
        check_sha(sha256)
        if not caller.is_admin and not caller.projects:
            raise NotFoundError(f"Blob {sha256} does not exist.")
        if not offset.isdigit() or len(offset) > 12:
            raise ValidationError(f"not a byte offset: {offset[:20]!r}")
        return {"sha256": sha256, "received": self.blobs.receive_part(caller.name, sha256, int(offset), stream, length)}

    def blob_commit(self, caller, sha256: str, size: int) -> dict:
        """The upload is whole: its sha256 is checked, and the caller's projects may use the blob."""
        check_sha(sha256)
        if not caller.is_admin and not caller.projects:
            raise NotFoundError(f"Blob {sha256} does not exist.")
        self.blobs.commit(caller.name, sha256, size)
        self._grant(sha256, caller.projects, caller.name)
        return {"sha256": sha256, "size": self.blobs.size(sha256)}

    def _grant(self, sha: str, projects, actor: str) -> None:
        with self.store.transaction(actor) as tx:
            tbl = tx.table(BLOBS)
            for k, b in tx.data.get(BLOBS, {}).items():
                if b.get("name") == sha:
                    have = set(b.get("projects", []))
                    if not set(projects) <= have:
                        tbl.update({"projects": sorted(have | set(projects))}, doc_ids=[int(k)])
                    return
            tbl.insert({"name": sha, "projects": sorted(projects), "added": time.time()})

    # -- kexec ---------------------------------------------------------------------------------------
    def kexec(self, caller, nodes, kernel, initrd, append, ssh_keys, blob_url=None, timeout=None,
              fallback=True) -> dict:
        if not nodes or len(nodes) > MAX_NODES or len(set(map(str, nodes))) != len(nodes):
            raise ValidationError(f"nodes: give 1 to {MAX_NODES} distinct node names")
        for n in nodes:
            if not isinstance(n, str) or not valid_name(n):
                raise ValidationError(f"invalid node name {str(n)[:80]!r}")
        check_sha(kernel)
        check_sha(initrd)
        _check_text(append, "kernel arguments", 4096)
        if len(ssh_keys) > MAX_KEYS:
            raise ValidationError(f"at most {MAX_KEYS} SSH keys")
        for key in ssh_keys:
            if not isinstance(key, str) or not _KEY_RE.match(_check_text(key, "an SSH key", 16384)):
                raise ValidationError("ssh_keys: each must be one OpenSSH public key line")
        if timeout is not None and not 0 < timeout <= 3600:
            raise ValidationError("timeout: seconds, more than 0 and at most 3600")
        if blob_url is not None:
            _check_text(blob_url, "blob_url", 2048)
            if not blob_url.startswith(("http://", "https://")):
                raise ValidationError("blob_url must be an http(s) URL")
        view = self.store.snapshot()
        projects = set()
        for n in nodes:
            doc = view.node(n)
            project = (doc or {}).get("project")
            # a node the caller does not hold does not exist for it, whoever holds it
            if doc is None or not (caller.is_admin or (project and project in caller.projects)):
                raise NotFoundError(NOT_HELD.format(n))
            if project:
                projects.add(project)
        # a blob this caller's project does not hold is fetched (and so proven) even if another holds it
        fetch = [sha for sha in dict.fromkeys((kernel, initrd)) if not self._holds(caller, view, sha)]
        if fetch and blob_url is None:
            raise IllegalStateError(f"blob {fetch[0]} is not held here: upload it first (PUT /v0/rhaas/blob/{fetch[0]})")
        action_id = str(uuid.uuid4())
        action = {
            "name": action_id, "projects": sorted(projects), "by": caller.name, "created": time.time(),
            "finished": None, "status": "PENDING", "nodes": {n: {"status": "PENDING"} for n in nodes},
        }
        job = {"kernel": kernel, "initrd": initrd, "append": append, "ssh_keys": list(ssh_keys),
               "blob_url": blob_url, "fetch": fetch, "timeout": timeout, "fallback": fallback, "projects": caller.projects}
        with self._lock:
            busy = self._busy & set(nodes)
            if busy:
                raise BlockedError(f"a kexec is already running on {', '.join(sorted(busy)[:5])}")
            self._busy |= set(nodes)
            self._actions[action_id] = action
        try:
            self._save(action)
            threading.Thread(target=self._slot_run, args=(action, job), name=f"rhaas-kexec-{action_id[:8]}",
                             daemon=True).start()
        except BaseException:
            with self._lock:
                self._busy -= set(nodes)
                self._actions.pop(action_id, None)
            raise
        return {"action_id": action_id}

    def kexec_status(self, caller, view, action_id: str) -> dict:
        with self._lock:
            action = self._actions.get(action_id)
            if action is not None:
                action = {**action, "nodes": dict(action["nodes"])}
        if action is None:
            action = next((a for a in view.data.get(ACTIONS, {}).values() if a.get("name") == action_id), None)
        if action is None or not (caller.is_admin or set(action.get("projects") or ["-"]) <= caller.projects):
            raise NotFoundError(f"kexec action {action_id} does not exist.")
        out = {"action_id": action_id, "status": action["status"], "nodes": action["nodes"]}
        if action.get("reason"):
            out["reason"] = action["reason"]
        return out

    # -- the work (on this service's threads) ---------------------------------------------------------
    def _node_done(self, action: dict, name: str, r: dict) -> None:
        entry = {"status": "DONE" if r.get("outcome") == "ok" else "ERROR", "outcome": r.get("outcome")}
        for k in ("boot_id", "nonce", "reason", "phases", "fired", "console_tail"):
            if r.get(k) is not None:
                entry[k] = r[k]
        with self._lock:
            if action["nodes"].get(name, {}).get("status") == "PENDING":
                action["nodes"][name] = entry

    def _slot_run(self, action: dict, job: dict) -> None:
        with self._slots:  # at most `workers` batches at once; the others wait their turn
            self._run(action, job)

    def _run(self, action: dict, job: dict) -> None:
        names = list(action["nodes"])
        try:
            for sha in job["fetch"]:
                self.blobs.fetch(sha, job["blob_url"].rstrip("/") + "/" + sha)
                self._grant(sha, job["projects"], action["by"])
            view = self.store.snapshot()
            down, local = [], []
            for n in names:
                doc = view.node(n) or {}
                (down if doc.get("source") == "leased" and self._upstream_offers() else local).append(n)
            threads = []
            if down:
                t = threading.Thread(target=self._guard, args=(action, down, self._pass_down, job), daemon=True)
                t.start()
                threads.append(t)
            if local:
                self._guard(action, local, self._run_here, job)
            for t in threads:
                t.join()
        except Exception as exc:  # noqa: BLE001 - every failure ends the action with its reason
            self._fail_pending(action, names, f"{type(exc).__name__}: {exc}" if not isinstance(exc, RhaasError)
                               else str(exc))
        finally:
            with self._lock:
                action["status"] = "DONE" if all(e["status"] == "DONE" for e in action["nodes"].values()) else "ERROR"
                action["finished"] = time.time()
                self._busy -= set(names)
            try:
                self._save(action)
            finally:
                with self._lock:
                    self._actions.pop(action["name"], None)

    def _guard(self, action, names, work, job) -> None:
        try:
            work(action, names, job)
        except Exception as exc:  # noqa: BLE001
            self._fail_pending(action, names, str(exc) if isinstance(exc, RhaasError) else f"internal error: {exc!r}")
        self._fail_pending(action, names, "no result for this node")

    def _fail_pending(self, action, names, reason: str) -> None:
        for n in names:
            self._node_done(action, n, {"outcome": "failed", "reason": reason})

    def _upstream_offers(self) -> bool:
        if self.upstream is None:
            return False
        from rhaas.core.kexec.via_upstream import upstream_offers_kexec

        now = time.monotonic()
        if self._offers is None or now - self._offers[0] > 60:
            self._offers = (now, upstream_offers_kexec(self.upstream))
        return self._offers[1]

    def _pass_down(self, action: dict, names: list[str], job: dict) -> None:
        from rhaas.core.kexec.batch import _record
        from rhaas.core.kexec.via_upstream import batch_budget, push_blobs, run_upstream_batches

        view = self.store.snapshot()
        mapping = {(view.node(n) or {}).get("upstream_name") or n: n for n in names}
        push_blobs(self.upstream, [(s, str(self.blobs.path(s))) for s in (job["kernel"], job["initrd"])])
        timeout = float(job["timeout"] or self.settings.get("timeout") or 120.0)
        budget = batch_budget(len(names), timeout, max(30.0, 3 * float(self.settings.get("connect-timeout") or 10)))
        results: dict = {}
        try:
            run_upstream_batches(
                self.upstream, [(mapping, job["ssh_keys"])], job["kernel"], job["initrd"], job["append"],
                _image_name(job), budget, timeout=job["timeout"], fallback=job["fallback"],
                on_result=lambda r: self._node_done(action, r.node, r.__dict__), into=results,
            )
        finally:
            _record(self.store, results, action["by"], "full")

    def _run_here(self, action: dict, names: list[str], job: dict) -> None:
        from rhaas.core import provision_worker
        from rhaas.core.kexec.via_upstream import batch_budget

        files = {}
        for what in ("kernel", "initrd"):
            p = self.blobs.path(job[what])
            st = p.stat()
            files[what] = {"path": str(p), "size": st.st_size, "sha256": job[what], "mtime_ns": st.st_mtime_ns}
        spec = {"nodes": names, "image": _image_name(job), "append": job["append"], "ssh_keys": job["ssh_keys"],
                "timeout": job["timeout"], "fallback": job["fallback"], "actor": action["by"], **files}
        timeout = float(job["timeout"] or self.settings.get("timeout") or 120.0)
        budget = batch_budget(len(names), timeout, max(30.0, 3 * float(self.settings.get("connect-timeout") or 10)))
        ctx = provision_worker.context()
        recv, send = ctx.Pipe(duplex=False)
        # not a daemon: the batch forks its own worker processes
        child = ctx.Process(target=provision_worker.run_job, args=(spec, str(self.store.home), send), daemon=False)
        child.start()
        send.close()
        deadline = time.monotonic() + budget
        error = None
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    error = f"no result within {budget:g} s"
                    break
                if not recv.poll(min(left, 5.0)):
                    if not child.is_alive() and not recv.poll(0):
                        error = f"kexec worker exited with status {child.exitcode}"
                        break
                    continue
                try:
                    r = recv.recv()
                except EOFError:
                    error = f"kexec worker exited with status {child.exitcode}"
                    break
                if r is None:
                    break
                if isinstance(r, dict) and "error" in r:
                    error = str(r["error"])
                elif isinstance(r, dict) and r.get("node") in action["nodes"]:
                    self._node_done(action, r["node"], r)
        finally:
            recv.close()
            child.join(timeout=30)
            if child.is_alive():
                child.kill()  # our own child, by its handle (its PID)
                child.join()
        if error:
            self._fail_pending(action, names, error)

def _warm_up() -> None:
    from rhaas.core import provision_worker

    provision_worker.warm_up()


def _image_name(job: dict) -> str:
    import hashlib

    h = hashlib.sha256(f"{job['kernel']}:{job['initrd']}:{job['append']}".encode()).hexdigest()
    return f"adhoc-{h[:12]}"

