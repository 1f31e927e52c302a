"""The local operator's users and projects of `rhaas serve`.

Each change goes through the same Service calls the HIL API answers, as an administrator
named ``local-admin``, so the CLI and the API cannot disagree on the rules; the API's errors
come out as one-line usage errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from rhaas.errors import UsageError
from rhaas.model import check_name


def _admin(store):
    from rhaas import settings
    from rhaas.core.service import Caller, Service

    return Service(store, settings.effective(store.snapshot().config())), Caller("local-admin", True, [])


def _api(fn, *args, **kwargs):
    """Run a service call as the local operator; HIL errors become one-line usage errors."""
    from rhaas.errors import APIError

    try:
        return fn(*args, **kwargs)
    except APIError as exc:
        raise UsageError(exc.msg) from None


def read_ssh_key(path: str) -> str:
    """The one OpenSSH public key line a --ssh-key file holds."""
    with open(path, encoding="utf-8") as fh:
        line = fh.read().strip()
    if not line.startswith(("ssh-", "ecdsa-")) or "\n" in line:
        raise UsageError(f"{path} does not hold one OpenSSH public key line")
    return line


def add_user(store, name: str, password: Callable[[], str], admin: bool = False,
             projects: Iterable[str] = (), ssh_key: str | None = None) -> None:
    """Add a user, member of ``projects``, with the SSH key in file ``ssh_key``.

    ``password`` is asked for only after the name, projects and key have been checked.
    """
    projects = list(projects)
    check_name(name, "user name")
    view = store.snapshot()
    for p in projects:
        if view.get("projects", p) is None:
            raise UsageError(f"unknown project {p!r}; add it with 'rhaas project add {p}'")
    key_line = read_ssh_key(ssh_key) if ssh_key else None
    secret = password()
    if not secret:
        raise UsageError("empty password")
    service, caller = _admin(store)
    _api(service.user_create, caller, name, secret, admin)
    for p in projects:
        _api(service.user_add_project, caller, name, p)
    if key_line:
        with store.transaction() as tx:
            doc = tx.get("users", name)
            tx.put("users", dict(doc, ssh_keys=[key_line]))


def remove_user(store, name: str) -> None:
    service, caller = _admin(store)
    _api(service.user_delete, caller, name)


def list_users(store) -> dict:
    """{user: {"is_admin", "projects"}}, as the API's list_users answers."""
    service, caller = _admin(store)
    return service.list_users(caller, store.snapshot())


def add_project(store, name: str) -> None:
    check_name(name, "project name")
    service, caller = _admin(store)
    _api(service.project_create, caller, name)


def remove_project(store, name: str) -> None:
    service, caller = _admin(store)
    _api(service.project_delete, caller, name)


def list_projects(store) -> list[str]:
    return [p["name"] for p in store.snapshot().all("projects")]


__all__ = ["add_project", "add_user", "list_projects", "list_users", "read_ssh_key", "remove_project", "remove_user"]
