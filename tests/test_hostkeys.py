"""known_hosts as OpenSSH writes it: hashed names are honoured, a wrong key is refused.

The files are hashed by OpenSSH's own ``ssh-keygen -H`` where it is installed (and by
paramiko's ``HostKeys.hash_host`` otherwise), and the keys are checked by a real
``rhaas kexec`` against the simulated farm.
"""

# ruff: noqa: F811  (the fixtures imported from farm_fixtures come back as parameters)
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

from click.testing import CliRunner
from farm_fixtures import _farm_process, client_key, farm_home, sim_farm  # noqa: F401

from rhaas.adapters.hostkeys import (
    endpoint_for,
    known_hosts_add,
    known_hosts_path,
    parse_key_line,
    read_known_hosts,
)
from rhaas.adapters.ssh import host_pattern
from rhaas.cli import cli


def kexec_json(*names):
    r = CliRunner().invoke(cli, ["kexec", *names, "--image", "img", "--timeout", "20", "--json"],
                           catch_exceptions=False)
    return r, {d["node"]: d for d in json.loads(r.stdout)} if r.stdout.strip() else {}


def hash_known_hosts(path) -> None:
    """Hash every name in a known_hosts file, as ``ssh-keygen -H`` does."""
    if shutil.which("ssh-keygen"):
        subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True, timeout=30)
        old = path.with_name(path.name + ".old")
        if old.exists():
            old.unlink()
        return
    from paramiko import HostKeys

    lines = []
    for line in path.read_text().splitlines():
        name, rest = line.split(" ", 1)
        lines.append(f"{HostKeys.hash_host(name)} {rest}")
    path.write_text("\n".join(lines) + "\n")


def new_key_line() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = Ed25519PrivateKey.generate().public_key()
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    typ, blob = parse_key_line(line)
    return f"{typ} {blob}"


def add_image(tmp_path):
    from rhaas.core.overlay import S_IFREG, CpioEntry, write_newc

    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.gz"
    kernel.write_bytes(os.urandom(4096))
    initrd.write_bytes(gzip.compress(write_newc([CpioEntry("etc-rhaas-image", S_IFREG | 0o644, b"IMG\n")]), mtime=0))
    r = CliRunner().invoke(cli, ["image", "add", "img", "--kernel", str(kernel), "--initrd", str(initrd)])
    assert r.exit_code == 0, r.output


def test_hashed_known_hosts_entry_is_honoured_and_a_wrong_one_refused(sim_farm, farm_home, rhaas_home, tmp_path):
    right, wrong, other = sim_farm.names[0:3]
    store = farm_home(rhaas_home, [right, wrong], trust=False)  # no key in the documents
    kh = known_hosts_path(rhaas_home)
    kh.write_text(
        f"{host_pattern(sim_farm.node(right)['ssh'])} {' '.join(sim_farm.node(right)['host_key'].split()[:2])}\n"
        # the wrong node's name with another node's key
        f"{host_pattern(sim_farm.node(wrong)['ssh'])} {' '.join(sim_farm.node(other)['host_key'].split()[:2])}\n"
    )
    hash_known_hosts(kh)
    text = kh.read_text()
    assert text.count("|1|") == 2 and "127." not in text  # no plain name left to match
    add_image(tmp_path)
    before = sim_farm.state(wrong)["boot_id"]
    seen = len(sim_farm.commands())

    r, out = kexec_json(right, wrong)

    assert r.exit_code == 1
    assert out[right]["outcome"] == "ok"
    assert sim_farm.state(right)["boot_id"] == out[right]["boot_id"]
    assert out[wrong]["outcome"] == "failed"
    assert out[wrong]["reason"].startswith(f"host key for {wrong} changed")
    assert sim_farm.state(wrong)["boot_id"] == before
    assert not [c for node, c in sim_farm.commands()[seen:] if node == wrong]
    assert store.snapshot().node(wrong)["status"] == "failed"


def test_known_hosts_add_replaces_hashed_entries_of_the_address_only(tmp_path):
    from paramiko import HostKeys

    key_a, key_b = new_key_line(), new_key_line()
    path = tmp_path / "known_hosts"
    path.write_text(
        "# kept\n"
        f"{HostKeys.hash_host('[10.0.0.1]:2222')} {key_a}\n"
        f"{HostKeys.hash_host('[10.0.0.2]:2222')} {key_a}\n"
        "not a key line\n"
    )

    known_hosts_add(path, "root@10.0.0.1:2222", key_b)

    lines = path.read_text().splitlines()
    assert lines[0] == "# kept" and "not a key line" in lines  # what it does not own is left alone
    assert lines[-1] == f"[10.0.0.1]:2222 {key_b}"
    assert len(lines) == 4  # the hashed entry of 10.0.0.1 replaced, 10.0.0.2's kept
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    known = read_known_hosts(path)
    assert known.get("[10.0.0.1]:2222") == [key_b]
    assert known.get("[10.0.0.2]:2222") == [key_a]
    assert known.get("[10.0.0.3]:2222", []) == []
    ep = endpoint_for({"name": "n1", "ssh": "root@10.0.0.2:2222"}, known)
    assert ep.host_keys == [key_a]


def test_the_key_adapter_does_not_touch_the_store():
    code = "import sys, rhaas.adapters.hostkeys, rhaas.core.kexec; print('rhaas.store' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "False"
