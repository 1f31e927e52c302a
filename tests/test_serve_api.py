"""`rhaas serve` speaks HIL's v0 API as shared/hil-api.md describes it (real server on loopback)."""

from __future__ import annotations

import base64
import http.client
import json

import pytest
from worlds import make_root, plain_node

USERS = (
    ("admin", "adminpw", True, ()),
    ("alice", "alicepw", False, ("proj1",)),
    ("bob", "bobpw", False, ("proj2",)),
)


@pytest.fixture
def hil(rhaas_home, start_serve):
    make_root(rhaas_home, nodes=[plain_node(i) for i in range(1, 5)], users=USERS, projects=("proj1", "proj2"))
    served = start_serve(rhaas_home)
    return Raw(served.port)


class Raw:
    """A bare HTTP client so tests control bodies, headers and credentials exactly."""

    def __init__(self, port):
        self.port = port

    def __call__(self, method, path, body=None, user="admin", password=None, content_type="application/json"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {}
        if user:
            pw = password if password is not None else {"admin": "adminpw", "alice": "alicepw", "bob": "bobpw"}.get(user, "x")
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        if body is not None:
            if not isinstance(body, (bytes, str)):
                body = json.dumps(body)
            if content_type:
                headers["Content-Type"] = content_type
        conn.request(method, "/v0" + path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        doc = json.loads(data) if data.strip() else None
        return resp.status, doc, resp


def test_e1_lease_race_and_project_isolation(hil):
    assert hil("GET", "/nodes/free", user="alice")[:2] == (200, ["node-01", "node-02", "node-03", "node-04"])
    assert hil("POST", "/project/proj1/connect_node", {"node": "node-01"}, user="alice")[:2] == (200, None)
    status, doc, _ = hil("POST", "/project/proj1/connect_node", {"node": "node-01"}, user="alice")
    assert (status, doc["type"]) == (409, "BlockedError") and "already owned" in doc["msg"]
    status, doc, _ = hil("POST", "/project/proj2/connect_node", {"node": "node-02"}, user="alice")
    assert (status, doc["type"], doc["msg"]) == (401, "AuthorizationError", "You do not have access to the required project.")
    # bob (proj2) cannot see alice's node, but sees free ones
    assert hil("GET", "/node/node-01", user="bob")[0] == 401
    assert hil("GET", "/node/node-02", user="bob")[0] == 200
    assert hil("GET", "/project/proj1/nodes", user="bob")[0] == 401
    assert hil("GET", "/project/proj1/nodes", user="alice")[:2] == (200, ["node-01"])
    assert hil("GET", "/nodes/free", user="bob")[1] == ["node-02", "node-03", "node-04"]
    assert hil("GET", "/nodes/all", user="bob")[1] == ["node-01", "node-02", "node-03", "node-04"]


def test_e2_node_shape_and_double_encoded_metadata(hil):
    status, doc, resp = hil("GET", "/node/node-01", user="alice")
    assert status == 200 and resp.getheader("Content-Type") == "application/json"
    assert set(doc) == {"metadata", "name", "nics", "project"}
    assert doc["project"] is None and doc["name"] == "node-01"
    assert doc["metadata"]["rack"] == '"r1"'
    assert json.loads(doc["metadata"]["rhaas.ssh"]) == "root@127.0.0.1:22"
    assert doc["nics"] == [{"label": "eth0", "macaddr": "52:54:00:00:00:01", "networks": {}}]
    assert hil("PUT", "/node/node-01/metadata/rack", {"value": {"a": [1, 2]}})[0] == 200
    assert json.loads(hil("GET", "/node/node-01")[1]["metadata"]["rack"]) == {"a": [1, 2]}
    status, doc, _ = hil("GET", "/node/nope")
    assert (status, doc) == (404, {"type": "NotFoundError", "msg": "Node nope does not exist."})


def test_e3_e4_networks_are_asynchronous(hil):
    hil("POST", "/project/proj1/connect_node", {"node": "node-01"}, user="alice")
    assert hil("PUT", "/network/net1", {"owner": "proj1", "access": "proj1", "net_id": ""}, user="alice")[:2] == (200, None)
    status, net, _ = hil("GET", "/network/net1", user="alice")
    assert status == 200 and net["access"] == ["proj1"] and net["owner"] == "proj1"
    assert net["channels"][0] == "vlan/native" and net["channels"][1].startswith("vlan/")
    assert hil("GET", "/network/net1", user="bob")[0] == 401
    status, doc, _ = hil("POST", "/node/node-01/nic/eth0/connect_network", {"network": "net1"}, user="alice")
    assert status == 202 and set(doc) == {"status_id"}
    status, act, _ = hil("GET", f"/networking_action/{doc['status_id']}", user="alice")
    assert status == 200 and act["status"] == "DONE" and act["new_network"] == "net1" and act["type"] == "modify_port"
    assert hil("GET", "/node/node-01", user="alice")[1]["nics"][0]["networks"] == {"vlan/native": "net1"}
    status, doc, _ = hil("POST", "/node/node-01/nic/eth0/connect_network", {"network": "net1"}, user="alice")
    assert (status, doc["msg"]) == (409, "The network is already attached to the nic.")
    status, doc, _ = hil("POST", "/node/node-01/nic/eth0/connect_network", {"network": "net1", "channel": "vlan/9"}, user="alice")
    assert status == 409  # already attached wins over the channel check, as in HIL
    assert hil("PUT", "/network/pub", {"owner": "admin", "access": "", "net_id": "3000"})[0] == 200
    status, doc, _ = hil("POST", "/node/node-01/nic/eth0/connect_network", {"network": "pub", "channel": "vlan/7"}, user="alice")
    assert (status, doc["type"]) == (400, "BadArgumentError")
    status, doc, _ = hil("POST", "/node/node-01/nic/eth0/connect_network", {"network": "pub", "channel": ""}, user="alice")
    assert (status, doc["type"]) == (400, "BadArgumentError") and "Channel ''" in doc["msg"]  # as real HIL
    assert hil("POST", "/node/node-01/nic/eth0/connect_network", {"network": "pub", "channel": "vlan/3000"}, user="alice")[0] == 202
    assert hil("GET", "/networks", user="alice")[1] == {"pub": {"network_id": "3000", "projects": None}}
    assert set(hil("GET", "/networks")[1]) == {"net1", "pub"}
    assert hil("GET", "/project/proj1/networks", user="alice")[1] == ["net1"]


def test_e5_e6_power_needs_obm(hil):
    hil("POST", "/project/proj1/connect_node", {"node": "node-01"}, user="alice")
    status, doc, _ = hil("POST", "/node/node-01/power_cycle", {"force": True}, user="alice")
    assert (status, doc) == (409, {"type": "BlockedError", "msg": "OBM is not enabled"})
    assert hil("PUT", "/node/node-01/obm", {"enabled": True}, user="alice")[:2] == (200, None)
    # node-01 has no BMC here, so the power call reaches the backend and fails as HIL's OBMError would
    status, doc, _ = hil("POST", "/node/node-01/power_cycle", {"force": True}, user="alice")
    assert status == 500 and doc["type"] == "OBMError" and "no power backend" in doc["msg"]
    status, doc, _ = hil("PUT", "/node/node-01/boot_device", {"bootdev": "floppy"}, user="alice")
    assert (status, doc["type"]) == (400, "BadArgumentError")
    assert hil("PUT", "/node/node-02/obm", {"enabled": True}, user="alice")[0] == 401  # free node: admin only


def test_e7_release_order(hil):
    hil("POST", "/project/proj1/connect_node", {"node": "node-01"}, user="alice")
    hil("PUT", "/network/net1", {"owner": "proj1", "access": "proj1", "net_id": ""}, user="alice")
    hil("POST", "/node/node-01/nic/eth0/connect_network", {"network": "net1"}, user="alice")
    hil("PUT", "/node/node-01/obm", {"enabled": True}, user="alice")
    detach = lambda: hil("POST", "/project/proj1/detach_node", {"node": "node-01"}, user="alice")
    assert detach()[1] == {"type": "BlockedError", "msg": "Node's obm is enabled."}
    assert hil("POST", "/node/node-01/nic/eth0/detach_network", {"network": "net1"}, user="alice")[0] == 202
    status, doc, _ = hil("POST", "/node/node-01/nic/eth0/detach_network", {"network": "net1"}, user="alice")
    assert (status, doc["type"], doc["msg"]) == (400, "BadArgumentError", "The network is not attached to the nic.")
    assert detach()[1]["msg"] == "Node's obm is enabled."  # OBM is checked first
    hil("PUT", "/node/node-01/obm", {"enabled": False}, user="alice")
    assert detach()[:2] == (200, None)
    assert hil("DELETE", "/network/net1", user="alice")[:2] == (200, None)
    assert "node-01" in hil("GET", "/nodes/free", user="alice")[1]
    status, doc, _ = detach()
    assert (status, doc["msg"]) == (404, "Node not in project")


def test_e8_authentication_outcomes(hil):
    assert hil("GET", "/projects", password="wrong") [:2] == (
        401, {"type": "AuthorizationError", "msg": "Authentication failed. Authentication is required to use this service."})
    status, doc, resp = hil("GET", "/projects", user="nobody")
    assert (status, doc) == (404, {"type": "NotFoundError", "msg": "User nobody does not exist."})
    status, doc, resp = hil("GET", "/projects", user=None)
    assert status == 401 and resp.getheader("WWW-Authenticate") is None
    assert hil("GET", "/projects", user="alice")[1] == {"type": "AuthorizationError", "msg": "This operation is administrator-only."}
    assert hil("GET", "/projects")[:2] == (200, ["proj1", "proj2"])


def test_e9_request_format_errors(hil):
    form = hil("PUT", "/node/x", b"obmd=1", content_type="application/x-www-form-urlencoded")
    assert form[0] == 400 and form[1]["type"] == "ValidationError"  # a form body is no JSON object
    assert hil("PUT", "/project/x", b"{oops")[1] == {"type": "ValidationError", "msg": "The request body is not valid JSON"}
    assert hil("GET", "/projects", b"{}")[1] == {"type": "ValidationError", "msg": "GET request made with a non-empty request body"}
    assert hil("POST", "/projects")[0] == 405
    assert hil("GET", "/no/such/thing")[0] == 404
    assert hil("POST", "/project/proj1/connect_node", {"node": "node-01", "extra": 1}, user="alice")[0] == 400
    assert hil("POST", "/project/proj1/connect_node", {}, user="alice")[0] == 400
    assert hil("POST", "/node/node-01/power_cycle", {"force": "yes"})[0] == 400
    assert hil("POST", "/project/proj1/connect_node", b"[1, 2]", user="alice")[0] == 400
    # validation comes before authentication
    assert hil("PUT", "/project/x", b"{oops", password="wrong")[0] == 400
    assert hil("GET", "/network/net1/attachments?project=", user="alice")[1]["msg"] == "Empty parameter specified"
    # a JSON body is read whatever the Content-Type (more lenient than HIL)
    assert hil("PUT", "/project/p9", b"", content_type="text/plain")[0] == 200


def test_e10_admin_inventory_calls(hil):
    body = {"obmd": {"uri": "http://127.0.0.1:8800/node/node-09", "admin_token": "0123"}, "metadata": {"rack": "r2"}}
    assert hil("PUT", "/node/node-09", body)[:2] == (200, None)
    assert hil("PUT", "/node/node-09", body)[1] == {"type": "DuplicateError", "msg": "Node node-09 already exists."}
    assert hil("PUT", "/node/node-10", {"obmd": {"uri": "ftp://x", "admin_token": "1"}})[0] == 400
    assert hil("PUT", "/node/node-10", {"obmd": {"uri": "http://x", "admin_token": "1", "more": 1}})[0] == 400
    assert hil("PUT", "/node/node-09/nic/eth0", {"macaddr": "52:54:00:00:00:09"})[0] == 200
    status, doc, _ = hil("DELETE", "/node/node-09")
    assert status == 409 and "has nics" in doc["msg"]
    assert hil("DELETE", "/node/node-09/nic/eth0")[0] == 200
    assert hil("DELETE", "/node/node-09")[0] == 200
    assert hil("PUT", "/node/node-11", {"metadata": {}}, user="alice")[0] == 401


def test_users_api(hil):
    assert hil("PUT", "/auth/basic/user/carol", {"password": "c", "is_admin": False})[0] == 200
    assert hil("PUT", "/auth/basic/user/carol", {"password": "c"})[1]["msg"] == "User carol already exists."
    assert hil("POST", "/auth/basic/user/carol/add_project", {"project": "proj1"})[0] == 200
    assert hil("POST", "/auth/basic/user/carol/add_project", {"project": "proj1"})[0] == 409
    assert hil("GET", "/project/proj1/nodes", user="carol", password="c")[0] == 200
    assert hil("GET", "/auth/basic/users")[1]["carol"] == {"is_admin": False, "projects": ["proj1"]}
    assert hil("PATCH", "/auth/basic/user/admin", {"is_admin": False})[1]["type"] == "IllegalStateError"
    assert hil("POST", "/auth/basic/user/carol/remove_project", {"project": "proj1"})[0] == 200
    assert hil("GET", "/project/proj1/nodes", user="carol", password="c")[0] == 401
    assert hil("DELETE", "/auth/basic/user/carol")[0] == 200
    assert hil("GET", "/project/proj1/nodes", user="carol", password="c")[0] == 404


def test_client_against_serve(hil, rhaas_home):
    """The HIL client rhaas uses reads serve's answers the way it reads real HIL."""
    from rhaas.adapters.hil import HILClient
    from rhaas.errors import AuthorizationError, BlockedError, NotFoundError

    c = HILClient(f"http://127.0.0.1:{hil.port}", "alice", "alicepw", timeout=5)
    assert c.free_nodes() == ["node-01", "node-02", "node-03", "node-04"]
    c.connect_node("proj1", "node-03")
    with pytest.raises(BlockedError):
        c.connect_node("proj1", "node-03")
    assert c.show_node("node-03")["metadata"] == {"rack": "r1", "rhaas.ssh": "root@127.0.0.3:22"}
    with pytest.raises(NotFoundError):
        c.show_node("ghost")
    bad = HILClient(f"http://127.0.0.1:{hil.port}", "alice", "nope", timeout=5)
    with pytest.raises(AuthorizationError):
        bad.free_nodes()
    nobody = HILClient(f"http://127.0.0.1:{hil.port}", "nobody", "x", timeout=5)
    with pytest.raises(AuthorizationError):  # HIL's 404 for an unknown user is an auth failure
        nobody.free_nodes()
