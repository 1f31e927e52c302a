"""A kexec that ends in a kernel panic explains itself, through two levels, on real VMs.

d2 -> d1 -> the lab's root -> ipmi_sim SOL -> the VM's serial port (QEMU's chardev socket;
the console.log file is still written). d2 kexecs lab-01 into an image whose initramfs has
an /init that cannot run, so the kernel panics ("Kernel panic - not syncing: ...") and, with
``panic=0``, stays there. The run ends ``failed`` (``--no-fallback``: the panic stays the
last thing on the console, so ``rhaas console`` shows it afterwards too), and the result,
its JSON and the event log carry the panic line. The node is brought back with a PXE power
cycle at the end.
"""

from __future__ import annotations

import gzip
import json

import pytest
from lab_helpers import STATE_CMD, node_state, parse_state, wait_free

pytestmark = pytest.mark.lab

PANIC = "Kernel panic - not syncing"


def panic_initrd(path) -> None:
    """An initramfs whose /init names an interpreter that does not exist: the kernel cannot
    start init and panics ("No working init found")."""
    from rhaas.lab.initrd import overlay_bytes

    path.write_bytes(gzip.compress(overlay_bytes({"init": (b"#!/no/such/shell\n", 0o755)}, {"dev": 0o755})))


def test_kexec_panic_is_explained_through_two_levels(lab_stack, tmp_path, timings):
    import time

    from rhaas.lab.stack import run_rhaas, start_serve, stop_serve

    node = lab_stack.node("lab-01")
    # the serial port is wired to the BMC's SOL, and the console log file is still written
    assert "sol \"tcp:127.0.0.1:" in (node.bmc.lan_conf.read_text())
    assert node.vm.console_log.stat().st_size > 0

    d1 = lab_stack.derive(tmp_path / "d1")
    wait_free(lab_stack, "lab-01")
    run_rhaas(d1, "lease", "lab-01")
    run_rhaas(d1, "project", "add", "p2")
    run_rhaas(d1, "user", "add", "bob", "--project", "p2", "--password-stdin", input="bobs-pw\n")
    s1 = start_serve(d1)
    back, d2 = False, None
    try:
        d2 = lab_stack.derive(tmp_path / "d2", user="bob", project="p2", password="bobs-pw", url=s1.url)
        run_rhaas(d2, "lease", "lab-01")
        initrd = tmp_path / "panic.cpio.gz"
        panic_initrd(initrd)
        kernel = lab_stack.images["second"]["kernel"]
        run_rhaas(d2, "image", "add", "panic", "--kernel", kernel, "--initrd", initrd,
                  "--append", "console=ttyS0 panic=0")
        before = node_state(node)

        t0 = time.monotonic()
        proc = run_rhaas(d2, "kexec", "lab-01", "--image", "panic", "--timeout", "45", "--no-fallback",
                         "--json", check=False, timeout=300)
        timings["kexec into a panicking image at d2 (-> failed)"] = time.monotonic() - t0
        assert proc.returncode == 1, proc.stderr
        r = json.loads(proc.stdout)[0]
        assert r["outcome"] == "failed", r  # --no-fallback
        assert any(PANIC in line for line in r["console_tail"]), r
        assert PANIC in r["console_tail"][-1] and PANIC in r["reason"], r
        assert r["reason"].startswith("did not come back"), r

        # the event log at d2 keeps it too
        events = json.loads(run_rhaas(d2, "events", "lab-01", "--json").stdout)
        kexec_events = [e for e in events if e["action"] == "kexec"]
        assert kexec_events and PANIC in json.dumps(kexec_events[-1]), kexec_events[-1:]
        # and so does the node's record
        doc = json.loads(run_rhaas(d2, "show", "lab-01", "--json").stdout)
        assert doc["status"] == "failed" and PANIC in doc["reason"], doc

        # the console itself, read at d2 through d1 and the root from the BMC
        proc = run_rhaas(d2, "console", "lab-01", "--lines", "20", check=False, timeout=120)
        assert proc.returncode == 0, proc.stderr
        shown = proc.stdout
        assert PANIC in shown
        assert r["console_tail"][-1].strip() in shown
        # ... and it is the same console QEMU logs to its file
        assert PANIC in node.vm.console_log.read_text(errors="replace")

        # bring the node back (PXE + power cycle into the standby image) and give it back
        run_rhaas(d2, "bootdev", "pxe", "lab-01", timeout=120)
        run_rhaas(d2, "power", "cycle", "lab-01", timeout=120)
        after = parse_state(node.wait_ssh(timeout=240, command=STATE_CMD,
                                          until=lambda t: parse_state(t)["boot_id"] != before["boot_id"]))
        assert after["image"] == "standby"
        back = True
        run_rhaas(d2, "free", "lab-01", timeout=300)
    finally:
        if not back:  # a failure above left the node in its panic and leased: the next tests need it
            node.vm.set_boot_device("pxe")
            node.vm.power_cycle()
            node.wait_ssh(timeout=240)
            if d2 is not None:
                run_rhaas(d2, "free", "lab-01", timeout=300, check=False)
        stop_serve(s1.pid, d1)
        run_rhaas(d1, "free", "lab-01", timeout=300, check=False)
    wait_free(lab_stack, "lab-01")  # back on the standby image before the next test uses it
