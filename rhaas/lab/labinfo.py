"""What a lab records (``DIR/lab.json``), its fixed names, and which of its processes still run."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from .rhaasproc import serve_pid_matches
from .vm import LabError, pid_matches

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


def default_dir() -> Path:
    """``$RHAAS_LAB_DIR`` or ``./.lab``."""
    return Path(os.environ.get("RHAAS_LAB_DIR") or ".lab")


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


def update_info(d: Path, **changes) -> dict:
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
