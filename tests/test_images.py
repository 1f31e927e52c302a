"""`rhaas image add|list|show|rm`, image checks before a kexec, and the initrd overlay format."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from rhaas.cli import cli
from rhaas.core.overlay import build_overlay, overlay_files, read_newc
from rhaas.model import new_node
from rhaas.store import Store


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture
def store(rhaas_home):
    s = Store(rhaas_home)
    s.create()
    return s


@pytest.fixture
def files(tmp_path):
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initrd.gz"
    kernel.write_bytes(b"\x7fKERNEL" * 1000)
    initrd.write_bytes(gzip.compress(b"base initramfs", mtime=0))
    return kernel, initrd


def test_add_records_absolute_paths_sizes_and_digests(store, files, tmp_path, monkeypatch):
    kernel, initrd = files
    monkeypatch.chdir(tmp_path)
    before = store.snapshot().writes
    r = run("image", "add", "deb12", "--kernel", "vmlinuz", "--initrd", "initrd.gz",
            "--append", "console=ttyS0 quiet", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kernel"] == {
        "path": str(kernel),
        "size": kernel.stat().st_size,
        "sha256": hashlib.sha256(kernel.read_bytes()).hexdigest(),
        "mtime_ns": kernel.stat().st_mtime_ns,
    }
    assert doc["initrd"]["path"] == str(initrd)
    assert doc["initrd"]["sha256"] == hashlib.sha256(initrd.read_bytes()).hexdigest()
    assert doc["append"] == "console=ttyS0 quiet"
    snap = store.snapshot()
    assert snap.writes == before + 1
    assert snap.get("images", "deb12")["kernel"]["sha256"] == doc["kernel"]["sha256"]

    listed = json.loads(run("image", "list", "--json").stdout)
    assert [d["name"] for d in listed] == ["deb12"]
    assert listed[0]["standby"] is False
    shown = json.loads(run("image", "show", "deb12", "--json").stdout)
    assert shown["initrd"]["size"] == initrd.stat().st_size

    plain = run("image", "list")
    assert plain.stdout.splitlines()[0].split("\t")[0] == "NAME"
    assert plain.stdout.splitlines()[1].startswith("deb12\t" + str(kernel))


def test_add_refuses_bad_names_missing_files_duplicates_and_newlines(store, files):
    kernel, initrd = files
    for bad in ("a;b", "x$(id)", "sp ace", "..", "q'uote"):
        r = run("image", "add", bad, "--kernel", kernel, "--initrd", initrd)
        assert r.exit_code == 2, (bad, r.output)
        assert "invalid image name" in r.stderr
    r = run("image", "add", "img", "--kernel", kernel.parent / "nope", "--initrd", initrd)
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = run("image", "add", "img", "--kernel", kernel, "--initrd", initrd, "--append", "a\nb")
    assert r.exit_code == 2 and "line breaks" in r.stderr
    assert store.snapshot().all("images") == []

    assert run("image", "add", "img", "--kernel", kernel, "--initrd", initrd).exit_code == 0
    r = run("image", "add", "img", "--kernel", kernel, "--initrd", initrd, "--append", "x=1")
    assert r.exit_code == 2 and "exists" in r.stderr
    assert run("image", "add", "img", "--kernel", kernel, "--initrd", initrd, "--append", "x=1", "--replace").exit_code == 0
    assert store.snapshot().get("images", "img")["append"] == "x=1"


def test_append_keeps_shell_metacharacters_verbatim(store, files):
    kernel, initrd = files
    tricky = """a='"; $(touch /tmp/x) ` b\\c & d | e > f"""
    assert run("image", "add", "tricky", "--kernel", kernel, "--initrd", initrd, "--append", tricky).exit_code == 0
    assert store.snapshot().get("images", "tricky")["append"] == tricky


def test_rm_removes_and_protects_the_standby_image(store, files):
    kernel, initrd = files
    for name in ("a", "b", "standby"):
        assert run("image", "add", name, "--kernel", kernel, "--initrd", initrd).exit_code == 0
    with store.transaction("test") as tx:
        tx.set_config("standby-image", "standby")
    r = run("image", "rm", "standby")
    assert r.exit_code == 2 and "standby image" in r.stderr
    r = run("image", "rm", "a", "nope")
    assert r.exit_code == 1 and "no image named nope" in r.stderr
    assert {d["name"] for d in store.snapshot().all("images")} == {"a", "b", "standby"}
    before = store.snapshot().writes
    assert run("image", "rm", "a", "b").exit_code == 0
    assert [d["name"] for d in store.snapshot().all("images")] == ["standby"]
    assert store.snapshot().writes == before + 1
    assert kernel.exists() and initrd.exists()  # the files are not rhaas's to delete
    listed = json.loads(run("image", "list", "--json").stdout)
    assert listed[0]["standby"] is True


def test_kexec_refuses_an_image_whose_file_changed(store, files):
    kernel, initrd = files
    assert run("image", "add", "img", "--kernel", kernel, "--initrd", initrd).exit_code == 0
    with store.transaction("test") as tx:
        tx.put_nodes([new_node("n1", "registered", ssh="root@127.0.0.1:1")])
    kernel.write_bytes(b"something else entirely")
    before = store.snapshot().writes
    r = run("kexec", "n1", "--image", "img")
    assert r.exit_code == 1
    assert "changed since it was added" in r.stderr
    assert store.snapshot().writes == before  # refused before anything was recorded or contacted


def test_unknown_image_and_missing_standby(store, files):
    with store.transaction("test") as tx:
        tx.put_nodes([new_node("n1", "registered", ssh="root@127.0.0.1:1")])
    r = run("kexec", "n1", "--image", "nope")
    assert r.exit_code == 1 and "no image named nope" in r.stderr
    r = run("kexec", "n1")
    assert r.exit_code == 2 and "no standby-image" in r.stderr


def test_overlay_is_a_deterministic_newc_archive():
    keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey rhaas@x", "ssh-rsa AAAAB3tenant tenant@y"]
    a = build_overlay(keys, host_key=b"-----BEGIN KEY-----\n", host_key_target="/etc/ssh/ssh_host_ed25519_key")
    assert a == build_overlay(keys, host_key=b"-----BEGIN KEY-----\n", host_key_target="/etc/ssh/ssh_host_ed25519_key")
    entries = {e.name: e for e in read_newc(a)}
    assert entries["root/.ssh"].mode == 0o040700
    assert entries["root/.ssh/authorized_keys"].mode == 0o100600
    assert entries["root/.ssh/authorized_keys"].data == ("\n".join(keys) + "\n").encode()
    assert entries["etc/ssh/ssh_host_ed25519_key"].mode == 0o100600
    # appended to a base image, later files win: what Linux does with concatenated archives
    base = build_overlay(["ssh-ed25519 AAAAold old@z"])
    files = overlay_files(base + b"\0" * 3 + a)
    assert files["/root/.ssh/authorized_keys"] == entries["root/.ssh/authorized_keys"].data
    with pytest.raises(ValueError):
        build_overlay(["ssh-ed25519 AAAA\nssh-ed25519 BBBB"])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_overlay_reads_back_with_gnu_cpio():
    blob = build_overlay(["ssh-ed25519 AAAAC3Nza rhaas@x"], host_key=b"secret")
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=gzip.decompress(blob), capture_output=True, check=True)
    assert listing.stdout.decode().split() == [
        "root", "root/.ssh", "root/.ssh/authorized_keys", "etc", "etc/dropbear", "etc/dropbear/dropbear_ed25519_host_key",
    ]


@pytest.mark.parametrize("digest", ["a" * 64 + "\n", "A" * 64, "a" * 63, "a" * 65, "g" * 64, None, 64])
def test_a_blob_name_is_exactly_64_lower_case_hex_digits(digest):
    """The blob store, the blob server and node cache paths share one digest check: a trailing
    newline (which '^...$' with match() let through) is refused like any other bad name."""
    from rhaas.core.blobstore import check_sha
    from rhaas.core.kexec.commands import Commands
    from rhaas.errors import ValidationError
    from rhaas.model import is_sha256

    assert not is_sha256(digest)
    with pytest.raises(ValidationError):
        check_sha(digest)
    if isinstance(digest, str):
        with pytest.raises(ValueError):
            Commands.cache_path(digest)
    assert is_sha256("0123456789abcdef" * 4)
