"""Power and boot device: the IPMI adapter, the routing policy and the CLI, against real
ipmi_sim BMCs (Debian's openipmi). The chassis state is read back twice: from the files the
BMC's chassis_control script keeps, and over IPMI with python-ipmi."""

# ruff: noqa: F811  (the fixtures imported from ipmi_fixtures come back as parameters)
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from click.testing import CliRunner
from ipmi_fixtures import SimBMC, ipmi_bmc, ipmi_sim_factory, requires_ipmi_sim  # noqa: F401
from worlds import within

from rhaas import model
from rhaas.adapters.bmc import BMCError, IPMIBmc
from rhaas.adapters.hil import HILClient
from rhaas.cli import cli
from rhaas.core import power as core
from rhaas.errors import AuthorizationError, RhaasError, UsageError
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
    # a real cycle, not a no-op: off, then ipmi_sim polled the chassis, then on
    assert "get power" in [c for _, c in calls[off:on]]
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
    with pytest.raises(BMCError) as err:  # the BMC's own 10 s budget, and a guard three times that
        within(30, IPMIBmc(ipmi_bmc.host, ipmi_bmc.port, "admin", secret, timeout=10).power_on)
    assert str(err.value) == f"BMC 127.0.0.1:{ipmi_bmc.port} rejected the credentials for user admin"
    assert err.value.kind == "credentials"
    assert secret not in repr(err.value) and ipmi_bmc.password not in str(err.value)
    assert ipmi_bmc.actions() == []


def test_unknown_user(ipmi_bmc):
    with pytest.raises(BMCError, match="rejected the credentials for user nobody$"):
        IPMIBmc(ipmi_bmc.host, ipmi_bmc.port, "nobody", ipmi_bmc.password).power_status()


def test_closed_port_is_reported_as_refused():
    sock, number = silent_udp_port()
    sock.close()  # nothing listens there now
    with pytest.raises(BMCError) as err:
        within(30, IPMIBmc("127.0.0.1", number, "admin", "pw12345", timeout=10).power_status)
    # refused, not timed out: the ICMP answer ended the call, the 10 s budget was not waited out
    assert str(err.value) == f"BMC 127.0.0.1:{number} did not answer (connection refused)"
    assert err.value.kind == "unreachable"


def test_silent_bmc_is_found_by_the_rmcp_ping():
    """A silent BMC is given up on after the RMCP ping goes unanswered, not after the 10 s budget
    (the watchdog's message would say "within 10 s"). `make bench` prints how long that takes."""
    sock, port = silent_udp_port()
    try:
        with pytest.raises(BMCError) as err:
            within(40, IPMIBmc("127.0.0.1", port, "admin", "pw12345", timeout=10).power_cycle)
        sock.settimeout(0)
        first, _ = sock.recvfrom(512)
    finally:
        sock.close()
    assert str(err.value) == f"BMC 127.0.0.1:{port} did not answer (no answer to RMCP ping)"
    assert err.value.kind == "unreachable"
    assert first[:4] == bytes([0x06, 0x00, 0xFF, 0x06])  # RMCP v1.0, no sequence, class ASF: the ping


def test_a_short_budget_ends_the_call_with_did_not_answer():
    # A 0.6 s budget narrows the two-second wait for the ping; the call ends by itself with a
    # "did not answer" line (the guard here only catches a hang; the time is in `make bench`).
    # The ping's socket timeout and the watchdog are both 0.6 s, so the words after "did not
    # answer" depend on which fires first; only the common part is asserted.
    sock, port = silent_udp_port()
    try:
        with pytest.raises(BMCError) as err:
            within(20, IPMIBmc("127.0.0.1", port, "admin", "pw12345", timeout=0.6).power_status)
    finally:
        sock.close()
    assert str(err.value).startswith(f"BMC 127.0.0.1:{port} did not answer")


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


class CallLog(HILClient):
    """The real HIL client; it notes each API call (route name and body) before making it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple] = []

    def call(self, name, body=None, query=None, **path_args):
        self.calls.append((name, body))
        return super().call(name, body, query, **path_args)


@pytest.fixture
def upstream(tmp_path, ipmi_sim_factory, start_serve):
    """A root `rhaas serve` whose node-01 (a real ipmi_sim, powered on) is in alice's project
    proj1, and whose node-02 is in bob's proj2: (served, sim, root store)."""
    from worlds import make_root

    sim = ipmi_sim_factory("node-01", power_on=True)
    root = make_root(tmp_path / "root",
                     nodes=[model.new_node("node-01", "registered", ipmi=sim.ipmi_doc()),
                            model.new_node("node-02", "registered")],
                     users=(("admin", "adminpw", True, ()), ("alice", "alicepw", False, ("proj1",)),
                            ("bob", "bobpw", False, ("proj2",))),
                     projects=("proj1", "proj2"))
    served = start_serve(tmp_path / "root")
    HILClient(served.url, "alice", "alicepw", timeout=10).connect_node("proj1", "node-01")
    HILClient(served.url, "bob", "bobpw", timeout=10).connect_node("proj2", "node-02")
    sim.clear_calls()
    return served, sim, root


def test_upstream_power_enables_obm_first_and_once(upstream):
    served, sim, root = upstream
    client = CallLog(served.url, "alice", "alicepw", timeout=10)
    up = core.backend_for(model.new_node("l1", "leased", upstream_name="node-01"), SETTINGS, None,
                          client_factory=lambda: client)
    assert up.power("status") == "on"
    up.power("reset")  # HIL has no reset: power_cycle with force, which obmd does as a reset
    off = sim.wait_for_call("set power 0")
    sim.wait_for_call("set power 1", after=off)
    up.set_bootdev("pxe")
    assert client.calls == [("node_set_obm", {"enabled": True}), ("node_power_status", None),
                            ("node_power_cycle", {"force": True}), ("node_set_bootdev", {"bootdev": "pxe"})]
    assert up.obm_enabled_here
    assert sim.power() == "on" and sim.boot() == "pxe"
    assert root.snapshot().node("node-01")["obm_enabled"] is True


def test_upstream_power_stops_at_a_refused_obm_enable(upstream):
    served, _, root = upstream
    client = CallLog(served.url, "alice", "alicepw", timeout=10)
    up = core.UpstreamPower("l1", "node-02", lambda: client, 5)  # node-02 is bob's
    with pytest.raises(AuthorizationError):
        up.power("cycle")
    assert client.calls == [("node_set_obm", {"enabled": True})]  # no power call without OBM
    assert not up.obm_enabled_here and root.snapshot().node("node-02")["obm_enabled"] is False


class AlreadyEnabledHIL(BaseHTTPRequestHandler):
    """A HIL-shaped server that refuses the OBM enable with 409 "OBM is already enabled" and
    accepts a power cycle. No server that runs here answers the enable that way (`rhaas serve`
    takes a second enable silently), so this loopback stand-in plays that upstream."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, str]]] = []

    def log_message(self, *args):
        pass

    def _handle(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.command, self.path))
        if self.path == "/v0/node/node-07/obm":
            status, body = 409, json.dumps({"type": "BlockedError", "msg": "OBM is already enabled"}).encode()
        elif self.path == "/v0/node/node-07/power_cycle":
            status, body = 200, b""
        else:
            status, body = 404, b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST = do_GET = _handle


def test_upstream_power_goes_on_when_obm_is_already_enabled():
    server = ThreadingHTTPServer(("127.0.0.1", 0), AlreadyEnabledHIL)
    AlreadyEnabledHIL.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = HILClient(f"http://127.0.0.1:{server.server_address[1]}", "alice", "pw", timeout=5)
        up = core.UpstreamPower("l1", "node-07", lambda: client, 5)
        up.power("cycle")
        up.power("cycle")
    finally:
        server.shutdown()
        server.server_close()
    assert AlreadyEnabledHIL.seen == [("PUT", "/v0/node/node-07/obm"), ("POST", "/v0/node/node-07/power_cycle"),
                                      ("POST", "/v0/node/node-07/power_cycle")]  # asked once, then trusted
    assert not up.obm_enabled_here  # it was someone else's enable; this backend must not undo it


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
    # run() returns when the command is done, and a dry run starts no thread that could call later
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
    res = within(30, run, "power", "on", "n1")  # connect-timeout is 5 s; the guard only catches a hang
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
        res = within(30, run, "power", "status", "n1", "--json")  # connect-timeout is 5 s
    finally:
        sock.close()
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
