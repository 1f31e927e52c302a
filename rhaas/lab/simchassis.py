#!/usr/bin/env python3
"""State-only ``chassis_control`` for the BMCs of SIMULATED lab nodes.

ipmi_sim runs ``<python> simchassis.py STATE_DIR get|set PARAM [VALUE]...``.  There is
no machine behind it: the chassis is two files in STATE_DIR,

* ``power``: ``0`` or ``1``.  The simulated node farm (:mod:`rhaas.sim.farm`) follows it
  through its ``power_file`` fault: ``0`` powers the node off, ``1`` boots it afresh;
* ``boot``: the boot device ipmi_sim last set (``pxe``, ``default``, ``none``, ...).

``set reset 1`` turns the power off and on again, slowly enough (0.4 s) for the farm,
which polls the file every 0.1 s, to notice.  Every call is appended to
``STATE_DIR/chassis.log``.  Standard library only: ipmi_sim starts this for every call.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time


def _read(path: str, default: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip() or default
    except OSError:
        return default


def _write(path: str, value: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(value + "\n")
    os.replace(tmp, path)


class FileChassis:
    """A chassis that is two files: ``power`` (0/1) and ``boot``."""

    def __init__(self, state_dir: str):
        self.power_file = os.path.join(state_dir, "power")
        self.boot_file = os.path.join(state_dir, "boot")

    def power(self) -> bool:
        return _read(self.power_file, "0") == "1"

    def boot(self) -> str:
        return _read(self.boot_file, "pxe")

    def set_power(self, value: str) -> None:
        _write(self.power_file, "1" if value == "1" else "0")

    def reset(self) -> None:
        if self.power():
            _write(self.power_file, "0")
            time.sleep(0.4)
            _write(self.power_file, "1")

    def set_boot(self, dev: str) -> None:
        _write(self.boot_file, dev)

    def shutdown(self) -> None:
        _write(self.power_file, "0")


def _load_chassis_module():
    """The shared chassis_control parser, loaded by path: no ``rhaas`` package import."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_rhaas_lab_chassis", os.path.join(here, "chassis.py"))
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main(argv: list[str]) -> int:
    return _load_chassis_module().main(argv, FileChassis, "simchassis.py STATE_DIR")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
