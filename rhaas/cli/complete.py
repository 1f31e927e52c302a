"""Tab completion values, read straight from the inventory file.

Every TAB starts a fresh `rhaas` process, so this module imports nothing heavy (no TinyDB,
no Fabric, no rich) and parses the store's JSON itself.
"""

from __future__ import annotations

import json
import os
import time


def _home() -> str:
    env = os.environ.get("RHAAS_HOME")
    if env:
        return os.path.expanduser(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "rhaas")


def _tables() -> dict:
    try:
        with open(os.path.join(_home(), "rhaas.json"), "rb") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _match(names, incomplete):
    return [n for n in names if n.startswith(incomplete)]


def complete_nodes(ctx, param, incomplete):
    nodes = _tables().get("nodes", {}).values()
    return _match(sorted(d["name"] for d in nodes), incomplete)


def complete_leased(ctx, param, incomplete):
    nodes = _tables().get("nodes", {}).values()
    return _match(sorted(d["name"] for d in nodes if d.get("source") == "leased"), incomplete)


def complete_images(ctx, param, incomplete):
    images = _tables().get("images", {}).values()
    return _match(sorted(d["name"] for d in images), incomplete)


def complete_networks(ctx, param, incomplete):
    nets = _tables().get("networks", {}).values()
    return _match(sorted(d["name"] for d in nets), incomplete)


UPSTREAM_CACHE_TTL = 30.0


def complete_upstream_free(ctx, param, incomplete):
    """Upstream free nodes, from a cache refreshed at most every 30 s (and within 1 s)."""
    path = os.path.join(_home(), "cache", "upstream-free.json")
    try:
        if time.time() - os.stat(path).st_mtime < UPSTREAM_CACHE_TTL:
            with open(path, encoding="utf-8") as fh:
                return _match(json.load(fh), incomplete)
    except (OSError, ValueError):
        pass
    try:
        os.environ.setdefault("RHAAS_UPSTREAM_TIMEOUT", "1")
        from rhaas.core.instance import upstream_client
        from rhaas.store import Store

        store = Store()
        local = set(store.snapshot().node_names())
        names = [n for n in upstream_client(store).free_nodes() if n not in local]
    except Exception:  # noqa: BLE001 - completion must never print a traceback
        return []
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = path + f".{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(names, fh)
        os.replace(tmp, path)
    except OSError:
        pass
    return _match(names, incomplete)
