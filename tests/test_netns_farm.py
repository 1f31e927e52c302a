"""The netns farm harness (tests/netns_farm.py): real sshd nodes in namespaces on 100 Mbit/s links.

Proves what benches and the pull-path tests lean on: 16 nodes come up, a real ``rhaas``
process reaches them with pinned host keys (and refuses a wrong one), ``rhaas kexec`` runs
its whole pipeline and verifies on all 16 through the fake kexec, every link end carries the
tbf qdisc, and teardown leaves no namespace, veth or process. Speed (the 16 MB transfer
time) is a bench figure (bench/bench_netns.py), not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from netns_farm import NetnsFarm, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
RHAAS = [sys.executable, "-m", "rhaas"]


def rhaas(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    env.update(RHAAS_HOME=str(home), NO_COLOR="1")
    return subprocess.run([*RHAAS, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def fake_kexec(node, *args: str) -> subprocess.CompletedProcess:
    """The node's kexec, run directly in the node's namespaces (not over SSH)."""
    return subprocess.run(["nsenter", "-t", str(node.pid), "-m", "-n", "--", f"{node.dir}/bin/kexec", *args],
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def operator(tmp_path_factory):
    """A root rhaas home with a client key (the key the farm authorizes)."""
    from rhaas.adapters.hostkeys import ensure_client_key

    home = tmp_path_factory.mktemp("op") / "home"
    assert rhaas(home, "init").returncode == 0
    _, public = ensure_client_key(home)
    return home, public


@pytest.fixture(scope="module")
def farm(tmp_path_factory, operator):
    with NetnsFarm(tmp_path_factory.mktemp("netns"), authorized_keys=operator[1], nodes_wanted=16,
                   down_time=0.3) as f:
        yield f


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sixteen_nodes_up_on_their_own_addresses(farm):
    assert len(farm.nodes) == 16
    assert len({n.addr for n in farm.nodes}) == 16 and len({n.host_key for n in farm.nodes}) == 16
    assert {n.ns for n in farm.nodes} <= namespaces()
    for n in farm.nodes:
        assert n.addr.startswith("198.1") and pid_alive(n.pid)
    # each node sees its own boot id and command line, not the host's
    host_boot = Path("/proc/sys/kernel/random/boot_id").read_text()
    boot_ids = {farm.node_run(n, "cat /proc/sys/kernel/random/boot_id") for n in farm.nodes[:3]}
    assert len(boot_ids) == 3 and host_boot not in boot_ids


def test_openssh_client_with_the_farms_known_hosts_sees_a_busybox_standby(farm, operator, tmp_path):
    from rhaas.adapters.hostkeys import ensure_client_key

    key, _ = ensure_client_key(operator[0])
    known = tmp_path / "known_hosts"
    known.write_text(farm.known_hosts())
    n = farm.nodes[5]
    ssh = ["ssh", "-i", str(key), "-F", "/dev/null", "-o", f"UserKnownHostsFile={known}",
           "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
    done = subprocess.run([*ssh, f"root@{n.addr}", "echo $0; echo $PATH; for t in wget httpd sha256sum kexec busybox; do command -v $t; done"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "sh" and lines[1] == f"{n.dir}/bin"
    assert lines[2:] == [f"{n.dir}/bin/{tool}" for tool in ("wget", "httpd", "sha256sum", "kexec", "busybox")]
    # another node's key for this address is refused
    known.write_text(f"{n.addr} {farm.nodes[6].host_key}\n")
    done = subprocess.run([*ssh, f"root@{n.addr}", "true"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 255 and "host key" in done.stderr.lower()


def test_every_link_end_is_capped_at_100mbit(farm):
    shown = farm.qdiscs()
    assert len(shown) == 2 + 2 * 16  # origin both ends, each node both ends
    for where, text in shown.items():
        assert "tbf" in text and "rate 100Mbit" in text and "burst 64Kb" in text, (where, text)


def test_rhaas_registers_with_pinned_keys_and_kexec_verifies_on_all(farm, operator, tmp_path):
    home, _ = operator
    for n in farm.nodes:
        done = rhaas(home, *farm.register_args(n))
        assert done.returncode == 0, done.stderr
    (tmp_path / "vmlinuz").write_bytes(os.urandom(64 * 1024))
    (tmp_path / "initrd").write_bytes(os.urandom(64 * 1024))
    before = {n.name: n.state("boot_id") for n in farm.nodes}
    done = rhaas(home, "kexec", farm.nodeset(), "--kernel", str(tmp_path / "vmlinuz"), "--initrd",
                 str(tmp_path / "initrd"), "--append", "console=ttyS0 farm.test=1", "--no-fallback", "--json",
                 "--timeout", "60")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert sorted(r["node"] for r in results) == [n.name for n in farm.nodes]
    assert {r["outcome"] for r in results} == {"ok"}
    for n in farm.nodes:
        assert n.state("boot_id") != before[n.name]
        assert "farm.test=1" in n.state("cmdline").split()
        calls = [json.loads(line) for line in n.state("kexec.log").splitlines()]
        assert [c[0] for c in calls][-2:] == ["-l", "-e"]
        assert calls[-2][1].startswith("/run/rhaas/")


def test_a_wrong_pinned_host_key_is_refused(farm, operator, tmp_path):
    home, _ = operator
    a, b = farm.nodes[0], farm.nodes[1]
    assert rhaas(home, "node", "register", "nf-liar", "--ssh", a.ssh, "--host-key", b.host_key).returncode == 0
    (tmp_path / "k").write_bytes(os.urandom(4096))
    log_before = a.state("kexec.log")
    done = rhaas(home, "kexec", "nf-liar", "--kernel", str(tmp_path / "k"), "--initrd", str(tmp_path / "k"),
                 "--no-fallback", "--json", "--timeout", "20")
    assert done.returncode == 1
    assert a.state("kexec.log") == log_before  # nothing ran on the node
    assert "host key" in (done.stdout + done.stderr).lower()


def test_fake_kexec_loads_then_flips_boot_id_cmdline_and_empties_the_cache(farm):
    n = farm.nodes[-1]
    farm.node_run(n, "head -c 1000 /dev/urandom > /run/rhaas/k && head -c 1000 /dev/urandom > /run/rhaas/i")
    assert n.state("kexec_loaded").strip() == "0"  # fresh, or jumped by an earlier test
    no_load = fake_kexec(n, "-e")
    assert no_load.returncode == 1 and "no kernel loaded" in no_load.stderr
    assert fake_kexec(n, "-l", "/run/rhaas/nope", "--command-line=x").returncode == 1
    boot = n.state("boot_id")
    farm.node_run(n, "kexec -l /run/rhaas/k --initrd=/run/rhaas/i '--command-line=a b=\"c d\" nonce=7'")
    assert farm.node_run(n, "cat /sys/kernel/kexec_loaded").strip() == "1"
    assert n.state("boot_id") == boot
    farm.node_run(n, "kexec -e", timeout=30)
    assert farm.node_run(n, "cat /proc/sys/kernel/random/boot_id") not in ("", boot)
    assert farm.node_run(n, "cat /proc/cmdline") == 'a b="c d" nonce=7\n'
    assert farm.node_run(n, "cat /sys/kernel/kexec_loaded").strip() == "0"
    assert farm.node_run(n, "ls -A /run/rhaas") == ""
    assert pid_alive(n.pid)  # the sshd listener survives the jump
    farm.wait_ssh([n], 30)


def test_teardown_leaves_nothing_and_runs_twice(tmp_path, operator):
    farm = NetnsFarm(tmp_path / "f", authorized_keys=operator[1], nodes_wanted=2)
    with pytest.raises(RuntimeError, match="boom"), farm:
        helper = farm.node_popen(farm.nodes[0], ["sleep", "300"])  # a stray process on a node
        made = {farm.sw_ns, *(n.ns for n in farm.nodes)}
        pids = [n.pid for n in farm.nodes] + [helper.pid]
        assert made <= namespaces()
        raise RuntimeError("boom")  # the test body fails: teardown still runs
    helper.wait(timeout=10)
    assert not made & namespaces()
    assert not any(pid_alive(p) for p in pids if p != helper.pid)
    assert not Path(f"/sys/class/net/{farm.host_link}").exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert farm.prefix not in links
    farm.cleanup()  # idempotent
    assert json.loads((tmp_path / "f" / "farm.json").read_text())["namespaces"] == []


def running(pid: int) -> bool:
    """Alive and not a zombie (orphans are re-parented to PID 1, which here does not reap them)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_run_killed_mid_way_is_finished_from_its_farm_json(tmp_path, operator):
    from netns_net import teardown

    script = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from netns_farm import NetnsFarm\n"
        f"NetnsFarm({str(tmp_path / 'f')!r}, authorized_keys={operator[1]!r}, nodes_wanted=2).start()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    doc = json.loads((tmp_path / "f" / "farm.json").read_text())
    try:
        assert done.returncode == -9, done.stderr
        assert set(doc["namespaces"]) <= namespaces() and len(doc["namespaces"]) == 3  # left behind
        left = [int(p) for ns in doc["namespaces"] for p in subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout.split()]
        assert len([p for p in left if running(p)]) >= 2  # the two sshd listeners still run
        cleanup = subprocess.run([sys.executable, str(Path(__file__).with_name("netns_farm.py")), "cleanup",
                                  str(tmp_path / "f")], capture_output=True, text=True, timeout=120, check=False)
        assert cleanup.returncode == 0, cleanup.stderr
        assert not set(doc["namespaces"]) & namespaces()
        assert not Path(f"/sys/class/net/{doc['prefix']}o").exists()
        assert not any(running(p) for p in left)
    finally:
        teardown(doc["namespaces"], [f"{doc['prefix']}o"])
