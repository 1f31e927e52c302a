"""Where the inventory lives, and the small names index beside it for tab completion.

Every TAB starts a fresh `rhaas` process, so this module imports nothing heavy (no TinyDB):
it knows the inventory's home directory and reads and writes ``cache/names.json``, a few kB
of node, image and network names. Parsing a 10,000-node inventory costs ~80 ms, too much for
every TAB; the index names the inventory file it describes (inode, mtime, size), so a reader
can tell at once whether it still matches, and rebuilds it when it does not. Only names that
pass rhaas.model.name_ok are indexed: a bad name in an old inventory is never offered by TAB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rhaas.atomic import write_atomic

DB_NAME = "rhaas.json"
INDEX_PATH = ("cache", "names.json")


def default_home() -> Path:
    """RHAAS_HOME, else $XDG_DATA_HOME/rhaas, else ~/.local/share/rhaas."""
    env = os.environ.get("RHAAS_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "rhaas"


def write_names_index(home: str | os.PathLike, data: dict) -> dict | None:
    """Write the index for inventory document ``data`` (already on disk in ``home``).

    Best effort: a failure returns None and only makes the next TAB parse the inventory itself.
    """
    from rhaas.model import name_ok

    def docs(table):
        rows = data.get(table)
        return [d for d in rows.values() if isinstance(d, dict) and name_ok(d.get("name"))] if isinstance(
            rows, dict) else []

    try:
        st = os.stat(Path(home) / DB_NAME)
        doc = {
            "key": [st.st_ino, st.st_mtime_ns, st.st_size],
            "nodes": [[d["name"], d.get("source"), d.get("project")] for d in docs("nodes")],
            "images": [d["name"] for d in docs("images")],
            "networks": [d["name"] for d in docs("networks")],
        }
        cache = Path(home) / INDEX_PATH[0]
        cache.mkdir(mode=0o700, exist_ok=True)
        write_atomic(cache / INDEX_PATH[1], json.dumps(doc, separators=(",", ":")), durable=False)
    except OSError:
        return None
    return doc


def read_names_index(home: str | os.PathLike | None = None) -> dict:
    """Node ([name, source, project]), image and network names; {} when there is no inventory."""
    home = Path(home) if home else default_home()
    try:
        st = os.stat(home / DB_NAME)
    except OSError:
        return {}
    try:
        with open(home.joinpath(*INDEX_PATH), encoding="utf-8") as fh:
            doc = json.load(fh)
        if isinstance(doc, dict) and doc.get("key") == [st.st_ino, st.st_mtime_ns, st.st_size] and _index_ok(doc):
            return doc
    except (OSError, ValueError, RecursionError):
        pass
    # the inventory's own check: a damaged inventory offers nothing and no index is written for it
    from rhaas.inventory_schema import SCHEMA_VERSION, InventoryShapeError, check_document, parse_inventory

    try:
        with open(home / DB_NAME, "rb") as fh:
            data = parse_inventory(fh.read())
        check_document(data, SCHEMA_VERSION)
    except (OSError, InventoryShapeError):
        return {}
    return write_names_index(home, data) or {}


def _index_ok(doc: dict) -> bool:
    """An index file has the shape completion reads (it is a cache anyone could have broken)."""
    nodes, images, networks = doc.get("nodes"), doc.get("images"), doc.get("networks")
    return (
        isinstance(nodes, list)
        and all(isinstance(n, list) and len(n) == 3 and isinstance(n[0], str) for n in nodes)
        and isinstance(images, list) and all(isinstance(n, str) for n in images)
        and isinstance(networks, list) and all(isinstance(n, str) for n in networks)
    )


__all__ = ["DB_NAME", "default_home", "read_names_index", "write_names_index"]
