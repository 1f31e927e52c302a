"""Tab completion values: names from the inventory's index, free nodes from a short-lived cache.

Every TAB starts a fresh `rhaas` process, so this module imports nothing heavy (no TinyDB,
no Fabric, no rich): local names come from rhaas.names_index, which reads a few kB file the
inventory keeps beside itself.

Only names that pass rhaas.model.name_ok are ever offered, whatever a stored inventory, the
index or the upstream-free cache holds: a hostile upstream name (``$(touch F)``, ``a b;c``, a
newline) never reaches the command line. The bash script also escapes what it inserts.
"""

from __future__ import annotations

import json
import os
import time


def _tables() -> dict:
    from rhaas.names_index import read_names_index

    return read_names_index()


def _match(names, incomplete):
    from rhaas.model import name_ok

    if not isinstance(names, list):
        return []
    return [n for n in names if name_ok(n) and n.startswith(incomplete)]


def _first(rows) -> list:
    return [r[0] for r in rows if isinstance(r, list) and r]


def complete_nodes(ctx, param, incomplete):
    return _match(sorted(map(str, _first(_tables().get("nodes", [])))), incomplete)


def complete_leased(ctx, param, incomplete):
    rows = [r for r in _tables().get("nodes", []) if isinstance(r, list) and len(r) > 1 and r[1] == "leased"]
    return _match(sorted(map(str, _first(rows))), incomplete)


def complete_images(ctx, param, incomplete):
    return _match(sorted(map(str, _tables().get("images", []))), incomplete)


def complete_networks(ctx, param, incomplete):
    return _match(sorted(map(str, _tables().get("networks", []))), incomplete)


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

        names = _match(upstream_free_names(), "")
    except Exception:  # noqa: BLE001  # completion must never print a traceback
        return []
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_atomic(path, json.dumps(names), mode=0o600, durable=False)
    except OSError:
        pass
    return _match(names, incomplete)
