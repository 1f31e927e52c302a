"""Network names per level: what a derived instance calls a network upstream, and back.

A derived instance's networks all live in its one upstream project, so the names its tenants
choose cannot be passed up as they are: two tenants who both create ``net1`` would collide
upstream, and the second would learn that the first's exists. So each network a derived
instance makes upstream gets a name unique to the instance and to the owner:

* ``rh-<tag>-<project>-<net>`` for a tenant's network (``<tag>``: 8 hex digits of this
  instance's id, made once and kept in its config as ``instance-id``);
* ``rh-<tag>--<net>`` (an empty project: the reserved scope) for an admin-owned network, which
  includes the instance's own networks made with ``rhaas network create`` at a derived instance;
* ``rh-<tag>.<32 hex>`` (a SHA-256 of the owner and the name) when the readable form would be
  longer than MAX_UPSTREAM_LEN, or when the project name holds a ``-`` (it would make the
  readable form ambiguous). The ``.`` after the tag tells the two forms apart, so the mapping
  is one-to-one: distinct (owner, name) pairs never share an upstream name.

The 2015 recursive-HaaS prototype named base networks ``rhaas-<uuid>``; these names are
deterministic instead (the same instance, owner and name give the same upstream name, so a
create whose answer was lost is found again by name) and say whose they are to an upstream
operator, with the mapping kept in the inventory either way.

Every upstream name matches ``[A-Za-z0-9._-]+`` (HIL's client and rhaas accept it), so a real
HIL upstream sees nothing but a network name it could have been given by hand.

The inventory of a derived instance keys a network by that upstream name (its ``name``) and
keeps the tenant's own name in ``local``, its owner project in ``owner``. NIC maps and
networking actions hold the key, so every upstream call already carries the upstream name; the
serving side (rhaas.core.service) shows ``local`` to tenants wherever a network name appears.
A root instance's networks have no ``local``: there the name is the local name, and names are
one namespace as in HIL.

Which network a name means, at a derived instance (:func:`resolve`): among the networks the
asking project may see (its own, public ones, ones shared with it), one whose local name
matches; its own comes before an admin-owned one, which comes before one shared from another
project. A network the caller may not see is reported as missing, never as forbidden, so a
tenant learns nothing of another tenant's names. An admin sees every network, and may also
name one by its upstream name (the only way to tell two tenants' ``net1`` apart).
"""

from __future__ import annotations

import hashlib
import json
import uuid

PREFIX = "rh-"
MAX_UPSTREAM_LEN = 64  # HIL stores labels unbounded; this keeps names readable and three levels deep
ADMIN = "admin"  # HIL's owner for an admin-owned network
ID_KEY = "instance-id"


def instance_tag(tx) -> str:
    """8 hex digits of this instance's id, made (inside the caller's transaction) when first needed."""
    ident = tx.config().get(ID_KEY)
    if not (isinstance(ident, str) and len(ident) >= 8 and all(c in "0123456789abcdef" for c in ident)):
        ident = uuid.uuid4().hex
        tx.set_config(ID_KEY, ident)
    return ident[:8]


def upstream_name(tag: str, owner: str | None, local: str) -> str:
    """The upstream name of ``local`` owned by project ``owner`` (None or "admin": admin-owned)."""
    project = None if owner in (None, ADMIN) else owner
    head = f"{PREFIX}{tag}-"
    readable = head + (f"-{local}" if project is None else f"{project}-{local}")
    if len(readable) <= MAX_UPSTREAM_LEN and (project is None or (project and "-" not in project)):
        return readable
    digest = hashlib.sha256(json.dumps([project, local]).encode()).hexdigest()[:32]
    return f"{PREFIX}{tag}.{digest}"


def local_name(net: dict) -> str:
    """The name this instance's callers know a network by."""
    return net.get("local") or net["name"]


def local_names(view) -> dict[str, str]:
    """Inventory key -> local name, for every network that has a local name of its own."""
    return {n["name"]: n["local"] for n in view.all("networks") if n.get("local")}


def shown_networks(networks: dict | None, names: dict[str, str]) -> dict[str, str]:
    """A NIC's channel -> network map with the local names."""
    return {ch: names.get(net, net) for ch, net in (networks or {}).items()}


def visible_to(net: dict, projects) -> bool:
    """Whether a member of any of ``projects`` may see ``net``."""
    access = net.get("access")
    return access is None or net["owner"] in projects or bool(set(projects) & set(access))


def _rank(net: dict, projects) -> int:
    if net["owner"] in projects:
        return 0
    return 1 if net["owner"] == ADMIN else 2


class Ambiguous(Exception):
    """Several networks the caller may see share the name."""


def resolve(networks: list[dict], name: str, projects, is_admin: bool) -> dict | None:
    """The network ``name`` means for a caller in ``projects`` (an admin sees all); None if none.

    Raises Ambiguous when the caller may see several that rank alike (only a member of several
    projects, or an admin, can meet that: they may see every candidate anyway).
    """
    live = [n for n in networks if not n.get("pending")]
    cands = [n for n in live if local_name(n) == name and (is_admin or visible_to(n, projects))]
    if not cands:
        exact = [n for n in live if n["name"] == name and n.get("local")] if is_admin else []
        return exact[0] if exact else None
    best = min(_rank(n, projects) for n in cands)
    top = [n for n in cands if _rank(n, projects) == best]
    if len(top) > 1:
        raise Ambiguous(sorted(n["name"] for n in top))
    return top[0]


def taken(networks: list[dict], name: str, owner: str) -> bool:
    """Whether creating ``name`` for ``owner`` would clash with a network of this instance.

    An admin-owned name must be unique among all local names (an admin sees them all); a
    project's name only among the networks that project may see, so nothing about another
    tenant's names can be learnt from a refusal.
    """
    for n in networks:
        if local_name(n) != name:
            continue
        if owner == ADMIN or visible_to(n, [owner]):
            return True
    return False
