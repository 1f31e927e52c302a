"""A damaged or unsafe inventory: one line naming the file, exit 4 (never 70), nothing written.

The fuzz part mutates a valid, full inventory (every table filled the way rhaas fills it) in
hundreds of structural ways: each table and each entry retyped, each field deleted or given
each wrong JSON type, nested fields (NICs, BMC, image files) likewise, invalid and duplicate
names, truncation at random offsets, NUL padding, NaN, deep nesting, top levels that are not
objects. Every mutant goes through the read commands in-process (``rhaas.cli.main`` under
Click's CliRunner isolation, so the real error-to-exit mapping runs) and a sample through the
real ``python -m rhaas``. The filesystem cases use the real file system: RHAAS_HOME a file,
the store, lock or event archive a directory or FIFO, another owner (uid 65534), open modes,
an unreadable file (read by uid 65534), a full and a read-only tmpfs in a private mount
namespace.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from worlds import ROOT, rhaas

from rhaas.cli import main
from rhaas.core.images import add_image, make_image
from rhaas.model import new_node
from rhaas.store import Store

EXIT_DAMAGED = 4
READ_COMMANDS = [
    ["list"],
    ["list", "--json"],
    ["list", "-q"],
    ["show", "node-01"],
    ["show", "node-01", "--json"],
    ["config", "list"],
    ["events"],
    ["kexec", "node-01", "--image", "standby", "--dry-run"],
    ["power", "status", "node-01", "--dry-run"],
    ["lease", "1", "--dry-run"],
    ["image", "list"],
    ["network", "list"],
]
WRITE_COMMAND = ["config", "set", "parallel", "8"]


# -- a full, valid inventory --------------------------------------------------------------
def build_base(home: Path, files: Path) -> bytes:
    """Every table filled as rhaas fills it; returns the file's bytes."""
    files.mkdir(parents=True, exist_ok=True)
    (files / "vmlinuz").write_bytes(b"kernel")
    (files / "initrd").write_bytes(b"initrd")
    store = Store(home)
    store.create()
    add_image(store, make_image("standby", str(files / "vmlinuz"), str(files / "initrd"), "console=ttyS0"))
    nic = {"label": "eth0", "macaddr": "52:54:00:00:00:01", "networks": {"vlan/native": "net-a"}}
    node1 = new_node(
        "node-01", "registered", ssh="root@127.0.0.1:22", nics=[nic], metadata={"rack": "r1", "n": 3},
        ipmi={"host": "127.0.0.1", "port": 623, "user": "admin", "password": "pw", "interface": None,
              "cipher_suite": 3},
        status="ready", image="standby", boot_id="b1", nonce="n1", last_boot=1700000000.5,
        phases={"connect": 0.1, "up": 2.0}, tenant_ssh_keys=["ssh-ed25519 AAAA x"],
    )
    node2 = new_node("node-02", "leased", upstream_name="node-02", project="p1", ssh="root@127.0.0.2:22",
                     upstream={"endpoint": "http://127.0.0.1:1", "node": "node-02"}, loaded_image=None)
    with store.transaction("test") as tx:
        tx.put_nodes([node1, node2])
        tx.put("projects", {"name": "p1"})
        tx.put("users", {"name": "alice", "password_hash": "scrypt$x", "is_admin": False, "projects": ["p1"],
                         "ssh_keys": ["ssh-ed25519 AAAA alice"]})
        tx.put("networks", {"name": "net-a", "owner": "p1", "access": ["p1"], "net_id": "1001",
                            "channels": ["vlan/native", "vlan/1001"]})
        tx.table("actions").insert({"name": "6f1c", "node": "node-01", "nic": "eth0", "type": "modify_port",
                                    "channel": "vlan/native", "new_network": "net-a", "status": "DONE"})
        tx.set_config("upstream", "http://127.0.0.1:1")  # nothing listens: lease fails fast (exit 3)
        tx.set_config("project", "p1")
        tx.set_config("user", "alice")
        tx.set_config("parallel", "16")
        tx.event("register", "node-01", "ok", by="test")
    store.snapshot().events()  # the base is valid, event log included
    return (home / "rhaas.json").read_bytes()


# -- mutations ----------------------------------------------------------------------------
WRONG_VALUES = [None, True, 0, -7, 1.5, 1e300, "", "a b;c", [], [1, "x"], {}, {"k": [None]}]


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool", type(None): "null"}.get(type(v), "number")


def _retyped(value):
    return [w for w in WRONG_VALUES if _json_type(w) != _json_type(value)]


def _dump(doc) -> bytes:
    return json.dumps(doc).encode()


def mutants(base: bytes, seed: int = 11):
    """(label, bytes) for structural mutations of ``base``."""
    doc = json.loads(base)
    rng = random.Random(seed)

    def mutate(fn):
        d = copy.deepcopy(doc)
        fn(d)
        return _dump(d)

    for top in ([], [doc], "inventory", 7, None, True):
        yield f"top-level {_json_type(top)}", _dump(top)
    for table in doc:
        yield f"{table}: deleted", mutate(lambda d, t=table: d.pop(t))
        for wrong in ([], ["x"], "x", 0, None, True):
            yield f"{table} = {wrong!r}", mutate(lambda d, t=table, w=wrong: d.__setitem__(t, w))
        if not doc[table]:
            continue
        first = next(iter(doc[table]))
        for wrong in ([], "x", 1, None, ["name"]):
            yield f"{table}/{first} = {wrong!r}", mutate(lambda d, t=table, k=first, w=wrong: d[t].__setitem__(k, w))
        for key in ("abc", "-1", "1.5", "", " 1", "\u0661"):
            yield f"{table}: id {key!r}", mutate(lambda d, t=table, k=first, n=key: d[t].__setitem__(n, d[t].pop(k)))
        for field, value in doc[table][first].items():
            yield f"{table}/{first}.{field}: deleted", mutate(lambda d, t=table, k=first, f=field: d[t][k].pop(f))
            for wrong in _retyped(value):
                yield (f"{table}/{first}.{field} = {wrong!r}",
                       mutate(lambda d, t=table, k=first, f=field, w=wrong: d[t][k].__setitem__(f, w)))
    nested = [
        ("nodes", "1", "nics"), ("nodes", "1", "ipmi"), ("images", "1", "kernel"), ("images", "1", "initrd"),
    ]
    for table, key, field in nested:
        sub = doc[table][key][field]
        target = sub[0] if isinstance(sub, list) else sub
        for name, value in target.items():
            def path(d, t=table, k=key, f=field):
                s = d[t][k][f]
                return s[0] if isinstance(s, list) else s

            yield f"{table}/{key}.{field}.{name}: deleted", mutate(lambda d, p=path, n=name: p(d).pop(n))
            for wrong in _retyped(value):
                yield (f"{table}/{key}.{field}.{name} = {wrong!r}",
                       mutate(lambda d, p=path, n=name, w=wrong: p(d).__setitem__(n, w)))
    for wrong in ("x", 1, None, {}):
        yield f"nodes/1.nics[0] = {wrong!r}", mutate(lambda d, w=wrong: d["nodes"]["1"]["nics"].__setitem__(0, w))
    for listed in (("users", "projects"), ("users", "ssh_keys"), ("networks", "access"), ("networks", "channels"),
                   ("nodes", "tenant_ssh_keys")):
        t, f = listed
        yield f"{t}/1.{f} holds a number", mutate(lambda d, t=t, f=f: d[t]["1"][f].append(5))
    for bad in ("", "a b", "../x", "$(touch F)", "x\ny", ".", "..", "a/b", "n" * 300 + " "):
        yield f"node name {bad!r}", mutate(lambda d, b=bad: d["nodes"]["1"].__setitem__("name", b))
        yield f"image name {bad!r}", mutate(lambda d, b=bad: d["images"]["1"].__setitem__("name", b))
    yield "duplicate node name", mutate(lambda d: d["nodes"]["2"].__setitem__("name", "node-01"))
    yield "duplicate user name", mutate(lambda d: d["users"].__setitem__("9", dict(d["users"]["1"])))
    yield "last_boot far future", mutate(lambda d: d["nodes"]["1"].__setitem__("last_boot", 1e300))
    yield "last_boot negative", mutate(lambda d: d["nodes"]["1"].__setitem__("last_boot", -5))
    yield "event time huge", mutate(lambda d: next(iter(d["events"].values())).__setitem__("time", 1e300))
    yield "schema 2", mutate(lambda d: d["meta"]["1"].__setitem__("schema", 2))
    yield "schema '1'", mutate(lambda d: d["meta"]["1"].__setitem__("schema", "1"))
    yield "writes 'many'", mutate(lambda d: d["meta"]["1"].__setitem__("writes", "many"))
    text = base.decode()
    yield "NaN", text.replace('"last_boot":1700000000.5', '"last_boot":NaN').encode()
    yield "Infinity", text.replace('"last_boot":1700000000.5', '"last_boot":Infinity').encode()
    yield "deeply nested", ("[" * 100000 + "]" * 100000).encode()
    yield "deeply nested metadata", text.replace('"metadata":{"rack"', '"metadata":{"deep":' + "[" * 50000 + "]" * 50000
                                                 + ',"rack"').encode()
    yield "empty file", b""
    yield "whitespace only", b"  \n"
    yield "NUL bytes only", b"\0" * len(base)
    yield "NUL padded", base + b"\0" * 4096
    yield "NUL prefix", b"\0" * 512 + base
    yield "NUL inside", base[: len(base) // 2] + b"\0" * 64 + base[len(base) // 2 + 64:]
    yield "not UTF-8", base.replace(b"node-02", b"node-\xff\xfe", 1)
    for i in range(40):
        cut = rng.randrange(1, len(base) - 1)
        yield f"truncated at {cut}", base[:cut]
    for i in range(10):
        pos = rng.randrange(len(base))
        yield f"byte {pos} flipped", base[:pos] + bytes([base[pos] ^ 0x5A]) + base[pos + 1:]


# -- running the CLI ------------------------------------------------------------------------
def run_inprocess(args: list[str]) -> tuple[int, str, str]:
    """``rhaas ARGS`` through rhaas.cli.main (the real error-to-exit mapping), in this process."""
    runner = CliRunner()
    saved = sys.argv
    code = 0
    with runner.isolation() as streams:
        sys.argv = ["rhaas", *args]
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = saved
        out, err = streams[0].getvalue().decode(), streams[1].getvalue().decode()
    return code, out, err


def home_files(home: Path) -> list:
    return sorted((str(p.relative_to(home)), p.stat().st_mtime_ns, p.stat().st_size) for p in home.rglob("*"))


def check_outcome(label, args, code, out, err, path: Path, before: bytes, refused: bool) -> None:
    what = f"{label!r}: rhaas {' '.join(args)} -> {code}\nstdout: {out[:300]}\nstderr: {err[:600]}"
    assert code != 70 and "Traceback" not in err and "internal error" not in err, what
    assert path.read_bytes() == before, f"{what}\nthe inventory changed"
    if refused:
        lines = err.strip().splitlines()
        assert code == EXIT_DAMAGED, what
        assert len(lines) == 1 and lines[0].startswith("rhaas: error:") and str(path) in lines[0], what


@pytest.fixture
def base(tmp_path):
    home = tmp_path / "base"
    raw = build_base(home, tmp_path / "files")
    return home, raw


def loads(home: Path, events: bool = True) -> bool:
    """Does this rhaas accept the inventory (and, with ``events``, its event log)?

    The log's fields are checked only when it is read (rhaas events), so a damaged event
    refuses that command and no other.
    """
    from rhaas.errors import StoreError

    try:
        snap = Store(home).snapshot()
        if events:
            snap.events()
    except StoreError:
        return False
    return True


def test_corrupt_inventories_give_one_line_and_exit_4(base, monkeypatch):
    home, raw = base
    path = home / "rhaas.json"
    monkeypatch.setenv("RHAAS_HOME", str(home))
    monkeypatch.setenv("RHAAS_UPSTREAM_PASSWORD", "pw")
    refused = accepted = 0
    for label, data in mutants(raw):
        path.write_bytes(data)
        os.chmod(path, 0o600)
        bad, bad_log = not loads(home, events=False), not loads(home)
        refused += bad_log
        accepted += not bad_log
        for args in READ_COMMANDS + ([WRITE_COMMAND] if bad else []):
            files = home_files(home)
            code, out, err = run_inprocess(args)
            check_outcome(label, args, code, out, err, path, data, bad_log if args == ["events"] else bad)
            if code == EXIT_DAMAGED:
                assert home_files(home) == files, (label, args)  # no key, cache or archive written either
    assert refused >= 200, (refused, accepted)  # the fuzz really exercised damaged inventories


def test_corrupt_inventories_through_the_real_process(base):
    home, raw = base
    path = home / "rhaas.json"
    sample = [c for c in mutants(raw) if c[0] in (
        "top-level array", "nodes = []", "nodes/1 = 'x'", "nodes/1.name: deleted", "nodes/1.nics = 'a b;c'",
        "config = 'x'", "NUL bytes only", "NUL padded", "deeply nested", "NaN", "empty file",
    )]
    sample += [c for c in mutants(raw) if c[0].startswith("truncated at")][:3]
    assert len(sample) >= 14
    for label, data in sample:
        path.write_bytes(data)
        for args in (["list"], ["show", "node-01", "--json"], WRITE_COMMAND):
            proc = rhaas(home, *args, env={"RHAAS_UPSTREAM_PASSWORD": "pw"})
            check_outcome(label, args, proc.returncode, proc.stdout, proc.stderr, path, data, True)


def complete(home: Path, words: str) -> subprocess.CompletedProcess:
    """What a TAB asks of rhaas (Click's bash protocol), in a real process."""
    parts = words.split(" ")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    env.update(RHAAS_HOME=str(home), _RHAAS_COMPLETE="bash_complete", COMP_WORDS=words,
               COMP_CWORD=str(len(parts) - 1))
    return subprocess.run([sys.executable, "-m", "rhaas"], env=env, capture_output=True, text=True, timeout=60,
                          cwd=str(ROOT), check=False)


def test_tab_completion_on_a_corrupt_inventory_offers_nothing(base):
    home, raw = base
    path = home / "rhaas.json"
    ok = complete(home, "rhaas show node-")
    assert ok.returncode == 0 and "node-01" in ok.stdout, ok  # the probe works on a good inventory
    tried = 0
    for label, data in list(mutants(raw))[::9]:
        path.write_bytes(data)
        if loads(home, events=False):  # usable (a damaged event log only stops 'rhaas events')
            continue
        tried += 1
        for words in ("rhaas show node-", "rhaas kexec node-01 --image ", "rhaas free "):
            proc = complete(home, words)
            assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr == "", (label, words, proc)
        assert path.read_bytes() == data
    assert tried >= 50


# -- the file system --------------------------------------------------------------------------
def refused(home: Path, *args, names: str, code: int = EXIT_DAMAGED, timeout: float = 60) -> str:
    path = home / "rhaas.json"
    before = path.read_bytes() if path.is_file() else None
    proc = rhaas(home, *args, timeout=timeout)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc
    assert len(lines) == 1 and lines[0].startswith("rhaas: error:") and names in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (path.read_bytes() if path.is_file() else None) == before
    return lines[0]


def test_rhaas_home_is_a_file(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a directory")
    assert "not a directory" in refused(home, "list", names=str(home))
    assert "not a directory" in refused(home, "init", names=str(home))
    assert home.read_text() == "not a directory"


def test_store_path_is_a_directory_or_fifo(base):
    home, _ = base
    path = home / "rhaas.json"
    path.unlink()
    path.mkdir()
    assert "directory" in refused(home, "list", names=str(path))
    assert "directory" in refused(home, *WRITE_COMMAND, names=str(path))
    path.rmdir()
    os.mkfifo(path, 0o600)
    # a FIFO would block a plain open() forever; the call's own timeout shows it does not hang
    assert "not a regular file" in refused(home, "list", names=str(path), timeout=30)


def test_lock_path_is_a_directory(base):
    home, _ = base
    (home / "rhaas.lock").unlink()
    (home / "rhaas.lock").mkdir()
    assert "lock" in refused(home, *WRITE_COMMAND, names=str(home / "rhaas.lock"))
    proc = rhaas(home, "list", "-q")  # reading takes no lock
    assert proc.returncode == 0 and proc.stdout.split() == ["node-01", "node-02"], proc


def test_event_archive_is_a_directory(base, monkeypatch):
    home, raw = base
    (home / "events.archive.jsonl").mkdir()
    monkeypatch.setenv("RHAAS_HOME", str(home))
    monkeypatch.setattr("rhaas.store.EVENTS_KEPT", 1)  # the next event must move older ones out
    code, _, err = run_inprocess(WRITE_COMMAND)
    assert code == EXIT_DAMAGED and "events.archive.jsonl" in err and len(err.strip().splitlines()) == 1, err
    assert (home / "rhaas.json").read_bytes() == raw


@pytest.mark.parametrize("target, mode, fix", [("home", 0o755, "chmod 700"), ("home", 0o701, "chmod 700"),
                                               ("file", 0o644, "chmod 600"), ("file", 0o620, "chmod 600")])
def test_open_modes_are_refused_with_the_fix(base, target, mode, fix):
    home, _ = base
    p = home if target == "home" else home / "rhaas.json"
    os.chmod(p, mode)
    line = refused(home, "list", names=str(p))
    assert f"{fix} {p}" in line and f"{mode:04o}" in line
    line = refused(home, *WRITE_COMMAND, names=str(p))
    assert stat.S_IMODE(os.stat(p).st_mode) == mode  # refused, not silently "fixed"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid (65534) needs root")


@needs_root
@pytest.mark.parametrize("target", ["home", "file"])
def test_owned_by_another_user(base, target):
    home, _ = base
    p = home if target == "home" else home / "rhaas.json"
    os.chown(p, 65534, -1)
    line = refused(home, "show", "node-01", names=str(p))
    assert "uid 65534" in line and f"chown -R root {p}" in line
    refused(home, *WRITE_COMMAND, names=str(p))
    assert os.stat(p).st_uid == 65534


@needs_root
def test_another_users_inventory_is_not_taken_over_by_init(tmp_path):
    home = tmp_path / "theirs"
    home.mkdir(mode=0o700)
    os.chown(home, 65534, -1)
    assert "uid 65534" in refused(home, "init", names=str(home))
    assert not (home / "rhaas.json").exists()


@needs_root
def test_unreadable_inventory(base, monkeypatch):
    """As uid 65534, on a home it owns whose inventory it may write but not read (mode 0200).

    The child is forked from this process after one run of the same command, so it needs no
    file of the (root-only) Python installation once it has dropped to that uid.
    """
    base_home, raw = base
    outer = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp dirs are closed to other users
    try:
        os.chmod(outer, 0o711)
        home = outer / "home"
        shutil.copytree(base_home, home)
        monkeypatch.setenv("RHAAS_HOME", str(home))
        assert run_inprocess(["list"])[0] == 0  # every module the command needs is now imported
        for p in [home, *home.rglob("*")]:
            os.chown(p, 65534, 65534)
        os.chmod(home / "rhaas.json", 0o200)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to uid 65534, run the command, report, exit
            try:
                os.close(rfd)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                os.write(wfd, json.dumps(run_inprocess(["list"])).encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as fh:
            reply = fh.read()
        os.waitpid(pid, 0)
        code, _, err = json.loads(reply)
        lines = err.strip().splitlines()
        assert code == EXIT_DAMAGED, (code, err)
        assert len(lines) == 1 and "permission denied" in lines[0] and str(home / "rhaas.json") in lines[0], err
        assert (home / "rhaas.json").read_bytes() == raw
    finally:
        shutil.rmtree(outer)


# a private mount namespace: the tmpfs vanishes with the process, whatever happens to the test
FS_SCRIPT = r"""
import json, os, subprocess, sys
mnt, src, mode = sys.argv[1], sys.argv[2], sys.argv[3]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", mnt], check=True)
home = os.path.join(mnt, "home")
subprocess.run(["cp", "-a", src, home], check=True)
before = open(os.path.join(home, "rhaas.json"), "rb").read()
if mode == "full":
    with open(os.path.join(mnt, "filler"), "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    with open(os.path.join(mnt, "filler2"), "wb", buffering=0) as fh:  # the last few bytes too
        try:
            while True:
                fh.write(b"\0")
        except OSError:
            pass
else:
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
env = dict(os.environ, RHAAS_HOME=home)
out = {}
for name, args in (("write", ["config", "set", "parallel", "8"]), ("write2", ["config", "set", "timeout", "50"]),
                   ("read", ["list", "-q"])):
    p = subprocess.run([sys.executable, "-m", "rhaas", *args], env=env, capture_output=True, text=True, timeout=60)
    out[name] = [p.returncode, p.stdout, p.stderr]
out["intact"] = open(os.path.join(home, "rhaas.json"), "rb").read() == before
out["leftovers"] = sorted(f for f in os.listdir(home) if f.endswith(".tmp"))
print(json.dumps(out))
"""


@needs_root
@pytest.mark.parametrize("mode", ["full", "read-only"])
def test_full_or_read_only_file_system(base, tmp_path, mode):
    if not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("needs util-linux unshare and mount for a private tmpfs")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    home, _ = base
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", FS_SCRIPT,
                           str(mnt), str(home), mode], capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["intact"] and out["leftovers"] == [], out
    for name in ("write", "write2"):
        code, _, err = out[name]
        lines = err.strip().splitlines()
        assert code == EXIT_DAMAGED and len(lines) == 1 and lines[0].startswith("rhaas: error:"), out
        assert ("no space left" if mode == "full" else "read-only") in lines[0], out
    assert out["read"][0] == 0 and out["read"][1].split() == ["node-01", "node-02"], out
