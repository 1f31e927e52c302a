"""Tab completion values: names from the inventory's index, free nodes from a short-lived cache.

Every TAB starts a fresh `rhaas` process, so this module imports nothing heavy (no TinyDB,
no Fabric, no rich): local names come from rhaas.names_index, which reads a few kB file the
inventory keeps beside itself.
"""

from __future__ import annotations

import json
import os
import time


def _tables() -> dict:
    from rhaas.names_index import read_names_index

    return read_names_index()


def _match(names, incomplete):
    return [n for n in names if n.startswith(incomplete)]


def complete_nodes(ctx, param, incomplete):
    return _match(sorted(n[0] for n in _tables().get("nodes", [])), incomplete)


def complete_leased(ctx, param, incomplete):
    return _match(sorted(n[0] for n in _tables().get("nodes", []) if n[1] == "leased"), incomplete)


def complete_images(ctx, param, incomplete):
    return _match(sorted(_tables().get("images", [])), incomplete)


def complete_networks(ctx, param, incomplete):
    return _match(sorted(_tables().get("networks", [])), incomplete)


UPSTREAM_CACHE_TTL = 30.0


def complete_upstream_free(ctx, param, incomplete):
    """Upstream free nodes, from a cache refreshed at most every 30 s (and within 1 s)."""
    from rhaas.atomic import write_atomic
    from rhaas.names_index import default_home

    path = os.path.join(default_home(), "cache", "upstream-free.json")
    try:
        if time.time() - os.stat(path).st_mtime < UPSTREAM_CACHE_TTL:
            with open(path, encoding="utf-8") as fh:
                return _match(json.load(fh), incomplete)
    except (OSError, ValueError):
        pass
    try:
        os.environ.setdefault("RHAAS_UPSTREAM_TIMEOUT", "1")
        from rhaas.core.instance import upstream_free_names

        names = upstream_free_names()
    except Exception:  # noqa: BLE001  # completion must never print a traceback
        return []
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_atomic(path, json.dumps(names), mode=0o600, durable=False)
    except OSError:
        pass
    return _match(names, incomplete)
