"""A farm of simulated nodes: one asyncssh process answering SSH for N nodes on loopback.

Run it as::

    python -m rhaas.sim.farm --nodes 1000 --dir DIR [--port 2222] [--down-time 0.5]

Node ``i`` (0-based) is ``sim-0001``... and listens on ``127.0.{1+i//250}.{1+i%250}:PORT``
(the base address is ``--base``). Each node has its own ed25519 host key, kept in
``DIR/hostkeys.json`` so a restarted farm keeps its identities, and ``DIR/farm.json`` lists
``name``, ``ssh`` (``root@ADDR:PORT``), ``host_key`` (one OpenSSH line) and ``root`` per
node. Logins are as ``root`` with a key listed in ``--authorized-keys`` (re-read when the
file changes). SFTP is chrooted to ``DIR/nodes/<name>/``, so ``/run/rhaas/...`` lands there.

Commands are parsed by :mod:`rhaas.sim.syntax` and run by :mod:`rhaas.sim.shell`, which
knows only the commands rhaas sends; rhaas's named node scripts (the image fetch) run in the
host's ``/bin/sh`` with real curl/wget/busybox, confined as :mod:`rhaas.sim.pull` says.  The SSH side (asyncssh
servers, SFTP, ports) is :mod:`rhaas.sim.sshserver`; a node's state is :mod:`rhaas.sim.node`;
starting a farm from another process and reading its state files is :mod:`rhaas.sim.control`.
This module is the farm itself: nodes, faults, keys, state files, and the process entry point.

Per node, in memory: the boot id, ``/proc/cmdline``, what ``kexec -l`` loaded. ``kexec -e``
drops the node's connections without a clean close, keeps its port closed for
``--down-time`` seconds, then brings the node back with a new boot id and the loaded
command line. ``DIR/state/<name>.json`` mirrors that state for tests, written on request
(SIGUSR1; see :func:`read_state`) and when the farm stops.

Faults, per node, from ``DIR/faults.json`` (re-read when it changes)::

    {"sim-0003": ["load_fails"], "sim-0004": {"slow": 2.5}, "sim-0005": {"power_file": "/x/power"}}

``load_fails`` (kexec -l exits 1), ``never_returns`` (connections freeze, port stays closed),
``old_boot_id`` (comes back with the old boot id and command line), ``slow`` (extra
seconds down), ``refuse_ssh`` (connections are dropped before the SSH banner), and
``power_file``: a file holding ``0``/``1`` (e.g. an ``ipmi_sim`` BMC's power state) that the
node follows: ``0`` powers it off, ``1`` boots it afresh (network boot, no rhaas nonce).
``dies_slowly`` (seconds, e.g. ``{"dies_slowly": 1.0}``): after ``kexec -e`` the old kernel
takes that long to go away, as a real dying one does: it still accepts connections, but
cuts every session it is asked for: a channel closed without exit status, half an answer
then a close, a reset connection, or a login cut short (in turn). ``load_fails_first`` (a
count N): the node's first N ``kexec -l`` fail, later ones work.
Image pulls (:mod:`rhaas.sim.pull`): ``no_http_client`` (no curl or wget on the node),
``peer_bad_bytes`` (it serves other bytes to peers), ``peer_dies`` (its server drops peers
mid-transfer).

The farm prints ``READY <n> nodes`` on stdout once every node listens, and writes its PID to
``DIR/farm.pid``. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import os
import signal
import sys
from pathlib import Path

import asyncssh

from rhaas.sim.control import FAULTS, FLUSHED, FarmProcess, flush_states, launch, read_state, write_json
from rhaas.sim.node import SimNode
from rhaas.sim.shell import Channel, NodeGone, Shell, ShellExit
from rhaas.sim.sshserver import coalesce_writes, listen, server_options, skip_idle_work

# FarmProcess, launch, read_state and flush_states live in rhaas.sim.control; they are named
# here too because tests and the bench import them from rhaas.sim.farm
__all__ = ["FAULTS", "Farm", "FarmProcess", "flush_states", "launch", "main", "node_address", "read_state"]


def node_address(base: str, i: int) -> str:
    return str(ipaddress.IPv4Address(base) + (1 + i // 250) * 256 + (1 + i % 250))


def _file_signature(path: Path):
    """A file's identity (inode, mtime, size), or None when it is missing.

    Looked up on every command and login (one stat, about a microsecond): a test that changes
    faults.json and runs rhaas at once must find the new faults on the very next command.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class Farm:
    def __init__(self, directory: Path, count: int, port: int, down_time: float, base: str,
                 authorized_keys: Path, prefix: str = "sim-", log_commands: bool = False, algs: dict | None = None):
        self.dir = directory
        self.state_dir = str(directory / "state")
        self.count = count
        self.port = port
        self.down_time = down_time
        self.base = base
        self.authorized_path = authorized_keys
        self.prefix = prefix
        self.log_commands = log_commands
        self.algs = algs or {}  # asyncssh kex_algs / encryption_algs / mac_algs overrides
        self.nodes: list[SimNode] = []
        self.tasks: set[asyncio.Task] = set()
        self._faults: dict = {}
        self._faults_sig = None
        self._auth: set[bytes] = set()
        self._auth_sig = None
        self._cmd_log = None
        self._dirty: set[SimNode] = set()
        self._flushes = 0

    # -- files the tests and rhaas read --------------------------------------------------------------
    def _host_keys(self) -> dict[str, str]:
        path = self.dir / "hostkeys.json"
        try:
            keys = json.loads(path.read_text())
        except FileNotFoundError:
            keys = {}
        changed = False
        for i in range(self.count):
            name = self.node_name(i)
            if name not in keys:
                keys[name] = asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()
                changed = True
        if changed:
            write_json(path, keys, mode=0o600)
        return keys

    def node_name(self, i: int) -> str:
        return f"{self.prefix}{i + 1:04d}"

    def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "state").mkdir(exist_ok=True)
        keys = self._host_keys()
        for i in range(self.count):
            name = self.node_name(i)
            node = SimNode(self, i, name, node_address(self.base, i), asyncssh.import_private_key(keys[name]))
            node.root.mkdir(parents=True, exist_ok=True)
            node.options = server_options(node, self.handle, self.algs)
            self.nodes.append(node)
        if self.log_commands:
            self._cmd_log = open(self.dir / "commands.log", "a", buffering=1)  # noqa: SIM115 - lives with the farm

    def write_inventory(self) -> None:
        doc = {
            "pid": os.getpid(),
            "port": self.port,
            "down_time": self.down_time,
            "nodes": [
                {"name": n.name, "ssh": n.ssh, "host_key": n.host_key_line, "root": str(n.root)} for n in self.nodes
            ],
        }
        write_json(self.dir / "farm.json", doc)
        self._dirty.update(self.nodes)
        self.flush_states()

    def save_state(self, node: SimNode) -> None:
        """Mark the node's state file stale; it is written when someone asks (flush_states)."""
        self._dirty.add(node)

    def flush_states(self) -> None:
        """Write the state files of nodes that changed, then bump ``state/.flushed``.

        Writing a file per state change cost the farm about a quarter of its CPU at a
        thousand nodes, on the cores the client it serves needs, so the files are written on
        request (:func:`read_state` sends SIGUSR1 and waits for the counter to move) and when
        the farm stops.
        """
        dirty, self._dirty = self._dirty, set()
        for node in dirty:
            write_json(f"{self.state_dir}/{node.name}.json", node.state())
        self._flushes += 1
        write_json(f"{self.state_dir}/{FLUSHED}", self._flushes)

    # -- faults and keys, re-read when their files change ----------------------------------------------
    def fault(self, name: str, what: str):
        path = self.dir / "faults.json"
        sig = _file_signature(path)
        if sig != self._faults_sig:
            self._faults_sig = sig
            self._faults = {}
            if sig is not None:
                try:
                    raw = json.loads(path.read_text() or "{}")
                except ValueError:
                    raw = {}
                for node, spec in raw.items():
                    self._faults[node] = {k: True for k in spec} if isinstance(spec, list) else dict(spec)
            self._watch_power()
        return self._faults.get(name, {}).get(what)

    def authorized(self) -> set[bytes]:
        sig = _file_signature(self.authorized_path)
        if sig != self._auth_sig:
            self._auth_sig = sig
            keys: set[bytes] = set()
            if sig is not None:
                for line in self.authorized_path.read_text().splitlines():
                    line = line.strip()
                    if line and not line.startswith("#"):
                        try:
                            keys.add(asyncssh.import_public_key(line).public_data)
                        except (asyncssh.KeyImportError, ValueError):
                            pass
            self._auth = keys
        return self._auth

    def _watch_power(self) -> None:
        watched = {n: f["power_file"] for n, f in self._faults.items() if f.get("power_file")}
        self._power_watch = watched

    async def power_loop(self) -> None:
        """Nodes with a ``power_file`` follow it: 0 powers off, 1 boots afresh.

        A node that vanished (``never_returns``) boots afresh once that fault is lifted, as
        if someone had pressed its power button.
        """
        by_name = {n.name: n for n in self.nodes}
        while True:
            await asyncio.sleep(0.1)
            self.fault("", "")  # re-read faults.json if it changed
            for node in [n for n in self.nodes if n.stuck]:
                if not self.fault(node.name, "never_returns"):
                    node.stuck = False
                    for conn in node.frozen:
                        conn.abort()
                    node.frozen.clear()
                    self.spawn(node.power_on())
            for name, path in getattr(self, "_power_watch", {}).items():
                node = by_name.get(name)
                if node is None:
                    continue
                try:
                    on = Path(path).read_text().strip() == "1"
                except OSError:
                    continue
                if not on and node.powered:
                    await node.power_off()
                elif on and not node.powered:
                    node.powered = True
                    self.spawn(node.power_on())

    # -- serving -------------------------------------------------------------------------------------
    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def listen(self, node: SimNode) -> None:
        await listen(node, self.port)

    async def handle(self, node: SimNode, process) -> None:
        command = process.command
        if self._cmd_log is not None:
            self._cmd_log.write(f"{node.name}\t{command!r}\n")
        if node.dying:  # dies_slowly: the old kernel cuts the session before it answers
            node.cut(process)
            return
        if command is None:
            process.stderr.write(b"this simulated node has no interactive shell\n")
            process.exit(1)
            return
        shell = Shell(self, node, Channel(process.stdout), Channel(process.stderr))
        try:
            status = await shell.run(command)
            if shell.holders:
                await asyncio.gather(*shell.holders, return_exceptions=True)
        except ShellExit as exc:
            status = exc.status
        except NodeGone:
            return  # the kernel is gone: no exit status, the connection just drops
        try:
            process.exit(status)
        except Exception:  # noqa: BLE001, S110 - the connection was dropped meanwhile
            pass

    async def serve(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self.flush_states)
        await asyncio.gather(*(self.listen(n) for n in self.nodes))
        for n in self.nodes:
            n.up = True
        self.write_inventory()
        (self.dir / "farm.pid").write_text(f"{os.getpid()}\n")
        self.spawn(self.power_loop())
        print(f"READY {len(self.nodes)} nodes port {self.port}", flush=True)
        await stop.wait()
        self.flush_states()
        from rhaas.sim.pull import kill_helpers

        for n in self.nodes:
            kill_helpers(n)
            if n.acceptor is not None:
                n.acceptor.close()
            for c in list(n.conns):
                c.abort()
        try:
            (self.dir / "farm.pid").unlink()
        except FileNotFoundError:
            pass



def run_loop(main, uvloop_ok: bool = True):
    """Run the farm on uvloop when it is installed (the ``test`` extra): the farm shares the
    machine's cores with the client it serves, and uvloop's loop costs the farm some 15 % less
    CPU per SSH connection than asyncio's. Nothing a client sees changes."""
    if uvloop_ok:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rhaas.sim.farm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--port", type=int, default=2222)
    ap.add_argument("--down-time", type=float, default=0.5)
    ap.add_argument("--base", default="127.0.0.0", help="base address; node i gets base+(1+i//250).(1+i%%250)")
    ap.add_argument("--authorized-keys", type=Path, help="public keys allowed to log in (default DIR/authorized_keys)")
    ap.add_argument("--prefix", default="sim-")
    ap.add_argument("--log-commands", action="store_true", help="append every command to DIR/commands.log")
    ap.add_argument("--kex", default="curve25519-sha256,curve25519-sha256@libssh.org",
                    help="comma-separated key exchange algorithms to offer (default: curve25519, as the "
                    "lab's dropbear nodes; '' for asyncssh's full list)")
    ap.add_argument("--ciphers", help="comma-separated ciphers to offer (default: asyncssh's)")
    ap.add_argument("--macs", help="comma-separated MACs to offer (default: asyncssh's)")
    ap.add_argument("--no-coalesce", action="store_true",
                    help="write each SSH packet as it is made, and keep asyncssh's per-login config reload")
    ap.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop even if uvloop is installed")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not 0 < args.nodes <= 250 * 254:
        ap.error("--nodes must be between 1 and 63500")
    base = ipaddress.IPv4Address(args.base)
    if base not in ipaddress.IPv4Network("127.0.0.0/8") or not ipaddress.IPv4Address(
        node_address(args.base, args.nodes - 1)
    ) in ipaddress.IPv4Network("127.0.0.0/8"):
        ap.error("--base must leave every node address inside 127.0.0.0/8")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncssh.set_log_level(logging.INFO if args.verbose else logging.CRITICAL)
    farm = Farm(
        args.dir.resolve(), args.nodes, args.port, args.down_time, args.base,
        (args.authorized_keys or args.dir / "authorized_keys").resolve(), args.prefix, args.log_commands,
        {k: v.split(",") for k, v in (("kex_algs", args.kex), ("encryption_algs", args.ciphers),
                                       ("mac_algs", args.macs)) if v},
    )
    if not args.no_coalesce:
        coalesce_writes()
        skip_idle_work()
    farm.setup()
    # the node objects built above live as long as the farm: keep the collector off them, and
    # let it collect asyncssh's per-connection cycles in larger batches (less farm CPU)
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        run_loop(farm.serve(), uvloop_ok=not args.no_uvloop)
    except OSError as exc:
        print(f"farm: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
