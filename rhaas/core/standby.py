"""The agreement: a node leaving a tenant goes back to the standby image by kexec.

The departing tenant's keys are gone with the old initrd, and the next lease finds a
kexec-ready node. A node that cannot be kexec'd falls back to the power path like any other
kexec. Nodes with no SSH path are left as they are (the upstream's own policy applies).
"""

from __future__ import annotations

import threading

from rhaas.core.images import get_image
from rhaas.core.kexec import KexecOptions, kexec_nodes


def return_to_standby(store, settings: dict, names: list[str]):
    """kexec NAMES into the standby image; returns the per-node results (never raises per node)."""
    image_name = settings.get("standby-image")
    if not image_name or not names:
        return []
    snap = store.snapshot()
    reachable = [n for n in names if (snap.node(n) or {}).get("ssh")]
    if not reachable:
        return []
    image = get_image(snap, image_name)
    return kexec_nodes(store, settings, reachable, image, KexecOptions.from_settings(settings), image_name=image_name,
                       actor="standby")


_busy: set[str] = set()
_busy_lock = threading.Lock()


def standby_in_background(store, settings: dict, node: str) -> None:
    """For `serve`: a downstream detach_node returns at once; the standby kexec runs behind it."""
    with _busy_lock:
        if node in _busy:
            return
        _busy.add(node)

    def run():
        try:
            return_to_standby(store, settings, [node])
        except Exception as exc:  # noqa: BLE001 - recorded, never fatal to serve
            with store.transaction("standby") as tx:
                tx.event("standby", node, "failed", reason=str(exc))
        finally:
            with _busy_lock:
                _busy.discard(node)

    threading.Thread(target=run, name=f"standby-{node}", daemon=True).start()
