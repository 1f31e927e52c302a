"""One kexec batch of `rhaas serve`, run in a child process: ``python -m rhaas.core.provision_worker``.

`rhaas serve` is threaded, and the kexec pipeline forks worker processes to spread the SSH
handshakes over the CPUs, which is only safe from a single-threaded process (see
:mod:`rhaas.core.kexec.scheduler`). So the serving instance hands each batch it performs
itself to this child: the job as JSON on stdin (node names, the blob paths of the kernel and
initrd, the kernel arguments, the SSH keys for the overlay, options), one JSON line per node
result on stdout as nodes finish. The child runs the ordinary pipeline
(:func:`~rhaas.core.kexec.batch.kexec_nodes`) against the same inventory (RHAAS_HOME), which
records the run as ``rhaas kexec`` does. The parent bounds the child's life and stops it by PID.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from rhaas import settings as settings_mod
    from rhaas.core.images import Image, ImageFile
    from rhaas.core.kexec.batch import kexec_nodes
    from rhaas.core.kexec.plan import KexecOptions
    from rhaas.errors import RhaasError
    from rhaas.store import Store

    job = json.load(sys.stdin)
    store = Store()
    settings = settings_mod.effective(store.snapshot().config())
    image = Image(job["image"], ImageFile.from_doc(job["kernel"]), ImageFile.from_doc(job["initrd"]), job["append"])
    opts = KexecOptions.from_settings(settings, timeout=job.get("timeout"), fallback=job.get("fallback", True))

    def emit(r) -> None:
        sys.stdout.write(json.dumps(r.__dict__) + "\n")
        sys.stdout.flush()

    try:
        kexec_nodes(store, settings, job["nodes"], image, opts, job["image"], on_result=emit, actor=job.get("actor"),
                    tenant_keys=job["ssh_keys"])
    except RhaasError as exc:
        sys.stdout.write(json.dumps({"error": str(exc)}) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
