"""The ``rhaas.kexec`` extension of `rhaas serve`, on the simulated farm (real SSH, real serve processes).

Three levels as separate processes: the root has the farm nodes registered (and the SSH
access), the middle leases them from the root and serves, the top leases from the middle and
runs ``rhaas kexec``; the kexec passes down to the root, which does it once per node with the
top's keys and its own in the overlay. Then the isolation and input checks of every route.
"""

# ruff: noqa: F811  (fixtures imported from the fixture modules come back as parameters)
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from farm_fixtures import client_key, install_client_key, sim_farm  # noqa: F401
from worlds import make_root, rhaas, wait_for, within

from rhaas.adapters.hil import HILClient
from rhaas.core.overlay import overlay_files
from rhaas.errors import APIError
from rhaas.model import new_node
from rhaas.sim.farm import launch
from rhaas.store import Store

N = 50
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherTenantOtherTenantOtherTenantOther0 eve@elsewhere"
ALICE_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAliceAtTheRootAliceAtTheRootAliceAtTheR0 alice@root"


@pytest.fixture(scope="module")
def _farm_process(tmp_path_factory, client_key):
    """This module's own farm: enough nodes for a 50-node lease and the isolation test."""
    d = tmp_path_factory.mktemp("farm")
    keys = d / "authorized_keys"
    keys.write_text(client_key[1] + "\n")
    farm = launch(d / "farm", N + 4, keys, down_time=0.3, log_commands=True, timeout=60)
    yield farm
    farm.stop()


@pytest.fixture
def image_files(tmp_path):
    from rhaas.core.overlay import S_IFDIR, S_IFREG, CpioEntry, write_newc

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(48 * 1024))
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(gzip.compress(write_newc([CpioEntry("etc", S_IFDIR | 0o755),
                                                 CpioEntry("etc/rhaas-image", S_IFREG | 0o644, b"svc\n")]), mtime=0))
    return kernel, initrd


def farm_nodes(farm, names, **fields):
    return [new_node(n, "registered", ssh=farm.node(n)["ssh"], ssh_host_key=farm.node(n)["host_key"], **fields)
            for n in names]


def set_user_keys(home, user, keys):
    store = Store(home)
    with store.transaction("test") as tx:
        tx.put("users", dict(tx.get("users", user), ssh_keys=list(keys)))


def authorized_keys_booted(farm, name: str, since: int) -> list[str]:
    """The authorized_keys in the initrd of the node's kexec (one initrd for all commands after ``since``)."""
    loads = [c for n, c in farm.commands()[since:] if n == name and "kexec -l" in c]
    paths = {re.search(r"--initrd=(/run/rhaas/[0-9a-f]{64})", c).group(1) for c in loads}
    assert len(paths) == 1, loads
    path = paths.pop()
    blob = (Path(farm.node(name)["root"]) / path.lstrip("/")).read_bytes()
    return overlay_files(blob)["/root/.ssh/authorized_keys"].decode().split("\n")[:-1]


def test_kexec_at_the_top_passes_down_to_the_level_with_ssh(tmp_path, start_serve, sim_farm, client_key,
                                                             image_files):
    root, mid, top = tmp_path / "root", tmp_path / "mid", tmp_path / "top"
    names = sim_farm.names[:N]
    make_root(root, nodes=farm_nodes(sim_farm, names),
              users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",)), ("eve", "pwe", False, ("px",))),
              projects=("p1", "px"))
    install_client_key(root, client_key)  # the root holds the farm's SSH access
    set_user_keys(root, "alice", [ALICE_KEY])
    set_user_keys(root, "eve", [OTHER_KEY])
    s0 = start_serve(root)
    e1, e2 = {"RHAAS_UPSTREAM_PASSWORD": "pw1"}, {"RHAAS_UPSTREAM_PASSWORD": "pw2"}
    rhaas(mid, "init", "--upstream", s0.url, "--project", "p1", "--user", "alice", env=e1, check=True)
    rhaas(mid, "lease", str(N), env=e1, check=True, timeout=300)
    rhaas(mid, "project", "add", "p2", check=True)
    rhaas(mid, "user", "add", "bob", "--project", "p2", "--password-stdin", input="pw2\n", check=True)
    s1 = start_serve(mid)
    rhaas(top, "init", "--upstream", s1.url, "--project", "p2", "--user", "bob", env=e2, check=True)
    rhaas(top, "lease", str(N), env=e2, check=True, timeout=300)
    top_names = sorted(json.loads(rhaas(top, "list", "--json").stdout), key=lambda d: d["name"])
    assert len(top_names) == N
    rhaas(top, "image", "add", "svc", "--kernel", image_files[0], "--initrd", image_files[1],
          "--append", "console=ttyS0 quiet", check=True)

    before = sim_farm.states(names)
    mark = len(sim_farm.commands())
    proc = rhaas(top, "kexec", *[d["name"] for d in top_names], "--image", "svc", "--json", env=e2, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = {r["node"]: r for r in json.loads(proc.stdout)}
    assert len(out) == N and all(r["outcome"] == "ok" for r in out.values()), proc.stdout[:2000]

    # it went down the levels: the top and the middle never ran a command on a node
    top_key = (top / "id_ed25519.pub").read_text().strip()
    assert top_key != client_key[1].strip()
    after = sim_farm.states(names)
    top_store = Store(top).snapshot()
    for d in top_names:
        farm_name = top_store.node(d["name"])["upstream_name"]
        farm_name = Store(mid).snapshot().node(farm_name).get("upstream_name") or farm_name
        r, state = out[d["name"]], after[farm_name]
        # exactly one kexec per node, counted by the farm
        assert state["boots"] == before[farm_name]["boots"] + 1, farm_name
        # verified by boot id and nonce, and recorded at the top
        assert r["boot_id"] == state["boot_id"] != before[farm_name]["boot_id"]
        assert f"rhaas.nonce={r['nonce']}" in state["cmdline"].split()
        assert "quiet" in state["cmdline"].split()
        doc = top_store.node(d["name"])
        assert doc["status"] == "ready" and doc["boot_id"] == state["boot_id"] and doc["image"] == "svc"
        # the top tenant's key and the serving level's key, nobody else's
        keys = authorized_keys_booted(sim_farm, farm_name, mark)
        assert sorted(keys) == sorted([top_key, client_key[1].strip()]), keys
        assert OTHER_KEY not in keys and ALICE_KEY not in keys
    # one action at each serving level, each closed
    for home in (mid, root):
        actions = list(Store(home).snapshot().data["kexec_actions"].values())
        assert [a["status"] for a in actions] == ["DONE"], home


def test_kexec_routes_isolate_projects_and_refuse_bad_input(tmp_path, start_serve, sim_farm, client_key,
                                                            image_files):
    root = tmp_path / "root"
    mine, theirs = sim_farm.names[N], sim_farm.names[N + 1]
    make_root(root, nodes=farm_nodes(sim_farm, [mine], project="p1") + farm_nodes(sim_farm, [theirs], project="p2"),
              users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",)), ("eve", "pw2", False, ("p2",))),
              projects=("p1", "p2"))
    install_client_key(root, client_key)
    served = start_serve(root)
    alice = HILClient(served.url, "alice", "pw1", timeout=30)
    eve = HILClient(served.url, "eve", "pw2", timeout=30)
    kernel, initrd = (str(p) for p in image_files)
    ksha, isha = (hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (kernel, initrd))
    assert "rhaas.kexec" in alice.active_extensions()

    # blobs: bytes that do not hash to the announced sha256 are refused, and nothing is kept
    with pytest.raises(APIError) as bad:
        alice.blob_upload(isha, kernel)
    assert bad.value.status == 400
    assert not alice.blob_held(isha) and not (root / "blobs" / isha).exists()
    assert alice.blob_upload(ksha, kernel) == os.path.getsize(kernel)
    alice.blob_upload(isha, initrd)
    assert alice.blob_held(ksha) and alice.blob_held(isha)
    assert not eve.blob_held(ksha)  # another project's blob does not exist for eve

    key = client_key[1].strip()
    boots = sim_farm.state(mine)["boots"]
    refused = [
        # a kernel argument carrying a newline (or another control character)
        (alice, {"nodes": [mine], "append": "console=ttyS0\ninit=/bin/sh"}, 400),
        (alice, {"nodes": [mine], "append": "quiet\x1b[2J"}, 400),
        # an SSH key that would add a second line to authorized_keys
        (alice, {"nodes": [mine], "ssh_keys": [key + "\nssh-ed25519 AAAA evil"]}, 400),
        # an unknown blob: refused before any node is touched
        (alice, {"nodes": [mine], "kernel": "0" * 64}, 409),
        # nodes the caller does not hold, held by another project or by none
        (alice, {"nodes": [theirs]}, 404),
        (eve, {"nodes": [mine]}, 404),
        (alice, {"nodes": ["no-such-node"]}, 404),
    ]
    for client, override, status in refused:
        args = {"nodes": [mine], "kernel": ksha, "initrd": isha, "append": "console=ttyS0", "ssh_keys": [key]}
        args.update(override)
        with pytest.raises(APIError) as err:
            client.kexec_start(args["nodes"], args["kernel"], args["initrd"], args["append"], args["ssh_keys"])
        assert err.value.status == status, (override, err.value)
    assert sim_farm.state(mine)["boots"] == boots  # nothing reached the node

    # alice's own kexec runs in the background; only her project can read the action
    action = within(30, alice.kexec_start, [mine], ksha, isha, "console=ttyS0", [key], timeout=60)
    for c in (eve,):
        with pytest.raises(APIError) as err:
            c.kexec_status(action)
        assert err.value.status in (403, 404)
    wait_for(lambda: alice.kexec_status(action)["status"] != "PENDING", timeout=120, interval=0.2,
             what="the kexec action to finish")
    doc = alice.kexec_status(action)
    assert doc["status"] == "DONE", doc
    state = sim_farm.state(mine)
    assert doc["nodes"][mine]["boot_id"] == state["boot_id"] and state["boots"] == boots + 1
    assert f"rhaas.nonce={doc['nodes'][mine]['nonce']}" in state["cmdline"].split()
    with pytest.raises(APIError) as err:
        eve.kexec_status(action)
    assert err.value.status in (403, 404)
    # the record outlives the run in the store, readable by its project only
    assert Store(root).snapshot().data["kexec_actions"]


@pytest.fixture
def blob_site(tmp_path):
    """A plain HTTP file server on loopback (the standard library's), serving ``tmp_path/site``."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}/blobs"
    server.shutdown()
    server.server_close()


def test_blobs_fetched_from_a_url_are_verified_per_project(tmp_path, start_serve, sim_farm, client_key,
                                                           image_files, blob_site):
    import http.client

    root = tmp_path / "root"
    mine, theirs = sim_farm.names[N + 2], sim_farm.names[N + 3]
    make_root(root, nodes=farm_nodes(sim_farm, [mine], project="p1") + farm_nodes(sim_farm, [theirs], project="p2"),
              users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",)), ("eve", "pw2", False, ("p2",))),
              projects=("p1", "p2"))
    install_client_key(root, client_key)
    served = start_serve(root)
    alice = HILClient(served.url, "alice", "pw1", timeout=30)
    eve = HILClient(served.url, "eve", "pw2", timeout=30)
    site, url = blob_site
    (site / "blobs").mkdir()
    shas = []
    for p in image_files:
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        (site / "blobs" / sha).write_bytes(p.read_bytes())
        shas.append(sha)
    key = client_key[1].strip()

    # fetched by the serving instance, verified, then used
    action = alice.kexec_start([mine], shas[0], shas[1], "console=ttyS0", [key], timeout=60, blob_url=url)
    wait_for(lambda: alice.kexec_status(action)["status"] != "PENDING", timeout=120, interval=0.2,
             what="the kexec action to finish")
    assert alice.kexec_status(action)["status"] == "DONE"
    assert alice.blob_held(shas[0]) and not eve.blob_held(shas[0])

    # eve names alice's blobs with a URL that serves other bytes: the fetch is checked, her node untouched
    for sha in shas:
        (site / "blobs" / sha).write_bytes(b"not the kernel")
    boots = sim_farm.state(theirs)["boots"]
    action = eve.kexec_start([theirs], shas[0], shas[1], "console=ttyS0", [key], timeout=60, blob_url=url)
    wait_for(lambda: eve.kexec_status(action)["status"] != "PENDING", timeout=60, interval=0.2,
             what="the kexec action to finish")
    doc = eve.kexec_status(action)
    assert doc["status"] == "ERROR" and "do not match" in doc["nodes"][theirs]["reason"], doc
    assert sim_farm.state(theirs)["boots"] == boots and not eve.blob_held(shas[0])

    # an upload without credentials is refused before its body is read
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.request("PUT", f"/v0/rhaas/blob/{shas[0]}/part/0", body=b"x" * 10, headers={"Content-Length": "10"})
    resp = conn.getresponse()
    assert resp.status == 401 and json.loads(resp.read())["type"] == "AuthorizationError"
    conn.close()


def test_a_blob_larger_than_one_part_goes_up_in_order_and_is_checked_whole(tmp_path, start_serve):
    """An upload is a series of parts of at most protocol.BLOB_PART bytes, then a commit."""
    from rhaas import protocol

    root = tmp_path / "root"
    make_root(root, users=(("alice", "pw1", False, ("p1",)), ("eve", "pw2", False, ("p2",))), projects=("p1", "p2"))
    served = start_serve(root)
    alice = HILClient(served.url, "alice", "pw1", timeout=30)
    eve = HILClient(served.url, "eve", "pw2", timeout=30)
    big = tmp_path / "initrd"
    big.write_bytes(os.urandom(protocol.BLOB_PART * 2 + 12345))
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    assert alice.blob_upload(sha, str(big)) == big.stat().st_size
    assert alice.blob_held(sha) and (root / "blobs" / sha).read_bytes() == big.read_bytes()
    assert not list((root / "blobs").glob(".part-*"))  # the partial file became the blob

    # a part out of order is refused with what is held; eve's parts never mix with alice's
    part = big.read_bytes()[: protocol.BLOB_PART]
    other = hashlib.sha256(b"other").hexdigest()
    assert alice.call_raw("rhaas_blob_part", part, sha256=other, offset="0")["received"] == len(part)
    with pytest.raises(APIError) as gap:
        alice.call_raw("rhaas_blob_part", part, sha256=other, offset=str(2 * len(part)))
    assert gap.value.status == 409 and f"holds {len(part)} bytes" in gap.value.msg
    with pytest.raises(APIError) as foreign:
        eve.call("rhaas_blob_commit", {"size": len(part)}, sha256=other)
    assert foreign.value.status == 409
    # a commit whose bytes do not hash to the name is refused and leaves nothing behind
    with pytest.raises(APIError) as wrong:
        alice.call("rhaas_blob_commit", {"size": len(part)}, sha256=other)
    assert wrong.value.status == 400 and not (root / "blobs" / other).exists()
    assert not alice.blob_held(other)
    # a part announced larger than BLOB_PART is refused from its headers, before any body is taken
    import base64
    import socket

    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        auth = base64.b64encode(b"alice:pw1").decode()
        sock.sendall(f"PUT /v0/rhaas/blob/{other}/part/0 HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n"
                     f"Content-Length: {protocol.BLOB_PART + 1}\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):  # the server closes after its answer (Connection: close)
            answer += chunk
        head = answer.decode(errors="replace")
    assert head.startswith("HTTP/1.1 413 ") and '"type": "ValidationError"' in head
    assert not list((root / "blobs").glob(".part-*"))
