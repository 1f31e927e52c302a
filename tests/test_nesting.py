"""Three rhaas levels as separate processes on loopback: root -> d1 -> d2.

The root owns four nodes, each behind its own real BMC (Debian's ipmi_sim). d1 leases three
and serves them; d2 leases two from d1. Power calls issued at the top reach the root's BMC;
networks created at the top exist at the root; `free` returns nodes one level down, and the
listings of every level agree at every step.
"""

from __future__ import annotations

import json

import pytest
from ipmi_fixtures import ipmi_sim_factory, requires_ipmi_sim  # noqa: F401  (a fixture, used by name)
from worlds import make_root, plain_node, rhaas, wait_for

from rhaas.store import Store

pytestmark = [pytest.mark.ipmi, requires_ipmi_sim]


def listing(home) -> dict[str, str | None]:
    out = rhaas(home, "list", "--json", check=True).stdout
    return {n["name"]: n["project"] for n in json.loads(out)}


def test_three_levels(tmp_path, start_serve, ipmi_sim_factory):  # noqa: F811
    root, d1, d2 = tmp_path / "root", tmp_path / "d1", tmp_path / "d2"
    bmcs = {f"node-0{i}": ipmi_sim_factory(f"node-0{i}", power_on=True) for i in range(1, 5)}
    make_root(root, nodes=[plain_node(i, ipmi=bmcs[f"node-0{i}"].ipmi_doc()) for i in range(1, 5)],
              users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",))), projects=("p1",))
    s0 = start_serve(root)

    e1 = {"RHAAS_UPSTREAM_PASSWORD": "pw1"}
    rhaas(d1, "init", "--upstream", s0.url, "--project", "p1", "--user", "alice", env=e1, check=True)
    assert rhaas(d1, "lease", "3", env=e1).returncode == 0
    leased1 = sorted(listing(d1))
    assert len(leased1) == 3
    assert {n: p for n, p in listing(root).items() if p} == {n: "p1" for n in leased1}

    rhaas(d1, "project", "add", "p2", check=True)
    rhaas(d1, "user", "add", "bob", "--project", "p2", "--password-stdin", input="pw2\n", check=True)
    s1 = start_serve(d1)
    e2 = {"RHAAS_UPSTREAM_PASSWORD": "pw2"}
    rhaas(d2, "init", "--upstream", s1.url, "--project", "p2", "--user", "bob", env=e2, check=True)
    assert rhaas(d2, "lease", "2", env=e2).returncode == 0
    leased2 = sorted(listing(d2))
    assert len(leased2) == 2 and set(leased2) <= set(leased1)
    # d1 shows the two as assigned to its downstream project, the third as available
    assert listing(d1) == {n: ("p2" if n in leased2 else None) for n in leased1}
    assert rhaas(d1, "list", "--assigned", "-q").stdout.split() == leased2
    assert rhaas(d1, "list", "--available", "-q").stdout.split() == sorted(set(leased1) - set(leased2))
    # the root still sees all three as p1's: it knows nothing of the nesting above
    assert sorted(n for n, p in listing(root).items() if p == "p1") == leased1

    # a power cycle issued at the top travels d2 -> d1 -> root -> ipmi_sim
    target = leased2[0]
    bmc = bmcs[target]
    bmc.clear_calls()
    proc = rhaas(d2, "power", "cycle", target, "--json", env=e2, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["outcome"] == "ok"
    off = bmc.wait_for_call("set power 0", timeout=20)
    bmc.wait_for_call("set power 1", after=off, timeout=20)
    wait_for(lambda: bmc.power() == "on", timeout=10, what="the chassis file to say on")  # logged, then written
    # ipmi_sim finishes the cycle (off, poll, on) on its own time; status reads it back through 3 levels
    wait_for(lambda: json.loads(rhaas(d2, "power", "status", target, "--json", env=e2,
                                      timeout=60).stdout)[0]["power"] == "on", timeout=20,
             what="power status 'on' through three levels")
    proc = rhaas(d2, "bootdev", "pxe", target, env=e2, timeout=60)
    assert proc.returncode == 0 and bmc.boot() == "pxe"
    # the other BMCs saw nothing
    assert all(not b.actions() for n, b in bmcs.items() if n != target)

    # networks pass through: created at the top, they exist (and attach) at the root
    assert rhaas(d2, "network", "create", "render", env=e2).returncode == 0
    root_nets = Store(root).snapshot()
    assert root_nets.get("networks", "render")["owner"] == "p1"
    assert rhaas(d2, "network", "connect", target, "eth0", "render", env=e2).returncode == 0
    root_nic = Store(root).snapshot().node(target)["nics"][0]
    assert root_nic["networks"] == {"vlan/native": "render"}
    assert Store(d1).snapshot().node(target)["nics"][0]["networks"] == {"vlan/native": "render"}

    # free at the top returns nodes to d1 (networks detached, OBM off, node detached)
    proc = rhaas(d2, "free", *leased2, env=e2, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert listing(d2) == {}
    assert listing(d1) == {n: None for n in leased1}
    assert Store(root).snapshot().node(target)["nics"][0]["networks"] == {}
    assert rhaas(d2, "network", "delete", "render", env=e2).returncode == 0
    assert Store(root).snapshot().get("networks", "render") is None

    # free at d1 returns them to the root
    proc = rhaas(d1, "free", *leased1, env=e1, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert listing(d1) == {}
    assert listing(root) == {f"node-0{i}": None for i in range(1, 5)}
    assert not any(n["obm_enabled"] for n in Store(root).snapshot().nodes())
    # every level's event log recorded what happened
    assert any(e["action"] == "power-cycle" for e in Store(root).snapshot().events())
    assert sum(e["action"] == "free" for e in Store(d2).snapshot().events()) == 2
