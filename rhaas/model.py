"""Records that cross layers: what a node, an image and a settings entry look like.

Node documents are stored as plain dicts in the inventory; these helpers give them one
shape. The JSON printed by ``rhaas list --json`` / ``show --json`` is :func:`public_node`,
whose field names are stable and documented in the README.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from rhaas.errors import UsageError
from rhaas.protocol import valid_name

# node.status values: what rhaas last knew about the node's running environment
STATUS_READY = "ready"  # running a known image, reachable
STATUS_LOADED = "loaded"  # kexec -l done, waiting for --exec
STATUS_PROVISIONING = "provisioning"
STATUS_FALLBACK = "fallback"  # kexec failed, came back through the power path
STATUS_FAILED = "failed"
STATUS_UNKNOWN = "unknown"


def new_node(name: str, source: str, **fields) -> dict:
    doc = {
        "name": name,
        "source": source,  # "registered" (root instance owns the BMC) or "leased" (from upstream)
        "upstream_name": None,
        "project": None,  # downstream project holding it through `rhaas serve`, or None
        "ssh": None,  # "user@host:port"
        "ssh_host_key": None,
        "ipmi": None,  # {"host","port","user","password","interface","cipher_suite"}
        "nics": [],  # [{"label","macaddr","networks":{channel: network}}]
        "metadata": {},  # decoded metadata values
        "obm_enabled": False,
        "bootdev": None,
        "image": None,
        "status": STATUS_UNKNOWN,
        "boot_id": None,
        "nonce": None,
        "last_boot": None,
        "phases": {},
        "reason": None,
        "updated": time.time(),
    }
    doc.update(fields)
    return doc


def public_node(doc: dict) -> dict:
    """The stable JSON form of a node. Never includes secrets."""
    ipmi = doc.get("ipmi")
    return {
        "name": doc["name"],
        "state": "assigned" if doc.get("project") else "available",
        "project": doc.get("project"),
        "source": doc.get("source"),
        "upstream_name": doc.get("upstream_name"),
        "ssh": doc.get("ssh"),
        "ssh_host_key": doc.get("ssh_host_key"),
        "bmc": None if not ipmi else f"{ipmi.get('user', '')}@{ipmi['host']}:{ipmi.get('port', 623)}",
        "nics": doc.get("nics", []),
        "metadata": doc.get("metadata", {}),
        "obm_enabled": bool(doc.get("obm_enabled")),
        "bootdev": doc.get("bootdev"),
        "image": doc.get("image"),
        "status": doc.get("status"),
        "boot_id": doc.get("boot_id"),
        "nonce": doc.get("nonce"),
        "last_boot": doc.get("last_boot"),
        "phases": doc.get("phases", {}),
        "reason": doc.get("reason"),
    }


NAME_MAX = 64  # longest name accepted anywhere (node, image, network, user, project, NIC label)


def name_ok(name) -> bool:
    """True for a string of 1 to NAME_MAX letters, digits, '.', '_' and '-' (not '.' or '..')."""
    return isinstance(name, str) and len(name) <= NAME_MAX and valid_name(name)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text) -> bool:
    """True for a blob's name: a sha256 digest as exactly 64 lower-case hex digits."""
    return isinstance(text, str) and _SHA256.fullmatch(text) is not None


def check_name(name: str, what: str = "name") -> str:
    """``name`` if :func:`name_ok`, else a one-line UsageError naming what was refused."""
    if not name_ok(name):
        shown = repr(name[:NAME_MAX]) + ("..." if len(name) > NAME_MAX else "") if isinstance(name, str) else repr(name)
        raise UsageError(f"invalid {what} {shown}: use 1 to {NAME_MAX} letters, digits, '.', '_' and '-'")
    return name


_SSH_RE = re.compile(r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?$")


@dataclass(frozen=True)
class SSHAddress:
    user: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


def parse_ssh(text: str, default_user: str = "root", default_port: int = 22) -> SSHAddress:
    """Parse ``[USER@]HOST[:PORT]`` strictly; raise UsageError on anything else."""
    m = _SSH_RE.match(text or "")
    port = int(m.group("port")) if m and m.group("port") else default_port
    if not m or not (0 < port < 65536):
        raise UsageError(f"invalid SSH address {text!r}: expected [USER@]HOST[:PORT]")
    host = m.group("host").strip("[]")
    return SSHAddress(m.group("user") or default_user, host, port)


def parse_meta_pairs(pairs, what: str) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid {what} {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def fingerprint(key_line: str) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key line."""
    import base64
    import hashlib

    blob = base64.b64decode(key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
