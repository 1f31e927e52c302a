"""Node names are checked where they enter: upstream answers, arguments, stdin, stored inventories.

The upstream here is a small stand-in HTTP server on loopback (a hostile HIL: its free list
holds names that are shell code, paths, a newline, 10 KB); every request it sees is recorded,
so a test can also show that nothing was asked of it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from worlds import ROOT, rhaas

from rhaas.model import NAME_MAX, new_node
from rhaas.store import Store

BIN = Path(sys.executable).parent
VALID = ["good-1", "good-2", "good-3", "good-4", "good-5"]
# hostile strings only: a non-string in the list makes the whole answer wrong data, refused as
# such (tests/test_upstream_hostile.py::test_wrong_type_free_list_refused)
HOSTILE = ["$(touch F)", "a b;c", "../../x", "nl\nname", "x" * 10240, "`touch F`", "*", ""]


class StandIn:
    """A hostile upstream: /v0/nodes/free lists HOSTILE + VALID; connects and shows anything."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.held: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, doc):
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                owner.requests.append(("GET", self.path))
                if self.path == "/v0/nodes/free":
                    return self._answer(200, HOSTILE + [v for v in VALID if v not in owner.held])
                if self.path == "/v0/project/p1/nodes":
                    return self._answer(200, HOSTILE[:3] + owner.held)
                if self.path.startswith("/v0/node/"):
                    name = unquote(self.path[len("/v0/node/"):])
                    nics = [{"label": "eth0", "macaddr": "52:54:00:00:00:01", "networks": {"vlan/native": "net-1"}},
                            {"label": "$(touch F)", "macaddr": "x", "networks": {}},
                            {"label": "eth1", "macaddr": "52:54:00:00:00:02", "networks": {"vlan/2": "a b"}}]
                    meta = {"rhaas.ssh_host_key": json.dumps("ssh-ed25519 AAAAC3Nz\n@cert-authority * ssh-rsa AAAA"),
                            "rhaas.image": json.dumps("$(touch F)"), "rhaas.ssh": json.dumps("root@h;x")}
                    return self._answer(200, {"name": name, "project": "p1", "nics": nics, "metadata": meta})
                return self._answer(404, {"type": "NotFoundError", "msg": "no such route"})

            def do_POST(self):
                owner.requests.append(("POST", self.path))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == "/v0/project/p1/connect_node":
                    owner.held.append(body["node"])
                    return self._answer(200, None)
                return self._answer(404, {"type": "NotFoundError", "msg": "no such route"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def standin():
    s = StandIn()
    yield s
    s.stop()


def derived(home, standin):
    rhaas(home, "init", "--upstream", standin.url, "--project", "p1", "--user", "alice",
          env={"RHAAS_UPSTREAM_PASSWORD": "pw"}, check=True)
    standin.requests.clear()


def bash_complete(home, words: str, cwd: Path, path_first: Path | None = None) -> list[str]:
    """Source completions/rhaas.bash in a real bash (cwd ``cwd``) and press TAB after WORDS."""
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    words_list = shlex.split(words) + ([""] if words.endswith(" ") else [])
    script = f"""
source {ROOT / 'completions' / 'rhaas.bash'}
COMP_WORDS=({" ".join(shlex.quote(w) for w in words_list)})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
_rhaas_completion rhaas
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    path = f"{BIN}:{env.get('PATH', '')}"
    if path_first:
        path = f"{path_first}:{path}"
    env.update(RHAAS_HOME=str(home), PATH=path, RHAAS_UPSTREAM_PASSWORD="pw")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30, cwd=cwd, check=False)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


def test_hostile_upstream_names_are_never_stored_offered_or_run(tmp_path, standin):
    home, work = tmp_path / "d", tmp_path / "work"
    work.mkdir()
    derived(home, standin)
    proc = rhaas(home, "lease", "4", "--json", env={"RHAAS_UPSTREAM_PASSWORD": "pw"})
    assert proc.returncode == 0, proc.stderr
    stored = Store(home).snapshot().node_names()
    assert stored == VALID[:4]
    assert [r["node"] for r in json.loads(proc.stdout)] == VALID[:4]
    # names inside a node's document (NIC labels, networks) are checked as well: a hostile NIC
    # label makes the whole document refused, so the held node is recorded without its details
    assert Store(home).snapshot().node("good-1")["nics"] == []
    assert "recorded without details: good-1" in proc.stderr
    doc = Store(home).snapshot().node("good-1")
    assert doc["ssh_host_key"] is None and doc["image"] is None and doc["ssh"] is None
    # refused names are reported in short lines (the 10 KB name is not echoed), never connected
    assert "$(touch F)" in proc.stderr or "invalid" in proc.stderr
    assert all(len(line) < 300 for line in proc.stderr.splitlines())
    connected = [p for m, p in standin.requests if m == "POST"]
    assert len(connected) == 4
    # TAB: leased names from the index, free names from the upstream (hostile list and all)
    assert bash_complete(home, "rhaas free ", work) == VALID[:4]
    assert bash_complete(home, "rhaas lease ", work) == ["good-5"]
    for prefix in ("$", "a", ".", "nl", "x", "`"):
        assert bash_complete(home, f"rhaas lease '{prefix}'", work) == []
    assert not (work / "F").exists() and not (ROOT / "F").exists()
    # reconcile sees the hostile names in the project's list too: skipped, never stored
    proc = rhaas(home, "reconcile", env={"RHAAS_UPSTREAM_PASSWORD": "pw"})
    assert proc.returncode == 0, proc.stderr
    assert "a b;c" in proc.stderr or "invalid" in proc.stderr
    assert Store(home).snapshot().node_names() == VALID[:4]


def test_a_stored_bad_name_is_never_offered_nor_piped(tmp_path, standin):
    """An inventory written before names were checked is refused as damaged where it is read
    (exit 4, one line): `list -q` pipes nothing on, and TAB never offers a bad name."""
    home, work = tmp_path / "d", tmp_path / "work"
    work.mkdir()
    derived(home, standin)
    with Store(home).transaction("test") as tx:
        tx.put_nodes([new_node(n, "leased") for n in ["$(touch F)", "nl\nname", "a b;c", "good-1"]])
    assert bash_complete(home, "rhaas free ", work) == ["good-1"]  # the names index keeps valid names only
    assert bash_complete(home, "rhaas show ", work) == ["good-1"]
    assert not (work / "F").exists()
    listed = rhaas(home, "list", "-q")
    assert listed.returncode == 4 and listed.stdout == ""
    [line] = listed.stderr.splitlines()
    assert line.startswith("rhaas: error: ") and "is not a valid name" in line


def test_the_bash_script_escapes_what_it_inserts(tmp_path):
    """Belt and braces: even if a bad value reached the script, bash inserts it escaped.

    The `rhaas` answering the script here is a stand-in executable (first on PATH) that prints a
    hostile completion, because the real one never offers such a name (tested above).
    """
    fake, work = tmp_path / "bin", tmp_path / "work"
    fake.mkdir()
    work.mkdir()
    (fake / "rhaas").write_text("#!/bin/sh\nprintf 'plain,$(touch F)\\nplain,a b;c\\nplain,*\\n'\n")
    (fake / "rhaas").chmod(0o755)
    (work / "decoy").write_text("")
    offered = bash_complete(tmp_path / "h", "rhaas free ", work, path_first=fake)
    assert offered == [r"\$\(touch\ F\)", r"a\ b\;c", r"\*"]
    # what bash would put on the command line, run as a command line: just words, no file F
    line = "printf '%s\\n' " + " ".join(offered)
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=work, timeout=30, check=False)
    assert out.stdout.splitlines() == ["$(touch F)", "a b;c", "*"]
    assert not (work / "F").exists()


def test_stdin_and_argument_names_are_checked_before_anything_runs(tmp_path, standin):
    home = tmp_path / "d"
    derived(home, standin)
    rhaas(home, "lease", "good-1", env={"RHAAS_UPSTREAM_PASSWORD": "pw"}, check=True)
    standin.requests.clear()
    proc = rhaas(home, "free", "-", input="good-1\n$(touch F)\n", env={"RHAAS_UPSTREAM_PASSWORD": "pw"})
    assert proc.returncode == 2
    assert "line 2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert standin.requests == [] and Store(home).snapshot().node_names() == ["good-1"]
    for bad in ("a;b", "../x", "y" * (NAME_MAX + 1)):
        proc = rhaas(home, "lease", bad, env={"RHAAS_UPSTREAM_PASSWORD": "pw"})
        assert proc.returncode == 2 and "invalid node name" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and len(proc.stderr) < 300
    assert standin.requests == []


@pytest.mark.parametrize("arg", ["0", "-1", "1.5", "1e3", "00"])
def test_lease_count_is_checked_before_the_upstream_is_asked(tmp_path, standin, arg):
    home = tmp_path / "d"
    derived(home, standin)
    args = ["lease", "--", arg] if arg.startswith("-") else ["lease", arg]
    proc = rhaas(home, *args, env={"RHAAS_UPSTREAM_PASSWORD": "pw"})
    assert proc.returncode == 2, proc.stderr
    assert "not a count or node name" in proc.stderr
    assert standin.requests == []
    assert Store(home).snapshot().node_names() == []


def test_node_unregister_with_empty_stdin_is_a_usage_error(rhaas_home):
    rhaas(rhaas_home, "init", check=True)
    rhaas(rhaas_home, "node", "register", "rack-a1", "--ssh", "root@127.0.0.1", check=True)
    proc = rhaas(rhaas_home, "node", "unregister", "-", input="")
    assert proc.returncode == 2
    assert "no nodes given" in proc.stderr
    proc = rhaas(rhaas_home, "node", "unregister", "-", input="rack-a1\nbad name\n")
    assert proc.returncode == 2 and "line 2" in proc.stderr
    assert Store(rhaas_home).snapshot().node_names() == ["rack-a1"]
