"""The agreement: a node leaving a tenant goes back to the standby image by kexec.

The departing tenant's keys are gone with the old initrd, and the next lease finds a
kexec-ready node. A node that cannot be kexec'd falls back to the power path like any other
kexec. Nodes with no SSH path are left as they are (the upstream's own policy applies).
"""

from __future__ import annotations

import contextlib
import threading

from rhaas.core.images import get_image
from rhaas.core.kexec import KexecOptions, kexec_nodes
from rhaas.errors import RhaasError


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
    """For `serve`: a downstream detach_node returns at once; the standby kexec runs behind it.

    The node carries ``returning`` meanwhile (not free, refused to connect_node); once back it is
    free again; a failed return keeps it held back with the reason (the reaper retries it later).
    """
    from rhaas.core.lease_reaper import standby_done

    with _busy_lock:
        if node in _busy:
            return
        _busy.add(node)
    # from a fresh read, under the claim: a caller's older view may predate the end of the last run
    doc = store.snapshot().node(node)
    if doc is None or not doc.get("returning") or doc.get("project"):
        with _busy_lock:
            _busy.discard(node)
        return

    def run():
        try:
            results = return_to_standby(store, settings, [node])
            bad = [r for r in results if r.outcome not in ("ok", "fallback")]
            standby_done(store, node, not bad, bad[0].reason if bad else None)
        except Exception as exc:  # noqa: BLE001 - recorded, never fatal to serve
            with contextlib.suppress(RhaasError):  # the store itself failed: the reaper retries
                standby_done(store, node, False, f"{type(exc).__name__}: {exc}")
        finally:
            with _busy_lock:
                _busy.discard(node)

    threading.Thread(target=run, name=f"standby-{node}", daemon=True).start()
