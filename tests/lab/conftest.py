"""Fixtures for the lab tests: real QEMU VMs behind real ipmi_sim BMCs.

The tests are marked ``lab`` and skipped (with the Debian package to install)
when qemu-system-x86_64, ipmi_sim or the image-building tools are missing.
One lab with one VM is booted per session; every lab started here is taken
down at the end of the session, by its recorded PIDs.

Environment:
  RHAAS_LAB_CACHE           guest image cache (default ~/.cache/rhaas/lab)
  RHAAS_LAB_FIRMWARE_DELAY  firmware delay in seconds for the session lab (default 0)
"""

from __future__ import annotations

import os
import shutil

import pytest

HOST_TOOLS = (
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("ipmi_sim", "openipmi"),
    ("cpio", "cpio"),
    ("apt-get", "apt"),
    ("dpkg", "dpkg"),
    ("modinfo", "kmod"),
)

_started_labs: list = []
TIMINGS: dict[str, float] = {}


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


def register_lab(lab) -> None:
    _started_labs.append(lab)


def _down_all() -> None:
    from rhaas.lab.vm import LabError

    while _started_labs:
        lab = _started_labs.pop()
        try:
            lab.down()
        except LabError:
            pass


def pytest_sessionfinish(session, exitstatus):
    _down_all()  # safety net; fixtures normally did it already


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("lab timings (seconds)")
        for key, value in TIMINGS.items():
            terminalreporter.write_line(f"{key:40s} {value:7.2f}")


@pytest.fixture(scope="session")
def lab_cache_dir():
    from rhaas.lab.guest import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def lab(tmp_path_factory, lab_cache_dir):
    """A running one-node lab for the whole session."""
    import time

    from rhaas.lab import Lab

    delay = float(os.environ.get("RHAAS_LAB_FIRMWARE_DELAY", "0"))
    t0 = time.monotonic()
    lab = Lab.up(1, firmware_delay=delay, dir=tmp_path_factory.mktemp("lab"),
                 cache_dir=lab_cache_dir)
    register_lab(lab)
    TIMINGS["lab up (1 VM, to SSH)"] = time.monotonic() - t0
    for key, value in lab.info.get("timings", {}).items():
        TIMINGS[f"  {key}"] = value
    try:
        yield lab
    finally:
        lab.down()
        if lab in _started_labs:
            _started_labs.remove(lab)


@pytest.fixture
def lab_factory(lab_cache_dir):
    """Start extra labs in a test; each is taken down when the test ends."""
    from rhaas.lab import Lab

    mine = []

    def make(n=1, firmware_delay=0.0, dir=None, **kw):
        kw.setdefault("cache_dir", lab_cache_dir)
        lab = Lab.up(n, firmware_delay=firmware_delay, dir=dir, **kw)
        mine.append(lab)
        register_lab(lab)
        return lab

    yield make
    for lab in mine:
        lab.down()
        if lab in _started_labs:
            _started_labs.remove(lab)


@pytest.fixture(scope="session")
def timings():
    return TIMINGS
