"""Partial failures leave the inventory matching the upstream, with a result per node."""

from __future__ import annotations

import json
import subprocess
import sys

from worlds import ROOT, Served, make_root, plain_node, rhaas, wait_for

from rhaas.store import Store

ENV = {"RHAAS_UPSTREAM_PASSWORD": "pw"}


def upstream_held(root, project="p1"):
    return sorted(n["name"] for n in Store(root).snapshot().nodes() if n["project"] == project)


def local(home):
    return sorted(rhaas(home, "list", "-q").stdout.split())


def test_one_node_refused(tmp_path, start_serve):
    root, home, other = tmp_path / "root", tmp_path / "d", tmp_path / "o"
    make_root(root, nodes=[plain_node(i) for i in range(1, 6)],
              users=(("admin", "a", True, ()), ("alice", "pw", False, ("p1",)), ("bob", "pw", False, ("p2",))),
              projects=("p1", "p2"))
    served = start_serve(root)
    rhaas(other, "init", "--upstream", served.url, "--project", "p2", "--user", "bob", env=ENV, check=True)
    rhaas(other, "lease", "node-03", env=ENV, check=True)
    rhaas(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=ENV, check=True)
    proc = rhaas(home, "lease", "node-0[2-4]", "--json", env=ENV)
    assert proc.returncode == 1
    rows = {r["node"]: r for r in json.loads(proc.stdout)}
    assert rows["node-02"]["outcome"] == "ok" and rows["node-04"]["outcome"] == "ok"
    assert rows["node-03"]["outcome"] == "failed" and "another project" in rows["node-03"]["reason"]
    assert "node-03" in proc.stderr
    assert local(home) == upstream_held(root) == ["node-02", "node-04"]
    # asking for more than there is: what could be had is held and recorded, exit 1
    proc = rhaas(home, "lease", "5", "--json", env=ENV)
    assert proc.returncode == 1 and "not enough free nodes" in proc.stdout
    assert local(home) == upstream_held(root) == ["node-01", "node-02", "node-04", "node-05"]


def test_upstream_dies_mid_lease_then_reconcile(tmp_path):
    root, home = tmp_path / "root", tmp_path / "d"
    make_root(root, nodes=[plain_node(i) for i in range(1, 61)],
              users=(("admin", "a", True, ()), ("alice", "pw", False, ("p1",))), projects=("p1",))
    served = Served(root)
    try:
        rhaas(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=ENV, check=True)
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RHAAS_")}
        # one connect_node per node, as against a real HIL (rhaas.batch would take all 60 in one call)
        env.update(RHAAS_HOME=str(home), RHAAS_UPSTREAM_PASSWORD="pw", RHAAS_UPSTREAM_TIMEOUT="3",
                   RHAAS_UPSTREAM_BATCH="off")
        lease = subprocess.Popen([sys.executable, "-m", "rhaas", "lease", "60", "--json"], cwd=str(ROOT),
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(upstream_held(root)) >= 5, timeout=30, what="5 nodes leased upstream")
        # the upstream dies half-way, at once (SIGKILL to the serve process this test started): a
        # call in flight loses its connection, its one retry is refused, and so is every later call
        served.proc.kill()
        served.proc.wait(timeout=10)
        out, err = lease.communicate(timeout=60)
        assert lease.returncode == 1, (lease.returncode, err)  # some nodes were leased, the rest failed
        rows = json.loads(out)
        assert [r["outcome"] for r in rows[:-1]] == ["ok"] * (len(rows) - 1)
        missing = 60 - (len(rows) - 1)
        assert rows[-1] == {"node": f"({missing} more)", "outcome": "failed",
                            "reason": f"upstream {served.url} unreachable: connection refused; run 'rhaas reconcile' once the upstream answers"}
        held_here = ", ".join(r["node"] for r in rows[:-1][:5]) + (f" and {len(rows) - 6} more" if len(rows) > 6 else "")
        # the details of the nodes it did get could not be read either: said once, not per node
        assert err.splitlines() == [
            f"rhaas: recorded without details: {held_here}: upstream {served.url} unreachable: connection refused",
            f"rhaas: lease failed for 1 of {len(rows)}: ({missing} more)",
            "rhaas: next: run 'rhaas reconcile' once the upstream answers (or any lease/free/list)",
        ]
        held_before = upstream_held(root)
        assert 5 <= len(held_before) < 60
        mine = local(home)
        # everything we recorded is really ours upstream; at most the calls in flight are missing
        from rhaas.core.lease import CONNECT_WORKERS

        assert set(mine) <= set(held_before) and len(held_before) - len(mine) <= CONNECT_WORKERS
    finally:
        served.stop()
    served = Served(root)
    try:
        rhaas(home, "config", "set", "upstream", served.url, check=True)
        proc = rhaas(home, "reconcile", "--json", env=ENV)
        assert proc.returncode == 0
        assert local(home) == upstream_held(root)
        assert rhaas(home, "reconcile", env=ENV).stderr.strip() == "inventory matches upstream"
    finally:
        served.stop()


def test_reconcile_repairs_drift_both_ways(tmp_path, start_serve):
    root, home = tmp_path / "root", tmp_path / "d"
    make_root(root, nodes=[plain_node(i) for i in range(1, 5)],
              users=(("admin", "a", True, ()), ("alice", "pw", False, ("p1",))), projects=("p1",))
    served = start_serve(root)
    rhaas(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=ENV, check=True)
    rhaas(home, "lease", "node-01", "node-02", env=ENV, check=True)
    # drift: the upstream admin takes node-02 back, and node-03 is given to us behind our back
    from rhaas.adapters.hil import HILClient

    admin = HILClient(served.url, "admin", "a", timeout=5)
    admin.detach_node("p1", "node-02")
    admin.connect_node("p1", "node-03")
    changes = json.loads(rhaas(home, "reconcile", "--dry-run", "--json", env=ENV).stdout)
    assert {c["node"] for c in changes} == {"node-02", "node-03"}
    assert local(home) == ["node-01", "node-02"]  # dry run changed nothing
    rhaas(home, "reconcile", env=ENV, check=True)
    assert local(home) == upstream_held(root) == ["node-01", "node-03"]
    shown = json.loads(rhaas(home, "show", "node-03", "--json").stdout)
    assert shown["ssh"] == "root@127.0.0.3:22" and shown["nics"][0]["label"] == "eth0"
