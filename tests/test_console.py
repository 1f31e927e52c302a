"""Node consoles over real parts: Debian's ipmi_sim with Serial-over-LAN wired to a TCP "serial
port" this test serves (it writes known lines, as a node's UART would), rhaas at the root
reading it with ipmitool, `rhaas serve` answering HIL's console call, and derived instances
passing it on. Nothing is mocked except the node itself, whose serial port is this socket.
"""


# ruff: noqa: F811  (fixtures imported from farm_fixtures come back as parameters)
from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import socket
import subprocess
import threading
import time

import pytest
from farm_fixtures import _farm_process, client_key, farm_home, sim_farm  # noqa: F401
from ipmi_fixtures import EMU_FILE, IPMI_SIM, SimBMC, _answers_ping, free_udp_port, requires_ipmi_sim
from worlds import make_root, plain_node, rhaas, wait_for, within

from rhaas.core.console import RING_BYTES, ConsoleHub, Ring, text_lines
from rhaas.store import Store

pytestmark = [pytest.mark.ipmi, requires_ipmi_sim]

SOL_LAN_CONF = """\
name "{name}"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid {guid}
  endlan
  sol "tcp:127.0.0.1:{serial}" 115200 history=65536
  user 2 true  "admin" "{password}" admin 10 none md2 md5 straight
"""


class SerialPort:
    """The node's side of the wire: a TCP server ipmi_sim connects to (as to QEMU's chardev)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conn = conn

    def write(self, text: str) -> None:
        wait_for(lambda: self.conn is not None, timeout=15, what="ipmi_sim to connect to the serial port")
        self.conn.sendall(text.replace("\n", "\r\n").encode())

    def close(self):
        self.sock.close()
        if self.conn is not None:
            self.conn.close()


@pytest.fixture
def sol_node(tmp_path):
    """(SimBMC, SerialPort): one ipmi_sim whose SOL is the serial port; stopped by PID after."""
    if IPMI_SIM is None:
        pytest.skip("ipmi_sim is not on PATH")
    serial = SerialPort()
    d = tmp_path / "bmc"
    (d / "state").mkdir(parents=True)
    (d / "bmc.emu").write_text(EMU_FILE)
    password = secrets.token_hex(8)
    for _attempt in range(3):
        port = free_udp_port()
        conf = d / "lan.conf"
        conf.write_text(SOL_LAN_CONF.format(name="node-01", port=port, guid=secrets.token_hex(16),
                                            serial=serial.port, password=password))
        with open(d / "ipmi_sim.log", "ab") as log:
            proc = subprocess.Popen([IPMI_SIM, "-c", str(conf), "-f", str(d / "bmc.emu"), "-s", str(d / "state"), "-n"],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        bmc = SimBMC("node-01", "127.0.0.1", port, "admin", password, d, proc.pid, proc)
        if wait_for(lambda p=port: _answers_ping("127.0.0.1", p), timeout=10):
            break
        bmc.stop()
    else:
        raise RuntimeError("ipmi_sim did not come up")
    wait_for(lambda: serial.conn is not None, timeout=15, what="ipmi_sim to connect to the serial port")
    yield bmc, serial
    bmc.stop()
    serial.close()


def ipmitool(bmc: SimBMC, *args: str, stdin: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    env = {**os.environ, "IPMITOOL_PASSWORD": bmc.password}
    return subprocess.run(["ipmitool", "-I", "lanplus", "-C", "3", "-H", bmc.host, "-p", str(bmc.port),
                           "-U", bmc.user, "-E", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def active_sessions(bmc: SimBMC) -> int:
    """Sessions open at the BMC besides the one asking (ipmitool session info)."""
    out = ipmitool(bmc, "session", "info", "active").stdout
    counts = [int(line.split(":")[1]) for line in out.splitlines() if line.strip().startswith("active sessions")]
    return counts[0] - 1 if counts else -1


def sol_is_free(bmc: SimBMC) -> bool:
    """A new SOL activation is accepted (the payload is not held by a session left behind)."""
    proc = ipmitool(bmc, "sol", "activate", stdin="")
    return "SOL Session operational" in proc.stdout and "already active" not in proc.stdout + proc.stderr


def boot_lines(serial: SerialPort, n: int = 30, tag: str = "boot") -> list[str]:
    lines = [f"[    {i}.000000] {tag} line {i:02d}" for i in range(1, n + 1)]
    serial.write("\n".join(lines) + "\n")
    return lines


def sol_doc(bmc: SimBMC) -> dict:
    return bmc.ipmi_doc()


# -- at the root ---------------------------------------------------------------------------------
def test_root_shows_the_last_lines_and_closes_the_session(tmp_path, sol_node):
    bmc, serial = sol_node
    home = tmp_path / "root"
    make_root(home, nodes=[plain_node(1, ipmi=sol_doc(bmc))])
    lines = boot_lines(serial)
    wait_for(lambda: sol_is_free(bmc), timeout=10, what="the BMC to accept SOL")  # history has the lines now

    proc = rhaas(home, "console", "node-01", "--lines", "20", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert text_lines(proc.stdout.encode()) == lines[-20:]
    # the reader stopped: no session left at the BMC, and SOL can be activated again
    assert wait_for(lambda: active_sessions(bmc) == 0, timeout=15)
    assert sol_is_free(bmc)


def test_root_follow_streams_live_and_ends_cleanly_on_ctrl_c(tmp_path, sol_node):
    bmc, serial = sol_node
    home = tmp_path / "root"
    make_root(home, nodes=[plain_node(1, ipmi=sol_doc(bmc))])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    env["RHAAS_HOME"] = str(home)
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "rhaas", "console", "node-01", "--follow", "--lines", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out = bytearray()

        def read_until(marker: bytes) -> None:
            while marker not in out:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"stream ended early: {bytes(out)!r} {proc.stderr.read()!r}"
                out.extend(chunk)

        wait_for(lambda: active_sessions(bmc) >= 1, timeout=20, what="the SOL session to open")
        time.sleep(0.5)  # the live session is up; what the node writes now comes through it
        serial.write("live line after attach\n")
        within(30, read_until, b"live line after attach")
        proc.send_signal(2)  # Ctrl-C
        rc = proc.wait(20)
        err = proc.stderr.read().decode()
        assert rc == 130 and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_for(lambda: active_sessions(bmc) == 0, timeout=15)
    assert sol_is_free(bmc)


# -- rhaas serve, as HIL's console client sees it -----------------------------------------------------
def _get(url: str, path: str, user: str, password: str, read: bool = True):
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    conn.request("GET", path, headers={"Authorization": f"Basic {auth}"})
    resp = conn.getresponse()
    if not read:
        return conn, resp
    body = resp.read()
    conn.close()
    return resp.status, body


def _put(url: str, path: str, user: str, password: str, doc: dict) -> int:
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    conn.request("PUT", path, body=json.dumps(doc), headers={"Authorization": f"Basic {auth}"})
    status = conn.getresponse().status
    conn.close()
    return status


def test_serve_console_follows_hil_semantics(tmp_path, start_serve, sol_node):
    bmc, serial = sol_node
    home = tmp_path / "root"
    node = plain_node(1, ipmi=sol_doc(bmc), project="p1")
    make_root(home, nodes=[node], projects=("p1", "p2"),
              users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",)), ("bob", "pw2", False, ("p2",))))
    lines = boot_lines(serial, tag="secret")
    s = start_serve(home)
    path = "/v0/node/node-01/console"

    status, body = _get(s.url, path, "alice", "pw1")
    assert status == 409 and json.loads(body) == {"type": "BlockedError", "msg": "OBM is not enabled"}
    assert _put(s.url, "/v0/node/node-01/obm", "alice", "pw1", {"enabled": True}) == 200

    # another project's member gets an error and not one byte of the console
    status, body = _get(s.url, path, "bob", "pw2")
    assert status == 401 and b"secret" not in body
    assert json.loads(body)["type"] == "AuthorizationError"
    status, body = _get(s.url, path + "?lines=5&follow=no", "bob", "pw2")
    assert status == 401 and b"secret" not in body
    # bad arguments are HIL's 400
    assert _get(s.url, path + "?lines=abc", "alice", "pw1")[0] == 400
    assert _get(s.url, path + "?colour=red", "alice", "pw1")[0] == 400

    status, body = _get(s.url, path + "?lines=5&follow=no", "alice", "pw1")
    assert status == 200 and text_lines(body) == lines[-5:]

    # HIL's form (no query): what is kept, then the live console, until the client goes away
    conn, resp = _get(s.url, path, "alice", "pw1", read=False)
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/octet-stream"
    got = bytearray()

    def read_until(marker: bytes) -> None:
        while marker not in got:
            chunk = resp.read1(4096)
            assert chunk, "the stream ended"
            got.extend(chunk)

    within(30, read_until, lines[-1].encode())
    wait_for(lambda: active_sessions(bmc) >= 1, timeout=10, what="serve's SOL session")
    time.sleep(0.5)
    serial.write("live after the stream began\n")
    within(30, read_until, b"live after the stream began")
    resp.close()  # the client goes away: serve lets go of the console and the BMC session
    conn.close()
    assert wait_for(lambda: active_sessions(bmc) == 0, timeout=20)
    assert sol_is_free(bmc)

    # OBM off: the console is refused again
    assert _put(s.url, "/v0/node/node-01/obm", "alice", "pw1", {"enabled": False}) == 200
    assert _get(s.url, path, "alice", "pw1")[0] == 409


def test_console_through_two_derived_levels(tmp_path, start_serve, sol_node):
    bmc, serial = sol_node
    root, d1, d2 = tmp_path / "root", tmp_path / "d1", tmp_path / "d2"
    make_root(root, nodes=[plain_node(1, ipmi=sol_doc(bmc))], projects=("p1",),
              users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",))))
    s0 = start_serve(root)
    e1 = {"RHAAS_UPSTREAM_PASSWORD": "pw1"}
    rhaas(d1, "init", "--upstream", s0.url, "--project", "p1", "--user", "alice", env=e1, check=True)
    assert rhaas(d1, "lease", "1", env=e1).returncode == 0
    rhaas(d1, "project", "add", "p2", check=True)
    rhaas(d1, "user", "add", "bob", "--project", "p2", "--password-stdin", input="pw2\n", check=True)
    s1 = start_serve(d1)
    e2 = {"RHAAS_UPSTREAM_PASSWORD": "pw2"}
    rhaas(d2, "init", "--upstream", s1.url, "--project", "p2", "--user", "bob", env=e2, check=True)
    assert rhaas(d2, "lease", "1", env=e2).returncode == 0

    lines = boot_lines(serial, tag="nested")
    proc = rhaas(d2, "console", "node-01", "--lines", "20", env=e2, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert text_lines(proc.stdout.encode()) == lines[-20:]
    # every level let go: no session at the BMC
    assert wait_for(lambda: active_sessions(bmc) == 0, timeout=20)
    assert sol_is_free(bmc)


def test_unknown_node_and_a_node_without_console_are_one_line_errors(tmp_path):
    home = tmp_path / "root"
    make_root(home, nodes=[plain_node(1)])
    proc = rhaas(home, "console", "node-09")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    proc = rhaas(home, "console", "node-01")
    assert proc.returncode == 1 and "has no console" in proc.stderr and "Traceback" not in proc.stderr


# -- memory -----------------------------------------------------------------------------------------
class Chatty:
    """A console source that never stops talking (128 KB per node, twice what is kept): a stand-in for
    a thousand BMCs, which this machine cannot run; the point is what rhaas keeps of it."""

    def __init__(self):
        self.sent = 0

    def read(self, timeout: float) -> bytes | None:
        if self.sent >= 2 * RING_BYTES:
            time.sleep(min(timeout, 0.05))
            return b""
        self.sent += 8192
        return b"x" * 8191 + b"\n"

    def close(self) -> None:
        pass


def test_a_thousand_consoles_keep_at_most_64k_each():
    sources: dict[str, Chatty] = {}

    def opener(node):
        def make():
            sources[node] = Chatty()
            return sources[node]
        return make

    hub = ConsoleHub(opener)
    held = [hub.acquire(f"n{i:04d}") for i in range(1000)]
    try:
        wait_for(lambda: len(sources) == 1000 and all(s.sent >= 2 * RING_BYTES for s in sources.values()), timeout=120,
                 what="every source to have sent 128 KB")
        assert hub.buffered_bytes() <= 1000 * RING_BYTES
        assert all(len(c.ring.buf) == RING_BYTES and c.ring.total >= 2 * RING_BYTES for c in held)
    finally:
        for c in held:
            hub.release(c)
    assert hub.open_nodes() == [] and hub.buffered_bytes() == 0


def test_ring_keeps_the_newest_bytes_and_cuts_at_a_time():
    ring = Ring(16)
    ring.write(b"0123456789", when=100.0)
    ring.write(b"abcdefghij", when=200.0)
    assert bytes(ring.buf) == b"456789abcdefghij" and ring.total == 20
    assert ring.since(15) == (b"fghij", 20)
    assert ring.until(150.0) == b"456789"
    assert ring.until(250.0) == b"456789abcdefghij"


def test_store_untouched_by_reading(tmp_path, sol_node):
    bmc, serial = sol_node
    home = tmp_path / "root"
    make_root(home, nodes=[plain_node(1, ipmi=sol_doc(bmc))])
    before = Store(home).snapshot().node("node-01")
    boot_lines(serial, n=3)
    assert rhaas(home, "console", "node-01", timeout=60).returncode == 0
    assert Store(home).snapshot().node("node-01") == before


# -- kexec: a node that does not come back names what its console said -------------------------------
def test_kexec_failure_carries_the_console_tail(tmp_path, rhaas_home, sol_node, sim_farm, farm_home):
    """A farm node (real SSH) jumps and never returns; its BMC's SOL is the test's serial port,
    which says what a panicking kernel says while the run waits for the node."""
    from click.testing import CliRunner

    from rhaas.cli import cli

    bmc, serial = sol_node
    name = sim_farm.names[0]
    farm_home(rhaas_home, [name], per_node={name: {"ipmi": sol_doc(bmc)}})
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.gz"
    kernel.write_bytes(os.urandom(4096))
    initrd.write_bytes(os.urandom(4096))
    r = CliRunner().invoke(cli, ["image", "add", "img", "--kernel", str(kernel), "--initrd", str(initrd)])
    assert r.exit_code == 0, r.output
    sim_farm.set_faults({name: ["never_returns"]})
    boot_lines(serial, n=5, tag="old kernel")

    def panic_once_watched():
        wait_for(lambda: active_sessions(bmc) >= 1, timeout=30, what="the run to watch the console")
        time.sleep(0.5)
        serial.write("[    0.912345] Kernel panic - not syncing: VFS: Unable to mount root fs\n")

    writer = threading.Thread(target=panic_once_watched, daemon=True)
    writer.start()
    r = within(120, CliRunner().invoke, cli, ["kexec", name, "--image", "img", "--timeout", "6",
                                              "--no-fallback", "--json"], catch_exceptions=False)
    writer.join(5)
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)[0]
    assert out["outcome"] == "failed"
    assert out["console_tail"][-1] == "[    0.912345] Kernel panic - not syncing: VFS: Unable to mount root fs"
    assert out["reason"] == ("did not come back within 6s: "
                             "[    0.912345] Kernel panic - not syncing: VFS: Unable to mount root fs")
    ev = json.loads(CliRunner().invoke(cli, ["events", name, "--json"]).stdout)
    assert "Kernel panic - not syncing" in json.dumps([e for e in ev if e["action"] == "kexec"][-1])
    # the run let go of the console: no session left at the BMC
    assert wait_for(lambda: active_sessions(bmc) == 0, timeout=20)


def test_a_bmc_that_refuses_is_a_one_line_error(tmp_path, sol_node):
    bmc, _serial = sol_node
    home = tmp_path / "root"
    make_root(home, nodes=[plain_node(1, ipmi=sol_doc(bmc) | {"password": "wrong-password"})])
    proc = rhaas(home, "console", "node-01", "--lines", "5", timeout=90)
    assert proc.returncode == 1
    assert proc.stderr.startswith("rhaas: error: console of node-01: SOL to admin@127.0.0.1:")
    assert len(proc.stderr.strip().splitlines()) == 1 and "wrong-password" not in proc.stderr
    # (ipmi_sim keeps the half-open session of a refused login until it times out; SOL is free)
    assert sol_is_free(bmc)


def test_console_streams_are_bounded_and_a_slot_frees_when_its_client_leaves(tmp_path, start_serve, sol_node):
    """Each stream holds one of waitress's worker threads: half of them at most stream consoles."""
    bmc, serial = sol_node
    home = tmp_path / "root"
    make_root(home, nodes=[plain_node(1, ipmi=sol_doc(bmc), project="p1", obm_enabled=True)], projects=("p1",),
              users=(("admin", "a", True, ()), ("alice", "pw1", False, ("p1",))))
    rhaas(home, "config", "set", "serve-threads", "2", check=True)  # one console stream at a time
    boot_lines(serial, n=3)
    s = start_serve(home)
    path = "/v0/node/node-01/console"
    conn, resp = _get(s.url, path, "alice", "pw1", read=False)
    assert resp.status == 200
    status, body = _get(s.url, path, "alice", "pw1")
    assert status == 503 and json.loads(body)["msg"].startswith("Too many console streams")
    # API calls still have a thread
    assert _get(s.url, "/v0/node/node-01", "alice", "pw1")[0] == 200
    resp.close()
    conn.close()
    assert wait_for(lambda: _get(s.url, path + "?lines=1&follow=no", "alice", "pw1")[0] == 200, timeout=20)


def test_client_follows_hils_redirect_and_falls_back_to_its_plain_form():
    """A HIL-like upstream on loopback: it refuses rhaas's query keys (400, as HIL's strict
    argument check does) and answers the plain call with a 307 to an obmd-like token URL
    that streams the console."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rhaas.adapters.hil import HILClient

    seen: list[tuple[str, str | None]] = []

    class FakeHIL(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            if self.path.startswith("/v0/node/n1/console?"):
                body = b'{"type": "ValidationError", "msg": "Request arguments are not valid for this request"}'
                self.send_response(400)
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/v0/node/n1/console":
                self.send_response(307)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/obmd/n1/console?token=ab12")
                self.end_headers()
            elif self.path == "/obmd/n1/console?token=ab12":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"line one\r\nKernel panic - not syncing: test\r\n")
            else:
                self.send_response(404)
                self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHIL)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = HILClient(f"http://127.0.0.1:{server.server_port}", "alice", "pw", timeout=5)
        tail = within(30, client.console_tail, "n1", 5)
        assert text_lines(tail) == ["line one", "Kernel panic - not syncing: test"]
        assert [p for p, _ in seen] == ["/v0/node/n1/console?lines=5&follow=no", "/v0/node/n1/console",
                                        "/obmd/n1/console?token=ab12"]
        assert seen[1][1] is not None and seen[2][1] is None  # the token URL gets no credentials
    finally:
        server.shutdown()
        server.server_close()
