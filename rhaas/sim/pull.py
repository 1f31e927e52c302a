"""Real tools for a simulated node's image pulls: the host's ``/bin/sh``, curl/wget and busybox.

rhaas's node-side scripts (``sh -c SCRIPT rhaas-NAME ARGS...``, e.g. the image fetch of
:mod:`rhaas.core.kexec.commands`) need a real shell: loops, variables, ``$(...)``. The farm's
interpreter (:mod:`rhaas.sim.shell`) hands exactly that form to :func:`run_script`, which runs
the host's ``/bin/sh`` with:

* every argument that is an absolute path mapped into the node's root (``/run/rhaas/x`` ->
  ``DIR/nodes/<name>/run/rhaas/x``); the script text itself is rhaas's and names no path;
* ``cwd`` the node's root and ``PATH`` a per-farm tool directory of symlinks to the host's
  tools (``curl``, ``wget``, ``busybox``, ``sha256sum``, ``openssl``, coreutils), or, for a node with the
  ``no_http_client`` fault, the same without curl and wget;
* a ``setsid`` shim that records the PID of every detached helper (the peer's ``busybox
  httpd``, bound to the node's own 127.x address) in ``DIR/nodes/<name>.pids``, so that
  :func:`kill_helpers` ends them when the node jumps (a real kexec ends every process) or
  when the farm stops.

Faults for peers (``DIR/faults.json``): ``peer_bad_bytes`` (the node serves other bytes
under its blobs' names, its own cache intact) and ``peer_dies`` (its httpd is replaced by a
listener that sends the headers and half of the body, then drops the connection), and for
the chain (``busybox nc`` relays, :data:`~rhaas.core.kexec.relay.RELAY_SCRIPT`)
``relay_dies`` (its relay passes half of the stream on, then drops it: a node dying mid-chain).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rhaas.sim.node import SimNode

TOOLS = ("sh", "cat", "cut", "wc", "tr", "grep", "mv", "rm", "mkdir", "ln", "sleep", "kill", "timeout",
         "sha256sum", "openssl", "busybox", "curl", "wget")
HTTP_CLIENTS = ("curl", "wget")
SCRIPT_NAME = re.compile(r"rhaas-[a-z-]+")


def tool_dir(farm_dir: Path, with_http: bool) -> Path:
    """The PATH of a node's scripts: symlinks to host tools (made once per farm)."""
    d = farm_dir / "tools-3" / ("http" if with_http else "nohttp")  # -3: openssl added
    if d.exists():
        return d
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name in TOOLS:
        if name in HTTP_CLIENTS and not with_http:
            continue
        real = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
        if real:
            (tmp / name).symlink_to(real)
    real_setsid = shutil.which("setsid", path="/usr/bin:/bin") or "setsid"
    shim = tmp / "setsid"
    shim.write_text(f'#!/bin/sh\necho $$ >> "$RHAAS_SIM_PIDS"\nexec {real_setsid} "$@"\n')
    shim.chmod(0o755)
    os.replace(tmp, d)
    return d


def wants_real_shell(args: list[str]) -> bool:
    """``sh -c SCRIPT rhaas-NAME ...``: one of rhaas's named node scripts."""
    return len(args) >= 3 and args[0] == "-c" and bool(SCRIPT_NAME.fullmatch(args[2]))


async def run_script(node: SimNode, args: list[str], fds) -> int:
    """Run ``sh -c SCRIPT NAME ARGS...`` in the host's /bin/sh, confined as the module says."""
    from rhaas.sim.syntax import ShellError

    script, name, rest = args[1], args[2], args[3:]
    mapped = []
    for a in rest:
        if a.startswith("/"):
            try:
                a = str(node.real_path(a, for_write=True))
            except ShellError as exc:
                fds[2].write(f"{exc}\n".encode())
                return 2
        mapped.append(a)
    with_http = not node.farm.fault(node.name, "no_http_client")
    env = {
        "PATH": str(tool_dir(node.farm.dir, with_http)),
        "RHAAS_SIM_PIDS": str(pids_file(node)),
        "LC_ALL": "C",
    }
    # Output goes to files, not pipes: a detached helper (httpd) must not hold the ends of the
    # farm's pipes (uvloop's stdio socketpairs leak into grandchildren), or nobody sees EOF.
    with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", script, name, *mapped, cwd=node.root, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=fout, stderr=ferr, close_fds=True,
        )
        await proc.wait()
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    root = str(node.root)
    # the node's own paths, as the node sees them
    out = out.replace(root.encode(), b"")
    fds[1].write(out)
    fds[2].write(err.replace(root.encode(), b""))
    if b"rhaas:serving" in out:
        await _peer_faults(node, mapped)
    if b"rhaas:armed" in out and node.farm.fault(node.name, "relay_dies"):
        await _relay_dies(node, mapped)
    return proc.returncode if proc.returncode is not None else 1


def pids_file(node: SimNode) -> Path:
    return node.root.parent / f"{node.name}.pids"


def kill_helpers(node: SimNode) -> None:
    """End the helper processes the node's scripts detached (by the PIDs they recorded)."""
    path = pids_file(node)
    try:
        pids = {int(p) for p in path.read_text().split() if p.isdigit()}
    except OSError:
        return
    for pid in pids:
        if _ours(pid, node):
            try:  # a detached helper leads its own process group (setsid): the group goes (a relay's nc, tee)
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGTERM)
                else:
                    os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    path.unlink(missing_ok=True)
    for server in node.__dict__.pop("fake_peers", []):
        server.close()


def _ours(pid: int, node: SimNode) -> bool:
    """Only a process that still runs with this node's root in its arguments (not a reused PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(node.root).encode() in cmdline


async def _peer_faults(node: SimNode, mapped: list[str]) -> None:
    """Bend what a serving node serves (``peer_bad_bytes``, ``peer_dies``)."""
    bad, dies = node.farm.fault(node.name, "peer_bad_bytes"), node.farm.fault(node.name, "peer_dies")
    if not (bad or dies):
        return
    root, token, listen = mapped[1], mapped[2], mapped[3]  # SERVE_SCRIPT's cache, root, token, listen
    served = Path(root) / token
    if bad:
        for f in served.iterdir():
            tmp = f.with_name(f.name + ".bad")
            tmp.write_bytes(b"not the blob you asked for\n" * 64)
            os.replace(tmp, f)  # a new inode: the node's own cache keeps its right bytes
    if dies:
        kill_helpers(node)
        host, _, port = listen.rpartition(":")
        server = await asyncio.start_server(
            lambda r, w: _half_and_drop(r, w, served), host, int(port), reuse_address=True
        )
        node.__dict__.setdefault("fake_peers", []).append(server)


async def _relay_dies(node: SimNode, mapped: list[str]) -> None:
    """``relay_dies``: the node's chain relay is replaced by one that passes the stream's header
    and half of its bytes on to the next hop, then drops both connections (a node dying
    mid-chain). It writes nothing to the node's cache or status."""
    addr, port = mapped[4], int(mapped[5])  # ARM_SCRIPT's relay script, then Relay.args()
    kill_helpers(node)
    for _ in range(100):  # the killed relay's listener goes away soon
        try:
            server = await asyncio.start_server(_relay_half, addr, port, reuse_address=True)
            break
        except OSError:
            await asyncio.sleep(0.02)
    else:
        return
    node.__dict__.setdefault("fake_peers", []).append(server)


async def _relay_half(reader, writer) -> None:
    down = None
    try:
        lines = [await asyncio.wait_for(reader.readline(), 10) for _ in range(3)]
        hops = lines[1].split()
        size = sum(int(b.rsplit(b":", 1)[1]) for b in lines[2].split())
        if hops:
            host, _, port = hops[0].decode().rpartition(":")
            _, down = await asyncio.open_connection(host, int(port))
            down.write(lines[0] + b" ".join(hops[1:]) + b"\n" + lines[2])
        left = size // 2
        while left > 0:
            chunk = await asyncio.wait_for(reader.read(min(left, 65536)), 10)
            if not chunk:
                break
            left -= len(chunk)
            if down is not None:
                down.write(chunk)
                await down.drain()
    except (TimeoutError, OSError, ValueError, IndexError):
        pass
    finally:
        writer.transport.abort()
        if down is not None:
            down.close()


async def _half_and_drop(reader, writer, served: Path) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        parts = line.decode("latin-1").split()
        name = parts[1].rsplit("/", 1)[-1] if len(parts) > 1 else ""
        f = served / name
        data = f.read_bytes() if re.fullmatch(r"[0-9a-f]{64}", name) and f.is_file() else b""
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data[: len(data) // 2])
        await writer.drain()
    except (TimeoutError, OSError, ValueError):
        pass
    finally:
        writer.transport.abort()
