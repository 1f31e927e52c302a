"""Power and boot device: the IPMI adapter, the routing policy and the CLI, against real
ipmi_sim BMCs (Debian's openipmi). The chassis state is read back twice: from the files the
BMC's chassis_control script keeps, and over IPMI with python-ipmi."""

from __future__ import annotations

import json
import socket
import time

import pytest
from click.testing import CliRunner

from ipmi_fixtures import SimBMC, ipmi_bmc, ipmi_sim_factory, requires_ipmi_sim  # noqa: F401
from rhaas import model
from rhaas.adapters.bmc import BMCError, IPMIBmc
from rhaas.cli import cli
from rhaas.core import power as core
from rhaas.errors import RhaasError, UsageError
from rhaas.store import Store

pytestmark = [pytest.mark.ipmi, requires_ipmi_sim]

SETTINGS = {"connect-timeout": 5.0, "upstream-timeout": 5.0, "ipmi-cipher-suite": 3,
            "ipmi-interface": "rmcpplus", "parallel": 8}


def bmc_of(sim: SimBMC, **kw) -> IPMIBmc:
    return IPMIBmc(sim.host, sim.port, sim.user, sim.password, **kw)


def pyipmi_view(sim: SimBMC):
    """(power_on, boot device) read with python-ipmi directly, bypassing rhaas."""
    import pyipmi
    import pyipmi.interfaces

    intf = pyipmi.interfaces.create_interface("rmcpplus", slave_address=0x81, host_target_address=0x20,
                                              keep_alive_interval=0, cipher_suite=3)
    ipmi = pyipmi.create_connection(intf)
    ipmi.session.set_session_type_rmcp(sim.host, port=sim.port)
    ipmi.session.set_auth_type_user(sim.user, sim.password)
    ipmi.target = pyipmi.Target(ipmb_address=0x20)
    with ipmi:
        return ipmi.get_chassis_status().power_on, ipmi.get_boot_device()


def silent_udp_port():
    """A bound UDP socket that never answers: a BMC that has gone quiet."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


# -- the adapter --------------------------------------------------------------------------------


def test_status_on_off_reach_the_chassis(ipmi_bmc):
    bmc = bmc_of(ipmi_bmc)
    assert bmc.power_status() == "off"

    bmc.power_on()
    assert ipmi_bmc.power() == "on"
    assert bmc.power_status() == "on"
    assert pyipmi_view(ipmi_bmc)[0] is True
    assert "set power 1" in ipmi_bmc.actions()

    bmc.power_off()
    assert ipmi_bmc.power() == "off"
    assert bmc.power_status() == "off"
    assert pyipmi_view(ipmi_bmc)[0] is False
    assert ipmi_bmc.actions()[-1] == "set power 0"


def test_cycle_is_off_then_on(ipmi_sim_factory):
    sim = ipmi_sim_factory("c1", power_on=True)
    sim.clear_calls()
    bmc_of(sim).power_cycle()

    off = sim.wait_for_call("set power 0")
    on = sim.wait_for_call("set power 1", after=off)
    calls = sim.timed_calls()
    assert "get power" in [c for _, c in calls[off:on]]  # ipmi_sim polled before powering up
    assert calls[on][0] - calls[off][0] >= 0.5  # really off for a while, not a no-op
    assert sim.power() == "on"
    assert pyipmi_view(sim)[0] is True


def test_cycle_of_a_chassis_that_is_off_powers_it_up(ipmi_bmc):
    assert ipmi_bmc.power() == "off"
    bmc_of(ipmi_bmc).power_cycle()
    assert ipmi_bmc.actions() == ["set power 1"]
    assert ipmi_bmc.power() == "on"


def test_reset(ipmi_sim_factory):
    sim = ipmi_sim_factory("r1", power_on=True)
    bmc_of(sim).power_reset()
    assert sim.actions() == ["set reset 1"]
    assert sim.power() == "on"


def test_bootdev_pxe_disk_none(ipmi_bmc):
    from pyipmi.chassis import BootDevice

    bmc = bmc_of(ipmi_bmc)
    for dev, script_word, raw in (("pxe", "pxe", BootDevice.PXE), ("disk", "default", BootDevice.DEFAULT_HDD),
                                  ("none", "none", BootDevice.NO_OVERRIDE)):
        bmc.set_bootdev(dev)
        assert ipmi_bmc.boot() == script_word
        assert bmc.get_bootdev() == dev
        assert pyipmi_view(ipmi_bmc)[1] == raw
    with pytest.raises(BMCError, match="unknown boot device 'floppy'"):
        bmc.set_bootdev("floppy")


def test_rmcp_ipmi15_interface(ipmi_bmc):
    bmc = bmc_of(ipmi_bmc, interface="rmcp")
    bmc.power_on()
    assert bmc.power_status() == "on"
    assert ipmi_bmc.power() == "on"


def test_sessions_are_closed(ipmi_bmc):
    # the user may hold 10 sessions at once (lan.conf); leaking one per call would fail here
    bmc = bmc_of(ipmi_bmc)
    assert [bmc.power_status() for _ in range(14)] == ["off"] * 14


def test_wrong_password_is_one_bounded_line(ipmi_bmc):
    secret = "not-" + ipmi_bmc.password
    t0 = time.monotonic()
    with pytest.raises(BMCError) as err:
        IPMIBmc(ipmi_bmc.host, ipmi_bmc.port, "admin", secret).power_on()
    assert time.monotonic() - t0 < 4
    assert str(err.value) == f"BMC 127.0.0.1:{ipmi_bmc.port} rejected the credentials for user admin"
    assert err.value.kind == "credentials"
    assert secret not in repr(err.value) and ipmi_bmc.password not in str(err.value)
    assert ipmi_bmc.actions() == []


def test_unknown_user(ipmi_bmc):
    with pytest.raises(BMCError, match="rejected the credentials for user nobody$"):
        IPMIBmc(ipmi_bmc.host, ipmi_bmc.port, "nobody", ipmi_bmc.password).power_status()


def test_closed_port_fails_at_once():
    sock, number = silent_udp_port()
    sock.close()  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(BMCError) as err:
        IPMIBmc("127.0.0.1", number, "admin", "pw12345").power_status()
    assert time.monotonic() - t0 < 2
    assert str(err.value) == f"BMC 127.0.0.1:{number} did not answer (connection refused)"


def test_silent_bmc_fails_within_seconds():
    sock, port = silent_udp_port()
    try:
        t0 = time.monotonic()
        with pytest.raises(BMCError) as err:
            IPMIBmc("127.0.0.1", port, "admin", "pw12345", timeout=10).power_cycle()
        elapsed = time.monotonic() - t0
    finally:
        sock.close()
    assert 1.5 < elapsed < 4
    assert str(err.value).startswith(f"BMC 127.0.0.1:{port} did not answer")
    assert err.value.kind == "unreachable"


def test_whole_call_is_bounded_by_timeout():
    # a one-second budget cuts the two-second wait for the ping short
    sock, port = silent_udp_port()
    try:
        t0 = time.monotonic()
        with pytest.raises(BMCError, match="did not answer"):
            IPMIBmc("127.0.0.1", port, "admin", "pw12345", timeout=0.6).power_status()
        assert time.monotonic() - t0 < 1.5
    finally:
        sock.close()


# -- the routing policy -------------------------------------------------------------------------


def test_backend_for_routes_by_node_source(ipmi_bmc):
    reg = model.new_node("n1", "registered", ipmi=ipmi_bmc.ipmi_doc(cipher_suite=None, interface=None))
    backend = core.backend_for(reg, {**SETTINGS, "ipmi-interface": "rmcp"}, store=None)
    assert isinstance(backend, core.IPMIPower)
    assert backend.describe() == f"ipmi admin@127.0.0.1:{ipmi_bmc.port} (rmcp)"  # from settings
    assert ipmi_bmc.password not in backend.describe() + repr(backend.bmc)
    assert backend.power("status") == "off"

    leased = model.new_node("l1", "leased", upstream_name="node-07")
    up = core.backend_for(leased, SETTINGS, store=None)  # contacts nothing
    assert isinstance(up, core.UpstreamPower) and up.describe() == "upstream node node-07"

    with pytest.raises(RhaasError) as err:
        core.backend_for(model.new_node("bare", "registered"), SETTINGS, store=None)
    assert str(err.value) == ("node bare has no power backend: register it with --ipmi "
                              "or lease it from an upstream")


class RecordingUpstream:
    """Stand-in for the lead's HIL client (rhaas.adapters.hil), which is not written yet:
    records the calls UpstreamPower makes, in order, with HIL's answers."""

    def __init__(self, obm_error: Exception | None = None):
        self.calls: list[tuple] = []
        self.obm_error = obm_error

    def set_obm(self, node, enabled):
        self.calls.append(("obm", node, enabled))
        if self.obm_error:
            raise self.obm_error

    def power(self, node, op):
        self.calls.append(("power", node, op))
        return "on" if op == "status" else None

    def set_bootdev(self, node, dev):
        self.calls.append(("bootdev", node, dev))


def test_upstream_power_enables_obm_first_and_once():
    client = RecordingUpstream()
    up = core.backend_for(model.new_node("l1", "leased", upstream_name="node-07"), SETTINGS, None,
                          client_factory=lambda: client)
    assert up.power("status") == "on"
    up.power("reset")  # HIL has no reset: power_cycle with force, which obmd does as a reset
    up.set_bootdev("pxe")
    assert client.calls == [("obm", "node-07", True), ("power", "node-07", "status"),
                            ("power", "node-07", "cycle"), ("bootdev", "node-07", "pxe")]
    assert up.obm_enabled_here


def test_upstream_power_tolerates_obm_already_enabled_only():
    from rhaas.errors import BlockedError

    client = RecordingUpstream(obm_error=BlockedError("OBM is already enabled"))
    up = core.UpstreamPower("l1", "node-07", lambda: client, 5)
    up.power("cycle")
    assert client.calls[-1] == ("power", "node-07", "cycle")

    client = RecordingUpstream(obm_error=BlockedError("Node not in project"))
    up = core.UpstreamPower("l1", "node-07", lambda: client, 5)
    with pytest.raises(BlockedError):
        up.power("cycle")
    assert [c[0] for c in client.calls] == ["obm"]  # no power call without OBM


# -- fan-out and the inventory ------------------------------------------------------------------


@pytest.fixture
def home(rhaas_home):
    """An empty inventory in RHAAS_HOME (conftest's rhaas_home), settings only from the store."""
    store = Store(rhaas_home)
    store.create()
    with store.transaction() as tx:
        tx.set_config("connect-timeout", 5.0)
    return store


def add_nodes(store: Store, sims: list[SimBMC], extra: list[dict] = ()):
    with store.transaction() as tx:
        tx.put_nodes([model.new_node(s.name, "registered", ipmi=s.ipmi_doc()) for s in sims] + list(extra))


def power_events(store: Store, action: str) -> dict:
    return {e["node"]: e for e in store.snapshot().events() if e["action"] == action}


def test_power_nodes_runs_in_parallel_and_records_once(home, ipmi_sim_factory):
    sims = [ipmi_sim_factory("n1"), ipmi_sim_factory("n2", power_on=True)]
    add_nodes(home, sims, [model.new_node("bare", "registered")])
    writes = home.snapshot().writes

    results = core.power_nodes(home, SETTINGS, ["n1", "n2", "bare"], "status", parallel=4)
    assert [(r["node"], r["outcome"], r.get("power")) for r in results] == [
        ("n1", "ok", "off"), ("n2", "ok", "on"), ("bare", "failed", None)]
    assert "no power backend" in results[2]["reason"]
    assert home.snapshot().writes == writes + 1  # one transaction for the whole batch
    ev = power_events(home, "power-status")
    assert ev["n1"]["outcome"] == "ok" and ev["n1"]["detail"]["power"] == "off"
    assert ev["bare"]["outcome"] == "failed"
    assert sims[0].password not in json.dumps(home.snapshot().events())

    results = core.power_nodes(home, SETTINGS, ["n1", "n2"], "on", parallel=2)
    assert [r["outcome"] for r in results] == ["ok", "ok"]
    assert [s.power() for s in sims] == ["on", "on"]


def test_power_nodes_rejects_unknown_names_before_anything(home, ipmi_bmc):
    add_nodes(home, [ipmi_bmc])
    writes = home.snapshot().writes
    with pytest.raises(UsageError, match="unknown node: ghost"):
        core.power_nodes(home, SETTINGS, ["n1", "ghost"], "on")
    assert ipmi_bmc.calls() == [] and home.snapshot().writes == writes


def test_set_bootdev_nodes_updates_inventory(home, ipmi_sim_factory):
    sims = [ipmi_sim_factory("n1"), ipmi_sim_factory("n2")]
    add_nodes(home, sims)
    results = core.set_bootdev_nodes(home, SETTINGS, ["n1", "n2"], "pxe")
    assert [r["outcome"] for r in results] == ["ok", "ok"]
    assert [s.boot() for s in sims] == ["pxe", "pxe"]
    assert [home.snapshot().node(n)["bootdev"] for n in ("n1", "n2")] == ["pxe", "pxe"]
    assert power_events(home, "bootdev")["n2"]["detail"]["bootdev"] == "pxe"


def test_bad_password_fails_only_that_node(home, ipmi_sim_factory):
    good, bad = ipmi_sim_factory("n1"), ipmi_sim_factory("n2")
    with home.transaction() as tx:
        tx.put_nodes([model.new_node("n1", "registered", ipmi=good.ipmi_doc()),
                      model.new_node("n2", "registered", ipmi=bad.ipmi_doc(password="wrong-secret"))])
    results = core.power_nodes(home, SETTINGS, ["n1", "n2"], "on")
    assert [r["outcome"] for r in results] == ["ok", "failed"]
    assert results[1]["reason"] == f"BMC 127.0.0.1:{bad.port} rejected the credentials for user admin"
    assert good.power() == "on" and bad.power() == "off"


# -- the command line -----------------------------------------------------------------------------


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def test_cli_status_json_nodeset(home, ipmi_sim_factory):
    add_nodes(home, [ipmi_sim_factory("n1", power_on=True), ipmi_sim_factory("n2")])
    res = run("power", "status", "n[1-2]", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [(d["node"], d["outcome"], d["power"]) for d in doc] == [("n1", "ok", "on"), ("n2", "ok", "off")]


def test_cli_plain_output_and_stdin(home, ipmi_sim_factory):
    sims = [ipmi_sim_factory("n1"), ipmi_sim_factory("n2", power_on=True)]
    add_nodes(home, sims)
    res = run("power", "status", "-", input="n2\nn1\n")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "n2\tok\ton\nn1\tok\toff\n"


def test_cli_cycle_json_reaches_the_bmc(home, ipmi_sim_factory):
    sim = ipmi_sim_factory("n1", power_on=True)
    add_nodes(home, [sim])
    sim.clear_calls()
    res = run("power", "cycle", "n1", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)[0]["outcome"] == "ok"
    off = sim.wait_for_call("set power 0")
    sim.wait_for_call("set power 1", after=off)
    assert sim.power() == "on"
    assert power_events(home, "power-cycle")["n1"]["outcome"] == "ok"


def test_cli_bootdev(home, ipmi_sim_factory):
    sims = [ipmi_sim_factory("n1"), ipmi_sim_factory("n2")]
    add_nodes(home, sims)
    res = run("bootdev", "disk", "n[1-2]")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "n1\tok\tboot device disk\nn2\tok\tboot device disk\n"
    assert [s.boot() for s in sims] == ["default", "default"]
    assert home.snapshot().node("n2")["bootdev"] == "disk"


def test_cli_dry_run_changes_nothing(home, ipmi_bmc):
    add_nodes(home, [ipmi_bmc])
    writes = home.snapshot().writes
    res = run("power", "cycle", "n1", "--dry-run")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"n1\twould power cycle\tipmi admin@127.0.0.1:{ipmi_bmc.port} (rmcpplus, cipher suite 3)\n"
    res = run("bootdev", "pxe", "n1", "--dry-run", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["dry_run"] is True
    time.sleep(0.2)
    assert ipmi_bmc.calls() == []  # the BMC was never contacted
    assert home.snapshot().writes == writes
    assert home.snapshot().node("n1")["bootdev"] is None


def test_cli_unknown_node_is_usage_error(home, ipmi_bmc):
    add_nodes(home, [ipmi_bmc])
    res = run("power", "on", "n1", "ghost")
    assert res.exit_code == 2
    assert res.stderr == "rhaas: error: unknown node: ghost (see 'rhaas list')\n"
    assert res.stdout == ""
    assert ipmi_bmc.calls() == [] and ipmi_bmc.power() == "off"


def test_cli_wrong_password_exit_1_no_secret(home, ipmi_bmc):
    secret = "hunter2-wrong"
    with home.transaction() as tx:
        tx.put_nodes([model.new_node("n1", "registered", ipmi=ipmi_bmc.ipmi_doc(password=secret))])
    t0 = time.monotonic()
    res = run("power", "on", "n1")
    assert time.monotonic() - t0 < 5
    assert res.exit_code == 1
    assert res.stdout == f"n1\tfailed\tBMC 127.0.0.1:{ipmi_bmc.port} rejected the credentials for user admin\n"
    assert res.stderr == "rhaas: error: power on failed on 1 node: n1\n"
    assert secret not in res.output and "Traceback" not in res.output
    assert ipmi_bmc.power() == "off"


def test_cli_unreachable_bmc_bounded(home):
    sock, port = silent_udp_port()
    try:
        with home.transaction() as tx:
            tx.put_nodes([model.new_node("n1", "registered",
                                         ipmi={"host": "127.0.0.1", "port": port, "user": "admin",
                                               "password": "pw-secret"})])
        t0 = time.monotonic()
        res = run("power", "status", "n1", "--json")
        elapsed = time.monotonic() - t0
    finally:
        sock.close()
    assert elapsed < 5
    assert res.exit_code == 1
    assert json.loads(res.stdout)[0]["reason"] == f"BMC 127.0.0.1:{port} did not answer (no answer to RMCP ping)"
    assert "pw-secret" not in res.output


def test_cli_help_has_examples():
    for cmd, example in (("power", "rhaas power cycle node-07"), ("bootdev", "rhaas bootdev pxe node-[01-04]")):
        res = run(cmd, "--help")
        assert res.exit_code == 0 and example in res.stdout


# -- two levels: a leased node's power goes through the upstream's API to the real BMC ----------


def test_leased_node_power_goes_through_upstream_to_bmc(tmp_path, ipmi_sim_factory, start_serve):
    from worlds import make_root

    sim = ipmi_sim_factory("node-01", power_on=True)
    root = tmp_path / "root"
    make_root(root, nodes=[model.new_node("node-01", "registered", ipmi=sim.ipmi_doc())],
              users=(("admin", "adminpw", True, ()), ("alice", "alicepw", False, ("proj1",))),
              projects=("proj1",))
    served = start_serve(root)

    derived = Store(tmp_path / "derived")
    derived.create()
    with derived.transaction() as tx:
        for key, value in (("upstream", served.url), ("user", "alice"), ("project", "proj1"),
                           ("upstream-password", "alicepw"), ("upstream-timeout", 10.0)):
            tx.set_config(key, value)
        tx.put_nodes([model.new_node("l1", "leased", upstream_name="node-01")])
    from rhaas.core.instance import upstream_client

    upstream_client(derived).connect_node("proj1", "node-01")
    sim.clear_calls()

    results = core.power_nodes(derived, SETTINGS, ["l1"], "cycle")
    assert [(r["outcome"], r["reason"]) for r in results] == [("ok", None)]
    off = sim.wait_for_call("set power 0")
    sim.wait_for_call("set power 1", after=off)
    ev = power_events(derived, "power-cycle")["l1"]
    assert ev["detail"] == {"backend": "upstream node node-01", "obm": "enabled"}
    # OBM stays enabled upstream (the free path turns it off), so status needs no new enable
    assert core.power_nodes(derived, SETTINGS, ["l1"], "status")[0]["power"] == "on"
    assert [r["outcome"] for r in core.set_bootdev_nodes(derived, SETTINGS, ["l1"], "pxe")] == ["ok"]
    assert sim.boot() == "pxe" and derived.snapshot().node("l1")["bootdev"] == "pxe"
    assert Store(root).snapshot().node("node-01")["obm_enabled"] is True
