"""Bad input: one clear line on stderr, a non-zero exit, and nothing changed."""

from __future__ import annotations

import socket

import pytest
from worlds import make_root, plain_node, rhaas


def unchanged(home, *args, code=2, env=None, input=None, timeout=60):
    path = home / "rhaas.json"
    before = path.read_bytes() if path.exists() else None
    proc = rhaas(home, *args, env=env, input=input, timeout=timeout)  # a hang fails with TimeoutExpired
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rhaas: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert (path.read_bytes() if path.exists() else None) == before
    return lines[0]


@pytest.fixture
def derived(tmp_path, start_serve):
    root, home = tmp_path / "root", tmp_path / "derived"
    make_root(root, nodes=[plain_node(i) for i in range(1, 5)],
              users=(("admin", "a", True, ()), ("alice", "pw", False, ("p1",)), ("bob", "pw", False, ("p2",))),
              projects=("p1", "p2"))
    served = start_serve(root)
    rhaas(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice",
          env={"RHAAS_UPSTREAM_PASSWORD": "pw"}, check=True)
    return home, root, served


def test_unknown_node(derived):
    home, _, _ = derived
    line = unchanged(home, "free", "node-77")
    assert "unknown node" in line and "node-77" in line
    line = unchanged(home, "show", "node-77")
    assert "unknown node" in line


def test_node_already_leased(derived, tmp_path):
    home, _, served = derived
    rhaas(home, "lease", "node-01", check=True)
    line = unchanged(home, "lease", "node-01")
    assert "already leased" in line
    other = tmp_path / "other"
    rhaas(other, "init", "--upstream", served.url, "--project", "p2", "--user", "bob",
          env={"RHAAS_UPSTREAM_PASSWORD": "pw"}, check=True)
    proc = rhaas(other, "lease", "node-01")
    assert proc.returncode == 1 and "already leased by another project" in proc.stdout + proc.stderr
    assert rhaas(other, "list", "-q").stdout == ""


def test_malformed_url(rhaas_home):
    for url, says in (("not a url", "malformed upstream URL"), ("ftp://x/", "malformed upstream URL"),
                      ("http://", "malformed upstream URL"), ("http://u:p@host/", "put no credentials in the upstream URL")):
        line = unchanged(rhaas_home, "init", "--upstream", url, "--project", "p", "--user", "u",
                         env={"RHAAS_UPSTREAM_PASSWORD": "x"})
        assert line.startswith(f"rhaas: error: {says}"), (url, line)
    assert not (rhaas_home / "rhaas.json").exists()


def test_wrong_password(derived, tmp_path):
    _, _, served = derived
    home = tmp_path / "wrong"
    line = unchanged(home, "init", "--upstream", served.url, "--project", "p1", "--user", "alice",
                        env={"RHAAS_UPSTREAM_PASSWORD": "WRONG-SECRET"}, code=1)
    assert "rejected the credentials" in line and "WRONG-SECRET" not in line
    derived_home = derived[0]
    line = unchanged(derived_home, "lease", "1", env={"RHAAS_UPSTREAM_PASSWORD": "WRONG-SECRET"}, code=1)
    assert "rejected the credentials" in line and "WRONG-SECRET" not in line


@pytest.mark.parametrize("name", ["bad name", "a/b", "x;rm -rf", "$(id)", "../etc"])
def test_names_with_spaces_or_slashes(rhaas_home, name):
    rhaas(rhaas_home, "init", check=True)
    line = unchanged(rhaas_home, "node", "register", name, "--ssh", "root@127.0.0.1")
    assert "invalid node name" in line
    line = unchanged(rhaas_home, "project", "add", name)
    assert "invalid project name" in line


def test_unreachable_upstream_is_bounded(derived, tmp_path):
    home = derived[0]
    # a port that accepts TCP but never answers: the worst case for a client
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    port = silent.getsockname()[1]
    try:
        # the whole call is bounded by the 2 s upstream timeout; 30 s only catches a hang (figure: make bench)
        line = unchanged(home, "lease", "1", env={"RHAAS_UPSTREAM": f"http://127.0.0.1:{port}",
                                                  "RHAAS_UPSTREAM_TIMEOUT": "2"}, code=3, timeout=30)
        assert line == f"rhaas: error: upstream http://127.0.0.1:{port} unreachable: no complete answer within 2 s"
    finally:
        silent.close()
    # and a closed port is refused, not waited out
    line = unchanged(home, "lease", "1", env={"RHAAS_UPSTREAM": f"http://127.0.0.1:{port}"}, code=3)
    assert line == f"rhaas: error: upstream http://127.0.0.1:{port} unreachable: connection refused"
    line = unchanged(tmp_path / "never", "init", "--upstream", f"http://127.0.0.1:{port}", "--project", "p",
                     "--user", "u", env={"RHAAS_UPSTREAM_PASSWORD": "x"}, code=3)
    assert line == f"rhaas: error: upstream http://127.0.0.1:{port} unreachable: connection refused"


def test_no_instance_yet(rhaas_home):
    line = unchanged(rhaas_home, "list", code=2)
    assert "rhaas init" in line


def test_bad_setting(derived):
    home = derived[0]
    line = unchanged(home, "config", "set", "parallel", "many")
    assert "parallel" in line
    line = unchanged(home, "config", "set", "nonsense", "1")
    assert "unknown setting" in line
