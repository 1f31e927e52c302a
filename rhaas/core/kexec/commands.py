"""The shell commands of a kexec: every command line rhaas sends to a node, and how its answers are read.

This is kexec policy (where the cache lives, how the initrd is built on the node, how the
jump is detached), so it lives with the kexec pipeline; :mod:`rhaas.adapters.ssh` only
carries the commands. Every variable part goes through ``shlex.quote``.

The cache directory is the ``node-cache-dir`` setting (default ``/run/rhaas``); every method
that names a cached file takes it as ``cache`` (``None``: :attr:`Commands.CACHE_DIR`).

Pulling an image (:meth:`Commands.fetch_and_load`) runs :data:`FETCH_SCRIPT`, a fixed POSIX
``sh`` script whose every variable part is a quoted positional argument, never text
pasted into the script: it picks the node's HTTP client (``curl``, else ``wget``), and for
each missing blob tries the given sources in order, each under a whole-fetch deadline,
into a temporary file in the cache, checks its sha256, and only then renames it into the
cache. A source that fails or sends other bytes is reported (``rhaas:bad I why``) and the
next one is tried; nothing unverified ever gets a cache name. The chain's relay scripts live in
:mod:`rhaas.core.kexec.relay`.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING

from rhaas.model import is_sha256

if TYPE_CHECKING:
    from rhaas.adapters.ssh import Result
    from rhaas.core.kexec.relay import Relay


class Commands:
    """Every command line rhaas sends to a node. Variable parts are always shlex-quoted.

    A node's pre-kexec answer is parsed by :meth:`parse_load`: the boot id on the first line,
    then ``rhaas:cached`` once the files are there and ``rhaas:loaded`` after ``kexec -l``.
    """

    CACHE_DIR = "/run/rhaas"
    BOOT_ID = "/proc/sys/kernel/random/boot_id"
    CMDLINE = "/proc/cmdline"
    KEXEC_LOADED = "/sys/kernel/kexec_loaded"
    CACHED = "rhaas:cached"
    LOADED = "rhaas:loaded"
    STOPPED = "rhaas:stopped"
    # A synchronous `kexec -e` never returns; the jump is detached from the SSH session with all
    # three standard streams closed, so the session ends at once (lab notes §7).
    FIRE = 'setsid sh -c "sleep 0.2; kexec -e" </dev/null >/dev/null 2>&1 &'

    @classmethod
    def cache_path(cls, sha256: str, cache: str | None = None) -> str:
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return f"{check_cache_dir(cache or cls.CACHE_DIR)}/{sha256}"

    @classmethod
    def _kexec_load(cls, kernel_sha: str, initrd_sha: str, cmdline: str, cache: str | None = None) -> str:
        q = shlex.quote
        return (
            f"kexec -l {q(cls.cache_path(kernel_sha, cache))} --initrd={q(cls.cache_path(initrd_sha, cache))} "
            f"{q('--command-line=' + cmdline)}"
        )

    @classmethod
    def _tail(cls, fire: bool) -> str:
        tail = f" && echo {cls.LOADED}"
        if fire:
            # `sh -c` keeps the trailing `&` from backgrounding the whole && list
            tail += f" && sh -c {shlex.quote(cls.FIRE)}"
        return tail

    @classmethod
    def load_cached(cls, kernel_sha: str, initrd_sha: str, cmdline: str, fire: bool, cache: str | None = None) -> str:
        """Read the boot id; if both files are cached, ``kexec -l`` (and fire) in the same session."""
        q = shlex.quote
        k, i = q(cls.cache_path(kernel_sha, cache)), q(cls.cache_path(initrd_sha, cache))
        return (
            f"cat {cls.BOOT_ID} && test -f {k} && test -f {i}"
            f" && echo {cls.CACHED} && {cls._kexec_load(kernel_sha, initrd_sha, cmdline, cache)}{cls._tail(fire)}"
        )

    @classmethod
    def combine_and_load(
        cls, kernel_sha: str, base_sha: str, overlay_sha: str, initrd_sha: str, cmdline: str, fire: bool, tag: str,
        cache: str | None = None,
    ) -> str:
        """Build the node's initrd (base + overlay) in its cache, then ``kexec -l`` (and fire)."""
        return f"cat {cls.BOOT_ID} && " + cls._combine(
            kernel_sha, base_sha, overlay_sha, initrd_sha, cmdline, fire, tag, cache
        )

    @classmethod
    def _combine(cls, kernel_sha, base_sha, overlay_sha, initrd_sha, cmdline, fire, tag, cache) -> str:
        q = shlex.quote
        target = cls.cache_path(initrd_sha, cache)
        tmp = f"{target}.tmp.{_check_tag(tag)}"
        return (
            f"cat {q(cls.cache_path(base_sha, cache))} {q(cls.cache_path(overlay_sha, cache))} > {q(tmp)}"
            # on a disk cache, the bytes are on disk before the name is: a power cut (a fallback
            # after a failed kexec) never leaves a cached name over unwritten blocks
            f" && sync {q(tmp)} && mv -f {q(tmp)} {q(target)} && echo {cls.CACHED}"
            f" && {cls._kexec_load(kernel_sha, initrd_sha, cmdline, cache)}{cls._tail(fire)}"
        )

    @classmethod
    def fetch_and_load(
        cls, kernel_sha: str, base_sha: str, overlay_sha: str, initrd_sha: str, cmdline: str, fire: bool, tag: str,
        sources: list[str], deadline: float, cache: str | None = None, serve: Serve | None = None,
        chain: Relay | None = None, chain_wait: float = 0.0,
    ) -> str:
        """Pull the missing blobs from ``sources`` (base URLs, tried in order; a blob is
        ``BASE/<sha256>``) and verify them, then build the initrd and ``kexec -l`` (and fire),
        all in one command. With ``serve``, the node then serves its blobs to peers. With
        ``chain``, the node's relay is waited for first (up to ``chain_wait`` seconds; 0: not at
        all), then stopped: what it verified is in the cache, so the fetch skips it."""
        q = shlex.quote
        cache = check_cache_dir(cache or cls.CACHE_DIR)
        for url in sources:
            if not _URL.fullmatch(url):
                raise ValueError(f"not a source URL: {url!r}")
        for sha in (kernel_sha, base_sha):
            cls.cache_path(sha, cache)  # checks the digest
        args = [cache, str(max(1, round(deadline))), kernel_sha, base_sha, "--", *sources]
        fetch = f"sh -c {q(FETCH_SCRIPT)} rhaas-fetch " + " ".join(q(a) for a in args)
        if chain is not None:
            from rhaas.core.kexec.relay import CHAIN_WAIT_SCRIPT

            wait = [chain.prefix, str(max(0, round(chain_wait))), str(max(1, min(10, round(deadline))))]
            fetch = f"sh -c {q(CHAIN_WAIT_SCRIPT)} rhaas-chain-wait " + " ".join(q(a) for a in wait) + f" && {fetch}"
        cmd = (
            f"cat {cls.BOOT_ID} && {fetch} && "
            + cls._combine(kernel_sha, base_sha, overlay_sha, initrd_sha, cmdline, fire and serve is None, tag, cache)
        )
        if serve is not None:  # only a node that loaded the image serves it (and jumps later)
            args = [cache, *serve.args(), kernel_sha, base_sha]
            cmd += f" && sh -c {q(SERVE_SCRIPT)} rhaas-serve " + " ".join(q(a) for a in args)
        return cmd

    @classmethod
    def arm_relay(cls, relay: Relay) -> str:
        """Start the node's chain relay (detached) and answer once it listens: ``rhaas:armed``,
        or ``rhaas:noarm WHY`` (then nothing of it is left)."""
        from rhaas.core.kexec.relay import ARM_SCRIPT, RELAY_SCRIPT

        q = shlex.quote
        return f"sh -c {q(ARM_SCRIPT)} rhaas-relay-arm {q(RELAY_SCRIPT)} " + " ".join(q(a) for a in relay.args())

    @classmethod
    def stop_serving(cls, serve: Serve, fire: bool) -> str:
        """Stop the node's peer server for this run and remove its links; then jump if ``fire``
        (only when a kernel is loaded)."""
        q = shlex.quote
        stop = f"sh -c {q(STOP_SCRIPT)} rhaas-stop {q(serve.pidfile)} {q(serve.root)}"
        cmd = f"cat {cls.BOOT_ID}; {stop}; echo {cls.STOPPED}"
        if fire:
            cmd += f" && {cls._fire_if_loaded()}"
        return cmd

    @classmethod
    def _fire_if_loaded(cls) -> str:
        return f"grep -qx 1 {cls.KEXEC_LOADED} && echo {cls.LOADED} && sh -c {shlex.quote(cls.FIRE)}"

    @classmethod
    def fire_loaded(cls) -> str:
        """Read the boot id; jump only if a kernel is loaded (the pipelined ``--exec``)."""
        return f"cat {cls.BOOT_ID} && {cls._fire_if_loaded()}"

    @classmethod
    def read_boot(cls) -> str:
        """The boot id, then the kernel command line."""
        return f"cat {cls.BOOT_ID} {cls.CMDLINE}"

    @classmethod
    def parse_load(cls, result: Result) -> tuple[str | None, bool, bool]:
        """``(boot id, files cached, kernel loaded)`` from a load/fire command's answer."""
        lines = [ln.strip() for ln in result.lines]
        boot_id = lines[0] if lines and _looks_like_boot_id(lines[0]) else None
        return boot_id, cls.CACHED in lines, cls.LOADED in lines

    @classmethod
    def parse_boot(cls, result: Result) -> tuple[str | None, str]:
        lines = result.lines
        boot_id = lines[0].strip() if lines and _looks_like_boot_id(lines[0].strip()) else None
        cmdline = lines[1] if len(lines) > 1 else ""
        return boot_id, cmdline


class Serve:
    """Where a node serves its blobs to peers for one run: ``busybox httpd`` bound to
    ``listen`` (the node's own address), its document root ``root`` holding only a directory
    named by the run's random token, with hard links to the run's blobs (the token is the path)."""

    def __init__(self, cache: str, run_id: str, token: str, listen: str):
        if not re.fullmatch(r"[A-Za-z0-9_-]{8,64}", run_id) or not re.fullmatch(r"[A-Za-z0-9_-]{16,64}", token):
            raise ValueError("bad run id or token")
        if not re.fullmatch(r"[0-9.]+:[0-9]{1,5}", listen):
            raise ValueError(f"bad peer listen address {listen!r}")
        cache = check_cache_dir(cache)
        self.root = f"{cache}/.peer-{run_id}"
        self.pidfile = f"{cache}/.peer-{run_id}.pid"
        self.token = token
        self.listen = listen

    def args(self) -> tuple[str, str, str]:
        """Document root, token, ADDR:PORT."""
        return self.root, self.token, self.listen


def check_cache_dir(path: str) -> str:
    """The node cache directory: absolute, plain characters, no ``..``, no trailing slash."""
    if not (_CACHE.fullmatch(path) and "/../" not in path + "/" and "/./" not in path + "/"):
        raise ValueError(f"node-cache-dir must be an absolute path of letters, digits, . _ - /: {path!r}")
    return path.rstrip("/") or "/"


def parse_fetch(result: Result) -> dict:
    """What the fetch script said: ``client``, ``got`` [(sha, source index)], ``bad``
    [(source index, why)], ``serving`` (bool), ``chain`` (``ok`` or why the relay failed; None)."""
    out: dict = {"client": None, "got": [], "bad": [], "serving": False, "nosource": None, "chain": None}
    for line in result.lines:
        word, _, rest = line.strip().partition(" ")
        if word == "rhaas:client":
            out["client"] = rest.strip()
        elif word == "rhaas:got":
            parts = rest.split()
            if len(parts) == 2 and parts[1].isdigit():
                out["got"].append((parts[0], int(parts[1])))
        elif word == "rhaas:bad":
            idx, _, why = rest.partition(" ")
            if idx.isdigit():
                out["bad"].append((int(idx), why.strip()[:200]))
        elif word == "rhaas:serving":
            out["serving"] = True
        elif word == "rhaas:nosource":
            out["nosource"] = rest.strip()
        elif word == "rhaas:chain":
            out["chain"] = rest.strip()[:200]
        elif word == "rhaas:chaintimes":  # node uptimes: stream began, ended, verified; seen; relay done
            try:
                out["chain_times"] = [float(x) for x in rest.split()][:5]
            except ValueError:
                pass
    return out


_CACHE = re.compile(r"/[A-Za-z0-9._/-]*")
_URL = re.compile(r"http://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/-]*)?")

# A file's sha256 in hex, or nothing: openssl where the node has it (it uses the CPU's SHA
# instructions: 3 to 4 times as fast as coreutils' or busybox's sha256sum here, 64 MB in 0.04 s
# against 0.13 s), else sha256sum. Pasted at the head of the scripts that verify blobs.
SHA256_FN = r"""
sha256_of() {
  if command -v openssl >/dev/null 2>&1; then h=$(openssl dgst -sha256 -r "$1" 2>/dev/null)
  else h=$(sha256sum "$1" 2>/dev/null); fi
  echo "${h%% *}"
}
"""

# $1 cache dir, $2 seconds per fetch, then the blobs' digests, '--', the sources' base URLs.
# Exit 3: no HTTP client; 5: no source gave a blob; 4: local errors.
# Reports lines rhaas:client/got/bad/nosource.
FETCH_SCRIPT = SHA256_FN + r"""
c=$1; t=$2; shift 2
# a peer server a dead run left behind (its pid file is the record): stopped, links removed
for f in "$c"/.peer-*.pid; do
  [ -f "$f" ] || continue
  p=$(cat "$f"); r=${f%.pid}
  case "$p" in ''|*[!0-9]*) ;; *) tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$r" && kill "$p";; esac
  rm -rf "$r" "$f"
done
# a chain relay a dead run left behind: its process group stopped, its files removed
for f in "$c"/.chain-*.pid; do
  [ -f "$f" ] || continue
  p=$(cat "$f"); r=${f%.pid}
  case "$p" in ''|*[!0-9]*) ;; *) tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$r" && kill -TERM -"$p";; esac
  rm -f "$r".*
done
rm -f "$c"/.chain.*.*  # a blob a killed relay was cutting out of its stream
shas=
while [ $# -gt 0 ] && [ "$1" != -- ]; do shas="$shas $1"; shift; done
[ $# -gt 0 ] && shift
if command -v curl >/dev/null 2>&1; then get=curl
elif command -v wget >/dev/null 2>&1; then get=wget
else
  for s in $shas; do [ -f "$c/$s" ] || { echo rhaas:client none; exit 3; }; done
  get=cached  # nothing to fetch (a chain brought it): no client needed
fi
echo "rhaas:client $get"
lim=; command -v timeout >/dev/null 2>&1 && lim="timeout $t"
# no wget -T: Debian's busybox-static 1.35 wget crashes on it; timeout(1) bounds the fetch
mkdir -p "$c" || exit 4
for s in $shas; do
  [ -f "$c/$s" ] && continue
  ok=; i=0
  for b in "$@"; do
    i=$((i+1)); tmp="$c/.fetch.$s.$$"
    if [ "$get" = curl ]; then $lim curl -fsS --connect-timeout 5 --max-time "$t" -o "$tmp" "$b/$s" 2>/dev/null
    else $lim wget -q -O "$tmp" "$b/$s" 2>/dev/null; fi
    rc=$?
    if [ "$rc" -ne 0 ]; then echo "rhaas:bad $i fetch failed (exit $rc)"; rm -f "$tmp"; continue; fi
    if [ "$(sha256_of "$tmp")" != "$s" ]; then
      echo "rhaas:bad $i sha256 mismatch"; rm -f "$tmp"; continue
    fi
    sync "$tmp" 2>/dev/null; mv -f "$tmp" "$c/$s" || exit 4
    echo "rhaas:got $s $i"; ok=1; break
  done
  [ -n "$ok" ] || { echo "rhaas:nosource $s"; exit 5; }
done
exit 0
"""

# $1 cache dir, $2 document root, $3 token, $4 ADDR:PORT, then the blobs' digests: serve them
# to peers (read-only, only under the token's directory) with busybox httpd, detached; its PID
# goes to ROOT.pid. Says rhaas:serving once it runs; never fails the command.
SERVE_SCRIPT = r"""
c=$1; root=$2; tok=$3; listen=$4; shift 4
command -v busybox >/dev/null 2>&1 || exit 0
mkdir -p "$root/$tok" || exit 0
for s in "$@"; do ln -f "$c/$s" "$root/$tok/$s" || exit 0; done
setsid busybox httpd -f -p "$listen" -h "$root" </dev/null >/dev/null 2>&1 &
p=$!
echo "$p" > "$root.pid"
sleep 0.05
kill -0 "$p" 2>/dev/null && echo rhaas:serving
exit 0
"""


# $1 the peer server's PID file, $2 its document root: stop it (only if that PID still runs a
# command naming the root: never a reused PID), remove the links
STOP_SCRIPT = r"""
p=$(cat "$1" 2>/dev/null)
case "$p" in ''|*[!0-9]*) ;; *) tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$2" && kill "$p";; esac
rm -rf "$2" "$1"
exit 0
"""


def _check_tag(tag: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tag):
        raise ValueError(f"bad temporary-file tag {tag!r}")
    return tag


def _looks_like_boot_id(text: str) -> bool:
    return len(text) == 36 and text.count("-") == 4


def cmdline_has(cmdline: str, arg: str) -> bool:
    """Whether ``arg`` is one of the whitespace-separated words of a kernel command line."""
    return arg in cmdline.split()
