"""A node's chain relay (README "Images at scale"): its place in the run, and its three scripts.

The relay is plain ``busybox`` (``nc``, ``tee``, ``dd``) and POSIX ``sh``, the tools a
standby image has; every variable part is a quoted positional argument, never text pasted into
a script. :class:`~rhaas.core.kexec.commands.Commands` builds the command lines
(``arm_relay``, ``fetch_and_load(chain=...)``); :class:`~rhaas.core.kexec.sources.Chain` decides
who relays to whom. Written here rather than taken from a library because the node has no
runtime to run one: what it has is busybox.
"""

from __future__ import annotations

import re

from rhaas.core.kexec.commands import SHA256_FN, Commands, check_cache_dir


class Relay:
    """A node's place in a run's chain (:mod:`rhaas.core.kexec.sources`): ``busybox nc``
    listening on ``addr:port`` (the node's own address), its files under ``prefix`` in the
    cache (``.chain-<run>.*``: the stream, a status, the relay's PID). ``secs`` bounds the relay's
    life on the node even if rhaas goes away (it kills its own process group). ``shas``: the only
    blobs it keeps (each checked against its name before it gets it)."""

    def __init__(self, cache: str, run_id: str, token: str, addr: str, port: int, secs: float, shas: list[str]):
        if not re.fullmatch(r"[A-Za-z0-9_-]{8,64}", run_id) or not re.fullmatch(r"[A-Za-z0-9_-]{16,64}", token):
            raise ValueError("bad run id or token")
        if not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3}){3}", addr) or not 0 < port < 65536:
            raise ValueError(f"bad relay address {addr!r}:{port!r}")
        cache = check_cache_dir(cache)
        self.cache = cache
        self.prefix = f"{cache}/.chain-{run_id}"
        self.token = token
        self.addr = addr
        self.port = port
        self.secs = max(1, round(secs))
        for sha in shas:
            Commands.cache_path(sha, cache)  # checks the digest
        self.shas = list(shas)

    def args(self) -> list[str]:
        return [self.cache, self.prefix, self.token, self.addr, str(self.port), str(self.secs), *self.shas]


# The chain (pipelined broadcast, README "Images at scale"). Every node's relay is one
# `busybox nc -l -e` on its own address: the relay script runs on the connection (its stdin is
# the upstream socket; it never writes to it). The stream is three lines, then the bytes:
#   TOKEN / the hops after this one (ADDR:PORT ...) / SHA:SIZE per blob, in order
# A relay checks the token (a stray connection ends the relay: that node pulls over HTTP), passes the lines on with itself
# removed from the route, and `busybox tee`s the bytes into its stream file and the next hop's
# `busybox nc` (that socket written by `busybox dd` in 64 KB blocks). Only blobs it was
# told over SSH to want are taken. When its upstream ends, it closes its downstream at once (no
# wait for its own checks), then cuts each blob out of the stream, keeps it only if its sha256
# is its name, and writes its status (ok, or why not) to PREFIX.st.
# $1 cache, $2 prefix, $3 token, $4 addr, $5 port, $6 seconds the relay may live, then the
# digests of the blobs the node wants.
RELAY_SCRIPT = SHA256_FN + r"""
trap '' PIPE
exec >/dev/null
c=$1; p=$2; tok=$3; t=$6; shift 6; want=" $* "
say() { echo "$1" > "$p.st.tmp" && mv -f "$p.st.tmp" "$p.st"; }
(
  IFS= read -r got || { say "bad no stream"; exit 0; }
  [ "$got" = "$tok" ] || { say "bad wrong token"; exit 0; }
  IFS= read -r route; IFS= read -r blobs
  cut -d' ' -f1 /proc/uptime > "$p.t" 2>/dev/null
  set -- $route; next=${1:-}; [ $# -gt 0 ] && shift; rest="$*"
  case "$next" in *[!0-9.:]*) next=;; esac
  for b in $blobs; do
    case "${b##*:}" in ''|*[!0-9]*) say "bad stream header"; exit 0;; esac
    case "$want" in *" ${b%%:*} "*) ;; *) say "bad a blob this node does not want"; exit 0;; esac
  done
  exec 3<&0
  # tee reads the upstream socket and writes the stream file and, through busybox dd (run by
  # nc -e, its stdout the downstream socket), the next hop; without a next hop, or if it cannot
  # be reached, tee keeps the bytes here only. busybox tee moves 1 KB a call: dd gathers them
  # into 64 KB socket writes (each socket write is a trip through the network stack, and 1 KB
  # ones made the relays CPU-bound on bench/bench_netns.py)
  if [ -n "$next" ]; then
    busybox nc "${next%:*}" "${next##*:}" -e sh -c ': > "$4.out"; printf "%s\n%s\n%s\n" "$1" "$2" "$3"
      busybox tee "$4.data" <&3 2>/dev/null |
        busybox dd bs=64k iflag=fullblock 2>/dev/null' rhaas-relay-out "$tok" "$rest" "$blobs" "$p"
  fi
  [ -f "$p.out" ] || busybox tee "$p.data" <&3 >/dev/null
  exec 3<&- </dev/null
  {
    exec >/dev/null
    cut -d' ' -f1 /proc/uptime >> "$p.t" 2>/dev/null
    wait
    # each blob cut out of the stream, then its sha256 read back from the page cache (hashing
    # after the copy, not as the bytes pass: one pipe less per node, and a pipe write per KB
    # woke a reader per KB)
    off=0; have=$(busybox stat -c %s "$p.data" 2>/dev/null || echo 0)
    for b in $blobs; do
      sha=${b%%:*}; n=${b##*:}
      f="$c/.chain.$sha.$$"
      busybox dd if="$p.data" of="$f" bs=1M skip="$off" count="$n" iflag=skip_bytes,count_bytes 2>/dev/null \
        || { rm -f "$f"; say "bad cannot write the cache"; exit 0; }
      [ "$(sha256_of "$f")" = "$sha" ] || { rm -f "$f"; say "bad sha256 mismatch (a truncated or altered stream: $have bytes)"; exit 0; }
      busybox sync "$f" 2>/dev/null; mv -f "$f" "$c/$sha"
      off=$((off+n))
    done
    rm -f "$p.data"
    cut -d' ' -f1 /proc/uptime >> "$p.t" 2>/dev/null
    say ok
  }
)
kill -TERM 0
"""

# $1 the relay script, then the relay's arguments (Relay.args): start it detached, answer once
# its address and port listen (/proc/net/tcp), within 2 s. Never fails the command.
ARM_SCRIPT = r"""
relay=$1; shift
c=$1; p=$2; port=$5
command -v busybox >/dev/null 2>&1 || { echo "rhaas:noarm no busybox"; exit 0; }
mkdir -p "$c" && rm -f "$p".* || { echo "rhaas:noarm cannot write the cache"; exit 0; }
# the group's leader: a watchdog, then busybox nc listening, which runs the relay on the connection
setsid sh -c '( sleep "$7"; kill -TERM 0 ) </dev/null >/dev/null 2>&1 &
r=$1; shift; exec busybox nc -l -p "$5" "$4" -e sh -c "$r" rhaas-relay "$@"' rhaas-relay-run "$relay" "$@" \
  </dev/null >/dev/null 2>&1 &
r=$!
echo "$r" > "$p.pid"
h=$(IFS=.; set -- $4; printf '%02X%02X%02X%02X' "$4" "$3" "$2" "$1")$(printf ':%04X 00000000:0000 0A' "$port")
i=0
while [ "$i" -lt 40 ]; do
  # listening, and by our nc (not by whatever else holds that address and port)
  ino=$(grep "$h" /proc/net/tcp 2>/dev/null | { read -r _ _ _ _ _ _ _ _ _ n _; echo "$n"; })
  if [ -n "$ino" ]; then
    for f in /proc/"$r"/fd/*; do
      [ "$(busybox readlink "$f" 2>/dev/null)" = "socket:[$ino]" ] && { echo rhaas:armed; exit 0; }
    done
  fi
  kill -0 "$r" 2>/dev/null || break
  sleep 0.05; i=$((i+1))
done
kill -TERM -"$r" 2>/dev/null
rm -f "$p".*
echo "rhaas:noarm the relay does not listen"
exit 0
"""

# $1 prefix, $2 seconds to wait for the relay's status (0: none), $3 seconds without a byte
# that count as a stalled chain. Then the relay's process group is stopped (only if its PID
# still runs a command naming the prefix) and its files removed. Says rhaas:chain STATUS.
CHAIN_WAIT_SCRIPT = r"""
p=$1; t=$(( $2 * 10 )); stall=$(( $3 * 10 )); i=0; last=-1; same=0
pid=$(cat "$p.pid" 2>/dev/null)
case "$pid" in ''|*[!0-9]*) pid=;; esac
# shell built-ins only in the loops (every fork counts when a node relays and verifies)
running() { [ -n "$pid" ] && { x=; IFS= read -r x < "/proc/$pid/cmdline"; [ -n "$x" ]; } 2>/dev/null; }
while [ ! -f "$p.st" ] && [ "$i" -lt "$t" ]; do
  running || break
  if [ $((i % 5)) -eq 0 ]; then
    n=$(busybox stat -c %s "$p.data" 2>/dev/null || echo 0)  # not wc -c: busybox's reads the file
    if [ "$n" = "$last" ]; then same=$((same+5)); else same=0; last=$n; fi
    [ "$same" -ge "$stall" ] && break
  fi
  sleep 0.1; i=$((i+1))
done
# verified here: let the relay finish passing the stream on (it ends its group when done)
seen=$(cut -d' ' -f1 /proc/uptime 2>/dev/null)
i=0
while [ -f "$p.st" ] && [ "$i" -lt "$stall" ] && running; do sleep 0.1; i=$((i+1)); done
echo "rhaas:chaintimes $(cat "$p.t" 2>/dev/null) $seen $(cut -d' ' -f1 /proc/uptime 2>/dev/null)" | tr '\n' ' '
echo
if [ -f "$p.st" ]; then r=$(cat "$p.st"); elif [ "$t" -eq 0 ]; then r="bad not in a chain"; else r="bad no complete stream"; fi
[ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$p" && kill -TERM -"$pid" 2>/dev/null
rm -f "$p".*
echo "rhaas:chain $r"
exit 0
"""
