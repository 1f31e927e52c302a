"""Driving a farm from another process: start it, read its nodes' state, set its faults.

:func:`launch` starts ``python -m rhaas.sim.farm`` on a random port and 127.X.0.0/16 block
and returns a :class:`FarmProcess` (tests, the bench; ``rhaas lab up --sim`` starts its own).
The farm writes ``DIR/state/<node>.json`` only when asked: :func:`flush_states` signals it
(SIGUSR1) and waits for ``state/.flushed`` to move, :func:`read_state` then reads one node.
Faults go to ``DIR/faults.json`` (:meth:`FarmProcess.set_faults`, see :mod:`rhaas.sim.farm`).
Nothing here imports asyncssh.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

FLUSHED = ".flushed"  # in DIR/state: how many times the state files were brought up to date
FAULTS = ("load_fails", "never_returns", "old_boot_id", "slow", "refuse_ssh", "power_file", "dies_slowly",
          "load_fails_first", "no_http_client", "peer_bad_bytes", "peer_dies")


class FarmProcess:
    """A running farm started by :func:`launch`; stop it with :meth:`stop` (by its PID)."""

    def __init__(self, directory: Path, proc, nodes: list[dict], port: int, base: str):
        self.dir = directory
        self.proc = proc
        self.nodes = nodes  # farm.json entries: name, ssh, host_key, root
        self.port = port
        self.base = base

    @property
    def names(self) -> list[str]:
        return [n["name"] for n in self.nodes]

    def node(self, name: str) -> dict:
        return next(n for n in self.nodes if n["name"] == name)

    def state(self, name: str) -> dict:
        """What the node reports: up, boot_id, cmdline, loaded, boots (as of this call)."""
        return read_state(self.dir, name, self._live_pid())

    def set_faults(self, faults: dict) -> None:
        write_json(self.dir / "faults.json", faults)

    def commands(self) -> list[tuple[str, str]]:
        """(node, command) for every command run so far (with ``log_commands``), oldest first."""
        import ast

        path = self.dir / "commands.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            node, _, cmd = line.partition("\t")
            out.append((node, ast.literal_eval(cmd)))
        return out

    def _live_pid(self) -> int | None:
        """The farm's PID while it runs; None once it has exited (its files are final then)."""
        return self.proc.pid if self.proc.poll() is None else None

    def states(self, names) -> dict[str, dict]:
        """``state`` of several nodes, from one flush."""
        flush_states(self.dir, self._live_pid())
        return {n: json.loads((self.dir / "state" / f"{n}.json").read_text()) for n in names}

    def wait_up(self, names, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            down = [n for n, st in self.states(names).items() if not st["up"]]
            if not down:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not up after {timeout}s: {down}")
            time.sleep(0.05)

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def read_state(directory: Path | str, name: str, pid: int | None, timeout: float = 10.0) -> dict:
    """A node's state file, brought up to date first by the running farm ``pid`` (a process
    we started; None when it has exited, and its files are as it left them when it stopped).

    The farm writes state files only on request: the counter in ``state/.flushed`` is read,
    the farm gets SIGUSR1, and the file is read once the counter has moved (a flush that
    ends after the counter was read includes every change made before this call).
    """
    flush_states(directory, pid, timeout)
    return json.loads((Path(directory) / "state" / f"{name}.json").read_text())


def flush_states(directory: Path | str, pid: int | None, timeout: float = 10.0) -> None:
    """Have the running farm ``pid`` (ours) write its state files in ``directory`` now."""
    if pid is None:
        return
    state_dir = Path(directory) / "state"
    before = _flush_count(state_dir)
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _flush_count(state_dir) <= before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node farm (pid {pid}) did not write its state within {timeout:g}s")
        time.sleep(0.002)


def _flush_count(state_dir: Path) -> int:
    try:
        return int((state_dir / FLUSHED).read_text())
    except (OSError, ValueError):
        return 0


def launch(directory: Path, nodes: int, authorized_keys: Path, down_time: float = 0.5,
           log_commands: bool = False, timeout: float = 120.0, tries: int = 5) -> FarmProcess:
    """Start a farm subprocess on a random free port and 127.X.0.0/16 block; wait for READY."""
    import random
    import subprocess
    import threading

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(tries):
        port = random.randint(20000, 60000)
        base = f"127.{random.randint(100, 250)}.0.0"
        cmd = [sys.executable, "-m", "rhaas.sim.farm", "--nodes", str(nodes), "--dir", str(directory),
               "--port", str(port), "--base", base, "--down-time", str(down_time),
               "--authorized-keys", str(authorized_keys)]
        if log_commands:
            cmd.append("--log-commands")
        with open(directory / "farm.err", "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda out=proc.stdout, got=line: got.append(out.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if line and line[0].startswith("READY"):
            doc = json.loads((directory / "farm.json").read_text())
            return FarmProcess(directory, proc, doc["nodes"], port, base)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        last = (directory / "farm.err").read_text()
    raise RuntimeError(f"the node farm did not start: {last[-2000:]}")



def write_json(path: Path | str, doc, mode: int = 0o644) -> None:
    """Write ``doc`` as JSON to ``path`` atomically (a temporary file, then rename), mode ``mode``."""
    path = str(path)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    data = json.dumps(doc).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)

