"""The whole lab: nodes and their BMCs, a root rhaas that owns them, and its ``rhaas serve``.

:func:`up` starts the phase-1 lab (:mod:`rhaas.lab.lab`: QEMU VMs behind ipmi_sim BMCs, all
on loopback) or, with ``sim=N``, N SIMULATED nodes (the asyncssh farm of
:mod:`rhaas.sim.farm`, with state-only ipmi_sim BMCs when ipmi_sim is installed).  It then
sets up a ROOT rhaas instance in ``DIR/root`` purely through the documented CLI, the way an
operator would:

* ``rhaas init``; every node registered with its SSH address, pinned host key, BMC
  (user ``admin``, password via ``RHAAS_IPMI_PASSWORD``, rmcpplus cipher suite 3) and a NIC;
* images ``standby`` and ``second`` (``rhaas image add``), ``standby-image`` set to
  ``standby``, ``ssh-key`` pointed at the lab's client key;
* project ``lab``, an admin user and a tenant user ``tenant`` in project ``lab``, with random
  passwords in 0600 files ``DIR/admin.password`` and ``DIR/tenant.password``;
* ``rhaas serve`` on a free loopback port, started in its own session so it outlives
  ``rhaas lab up``.

Everything is recorded in ``DIR/lab.json`` (the phase-1 keys plus a ``rhaas`` section, and
``simulated``/``label`` for a simulated lab).  :func:`down` stops exactly the recorded PIDs
(serve, farm, BMCs, VMs), each after checking it is still the process we started, and
removes nothing.

:class:`LabStack` is the programmatic handle used by the demo, the tests and the bench.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .vm import (
    LabError,
    MissingToolError,
    free_port,
    kill_pid,
    mac_for,
    pid_alive,
    pid_cmdline,
    pid_matches,
    proc_list,
)

LAB_JSON = "lab.json"
ROOT_HOME = "root"
PROJECT = "lab"
ADMIN_USER = "admin"
TENANT_USER = "tenant"
APPEND = "console=ttyS0 quiet panic=5"
IMAGE_NAMES = ("standby", "second")
SIM_LABEL = "SIMULATED"
SIM_CHASSIS = Path(__file__).resolve().parent / "simchassis.py"

Log = Callable[[str], None]


class CommandFailed(LabError):
    """A ``rhaas`` command run by the lab exited non-zero."""

    def __init__(self, msg: str, proc: subprocess.CompletedProcess | None = None):
        super().__init__(msg)
        self.proc = proc


def default_dir() -> Path:
    """``$RHAAS_LAB_DIR`` or ``./.lab``."""
    return Path(os.environ.get("RHAAS_LAB_DIR") or ".lab")


def rhaas_exe() -> str:
    """How to spell the rhaas command for a human: ``rhaas`` if that is ours on PATH."""
    beside = Path(sys.executable).parent / "rhaas"
    found = shutil.which("rhaas")
    if found and (not beside.exists() or Path(found).resolve() == beside.resolve()):
        return "rhaas"
    return str(beside) if beside.exists() else "rhaas"


# ---------------------------------------------------------------------------
# running rhaas
# ---------------------------------------------------------------------------

def rhaas_env(home: str | os.PathLike, extra: dict | None = None) -> dict:
    """The caller's environment without any RHAAS_* setting, plus ``RHAAS_HOME=home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    env["RHAAS_HOME"] = str(home)
    env.update(extra or {})
    return env


def run_rhaas(home: str | os.PathLike, *args, env: dict | None = None, input: str | None = None,
              timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``rhaas ARGS`` with ``RHAAS_HOME=home`` and capture its output.

    Secrets only ever travel in ``env`` or on stdin, so error messages may quote the
    arguments.
    """
    argv = [sys.executable, "-m", "rhaas", *map(str, args)]
    try:
        proc = subprocess.run(argv, env=rhaas_env(home, env), input=input, capture_output=True,
                              text=True, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"rhaas {' '.join(map(str, args))}: no answer within {timeout:g}s") from None
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise CommandFailed(f"rhaas {' '.join(map(str, args))} exited {proc.returncode}: "
                            + (" / ".join(err[-3:]) or "no output"), proc)
    return proc


@dataclasses.dataclass
class ServeProcess:
    pid: int
    url: str
    home: str
    log: str


_children: dict[int, subprocess.Popen] = {}  # our own children, so stopping them reaps them


def start_serve(home: str | os.PathLike, timeout: float = 30.0, verbose: bool = False) -> ServeProcess:
    """``rhaas serve --listen 127.0.0.1:0`` for ``home``, detached; returns once it listens."""
    home = Path(home).resolve()
    out_path, log_path = home / "serve.out", home / "serve.log"
    argv = [sys.executable, "-m", "rhaas", "serve", "--listen", "127.0.0.1:0"] + (["-v"] if verbose else [])
    with open(out_path, "wb") as out, open(log_path, "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=rhaas_env(home), cwd=str(home), start_new_session=True)
    _children[proc.pid] = proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", out_path.read_text(errors="replace"))
        if m:
            return ServeProcess(proc.pid, m.group(1), str(home), str(log_path))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_serve(proc.pid, home)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    raise LabError(f"rhaas serve for {home} did not start: {' / '.join(tail) or 'no output'}")


def _environ(pid: int) -> list[str]:
    return proc_list(pid, "environ")


def serve_pid_matches(pid: int | None, home: str | os.PathLike) -> bool:
    """True if ``pid`` is a live ``rhaas serve`` running with ``RHAAS_HOME=home``."""
    if not pid_alive(pid):
        return False
    argv = pid_cmdline(pid)  # type: ignore[arg-type]
    if "serve" not in argv or "rhaas" not in " ".join(argv):
        return False
    return f"RHAAS_HOME={Path(home).resolve()}" in _environ(pid)  # type: ignore[arg-type]


def stop_serve(pid: int | None, home: str | os.PathLike, timeout: float = 5.0) -> bool:
    """Stop our serve process ``pid`` (only if it still is ours). True if it was running."""
    if not serve_pid_matches(pid, home):
        _children.pop(pid or -1, None)
        return False
    assert pid is not None
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.02)
        if not pid_alive(pid):
            break
    child = _children.pop(pid, None)
    if child is not None:
        with contextlib.suppress(Exception):
            child.wait(timeout=1)
    else:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return True


# ---------------------------------------------------------------------------
# lab.json
# ---------------------------------------------------------------------------

def read_info(d: str | os.PathLike) -> dict:
    path = Path(d) / LAB_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab in {Path(d).resolve()} (no {LAB_JSON}); start one with 'rhaas lab up'") from None
    except ValueError as e:
        raise LabError(f"{path} is not valid JSON: {e}") from None


def write_info(d: str | os.PathLike, info: dict) -> None:
    from .lab import _write_json

    _write_json(Path(d) / LAB_JSON, info)


def _update_info(d: Path, **changes) -> dict:
    info = read_info(d)
    info.update(changes)
    write_info(d, info)
    return info


def running_pids(d: str | os.PathLike) -> dict[str, int]:
    """Every process recorded in DIR/lab.json that is still alive and still ours."""
    d = Path(d).resolve()
    try:
        info = read_info(d)
    except LabError:
        return {}
    found: dict[str, int] = {}
    serve = (info.get("rhaas") or {}).get("serve") or {}
    if serve_pid_matches(serve.get("pid"), serve.get("home", d / ROOT_HOME)):
        found["serve"] = serve["pid"]
    if info.get("simulated"):
        farm = info.get("farm") or {}
        if pid_matches(farm.get("pid"), str(farm.get("dir", "\0"))):
            found["farm"] = farm["pid"]
        for nd in info.get("nodes", []):
            pid = (nd.get("pids") or {}).get("ipmi_sim")
            if nd.get("bmc_dir") and pid_matches(pid, str(Path(nd["bmc_dir"]) / "lan.conf")):
                found[f"{nd['name']}/ipmi_sim"] = pid
    else:
        with contextlib.suppress(LabError, KeyError, TypeError):
            from .lab import Lab

            for key, pid in Lab(d)._running_pids().items():
                found[key] = pid
    return found


# ---------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------

def _secret_file(path: Path, value: str | None = None) -> str:
    value = value or secrets.token_urlsafe(18)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    os.chmod(path, 0o600)
    return value


def _standby_supported() -> bool:
    """Whether this rhaas has the module ``rhaas serve`` imports once standby-image is set."""
    try:
        return importlib.util.find_spec("rhaas.core.standby") is not None
    except (ImportError, ValueError):
        return False


def _fresh_home(home: Path) -> None:
    """A root home left by an earlier lab in the same directory is stale: start afresh."""
    if home.exists():
        shutil.rmtree(home)


def _setup_root(d: Path, home: Path, nodes: list[dict], images: dict[str, dict], *,
                timeout_setting: float, log: Log) -> dict:
    """The root instance, through the CLI. ``nodes``: name, ssh, host_key, mac, ipmi (or None)."""
    run_rhaas(home, "init")
    ipmi_env = {}
    for nd in nodes:
        args = ["node", "register", nd["name"], "--ssh", nd["ssh"], "--host-key", nd["host_key"],
                "--nic", f"eth0={nd['mac']}"]
        ipmi = nd.get("ipmi")
        if ipmi:
            password = Path(ipmi["password_file"]).read_text().strip()
            ipmi_env = {"RHAAS_IPMI_PASSWORD": password}
            args += ["--ipmi", f"{ipmi['user']}@{ipmi['host']}:{ipmi['port']}",
                     "--ipmi-interface", "rmcpplus", "--cipher-suite", "3"]
        run_rhaas(home, *args, env=ipmi_env if ipmi else None)
    log(f"registered {len(nodes)} node(s) in the root instance")
    for name in IMAGE_NAMES:
        img = images[name]
        run_rhaas(home, "image", "add", name, "--kernel", img["kernel"], "--initrd", img["initrd"],
                  "--append", img["append"])
    run_rhaas(home, "config", "set", "ssh-key", d / "id_ed25519")
    run_rhaas(home, "config", "set", "timeout", f"{timeout_setting:g}")
    standby_now = _standby_supported()
    if standby_now:
        run_rhaas(home, "config", "set", "standby-image", "standby")
    run_rhaas(home, "project", "add", PROJECT)
    admin_pw = _secret_file(d / "admin.password")
    tenant_pw = _secret_file(d / "tenant.password")
    run_rhaas(home, "user", "add", ADMIN_USER, "--admin", "--password-stdin", input=admin_pw + "\n")
    run_rhaas(home, "user", "add", TENANT_USER, "--project", PROJECT, "--password-stdin",
              "--ssh-key", d / "id_ed25519.pub", input=tenant_pw + "\n")
    log("root instance: images standby and second, project lab, users admin and tenant")
    return {
        "home": str(home),
        "project": PROJECT,
        "admin": {"user": ADMIN_USER, "password_file": str(d / "admin.password")},
        "tenant": {"user": TENANT_USER, "project": PROJECT, "password_file": str(d / "tenant.password")},
        "images": images,
        "standby_image": "standby",
        "standby_set_before_serve": standby_now,
        "client_key": str(d / "id_ed25519"),
        "timeout": timeout_setting,
    }


def _start_root_serve(d: Path, rh: dict, log: Log) -> dict:
    home = Path(rh["home"])
    serve = start_serve(home)
    rh["serve"] = {"pid": serve.pid, "url": serve.url, "home": str(home), "log": serve.log}
    rh["url"] = serve.url
    _update_info(d, rhaas=rh)  # the PID is on record before anything else can fail
    if not rh["standby_set_before_serve"]:
        # this rhaas has no rhaas.core.standby yet, and `rhaas serve` imports it at start
        # whenever standby-image is set: set it once serve runs (serve ignores it then)
        run_rhaas(home, "config", "set", "standby-image", "standby")
        log("note: rhaas.core.standby is missing: serve runs without return-to-standby on detach")
    log(f"rhaas serve listening on {serve.url} (pid {serve.pid})")
    return rh


def _refuse_if_running(d: Path) -> None:
    if (d / LAB_JSON).exists():
        alive = running_pids(d)
        if alive:
            raise LabError(f"a lab is already up in {d} (pids {sorted(set(alive.values()))}); "
                           "run 'rhaas lab down' first")


def up(dir: str | os.PathLike | None = None, nodes: int = 2, firmware_delay: float = 0.0, *,
       sim: int | None = None, cache_dir: str | os.PathLike | None = None, memory_mb: int = 256,
       log: Log | None = None) -> "LabStack":
    """Bring up the lab in ``dir`` (default :func:`default_dir`); see the module docstring."""
    log = log or (lambda msg: None)
    d = Path(dir or default_dir()).expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    _refuse_if_running(d)
    if sim:
        return _up_sim(d, sim, log)
    if nodes < 1:
        raise LabError("need at least one node")
    from .lab import Lab, check_host_tools

    check_host_tools()
    _fresh_home(d / ROOT_HOME)
    t0 = time.monotonic()
    def lab_log(msg: str) -> None:  # Lab.up(wait=False) returns before the VMs answer
        if not msg.startswith(("lab up in", "started ")):
            log(msg)

    lab = Lab.up(nodes, firmware_delay, d, cache_dir=cache_dir, memory_mb=memory_mb, wait=False, log=lab_log)
    log(f"started {nodes} VM(s) and their ipmi_sim BMCs")
    try:
        _update_info(d, simulated=False, label="qemu")
        imgs = lab.info["images"]
        images = {name: {"kernel": imgs["kernel"], "initrd": imgs["initrds"][name], "append": APPEND}
                  for name in IMAGE_NAMES}
        specs = [{"name": n.name, "ssh": n.ssh_target, "host_key": n.host_key, "mac": n.mac,
                  "ipmi": n.ipmi} for n in lab.nodes]
        timeout_setting = max(120.0, 2 * firmware_delay + 60.0)
        (d / ROOT_HOME).mkdir(parents=True, exist_ok=True)
        rh = _setup_root(d, d / ROOT_HOME, specs, images, timeout_setting=timeout_setting, log=log)
        rh["simulated"] = False
        _update_info(d, rhaas=rh)
        log(f"waiting for SSH on {nodes} VM(s) (firmware delay {firmware_delay:g} s)")
        wait = 90.0 + 2 * firmware_delay + 20.0 * nodes
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(max_workers=min(nodes, 8)) as ex:
            list(ex.map(lambda n: n.wait_ssh(timeout=wait), lab.nodes))
        t_ssh = time.monotonic() - t0
        rh = _start_root_serve(d, rh, log)
        info = read_info(d)
        info.setdefault("timings", {})["up_to_ssh_s"] = round(t_ssh, 2)
        info["timings"]["up_total_s"] = round(time.monotonic() - t0, 2)
        write_info(d, info)
    except BaseException:
        with contextlib.suppress(Exception):
            down(d)
        raise
    return LabStack(d)


# -- simulated nodes ----------------------------------------------------------------------

def _fake_images(d: Path) -> dict[str, dict]:
    """A stand-in kernel and two initrds naming their image (the farm reads /etc/rhaas-image)."""
    from .guest import make_overlay

    img = d / "images"
    img.mkdir(parents=True, exist_ok=True)
    kernel = img / "vmlinuz-sim"
    if not kernel.exists():
        kernel.write_bytes(b"RHAAS SIMULATED KERNEL\n" + os.urandom(64 * 1024))
    out = {}
    for name in IMAGE_NAMES:
        initrd = img / f"initrd-{name}-sim.cpio.gz"
        make_overlay({"etc/rhaas-image": name + "\n"}, initrd)
        out[name] = {"kernel": str(kernel), "initrd": str(initrd), "append": APPEND}
    return out


def _start_farm(d: Path, n: int, pubkey: Path, log: Log, timeout: float = 60.0) -> dict:
    farm_dir = d / "farm"
    farm_dir.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(5):
        port = free_port()
        base = f"127.{random.randint(100, 250)}.0.0"
        argv = [sys.executable, "-m", "rhaas.sim.farm", "--nodes", str(n), "--dir", str(farm_dir),
                "--port", str(port), "--base", base, "--down-time", "0.5",
                "--authorized-keys", str(pubkey)]
        out_path = farm_dir / "farm.out"
        with open(out_path, "wb") as out, open(farm_dir / "farm.err", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        _children[proc.pid] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if out_path.read_text(errors="replace").startswith("READY"):
                doc = json.loads((farm_dir / "farm.json").read_text())
                log(f"SIMULATED node farm: {n} node(s) on {base}/16 port {port} (pid {proc.pid})")
                return {"pid": proc.pid, "dir": str(farm_dir), "port": port, "base": base,
                        "nodes": doc["nodes"]}
            time.sleep(0.05)
        kill_pid(proc.pid, str(farm_dir))
        _children.pop(proc.pid, None)
        last = (farm_dir / "farm.err").read_text(errors="replace")[-500:]
    raise LabError(f"the simulated node farm did not start: {last.strip() or 'no output'}")


def _up_sim(d: Path, n: int, log: Log) -> "LabStack":
    from .bmc import BMC, IPMI_USER, write_password_file
    from .lab import generate_client_key

    if n < 1:
        raise LabError("need at least one simulated node")
    _fresh_home(d / ROOT_HOME)
    key = d / "id_ed25519"
    generate_client_key(key)
    info: dict = {
        "version": 1, "kind": "simulated", "simulated": True, "label": SIM_LABEL, "state": "up",
        "dir": str(d), "created_at": time.time(), "firmware_delay": 0.0,
        "ssh_key": str(key), "ssh_pubkey": f"{key}.pub", "nodes": [],
    }
    write_info(d, info)
    try:
        farm = _start_farm(d, n, Path(f"{key}.pub"), log)
        info["farm"] = {k: farm[k] for k in ("pid", "dir", "port", "base")}
        write_info(d, info)
        have_bmc = shutil.which("ipmi_sim") is not None
        password_file = d / "ipmi-password"
        password = write_password_file(password_file) if have_bmc else None
        faults: dict = {}
        used: set[int] = set()
        for fn in farm["nodes"]:
            name = fn["name"]
            nd = {"name": name, "ssh": fn["ssh"], "host_key": fn["host_key"], "mac": mac_for(name, str(d)),
                  "ipmi": None, "bmc_dir": None, "pids": {}, "simulated": True}
            if have_bmc:
                bdir = d / "bmcs" / name
                bdir.mkdir(parents=True, exist_ok=True)
                (bdir / "power").write_text("1\n")
                (bdir / "boot").write_text("pxe\n")
                port = free_port(socket.SOCK_DGRAM, avoid=used)
                bmc = BMC.create(name, bdir, port, password, bdir, script=SIM_CHASSIS)  # type: ignore[arg-type]
                nd["bmc_dir"] = str(bdir)
                nd["ipmi"] = {"host": "127.0.0.1", "port": port, "user": IPMI_USER,
                              "password_file": str(password_file)}
                nd["pids"]["ipmi_sim"] = bmc.start()
                faults[name] = {"power_file": str(bdir / "power")}
            info["nodes"].append(nd)
            write_info(d, info)
        if faults:
            tmp = Path(farm["dir"]) / ".faults.json.tmp"
            tmp.write_text(json.dumps(faults))
            os.replace(tmp, Path(farm["dir"]) / "faults.json")
            log(f"{len(faults)} state-only ipmi_sim BMC(s) (SIMULATED chassis)")
        else:
            log("ipmi_sim not installed: SIMULATED nodes have no BMC (install openipmi for one)")
        if have_bmc:
            info["ipmi_password_file"] = str(password_file)
        write_info(d, info)
        (d / ROOT_HOME).mkdir(parents=True, exist_ok=True)
        rh = _setup_root(d, d / ROOT_HOME, info["nodes"], _fake_images(d), timeout_setting=60.0, log=log)
        rh["simulated"] = True
        _update_info(d, rhaas=rh)
        _start_root_serve(d, rh, log)
    except BaseException:
        with contextlib.suppress(Exception):
            down(d)
        raise
    return LabStack(d)


# ---------------------------------------------------------------------------
# down and status
# ---------------------------------------------------------------------------

def down(dir: str | os.PathLike | None = None) -> list[int]:
    """Stop every process recorded in DIR/lab.json (serve, farm, BMCs, VMs); returns their PIDs."""
    d = Path(dir or default_dir()).expanduser().resolve()
    info = read_info(d)
    stopped: list[int] = []
    rh = info.get("rhaas") or {}
    serve = rh.get("serve") or {}
    if serve.get("pid") and stop_serve(serve["pid"], serve.get("home", d / ROOT_HOME)):
        stopped.append(serve["pid"])
    if info.get("simulated"):
        from .bmc import BMC

        for nd in info.get("nodes", []):
            if not nd.get("bmc_dir"):
                continue
            bmc = BMC(nd["bmc_dir"], (nd.get("ipmi") or {}).get("port", 0))
            for pid in {bmc.pid(), (nd.get("pids") or {}).get("ipmi_sim")}:
                if pid and kill_pid(pid, str(bmc.lan_conf)):
                    stopped.append(pid)
            bmc.stop()
        farm = info.get("farm") or {}
        if farm.get("pid") and kill_pid(farm["pid"], str(farm.get("dir"))):
            stopped.append(farm["pid"])
            _children.pop(farm["pid"], None)
        info = read_info(d)
        info["state"] = "down"
        info["down_at"] = time.time()
        write_info(d, info)
    else:
        from .lab import Lab

        with contextlib.suppress(KeyError, TypeError):
            stopped += Lab(d).down()
    return stopped


def status(dir: str | os.PathLike | None = None) -> dict:
    """What is recorded and what is running, as a JSON-able dict."""
    d = Path(dir or default_dir()).expanduser().resolve()
    info = read_info(d)
    rh = info.get("rhaas") or {}
    serve = rh.get("serve") or {}
    out = {
        "dir": str(d),
        "state": info.get("state"),
        "simulated": bool(info.get("simulated")),
        "label": SIM_LABEL if info.get("simulated") else "qemu",
        "firmware_delay": info.get("firmware_delay", 0.0),
        "root_home": rh.get("home"),
        "url": rh.get("url"),
        "serve": {"pid": serve.get("pid"), "running": serve_pid_matches(serve.get("pid"), serve.get("home", d))},
        "project": rh.get("project"),
        "users": {k: rh[k] for k in ("admin", "tenant") if k in rh},
        "client_key": rh.get("client_key") or info.get("ssh_key"),
        "nodes": [],
    }
    if info.get("simulated"):
        farm = info.get("farm") or {}
        out["farm"] = {"pid": farm.get("pid"), "running": pid_matches(farm.get("pid"), str(farm.get("dir", "\0")))}
        if out["farm"]["running"]:
            from rhaas.sim.control import flush_states

            with contextlib.suppress(OSError, RuntimeError):
                flush_states(farm["dir"], farm["pid"], timeout=5.0)
        for nd in info.get("nodes", []):
            state = {}
            with contextlib.suppress(OSError, ValueError):
                state = json.loads((Path(farm["dir"]) / "state" / f"{nd['name']}.json").read_text())
            bmc_pid = (nd.get("pids") or {}).get("ipmi_sim")
            bmc_up = bool(nd.get("bmc_dir")) and pid_matches(bmc_pid, str(Path(nd["bmc_dir"]) / "lan.conf"))
            out["nodes"].append({
                "name": nd["name"], "ssh": nd["ssh"], "simulated": True,
                "power": bool(state.get("powered")) and out["farm"]["running"],
                "ssh_up": bool(state.get("up")) and out["farm"]["running"],
                "bmc": f"{nd['ipmi']['user']}@{nd['ipmi']['host']}:{nd['ipmi']['port']}" if nd.get("ipmi") else None,
                "ipmi_sim_pid": bmc_pid if bmc_up else None,
                "boot_id": state.get("boot_id"),
            })
    else:
        from .lab import Lab

        lst = Lab(d).status()
        by_name = {n["name"]: n for n in info.get("nodes", [])}
        for n in lst["nodes"]:
            ipmi = by_name.get(n["name"], {}).get("ipmi") or {}
            n = dict(n)
            n["bmc"] = f"{ipmi.get('user')}@{ipmi.get('host')}:{ipmi.get('port')}" if ipmi else None
            n["simulated"] = False
            out["nodes"].append(n)
    return out


# ---------------------------------------------------------------------------
# the handle
# ---------------------------------------------------------------------------

class LabStack:
    """A lab directory brought up by :func:`up`: its nodes, root instance and serve."""

    def __init__(self, dir: str | os.PathLike | None = None):
        self.dir = Path(dir or default_dir()).expanduser().resolve()
        self.info = read_info(self.dir)
        if "rhaas" not in self.info:
            raise LabError(f"the lab in {self.dir} has no rhaas instance (phase-1 lab?)")
        self.rh = self.info["rhaas"]

    # -- facts ---------------------------------------------------------------------
    @property
    def simulated(self) -> bool:
        return bool(self.info.get("simulated"))

    @property
    def url(self) -> str:
        return self.rh["url"]

    @property
    def root_home(self) -> Path:
        return Path(self.rh["home"])

    @property
    def client_key(self) -> Path:
        return Path(self.rh["client_key"])

    @property
    def serve_pid(self) -> int:
        return self.rh["serve"]["pid"]

    @property
    def firmware_delay(self) -> float:
        return float(self.info.get("firmware_delay") or 0.0)

    @property
    def images(self) -> dict[str, dict]:
        return self.rh["images"]

    @property
    def names(self) -> list[str]:
        return [n["name"] for n in self.info["nodes"]]

    def password(self, who: str = TENANT_USER) -> str:
        key = "tenant" if who == TENANT_USER else "admin"
        return Path(self.rh[key]["password_file"]).read_text().strip()

    @property
    def lab(self):
        """The phase-1 :class:`rhaas.lab.Lab` (VM labs only)."""
        if self.simulated:
            raise LabError("a SIMULATED lab has no VMs")
        from .lab import Lab

        return Lab(self.dir)

    @property
    def nodes(self):
        return self.lab.nodes

    def node(self, name: str):
        return self.lab.node(name)

    # -- actions -------------------------------------------------------------------
    def root(self, *args, **kw) -> subprocess.CompletedProcess:
        """Run ``rhaas ARGS`` in the root instance."""
        return run_rhaas(self.root_home, *args, **kw)

    def derive(self, home: str | os.PathLike, user: str = TENANT_USER, project: str = PROJECT,
               password: str | None = None, url: str | None = None) -> Path:
        """A derived instance in ``home`` leasing from this lab's serve (or ``url``)."""
        home = Path(home).resolve()
        if home.exists():
            shutil.rmtree(home)
        home.mkdir(parents=True)
        pw = password if password is not None else self.password(user)
        run_rhaas(home, "init", "--upstream", url or self.url, "--project", project, "--user", user,
                  env={"RHAAS_UPSTREAM_PASSWORD": pw})
        run_rhaas(home, "config", "set", "ssh-key", self.client_key)
        run_rhaas(home, "config", "set", "timeout", f"{float(self.rh.get('timeout', 120.0)):g}")
        # the root kexecs a node into its standby image (with the tenant's keys) before it
        # answers a lease: give that the time a kexec may take
        run_rhaas(home, "config", "set", "upstream-timeout", f"{float(self.rh.get('timeout', 120.0)) + 60:g}")
        return home

    def add_image(self, home: str | os.PathLike, name: str = "second") -> None:
        img = self.images[name]
        run_rhaas(home, "image", "add", name, "--kernel", img["kernel"], "--initrd", img["initrd"],
                  "--append", img["append"])

    def running(self) -> dict[str, int]:
        return running_pids(self.dir)

    def down(self) -> list[int]:
        return down(self.dir)


# ---------------------------------------------------------------------------
# what to tell a human
# ---------------------------------------------------------------------------

def describe(stack: LabStack) -> list[str]:
    """The lines ``rhaas lab up`` prints: where everything is, how to derive from it."""
    d, rh, info = stack.dir, stack.rh, stack.info
    exe = rhaas_exe()
    sim = stack.simulated
    lines = []
    if sim:
        lines.append(f"*** {SIM_LABEL} LAB: nodes are simulated by the asyncssh farm, not real machines ***")
    kind = "simulated node(s)" if sim else "QEMU VM(s)"
    fw = "" if sim else f", firmware delay {stack.firmware_delay:g} s"
    lines.append(f"lab up in {d}: {len(stack.names)} {kind}{fw}")
    lines.append("")
    lines.append(f"  {'node':10} {'ssh':28} {'bmc (rmcpplus, cipher 3)':28} mac")
    for nd in info["nodes"]:
        ssh = nd.get("ssh") or f"root@{nd.get('ssh_host')}:{nd.get('ssh_port')}"
        ipmi = nd.get("ipmi")
        bmc = f"{ipmi['user']}@{ipmi['host']}:{ipmi['port']}" if ipmi else "(none)"
        lines.append(f"  {nd['name']:10} {ssh:28} {bmc:28} {nd.get('mac', '')}" + (f"  [{SIM_LABEL}]" if sim else ""))
    lines += [
        "",
        f"  root instance   RHAAS_HOME={rh['home']}",
        f"  serve           {rh['url']}  (pid {rh['serve']['pid']}, log {rh['serve']['log']})"
        + (f"  [{SIM_LABEL}]" if sim else ""),
        f"  project         {rh['project']}",
        f"  users           {ADMIN_USER} (admin; password in {rh['admin']['password_file']})",
        f"                  {TENANT_USER} (project {rh['project']}; password in {rh['tenant']['password_file']})",
        f"  images          standby (the standby image), second   append: {APPEND!r}",
        f"  client key      {rh['client_key']}",
        f"  lab.json        {d / LAB_JSON}",
        "",
        "Point a derived rhaas at it (in a fresh RHAAS_HOME):",
        "  export RHAAS_HOME=$(mktemp -d)",
        f"  RHAAS_UPSTREAM_PASSWORD=$(cat {rh['tenant']['password_file']}) {exe} init --upstream {rh['url']}"
        f" --project {rh['project']} --user {TENANT_USER}",
        f"  {exe} config set ssh-key {rh['client_key']}",
        f"  {exe} config set upstream-timeout {float(rh.get('timeout', 120.0)) + 60:g}"
        "   # the root kexecs each node into its standby image before a lease answers",
        f"  {exe} lease {len(stack.names)}",
        f"  {exe} image add second --kernel {rh['images']['second']['kernel']} "
        f"--initrd {rh['images']['second']['initrd']} --append '{APPEND}'",
        f"  {exe} kexec {stack.names[0]} --image second",
        "",
        f"Stop it with: {exe} lab down --dir {d}",
    ]
    return lines


__all__ = [
    "APPEND", "ADMIN_USER", "CommandFailed", "LabError", "LabStack", "MissingToolError", "PROJECT",
    "SIM_LABEL", "TENANT_USER", "default_dir", "describe", "down", "read_info", "run_rhaas",
    "running_pids", "start_serve", "status", "stop_serve", "up",
]
