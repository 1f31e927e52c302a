"""A hostile or broken upstream: bytes trickled, huge answers, wrong JSON types, hostile names.

The upstream here is a stand-in HIL, a real HTTP server on loopback in a thread of the test
(real HIL runs only on Python 2.7; `rhaas serve` never misbehaves on purpose). The rhaas side is
always the real CLI in a subprocess. Each subprocess call has a generous timeout: that it
returns at all is what shows a call does not hang.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from worlds import ROOT, rhaas

ENV = {"RHAAS_UPSTREAM_PASSWORD": "pw", "RHAAS_UPSTREAM_TIMEOUT": "2"}
HANG = 90  # seconds: far beyond every deadline here; hitting it means rhaas hung
MiB = 1024 * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status=200, doc=None, raw=None):
        body = raw if raw is not None else (b"" if doc is None else json.dumps(doc).encode())
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")  # as real HIL labels JSON
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_one(self):
        up: Upstream = self.server.upstream
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        path = self.path.split("?")[0]
        up.seen.append((self.command, path, body))
        answer = up.answers.get((self.command, path))
        try:
            if answer is not None:
                return answer(self, up)
            return up.normal(self, path, body)
        except OSError:
            self.close_connection = True  # the client went away (it gave up on us): fine

    do_GET = do_POST = do_PUT = do_DELETE = handle_one


class Upstream:
    """A stand-in HIL for project p1. `answers[(METHOD, PATH)]` overrides one answer."""

    def __init__(self):
        self.free = ["node-01", "node-02", "node-03"]
        self.held: list[str] = []
        self.answers: dict = {}
        self.seen: list = []
        self.stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.upstream = self
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    def node_doc(self, name):
        return {"name": name, "project": "p1" if name in self.held else None,
                "nics": [{"label": "eth0", "macaddr": "52:54:00:00:00:01", "networks": {}}],
                "metadata": {"rack": json.dumps("r1")}}

    def normal(self, h: Handler, path: str, body):
        if path == "/v0/project/p1/nodes":
            return h.reply(doc=self.held)
        if path == "/v0/nodes/free":
            return h.reply(doc=self.free)
        if path == "/v0/project/p1/connect_node":
            self.free.remove(body["node"])
            self.held.append(body["node"])
            return h.reply()
        m = re.fullmatch(r"/v0/node/([^/]+)(/obm|/power_status)?", path)
        if m and m.group(2) == "/obm":
            return h.reply()
        if m and m.group(2) == "/power_status":
            return h.reply(doc={"power_status": "on"})
        if m:
            return h.reply(doc=self.node_doc(m.group(1)))
        return h.reply(404, {"type": "NotFoundError", "msg": "no such thing"})

    # -- misbehaviours ---------------------------------------------------------------------------
    def trickle_body(self, h: Handler, up=None):
        """200, a Content-Length of 100 kB, then one byte every half second (14 hours)."""
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n[")
        while not self.stop.wait(0.5):
            h.wfile.write(b" ")
            h.wfile.flush()

    def trickle_headers(self, h: Handler, up=None):
        """The status line, then a header line that never ends, one byte every half second."""
        h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not self.stop.wait(0.5):
            h.wfile.write(b"a")
            h.wfile.flush()

    def redirect_to_trickle(self, h: Handler, up=None):
        """A power call answered 307 to an obmd-like endpoint (which trickles)."""
        h.send_response(307)
        h.send_header("Location", f"{self.url}/obmd/node/node-01/power_status?token=0123456789abcdef")
        h.send_header("Content-Length", "0")
        h.end_headers()

    def streamed(self, h: Handler, head: bytes, fill: bytes, size: int, tail: bytes, content_length: bool):
        """HEAD + FILL repeated to SIZE bytes + TAIL, written in 1 MiB pieces (never held whole)."""
        total = len(head) + size + len(tail)
        h.wfile.write(b"HTTP/1.1 200 OK\r\n" + (f"Content-Length: {total}\r\n".encode() if content_length
                                                else b"Connection: close\r\n") + b"\r\n" + head)
        piece = fill * (MiB // len(fill))
        sent = 0
        while sent < size and not self.stop.is_set():
            part = piece[: size - sent]
            h.wfile.write(part)
            sent += len(part)
        h.wfile.write(tail)
        h.close_connection = True


@pytest.fixture
def upstream():
    up = Upstream()
    yield up
    up.close()


@pytest.fixture
def derived(tmp_path, upstream):
    home = tmp_path / "derived"
    rhaas(home, "init", "--upstream", upstream.url, "--project", "p1", "--user", "alice", env=ENV, check=True)
    return home


def one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rhaas: error:"), proc.stderr
    return lines[0]


def local(home) -> list[str]:
    return sorted(rhaas(home, "list", "-q").stdout.split())


# Linux counts a child's pre-exec memory (its forked copy of this big pytest process) in its
# ru_maxrss, so the CLI is started by a small fresh Python that waits for it and reports the
# rusage of exactly that one grandchild, whose pre-exec copy is the launcher's few MB.
LAUNCHER = """
import os, signal, subprocess, sys, threading
out, err, limit, argv = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
with open(out, "w") as o, open(err, "w") as e:
    proc = subprocess.Popen(argv, stdout=o, stderr=e)
timer = threading.Timer(limit, lambda: os.kill(proc.pid, signal.SIGKILL))
timer.start()
_, status, usage = os.wait4(proc.pid, 0)
timer.cancel()
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def run_measured(home, *args):
    """Run the CLI; return (exit code, stdout, stderr, peak RSS in MB of that one process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    env.update(ENV, RHAAS_HOME=str(home))
    out, err = home / "out.txt", home / "err.txt"
    launched = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(out), str(err), str(HANG), sys.executable, "-m", "rhaas", *args],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=HANG + 30, check=True)
    code, maxrss_kb = (int(x) for x in launched.stdout.split())
    return code, out.read_text(), err.read_text(), maxrss_kb / 1024


# -- time: one deadline per call ------------------------------------------------------------------
def test_trickling_free_list_ends_lease_at_its_deadline(derived, upstream):
    upstream.answers[("GET", "/v0/nodes/free")] = upstream.trickle_body
    proc = rhaas(derived, "lease", "1", env=ENV, timeout=HANG)
    assert proc.returncode == 3
    assert "no complete answer within 2 s" in one_line(proc)
    assert local(derived) == []


def test_trickling_headers_end_init_at_its_deadline(tmp_path, upstream):
    upstream.answers[("GET", "/v0/project/p1/nodes")] = upstream.trickle_headers
    home = tmp_path / "d"
    proc = rhaas(home, "init", "--upstream", upstream.url, "--project", "p1", "--user", "alice",
                 env=ENV, timeout=HANG)
    assert proc.returncode == 3
    assert "no complete answer within 2 s" in one_line(proc)
    assert not (home / "rhaas.json").exists()


def test_trickling_power_endpoint_after_redirect_ends_power_status(derived, upstream):
    rhaas(derived, "lease", "node-01", env=ENV, check=True)
    upstream.answers[("GET", "/v0/node/node-01/power_status")] = upstream.redirect_to_trickle
    upstream.answers[("GET", "/obmd/node/node-01/power_status")] = upstream.trickle_body
    proc = rhaas(derived, "power", "status", "node-01", "--json", env=ENV, timeout=HANG)
    assert proc.returncode == 1  # a per-node failure, reported with its reason
    [row] = json.loads(proc.stdout)
    assert row["outcome"] == "failed" and "no complete answer within 2 s" in row["reason"]
    assert "token" not in proc.stdout + proc.stderr  # the Location is still never shown


# -- memory: a cap per answer ---------------------------------------------------------------------
@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "close-delimited"])
def test_huge_free_list_refused_in_little_memory(derived, upstream, content_length):
    upstream.answers[("GET", "/v0/nodes/free")] = lambda h, up: up.streamed(
        h, b'["node-00"', b', "node-00"', 80 * MiB, b"]", content_length)
    code, _, err, peak_mb = run_measured(derived, "lease", "1")
    assert code == 3 and "over the cap of 8388608 bytes" in err and len(err.strip().splitlines()) == 1, err
    assert peak_mb < 200, peak_mb
    assert local(derived) == []


def test_huge_metadata_value_is_not_stored(derived, upstream):
    upstream.answers[("GET", "/v0/node/node-01")] = lambda h, up: up.streamed(
        h, b'{"name": "node-01", "project": "p1", "nics": [], "metadata": {"big": "\\"', b"x", 100 * MiB,
        b'\\""}}', False)
    code, _, err, peak_mb = run_measured(derived, "lease", "1")
    assert code == 0, err  # the node is ours upstream, so it is recorded, but without the answer
    assert peak_mb < 200, peak_mb
    assert local(derived) == ["node-01"]
    assert (derived / "rhaas.json").stat().st_size < 1 * MiB
    shown = json.loads(rhaas(derived, "show", "node-01", "--json").stdout)
    assert "big" not in shown["metadata"]


def test_size_caps_are_settings(derived, upstream):
    rhaas(derived, "config", "set", "upstream-max-list-bytes", "20", check=True)
    proc = rhaas(derived, "lease", "1", env=ENV)  # '["node-01", "node-02", "node-03"]' is 33 bytes
    assert proc.returncode == 3 and "over the cap of 20 bytes" in one_line(proc)
    rhaas(derived, "config", "set", "upstream-max-list-bytes", "--unset", check=True)
    assert rhaas(derived, "lease", "1", env=ENV).returncode == 0


# -- wrong data: types checked before anything is used or stored --------------------------------------
WRONG_FREE = {
    "object": {"node-01": "free"},
    "numbers": [1, 2],
    "nested": [["node-01"]],
    "null": None,
}


@pytest.mark.parametrize("answer", WRONG_FREE.values(), ids=WRONG_FREE.keys())
def test_wrong_type_free_list_refused(derived, upstream, answer):
    upstream.answers[("GET", "/v0/nodes/free")] = lambda h, up: h.reply(raw=json.dumps(answer).encode())
    proc = rhaas(derived, "lease", "1", env=ENV)
    assert proc.returncode == 3 and "misbehaved" in one_line(proc)
    assert local(derived) == [] and upstream.held == []


WRONG_NODE = {
    "a list": ["node-01"],
    "nics an object": {"name": "node-01", "project": "p1", "nics": {"eth0": {}}, "metadata": {}},
    "nic not an object": {"name": "node-01", "project": "p1", "nics": ["eth0"], "metadata": {}},
    "networks a list": {"name": "node-01", "project": "p1", "metadata": {},
                        "nics": [{"label": "eth0", "macaddr": "m", "networks": ["net1"]}]},
    "metadata a list": {"name": "node-01", "project": "p1", "nics": [], "metadata": ["rack"]},
    "metadata value not text": {"name": "node-01", "project": "p1", "nics": [], "metadata": {"rack": 5}},
    "another node": {"name": "node-02", "project": "p1", "metadata": {},
                     "nics": [{"label": "eth0", "macaddr": "m", "networks": {}}]},
    "hostile NIC label": {"name": "node-01", "project": "p1", "metadata": {},
                          "nics": [{"label": "$(touch F)", "macaddr": "m", "networks": {}}]},
}


@pytest.mark.parametrize("answer", WRONG_NODE.values(), ids=WRONG_NODE.keys())
def test_wrong_type_node_document_not_stored(derived, upstream, answer):
    upstream.answers[("GET", "/v0/node/node-01")] = lambda h, up: h.reply(raw=json.dumps(answer).encode())
    proc = rhaas(derived, "lease", "1", env=ENV)
    assert proc.returncode not in (70,) and "internal error" not in proc.stderr, proc.stderr
    # node-01 is held upstream, so it is recorded, but nothing of the refused document is
    assert local(derived) == ["node-01"]
    shown = json.loads(rhaas(derived, "show", "node-01", "--json").stdout)
    assert shown["nics"] == [] and shown["metadata"] == {}


def test_wrong_type_power_status_is_a_clear_failure(derived, upstream):
    rhaas(derived, "lease", "node-01", env=ENV, check=True)
    upstream.answers[("GET", "/v0/node/node-01/power_status")] = lambda h, up: h.reply(doc=["on"])
    proc = rhaas(derived, "power", "status", "node-01", "--json", env=ENV)
    assert proc.returncode == 1
    [row] = json.loads(proc.stdout)
    assert row["outcome"] == "failed" and "misbehaved" in row["reason"] and "internal error" not in row["reason"]


def test_reconcile_refuses_an_object_instead_of_a_list(derived, upstream):
    rhaas(derived, "lease", "node-01", "node-02", env=ENV, check=True)
    upstream.answers[("GET", "/v0/project/p1/nodes")] = lambda h, up: h.reply(doc={"node-03": "p1"})
    before = (derived / "rhaas.json").read_bytes()
    proc = rhaas(derived, "reconcile", env=ENV)
    assert proc.returncode == 3 and "misbehaved" in one_line(proc)
    assert local(derived) == ["node-01", "node-02"]
    assert (derived / "rhaas.json").read_bytes() == before


# -- hostile names ------------------------------------------------------------------------------------
HOSTILE = ["$(touch F)", "a b;c", "../../x", "bad\nname", "n" * 10240, "..", "-", "-rf", "\x1b[31mred"]


def test_hostile_free_names_are_never_stored(derived, upstream):
    upstream.free = HOSTILE[:4] + ["node-01"] + HOSTILE[4:] + ["node-02"]
    proc = rhaas(derived, "lease", "4", "--json", env=ENV)
    assert proc.returncode == 1  # only two valid nodes: "not enough free nodes upstream"
    rows = json.loads(proc.stdout)
    assert sorted(r["node"] for r in rows if r["outcome"] == "ok") == ["node-01", "node-02"]
    assert local(derived) == ["node-01", "node-02"]
    asked = [body["node"] for method, path, body in upstream.seen if path.endswith("/connect_node")]
    assert sorted(asked) == ["node-01", "node-02"]  # a refused name is never sent back either
    stored = (derived / "rhaas.json").read_text()
    for bad in ("touch", "a b;c", "../../x", "bad\\nname", "nnnnnnnnnn", "u001b"):
        assert bad not in stored


def test_hostile_names_in_reconcile_are_skipped(derived, upstream):
    rhaas(derived, "lease", "node-01", env=ENV, check=True)
    upstream.held = ["node-01", "a b;c", "../../x"]
    proc = rhaas(derived, "reconcile", "--json", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [] and local(derived) == ["node-01"]


# -- settings -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e999", "soon"])
def test_config_set_refuses_bad_timeouts(rhaas_home, value):
    rhaas(rhaas_home, "init", check=True)
    before = (rhaas_home / "rhaas.json").read_bytes()
    proc = rhaas(rhaas_home, "config", "set", "--", "upstream-timeout", value)
    assert proc.returncode == 2 and "upstream-timeout" in one_line(proc)
    assert (rhaas_home / "rhaas.json").read_bytes() == before


def test_config_set_accepts_a_good_value_and_refuses_unknown_keys(rhaas_home):
    rhaas(rhaas_home, "init", check=True)
    rhaas(rhaas_home, "config", "set", "upstream-timeout", "7.5", check=True)
    assert rhaas(rhaas_home, "config", "get", "upstream-timeout").stdout.strip() == "7.5"
    for key, value in (("upstream-max-doc-bytes", "2.5"), ("parallel", "true"), ("no-such-key", "1")):
        proc = rhaas(rhaas_home, "config", "set", key, value)
        assert proc.returncode == 2 and one_line(proc)


def test_bad_values_from_env_or_an_older_store_are_one_line_errors(derived, upstream):
    from rhaas.store import Store

    with Store(derived).transaction("test") as tx:  # what an older rhaas accepted
        tx.set_config("upstream-timeout", "inf")
    proc = rhaas(derived, "lease", "1", env=ENV | {"RHAAS_UPSTREAM_TIMEOUT": ""})
    assert proc.returncode == 2 and "upstream-timeout (from the inventory)" in one_line(proc)
    with Store(derived).transaction("test") as tx:
        tx.set_config("upstream-timeout", "5")
    proc = rhaas(derived, "lease", "1", env=ENV | {"RHAAS_UPSTREAM_TIMEOUT": "nan"})
    assert proc.returncode == 2 and "RHAAS_UPSTREAM_TIMEOUT" in one_line(proc)
    proc = rhaas(derived.parent / "fresh", "init", "--upstream", upstream.url, "--project", "p1",
                 "--user", "alice", env=ENV | {"RHAAS_UPSTREAM_TIMEOUT": "inf"})
    assert proc.returncode == 2 and "RHAAS_UPSTREAM_TIMEOUT" in one_line(proc)
    assert local(derived) == [] and upstream.held == []


def test_client_reports_each_refused_name_on_one_line(upstream):
    """The adapter prints nothing: callers get each refused name as one line to show."""
    from rhaas.adapters.hil import HILClient

    upstream.free = HOSTILE + ["node-01"]
    lines: list[str] = []
    client = HILClient(upstream.url, "alice", "pw", timeout=5, warn=lines.append)
    assert client.free_nodes() == ["node-01"]
    assert len(lines) == len(HOSTILE) and client.refused == lines
    for line in lines:
        assert "\n" not in line and "\x1b" not in line and len(line) < 300 and line.startswith("refused node name")
