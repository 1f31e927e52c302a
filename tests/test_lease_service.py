"""Leases as a service of `rhaas serve`: instant batch leases, networking off the lock, lease ends.

Real processes on loopback: a root, a middle instance leasing from it and serving, a top
instance leasing from the middle. The slow-upstream test puts a small stand-in HTTP upstream
(a HIL that takes 20 s to answer connect_network) under a middle `rhaas serve`: a real upstream
cannot be made that slow on purpose, so this one is written here, and says so.
"""

# ruff: noqa: F811  (fixtures imported from the fixture modules come back as parameters)
from __future__ import annotations

import gzip
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from farm_fixtures import _farm_process, client_key, install_client_key, sim_farm  # noqa: F401
from worlds import make_root, plain_node, rhaas, wait_for, within

from rhaas.model import new_node
from rhaas.store import Store


def listing(home, env=None) -> list[dict]:
    return json.loads(rhaas(home, "list", "--json", env=env, check=True).stdout)


def test_top_leases_50_from_the_middle_in_one_batch_without_kexec(tmp_path, start_serve):
    root, mid, top = tmp_path / "root", tmp_path / "mid", tmp_path / "top"
    make_root(root, nodes=[plain_node(i) for i in range(1, 61)],
              users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",))), projects=("p1",))
    s0 = start_serve(root)
    e1, e2 = {"RHAAS_UPSTREAM_PASSWORD": "pw1"}, {"RHAAS_UPSTREAM_PASSWORD": "pw2"}
    rhaas(mid, "init", "--upstream", s0.url, "--project", "p1", "--user", "alice", env=e1, check=True)
    root_writes = Store(root).snapshot().writes
    assert rhaas(mid, "lease", "55", env=e1, timeout=60).returncode == 0
    assert Store(root).snapshot().writes - root_writes == 1  # one batch call, one write at the root
    # the middle has a standby image: before, each assignment kexec'd the node into it
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.gz"
    kernel.write_bytes(os.urandom(4096))
    initrd.write_bytes(gzip.compress(b"x"))
    rhaas(mid, "image", "add", "standby", "--kernel", kernel, "--initrd", initrd, check=True)
    rhaas(mid, "config", "set", "standby-image", "standby", check=True)
    rhaas(mid, "project", "add", "p2", check=True)
    rhaas(mid, "user", "add", "bob", "--project", "p2", "--password-stdin", input="pw2\n", check=True)
    s1 = start_serve(mid)
    rhaas(top, "init", "--upstream", s1.url, "--project", "p2", "--user", "bob", env=e2, check=True)

    mid_before = Store(mid).snapshot()
    proc = rhaas(top, "lease", "50", "--json", env=e2, timeout=60)
    assert proc.returncode == 0, proc.stderr
    taken = [r["node"] for r in json.loads(proc.stdout)]
    assert len(taken) == 50 and all(r["outcome"] == "ok" for r in json.loads(proc.stdout))
    mid_after = Store(mid).snapshot()
    # one store write at the middle for all 50, and nothing provisioned there
    assert mid_after.writes - mid_before.writes == 1
    new = mid_after.events()[len(mid_before.events()):]
    assert sorted(e["node"] for e in new if e["action"] == "assign") == sorted(taken)
    assert not [e for e in new if e["action"] in ("kexec", "standby", "fallback")]
    assert all(mid_after.node(n)["project"] == "p2" and mid_after.node(n)["status"] == "unknown" for n in taken)
    # the middle lists them assigned; the top holds them; no duration was set
    assert sorted(n["name"] for n in listing(mid) if n["project"] == "p2") == sorted(taken)
    top_nodes = listing(top, e2)
    assert sorted(n["name"] for n in top_nodes) == sorted(taken)
    assert all(n["lease_until"] is None for n in top_nodes)


class SlowUpstream:
    """A stand-in HIL upstream whose connect_network answers only after `delay` seconds."""

    def __init__(self, nodes, delay: float = 20.0):
        self.nodes = {n: {} for n in nodes}
        self.delay = delay
        self.release = threading.Event()
        self.connects: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, doc=None):
                body = b"" if doc is None else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/v0/project/p1/nodes":
                    return self.answer(200, sorted(outer.nodes))
                if path.startswith("/v0/networking_action/"):
                    return self.answer(200, {"status": "DONE", "node": "x", "nic": "eth0", "type": "modify_port",
                                             "channel": "vlan/native", "new_network": "net"})
                if path.startswith("/v0/node/"):
                    name = path.rsplit("/", 1)[1]
                    nics = [{"label": "eth0", "macaddr": "52:54:00:00:00:01", "networks": outer.nodes.get(name, {})}]
                    return self.answer(200, {"name": name, "project": "p1", "nics": nics, "metadata": {}})
                # a real HIL answers a tenant's /active_extensions 401: no rhaas extension here
                return self.answer(401, {"type": "AuthorizationError", "msg": "This operation is administrator-only."})

            def do_PUT(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                return self.answer(200)  # network create

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith("/connect_network"):
                    node = self.path.split("/")[3]
                    outer.connects.append(node)
                    outer.release.wait(outer.delay)
                    outer.nodes[node] = {"vlan/native": "net"}
                    return self.answer(202, {"status_id": "up-1"})
                return self.answer(404, {"type": "NotFoundError", "msg": "no"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_slow_upstream_does_not_hold_up_other_clients(tmp_path, start_serve):
    mid, a, b = tmp_path / "mid", tmp_path / "a", tmp_path / "b"
    names = [f"node-{i:02d}" for i in range(1, 5)]
    slow = SlowUpstream(names, delay=20.0)
    try:
        rhaas(mid, "init", "--upstream", slow.url, "--project", "p1", "--user", "alice",
              env={"RHAAS_UPSTREAM_PASSWORD": "pw"}, check=True)
        # the middle holds four nodes leased from the stand-in (written as a lease would record them)
        with Store(mid).transaction("test") as tx:
            tx.put_nodes(new_node(n, "leased", upstream_name=n,
                                  nics=[{"label": "eth0", "macaddr": "52:54:00:00:00:01", "networks": {}}])
                         for n in names)
        for p, user in (("p2", "bob"), ("p3", "carol")):
            rhaas(mid, "project", "add", p, check=True)
            rhaas(mid, "user", "add", user, "--project", p, "--password-stdin", input="pw\n", check=True)
        s1 = start_serve(mid)
        env = {"RHAAS_UPSTREAM_PASSWORD": "pw"}
        rhaas(a, "init", "--upstream", s1.url, "--project", "p2", "--user", "bob", env=env, check=True)
        rhaas(b, "init", "--upstream", s1.url, "--project", "p3", "--user", "carol", env=env, check=True)
        rhaas(a, "lease", "node-01", env=env, check=True)
        rhaas(a, "network", "create", "net", env=env, check=True)

        result: dict = {}

        def connect():
            result["proc"] = rhaas(a, "network", "connect", "node-01", "eth0", "net", env=env, timeout=90)

        waiter = threading.Thread(target=connect, daemon=True)
        waiter.start()
        wait_for(lambda: slow.connects == ["node-01"], timeout=30, what="the middle to ask the slow upstream")

        def lease_and_free():
            out = rhaas(b, "lease", "2", "--json", env=env, timeout=60)
            assert out.returncode == 0, out.stderr
            held = [r["node"] for r in json.loads(out.stdout)]
            freed = rhaas(b, "free", *held, env=env, timeout=60)
            assert freed.returncode == 0, freed.stderr
            return held

        # the upstream holds the connect for 20 s; the other client must be done well before
        held = within(10, lease_and_free)
        assert len(held) == 2 and "node-01" not in held
        assert waiter.is_alive()  # the connect is still waiting on the upstream
        slow.release.set()
        waiter.join(60)
        assert result["proc"].returncode == 0, result["proc"].stderr
        assert Store(mid).snapshot().node("node-01")["nics"][0]["networks"] == {"vlan/native": "net"}
        events = [(e["action"], e["node"], e["outcome"]) for e in Store(mid).snapshot().events()]
        assert ("network-connect", "node-01", "pending") in events and ("network-connect", "node-01", "ok") in events
    finally:
        slow.stop()


def test_a_lease_for_5s_comes_back_to_the_standby_by_itself(tmp_path, start_serve, sim_farm, client_key):
    root, d1 = tmp_path / "root", tmp_path / "d1"
    names = sim_farm.names[:2]
    nodes = [new_node(n, "registered", ssh=sim_farm.node(n)["ssh"], ssh_host_key=sim_farm.node(n)["host_key"])
             for n in names]
    make_root(root, nodes=nodes, users=(("admin", "a", True, ()), ("alice", "pw", False, ("p1",))),
              projects=("p1",))
    install_client_key(root, client_key)
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.gz"
    kernel.write_bytes(os.urandom(32 * 1024))
    from rhaas.core.overlay import S_IFDIR, CpioEntry, write_newc

    initrd.write_bytes(gzip.compress(write_newc([CpioEntry("etc", S_IFDIR | 0o755)]), mtime=0))
    rhaas(root, "image", "add", "standby", "--kernel", kernel, "--initrd", initrd, "--append",
          "console=ttyS0 rhaas.role=standby", check=True)
    rhaas(root, "config", "set", "standby-image", "standby", check=True)
    served = start_serve(root)
    env = {"RHAAS_UPSTREAM_PASSWORD": "pw"}
    rhaas(d1, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=env, check=True)
    before = {n: sim_farm.state(n)["boot_id"] for n in names}

    proc = rhaas(d1, "lease", "2", "--for", "5s", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    snap = Store(d1).snapshot()
    assert snap.node_names() == names and all(snap.node(n)["lease_until"] for n in names)
    table = rhaas(d1, "list", env=env).stdout  # within the 5 s, unless this machine is very slow
    assert "TIME LEFT" in table.splitlines()[0] or table == ""

    def back_at_the_root():
        snap = Store(root).snapshot()
        return all(not snap.node(n)["project"] and not snap.node(n).get("returning") for n in names)

    wait_for(back_at_the_root, timeout=90, what="the nodes to come back to the root's free list")
    for n in names:
        state = sim_farm.state(n)
        assert state["boot_id"] != before[n] and "rhaas.role=standby" in state["cmdline"]
    root_events = Store(root).snapshot().events()
    assert sorted(e["node"] for e in root_events if e["action"] == "expired" and e["outcome"] == "ok") == names
    assert sorted(e["node"] for e in root_events if e["action"] == "standby" and e["outcome"] == "ok") == names
    # the client side notices at its next command, and records it
    proc = rhaas(d1, "list", "--json", env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    assert "expired" in proc.stderr
    d1_events = Store(d1).snapshot().events()
    assert sorted(e["node"] for e in d1_events if e["action"] == "expired") == names


def test_a_node_not_back_at_the_standby_is_not_handed_on(tmp_path, start_serve):
    """Its standby return fails here (nothing listens on its SSH port): it stays held back, with a 409."""
    from rhaas.adapters.hil import HILClient
    from rhaas.errors import BlockedError

    root, d1 = tmp_path / "root", tmp_path / "d1"
    make_root(root, nodes=[dict(plain_node(1), ssh="root@127.0.0.1:9"), dict(plain_node(2), ssh=None)],
              users=(("admin", "a", True, ()), ("alice", "pw", False, ("p1",))), projects=("p1",))
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.gz"
    kernel.write_bytes(os.urandom(4096))
    initrd.write_bytes(gzip.compress(b"x"))
    rhaas(root, "image", "add", "standby", "--kernel", kernel, "--initrd", initrd, check=True)
    rhaas(root, "config", "set", "standby-image", "standby", check=True)
    served = start_serve(root)
    env = {"RHAAS_UPSTREAM_PASSWORD": "pw"}
    rhaas(d1, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=env, check=True)
    rhaas(d1, "lease", "node-01", "node-02", env=env, check=True)
    proc = rhaas(d1, "free", "node-01", "node-02", "--no-standby", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # node-02 has no SSH path: free at once; node-01 is held back until its standby return ends
    wait_for(lambda: any(e["action"] == "standby" and e["node"] == "node-01"
                         for e in Store(root).snapshot().events()), timeout=60, what="the standby return to end")
    doc = Store(root).snapshot().node("node-01")
    assert doc["project"] is None and doc["returning"]["failed"]
    client = HILClient(served.url, "alice", "pw")
    assert client.free_nodes() == ["node-02"]
    try:
        client.connect_node("p1", "node-01")
        raise AssertionError("connect_node on a node not back at the standby was accepted")
    except BlockedError as exc:
        assert exc.status == 409 and "standby" in exc.msg
    proc = rhaas(d1, "lease", "node-01", "--json", env=env)
    assert proc.returncode == 1 and "standby" in json.loads(proc.stdout)[0]["reason"]


def test_batch_and_duration_input_is_checked(tmp_path, start_serve):
    from rhaas.adapters.hil import HILClient
    from rhaas.errors import APIError

    root, d1 = tmp_path / "root", tmp_path / "d1"
    make_root(root, nodes=[plain_node(i) for i in range(1, 4)],
              users=(("admin", "a", True, ()), ("alice", "pw", False, ("p1",)), ("bob", "pw", False, ("p2",))),
              projects=("p1", "p2"))
    served = start_serve(root)
    alice, bob = HILClient(served.url, "alice", "pw"), HILClient(served.url, "bob", "pw")
    assert "rhaas.batch" in alice.call("list_active_extensions")
    for body in ({}, {"count": 0}, {"count": 1, "nodes": ["node-01"]}, {"nodes": ["../x"]},
                 {"nodes": ["node-01", "node-01"]}, {"count": 1, "for_seconds": -5}, {"count": 1, "for_seconds": True},
                 {"count": "1"}, {"count": 1, "extra": 1}):
        try:
            alice.call("rhaas_connect_nodes", body, project="p1")
            raise AssertionError(f"accepted {body}")
        except APIError as exc:
            assert exc.status == 400, (body, exc)
    try:  # another project's member cannot lease into p1
        bob.call("rhaas_connect_nodes", {"count": 1}, project="p1")
        raise AssertionError("bob leased into p1")
    except APIError as exc:
        assert exc.status in (401, 403)
    assert all(n["project"] is None for n in Store(root).snapshot().nodes())
    answer = alice.call("rhaas_connect_nodes", {"nodes": ["node-01", "node-09"], "for_seconds": 60}, project="p1")
    assert answer["nodes"] == ["node-01"] and "node-09" in answer["refused"] and answer["until"]
    assert Store(root).snapshot().node("node-01")["assign_until"] == answer["until"]
    # a bad duration is a usage error before anything is asked
    env = {"RHAAS_UPSTREAM_PASSWORD": "pw"}
    rhaas(d1, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=env, check=True)
    for bad in ("5x", "0s", "-1m", ""):
        proc = rhaas(d1, "lease", "1", "--for", bad, env=env)
        assert proc.returncode == 2 and "invalid duration" in proc.stderr
    assert rhaas(root, "project", "add", "p3", "--lease-for", "soon").returncode == 2
    assert rhaas(root, "project", "add", "p4", "--lease-for", "2h").returncode == 0
    assert Store(root).snapshot().get("projects", "p4")["lease_for"] == 7200
    assert len(Store(d1).snapshot().nodes()) == 0


def test_a_networking_intent_left_by_a_dead_serve_is_finished_by_the_next(tmp_path, start_serve):
    from rhaas.adapters.hil import HILClient

    mid, a = tmp_path / "mid", tmp_path / "a"
    names = ["node-01", "node-02"]
    slow = SlowUpstream(names, delay=60.0)
    try:
        env = {"RHAAS_UPSTREAM_PASSWORD": "pw"}
        rhaas(mid, "init", "--upstream", slow.url, "--project", "p1", "--user", "alice", env=env, check=True)
        with Store(mid).transaction("test") as tx:
            tx.put_nodes(new_node(n, "leased", upstream_name=n,
                                  nics=[{"label": "eth0", "macaddr": "52:54:00:00:00:01", "networks": {}}])
                         for n in names)
        rhaas(mid, "project", "add", "p2", check=True)
        rhaas(mid, "user", "add", "bob", "--project", "p2", "--password-stdin", input="pw\n", check=True)
        s1 = start_serve(mid)
        rhaas(a, "init", "--upstream", s1.url, "--project", "p2", "--user", "bob", env=env, check=True)
        rhaas(a, "lease", "node-01", env=env, check=True)
        rhaas(a, "network", "create", "net", env=env, check=True)
        sid = within(10, HILClient(s1.url, "bob", "pw").connect_network, "node-01", "eth0", "net")
        wait_for(lambda: slow.connects == ["node-01"], timeout=30, what="the middle to ask the slow upstream")
        s1.proc.kill()  # SIGKILL to the serve process this test started, mid-action
        s1.proc.wait(timeout=10)
        act = Store(mid).snapshot().get("actions", sid)
        assert act["status"] == "PENDING" and act["op"] == "connect" and act["asked"]
        slow.release.set()  # the upstream finishes what it was asked
        wait_for(lambda: slow.nodes["node-01"] == {"vlan/native": "net"}, timeout=30, what="the upstream to finish")
        start_serve(mid)  # its reaper finds the intent: the upstream already shows it done
        wait_for(lambda: Store(mid).snapshot().get("actions", sid)["status"] == "DONE", timeout=30,
                 what="the next serve to settle the action")
        assert Store(mid).snapshot().node("node-01")["nics"][0]["networks"] == {"vlan/native": "net"}
        assert slow.connects == ["node-01"]  # asked once: the upstream's view decided, not a second ask
    finally:
        slow.stop()


def test_a_derived_serve_reclaims_an_ended_lease_with_its_networks(tmp_path, start_serve):
    root, mid, top = tmp_path / "root", tmp_path / "mid", tmp_path / "top"
    make_root(root, nodes=[plain_node(i) for i in range(1, 4)],
              users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",))), projects=("p1",))
    s0 = start_serve(root)
    e1, e2 = {"RHAAS_UPSTREAM_PASSWORD": "pw1"}, {"RHAAS_UPSTREAM_PASSWORD": "pw2"}
    rhaas(mid, "init", "--upstream", s0.url, "--project", "p1", "--user", "alice", env=e1, check=True)
    rhaas(mid, "lease", "3", env=e1, check=True)
    rhaas(mid, "project", "add", "p2", "--lease-for", "8s", check=True)  # the project's default
    rhaas(mid, "user", "add", "bob", "--project", "p2", "--password-stdin", input="pw2\n", check=True)
    s1 = start_serve(mid)
    rhaas(top, "init", "--upstream", s1.url, "--project", "p2", "--user", "bob", env=e2, check=True)
    assert rhaas(top, "lease", "node-02", env=e2).returncode == 0
    assert rhaas(top, "network", "create", "render", env=e2).returncode == 0
    assert rhaas(top, "network", "connect", "node-02", "eth0", "render", env=e2, timeout=60).returncode == 0
    assert Store(root).snapshot().node("node-02")["nics"][0]["networks"] == {"vlan/native": "render"}

    def reclaimed():
        doc = Store(mid).snapshot().node("node-02")
        return doc["project"] is None and doc["nics"][0]["networks"] == {}

    wait_for(reclaimed, timeout=60, what="the middle to reclaim node-02 when its lease ended")
    # detached at the root too, and free again at the middle
    assert Store(root).snapshot().node("node-02")["nics"][0]["networks"] == {}
    assert Store(root).snapshot().node("node-02")["project"] == "p1"
    assert "node-02" in rhaas(mid, "list", "--available", "-q").stdout.split()
    mid_events = [e for e in Store(mid).snapshot().events() if e["node"] == "node-02"]
    assert any(e["action"] == "expired" and e["outcome"] == "ok" for e in mid_events)
    proc = rhaas(top, "list", "-q", env=e2)
    assert proc.stdout == "" and "expired" in proc.stderr
    assert [e["node"] for e in Store(top).snapshot().events() if e["action"] == "expired"] == ["node-02"]
