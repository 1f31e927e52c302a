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

Runs as a plain script: ``vm.py`` and ``hostproc.py`` are loaded by file path so
that nothing from the ``rhaas`` package (and its dependencies) is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time


def _load_by_path(name: str, filename: str):
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(name, os.path.join(here, filename))
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = mod  # type: ignore[union-attr]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _load_vm_module():
    """vm.py and the hostproc.py it imports, by path (vm.py looks for ``_rhaas_lab_hostproc``)."""
    _load_by_path("_rhaas_lab_hostproc", "hostproc.py")
    return _load_by_path("_rhaas_lab_vm", "vm.py")


def dispatch(op: str, args: list[str], chassis) -> tuple[int, list[str]]:
    """ipmi_sim's chassis_control contract, over any chassis.

    ``chassis`` has ``power() -> bool``, ``boot() -> str``, ``set_power(value)``,
    ``reset()``, ``set_boot(dev)`` and ``shutdown()``; this VM's chassis and the
    state-only one of simulated nodes (:mod:`rhaas.lab.simchassis`) share this parser.
    """
    out: list[str] = []
    if op == "get":
        for p in args:
            if p == "power":
                out.append(f"power:{1 if chassis.power() else 0}")
            elif p == "boot":
                out.append(f"boot:{chassis.boot()}")
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
            chassis.set_power(val)
        elif key == "reset":
            chassis.reset()
        elif key == "boot":
            chassis.set_boot(val)
        elif key == "shutdown":
            chassis.shutdown()
        elif key == "identify":
            if i < len(args) and args[i] == "force":
                i += 1
        else:
            return 1, [f"unknown parameter {key}"]
    return 0, out


class VMChassis:
    """The chassis of one lab VM: power is whether its QEMU runs."""

    def __init__(self, node_dir: str):
        self.vm = _load_vm_module().VM(node_dir)

    def power(self) -> bool:
        return self.vm.is_running()

    def boot(self) -> str:
        return self.vm.boot_device()

    def set_power(self, value: str) -> None:
        if value == "0":
            self.vm.stop(timeout=2.0)
        else:
            self.vm.start()

    def reset(self) -> None:
        self.vm.reset()

    def set_boot(self, dev: str) -> None:
        self.vm.set_boot_device(dev)

    def shutdown(self) -> None:
        self.vm.stop(timeout=10.0)


def main(argv: list[str], make_chassis=VMChassis, usage: str = "chassis.py NODE_DIR") -> int:
    """Answer one ipmi_sim call, print the answer, and log it to DIR/chassis.log."""
    if len(argv) < 3:
        print(f"usage: {usage} get|set PARAM [VALUE]...")
        return 1
    state_dir, op, args = argv[1], argv[2], argv[3:]
    t0 = time.monotonic()
    try:
        rc, out = dispatch(op, args, make_chassis(state_dir))
    except Exception as e:  # noqa: BLE001 - report to ipmi_sim, never traceback
        rc, out = 1, [f"error: {type(e).__name__}: {e}"]
    for line in out:
        print(line)
    try:
        with open(os.path.join(state_dir, "chassis.log"), "a") as log:
            log.write(f"{time.strftime('%F %T')} {op} {' '.join(args)} -> rc={rc} "
                      f"{'; '.join(out)} ({time.monotonic() - t0:.2f}s)\n")
    except OSError:
        pass
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
