"""The inventory document's shape, checked once where the file is loaded.

Everything rhaas reads back from ``rhaas.json`` is input: an editor, a bad restore or a bug in
another version can leave a document that parses but is not what the code relies on (nodes as
a list, a node without a name, ``nics`` a string). :func:`parse_inventory` turns the raw bytes
into a document and :func:`check_document` proves, in one pass, that every table is an object
of ``doc_id -> object`` and that every field the code reads has the type it expects. A failure
is an :class:`InventoryShapeError` naming where (``nodes/12``, the node's name) and what is
wrong; the store turns it into a one-line error. Nothing is repaired: a document that fails is
never written back.

Unknown fields and tables are allowed (a newer rhaas, or a table this module does not know,
keeps its data); known fields must have their type. The event log's fields are checked by
:func:`check_events` when the log is read (``rhaas events``), the only code that reads them:
checking its 20,000 entries on every command would cost more than the rest together.

Why hand-written: a JSON Schema validator was measured on a 10,000-node inventory at ~85 ms
(fastjsonschema, compiled) against ~15 ms here, where ``rhaas list`` must stay well under
0.5 s; pydantic and msgspec would add their import time to every command and drop unknown
fields. The fast path checks each document's tuple of field types against the tuples already
seen, so a large, uniform table costs two C-level ``map`` calls per document.
"""

from __future__ import annotations

import json
from operator import itemgetter

from rhaas.protocol import valid_name

SCHEMA_VERSION = 1  # meta/1/schema of the documents this code reads and writes

NoneType = type(None)
STR = (str,)
OPT_STR = (str, NoneType)
INT = (int,)  # type(True) is bool, so a boolean is never taken for a number here
NUM = (int, float)
OPT_NUM = (int, float, NoneType)
OPT_INT = (int, NoneType)
BOOL = (bool,)
OBJ = (dict,)
OPT_OBJ = (dict, NoneType)
ARR = (list,)
OPT_ARR = (list, NoneType)
SCALAR = (str, int, float, bool, NoneType)

# a time rhaas prints must be one time.localtime accepts: 0 .. year 9999
MAX_TIME = 253402300799


class InventoryShapeError(ValueError):
    """The document is not a rhaas inventory; ``str()`` says where and what, in one line."""


class InventorySchemaError(InventoryShapeError):
    """The document is an inventory of another schema version."""

    def __init__(self, found):
        super().__init__(f"it has schema {found!r}")
        self.found = found


class _Table:
    """The fields of one table's documents: name -> allowed types, and which must be there."""

    def __init__(self, fields: dict[str, tuple], required=(), named: str | None = "name", what: str = "entry"):
        self.fields = fields
        self.order = tuple(fields)
        self.required = frozenset(required)
        self.named = named  # the field that must be a valid, unique rhaas name
        self.what = what


# what new_node() writes; every node document is made by it, so every field is required
NODES = _Table(
    {
        "name": STR, "source": STR, "upstream_name": OPT_STR, "project": OPT_STR, "ssh": OPT_STR,
        "ssh_host_key": OPT_STR, "ipmi": OPT_OBJ, "nics": ARR, "metadata": OBJ, "obm_enabled": BOOL,
        "bootdev": OPT_STR, "image": OPT_STR, "status": STR, "boot_id": OPT_STR, "nonce": OPT_STR,
        "last_boot": OPT_NUM, "phases": OBJ, "reason": OPT_STR, "updated": NUM,
        # written by some paths only
        "upstream": OPT_OBJ, "loaded_image": OPT_STR, "tenant_ssh_keys": (str, list, NoneType),
    },
    required=("name", "source", "upstream_name", "project", "ssh", "ssh_host_key", "ipmi", "nics", "metadata",
              "obm_enabled", "bootdev", "image", "status", "boot_id", "nonce", "last_boot", "phases", "reason",
              "updated"),
    what="node",
)
NIC_FIELDS = {"label": STR, "macaddr": OPT_STR, "networks": OBJ}
IPMI_FIELDS = {"host": STR, "port": OPT_INT, "user": OPT_STR, "password": OPT_STR, "interface": OPT_STR,
               "cipher_suite": OPT_INT}
IMAGE_FILE_FIELDS = {"path": STR, "size": INT, "sha256": STR, "mtime_ns": INT}

TABLES: dict[str, _Table] = {
    "meta": _Table({"schema": INT, "writes": INT}, named=None, what="meta entry"),
    "config": _Table({"key": STR, "value": SCALAR}, required=("key", "value"), named=None, what="setting"),
    "nodes": NODES,
    "images": _Table({"name": STR, "kernel": OBJ, "initrd": OBJ, "append": OPT_STR, "added": NUM},
                     required=("name", "kernel", "initrd"), what="image"),
    "users": _Table({"name": STR, "password_hash": OPT_STR, "is_admin": BOOL, "projects": ARR, "ssh_keys": ARR},
                    required=("name", "is_admin", "projects"), what="user"),
    "projects": _Table({"name": STR}, required=("name",), what="project"),
    "networks": _Table({"name": STR, "owner": STR, "access": OPT_ARR, "net_id": STR, "channels": ARR,
                        "upstream": BOOL}, required=("name", "owner", "access", "net_id", "channels"),
                       what="network"),
    "actions": _Table({"name": STR, "node": STR, "nic": STR, "status": STR, "type": OPT_STR, "channel": OPT_STR,
                       "new_network": OPT_STR}, required=("name", "node", "nic", "status"), named=None,
                      what="action"),
}
EVENTS = _Table({"time": NUM, "action": STR, "actor": OPT_STR, "node": OPT_STR, "outcome": OPT_STR,
                 "detail": OPT_OBJ}, required=("time", "action"), named=None, what="event")

_JSON_TYPE = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", NoneType: "null"}


def _kind(value) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _want(types) -> str:
    names = []
    for t in types:
        n = _JSON_TYPE[t]
        if n not in names:
            names.append(n)
    return " or ".join(names)


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str):
    raise InventoryShapeError(f"it contains {name}, which is not a JSON number")


def parse_inventory(raw: bytes) -> dict:
    """The document in ``raw``, or InventoryShapeError if it is not JSON or not an object."""
    if not raw.strip():
        raise InventoryShapeError("it is empty")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except InventoryShapeError:
        raise
    except UnicodeDecodeError:
        raise InventoryShapeError("it is not UTF-8 text") from None
    except ValueError as exc:  # JSONDecodeError says where: "Expecting value: line 1 column 9 (char 8)"
        raise InventoryShapeError(f"it is not valid JSON: {exc}") from None
    except RecursionError:
        raise InventoryShapeError("it is not valid JSON (nested too deeply)") from None
    if type(data) is not dict:
        raise InventoryShapeError(f"its top level is {_kind(data)}, not an object of tables")
    return data


def _table_docs(data: dict, name: str) -> dict:
    if name not in data:
        return {}  # a table never written to is simply empty
    docs = data[name]
    if type(docs) is not dict:
        raise InventoryShapeError(f"table {name!r} is {_kind(docs)}, not an object of id -> entry")
    ids = "".join(docs)  # all ids and entries at C speed; the loop below only says which is wrong
    if ids.isascii() and ids.isdigit() and "" not in docs and set(map(type, docs.values())) == {dict}:
        return docs
    for key, doc in docs.items():
        if not (key.isascii() and key.isdigit()):
            raise InventoryShapeError(f"table {name!r} has the id {_short(key)}, not a number")
        if type(doc) is not dict:
            raise InventoryShapeError(f"{name}/{key} is {_kind(doc)}, not an object")
    return docs


def _where(table: str, key: str, doc: dict, spec: _Table) -> str:
    name = doc.get(spec.named) if spec.named else None
    return f"{spec.what} {name!r} ({table}/{key})" if isinstance(name, str) else f"{table}/{key}"


def _check_fields(table: str, key: str, doc: dict, spec: _Table) -> None:
    """The slow, precise check of one document, run only for type tuples not seen before."""
    missing = spec.required - doc.keys()
    if missing:
        raise InventoryShapeError(f"{_where(table, key, doc, spec)} has no {next(f for f in spec.order if f in missing)!r}")
    for field, types in spec.fields.items():
        if field in doc and type(doc[field]) not in types:
            raise InventoryShapeError(
                f"{_where(table, key, doc, spec)}: {field!r} is {_kind(doc[field])}, expected {_want(types)}"
            )


def _check_docs(table: str, docs: dict, spec: _Table) -> None:
    seen: set[tuple] = set()
    for key, doc in docs.items():
        sig = (tuple(doc), tuple(map(type, doc.values())))  # its fields and their types
        if sig not in seen:
            _check_fields(table, key, doc, spec)
            seen.add(sig)
    if spec.named:
        _check_names(table, docs, spec)


def _check_names(table: str, docs: dict, spec: _Table) -> None:
    names = list(map(itemgetter(spec.named), docs.values()))
    for key, name in zip(docs, names):
        if not valid_name(name):
            raise InventoryShapeError(f"{table}/{key}: {spec.what} name {_short(name)} is not a valid name")
    if len(set(names)) != len(names):
        first: dict[str, str] = {}
        for key, name in zip(docs, names):
            if name in first:
                raise InventoryShapeError(
                    f"{spec.what} name {name!r} appears twice ({table}/{first[name]} and {table}/{key})"
                )
            first[name] = key


def _check_sub(where, field: str, value, fields: dict[str, tuple], required=()) -> None:
    """One nested object; ``where`` is a string or a function making it (only on failure)."""
    problem = None
    if type(value) is not dict:
        problem = f"{field} is {_kind(value)}, expected an object"
    else:
        for f in required:
            if f not in value:
                problem = f"{field} has no {f!r}"
                break
        else:
            for f, types in fields.items():
                if f in value and type(value[f]) not in types:
                    problem = f"{field}.{f} is {_kind(value[f])}, expected {_want(types)}"
                    break
    if problem:
        raise InventoryShapeError(f"{where if isinstance(where, str) else where()}: {problem}")


def _check_strings(where: str, field: str, value) -> None:
    for item in value:
        if type(item) is not str:
            raise InventoryShapeError(f"{where}: {field} holds {_kind(item)}, expected strings")


def _check_time(where: str, field: str, value) -> None:
    if value is not None and not 0 <= value <= MAX_TIME:
        raise InventoryShapeError(f"{where}: {field} {_short(value)} is not a time")


_OPT_STR = frozenset(OPT_STR)


def _check_nodes(docs: dict) -> None:
    """_check_docs for nodes, with their nested fields, in one pass."""
    opt_str = _OPT_STR
    seen: set[tuple] = set()
    for key, doc in docs.items():
        sig = (tuple(doc), tuple(map(type, doc.values())))
        if sig not in seen:
            _check_fields("nodes", key, doc, NODES)
            seen.add(sig)
        nics, ipmi, keys, last_boot = doc["nics"], doc["ipmi"], doc.get("tenant_ssh_keys"), doc["last_boot"]
        for nic in nics:  # the common shape inline; anything else gets the precise check
            if not (type(nic) is dict and type(nic.get("label")) is str and type(nic.get("networks", {})) is dict
                    and type(nic.get("macaddr")) in opt_str):
                where = _where("nodes", key, doc, NODES)
                for i, one in enumerate(nics):
                    _check_sub(where, f"nics[{i}]", one, NIC_FIELDS, required=("label",))
        if ipmi is not None:
            _check_sub(lambda k=key, d=doc: _where("nodes", k, d, NODES), "ipmi", ipmi, IPMI_FIELDS,
                       required=("host",))
        if type(keys) is list:
            _check_strings(_where("nodes", key, doc, NODES), "tenant_ssh_keys", keys)
        if last_boot is not None and not 0 <= last_boot <= MAX_TIME:
            _check_time(_where("nodes", key, doc, NODES), "last_boot", last_boot)
    _check_names("nodes", docs, NODES)


def _check_small_tables(tables: dict[str, dict]) -> None:
    for table in ("images", "users", "networks"):
        spec = TABLES[table]
        for key, doc in tables[table].items():
            where = _where(table, key, doc, spec)
            if table == "images":
                for part in ("kernel", "initrd"):
                    _check_sub(where, part, doc[part], IMAGE_FILE_FIELDS, required=("path", "size", "sha256"))
            elif table == "users":
                _check_strings(where, "projects", doc["projects"])
                _check_strings(where, "ssh_keys", doc.get("ssh_keys") or [])
            else:
                _check_strings(where, "access", doc["access"] or [])
                _check_strings(where, "channels", doc["channels"])


def check_document(data: dict, schema: int, tables=()) -> None:
    """Raise InventoryShapeError unless ``data`` has the shape the code relies on.

    ``tables``: every table name the store knows; each present one must at least be an object
    of id -> object. The schema version is checked before anything else, so an inventory of
    another version is reported as such rather than as damaged.
    """
    meta = _table_docs(data, "meta")
    _check_docs("meta", meta, TABLES["meta"])
    found = (meta.get("1") or {}).get("schema")
    if found != schema:
        raise InventorySchemaError(found)
    for name in ("events", *tables):
        if name not in TABLES:
            _table_docs(data, name)  # ids and objects; the event log's fields when it is read
    docs = {name: _table_docs(data, name) for name in TABLES if name != "meta"}
    for name, table in docs.items():
        if name == "nodes":
            _check_nodes(table)
        else:
            _check_docs(name, table, TABLES[name])
    _check_small_tables(docs)


def check_events(events: dict) -> None:
    """The event log's fields (its ids and objects were checked at load)."""
    _check_docs("events", events, EVENTS)
    for key, ev in events.items():
        _check_time(_where("events", key, ev, EVENTS), "time", ev["time"])


__all__ = ["SCHEMA_VERSION", "InventorySchemaError", "InventoryShapeError", "check_document", "check_events", "parse_inventory"]
