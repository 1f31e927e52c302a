"""Network names per level: a derived instance's tenants each have their own `net1`.

Real processes on loopback: a root `rhaas serve`, a derived instance `d1` leasing from it and
serving two tenants (projects t1 and t2), and, in the last test, a second derived instance on
the same root project. The tenants speak HIL's API through rhaas's HIL client.
"""

from __future__ import annotations

import base64
import http.client
import json
from urllib.parse import urlsplit

import pytest
from worlds import make_root, plain_node, rhaas

from rhaas.adapters.hil import HILClient
from rhaas.core import netnames
from rhaas.errors import APIError, NotFoundError
from rhaas.store import Store

E1 = {"RHAAS_UPSTREAM_PASSWORD": "pw1"}


def root_world(root, start_serve, n_nodes=4):
    make_root(root, nodes=[plain_node(i) for i in range(1, n_nodes + 1)],
              users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",))), projects=("p1",))
    return start_serve(root)


def derived(home, upstream_url, count, tenants=()):
    """A derived instance holding ``count`` of the root's nodes; each tenant (project, user) added."""
    rhaas(home, "init", "--upstream", upstream_url, "--project", "p1", "--user", "alice", env=E1, check=True)
    proc = rhaas(home, "lease", str(count), "--json", env=E1, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for project, user in tenants:
        rhaas(home, "project", "add", project, check=True)
        rhaas(home, "user", "add", user, "--project", project, "--password-stdin", input="pw\n", check=True)
    return sorted(r["node"] for r in json.loads(proc.stdout))


def root_networks(root) -> dict[str, dict]:
    return {n["name"]: n for n in Store(root).snapshot().all("networks")}


def attached_upstream(root, node) -> dict:
    return Store(root).snapshot().node(node)["nics"][0]["networks"]


def raw_get(url: str, path: str, user: str, password: str = "pw"):
    """GET one HIL path as HIL's own client would, for the exact body serve answers."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    conn.request("GET", "/v0" + path, headers={"Authorization": "Basic " + auth})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if data.strip() else None)


def expect(status: int, fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    assert info.value.status == status, info.value
    return info.value


@pytest.fixture
def two_tenants(tmp_path, start_serve):
    root, d1 = tmp_path / "root", tmp_path / "d1"
    s0 = root_world(root, start_serve)
    nodes = derived(d1, s0.url, 3, tenants=(("t1", "u1"), ("t2", "u2")))
    rhaas(d1, "user", "add", "boss", "--admin", "--password-stdin", input="pw\n", check=True)
    s1 = start_serve(d1)
    u1, u2 = HILClient(s1.url, "u1", "pw"), HILClient(s1.url, "u2", "pw")
    u1.connect_node("t1", nodes[0])
    u2.connect_node("t2", nodes[1])
    return root, d1, nodes, u1, u2, s1.url


def test_two_tenants_both_have_net1_and_each_sees_only_its_own(two_tenants):
    root, d1, nodes, u1, u2, url = two_tenants
    n1, n2 = nodes[0], nodes[1]
    before = set(root_networks(root))
    for client, project in ((u1, "t1"), (u2, "t2")):
        client.call("network_create", {"owner": project, "access": project, "net_id": ""}, network="net1")
    for client, node in ((u1, n1), (u2, n2)):
        assert client.wait_action(client.connect_network(node, "eth0", "net1"), timeout=60) == "DONE"

    # each tenant sees its own net1, with its own node only
    for client, project, mine, theirs in ((u1, "t1", n1, n2), (u2, "t2", n2, n1)):
        status, shown = raw_get(url, "/network/net1", "u1" if project == "t1" else "u2")
        assert status == 200, shown
        assert shown["name"] == "net1" and shown["owner"] == project and shown["access"] == [project]
        assert shown["connected-nodes"] == {mine: ["eth0"]}
        assert client.call("project_networks", project=project) == ["net1"]
        assert client.show_node(mine)["nics"][0]["networks"] == {"vlan/native": "net1"}
        assert theirs not in json.dumps(client.call("list_network_attachments", network="net1"))
        # no public network here, and the other's is not listed
        assert raw_get(url, "/networks", "u1" if project == "t1" else "u2") == (200, {})

    # the root holds two distinct networks, in d1's project, named apart; each node on its own
    new = {k: v for k, v in root_networks(root).items() if k not in before}
    assert len(new) == 2 and all(v["owner"] == "p1" for v in new.values())
    assert all(k.startswith(netnames.PREFIX) and "net1" in k for k in new)
    up1, up2 = attached_upstream(root, n1)["vlan/native"], attached_upstream(root, n2)["vlan/native"]
    assert {up1, up2} == set(new) and up1 != up2 and "t1" in up1 and "t2" in up2
    d1_nets = {n["name"]: n for n in Store(d1).snapshot().all("networks")}
    assert d1_nets[up1]["local"] == d1_nets[up2]["local"] == "net1"
    assert (d1_nets[up1]["owner"], d1_nets[up2]["owner"]) == ("t1", "t2")

    # a networking action answers with the tenant's name
    sid = u1.detach_network(n1, "eth0", "net1")
    assert u1.wait_action(sid, timeout=60) == "DONE"
    assert raw_get(url, f"/networking_action/{sid}", "u1")[1]["new_network"] is None
    sid = u1.connect_network(n1, "eth0", "net1")
    assert u1.wait_action(sid, timeout=60) == "DONE"
    assert raw_get(url, f"/networking_action/{sid}", "u1")[1]["new_network"] == "net1"
    assert attached_upstream(root, n1) == {"vlan/native": up1}

    # deleting t1's leaves t2's working: still attached, still listed, still shown
    assert u1.wait_action(u1.detach_network(n1, "eth0", "net1"), timeout=60) == "DONE"
    u1.call("network_delete", network="net1")
    assert up1 not in root_networks(root) and up2 in root_networks(root)
    expect(404, u1.call, "show_network", network="net1")
    assert u1.call("project_networks", project="t1") == []
    assert u2.call("project_networks", project="t2") == ["net1"]
    assert raw_get(url, "/network/net1", "u2")[1]["connected-nodes"] == {n2: ["eth0"]}
    assert attached_upstream(root, n2) == {"vlan/native": up2}
    assert u2.wait_action(u2.detach_network(n2, "eth0", "net1"), timeout=60) == "DONE"
    assert attached_upstream(root, n2) == {}
    assert u2.wait_action(u2.connect_network(n2, "eth0", "net1"), timeout=60) == "DONE"
    assert attached_upstream(root, n2) == {"vlan/native": up2}


def test_another_tenants_network_is_invisible(two_tenants):
    _root, d1, nodes, u1, u2, url = two_tenants
    u1.call("network_create", {"owner": "t1", "access": "t1", "net_id": ""}, network="secret")
    # t2 learns nothing: not found (never "no access"), and it may make its own of that name
    expect(404, u2.call, "show_network", network="secret")
    expect(404, u2.call, "network_delete", network="secret")
    expect(404, u2.call, "list_network_attachments", network="secret")
    expect(404, u2.connect_network, nodes[1], "eth0", "secret")
    # naming t1's node with t1's network name answers as for a name nobody has
    for name in ("secret", "no-such-net"):
        assert expect(404, u2.connect_network, nodes[0], "eth0", name).msg == f"Network {name} does not exist."
    u2.call("network_create", {"owner": "t2", "access": "t2", "net_id": ""}, network="secret")
    # a name t1 already has is a duplicate for t1 only
    err = expect(409, u1.call, "network_create", {"owner": "t1", "access": "t1", "net_id": ""}, network="secret")
    assert "secret" in err.msg and netnames.PREFIX not in err.msg
    assert raw_get(url, "/network/secret", "u1")[1]["owner"] == "t1"
    assert raw_get(url, "/network/secret", "u2")[1]["owner"] == "t2"
    assert raw_get(url, "/networks", "u2") == (200, {})
    # d1's admin sees both, each under its upstream name, and names one by it
    status, listed = raw_get(url, "/networks", "boss")
    keys = {n["name"]: n["owner"] for n in Store(d1).snapshot().all("networks")}
    assert status == 200 and sorted(listed) == sorted(keys) and len(keys) == 2
    status, doc = raw_get(url, "/network/secret", "boss")
    assert status == 409 and all(k in doc["msg"] for k in keys)
    for key, owner in keys.items():
        assert raw_get(url, f"/network/{key}", "boss")[1]["owner"] == owner
        assert raw_get(url, f"/network/{key}", "u1")[0] == 404  # tenants know theirs by their own name only


def test_the_derived_instances_own_cli_network_still_works(tmp_path, start_serve):
    root, d1 = tmp_path / "root", tmp_path / "d1"
    s0 = root_world(root, start_serve)
    nodes = derived(d1, s0.url, 2)
    assert rhaas(d1, "network", "create", "net1", env=E1).returncode == 0
    assert rhaas(d1, "network", "create", "net1", env=E1).returncode == 2  # already there
    key = next(n["name"] for n in Store(d1).snapshot().all("networks"))
    assert key.startswith(netnames.PREFIX) and key in root_networks(root)
    proc = rhaas(d1, "network", "connect", nodes[0], "eth0", "net1", env=E1, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert attached_upstream(root, nodes[0]) == {"vlan/native": key}
    rows = json.loads(rhaas(d1, "network", "list", "--json", check=True).stdout)
    assert [(r["name"], r["upstream_name"], r["attached"]) for r in rows] == [("net1", key, {nodes[0]: ["eth0"]})]
    assert "net1" in rhaas(d1, "network", "list", check=True).stdout
    proc = rhaas(d1, "network", "detach", nodes[0], "eth0", "net1", env=E1, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert attached_upstream(root, nodes[0]) == {}
    assert rhaas(d1, "network", "delete", "net1", env=E1).returncode == 0
    assert key not in root_networks(root) and Store(d1).snapshot().all("networks") == []


def test_two_derived_instances_on_one_root_project_each_have_net1(tmp_path, start_serve):
    root, da, db = tmp_path / "root", tmp_path / "da", tmp_path / "db"
    s0 = root_world(root, start_serve)
    nodes_a, nodes_b = derived(da, s0.url, 2), derived(db, s0.url, 2)
    for home, nodes in ((da, nodes_a), (db, nodes_b)):
        assert rhaas(home, "network", "create", "net1", env=E1).returncode == 0
        proc = rhaas(home, "network", "connect", nodes[0], "eth0", "net1", env=E1, timeout=60)
        assert proc.returncode == 0, proc.stderr
    up_a, up_b = attached_upstream(root, nodes_a[0])["vlan/native"], attached_upstream(root, nodes_b[0])["vlan/native"]
    assert up_a != up_b and {up_a, up_b} <= set(root_networks(root))
    # one goes; the other stays attached at the root
    assert rhaas(da, "network", "detach", nodes_a[0], "eth0", "net1", env=E1, timeout=60).returncode == 0
    assert rhaas(da, "network", "delete", "net1", env=E1).returncode == 0
    assert up_a not in root_networks(root)
    assert attached_upstream(root, nodes_b[0]) == {"vlan/native": up_b}
    with pytest.raises(NotFoundError):
        HILClient(s0.url, "alice", "pw1").call("show_network", network=up_a)


def test_upstream_names_are_valid_and_one_to_one():
    from rhaas.protocol import valid_name

    pairs = [(None, "net1"), ("t1", "net1"), ("t2", "net1"), ("t1-x", "y"), ("t1", "x-y"), ("a", "-net1"),
             ("", "x"), ("t1", "n" * 200), ("p" * 200, "net1"), ("admin", "net1")]
    names = [netnames.upstream_name("0123abcd", p, n) for p, n in pairs]
    assert all(valid_name(n) and len(n) <= netnames.MAX_UPSTREAM_LEN for n in names)
    # admin-owned (None or "admin") is one scope; every other pair is its own name
    assert names[0] == names[-1]
    assert len(set(names[:-1])) == len(pairs) - 1
    assert netnames.upstream_name("0123abcd", "t1", "net1") != netnames.upstream_name("9999abcd", "t1", "net1")
