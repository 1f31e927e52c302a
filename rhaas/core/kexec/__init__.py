"""The kexec pipeline: stage, load, jump, wait, verify, and the power-cycle fallback.

``kexec_nodes`` provisions a batch of nodes and writes the inventory twice, whatever the
number of nodes: once before any node is touched (status provisioning and the nonce) and
once at the end (the results). The modules, by what they do:

* :mod:`~rhaas.core.kexec.plan`: options (:meth:`KexecOptions.from_settings`), results,
  nonces and command lines, overlays, node look-up and the ``--dry-run`` plan;
* :mod:`~rhaas.core.kexec.batch`: one run over a batch, and its two inventory writes;
* :mod:`~rhaas.core.kexec.scheduler`: worker processes, thread pools and the timer queue;
* :mod:`~rhaas.core.kexec.node_run`: one node's state machine (load, jump, poll, verify, fallback);
* :mod:`~rhaas.core.kexec.commands`: the shell commands sent to a node, and reading their answers.

Fabric and paramiko are imported only when a run needs them.
"""

from __future__ import annotations

from rhaas.core.kexec.batch import kexec_nodes
from rhaas.core.kexec.commands import Commands, cmdline_has
from rhaas.core.kexec.plan import (
    MODES,
    OUTCOMES,
    KexecOptions,
    KexecResult,
    adhoc_image_name,
    authorized_keys_for,
    kernel_cmdline,
    lookup_nodes,
    new_nonce,
    node_overlay,
    plan,
)

__all__ = [
    "MODES",
    "OUTCOMES",
    "Commands",
    "KexecOptions",
    "KexecResult",
    "adhoc_image_name",
    "authorized_keys_for",
    "cmdline_has",
    "kernel_cmdline",
    "kexec_nodes",
    "lookup_nodes",
    "new_nonce",
    "node_overlay",
    "plan",
]
