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
    """Node, image and network names, from the index the store writes beside itself.

    Parsing a 10,000-node inventory costs ~80 ms, too much for every TAB; the index
    (cache/names.json) is a few kB and names the inventory file it describes (inode, mtime,
    size). When it does not match, the inventory is read and the index rewritten.
    """
    home = _home()
    try:
        st = os.stat(os.path.join(home, "rhaas.json"))
    except OSError:
        return {}
    try:
        with open(os.path.join(home, "cache", "names.json"), encoding="utf-8") as fh:
            doc = json.load(fh)
        if doc.get("key") == [st.st_ino, st.st_mtime_ns, st.st_size]:
            return doc
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(home, "rhaas.json"), "rb") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    from rhaas.store import write_names_index

    return write_names_index(home, data) or {}


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
