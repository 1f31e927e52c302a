"""kexec in nested instances, pipelines and the free agreement, on the simulated farm (real SSH).

The farm nodes follow their BMC's power state file, so a power cycle through Debian's
ipmi_sim really reboots them (new boot id).
"""

# ruff: noqa: F811  (fixtures imported from the fixture modules come back as parameters)
from __future__ import annotations

import gzip
import json
import os

import pytest
from farm_fixtures import _farm_process, client_key, farm_home, install_client_key, sim_farm  # noqa: F401
from ipmi_fixtures import ipmi_sim_factory, requires_ipmi_sim  # noqa: F401
from worlds import make_root, rhaas

from rhaas.model import new_node
from rhaas.store import Store


@pytest.fixture
def image_files(tmp_path):
    from rhaas.core.overlay import S_IFDIR, S_IFREG, CpioEntry, write_newc

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(32 * 1024))
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(gzip.compress(write_newc([CpioEntry("etc", S_IFDIR | 0o755),
                                                 CpioEntry("etc/rhaas-image", S_IFREG | 0o644, b"B\n")]), mtime=0))
    return kernel, initrd


def add_image(home, name, files, append="console=ttyS0"):
    rhaas(home, "image", "add", name, "--kernel", files[0], "--initrd", files[1], "--append", append, check=True)


@requires_ipmi_sim
def test_fallback_at_level_two_reaches_the_root_bmc(tmp_path, start_serve, sim_farm, client_key,
                                                    ipmi_sim_factory, image_files):
    root, d1, d2 = tmp_path / "root", tmp_path / "d1", tmp_path / "d2"
    name = sim_farm.names[12]
    farm_node = sim_farm.node(name)
    bmc = ipmi_sim_factory(name, power_on=True)
    node = new_node(name, "registered", ssh=farm_node["ssh"], ssh_host_key=farm_node["host_key"],
                    ipmi=bmc.ipmi_doc(), nics=[{"label": "eth0", "macaddr": "52:54:00:00:01:01", "networks": {}}])
    make_root(root, nodes=[node], users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",))),
              projects=("p1",))
    s0 = start_serve(root)
    e1, e2 = {"RHAAS_UPSTREAM_PASSWORD": "pw1"}, {"RHAAS_UPSTREAM_PASSWORD": "pw2"}
    rhaas(d1, "init", "--upstream", s0.url, "--project", "p1", "--user", "alice", env=e1, check=True)
    rhaas(d1, "lease", name, env=e1, check=True)
    rhaas(d1, "project", "add", "p2", check=True)
    rhaas(d1, "user", "add", "bob", "--project", "p2", "--password-stdin", input="pw2\n", check=True)
    s1 = start_serve(d1)
    install_client_key(d2, client_key)
    rhaas(d2, "init", "--upstream", s1.url, "--project", "p2", "--user", "bob", env=e2, check=True)
    rhaas(d2, "lease", name, env=e2, check=True)
    shown = json.loads(rhaas(d2, "show", name, "--json").stdout)
    # the SSH path and the pinned host key travelled up two levels in the metadata
    assert shown["ssh"] == farm_node["ssh"] and shown["ssh_host_key"] == farm_node["host_key"]

    add_image(d2, "b", image_files)
    sim_farm.set_faults({name: {"load_fails": True, "power_file": str(bmc.power_file)}})
    before = sim_farm.state(name)["boot_id"]
    bmc.clear_calls()
    # over SSH from level two (the root here holds no SSH access: its key is not the farm's)
    proc = rhaas(d2, "kexec", name, "--image", "b", "--timeout", "30", "--json", "--via", "ssh", env=e2, timeout=120)
    out = json.loads(proc.stdout)[0]
    assert proc.returncode == 1 and out["outcome"] == "fallback", proc.stderr
    assert "kexec -l failed" in out["reason"]
    off = bmc.wait_for_call("set power 0", timeout=20)
    bmc.wait_for_call("set power 1", after=off, timeout=20)
    assert bmc.boot() == "pxe"
    after = sim_farm.state(name)["boot_id"]
    assert after != before and out["boot_id"] == after
    assert Store(d2).snapshot().node(name)["status"] == "fallback"
    assert any(e["action"] == "power-cycle" for e in Store(root).snapshot().events())
    sim_farm.set_faults({})


def test_pipeline_list_head_kexec(sim_farm, farm_home, rhaas_home, image_files):
    names = sim_farm.names[:6]
    store = farm_home(rhaas_home, names)
    with store.transaction("test") as tx:
        tx.put_node(dict(tx.node(names[0]), project="busy"))  # assigned: not --available
    add_image(rhaas_home, "b", image_files)
    before = {n: sim_farm.state(n)["boot_id"] for n in names}
    # rhaas list --available -q | head -3 | rhaas kexec --image b -
    listed = rhaas(rhaas_home, "list", "--available", "-q").stdout
    picked = "".join(listed.splitlines(keepends=True)[:3])
    proc = rhaas(rhaas_home, "kexec", "--image", "b", "-", "--json", input=picked, timeout=120)
    assert proc.returncode == 0, proc.stderr
    done = {r["node"]: r for r in json.loads(proc.stdout)}
    assert sorted(done) == names[1:4]
    for n in names[1:4]:
        state = sim_farm.state(n)
        assert state["boot_id"] != before[n] and done[n]["nonce"] in state["cmdline"]
    for n in (names[0], *names[4:]):
        assert sim_farm.state(n)["boot_id"] == before[n]  # untouched
    # and the real shell pipeline gives the same shape of answer
    sh = "rhaas list --available -q | head -2 | rhaas kexec --image b - --json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    env["RHAAS_HOME"] = str(rhaas_home)
    env["PATH"] = os.path.dirname(os.sys.executable) + ":" + env["PATH"]
    import subprocess

    out = subprocess.run(["bash", "-o", "pipefail", "-c", sh], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert [r["outcome"] for r in json.loads(out.stdout)] == ["ok", "ok"]


def test_free_returns_nodes_to_the_standby_image(tmp_path, start_serve, sim_farm, client_key, image_files):
    root, home = tmp_path / "root", tmp_path / "d"
    names = sim_farm.names[14:16]
    nodes = [new_node(n, "registered", ssh=sim_farm.node(n)["ssh"], ssh_host_key=sim_farm.node(n)["host_key"])
             for n in names]
    make_root(root, nodes=nodes, users=(("admin", "a", True, ()), ("alice", "pw", False, ("p1",))),
              projects=("p1",))
    served = start_serve(root)
    env = {"RHAAS_UPSTREAM_PASSWORD": "pw"}
    install_client_key(home, client_key)
    rhaas(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice", env=env, check=True)
    rhaas(home, "lease", *names, env=env, check=True)
    add_image(home, "standby", image_files, append="console=ttyS0 rhaas.role=standby")
    rhaas(home, "config", "set", "standby-image", "standby", check=True)
    before = {n: sim_farm.state(n)["boot_id"] for n in names}
    proc = rhaas(home, "free", *names, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for n in names:
        state = sim_farm.state(n)
        assert state["boot_id"] != before[n] and "rhaas.role=standby" in state["cmdline"]
    assert rhaas(home, "list", "-q").stdout == ""
    assert all(n["project"] is None for n in Store(root).snapshot().nodes())
