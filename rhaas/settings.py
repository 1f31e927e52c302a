"""Settings: built-in defaults < values in the inventory (`rhaas config set`) < RHAAS_* env.

A command-line option, when a command has one, beats all three. The environment name of a
setting is ``RHAAS_`` + the key upper-cased with ``-`` as ``_`` (``parallel`` ->
``RHAAS_PARALLEL``).
"""

from __future__ import annotations

import os

from rhaas.errors import UsageError

# key -> (type, default, help)
SETTINGS: dict[str, tuple[type, object, str]] = {
    "upstream": (str, None, "URL of the upstream HaaS (HIL v0 API); unset for a root instance"),
    "project": (str, None, "project this instance leases into upstream"),
    "user": (str, None, "user name for the upstream"),
    "parallel": (int, 64, "worker pool size for fan-out (kexec, power, free)"),
    "timeout": (float, 120.0, "seconds a node may take to come back after kexec or power cycle"),
    "connect-timeout": (float, 10.0, "seconds for one SSH/HTTP connect"),
    "upstream-timeout": (float, 30.0, "seconds for one upstream API call"),
    "standby-image": (str, None, "image a freed node is returned to"),
    "ipmi-cipher-suite": (int, 3, "RMCP+ cipher suite for IPMI 2.0 BMCs"),
    "ipmi-interface": (str, "rmcpplus", "python-ipmi interface: rmcpplus (IPMI 2.0) or rmcp (1.5)"),
    "ssh-key": (str, None, "private key rhaas uses to reach nodes (default: RHAAS_HOME/id_ed25519)"),
    # images at scale: where nodes keep images, and how they pull them (README "Images at scale")
    "node-cache-dir": (str, "/run/rhaas", "directory on each node holding images by sha256 (a disk keeps them)"),
    "blob-listen": (str, "127.0.0.1", "HOST[:PORT] where kexec serves the run's image files to nodes"),
    "blob-url": (str, None, "http://HOST[:PORT] nodes use to reach blob-listen (default: the same)"),
    "blob-fanout": (int, 4, "nodes one peer serves the image to at once (the origin serves 2)"),
    "blob-peers": (str, "auto", "auto: nodes that hold the image serve it to peers if each has its own address; off"),
    "blob-fetch-timeout": (float, 60.0, "seconds a node may take to fetch the image from one source"),
}


def env_name(key: str) -> str:
    return "RHAAS_" + key.upper().replace("-", "_")


def coerce(key: str, value):
    if key not in SETTINGS:
        raise UsageError(f"unknown setting {key!r}; known: {', '.join(sorted(SETTINGS))}")
    typ = SETTINGS[key][0]
    if value is None:
        return None
    try:
        v = typ(value)
    except (TypeError, ValueError):
        raise UsageError(f"setting {key} wants a {typ.__name__}, got {value!r}") from None
    if typ in (int, float) and v <= 0:
        raise UsageError(f"setting {key} must be positive, got {value!r}")
    return v


def resolve(stored: dict, key: str):
    """The effective value of one setting and where it came from."""
    env = os.environ.get(env_name(key))
    if env not in (None, ""):
        return coerce(key, env), "env"
    if key in stored:
        return coerce(key, stored[key]), "config"
    return SETTINGS[key][1], "default"


def effective(stored: dict) -> dict:
    return {k: resolve(stored, k)[0] for k in SETTINGS}
