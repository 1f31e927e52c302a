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


def run(state_dir: str, op: str, args: list[str]) -> tuple[int, list[str]]:
    power = os.path.join(state_dir, "power")
    boot = os.path.join(state_dir, "boot")
    out: list[str] = []
    if op == "get":
        for p in args:
            if p == "power":
                out.append(f"power:{'1' if _read(power, '0') == '1' else '0'}")
            elif p == "boot":
                out.append(f"boot:{_read(boot, 'pxe')}")
            else:
                out.append(f"unknown parameter {p}")
                return 1, out
        return 0, out
    if op != "set":
        return 1, [f"unknown operation {op}"]
    i = 0
    while i < len(args):
        key = args[i]
        val = args[i + 1] if i + 1 < len(args) else ""
        i += 2
        if key == "power":
            _write(power, "1" if val == "1" else "0")
        elif key == "boot":
            _write(boot, val)
        elif key == "reset":
            if _read(power, "0") == "1":
                _write(power, "0")
                time.sleep(0.4)
                _write(power, "1")
        elif key == "shutdown":
            _write(power, "0")
        elif key == "identify":
            if i < len(args) and args[i] == "force":
                i += 1
        else:
            return 1, [f"unknown parameter {key}"]
    return 0, out


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: simchassis.py STATE_DIR get|set PARAM [VALUE]...")
        return 1
    state_dir, op, args = argv[1], argv[2], argv[3:]
    try:
        rc, out = run(state_dir, op, args)
    except Exception as e:  # noqa: BLE001 - report to ipmi_sim, never a traceback
        rc, out = 1, [f"error: {type(e).__name__}: {e}"]
    for line in out:
        print(line)
    try:
        with open(os.path.join(state_dir, "chassis.log"), "a") as log:
            log.write(f"{time.strftime('%F %T')} {op} {' '.join(args)} -> rc={rc} {'; '.join(out)}\n")
    except OSError:
        pass
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
