"""The inventory: one TinyDB file under ``RHAAS_HOME`` shared by every rhaas process.

TinyDB alone is neither process-safe nor crash-safe, so this module adds what it lacks:

* every read-modify-write runs inside :meth:`Store.transaction`, under an exclusive
  ``flock`` on a lock file beside the database (the kernel drops it if the process dies);
* a transaction reads the file once, lets TinyDB work on that document in memory, and writes
  at most once when it ends, with :func:`rhaas.atomic.write_atomic`. A crash leaves either the
  old or the new file, never a mix;
* the file and its directory are private (0600 / 0700): the store holds BMC credentials and
  password hashes. A load refuses a store or directory another user owns or can open
  (rhaas.inventory_files), and a document whose structure is not what the code relies on
  (rhaas.inventory_schema): one line naming the file and the problem, nothing written;
* read-only snapshots are cached by inode. The cache keeps the file it read open, so that
  inode cannot be recycled; any write replaces the file with a new inode and the next
  snapshot re-reads it. A long-running ``serve`` therefore never answers from a stale copy.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Document, Table

from rhaas import inventory_files, inventory_schema
from rhaas.atomic import write_atomic
from rhaas.errors import StoreError
from rhaas.names_index import DB_NAME, default_home, write_names_index

SCHEMA_VERSION = inventory_schema.SCHEMA_VERSION
LOCK_NAME = "rhaas.lock"
EVENTS_KEPT = 20000  # older events move to events.archive.jsonl, nothing is dropped
TABLES = ("meta", "config", "nodes", "images", "users", "projects", "networks", "actions", "events", "journal")
# journal: intents of leases and frees in flight (rhaas.core.journal), resolved after a kill

Table.default_query_cache_capacity = 0


class _MemoryStorage(Storage):
    """TinyDB storage over a dict the transaction owns; the file is written at commit."""

    def __init__(self, data: dict, on_write):
        self._data = data
        self._on_write = on_write

    def read(self):
        return self._data

    def write(self, data):
        self._data = data
        self._on_write(data)

    def close(self):
        pass


class _View:
    """Shared read API over one loaded document ({table: {doc_id: doc}})."""

    source = "(in memory)"  # the file it was read from, for error messages

    def __init__(self, data: dict):
        self.data = data
        for t in TABLES:
            data.setdefault(t, {})
        self._node_index: dict[str, str] | None = None
        self._events_checked = False

    # -- nodes --------------------------------------------------------------------------
    def _index(self) -> dict[str, str]:
        if self._node_index is None:
            self._node_index = {d["name"]: k for k, d in self.data["nodes"].items()}
        return self._node_index

    def node(self, name: str) -> dict | None:
        key = self._index().get(name)
        return self.data["nodes"][key] if key is not None else None

    def nodes(self) -> list[dict]:
        return sorted(self.data["nodes"].values(), key=lambda d: d["name"])

    def node_names(self) -> list[str]:
        return sorted(self._index())

    # -- keyed tables (images, users, projects, networks, actions, config) ---------------
    def _by_key(self, table: str, key: str = "name") -> dict[str, dict]:
        return {d[key]: d for d in self.data[table].values()}

    def get(self, table: str, name: str, key: str = "name") -> dict | None:
        for d in self.data[table].values():
            if d.get(key) == name:
                return d
        return None

    def all(self, table: str) -> list[dict]:
        return sorted(self.data[table].values(), key=lambda d: str(d.get("name", "")))

    def config(self) -> dict:
        return {d["key"]: d["value"] for d in self.data["config"].values()}

    def events(self) -> list[dict]:
        if not self._events_checked:  # the log's fields are checked when it is read (inventory_schema)
            try:
                inventory_schema.check_events(self.data["events"])
            except inventory_schema.InventoryShapeError as exc:
                raise StoreError(f"inventory {self.source} is damaged in its event log: {exc}; "
                                 f"{inventory_files.RECOVER}") from None
            self._events_checked = True
        return [self.data["events"][k] for k in sorted(self.data["events"], key=int)]

    @property
    def writes(self) -> int:
        meta = self.data["meta"].get("1") or {}
        return int(meta.get("writes", 0))


class Snapshot(_View):
    """A read-only view. Do not mutate what it returns."""


class Transaction(_View):
    """A read-modify-write unit: TinyDB tables over the loaded document, written once."""

    def __init__(self, data: dict, actor: str):
        super().__init__(data)
        self.actor = actor
        self.dirty = False
        self._events: list[dict] = []
        self.db = TinyDB(storage=_MemoryStorage, data=self.data, on_write=self._mark)

    def _mark(self, data):
        self.data = data
        self.dirty = True

    def table(self, name: str) -> Table:
        return self.db.table(name, cache_size=0)

    # -- nodes --------------------------------------------------------------------------
    def put_nodes(self, docs: Iterable[dict]) -> None:
        """Insert or replace node documents by name, in one pass over the table."""
        docs = list(docs)
        if not docs:
            return
        index = self._index()
        new_by_name = {d["name"]: d for d in docs}
        update_ids = [int(index[n]) for n in new_by_name if n in index]
        fresh = [d for n, d in new_by_name.items() if n not in index]
        tbl = self.table("nodes")

        def replace(doc):
            new = new_by_name[doc["name"]]
            doc.clear()
            doc.update(new)

        if update_ids:
            tbl.update(replace, doc_ids=update_ids)
        if fresh:
            tbl.insert_multiple(fresh)
        self._node_index = None

    def put_node(self, doc: dict) -> None:
        self.put_nodes([doc])

    def remove_nodes(self, names: Iterable[str]) -> None:
        index = self._index()
        ids = [int(index[n]) for n in names if n in index]
        if ids:
            self.table("nodes").remove(doc_ids=ids)
        self._node_index = None

    # -- keyed tables ---------------------------------------------------------------------
    def put(self, table: str, doc: dict, key: str = "name") -> None:
        tbl = self.table(table)
        for doc_id, d in self.data[table].items():
            if d.get(key) == doc[key]:
                tbl.update(lambda x: (x.clear(), x.update(doc)), doc_ids=[int(doc_id)])
                return
        tbl.insert(doc)

    def remove(self, table: str, name: str, key: str = "name") -> bool:
        ids = [int(k) for k, d in self.data[table].items() if d.get(key) == name]
        if ids:
            self.table(table).remove(doc_ids=ids)
        return bool(ids)

    def set_config(self, key: str, value) -> None:
        if value is None:
            self.remove("config", key, key="key")
        else:
            self.put("config", {"key": key, "value": value}, key="key")

    # -- events ---------------------------------------------------------------------------
    def event(self, action: str, node: str | None = None, outcome: str = "ok", **detail) -> None:
        ev = {"time": time.time(), "actor": self.actor, "action": action, "node": node, "outcome": outcome}
        if detail:
            ev["detail"] = detail
        self._events.append(ev)

    def _flush_events(self, archive: Path) -> None:
        if not self._events:
            return
        tbl = self.table("events")
        tbl.insert_multiple(self._events)
        self._events = []
        events = self.data["events"]
        if len(events) > EVENTS_KEPT:
            keys = sorted(events, key=int)
            old = keys[: len(keys) - EVENTS_KEPT]
            with open(archive, "a", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.writelines(json.dumps(events[k]) + "\n" for k in old)
                fh.flush()
                os.fsync(fh.fileno())
            tbl.remove(doc_ids=[int(k) for k in old])


_cache_lock = threading.Lock()
_write_lock = threading.Lock()


class Store:
    def __init__(self, home: Path | str | None = None):
        self.home = Path(home) if home else default_home()
        self.path = self.home / DB_NAME
        self.lock_path = self.home / LOCK_NAME
        self._cached: tuple[int, object, Snapshot] | None = None  # (inode, open file, snapshot)

    # -- lifecycle -------------------------------------------------------------------------
    def exists(self) -> bool:
        try:
            return self.path.exists()
        except OSError as exc:  # EACCES on a home we may not enter
            raise inventory_files.os_problem(exc, self.path, "look for the inventory") from None

    def create(self) -> None:
        """Make the home (0700) and an empty database (0600) if there is none."""
        try:
            if self.home.exists() and not self.home.is_dir():
                raise StoreError(f"RHAAS_HOME {self.home} is not a directory; point RHAAS_HOME at a directory")
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.stat(self.home)
            if st.st_uid == os.geteuid():
                os.chmod(self.home, 0o700)
        except OSError as exc:
            raise StoreError(f"cannot create state directory {self.home}: {exc.strerror}") from None
        inventory_files.check_private(self.home, os.stat(self.home), "inventory directory", 0o700)
        with self._locked():
            if not self.path.exists():
                data = {t: {} for t in TABLES}
                data["meta"] = {"1": {"schema": SCHEMA_VERSION, "writes": 0}}
                self._write_file(data)

    # -- reading -----------------------------------------------------------------------------
    def _load(self, use_cache: bool):
        fh, st = inventory_files.open_inventory(self.home, self.path)  # the snapshot cache keeps fh open
        ino = st.st_ino
        if use_cache:
            with _cache_lock:
                if self._cached and self._cached[0] == ino:
                    fh.close()
                    return self._cached[2]  # the Snapshot, with its node index already built
        try:
            data = self._parse(inventory_files.read_all(fh, self.path))
        except BaseException:
            fh.close()
            raise
        if use_cache:
            snap = Snapshot(data)
            snap.source = str(self.path)
            with _cache_lock:
                old = self._cached
                self._cached = (ino, fh, snap)
                if old:
                    old[1].close()
            return snap
        fh.close()
        return data

    def _parse(self, raw: bytes) -> dict:
        """The document in ``raw`` once its structure is proven (rhaas.inventory_schema)."""
        try:
            data = inventory_schema.parse_inventory(raw)
            inventory_schema.check_document(data, SCHEMA_VERSION, TABLES)
        except inventory_schema.InventorySchemaError as exc:
            if isinstance(exc.found, int) and exc.found > SCHEMA_VERSION:
                raise StoreError(f"inventory {self.path} has schema {exc.found}, this rhaas reads "
                                 f"{SCHEMA_VERSION}: use the newer rhaas that wrote it") from None
            raise StoreError(f"inventory {self.path} is damaged or not a rhaas inventory: its schema version "
                             f"is {exc.found!r}, not {SCHEMA_VERSION}; {inventory_files.RECOVER}") from None
        except inventory_schema.InventoryShapeError as exc:
            raise StoreError(f"inventory {self.path} is damaged: {exc}; {inventory_files.RECOVER}") from None
        return data

    def snapshot(self) -> Snapshot:
        """A consistent read-only view, re-read whenever another process wrote."""
        return self._load(use_cache=True)

    # -- writing -----------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with _write_lock:
            fd = inventory_files.open_lock(self.lock_path)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as exc:
                    raise inventory_files.os_problem(exc, self.lock_path, "lock") from None
                yield
            finally:
                os.close(fd)

    @contextmanager
    def transaction(self, actor: str | None = None) -> Iterator[Transaction]:
        """Lock, read fresh, let the caller change things, write once if anything changed."""
        actor = actor or os.environ.get("RHAAS_ACTOR") or _default_actor()
        with self._locked():
            txn = Transaction(self._load(use_cache=False), actor)
            yield txn
            if txn._events:
                archive = self.home / "events.archive.jsonl"
                try:
                    txn._flush_events(archive)
                except OSError as exc:
                    raise inventory_files.os_problem(exc, archive, "append old events to") from None
            if txn.dirty:
                meta = txn.data["meta"].setdefault("1", {"schema": SCHEMA_VERSION})
                meta["writes"] = int(meta.get("writes", 0)) + 1
                self._write_file(txn.data)

    def _write_file(self, data: dict) -> None:
        try:
            write_atomic(self.path, json.dumps(data, separators=(",", ":")).encode("utf-8"), mode=0o600)
        except OSError as exc:
            raise inventory_files.os_problem(exc, self.path, "write") from None
        write_names_index(self.home, data)


def _default_actor() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


__all__ = ["Document", "Snapshot", "Store", "Transaction", "default_home", "write_names_index"]
