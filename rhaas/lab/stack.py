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
* ``blob-listen 127.0.0.1:PORT`` (the lab's fixed ``blob_port``) and ``blob-url
  http://10.0.2.100:80`` (the VMs' forward to that port), so its kexec runs let the VMs pull
  the image over HTTP; a second run at the same time finds the port busy and pushes over SFTP;
* ``rhaas serve`` on a free loopback port, started in its own session so it outlives
  ``rhaas lab up``.

Everything is recorded in ``DIR/lab.json`` (the phase-1 keys plus a ``rhaas`` section, and
``simulated``/``label`` for a simulated lab).  The pieces: :mod:`rhaas.lab.labinfo` (lab.json),
:mod:`rhaas.lab.rootinstance` (the root instance), :mod:`rhaas.lab.rhaasproc` (rhaas and
serve as child processes), :mod:`rhaas.lab.simlab` (simulated nodes), :mod:`rhaas.lab.handle`
(:class:`LabStack`, :func:`describe`).  :func:`down` stops exactly the recorded PIDs
(serve, farm, BMCs, VMs), each after checking it is still the process we started, and
removes nothing.

:class:`LabStack` is the programmatic handle used by the demo, the tests and the bench.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from .handle import LabStack, describe
from .labinfo import (
    ADMIN_USER,
    APPEND,
    IMAGE_NAMES,
    PROJECT,
    ROOT_HOME,
    SIM_LABEL,
    TENANT_USER,
    Log,
    default_dir,
    read_info,
    running_pids,
    update_info,
    write_info,
)
from .rhaasproc import CommandFailed, children, run_rhaas, serve_pid_matches, start_serve, stop_serve
from .rootinstance import fresh_home, refuse_if_running, setup_root, start_root_serve
from .simlab import up_sim
from .vm import LabError, MissingToolError, kill_pid, pid_matches


def up(dir: str | os.PathLike | None = None, nodes: int = 2, firmware_delay: float = 0.0, *,
       sim: int | None = None, cache_dir: str | os.PathLike | None = None, memory_mb: int = 256,
       log: Log | None = None) -> LabStack:
    """Bring up the lab in ``dir`` (default :func:`default_dir`); see the module docstring."""
    log = log or (lambda msg: None)
    d = Path(dir or default_dir()).expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    refuse_if_running(d)
    if sim:
        return up_sim(d, sim, log)
    if nodes < 1:
        raise LabError("need at least one node")
    from .lab import Lab, check_host_tools

    check_host_tools()
    fresh_home(d / ROOT_HOME)
    t0 = time.monotonic()
    def lab_log(msg: str) -> None:  # Lab.up(wait=False) returns before the VMs answer
        if not msg.startswith(("lab up in", "started ")):
            log(msg)

    lab = Lab.up(nodes, firmware_delay, d, cache_dir=cache_dir, memory_mb=memory_mb, wait=False, log=lab_log)
    log(f"started {nodes} VM(s) and their ipmi_sim BMCs")
    try:
        update_info(d, simulated=False, label="qemu")
        imgs = lab.info["images"]
        images = {name: {"kernel": imgs["kernel"], "initrd": imgs["initrds"][name], "append": APPEND}
                  for name in IMAGE_NAMES}
        specs = [{"name": n.name, "ssh": n.ssh_target, "host_key": n.host_key, "mac": n.mac,
                  "ipmi": n.ipmi} for n in lab.nodes]
        timeout_setting = max(120.0, 2 * firmware_delay + 60.0)
        (d / ROOT_HOME).mkdir(parents=True, exist_ok=True)
        blob = (lab.info["blob_listen"], lab.info["blob_url"])
        rh = setup_root(d, d / ROOT_HOME, specs, images, timeout_setting=timeout_setting, log=log, blob=blob)
        rh["blob"] = {"listen": blob[0], "url": blob[1]}
        rh["simulated"] = False
        update_info(d, rhaas=rh)
        log(f"waiting for SSH on {nodes} VM(s) (firmware delay {firmware_delay:g} s)")
        wait = 90.0 + 2 * firmware_delay + 20.0 * nodes
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(max_workers=min(nodes, 8)) as ex:
            list(ex.map(lambda n: n.wait_ssh(timeout=wait), lab.nodes))
        t_ssh = time.monotonic() - t0
        rh = start_root_serve(d, rh, log)
        info = read_info(d)
        info.setdefault("timings", {})["up_to_ssh_s"] = round(t_ssh, 2)
        info["timings"]["up_total_s"] = round(time.monotonic() - t0, 2)
        write_info(d, info)
    except BaseException:
        with contextlib.suppress(Exception):
            down(d)
        raise
    return LabStack(d)


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
            children.pop(farm["pid"], None)
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


__all__ = [
    "ADMIN_USER", "APPEND", "PROJECT", "SIM_LABEL", "TENANT_USER", "CommandFailed", "LabError", "LabStack",
    "MissingToolError", "default_dir", "describe", "down", "read_info", "run_rhaas", "running_pids",
    "start_serve", "status", "stop_serve", "up",
]
