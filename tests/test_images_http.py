"""Images at scale: the run's origin over HTTP, nodes pulling and verifying, peers serving peers.

Real parts: the origin is rhaas's :class:`~rhaas.adapters.blobserver.BlobServer` on loopback,
the nodes are the simulated farm, whose node scripts run in the host's ``/bin/sh`` with the
host's curl and ``busybox httpd`` (each peer bound to its node's own 127.x address). Faults
come from the farm: a peer serving other bytes, a peer dying mid-transfer, a node without an
HTTP client.
"""

# ruff: noqa: F811  (the fixtures imported from farm_fixtures come back as parameters)
from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from farm_fixtures import _farm_process, client_key, farm_home, sim_farm  # noqa: F401

from rhaas.adapters.blobserver import PREFIX, BlobServer
from rhaas.cli import cli

pytestmark = pytest.mark.skipif(not Path("/usr/bin/busybox").exists() and not Path("/bin/busybox").exists(),
                                reason="needs busybox (Debian busybox-static) for the peers' httpd")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def image(tmp_path):
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(os.urandom(300_000))
    initrd.write_bytes(os.urandom(900_000))
    return kernel, initrd


def kexec(names, image, *extra):
    kernel, initrd = image
    r = run("kexec", *names, "--kernel", kernel, "--initrd", initrd, "--timeout", "20", "--no-fallback", "--json",
            *extra)
    out = {d["node"]: d for d in json.loads(r.stdout)} if r.stdout.strip() else {}
    summary = [json.loads(ln)["rhaas_kexec_transfer"] for ln in r.stderr.splitlines() if "rhaas_kexec_transfer" in ln]
    return r, out, summary[0] if summary else None


def cached(sim_farm, name: str, sha: str, cache: str = "run/rhaas") -> bytes | None:
    p = Path(sim_farm.node(name)["root"]) / cache / sha
    return p.read_bytes() if p.exists() else None


def helper_pids(sim_farm) -> dict[int, str]:
    """Live processes started for the farm's nodes (their root in argv): PID -> command line."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(sim_farm.dir / "nodes").encode() in argv:
            found[int(pid)] = argv.replace(b"\0", b" ").decode(errors="replace")
    return found


def helpers_of(sim_farm) -> list[str]:
    return sorted(helper_pids(sim_farm).values())


def socket_inodes(pids) -> set[str]:
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    return out


def listeners(inodes: set[str] | None = None) -> set[tuple[str, int]]:
    """Listening TCP sockets (IPv4 and IPv6) from /proc/net; only those with ``inodes`` if given."""
    out = set()
    for path, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A" or (inodes is not None and parts[9] not in inodes):  # LISTEN, ours
                continue
            hexaddr, hexport = parts[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if size == 4:
                addr = str(ipaddress.IPv4Address(raw[::-1]))
            else:
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                addr = str(ipaddress.IPv6Address(b"".join(words)))
            out.add((addr, int(hexport, 16)))
    return out


def _one_source(monkeypatch):
    # one worker thread, one process: nodes take their turns in order, so the second node's
    # source is the first node (a peer) and the test knows who served whom
    monkeypatch.setenv("RHAAS_KEXEC_PROCESSES", "1")


# -- the origin ----------------------------------------------------------------------------------
def test_origin_needs_the_runs_token_and_serves_only_the_runs_blobs(tmp_path):
    blob, other = tmp_path / "blob", tmp_path / "other"
    blob.write_bytes(os.urandom(100_000))
    other.write_bytes(b"not in the run")
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    with BlobServer({sha: str(blob)}) as srv:
        host, port = srv.address
        assert ipaddress.ip_address(host).is_loopback

        def get(path, method="GET", headers=None):
            c = http.client.HTTPConnection(host, port, timeout=10)
            c.request(method, path, headers=headers or {})
            r = c.getresponse()
            body = r.read()
            c.close()
            return r.status, dict(r.getheaders()), body

        good = f"{PREFIX}{srv.token}/{sha}"
        assert get(good)[0] == 200 and get(good)[2] == blob.read_bytes()
        status, headers, body = get(good, "HEAD")
        assert (status, headers["Content-Length"], body) == (200, "100000", b"")
        status, headers, body = get(good, headers={"Range": "bytes=10-19"})
        assert (status, body, headers["Content-Range"]) == (206, blob.read_bytes()[10:20], "bytes 10-19/100000")
        assert get(good, headers={"Range": "bytes=200000-"})[0] == 416
        sent = srv.bytes_sent
        for path in (f"{PREFIX}{sha}", f"{PREFIX}x{srv.token[1:]}/{sha}", f"{PREFIX}/{sha}",
                     f"{PREFIX}{srv.token}/{hashlib.sha256(b'not in the run').hexdigest()}",
                     f"{PREFIX}{srv.token}/../other", f"/{srv.token}/{sha}"):
            status, _, body = get(path)
            assert status in (403, 404) and body == b"", path
        assert get(f"{PREFIX}nope/{sha}")[0] == 403
        assert srv.bytes_sent == sent  # not a byte of a blob for any of them
        threads = {t.name for t in threading.enumerate()}
        assert "rhaas-blob-listener" in threads
    assert not any(t.name.startswith("rhaas-blob") for t in threading.enumerate())
    assert (host, port) not in listeners()


def shell_env(tmp_path, hasher: str) -> dict:
    """The environment of a node script run here: as is (``openssl`` verifies), or with a PATH
    of the host's tools minus openssl (``sha256sum`` verifies, as on a busybox-only node)."""
    env = dict(os.environ)
    if hasher == "sha256sum":
        d = tmp_path / "bin-no-openssl"
        d.mkdir(exist_ok=True)
        for src in ("/usr/local/bin", "/usr/bin", "/bin"):
            for name in os.listdir(src) if os.path.isdir(src) else ():
                if name != "openssl" and not (d / name).exists():
                    (d / name).symlink_to(os.path.join(src, name))
        env["PATH"] = str(d)
    return env


@pytest.mark.parametrize("hasher", ["openssl", "sha256sum"])
def test_fetch_command_survives_a_real_shell_with_hostile_values(tmp_path, hasher):
    """The pull command as sent, in /bin/sh: nothing in the command line is ever run, and a
    blob whose bytes do not match its name never gets a cache name (verified by openssl where
    the node has it, else by sha256sum)."""
    from rhaas.core.kexec.commands import Commands

    cache = tmp_path / "cache"
    cache.mkdir()
    marker = tmp_path / "pwned"
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(os.urandom(5000))
    bad.write_bytes(b"other bytes")
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    cmdline = f"""a='"; $(touch {marker}) `touch {marker}` ; touch {marker} & rhaas.nonce=1"""
    # one server lies (serves other bytes under the name), the next one is right
    with BlobServer({sha: str(bad)}) as liar, BlobServer({sha: str(good)}) as origin:
        sources = [f"{liar.base_url}{PREFIX}{liar.token}", f"{origin.base_url}{PREFIX}{origin.token}"]
        cmd = Commands.fetch_and_load(sha, sha, sha, "ab" * 32, cmdline, False, "t", sources, 10, str(cache))
        stubs = "kexec() { echo kexec-called; }; mv() { command mv \"$@\"; }; "
        done = subprocess.run(["sh", "-c", stubs + cmd], capture_output=True, text=True, timeout=60, check=False,
                              env=shell_env(tmp_path, hasher))
    lines = done.stdout.splitlines()
    assert any(ln.startswith("rhaas:bad 1 sha256 mismatch") for ln in lines), done.stdout
    assert f"rhaas:got {sha} 2" in lines
    assert (cache / sha).read_bytes() == good.read_bytes()
    assert not [f for f in os.listdir(cache) if f.startswith(".fetch")]
    assert not marker.exists()


def kexec_seeing_listeners(sim_farm, names, image):
    """``kexec(names, image)``, sampling meanwhile every listening socket of this process (the
    origin) and of the nodes' helpers (httpd, relays); returns kexec's answer and what listened."""
    seen: set[tuple[str, int]] = set()
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.update(listeners(socket_inodes([os.getpid(), *helper_pids(sim_farm)])))
            stop.wait(0.02)

    t = threading.Thread(target=sample)
    t.start()
    try:
        r, out, summary = kexec(names, image)
    finally:
        stop.set()
        t.join()
    return r, out, summary, seen


# -- nodes pull, peers serve ---------------------------------------------------------------------
def test_pull_from_origin_then_peers_and_nothing_left_behind(sim_farm, farm_home, rhaas_home, image, monkeypatch):
    names = sim_farm.names[0:6]
    farm_home(rhaas_home, names)
    r, out, summary, seen = kexec_seeing_listeners(sim_farm, names, image)
    assert r.exit_code == 0, r.output
    size = sum(p.stat().st_size for p in image)
    paths = {n: out[n]["transfer"]["path"] for n in names}
    assert set(paths.values()) <= {"origin", "peer"} and "peer" in paths.values()
    assert all(out[n]["transfer"]["bytes"] == size for n in names)
    assert summary["origin_bytes"] == size * list(paths.values()).count("origin") < size * len(names)
    for n in names:
        for f in image:
            assert cached(sim_farm, n, hashlib.sha256(f.read_bytes()).hexdigest()) == f.read_bytes()
    # the origin and the peers listened, on loopback only; all of it is gone after the run
    peer_addrs = {ipaddress.ip_address(sim_farm.node(n)["ssh"].split("@")[1].rsplit(":", 1)[0]) for n in names}
    assert seen, "the sampler saw no listener: it could not have caught one off loopback"
    assert any(ipaddress.ip_address(a) in peer_addrs for a, _ in seen)
    assert all(ipaddress.ip_address(a).is_loopback for a, _ in seen), seen
    assert not (listeners() & seen)
    assert helpers_of(sim_farm) == []
    assert not any(t.name.startswith("rhaas-blob") for t in threading.enumerate())
    for n in names:
        assert not [f for f in os.listdir(Path(sim_farm.node(n)["root"]) / "run/rhaas") if f.startswith(".")]


def test_a_peer_serving_wrong_bytes_is_refused_and_the_node_verifies(sim_farm, farm_home, rhaas_home, image,
                                                                     monkeypatch):
    _one_source(monkeypatch)
    names = sim_farm.names[6:9]
    farm_home(rhaas_home, names)
    sim_farm.set_faults({n: ["peer_bad_bytes"] for n in names})
    r, out, _ = kexec(names, image, "--parallel", "1")
    assert r.exit_code == 0, r.output
    refused = [n for n in names if any("sha256 mismatch" in d for d in out[n]["transfer"].get("dropped", []))]
    assert refused, out
    for n in names:
        assert out[n]["outcome"] == "ok" and out[n]["transfer"]["path"] == "origin"
        for f in image:  # only the right bytes carry the name, on every node
            assert cached(sim_farm, n, hashlib.sha256(f.read_bytes()).hexdigest()) == f.read_bytes()
    assert helpers_of(sim_farm) == []


def test_a_peer_dying_mid_transfer_does_not_fail_the_run(sim_farm, farm_home, rhaas_home, image, monkeypatch):
    _one_source(monkeypatch)
    names = sim_farm.names[9:12]
    farm_home(rhaas_home, names)
    sim_farm.set_faults({names[0]: ["peer_dies"]})
    r, out, _ = kexec(names, image, "--parallel", "1")
    assert r.exit_code == 0, r.output
    assert all(out[n]["outcome"] == "ok" for n in names)
    dropped = [d for n in names for d in out[n]["transfer"].get("dropped", [])]
    assert any(d.startswith(f"{names[0]}: fetch failed") for d in dropped), out
    assert helpers_of(sim_farm) == []


def test_a_node_without_http_client_gets_sftp(sim_farm, farm_home, rhaas_home, image):
    names = sim_farm.names[12:14]
    farm_home(rhaas_home, names)
    sim_farm.set_faults({names[0]: ["no_http_client"]})
    r, out, summary = kexec(names, image)
    assert r.exit_code == 0, r.output
    t = out[names[0]]["transfer"]
    assert t["path"] == "sftp" and t["dropped"] == ["no HTTP client on the node"]
    assert t["bytes"] == sum(p.stat().st_size for p in image)
    assert out[names[1]]["transfer"]["path"] == "origin"
    assert summary["paths"] == {"sftp": 1, "origin": 1}


def test_node_cache_dir_is_honoured_and_a_cached_image_costs_nothing(sim_farm, farm_home, rhaas_home, image,
                                                                    monkeypatch):
    monkeypatch.setenv("RHAAS_NODE_CACHE_DIR", "/var/cache/rhaas-images")
    names = sim_farm.names[14:16]
    farm_home(rhaas_home, names)
    r, _, _ = kexec(names, image)
    assert r.exit_code == 0, r.output
    sha = hashlib.sha256(image[0].read_bytes()).hexdigest()
    assert all(cached(sim_farm, n, sha, "var/cache/rhaas-images") == image[0].read_bytes() for n in names)
    assert all(cached(sim_farm, n, sha) is None for n in names)
    r, second, summary = kexec(names, image)
    assert r.exit_code == 0, r.output
    assert all(second[n]["transfer"] == {"path": "cache", "bytes": 0} for n in names)
    assert summary["origin_bytes"] == 0


@pytest.mark.parametrize("key,value", [("RHAAS_BLOB_URL", "https://origin.example"), ("RHAAS_BLOB_URL", "http://h/$(x)"),
                                       ("RHAAS_NODE_CACHE_DIR", "run/rhaas"), ("RHAAS_NODE_CACHE_DIR", "/run/../etc"),
                                       ("RHAAS_BLOB_PEERS", "sometimes")])
def test_bad_image_settings_are_usage_errors(sim_farm, farm_home, rhaas_home, image, monkeypatch, key, value):
    names = sim_farm.names[16:17]
    farm_home(rhaas_home, names)
    monkeypatch.setenv(key, value)
    before = {n: sim_farm.state(n)["boot_id"] for n in names}
    r, out, _ = kexec(names, image)
    assert r.exit_code == 2 and out == {}
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    assert {n: sim_farm.state(n)["boot_id"] for n in names} == before


def test_load_only_pulls_serves_and_leaves_nothing_then_exec_jumps(sim_farm, farm_home, rhaas_home, image):
    names = sim_farm.names[17:21]
    farm_home(rhaas_home, names)
    before = {n: sim_farm.state(n)["boot_id"] for n in names}
    r, out, summary = kexec(names, image, "--load-only")
    assert r.exit_code == 0, r.output
    assert {out[n]["outcome"] for n in names} == {"loaded"}
    assert {out[n]["transfer"]["path"] for n in names} <= {"origin", "peer"}
    assert summary["paths"].get("peer", 0) >= 1
    assert all(sim_farm.state(n)["loaded"] for n in names)
    assert {n: sim_farm.state(n)["boot_id"] for n in names} == before  # nobody jumped
    assert helpers_of(sim_farm) == []  # the peers' servers stopped without a jump
    r = run("kexec", *names, "--exec", "--timeout", "20", "--no-fallback", "--json")
    assert r.exit_code == 0, r.output
    assert all(sim_farm.state(n)["boot_id"] != before[n] for n in names)


def test_a_retry_after_a_failed_load_uses_what_was_pulled(sim_farm, farm_home, rhaas_home, image):
    names = sim_farm.names[21:23]
    farm_home(rhaas_home, names)
    sim_farm.set_faults({names[0]: {"load_fails_first": 1}})
    r, out, summary = kexec(names, image, "--retries", "1")
    assert r.exit_code == 0, r.output
    assert all(out[n]["outcome"] == "ok" for n in names)
    assert summary["origin_bytes"] <= 2 * sum(p.stat().st_size for p in image)  # nothing fetched twice
    assert helpers_of(sim_farm) == []


def test_a_peer_server_left_by_a_dead_run_is_stopped_by_the_next_pull(sim_farm, farm_home, rhaas_home, image,
                                                                      tmp_path):
    """A run killed while its nodes served leaves their pid files: the next pull on the node ends
    that server (only a process naming the left-over root: never a reused PID) and removes it."""
    names = sim_farm.names[23:24]
    farm_home(rhaas_home, names)
    cache = Path(sim_farm.node(names[0])["root"]) / "run/rhaas"
    cache.mkdir(parents=True, exist_ok=True)
    stale_root = cache / ".peer-deadrun00"
    (stale_root / "tok").mkdir(parents=True)
    left = subprocess.Popen(["sh", "-c", "sleep 300", str(stale_root)])  # stands for its httpd
    other = subprocess.Popen(["sleep", "300"])  # a PID that is not that server
    try:
        (cache / ".peer-deadrun00.pid").write_text(f"{left.pid}\n")
        (cache / ".peer-otherrun1.pid").write_text(f"{other.pid}\n")
        r, out, _ = kexec(names, image)
        assert r.exit_code == 0, r.output
        assert out[names[0]]["transfer"]["path"] == "origin"  # it pulled: the fetch script ran
        assert left.wait(timeout=10) is not None  # stopped
        assert other.poll() is None  # left alone
        assert not [f for f in os.listdir(cache) if f.startswith(".peer-")]
    finally:
        for p in (left, other):
            if p.poll() is None:
                p.kill()
                p.wait()
