"""Images at scale, pipelined: nodes relay the image to each other as it arrives (``blob-chain``).

Real parts: the origin is rhaas's :class:`~rhaas.adapters.blobserver.BlobServer` on loopback
and its chain feeder; the nodes are the simulated farm, whose node scripts run in the host's
``/bin/sh`` with the host's ``busybox nc``/``tee`` as relays, each bound to its node's own
127.x address. The one fault is the farm's ``relay_dies`` (a node's relay passes half of the
stream on, then drops it: a node dying mid-chain).
"""

# ruff: noqa: F811  (the fixtures imported from farm_fixtures come back as parameters)
from __future__ import annotations

import hashlib
import ipaddress
import os
import threading
from pathlib import Path

import pytest
from farm_fixtures import _farm_process, client_key, farm_home, sim_farm  # noqa: F401
from test_images_http import (
    cached,
    helpers_of,
    kexec,
    kexec_seeing_listeners,
    listeners,
    shell_env,
)

pytestmark = pytest.mark.skipif(not Path("/usr/bin/busybox").exists() and not Path("/bin/busybox").exists(),
                                reason="needs busybox (Debian busybox-static) for the relays' nc")


@pytest.fixture
def image(tmp_path):
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(os.urandom(700_000))
    initrd.write_bytes(os.urandom(2_300_000))
    return kernel, initrd


def verified_everywhere(sim_farm, names, image) -> None:
    for n in names:
        for f in image:
            assert cached(sim_farm, n, hashlib.sha256(f.read_bytes()).hexdigest()) == f.read_bytes(), n
        # no stream, FIFO, status or PID file of the relay is left in the cache
        assert not [f for f in os.listdir(Path(sim_farm.node(n)["root"]) / "run/rhaas") if f.startswith(".")]


def test_the_chain_brings_the_image_to_every_node_once_from_the_origin(sim_farm, farm_home, rhaas_home, image,
                                                                       monkeypatch):
    monkeypatch.setenv("RHAAS_BLOB_CHAIN", "on")
    names = sim_farm.names[0:6]
    farm_home(rhaas_home, names)
    r, out, summary, seen = kexec_seeing_listeners(sim_farm, names, image)
    assert r.exit_code == 0, r.output
    size = sum(p.stat().st_size for p in image)
    assert {out[n]["outcome"] for n in names} == {"ok"}
    assert {out[n]["transfer"]["path"] for n in names} == {"chain"}, {n: out[n]["transfer"] for n in names}
    assert all(out[n]["transfer"]["bytes"] == size for n in names)
    assert summary["origin_bytes"] == size  # one chain: the origin sent the image once
    verified_everywhere(sim_farm, names, image)
    node_addrs = {ipaddress.ip_address(sim_farm.node(n)["ssh"].split("@")[1].rsplit(":", 1)[0]) for n in names}
    assert {ipaddress.ip_address(a) for a, _ in seen} & node_addrs, "no relay was seen listening"
    assert all(ipaddress.ip_address(a).is_loopback for a, _ in seen), seen
    assert not (listeners() & seen)
    assert helpers_of(sim_farm) == []
    assert not any(t.name.startswith("rhaas-blob") for t in threading.enumerate())


def test_a_node_dying_mid_chain_cuts_its_downstream_which_still_verifies(sim_farm, farm_home, rhaas_home, image,
                                                                         monkeypatch):
    monkeypatch.setenv("RHAAS_BLOB_CHAIN", "on")
    names = sim_farm.names[6:11]
    farm_home(rhaas_home, names)
    sim_farm.set_faults({names[1]: ["relay_dies"]})
    r, out, _ = kexec(names, image)
    assert r.exit_code == 0, r.output
    assert {out[n]["outcome"] for n in names} == {"ok"}
    paths = {n: out[n]["transfer"]["path"] for n in names}
    # the head got it all; the dying node and everyone after it found their streams cut and
    # pulled over HTTP (from the origin or a peer that holds it)
    assert paths[names[0]] == "chain", out
    for n in names[1:]:
        assert paths[n] in ("origin", "peer"), out
        assert any(d.startswith("chain: ") for d in out[n]["transfer"]["dropped"]), out[n]
    cut = [d for n in names[2:] for d in out[n]["transfer"]["dropped"]]
    assert any("sha256 mismatch" in d for d in cut), cut  # truncation caught by the digest
    verified_everywhere(sim_farm, names, image)
    assert helpers_of(sim_farm) == []


def test_a_small_image_does_not_chain_unless_asked(sim_farm, farm_home, rhaas_home, image):
    names = sim_farm.names[11:14]
    farm_home(rhaas_home, names)
    r, out, _ = kexec(names, image)  # blob-chain auto: 3 MB is below the threshold
    assert r.exit_code == 0, r.output
    assert {out[n]["transfer"]["path"] for n in names} <= {"origin", "peer"}
    assert helpers_of(sim_farm) == []


def test_a_node_that_cannot_relay_pulls_over_http(sim_farm, farm_home, rhaas_home, image, monkeypatch):
    """A relay port already taken on one node: that node's relay does not listen, it says so and
    pulls over HTTP; the chain goes on without it."""
    import socket

    monkeypatch.setenv("RHAAS_BLOB_CHAIN", "on")
    names = sim_farm.names[14:17]
    farm_home(rhaas_home, names)
    addr = sim_farm.node(names[2])["ssh"].split("@")[1].rsplit(":", 1)[0]
    taken = []
    for port in range(30000, 39000):  # every port the run may pick for this node
        s = socket.socket()
        try:
            s.bind((addr, port))
            s.listen(1)
            taken.append(s)
        except OSError:
            s.close()
    try:
        r, out, _ = kexec(names, image)
    finally:
        for s in taken:
            s.close()
    assert r.exit_code == 0, r.output
    assert {out[n]["outcome"] for n in names} == {"ok"}
    assert out[names[2]]["transfer"]["path"] in ("origin", "peer")
    assert any("cannot relay" in d for d in out[names[2]]["transfer"].get("dropped", [])), out[names[2]]["transfer"]
    assert {out[n]["transfer"]["path"] for n in names[:2]} == {"chain"}
    verified_everywhere(sim_farm, names, image)
    assert helpers_of(sim_farm) == []


def test_bad_blob_chain_setting_is_a_usage_error(sim_farm, farm_home, rhaas_home, image, monkeypatch):
    names = sim_farm.names[17:18]
    farm_home(rhaas_home, names)
    monkeypatch.setenv("RHAAS_BLOB_CHAIN", "sometimes")
    before = sim_farm.state(names[0])["boot_id"]
    r, out, _ = kexec(names, image)
    assert r.exit_code == 2 and out == {}
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    assert sim_farm.state(names[0])["boot_id"] == before


@pytest.mark.parametrize("case,hasher", [("good", "openssl"), ("stray", "openssl"), ("unwanted", "openssl"),
                                         ("wrong_bytes", "openssl"), ("truncated", "openssl"),
                                         ("good", "sha256sum"), ("wrong_bytes", "sha256sum")])
def test_a_relay_keeps_only_wanted_blobs_whose_bytes_match_their_name(tmp_path, case, hasher):
    """The relay script itself, in a real shell with busybox nc on loopback: whatever connects,
    only a blob the node was told over SSH to want, with the bytes its name says, gets a cache
    name; then nothing of the relay is left running or listening."""
    import socket
    import subprocess
    import time

    from rhaas.core.kexec.commands import Commands
    from rhaas.core.kexec.relay import CHAIN_WAIT_SCRIPT, Relay

    cache = tmp_path / "cache"
    good, other = os.urandom(50_000), os.urandom(30_000)
    sha_good, sha_other = (hashlib.sha256(b).hexdigest() for b in (good, other))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    relay = Relay(str(cache), "testrun01", "T" * 24, "127.0.0.1", port, 30, [sha_good])
    env = shell_env(tmp_path, hasher)  # openssl verifies, or (a busybox-only node) sha256sum
    armed = subprocess.run(["sh", "-c", Commands.arm_relay(relay)], capture_output=True, text=True, timeout=20,
                           check=False, env=env)
    assert "rhaas:armed" in armed.stdout, armed
    token, name, body = "T" * 24, sha_good, good
    if case == "stray":
        token = "not-the-token-of-this-run"
    elif case == "unwanted":
        name, body = sha_other, other
    elif case == "wrong_bytes":
        body = other + good[: len(good) - len(other)]
    elif case == "truncated":
        body = good[: len(good) // 2]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(f"{token}\n\n{name}:{len(good)}\n".encode() + body)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            while sock.recv(4096):
                pass
        except (ConnectionResetError, BrokenPipeError):
            assert case in ("stray", "unwanted")  # the relay stopped reading at the header
    said = subprocess.run(["sh", "-c", CHAIN_WAIT_SCRIPT, "rhaas-chain-wait", relay.prefix, "10", "5"],
                          capture_output=True, text=True, timeout=30, check=False, env=env).stdout
    status = [ln for ln in said.splitlines() if ln.startswith("rhaas:chain ")]
    expect = {"good": "ok", "stray": "bad wrong token", "unwanted": "bad a blob this node does not want",
              "wrong_bytes": "bad sha256 mismatch", "truncated": "bad sha256 mismatch"}[case]
    assert status and status[0].startswith(f"rhaas:chain {expect}"), said
    held = sorted(p.name for p in cache.iterdir())
    assert held == ([sha_good] if case == "good" else []), held
    if case == "good":
        assert (cache / sha_good).read_bytes() == good
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_running(relay.prefix) or ("127.0.0.1", port) in listeners()):
        time.sleep(0.05)
    assert not _running(relay.prefix)
    assert ("127.0.0.1", port) not in listeners()


def _running(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found
