"""Settings precedence, output modes, help, version, events — the CLI as operators use it."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from worlds import rhaas

from rhaas import __version__
from rhaas.cli import COMMANDS, cli
from rhaas.model import new_node
from rhaas.store import Store


def test_version_and_help():
    assert rhaas(".", "--version").stdout.strip() == f"rhaas, version {__version__}"
    out = rhaas(".", "--help").stdout
    for name in COMMANDS:
        assert name in out


def _leaf_commands():
    for name in COMMANDS:
        cmd = cli.get_command(None, name)
        subs = getattr(cmd, "commands", None)
        if subs:
            for sub in subs:
                yield [name, sub]
        else:
            yield [name]


@pytest.mark.parametrize("path", list(_leaf_commands()), ids=lambda p: " ".join(p))
def test_every_command_has_help(path):
    res = CliRunner().invoke(cli, path + ["--help"], prog_name="rhaas")
    assert res.exit_code == 0 and "Usage: rhaas" in res.output


def _example_lines(help_text: str) -> list[str]:
    """The lines of the `Example:`/`Examples:` section of a --help text (up to the next blank line)."""
    lines = help_text.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"\s*Examples?:\s*", line):
            section = []
            for body in lines[i + 1:]:
                if not body.strip():
                    break
                section.append(body.strip())
            return section
    return []


# The commands an operator reaches for first, plus every other command that documents an example today.
_WITH_EXAMPLES = [
    ["lease"], ["free"], ["list"], ["kexec"], ["power"], ["serve"], ["init"], ["node", "register"],
    ["node", "unregister"], ["node", "set"], ["node", "trust"], ["reconcile"], ["show"], ["events"],
    ["bootdev"], ["image"], ["network", "create"], ["network", "connect"], ["user", "add"],
    ["project", "add"], ["lab"], ["completion"],
]


@pytest.mark.parametrize("path", _WITH_EXAMPLES, ids=lambda p: " ".join(p))
def test_main_commands_carry_an_example(path):
    """The help has an Example(s) section with a command line that runs this very command."""
    res = CliRunner().invoke(cli, path + ["--help"], prog_name="rhaas")
    assert res.exit_code == 0, res.output
    examples = _example_lines(res.output)
    assert examples, f"no 'Example:' section in 'rhaas {' '.join(path)} --help'"
    call = re.compile(r"(^|[\s|;&])rhaas " + re.escape(" ".join(path)) + r"(\s|$)")
    assert any(call.search(line) for line in examples), examples


def test_settings_precedence(rhaas_home):
    rhaas(rhaas_home, "init", check=True)
    get = lambda env=None: rhaas(rhaas_home, "config", "get", "parallel", env=env).stdout.strip()
    assert get() == "64"  # default
    rhaas(rhaas_home, "config", "set", "parallel", "12", check=True)
    assert get() == "12"  # stored beats default
    assert get({"RHAAS_PARALLEL": "7"}) == "7"  # environment beats stored
    rows = {r["key"]: r for r in json.loads(rhaas(rhaas_home, "config", "list", "--json",
                                                  env={"RHAAS_TIMEOUT": "9"}).stdout)}
    assert rows["parallel"]["source"] == "config" and rows["timeout"] == {
        "key": "timeout", "value": 9.0, "source": "env", "env": "RHAAS_TIMEOUT"}
    assert rows["connect-timeout"]["source"] == "default"
    rhaas(rhaas_home, "config", "set", "parallel", "--unset", check=True)
    assert get() == "64"
    assert "upstream-password" not in rhaas(rhaas_home, "config", "list").stdout


def test_list_outputs(rhaas_home):
    rhaas(rhaas_home, "init", check=True)
    with Store(rhaas_home).transaction() as tx:
        tx.put_nodes([new_node("n1", "registered", project="p1", status="ready", image="A",
                               ipmi={"host": "127.0.0.1", "port": 623, "user": "admin", "password": "TOPSECRET"}),
                      new_node("n2", "registered")])
    plain = rhaas(rhaas_home, "list").stdout.splitlines()
    assert plain[0].split("\t")[:3] == ["NODE", "STATE", "PROJECT"]
    assert plain[1].split("\t")[:5] == ["n1", "assigned", "p1", "ready", "A"]
    assert rhaas(rhaas_home, "list", "-q").stdout == "n1\nn2\n"
    assert rhaas(rhaas_home, "list", "--available", "-q").stdout == "n2\n"
    assert rhaas(rhaas_home, "list", "--assigned", "-q").stdout == "n1\n"
    docs = json.loads(rhaas(rhaas_home, "list", "--json").stdout)
    assert [d["name"] for d in docs] == ["n1", "n2"]
    assert docs[0]["bmc"] == "admin@127.0.0.1:623"
    for args in (("list", "--json"), ("show", "n1"), ("show", "n1", "--json")):
        assert "TOPSECRET" not in rhaas(rhaas_home, *args).stdout


def test_events_are_recorded_with_actor(rhaas_home):
    rhaas(rhaas_home, "init", check=True)
    rhaas(rhaas_home, "node", "register", "n1", "--ssh", "root@127.0.0.9", check=True)
    rhaas(rhaas_home, "node", "set", "n1", "--meta", "rack=r9", check=True)
    evs = json.loads(rhaas(rhaas_home, "events", "n1", "--json").stdout)
    assert [e["action"] for e in evs] == ["register", "node-set"]
    assert all(e["actor"] and e["outcome"] == "ok" and e["time"] > 0 for e in evs)


def test_secret_from_env_not_argv(rhaas_home):
    """The BMC password comes from the environment (or a prompt), and is never printed."""
    rhaas(rhaas_home, "init", check=True)
    proc = rhaas(rhaas_home, "node", "register", "n1", "--ipmi", "admin@127.0.0.1:9623",
                 env={"RHAAS_IPMI_PASSWORD": "hunter2"})
    assert proc.returncode == 0 and "hunter2" not in proc.stdout + proc.stderr
    assert Store(rhaas_home).snapshot().node("n1")["ipmi"]["password"] == "hunter2"
    proc = rhaas(rhaas_home, "node", "register", "n2", "--ipmi", "admin@127.0.0.1:9623", input="")
    assert proc.returncode == 2 and "RHAAS_IPMI_PASSWORD" in proc.stderr


def test_node_sets_and_stdin(rhaas_home):
    rhaas(rhaas_home, "init", check=True)
    with Store(rhaas_home).transaction() as tx:
        tx.put_nodes([new_node(f"node-{i:02d}", "registered") for i in range(1, 9)])
    assert rhaas(rhaas_home, "node", "unregister", "node-[01-03,05]").returncode == 0
    assert rhaas(rhaas_home, "list", "-q").stdout.split() == ["node-04", "node-06", "node-07", "node-08"]
    assert rhaas(rhaas_home, "node", "unregister", "-", input="node-06\nnode-07\n").returncode == 0
    assert rhaas(rhaas_home, "list", "-q").stdout.split() == ["node-04", "node-08"]
    proc = rhaas(rhaas_home, "node", "unregister", "node-[1-")
    assert proc.returncode == 2 and "invalid node set" in proc.stderr
