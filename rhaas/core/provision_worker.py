"""One kexec batch of `rhaas serve`, run in a child process started from a preloaded fork server.

`rhaas serve` is threaded, and the kexec pipeline forks worker processes to spread the SSH
handshakes over the CPUs, which is only safe from a single-threaded process (see
:mod:`rhaas.core.kexec.scheduler`). So the serving instance runs each batch it performs itself
in a child made by multiprocessing's *forkserver*: a clean interpreter started once (by exec,
not by forking the threaded serve) that has already imported this module, the kexec pipeline
and Fabric, and forks one single-threaded child per batch. A batch therefore starts as fast as
``rhaas kexec`` does on the command line, without paying for an interpreter and its imports.

The child runs the ordinary pipeline (:func:`~rhaas.core.kexec.batch.kexec_nodes`) against the
same inventory, which records the run as ``rhaas kexec`` does, and sends one dict per node
result over a pipe as nodes finish, then ``None``. The parent bounds the child's life and
stops it by its handle (its PID).
"""

from __future__ import annotations

import multiprocessing as mp
import threading

import fabric  # noqa: F401 - preloaded in the fork server, so no batch pays for it
import paramiko  # noqa: F401

from rhaas import settings as settings_mod
from rhaas.core.images import Image, ImageFile
from rhaas.core.kexec.batch import kexec_nodes
from rhaas.core.kexec.plan import KexecOptions
from rhaas.errors import RhaasError
from rhaas.store import Store

_ctx = None
_ctx_lock = threading.Lock()


def context():
    """The forkserver context, preloaded with this module (started on first use, in the background)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            _ctx = ctx
    return _ctx


def warm_up() -> None:
    """Start the fork server now, so that the first batch does not wait for it."""
    from multiprocessing import forkserver

    context()
    forkserver.ensure_running()


def run_job(job: dict, home: str, conn) -> None:
    """The child's body: run one batch and send its results over ``conn``."""
    try:
        store = Store(home)
        settings = settings_mod.effective(store.snapshot().config())
        image = Image(job["image"], ImageFile.from_doc(job["kernel"]), ImageFile.from_doc(job["initrd"]),
                      job["append"])
        opts = KexecOptions.from_settings(settings, timeout=job.get("timeout"), fallback=job.get("fallback", True))
        kexec_nodes(store, settings, job["nodes"], image, opts, job["image"], actor=job.get("actor"),
                    on_result=lambda r: conn.send(dict(r.__dict__)), tenant_keys=job["ssh_keys"])
    except RhaasError as exc:
        conn.send({"error": str(exc)})
    except Exception as exc:  # noqa: BLE001 - the parent gets one line, never a trace
        conn.send({"error": f"internal error: {type(exc).__name__}: {exc}"})
    finally:
        try:
            conn.send(None)
        finally:
            conn.close()
