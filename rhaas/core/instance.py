"""This instance: root (owns hardware) or derived (leases from an upstream HaaS)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from rhaas import settings as settings_mod
from rhaas.errors import RhaasError, UsageError
from rhaas.store import Store

SECRET_KEYS = {"upstream-password"}  # kept in the 0600 store, never listed or printed


def is_derived(view) -> bool:
    return bool(view.config().get("upstream"))


def upstream_password(view) -> str | None:
    return os.environ.get("RHAAS_UPSTREAM_PASSWORD") or view.config().get("upstream-password")


def upstream_client(store: Store, warn=None):
    """The HIL client for this instance's upstream; ``warn(line)`` hears of refused upstream names."""
    from rhaas.adapters.hil import HILClient

    view = store.snapshot()
    stored = view.config()
    url, _ = settings_mod.resolve(stored, "upstream")
    if not url:
        raise UsageError("this is a root instance: it has no upstream (run 'rhaas init --upstream URL ...')")
    user, _ = settings_mod.resolve(stored, "user")
    timeout, _ = settings_mod.resolve(stored, "upstream-timeout")
    return HILClient(url, user, upstream_password(view), timeout=timeout, warn=warn,
                     max_list_bytes=settings_mod.resolve(stored, "upstream-max-list-bytes")[0],
                     max_doc_bytes=settings_mod.resolve(stored, "upstream-max-doc-bytes")[0])


def require_project(view) -> str:
    project, _ = settings_mod.resolve(view.config(), "project")
    if not project:
        raise UsageError("no upstream project configured (rhaas config set project P)")
    return project


def init_instance(store: Store, upstream: str | None, project: str | None, user: str | None, password: str | None,
                  check=True) -> str:
    """Create the inventory. For a derived instance, prove the credentials first."""
    if store.exists():
        raise UsageError(f"an instance already exists at {store.home}; use 'rhaas config set' to change it")
    if upstream:
        from rhaas.adapters.hil import HILClient

        if not project or not user:
            raise UsageError("a derived instance needs --project and --user with --upstream")
        env = os.environ.get("RHAAS_UPSTREAM_TIMEOUT") or None
        timeout = settings_mod.coerce("upstream-timeout", env, "RHAAS_UPSTREAM_TIMEOUT") if env else 15.0
        client = HILClient(upstream, user, password, timeout=timeout)
        if check:
            # lists our project's nodes: proves the URL, the credentials and the membership
            client.project_nodes(project)
    elif project or user:
        raise UsageError("--project and --user only make sense with --upstream")
    store.create()
    with store.transaction() as tx:
        if upstream:
            tx.set_config("upstream", upstream.rstrip("/"))
            tx.set_config("project", project)
            tx.set_config("user", user)
            if password is not None:
                tx.set_config("upstream-password", password)
        tx.event("init", outcome="ok", mode="derived" if upstream else "root")
    return "derived" if upstream else "root"


class NodeResult(dict):
    """Per-node outcome: {"node", "outcome" (ok|failed|skipped), "reason"}."""

    @classmethod
    def ok(cls, node, **kw):
        return cls(node=node, outcome="ok", reason=None, **kw)

    @classmethod
    def failed(cls, node, reason, **kw):
        return cls(node=node, outcome="failed", reason=str(reason), **kw)


UNKNOWN_SHOWN = 5  # an unknown-node error names at most this many, then "and N more"


def unknown_nodes_error(missing: list[str]) -> UsageError:
    """The one error for node names the inventory does not hold (nothing has been done)."""
    shown = ", ".join(missing[:UNKNOWN_SHOWN])
    if len(missing) > UNKNOWN_SHOWN:
        shown += f" and {len(missing) - UNKNOWN_SHOWN} more"
    return UsageError(f"unknown node{'s' if len(missing) > 1 else ''}: {shown} (see 'rhaas list')")


def require_nodes(view, names: Iterable[str]) -> list[dict]:
    """The node documents for ``names`` from a snapshot or transaction, or the unknown-node error."""
    names = list(names)
    docs = [view.node(n) for n in names]
    missing = [n for n, d in zip(names, docs) if d is None]
    if missing:
        raise unknown_nodes_error(missing)
    return docs


def require_node(view, name: str) -> dict:
    return require_nodes(view, [name])[0]


def open_store() -> Store:
    """This instance's inventory (RHAAS_HOME); nothing is read until asked."""
    return Store()


def check_upstream_url(url: str) -> None:
    """UsageError unless ``url`` is an upstream HaaS URL rhaas can talk to."""
    from rhaas.adapters.hil import parse_upstream_url

    parse_upstream_url(url)


def set_config(store: Store, key: str, value: str | None, unset: bool = False) -> None:
    """Store a setting, or remove it with ``unset``; the value is checked against the settings first."""
    if not unset and value is None:
        raise UsageError("config set wants KEY VALUE (or KEY --unset)")
    settings_mod.coerce(key, value)
    if key == "standby-image" and value and store.snapshot().get("images", value) is None:
        raise UsageError(f"unknown image {value!r} (see 'rhaas image list')")
    with store.transaction() as tx:
        tx.set_config(key, None if unset else value)
        tx.event("config-set", outcome="ok", key=key)


def upstream_free_names(store: Store | None = None) -> list[str]:
    """The upstream's free nodes this instance does not hold yet (for tab completion)."""
    store = store or open_store()
    local = set(store.snapshot().node_names())
    return [n for n in upstream_client(store).free_nodes() if n not in local]


__all__ = [
    "NodeResult",
    "RhaasError",
    "check_upstream_url",
    "init_instance",
    "is_derived",
    "open_store",
    "require_node",
    "require_nodes",
    "set_config",
    "unknown_nodes_error",
    "upstream_client",
    "upstream_free_names",
]
