"""`rhaas kexec` when things go wrong: dying kernels, killed runs, many fallbacks, retries.

All on the simulated farm (real SSH, 200 nodes for this module) and Debian's ipmi_sim for
the BMCs; the CLI is driven as a user does (in-process, or as a real process to be killed).
"""

# ruff: noqa: F811  (the fixtures imported from farm_fixtures come back as parameters)
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from farm_fixtures import client_key, farm_home, sim_farm  # noqa: F401
from ipmi_fixtures import requires_ipmi_sim

from rhaas.cli import cli
from rhaas.sim.farm import launch
from rhaas.store import Store

FARM_NODES = 200


@pytest.fixture(scope="module")
def _farm_process(tmp_path_factory, client_key):
    """This module's own farm: 200 nodes, for the session-cut test at scale."""
    d = tmp_path_factory.mktemp("farm200")
    keys = d / "authorized_keys"
    keys.write_text(client_key[1] + "\n")
    farm = launch(d / "farm", FARM_NODES, keys, down_time=0.3, log_commands=True, timeout=120)
    yield farm
    farm.stop()


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def kexec_json(*args, input=None):
    r = run("kexec", *args, "--json", input=input)
    return r, {d["node"]: d for d in json.loads(r.stdout)} if r.stdout.strip() else {}


def wait_for(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def image(tmp_path, rhaas_home):
    """``image()`` records image 'img' (a fake kernel, a gzipped newc initrd) once the home exists."""
    from rhaas.core.overlay import S_IFDIR, S_IFREG, CpioEntry, write_newc

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(32 * 1024))
    initrd = tmp_path / "initrd.gz"
    base = write_newc([CpioEntry("etc", S_IFDIR | 0o755), CpioEntry("etc/rhaas-image", S_IFREG | 0o644, b"IMG-H\n")])
    initrd.write_bytes(gzip.compress(base, mtime=0))

    def add() -> str:
        r = run("image", "add", "img", "--kernel", kernel, "--initrd", initrd, "--append", "console=ttyS0")
        assert r.exit_code == 0, r.output
        return "img"

    return add


def test_sessions_cut_during_the_jump_are_not_failures(sim_farm, farm_home, rhaas_home, image):
    """Every node's old kernel accepts logins for a second after `kexec -e` and cuts each
    session (no exit status, half an answer, a reset, a login cut short): none of the 200
    nodes may be called failed for it."""
    names = sim_farm.names[:200]
    farm_home(rhaas_home, names)
    img = image()
    sim_farm.set_faults({n: {"dies_slowly": 1.0} for n in names})
    before = sim_farm.states(names)

    r, out = kexec_json(*names, "--image", img, "--timeout", "60", "--no-fallback")

    bad = {n: d["reason"] for n, d in out.items() if d["outcome"] != "ok"}
    assert bad == {} and r.exit_code == 0, r.stderr[-2000:]
    after = sim_farm.states(names)
    assert all(after[n]["boot_id"] == out[n]["boot_id"] != before[n]["boot_id"] for n in names)
    # the dying kernels were really polled and really cut sessions
    polled = [c for n, c in sim_farm.commands() if n in set(names) and "cmdline" in c]
    assert len(polled) > len(names)


def _children(pid: int) -> dict[int, str]:
    """PID -> start time of the live (non-zombie) children of ``pid``."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        if rest[0] != "Z" and int(rest[1]) == pid:
            out[int(entry)] = rest[19]
    return out


def _gone(pid: int, start: str) -> bool:
    try:
        rest = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    rest = rest[rest.rfind(")") + 2:].split()
    return rest[0] == "Z" or rest[19] != start


def test_a_killed_kexec_leaves_interrupted_nodes_and_no_workers(sim_farm, farm_home, rhaas_home, image):
    names = sim_farm.names[:8]
    farm_home(rhaas_home, names)
    img = image()
    sim_farm.set_faults({n: ["never_returns"] for n in names})  # the run waits for them
    env = {**os.environ, "RHAAS_HOME": str(rhaas_home), "RHAAS_KEXEC_PROCESSES": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rhaas", "kexec", *names, "--image", img, "--timeout", "120", "--no-fallback"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        store = Store(rhaas_home)
        wait_for(lambda: all(store.snapshot().node(n)["status"] == "provisioning" for n in names), 60,
                 "the run's first write")
        workers = wait_for(lambda: (c := _children(proc.pid)) and len(c) >= 2 and c, 60, "two worker processes")
        # every node jumped (and vanished): the run is now only waiting
        wait_for(lambda: all(sim_farm.state(n)["up"] is False for n in names), 60, "the jumps")
        started = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    wait_for(lambda: all(_gone(pid, st) for pid, st in workers.items()), 30, "the workers to die with the run")

    r = run("list", "--json")
    assert r.exit_code == 0
    nodes = {d["name"]: d for d in json.loads(r.stdout)}
    day = time.strftime("%Y-%m-%d", time.localtime(started))
    for n in names:
        assert nodes[n]["status"] == "interrupted", nodes[n]
        assert f"started {day}" in nodes[n]["reason"] and f"(pid {proc.pid})" in nodes[n]["reason"]
    shown = run("show", names[0])
    assert "interrupted" in shown.stdout
    table = run("list")
    assert "provisioning" not in table.stdout and table.stdout.count("interrupted") == len(names)


def _bmcs(tmp_path, names):
    from ipmi_fixtures import start_bmc

    bmcs = {}
    try:
        for n in names:
            bmcs[n] = start_bmc(n, tmp_path / f"bmc-{n}", power_on=True)
    except BaseException:
        for b in bmcs.values():
            b.stop()
        raise
    return bmcs


def _cycles(bmc) -> list[tuple[float, float]]:
    """(power off, power on) times of each power cycle, as the BMC's chassis recorded them."""
    out, off = [], None
    for t, call in bmc.timed_calls():
        if call == "set power 0":
            off = t
        elif call == "set power 1" and off is not None:
            out.append((off, t))
            off = None
    return out


@requires_ipmi_sim
def test_fallback_power_cycles_stay_within_the_window(sim_farm, farm_home, rhaas_home, image, tmp_path, monkeypatch):
    names = sim_farm.names[10:30]
    bmcs = _bmcs(tmp_path, names)
    try:
        farm_home(rhaas_home, names, per_node={n: {"ipmi": bmcs[n].ipmi_doc()} for n in names})
        img = image()
        sim_farm.set_faults({n: {"load_fails": True, "power_file": str(bmcs[n].power_file)} for n in names})
        monkeypatch.setenv("RHAAS_FALLBACK_WINDOW", "5")

        r, out = kexec_json(*names, "--image", img, "--timeout", "60")

        assert r.exit_code == 1
        assert {n: out[n]["outcome"] for n in names} == {n: "fallback" for n in names}, r.stderr[-2000:]
        cycles = [c for n in names for c in _cycles(bmcs[n])]
        assert len(cycles) == len(names)
        # the most cycles in flight at once, at any cycle's start
        peak = max(sum(1 for a, b in cycles if a <= start <= b) for start, _ in cycles)
        assert 1 <= peak <= 5
    finally:
        for b in bmcs.values():
            b.stop()


@requires_ipmi_sim
def test_kexec_no_goes_straight_to_the_power_path(sim_farm, farm_home, rhaas_home, image, tmp_path):
    name, plain = sim_farm.names[40], sim_farm.names[41]
    bmcs = _bmcs(tmp_path, [name])
    try:
        farm_home(rhaas_home, [name, plain], per_node={
            name: {"ipmi": bmcs[name].ipmi_doc(), "metadata": {"rhaas.kexec": "no"}},
            plain: {"metadata": {"rhaas.kexec": True}},
        })
        img = image()
        sim_farm.set_faults({name: {"power_file": str(bmcs[name].power_file)}})
        before = sim_farm.state(name)
        mark = len(sim_farm.commands())

        r, out = kexec_json(name, plain, "--image", img, "--timeout", "30")

        assert r.exit_code == 1 and out[plain]["outcome"] == "ok"
        assert out[name]["outcome"] == "fallback", out[name]
        assert out[name]["reason"] == "kexec skipped: node metadata rhaas.kexec=no"
        sent = [c for n, c in sim_farm.commands()[mark:] if n == name]
        assert not any("kexec" in c for c in sent), sent
        after = sim_farm.state(name)
        assert after["boot_id"] != before["boot_id"] and after["cmdline"].startswith("BOOT_IMAGE=pxe")
        assert out[name]["boot_id"] == after["boot_id"]
        assert "set power 0" in bmcs[name].calls() and bmcs[name].boot() == "pxe"
        plan = json.loads(run("kexec", name, "--image", img, "--dry-run", "--json").stdout)
        assert plan[0]["power_only"] is True and plan[0]["reason"] is None
        # a mode that needs kexec refuses such a node without touching it
        r2, out2 = kexec_json(name, "--image", img, "--load-only")
        assert r2.exit_code == 1 and "rhaas.kexec=no" in out2[name]["reason"]
    finally:
        for b in bmcs.values():
            b.stop()


def test_retries_and_the_ok_and_failed_lists(sim_farm, farm_home, rhaas_home, image, tmp_path):
    good, flaky, broken = sim_farm.names[50:53]
    farm_home(rhaas_home, [good, flaky, broken])
    img = image()
    sim_farm.set_faults({flaky: {"load_fails_first": 1}, broken: ["load_fails"]})
    ok_file, failed_file = tmp_path / "ok", tmp_path / "failed"
    mark = len(sim_farm.commands())

    r, out = kexec_json(good, flaky, broken, "--image", img, "--timeout", "30", "--no-fallback",
                        "--retries", "1", "--ok-file", ok_file, "--failed-file", failed_file)

    assert r.exit_code == 1
    assert {n: d["outcome"] for n, d in out.items()} == {good: "ok", flaky: "ok", broken: "failed"}
    assert ok_file.read_text() == f"{good}\n{flaky}\n"
    assert failed_file.read_text() == f"{broken}\n"
    assert f"next: rhaas kexec --image img - < {failed_file}" in r.stderr
    # attempt 1: the cache lookup, then build + kexec -l (refused); attempt 2: cached, kexec -l works
    loads = [c for n, c in sim_farm.commands()[mark:] if n == flaky and "kexec -l" in c]
    assert len(loads) == 3
    events = json.loads(run("events", flaky, "--json").stdout)
    assert events[-1]["action"] == "kexec" and events[-1]["detail"]["attempts"] == 2

    # the retry the message names, once the node is healthy
    sim_farm.set_faults({})
    r2, out2 = kexec_json("--image", img, "--timeout", "30", "--no-fallback", "-",
                          "--failed-file", failed_file, input=failed_file.read_text())
    assert r2.exit_code == 0 and out2[broken]["outcome"] == "ok", (r2.stderr, out2[broken].get("reason"), out2[broken].get("phases"))
    assert failed_file.read_text() == ""


def test_a_node_of_another_live_run_is_refused_and_a_dead_owner_reads_interrupted(
        sim_farm, farm_home, rhaas_home, image):
    """The owner recorded with 'provisioning' decides: a live other process keeps the node
    (the new run refuses it, only an event), a process that has ended shows it interrupted."""
    from rhaas.core.kexec import owner

    busy, stale = sim_farm.names[60:62]
    store = farm_home(rhaas_home, [busy, stale])
    img = image()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    try:
        live = {"pid": other.pid, "start": owner.process_start(other.pid), "boot": owner.host_boot(),
                "started": time.time()}
        dead = {**live, "pid": ended.pid, "start": 1}
        with store.transaction("test") as tx:
            tx.put_nodes([{**tx.node(busy), "status": "provisioning", "kexec_run": live},
                          {**tx.node(stale), "status": "provisioning", "kexec_run": dead}])
        nodes = {d["name"]: d for d in json.loads(run("list", "--json").stdout)}
        assert nodes[busy]["status"] == "provisioning" and nodes[stale]["status"] == "interrupted"
        before = sim_farm.state(busy)["boot_id"]

        r, out = kexec_json(busy, stale, "--image", img, "--timeout", "30", "--no-fallback")

        assert r.exit_code == 1 and out[stale]["outcome"] == "ok"
        assert out[busy]["outcome"] == "failed" and f"pid {other.pid}" in out[busy]["reason"]
        assert sim_farm.state(busy)["boot_id"] == before
        assert store.snapshot().node(busy)["status"] == "provisioning"  # still the other run's
    finally:
        other.kill()
        other.wait()
