"""The simulated SSH node farm for tests: one ``python -m rhaas.sim.farm`` process per module.

Use from a test module::

    from farm_fixtures import client_key, sim_farm, farm_home  # noqa: F401

    def test_x(sim_farm, farm_home, rhaas_home):
        home = farm_home(rhaas_home, sim_farm.names[:3])   # inventory with 3 trusted nodes
        sim_farm.set_faults({"sim-0002": ["load_fails"]})
        sim_farm.state("sim-0001")["boot_id"]

The farm listens on a random 127.X.0.0/16 block and port, so parallel test runs do not
collide. Every test starts with no faults (``sim_farm`` clears them). The farm is stopped by
its own PID when the module is done.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class SimFarm:
    dir: Path
    proc: subprocess.Popen
    nodes: list[dict]  # farm.json entries: name, ssh, host_key, root
    port: int
    base: str

    @property
    def names(self) -> list[str]:
        return [n["name"] for n in self.nodes]

    def node(self, name: str) -> dict:
        return next(n for n in self.nodes if n["name"] == name)

    def state(self, name: str) -> dict:
        """What the simulated node reports: boot_id, cmdline, loaded, boots, up."""
        return json.loads((self.dir / "state" / f"{name}.json").read_text())

    def set_faults(self, faults: dict) -> None:
        tmp = self.dir / ".faults.json.tmp"
        tmp.write_text(json.dumps(faults))
        os.replace(tmp, self.dir / "faults.json")

    def commands(self) -> list[tuple[str, str]]:
        """(node, command) for every command the farm ran, oldest first."""
        path = self.dir / "commands.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            node, _, cmd = line.partition("\t")
            out.append((node, ast.literal_eval(cmd)))  # the farm writes repr() of the command
        return out

    def wait_up(self, names, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.state(n)["up"] for n in names):
                return
            time.sleep(0.05)
        raise AssertionError(f"nodes not up after {timeout}s: {[n for n in names if not self.state(n)['up']]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_farm(directory: Path, nodes: int, authorized_keys: Path, down_time: float = 0.3,
               timeout: float = 60.0, log_commands: bool = True) -> SimFarm:
    """Start a farm on a free random port and address block; return once it says READY."""
    directory.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(5):
        port = random.randint(20000, 60000)
        base = f"127.{random.randint(100, 250)}.0.0"
        cmd = [sys.executable, "-m", "rhaas.sim.farm", "--nodes", str(nodes), "--dir", str(directory),
               "--port", str(port), "--base", base, "--down-time", str(down_time),
               "--authorized-keys", str(authorized_keys)]
        if log_commands:
            cmd.append("--log-commands")
        err = open(directory / "farm.err", "w")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=str(ROOT))
        err.close()
        line = _readline(proc, timeout)
        if line.startswith("READY"):
            doc = json.loads((directory / "farm.json").read_text())
            return SimFarm(directory, proc, doc["nodes"], port, base)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        last = (directory / "farm.err").read_text()
    raise RuntimeError(f"the node farm did not start: {last[-2000:]}")


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else ""


def install_client_key(home: Path, key: tuple[Path, str]) -> None:
    """Give a rhaas home the session's client key (the one the farm authorizes)."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy(key[0], home / "id_ed25519")
    os.chmod(home / "id_ed25519", 0o600)
    (home / "id_ed25519.pub").write_text(key[1] + "\n")


def make_farm_home(home: Path, farm: SimFarm, names, key: tuple[Path, str], trust: bool = True, **fields):
    """A rhaas home whose inventory holds ``names`` from the farm, written through the store.

    ``trust`` pins each node's host key in its document; ``fields`` are extra node fields,
    either for all nodes or, as ``{"per_node": {name: {...}}}``, for some.
    """
    from rhaas.model import new_node
    from rhaas.store import Store

    install_client_key(home, key)
    store = Store(home)
    store.create()
    per_node = fields.pop("per_node", {})
    docs = []
    for name in names:
        n = farm.node(name)
        doc = new_node(name, "registered", ssh=n["ssh"], ssh_host_key=n["host_key"] if trust else None, **fields)
        doc.update(per_node.get(name, {}))
        docs.append(doc)
    with store.transaction("test") as tx:
        tx.put_nodes(docs)
    return store


@pytest.fixture(scope="session")
def client_key(tmp_path_factory) -> tuple[Path, str]:
    """One rhaas client key for the whole session (generated by rhaas's own code)."""
    from rhaas.adapters.ssh import ensure_client_key

    return ensure_client_key(tmp_path_factory.mktemp("client-key"))


@pytest.fixture(scope="module")
def _farm_process(tmp_path_factory, client_key):
    d = tmp_path_factory.mktemp("farm")
    keys = d / "authorized_keys"
    keys.write_text(client_key[1] + "\n")
    farm = start_farm(d / "farm", int(os.environ.get("RHAAS_TEST_FARM_NODES", "24")), keys)
    yield farm
    farm.stop()


@pytest.fixture
def sim_farm(_farm_process) -> SimFarm:
    """The module's farm, with no faults at the start of each test."""
    _farm_process.set_faults({})
    _farm_process.wait_up(_farm_process.names)
    yield _farm_process
    _farm_process.set_faults({})


@pytest.fixture
def farm_home(sim_farm, client_key):
    """``farm_home(home, names, trust=True, **fields)`` -> Store with those farm nodes."""

    def make(home, names, trust: bool = True, **fields):
        return make_farm_home(Path(home), sim_farm, names, client_key, trust=trust, **fields)

    return make
