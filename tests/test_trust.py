"""`rhaas node trust` learns a host key explicitly; kexec then accepts exactly that key."""

# ruff: noqa: F811
from __future__ import annotations

import json

from farm_fixtures import _farm_process, client_key, farm_home, sim_farm  # noqa: F401
from worlds import rhaas

from rhaas.model import fingerprint


def test_trust_prints_fingerprint_and_pins(sim_farm, farm_home, rhaas_home):
    name = sim_farm.names[20]
    store = farm_home(rhaas_home, [name], trust=False)
    assert store.snapshot().node(name)["ssh_host_key"] is None
    # without --yes and no terminal to answer: nothing is recorded
    proc = rhaas(rhaas_home, "node", "trust", name, input="n\n")
    assert proc.returncode == 2 and store.snapshot().node(name)["ssh_host_key"] is None
    proc = rhaas(rhaas_home, "node", "trust", name, "--yes")
    assert proc.returncode == 0, proc.stderr
    want = sim_farm.node(name)["host_key"]
    assert fingerprint(want) in proc.stdout
    assert store.snapshot().node(name)["ssh_host_key"].split()[:2] == want.split()[:2]
    events = json.loads(rhaas(rhaas_home, "events", name, "--json").stdout)
    assert events[-1]["action"] == "trust" and events[-1]["detail"]["fingerprint"] == fingerprint(want)


def test_trust_of_an_unreachable_node_is_one_line(rhaas_home):
    rhaas(rhaas_home, "init", check=True)
    rhaas(rhaas_home, "node", "register", "ghost", "--ssh", "root@127.0.0.1:1", check=True)
    proc = rhaas(rhaas_home, "node", "trust", "ghost", "--yes", timeout=30)
    assert proc.returncode == 1
    assert proc.stderr == "rhaas: error: cannot connect to 127.0.0.1:1: connection refused\n"
