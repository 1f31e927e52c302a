"""What an upstream HIL answer must look like before rhaas uses or stores any of it.

An upstream is input like any other: the shapes here are those of shared/hil-api.md §4 (a list
of names is a JSON array of strings; the node object has ``name`` str, ``project`` str or null,
``nics`` a list of objects with ``label``/``macaddr`` strings and ``networks`` str -> str, and
``metadata`` str -> str, each value JSON-encoded). A wrong type refuses the whole answer with
:class:`UpstreamMisbehaved` (exit 3, like an unreachable upstream: the call gave nothing usable).
Names rhaas stores (nodes, networks, NIC labels) must match the pattern rhaas uses for every name
(``rhaas.protocol.valid_name``), be at most :data:`MAX_NAME_LEN` characters and not start with
``-`` (a command line would read it as an option, or ``-`` as stdin). In a list of
names a bad name is dropped and reported through the caller's ``refused`` callback, so one
hostile entry does not hide the good ones; inside a node document a bad name refuses the document.

Only the fields rhaas uses are passed on: whatever else an upstream adds is never stored.
"""

from __future__ import annotations

from collections.abc import Callable

from rhaas.errors import UpstreamUnreachable
from rhaas.protocol import valid_name

MAX_NAME_LEN = 64
MAX_TEXT_LEN = 256  # MAC addresses, channels, metadata labels, power states, action states


class UpstreamMisbehaved(UpstreamUnreachable):
    """The upstream answered, but not what HIL's API promises (wrong type, bad name, too large)."""


def shown(value, limit: int = 40) -> str:
    """A value as safe one-line text for a message: repr (control characters escaped), cut short."""
    text = repr(value)
    if len(text) > limit:
        size = f"{len(value)} chars" if isinstance(value, str) else type(value).__name__
        text = text[:limit] + f"... ({size})"
    return text


def kind(value) -> str:
    return {dict: "a JSON object", list: "a JSON array", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def name_problem(name) -> str | None:
    """Why NAME cannot be a name rhaas stores, or None if it can."""
    if not isinstance(name, str):
        return f"not a string but {kind(name)}"
    if len(name) > MAX_NAME_LEN:
        return f"longer than {MAX_NAME_LEN} characters"
    if not valid_name(name):
        return "only letters, digits, '.', '_' and '-' are allowed"
    if name.startswith("-"):
        return "a leading '-' reads as an option ('-' alone as stdin) on every command line"
    return None


class Checker:
    """Checks the answers to one call; WHAT names the call in messages (never a token URL)."""

    def __init__(self, upstream: str, what: str, refused: Callable[[str], None]):
        self.upstream = upstream
        self.what = what
        self.refused = refused

    def fail(self, why: str) -> UpstreamMisbehaved:
        return UpstreamMisbehaved(f"upstream {self.upstream} misbehaved: {self.what} answered {why}")

    def obj(self, doc, what: str) -> dict:
        if not isinstance(doc, dict):
            raise self.fail(f"{kind(doc)} where HIL sends {what}")
        return doc

    def text(self, value, what: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > MAX_TEXT_LEN or not value.isprintable():
            raise self.fail(f"{shown(value)} as {what}")
        return value

    def name(self, value, what: str) -> str:
        problem = name_problem(value)
        if problem:
            raise self.fail(f"{shown(value)} as {what} ({problem})")
        return value

    # -- the answers ---------------------------------------------------------------------------
    def names(self, doc, what: str) -> list[str]:
        """A list of names; bad names are left out and reported, a wrong type refuses it all."""
        if not isinstance(doc, list):
            raise self.fail(f"{kind(doc)} where HIL sends a list of {what} names")
        out = []
        for item in doc:
            if not isinstance(item, str):
                raise self.fail(f"{kind(item)} in a list of {what} names")
            problem = name_problem(item)
            if problem:
                self.refused(f"refused {what} name {shown(item)} from upstream {self.upstream}: {problem}")
            else:
                out.append(item)
        return out

    def node(self, doc, asked: str) -> dict:
        """The node object, reduced to its documented fields; metadata values still encoded."""
        doc = self.obj(doc, "a node object")
        name = self.name(doc.get("name"), "the node name")
        if name != asked:
            raise self.fail(f"node {shown(name)} when asked for {shown(asked)}")
        # a project is named by the upstream's operator, not by rhaas: text, not a stored name
        project = self.text(doc.get("project"), "the node's project", optional=True)
        nics = doc.get("nics", [])
        if not isinstance(nics, list):
            raise self.fail(f"{kind(nics)} where HIL sends the node's list of NICs")
        clean_nics = []
        for nic in nics:
            nic = self.obj(nic, "a NIC object")
            networks = self.obj(nic.get("networks", {}), "a NIC's networks (channel -> network)")
            clean_nics.append({
                "label": self.name(nic.get("label"), "a NIC label"),
                "macaddr": self.text(nic.get("macaddr"), "a MAC address", optional=True),
                "networks": {self.text(ch, "a channel"): self.name(net, "a network name")
                             for ch, net in networks.items()},
            })
        meta = doc.get("metadata", {})
        meta = self.obj({} if meta is None else meta, "the node's metadata (label -> JSON text)")
        for label, value in meta.items():
            self.text(label, "a metadata label")
            if not isinstance(value, str):
                raise self.fail(f"{kind(value)} as the value of metadata {shown(label)} (HIL sends JSON text)")
        return {"name": name, "project": project, "nics": clean_nics, "metadata": dict(meta)}

    def power_status(self, doc) -> str | None:
        if doc is None:
            return None
        return self.text(self.obj(doc, "a power status object").get("power_status"), "the power status",
                         optional=True)

    def status_id(self, doc) -> str:
        return self.name(self.obj(doc, "a networking action id object").get("status_id"), "a status_id")

    def action(self, doc) -> dict:
        doc = self.obj(doc, "a networking action object")
        return {"status": self.text(doc.get("status"), "an action status")}

    def network(self, doc) -> dict:
        doc = self.obj({} if doc is None else doc, "a network object")
        channels = doc.get("channels", [])
        if not isinstance(channels, list):
            raise self.fail(f"{kind(channels)} where HIL sends the network's list of channels")
        return {"channels": [self.text(c, "a channel") for c in channels]}
