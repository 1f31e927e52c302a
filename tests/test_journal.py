"""Leases and frees killed at any point leave a record the next command resolves.

Real processes on loopback: a root instance served by `rhaas serve`, a derived instance driven
by `rhaas` subprocesses that this test SIGKILLs. "Held upstream" is read from the root's own
inventory, the upstream's truth.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from worlds import ROOT, Served, make_root, plain_node, rhaas, wait_for

from rhaas.adapters.hil import HILClient
from rhaas.store import Store

ENV = {"RHAAS_UPSTREAM_PASSWORD": "pw"}
USERS = (("admin", "a", True, ()), ("alice", "pw", False, ("p1",)))


def upstream_held(root, project="p1") -> set[str]:
    return {n["name"] for n in Store(root).snapshot().nodes() if n.get("project") == project}


def local(home) -> set[str]:
    return set(Store(home).snapshot().node_names())


def start_rhaas(home, *args, env=None) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    full.update(RHAAS_HOME=str(home), RHAAS_UPSTREAM_PASSWORD="pw", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "rhaas", *args], cwd=str(ROOT), env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkill_lease_at_random_points_loses_no_node(tmp_path, start_serve):
    root, home = tmp_path / "root", tmp_path / "d"
    make_root(root, nodes=[plain_node(i) for i in range(1, 25)], users=USERS, projects=("p1",))
    served = start_serve(root)
    rhaas(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=ENV, check=True)
    rng = random.Random(int(os.environ.get("RHAAS_TEST_SEED", "11")))

    def reset():
        with Store(root).transaction("test") as tx:
            tx.put_nodes([dict(d, project=None) for d in tx.nodes() if d.get("project")])
        with Store(home).transaction("test") as tx:
            tx.remove_nodes(tx.node_names())

    # how long one whole `lease 20` takes here, so kills can land anywhere in it
    started = time.monotonic()
    rhaas(home, "lease", "20", env=ENV, check=True)
    duration = time.monotonic() - started
    reset()

    interrupted = 0  # trials where the kill left nodes held upstream and unrecorded
    for trial in range(20):
        if trial % 2:
            # anywhere in a batched run (rhaas.batch: the upstream takes all 20 in one call)
            proc = start_rhaas(home, "lease", "20")
            time.sleep(rng.uniform(0, duration))
        else:
            # mid-connect, one connect_node a node as against a real HIL: the window between the
            # upstream's commit and the local record is wide here, so these kills land for sure
            proc = start_rhaas(home, "lease", "20", env={"RHAAS_UPSTREAM_BATCH": "off"})
            k = rng.randint(1, 19)  # once the upstream holds k nodes
            wait_for(lambda k=k, proc=proc: len(upstream_held(root)) >= k or proc.poll() is not None, timeout=30, interval=0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if upstream_held(root) - local(home):
            interrupted += 1
        held0 = upstream_held(root)
        # the next command, whatever it is, resolves what the killed one left
        nxt = rhaas(home, "list", "-q", env=ENV, timeout=60)
        assert nxt.returncode == 0, nxt.stderr
        held, here = upstream_held(root), local(home)
        assert held - here == set(), f"trial {trial}: held upstream, missing here: {sorted(held - here)} {sorted(held0)} {nxt.stderr}"
        assert here - held == set(), f"trial {trial}: here, not held upstream: {sorted(here - held)}"
        assert set(nxt.stdout.split()) == held
        assert not Store(home).snapshot().data.get("journal"), f"trial {trial}: journal left unresolved"
        reset()
    assert interrupted >= 3, f"only {interrupted} of 20 kills landed mid-lease; the test did not test"


def test_upstream_killed_mid_lease_is_resolved_after_it_restarts(tmp_path):
    root, home = tmp_path / "root", tmp_path / "d"
    make_root(root, nodes=[plain_node(i) for i in range(1, 61)], users=USERS, projects=("p1",))
    served = Served(root)
    try:
        rhaas(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=ENV, check=True)
        full = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
        # one connect_node a node (as against a real HIL): a batch would take all 60 in one call
        full.update(RHAAS_HOME=str(home), RHAAS_UPSTREAM_PASSWORD="pw", RHAAS_UPSTREAM_TIMEOUT="5",
                    RHAAS_UPSTREAM_BATCH="off")
        lease = subprocess.Popen([sys.executable, "-m", "rhaas", "lease", "60"], cwd=str(ROOT), env=full,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: len(upstream_held(root)) >= 5, timeout=30, interval=0.005)
        served.proc.send_signal(signal.SIGKILL)  # the upstream dies mid-lease, replies in flight lost
        served.proc.wait(timeout=10)
        _, err = lease.communicate(timeout=60)
        assert lease.returncode != 0
        assert "rhaas reconcile" in err, err  # the failing run says what to run next
        # with the upstream still down, the next command says it could not resolve, and goes on
        down = rhaas(home, "list", "-q", env=ENV, timeout=60)
        assert down.returncode == 0 and "not resolved yet" in down.stderr, down.stderr
    finally:
        served.stop()
    served = Served(root)  # the upstream is back (on a new port)
    try:
        rhaas(home, "config", "set", "upstream", served.url, check=True)
        nxt = rhaas(home, "list", "-q", env=ENV, timeout=60)
        assert nxt.returncode == 0, nxt.stderr
        held, here = upstream_held(root), local(home)
        assert held and held == here
        assert set(nxt.stdout.split()) == held
        assert not Store(home).snapshot().data.get("journal")
    finally:
        served.stop()


def test_sigkill_free_is_finished_by_the_next_command(tmp_path, start_serve):
    root, home = tmp_path / "root", tmp_path / "d"
    make_root(root, nodes=[plain_node(i) for i in range(1, 21)], users=USERS, projects=("p1",))
    served = start_serve(root)
    rhaas(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=ENV, check=True)
    full = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    full.update(RHAAS_HOME=str(home), RHAAS_UPSTREAM_PASSWORD="pw")

    def killed_free() -> str:
        rhaas(home, "lease", "20", env=ENV, check=True)
        names = "\n".join(sorted(local(home))) + "\n"
        proc = subprocess.Popen([sys.executable, "-m", "rhaas", "free", "-", "--no-standby"], cwd=str(ROOT),
                                env=full, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, text=True)
        proc.stdin.write(names)
        proc.stdin.close()
        assert wait_for(lambda: len(upstream_held(root)) <= 15 or proc.poll() is not None, timeout=30, interval=0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert len(upstream_held(root)) < 20
        return names

    # the next command is a list: it removes what the killed free released, keeps the rest
    killed_free()
    nxt = rhaas(home, "list", "-q", env=ENV, timeout=60)
    assert nxt.returncode == 0, nxt.stderr
    assert upstream_held(root) == local(home)
    assert len(local(home)) < 20 and "interrupted free released it" in nxt.stderr
    rhaas(home, "free", "-", "--no-standby", input=nxt.stdout, env=ENV, check=True)
    # the next command is the same free again: every node ends freed, exit 0
    names = killed_free()
    again = rhaas(home, "free", "-", "--no-standby", "--json", input=names, env=ENV, timeout=60)
    assert again.returncode == 0, again.stderr
    assert {r["node"] for r in json.loads(again.stdout)} == set(names.split())
    assert local(home) == upstream_held(root) == set()


def test_free_of_a_node_already_released_upstream(tmp_path, start_serve):
    root, home = tmp_path / "root", tmp_path / "d"
    make_root(root, nodes=[plain_node(i) for i in range(1, 4)], users=USERS, projects=("p1",))
    served = start_serve(root)
    rhaas(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=ENV, check=True)
    rhaas(home, "lease", "node-01", "node-02", env=ENV, check=True)
    # released behind rhaas's back, through the upstream's own API
    client = HILClient(served.url, "alice", "pw", timeout=10)
    client.set_obm("node-01", False)
    client.detach_node("p1", "node-01")
    client.set_obm("node-02", False)
    client.detach_node("p1", "node-02")
    proc = rhaas(home, "free", "node-01", "--json", env=ENV)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)
    assert row["outcome"] == "ok" and "already released" in row["note"]
    assert "node-01" in proc.stderr and "already released" in proc.stderr
    proc = rhaas(home, "free", "node-02", "--force", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert local(home) == set() and upstream_held(root) == set()
    # a node another project took meanwhile is not ours either: done here, untouched there
    rhaas(home, "lease", "node-03", env=ENV, check=True)
    client.set_obm("node-03", False)
    client.detach_node("p1", "node-03")
    admin = HILClient(served.url, "admin", "a", timeout=10)
    admin.call("project_create", project="p2")
    admin.connect_node("p2", "node-03")
    proc = rhaas(home, "free", "node-03", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert local(home) == set()
    assert upstream_held(root, "p2") == {"node-03"}


def test_only_entries_of_finished_runs_are_resolved(rhaas_home):
    """A running lease's entry is left alone; a finished (or recycled-pid) owner's is stale."""
    from rhaas.core import journal

    rhaas(rhaas_home, "init", check=True)
    store = Store(rhaas_home)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(done.stdout)
    with store.transaction("test") as tx:
        tbl = tx.table("journal")
        tbl.insert(dict(journal.owner(), op="lease", nodes=[]))  # this process: alive
        tbl.insert(dict(journal.owner(), op="lease", nodes=[], pid=dead_pid))  # exited
        tbl.insert(dict(journal.owner(), op="lease", nodes=[], pid_start=1))  # our pid, another start
        tbl.insert(dict(journal.owner(), op="free", nodes=[], pid=None))  # handed over
    stale = journal.stale_entries(store.snapshot())
    assert sorted(stale) == ["2", "3", "4"]
