#!/usr/bin/env python3
"""ipmi_sim ``chassis_control`` script for one lab VM.

ipmi_sim runs ``<python> chassis.py NODE_DIR get|set PARAM [VALUE] ...``:

* ``get power`` -> ``power:0|1``; ``get boot`` -> ``boot:<dev>`` (one line per
  parameter; an unknown parameter prints an error and exits 1);
* ``set power 0`` stops the VM, ``set power 1`` starts it (the boot device
  picks the image), ``set reset 1`` resets it, ``set boot <dev>`` records the
  boot device; ``set shutdown``/``set identify`` are accepted (shutdown acts
  as a graceful power off, identify is ignored).

Power cycle is ipmi_sim's own ``set power 0`` -> poll ``get power`` ->
``set power 1``.  Every call is logged to ``NODE_DIR/chassis.log``.

Runs as a plain script: ``vm.py`` is loaded by file path so that nothing
from the ``rhaas`` package (and its dependencies) is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time


def _load_vm_module():
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_rhaas_lab_vm", os.path.join(here, "vm.py"))
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = mod  # type: ignore[union-attr]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def run(node_dir: str, op: str, args: list[str]) -> tuple[int, list[str]]:
    vmmod = _load_vm_module()
    vm = vmmod.VM(node_dir)
    out: list[str] = []
    if op == "get":
        for p in args:
            if p == "power":
                out.append(f"power:{1 if vm.is_running() else 0}")
            elif p == "boot":
                out.append(f"boot:{vm.boot_device()}")
            else:
                out.append(f"unknown parameter {p}")
                return 1, out
        return 0, out
    if op == "set":
        i = 0
        while i < len(args):
            key = args[i]
            val = args[i + 1] if i + 1 < len(args) else ""
            i += 2
            if key == "power":
                if val == "0":
                    vm.stop(timeout=2.0)
                else:
                    vm.start()
            elif key == "reset":
                vm.reset()
            elif key == "boot":
                vm.set_boot_device(val)
            elif key == "shutdown":
                vm.stop(timeout=10.0)
            elif key == "identify":
                if i < len(args) and args[i] == "force":
                    i += 1
            else:
                out.append(f"unknown parameter {key}")
                return 1, out
        return 0, out
    out.append(f"unknown operation {op}")
    return 1, out


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: chassis.py NODE_DIR get|set PARAM [VALUE]...")
        return 1
    node_dir, op, args = argv[1], argv[2], argv[3:]
    t0 = time.monotonic()
    try:
        rc, out = run(node_dir, op, args)
    except Exception as e:  # noqa: BLE001 - report to ipmi_sim, never traceback
        rc, out = 1, [f"error: {type(e).__name__}: {e}"]
    for line in out:
        print(line)
    try:
        with open(os.path.join(node_dir, "chassis.log"), "a") as log:
            log.write(f"{time.strftime('%F %T')} {op} {' '.join(args)} -> rc={rc} "
                      f"{'; '.join(out)} ({time.monotonic() - t0:.2f}s)\n")
    except OSError:
        pass
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
