"""Local virtual datacenter for rhaas: QEMU nodes that really kexec, behind ipmi_sim BMCs.

Public API::

    from rhaas.lab import Lab, up, down, status, build_guest, make_overlay

See :mod:`rhaas.lab.lab` (Lab, lab.json), :mod:`rhaas.lab.guest` (images, built from
:mod:`rhaas.lab.debs`, :mod:`rhaas.lab.guestroot` and :mod:`rhaas.lab.initrd`),
:mod:`rhaas.lab.vm` (QEMU), :mod:`rhaas.lab.bmc` (ipmi_sim).  :mod:`rhaas.lab.stack` adds
the root rhaas instance and its ``rhaas serve`` on top (``rhaas lab up|status|down``, or
SIMULATED nodes from the asyncssh farm), and :mod:`rhaas.lab.demo` is ``make demo``.
"""

from .guest import GuestImages, build_guest, default_cache_dir, make_overlay
from .guestssh import wait_ssh_ready
from .lab import Lab, LabNode, check_host_tools, down, status, up
from .vm import VM, LabError, MissingToolError

__all__ = [
    "VM",
    "GuestImages",
    "Lab",
    "LabError",
    "LabNode",
    "MissingToolError",
    "build_guest",
    "check_host_tools",
    "default_cache_dir",
    "down",
    "make_overlay",
    "status",
    "up",
    "wait_ssh_ready",
]
