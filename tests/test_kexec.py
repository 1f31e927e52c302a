"""`rhaas kexec` against the simulated node farm: real SSH, real SFTP, real (simulated) reboots.

Each test builds an inventory of farm nodes through the store, drives the CLI as a user
does, and checks what the nodes report (boot id, /proc/cmdline, what is cached) and what
the inventory records.
"""

# ruff: noqa: F811  (the fixtures imported from farm_fixtures come back as parameters)
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from farm_fixtures import _farm_process, client_key, farm_home, sim_farm  # noqa: F401
from worlds import within

from rhaas.cli import cli
from rhaas.core.overlay import overlay_files
from rhaas.store import Store

NONCE_KEYS = {"node", "outcome", "image", "nonce", "boot_id", "reason", "phases", "transfer"}
PHASES = {"connect", "stage", "load", "down", "up", "verify"}


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def kexec_json(*args):
    r = run("kexec", *args, "--json")
    return r, {d["node"]: d for d in json.loads(r.stdout)} if r.stdout.strip() else {}


@pytest.fixture
def image(tmp_path, rhaas_home):
    """A recorded image 'img': a fake kernel, a gzipped cpio initrd naming itself 'IMG-A'."""
    from rhaas.core.overlay import S_IFDIR, S_IFREG, CpioEntry, write_newc

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(64 * 1024))
    initrd = tmp_path / "initrd.gz"
    base = write_newc([CpioEntry("etc", S_IFDIR | 0o755), CpioEntry("etc/rhaas-image", S_IFREG | 0o644, b"IMG-A\n")])
    initrd.write_bytes(gzip.compress(base, mtime=0))
    return {"name": "img", "kernel": kernel, "initrd": initrd, "append": "console=ttyS0 quiet"}


def add_image(img):
    r = run("image", "add", img["name"], "--kernel", img["kernel"], "--initrd", img["initrd"], "--append", img["append"])
    assert r.exit_code == 0, r.output


def test_full_flow_verifies_records_and_batches_writes(sim_farm, farm_home, rhaas_home, image, client_key, monkeypatch):
    names = sim_farm.names[:20]
    tenant = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITenantKeyForTesting tenant@example"
    store = farm_home(rhaas_home, names, per_node={names[0]: {"tenant_ssh_keys": [tenant]}})
    add_image(image)
    before = {n: sim_farm.state(n) for n in names}
    writes = store.snapshot().writes
    monkeypatch.setenv("RHAAS_KEXEC_PROCESSES", "2")  # the forked-worker path, on few nodes

    started = time.time()
    r, out = kexec_json("sim-[0001-0020]", "--image", "img", "--timeout", "20")
    ended = time.time()

    assert r.exit_code == 0, r.output
    assert set(out) == set(names)
    snap = store.snapshot()
    assert snap.writes == writes + 2  # provisioning marks, then all results: not one per node
    for name in names:
        res, st, doc = out[name], sim_farm.state(name), snap.node(name)
        assert set(res) == NONCE_KEYS
        assert res["outcome"] == "ok" and res["reason"] is None and res["image"] == "img"
        assert st["boot_id"] != before[name]["boot_id"] and st["boots"] == before[name]["boots"] + 1
        assert res["boot_id"] == st["boot_id"]
        assert st["cmdline"] == f"console=ttyS0 quiet rhaas.nonce={res['nonce']}"
        assert set(res["phases"]) == PHASES and all(v >= 0 for v in res["phases"].values())
        assert doc["status"] == "ready" and doc["image"] == "img" and doc["reason"] is None
        assert doc["nonce"] == res["nonce"] and doc["boot_id"] == st["boot_id"]
        assert started <= doc["last_boot"] <= ended and set(doc["phases"]) == PHASES  # this run's boot
    assert len({res["nonce"] for res in out.values()}) == len(names)  # a fresh nonce per node
    events = [e for e in snap.events() if e["action"] == "kexec"]
    assert {e["node"] for e in events} == set(names) and {e["outcome"] for e in events} == {"ok"}

    # what the node booted: the image's initrd, then the overlay with rhaas's and the tenant's keys
    loaded = sim_farm.state(names[0])
    cache = Path(sim_farm.node(names[0])["root"]) / "run/rhaas"
    cached = {f.name: f.read_bytes() for f in cache.iterdir()}
    base = image["initrd"].read_bytes()
    assert cached[hashlib.sha256(image["kernel"].read_bytes()).hexdigest()] == image["kernel"].read_bytes()
    assert cached[hashlib.sha256(base).hexdigest()] == base
    booted = [overlay_files(b) for name, b in cached.items() if b.startswith(base) and len(b) > len(base)]
    assert len(booted) == 1, sorted(cached)
    assert all(hashlib.sha256(b).hexdigest() == name for name, b in cached.items())  # content-addressed
    keys = booted[0]["/root/.ssh/authorized_keys"].decode().splitlines()
    assert keys == [client_key[1], tenant]
    assert booted[0]["/etc/rhaas-image"] == b"IMG-A\n"
    assert loaded["loaded"] is None


def test_second_run_uses_the_nodes_cache(sim_farm, farm_home, rhaas_home, image):
    names = sim_farm.names[20:23]
    farm_home(rhaas_home, names)
    add_image(image)
    r, first = kexec_json(*names, "--image", "img", "--timeout", "20")
    assert r.exit_code == 0, r.output
    cache = {n: {f: os.stat(os.path.join(sim_farm.node(n)["root"], "run/rhaas", f)).st_ino
                 for f in os.listdir(os.path.join(sim_farm.node(n)["root"], "run/rhaas"))} for n in names}
    assert all(len(files) == 4 for files in cache.values())  # kernel, initrd, overlay, node's initrd
    assert all(first[n]["phases"]["stage"] > 0 for n in names)
    seen = len(sim_farm.commands())

    r, second = kexec_json(*names, "--image", "img", "--timeout", "20")

    assert r.exit_code == 0, r.output
    for n in names:
        files = {f: os.stat(os.path.join(sim_farm.node(n)["root"], "run/rhaas", f)).st_ino
                 for f in os.listdir(os.path.join(sim_farm.node(n)["root"], "run/rhaas"))}
        assert files == cache[n]  # nothing re-sent, nothing rebuilt
        assert second[n]["phases"]["stage"] == 0.0
        assert second[n]["nonce"] != first[n]["nonce"]
    later = [c for node, c in sim_farm.commands()[seen:] if node in names]
    # one command per node before the jump (check cache + load + fire), one after (verify)
    assert len(later) == 2 * len(names)
    assert not any(" > " in c for c in later)


def test_faults_end_in_bounded_time_with_the_right_outcome(sim_farm, farm_home, rhaas_home, image):
    names = sim_farm.names[0:5]
    farm_home(rhaas_home, names)
    add_image(image)
    sim_farm.set_faults({
        names[0]: ["load_fails"],
        names[1]: ["never_returns"],
        names[2]: ["old_boot_id"],
        names[3]: ["refuse_ssh"],
        names[4]: {"slow": 1.0},
    })
    before = {n: sim_farm.state(n) for n in names}

    # every node's wait is bounded by --timeout/--connect-timeout; the guard only catches a hang
    # (how long a faulty batch takes is a figure for `make bench`)
    r, out = within(60, kexec_json, *names, "--image", "img", "--timeout", "4", "--connect-timeout", "2",
                    "--no-fallback")

    assert r.exit_code == 1
    assert {n: out[n]["outcome"] for n in names} == {
        names[0]: "failed", names[1]: "failed", names[2]: "failed", names[3]: "failed", names[4]: "ok"}
    assert out[names[0]]["reason"] == "kexec -l failed: kexec_load failed: Device or resource busy"
    assert sim_farm.state(names[0])["boot_id"] == before[names[0]]["boot_id"]  # never jumped
    assert out[names[1]]["reason"] == "did not come back within 4s"
    assert out[names[2]]["reason"] == f"came back with old boot id {before[names[2]]['boot_id']}"
    assert out[names[3]]["reason"].startswith(f"cannot connect to {names[3]}")
    # the report puts the injected 1 s where it belongs (down/up). Not a speed check: the farm
    # holds the node for at least down_time + 1 s, so load can only make the figure larger.
    assert out[names[4]]["phases"]["down"] + out[names[4]]["phases"]["up"] >= 1.0
    for n in names[:4]:
        assert f"{n} (failed)" in r.stderr
    doc = Store(rhaas_home).snapshot().node(names[1])
    assert doc["status"] == "failed" and doc["reason"] == "did not come back within 4s"
    assert doc["image"] is None  # it jumped and vanished: what runs there is unknown


def test_fallback_without_a_power_backend_fails_with_that_reason(sim_farm, farm_home, rhaas_home, image):
    name = sim_farm.names[5]
    farm_home(rhaas_home, [name])
    add_image(image)
    sim_farm.set_faults({name: ["load_fails"]})
    r, out = kexec_json(name, "--image", "img", "--timeout", "5")
    assert r.exit_code == 1
    assert out[name]["outcome"] == "failed"
    assert out[name]["reason"] == (
        "kexec failed: kexec -l failed: kexec_load failed: Device or resource busy; no power backend")


def _ipmi_ready():
    try:
        import rhaas.adapters.bmc
        import rhaas.core.power  # noqa: F401
    except ImportError:
        return False
    return shutil.which("ipmi_sim") is not None


@pytest.mark.skipif(not _ipmi_ready(), reason="needs ipmi_sim and rhaas.core.power")
def test_fallback_power_cycles_through_the_bmc(sim_farm, farm_home, rhaas_home, image, tmp_path):
    """kexec -l fails; rhaas sets PXE and power cycles through a real (simulated) BMC.

    The farm node follows the BMC's power state file, so the cycle really reboots it.
    """
    from ipmi_fixtures import start_bmc

    name = sim_farm.names[6]
    bmc = start_bmc(name, tmp_path / "bmc", power_on=True)
    try:
        store = farm_home(rhaas_home, [name], per_node={name: {"ipmi": bmc.ipmi_doc()}})
        add_image(image)
        # The farm re-reads faults.json at its next fault lookup (at most 20 ms stale); this
        # node's first one is the `kexec -l` check, after SSH connect and staging, and the power
        # cycle that the power_file fault follows comes after that: nothing to wait for here.
        sim_farm.set_faults({name: {"load_fails": True, "power_file": str(bmc.power_file)}})
        before = sim_farm.state(name)

        r, out = kexec_json(name, "--image", "img", "--timeout", "20")

        assert r.exit_code == 1  # fallback is not success
        assert out[name]["outcome"] == "fallback"
        assert out[name]["reason"] == "kexec failed: kexec -l failed: kexec_load failed: Device or resource busy"
        after = sim_farm.state(name)
        assert after["boot_id"] != before["boot_id"] and after["cmdline"].startswith("BOOT_IMAGE=pxe")
        assert out[name]["boot_id"] == after["boot_id"]
        assert bmc.boot() == "pxe"
        doc = store.snapshot().node(name)
        assert doc["status"] == "fallback" and doc["bootdev"] == "pxe" and doc["boot_id"] == after["boot_id"]
    finally:
        bmc.stop()


def test_unknown_and_changed_host_keys_are_refused(sim_farm, farm_home, rhaas_home, image):
    unknown, changed, trusted = sim_farm.names[7:10]
    store = farm_home(rhaas_home, [unknown, changed, trusted], trust=False,
                      per_node={changed: {"ssh_host_key": sim_farm.node(trusted)["host_key"]}})
    from rhaas.adapters.hostkeys import known_hosts_add, known_hosts_path

    known_hosts_add(known_hosts_path(rhaas_home), sim_farm.node(trusted)["ssh"], sim_farm.node(trusted)["host_key"])
    assert oct(os.stat(rhaas_home / "known_hosts").st_mode & 0o777) == "0o600"
    add_image(image)
    before = {n: sim_farm.state(n) for n in (unknown, changed)}
    seen = len(sim_farm.commands())

    r, out = kexec_json(unknown, changed, trusted, "--image", "img", "--timeout", "20")

    assert r.exit_code == 1
    assert out[unknown]["outcome"] == "failed"
    assert out[unknown]["reason"] == f"host key for {unknown} not known; run 'rhaas node trust {unknown}'"
    assert out[changed]["outcome"] == "failed"
    assert out[changed]["reason"].startswith(f"host key for {changed} changed")
    assert out[trusted]["outcome"] == "ok"  # pinned through known_hosts only
    for n in (unknown, changed):  # refused before anything ran there, and no power cycle
        assert sim_farm.state(n)["boot_id"] == before[n]["boot_id"]
        assert not [c for node, c in sim_farm.commands()[seen:] if node == n]
    assert store.snapshot().node(unknown)["status"] == "failed"


def test_append_with_shell_metacharacters_arrives_intact(sim_farm, farm_home, rhaas_home, image, tmp_path):
    name = sim_farm.names[10]
    farm_home(rhaas_home, [name])
    marker = tmp_path / "pwned"
    append = f"""console=ttyS0 x='"; $(touch {marker}) ` ; touch {marker} && echo hi || true & \\"""
    r, out = kexec_json(name, "--kernel", image["kernel"], "--initrd", image["initrd"], "--append", append,
                        "--timeout", "20", "--no-fallback")
    assert r.exit_code == 0, r.output
    assert sim_farm.state(name)["cmdline"] == f"{append} rhaas.nonce={out[name]['nonce']}"
    assert out[name]["image"].startswith("adhoc-")
    assert not marker.exists()


def test_remote_commands_survive_a_real_shell(tmp_path, monkeypatch):
    """The exact command lines, run by /bin/sh with kexec & co. as recording functions."""
    from rhaas.core.kexec.commands import Commands

    cache = tmp_path / "cache"  # the combine step really writes a file: keep it out of /run
    cache.mkdir()
    monkeypatch.setattr(Commands, "CACHE_DIR", str(cache))
    marker = tmp_path / "pwned"
    argv_file = tmp_path / "argv"
    cmdline = f"""a='"; $(touch {marker}) `touch {marker}` ; touch {marker} & \\ rhaas.nonce=1"""
    sha = "ab" * 32
    stubs = (
        f"cat() {{ echo 00000000-0000-0000-0000-000000000000; }}; test() {{ return 0; }}; "
        f"mv() {{ :; }}; sh() {{ printf '%s\\n' \"$2\" >> {tmp_path}/sh; }}; "
        f"kexec() {{ for a in \"$@\"; do printf '%s\\0' \"$a\"; done > {argv_file}; }}; "
    )
    for command in (Commands.load_cached(sha, sha, cmdline, True),
                    Commands.combine_and_load(sha, sha, sha, sha, cmdline, True, "t")):
        done = subprocess.run(["sh", "-c", stubs + command], capture_output=True, text=True, timeout=10,
                              cwd=tmp_path, check=False)
        assert done.returncode == 0, done.stderr
        assert argv_file.read_bytes().split(b"\0")[:-1] == [
            b"-l", f"{cache}/{sha}".encode(), f"--initrd={cache}/{sha}".encode(),
            f"--command-line={cmdline}".encode()]
        assert done.stdout.splitlines()[1:] == ["rhaas:cached", "rhaas:loaded"]
    assert (tmp_path / "sh").read_text().splitlines() == [Commands.FIRE] * 2
    assert not marker.exists()


def test_bad_names_and_arguments_are_refused(sim_farm, farm_home, rhaas_home, image):
    farm_home(rhaas_home, sim_farm.names[:1])
    add_image(image)
    store = Store(rhaas_home)
    writes = store.snapshot().writes
    seen = len(sim_farm.commands())
    for args, why in (
        (["a;b", "--image", "img"], "invalid node name"),
        (["sim-0001", "--image", "x;rm"], "invalid image name"),
        (["sim-0001", "--kernel", image["kernel"], "--initrd", image["initrd"], "--append", "a\nb"], "line breaks"),
        (["sim-0001", "--kernel", image["kernel"]], "go together"),
        (["sim-0001", "--image", "img", "--kernel", image["kernel"], "--initrd", image["initrd"]], "either"),
        (["sim-0001", "--load-only", "--exec"], "exclude"),
        (["sim-0001", "--exec", "--image", "img"], "takes no image"),
        (["nosuch", "--image", "img"], "unknown node"),
    ):
        r = run("kexec", *args)
        assert r.exit_code == 2, (args, r.output)
        assert why in r.stderr, (args, r.stderr)
    assert store.snapshot().writes == writes
    assert len(sim_farm.commands()) == seen  # refused before any node was contacted


def test_load_only_then_exec(sim_farm, farm_home, rhaas_home, image):
    names = sim_farm.names[11:14]
    store = farm_home(rhaas_home, names)
    add_image(image)
    before = {n: sim_farm.state(n) for n in names}

    r, loaded = kexec_json(*names, "--image", "img", "--load-only")

    assert r.exit_code == 0, r.output
    for n in names:
        assert loaded[n]["outcome"] == "loaded"
        st = sim_farm.state(n)
        assert st["boot_id"] == before[n]["boot_id"]  # loaded, not jumped
        assert st["loaded"]["cmdline"] == f"console=ttyS0 quiet rhaas.nonce={loaded[n]['nonce']}"
        doc = store.snapshot().node(n)
        assert doc["status"] == "loaded" and doc["nonce"] == loaded[n]["nonce"] and doc["loaded_image"] == "img"

    r, fired = kexec_json(*names, "--exec", "--timeout", "20")

    assert r.exit_code == 0, r.output
    for n in names:
        st = sim_farm.state(n)
        assert fired[n]["outcome"] == "ok" and fired[n]["image"] == "img"
        assert fired[n]["nonce"] == loaded[n]["nonce"]
        assert st["boot_id"] != before[n]["boot_id"] and st["cmdline"].endswith(f"rhaas.nonce={loaded[n]['nonce']}")
        doc = store.snapshot().node(n)
        assert doc["status"] == "ready" and doc["image"] == "img" and doc["boot_id"] == st["boot_id"]

    # nothing is loaded any more: a second --exec is refused per node without touching it
    r, again = kexec_json(names[0], "--exec")
    assert r.exit_code == 1
    assert again[names[0]]["reason"].startswith("not loaded (status ready)")
    assert store.snapshot().node(names[0])["status"] == "ready"  # refused, so left as it was


def test_dry_run_changes_nothing(sim_farm, farm_home, rhaas_home, image):
    names = sim_farm.names[14:16]
    store = farm_home(rhaas_home, names)
    add_image(image)
    writes = store.snapshot().writes
    before = {n: sim_farm.state(n) for n in names}
    seen = len(sim_farm.commands())

    r = run("kexec", *names, "--image", "img", "--dry-run", "--json")

    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert [p["node"] for p in plan] == names
    assert all(p["dry_run"] and p["image"] == "img" and p["kernel"] == str(image["kernel"]) for p in plan)
    assert plan[0]["cmdline"] == "console=ttyS0 quiet rhaas.nonce=<nonce>"
    assert store.snapshot().writes == writes
    assert {n: sim_farm.state(n) for n in names} == before
    assert len(sim_farm.commands()) == seen
    assert not (rhaas_home / "known_hosts").exists()


def test_the_farm_keeps_sftp_inside_the_node_root(sim_farm, farm_home, rhaas_home):
    """The simulated node's path checks rely on there being no links under its root: SFTP
    refuses to make one (a symlink to / would otherwise let `cat` read the host's files)."""
    from rhaas.adapters import hostkeys, ssh

    name = sim_farm.names[23]
    n = sim_farm.node(name)
    key_path, _ = hostkeys.ensure_client_key(farm_home(rhaas_home, [name]).home)
    endpoint = ssh.Endpoint(name, ssh.parse_ssh(n["ssh"]), [n["host_key"]])
    with ssh.open_session(endpoint, hostkeys.load_client_key(key_path), 5, 5) as sess:
        sftp = sess.sftp()
        with pytest.raises(OSError):
            sftp.symlink("/", "/escape")
        assert "escape" not in sftp.listdir("/")
        r = sess.run("cat /escape/etc/hostname")
        assert r.exit != 0 and r.stdout == ""


def test_newc_archives_round_trip_with_device_nodes():
    """One newc writer serves both the kexec overlay and the lab's guest initramfs, which
    needs a /dev/console character device: type, mode, data and device numbers survive."""
    import stat as st

    from rhaas.core.overlay import CpioEntry, read_newc, write_newc

    entries = [
        CpioEntry("dev", st.S_IFDIR | 0o755),
        CpioEntry("dev/console", st.S_IFCHR | 0o600, b"", (5, 1)),
        CpioEntry("etc/x", st.S_IFREG | 0o640, b"abc\n"),
    ]
    blob = write_newc(entries)
    assert len(blob) % 4 == 0
    assert read_newc(blob) == entries
