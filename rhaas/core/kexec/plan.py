"""What a kexec run is made of, and what it would do: options, results, per-node jobs, the plan.

A run is given :class:`KexecOptions` (built from the settings by
:meth:`KexecOptions.from_settings`, the one place their defaults live) and gives one
:class:`KexecResult` per node. Each node to contact becomes a :class:`Job`: its endpoint, its
nonce (``rhaas.nonce=`` on the new kernel's command line proves the boot) and its overlay
(the authorized keys and host key appended to the image's initrd). :func:`plan` is the
``--dry-run``: the same look-ups, contacting nothing.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from rhaas import model
from rhaas.core.images import Image, check_append
from rhaas.core.overlay import DEFAULT_HOST_KEY_TARGET, build_overlay
from rhaas.errors import RhaasError, UsageError
from rhaas.settings import SETTINGS

OUTCOMES = ("ok", "fallback", "failed", "loaded")
MODES = ("full", "load", "exec")


@dataclass
class KexecOptions:
    mode: str = "full"  # full | load (stage+load only) | exec (fire what --load-only loaded)
    timeout: float = 120.0  # from the jump (or power cycle) until the node must have verified
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    parallel: int = 64
    fallback: bool = True
    first_poll: float = 0.5  # the jump happens 0.2 s after the command returns
    poll_connect_timeout: float = 1.0  # banner wait of a post-jump poll at first (grows with the wait)
    poll_tcp_timeout: float = 0.3  # TCP connect of a post-jump poll at first (grows with the wait)
    poll_interval: float = 0.25  # while the node refuses connections (cheap)
    busy_poll_max: float = 2.0  # back-off cap while the old kernel still answers (a handshake each)
    poll_lag: float = 2.0  # a due poll may wait this long behind nodes that have not started
    processes: int | None = None  # None: decided by the number of nodes and CPUs
    retries: int = 0  # kexec attempts again after a failure, before the fallback
    fallback_window: int = 50  # power cycles in flight at once, over the whole run
    bmc_parallel: int = 16  # BMC calls in flight at once, over the whole run
    # images at scale (settings node-cache-dir, blob-*): see rhaas.core.kexec.sources
    cache_dir: str = "/run/rhaas"
    blob_listen: str = "127.0.0.1"
    blob_url: str | None = None
    blob_fanout: int = 4
    blob_peers: str = "auto"  # auto | off
    blob_fetch_timeout: float = 60.0
    blob_min_bytes: int = 1 << 20  # smaller images: one SFTP write on the open session beats a pull

    @classmethod
    def from_settings(
        cls,
        settings: dict,
        mode: str = "full",
        timeout: float | None = None,
        connect_timeout: float | None = None,
        parallel: int | None = None,
        fallback: bool = True,
        retries: int = 0,
    ) -> KexecOptions:
        """Options from the ``timeout``, ``connect-timeout``, ``parallel``, ``fallback-window``
        and ``bmc-parallel`` settings (their built-in defaults where unset), each overridden by
        a given value (a command-line option). A remote command may take
        ``max(30 s, 3 x connect timeout)``."""

        def pick(given, key: str, typ: type):
            return typ(given or settings.get(key) or SETTINGS[key][1])

        connect = pick(connect_timeout, "connect-timeout", float)
        from rhaas.core.kexec.commands import check_cache_dir

        try:
            cache_dir = check_cache_dir(pick(None, "node-cache-dir", str))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        blob_url = settings.get("blob-url") or None
        if blob_url and not re.fullmatch(r"http://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?", blob_url):
            raise UsageError(f"blob-url wants http://HOST[:PORT] (nodes fetch over plain HTTP), got {blob_url!r}")
        peers = pick(None, "blob-peers", str)
        if peers not in ("auto", "off"):
            raise UsageError(f"blob-peers is auto or off, not {peers!r}")
        return cls(
            cache_dir=cache_dir,
            blob_listen=pick(None, "blob-listen", str),
            blob_url=blob_url,
            blob_fanout=pick(None, "blob-fanout", int),
            blob_peers=peers,
            blob_fetch_timeout=pick(None, "blob-fetch-timeout", float),
            blob_min_bytes=pick(None, "blob-min-bytes", int),
            mode=mode,
            timeout=pick(timeout, "timeout", float),
            connect_timeout=connect,
            command_timeout=max(30.0, 3 * connect),
            parallel=pick(parallel, "parallel", int),
            fallback=fallback,
            retries=max(0, int(retries or 0)),
            fallback_window=pick(None, "fallback-window", int),
            bmc_parallel=pick(None, "bmc-parallel", int),
        )


@dataclass
class KexecResult:
    node: str
    outcome: str  # ok | fallback | failed | loaded
    image: str | None
    nonce: str | None
    boot_id: str | None
    reason: str | None = None
    phases: dict = field(default_factory=dict)
    fired: bool = False  # the node was asked to jump (or power cycled): its old state is gone
    uploaded: int = 0  # bytes sent to the node
    finished: float = 0.0
    polls: dict = field(default_factory=dict)  # after the jump: {"down": n, "old": n} attempts
    keep_status: bool = False  # refused before anything was asked of the node: only an event
    attempts: int = 1  # kexec attempts (1 + the retries used)
    failed_at: float | None = None  # wall time the kexec was judged failed (its console is cut there)
    console_tail: list[str] = field(default_factory=list)  # the node's last console lines, on failure
    # how the image reached the node: path cache|origin|peer|sftp, bytes, source, dropped sources
    transfer: dict = field(default_factory=dict)

    def public(self) -> dict:
        """The stable JSON form (``rhaas kexec --json``); ``console_tail`` only on a failed node
        whose console had something to say."""
        doc = {
            "node": self.node,
            "outcome": self.outcome,
            "image": self.image,
            "nonce": self.nonce,
            "boot_id": self.boot_id,
            "reason": self.reason,
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
            "transfer": dict(self.transfer) if self.transfer else None,
        }
        if self.console_tail:
            doc["console_tail"] = list(self.console_tail)
        return doc


@dataclass
class Job:
    """What a worker needs for one node; plain data, inherited by forked workers."""

    doc: dict
    endpoint: object  # rhaas.adapters.ssh.Endpoint
    nonce: str
    cmdline: str | None = None
    overlay: bytes | None = None
    overlay_sha: str | None = None
    initrd_sha: str | None = None  # of the node's initrd: image initrd + overlay
    image: str | None = None
    skip_kexec: bool = False  # node metadata rhaas.kexec is false: the power path only
    index: int = 0  # the node's place in the run (rhaas.core.kexec.sources)


@dataclass
class Context:
    opts: KexecOptions
    image: Image | None
    pkey: object
    settings: dict
    store: object
    # shared by every thread and worker process of the run (set by the scheduler):
    cycle_slots: object = None  # a semaphore of fallback_window power cycles in flight
    bmc_slots: object = None  # a semaphore of bmc_parallel BMC calls in flight
    pull: object = None  # rhaas.core.kexec.sources.Pull when the image can be pulled over HTTP
    after_fork: object = None  # called once the worker processes exist (starts the origin's threads)


def kexec_disabled(doc: dict) -> bool:
    """Node metadata ``rhaas.kexec`` is false (hil-api.md section 7): the bool false, or the
    string ``no``/``false`` (any case; also JSON-quoted, as HIL double-encodes values)."""
    value = (doc.get("metadata") or {}).get("rhaas.kexec")
    if value is False:
        return True
    if isinstance(value, str):
        return value.strip().strip('"').strip().lower() in ("no", "false")
    return False


def power_only_refusal(opts: KexecOptions) -> str | None:
    """Why a ``rhaas.kexec=no`` node cannot take part in a run with ``opts``, or None."""
    if opts.mode == "full" and opts.fallback:
        return None
    why = "--no-fallback" if opts.mode == "full" else "--load-only" if opts.mode == "load" else "--exec"
    return f"node metadata rhaas.kexec=no: it boots through its power path only, not with {why}"


def new_nonce() -> str:
    return secrets.token_hex(8)


def kernel_cmdline(append: str, nonce: str) -> str:
    append = check_append(append).strip()
    return f"{append} rhaas.nonce={nonce}" if append else f"rhaas.nonce={nonce}"


def adhoc_image_name(image: Image) -> str:
    h = hashlib.sha256(f"{image.kernel.sha256}:{image.initrd.sha256}:{image.append}".encode()).hexdigest()
    return f"adhoc-{h[:12]}"


def authorized_keys_for(doc: dict, client_public: str) -> list[str]:
    """rhaas's own key, then the tenant's keys (``tenant_ssh_keys``: a line or a list)."""
    tenant = doc.get("tenant_ssh_keys") or []
    if isinstance(tenant, str):
        tenant = tenant.splitlines()
    return [client_public] + [k.strip() for k in tenant if k and k.strip()]


def node_overlay(doc: dict, client_public: str) -> bytes:
    host_key = None
    path = doc.get("host_key_file")
    if path:
        try:
            with open(path, "rb") as fh:
                host_key = fh.read()
        except OSError as exc:
            raise RhaasError(f"node {doc['name']}: cannot read host_key_file {path}: {exc.strerror}") from None
    target = doc.get("host_key_target") or DEFAULT_HOST_KEY_TARGET
    return build_overlay(authorized_keys_for(doc, client_public), host_key, target)


# -- planning (shared by the real run and --dry-run) -------------------------------------------------
def lookup_nodes(snapshot, names: Iterable[str]) -> list[dict]:
    names = list(names)
    if not names:
        raise UsageError("no nodes given")
    for n in names:
        model.check_name(n, "node name")
    from rhaas.core.instance import require_nodes

    return [dict(d) for d in require_nodes(snapshot, names)]


def plan(snapshot, names: Iterable[str], image: Image | None, opts: KexecOptions, image_name: str | None) -> list[dict]:
    """What a kexec would do per node, contacting nothing and changing nothing."""
    out = []
    for doc in lookup_nodes(snapshot, names):
        step = {
            "node": doc["name"],
            "ssh": doc.get("ssh"),
            "mode": opts.mode,
            "image": image_name if image else doc.get("loaded_image"),
            "reason": None,
        }
        if image is not None:
            step.update(
                kernel=image.kernel.path,
                initrd=image.initrd.path,
                cmdline=kernel_cmdline(image.append, "<nonce>"),
                cache=f"{opts.cache_dir}/{image.kernel.sha256}",
            )
        power_only = kexec_disabled(doc)
        if power_only:
            step["power_only"] = True  # PXE and a power cycle, no kexec
        if not doc.get("ssh"):
            step["reason"] = "no SSH address"
        elif power_only:
            step["reason"] = power_only_refusal(opts)
        elif opts.mode == "exec" and not (doc.get("status") == model.STATUS_LOADED and doc.get("nonce")):
            step["reason"] = f"not loaded (status {doc.get('status')}); run 'rhaas kexec --load-only' first"
        out.append(step)
    return out
