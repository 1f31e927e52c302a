"""Shared fixtures: every test gets its own RHAAS_HOME, and worlds of real processes.

Worlds are built from real parts (tests/worlds.py): `rhaas serve` processes on loopback
ports, the simulated SSH node farm, Debian's ipmi_sim. Every process a fixture starts is
stopped by its PID.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worlds import Served


@pytest.fixture(autouse=True)
def rhaas_home(tmp_path, monkeypatch):
    """Point RHAAS_HOME at a fresh directory and drop any RHAAS_* setting from outside."""
    for key in list(os.environ):
        if key.startswith("RHAAS_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("RHAAS_HOME", str(home))
    monkeypatch.setenv("NO_COLOR", "1")
    return home


@pytest.fixture
def start_serve():
    started: list[Served] = []

    def start(home):
        s = Served(Path(home))
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


