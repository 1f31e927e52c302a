"""Settings: built-in defaults < values in the inventory (`rhaas config set`) < RHAAS_* env.

A command-line option, when a command has one, beats all three. The environment name of a
setting is ``RHAAS_`` + the key upper-cased with ``-`` as ``_`` (``parallel`` ->
``RHAAS_PARALLEL``).

Every value is checked the same way wherever it comes from: when it is set, and again when it
is used (a value from the environment, or one an older rhaas stored before a check existed).
Numbers must be finite and positive; a bad value is a one-line usage error (exit 2).
"""

from __future__ import annotations

import math
import os

from rhaas.errors import UsageError

MiB = 1024 * 1024
MAX_NUMBER = 1e9  # above any sane count, size or number of seconds; keeps socket timeouts in range

# key -> (type, default, help)
SETTINGS: dict[str, tuple[type, object, str]] = {
    "upstream": (str, None, "URL of the upstream HaaS (HIL v0 API); unset for a root instance"),
    "project": (str, None, "project this instance leases into upstream"),
    "user": (str, None, "user name for the upstream"),
    "parallel": (int, 64, "worker pool size for fan-out (kexec, power, free)"),
    "timeout": (float, 120.0, "seconds a node may take to come back after kexec or power cycle"),
    "connect-timeout": (float, 10.0, "seconds for one SSH/HTTP connect"),
    "upstream-timeout": (float, 30.0, "seconds for one whole upstream API call (connect, send, read all)"),
    # 8 MiB of names is ~350,000 HIL-style node names; at worst (2-character names) it parses
    # to ~140 MB of Python objects, which keeps a command under 200 MB
    "upstream-max-list-bytes": (int, 8 * MiB, "largest upstream answer accepted for a list of names"),
    "upstream-max-doc-bytes": (int, 1 * MiB, "largest upstream answer accepted for one document (a node)"),
    "standby-image": (str, None, "image a freed node is returned to"),
    "upstream-batch": (str, "auto", "auto: lease through the upstream's rhaas.batch when offered; off: never"),
    "ipmi-cipher-suite": (int, 3, "RMCP+ cipher suite for IPMI 2.0 BMCs"),
    "ipmi-interface": (str, "rmcpplus", "python-ipmi interface: rmcpplus (IPMI 2.0) or rmcp (1.5)"),
    "ssh-key": (str, None, "private key rhaas uses to reach nodes (default: RHAAS_HOME/id_ed25519)"),
    # rhaas serve
    "serve-threads": (int, 16, "rhaas serve: worker threads that run requests"),
    "serve-connection-limit": (int, 10000, "rhaas serve: most open client connections (more wait to be accepted)"),
    "serve-idle-timeout": (int, 60, "rhaas serve: seconds a connection may stay silent (idle or mid-request)"),
    "serve-max-body": (int, 1048576, "rhaas serve: largest request body in bytes"),
    "serve-login-failures": (int, 10, "rhaas serve: failed logins per address or user before 429s begin"),
    "serve-login-window": (int, 60, "rhaas serve: seconds failed logins are remembered; longest 429 back-off"),
    # kexec fallback: a reboot window (a thousand power cycles at once are a power peak)
    "fallback-window": (int, 50, "power cycles in flight at once in a kexec fallback (all workers together)"),
    "bmc-parallel": (int, 16, "BMC (power/boot device) calls in flight at once during a kexec"),
    # images at scale: where nodes keep images, and how they pull them (README "Images at scale")
    "node-cache-dir": (str, "/run/rhaas", "directory on each node holding images by sha256 (a disk keeps them)"),
    "blob-listen": (str, "127.0.0.1", "HOST[:PORT] where kexec serves the run's image files to nodes"),
    "blob-url": (str, None, "http://HOST[:PORT] nodes use to reach blob-listen (default: the same)"),
    "blob-fanout": (int, 4, "nodes one peer serves the image to at once (the origin serves 2)"),
    "blob-peers": (str, "auto", "auto: nodes that hold the image serve it to peers if each has its own address; off"),
    "blob-fetch-timeout": (float, 60.0, "seconds a node may take to fetch the image from one source"),
    "blob-min-bytes": (int, 1 << 20, "images (kernel + initrd) smaller than this go over SFTP on the open session"),
    "blob-chain": (str, "auto", "on: nodes relay the image to each other as it arrives; auto: from 8 MB, off loopback; off"),
}


def env_name(key: str) -> str:
    return "RHAAS_" + key.upper().replace("-", "_")


def coerce(key: str, value, origin: str | None = None):
    """The checked value of one setting; UsageError (exit 2) naming the key and its origin."""
    if key not in SETTINGS:
        raise UsageError(f"unknown setting {key!r}; known: {', '.join(sorted(SETTINGS))}")
    typ = SETTINGS[key][0]
    if value is None:
        return None
    where = f" (from {origin})" if origin else ""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if typ is str:
        if not isinstance(value, str):
            raise UsageError(f"setting {key}{where} wants text, got {shown}")
        return value
    # bool is an int to Python, and a float such as 2.5 would be truncated by int(): refuse both
    if isinstance(value, bool) or (typ is int and isinstance(value, float) and not value.is_integer()):
        raise UsageError(f"setting {key}{where} wants {_kind(typ)}, got {shown}")
    try:
        v = typ(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"setting {key}{where} wants {_kind(typ)}, got {shown}") from None
    if not (0 < v <= MAX_NUMBER) or (typ is float and not math.isfinite(v)):
        raise UsageError(f"setting {key}{where} must be a positive, finite number up to {MAX_NUMBER:g}, got {shown}")
    return v


def _kind(typ: type) -> str:
    return "a whole number" if typ is int else "a number"


def resolve(stored: dict, key: str):
    """The effective value of one setting and where it came from."""
    env = os.environ.get(env_name(key))
    if env not in (None, ""):
        return coerce(key, env, env_name(key)), "env"
    if key in stored:
        return coerce(key, stored[key], "the inventory"), "config"
    return SETTINGS[key][1], "default"


def effective(stored: dict) -> dict:
    return {k: resolve(stored, k)[0] for k in SETTINGS}
