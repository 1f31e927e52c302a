"""Fixtures for the lab tests: real QEMU VMs behind real ipmi_sim BMCs, owned by a root rhaas.

The tests are marked ``lab`` and skipped (naming the Debian package to install) when
qemu-system-x86_64, ipmi_sim or the image-building tools are missing.

One lab is brought up per session, through the CLI (``rhaas lab up --nodes 2``): two VMs,
firmware delay 0, a root rhaas instance and its ``rhaas serve``. Every lab test shares it
(the phase-1 ``lab`` fixture is the same lab seen through :class:`rhaas.lab.Lab`), so at
most two VMs run at a time. At the end of the session ``rhaas lab down`` stops it, and the
teardown checks that no recorded process survived (any survivor is stopped by its PID and
the teardown fails).

Environment:
  RHAAS_LAB_CACHE           guest image cache (default ~/.cache/rhaas/lab)
  RHAAS_LAB_FIRMWARE_DELAY  firmware delay in seconds for the session lab (default 0)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HOST_TOOLS = (
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("ipmi_sim", "openipmi"),
    ("cpio", "cpio"),
    ("apt-get", "apt"),
    ("dpkg", "dpkg"),
    ("modinfo", "kmod"),
)

TIMINGS: dict[str, float] = {}
_LAB_DIRS: list[Path] = []
# read once at import: the per-test fixtures remove every RHAAS_* variable later
_CACHE_ENV = {k: os.environ[k] for k in ("RHAAS_LAB_CACHE",) if os.environ.get(k)}
_DELAY = os.environ.get("RHAAS_LAB_FIRMWARE_DELAY", "0")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "lab: boots real QEMU VMs behind ipmi_sim BMCs (slow; needs the Debian "
        "packages qemu-system-x86 and openipmi)")


def missing_tools() -> list[str]:
    return [f"{tool} (Debian package {pkg})" for tool, pkg in HOST_TOOLS if not shutil.which(tool)]


def pytest_collection_modifyitems(config, items):
    missing = missing_tools()
    if not missing:
        return
    skip = pytest.mark.skip(reason="lab tools missing: " + ", ".join(missing))
    for item in items:
        if item.get_closest_marker("lab") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("lab timings (seconds)")
        for key, value in TIMINGS.items():
            terminalreporter.write_line(f"{key:44s} {value:7.2f}")


def _cli(*args, timeout=900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    env.update(_CACHE_ENV)
    return subprocess.run([sys.executable, "-m", "rhaas", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def _teardown(d: Path) -> list[str]:
    """``rhaas lab down``, then make sure nothing of the lab is left; returns the survivors."""
    from rhaas.lab.stack import running_pids
    from rhaas.lab.vm import pid_alive

    before = running_pids(d)
    proc = _cli("lab", "down", "--dir", d, timeout=120)
    survivors = [f"{k}={p}" for k, p in before.items() if pid_alive(p)]
    left = running_pids(d)  # also re-checks recorded PIDs against their command lines
    if left:
        from rhaas.lab.stack import down

        down(d)  # by PID again, then report
        survivors += [f"{k}={p}" for k, p in left.items()]
    if proc.returncode != 0:
        survivors.append(f"(rhaas lab down exited {proc.returncode}: {proc.stderr.strip()[-300:]})")
    return survivors


def pytest_sessionfinish(session, exitstatus):
    # safety net if a fixture's teardown never ran (e.g. an interrupted session)
    from rhaas.lab.stack import down

    for d in _LAB_DIRS:
        try:
            down(d)
        except Exception:  # noqa: BLE001, S110 - best effort; the fixture reports failures
            pass


@pytest.fixture(scope="session")
def lab_cache_dir():
    from rhaas.lab.guest import default_cache_dir

    return Path(_CACHE_ENV.get("RHAAS_LAB_CACHE") or default_cache_dir())


@pytest.fixture(scope="session")
def lab_stack(tmp_path_factory):
    """The session's lab: 2 VMs + root rhaas + serve, brought up by ``rhaas lab up``."""
    from rhaas.lab.stack import LabStack

    d = tmp_path_factory.mktemp("lab")
    _LAB_DIRS.append(d)
    t0 = time.monotonic()
    proc = _cli("lab", "up", "--nodes", "2", "--firmware-delay", _DELAY, "--dir", d)
    TIMINGS["rhaas lab up --nodes 2 (to serve)"] = time.monotonic() - t0
    if proc.returncode != 0:
        survivors = _teardown(d) if (d / "lab.json").exists() else []
        pytest.fail(f"rhaas lab up exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
                    + (f"; survivors: {survivors}" if survivors else ""))
    stack = LabStack(d)
    stack.up_stdout = proc.stdout  # what `lab up` printed, for the tests
    try:
        yield stack
    finally:
        survivors = _teardown(d)
        assert not survivors, f"lab processes survived 'rhaas lab down': {survivors}"


@pytest.fixture(scope="session")
def lab(lab_stack):
    """The session lab as a phase-1 :class:`rhaas.lab.Lab` (nodes, VMs, BMCs)."""
    return lab_stack.lab


@pytest.fixture(scope="session")
def timings():
    return TIMINGS
