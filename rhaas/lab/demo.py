"""`make demo`: rhaas's main job on a local lab, end to end, in a few minutes.

    python -m rhaas.lab.demo

1. a lab of 4 QEMU VMs behind ipmi_sim BMCs with a modelled firmware (POST) delay, owned by
   a root rhaas that serves them on loopback (``rhaas lab up``);
2. a DERIVED rhaas (its own RHAAS_HOME) that leases all 4 from the lab's serve;
3. ``rhaas kexec`` of all 4 into the image ``second``, with per-node phase timings and the
   transfer path: the derived rhaas serves the image for the run (``blob-listen``, the lab's
   fixed loopback port, which each VM reaches at ``blob-url`` http://10.0.2.100:80) and the
   nodes pull it over HTTP (origin or peer, MB), verify its sha256, load and jump; then the
   bytes the origin sent;
4. one node's kexec broken on purpose (``/sbin/kexec`` moved away over SSH): the IPMI
   fallback brings it back, through the upstream power API down to the root's ipmi_sim;
5. one node re-provisioned by kexec and one by a PXE power cycle, for comparison; the kexec
   is a repeat deploy of an image already on the node's cache disk: transfer ``cache``, 0 bytes;
6. everything freed (the root returns the nodes to its standby image by kexec);
7. the lab goes down, always: also on failure or Ctrl-C.

Environment: RHAAS_DEMO_NODES (default 4), RHAAS_DEMO_FIRMWARE_DELAY (seconds, default 30),
RHAAS_DEMO_DIR (default ./.demo; the directory is removed after a successful run unless
RHAAS_DEMO_KEEP=1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from .stack import CommandFailed, down, run_rhaas, up
from .vm import LabError, MissingToolError

PHASES = ("connect", "stage", "load", "down", "up", "verify")
LAST_TRANSFER: dict = {}


class Out:
    """Headed steps on stdout; progress lines on stderr."""

    def __init__(self, total: int):
        self.total = total
        self.n = 0
        self.t0 = time.monotonic()

    def step(self, title: str) -> None:
        self.n += 1
        print(f"\n== [{self.n}/{self.total}] {title}  (t+{time.monotonic() - self.t0:.0f}s)", flush=True)

    def say(self, text: str = "") -> None:
        print(f"   {text}" if text else "", flush=True)

    def note(self, text: str) -> None:
        print(f"   . {text}", file=sys.stderr, flush=True)


def transfer_text(r: dict) -> str:
    """How the node got the image: ``origin 17.2MB``, ``peer:lab-01 17.2MB``, ``sftp 17.2MB``, ``cache 0B``."""
    t = r.get("transfer") or {}
    if not t.get("path"):
        return "-"
    where = f"peer:{t.get('source')}" if t["path"] == "peer" else t["path"]
    n = int(t.get("bytes") or 0)
    return f"{where} {n / 1e6:.1f}MB" if n else f"{where} 0B"


def transfer_line(summary: dict | None) -> str:
    """The run's one stderr line (``rhaas kexec --json``): the bytes the origin sent."""
    if not summary:
        return "no origin in this run (nothing to send, or its port was busy: SFTP)"
    paths = ", ".join(f"{k} {v}" for k, v in sorted((summary.get("paths") or {}).items())) or "none"
    return (f"the origin sent {summary.get('origin_bytes', 0) / 1e6:.1f} MB; the nodes received "
            f"{summary.get('node_bytes', 0) / 1e6:.1f} MB (paths: {paths})")


def phase_table(results: list[dict], walls: dict[str, float] | None = None) -> list[str]:
    """``rhaas kexec --json`` results as a small table of phase seconds and the transfer."""
    head = f"{'node':8} {'outcome':9}" + "".join(f"{p:>8}" for p in PHASES) + f"{'sum':>8}  transfer"
    lines = [head]
    for r in results:
        ph = r.get("phases") or {}
        total = sum(ph.get(p, 0.0) for p in PHASES)
        row = f"{r['node']:8} {r['outcome']:9}" + "".join(
            f"{ph[p]:8.1f}" if p in ph else f"{'-':>8}" for p in PHASES) + f"{total:8.1f}  {transfer_text(r)}"
        if r.get("reason"):
            row += f"   {r['reason'][:70]}"
        lines.append(row)
    return lines


def kexec_json(home: Path, *args, timeout: float = 900) -> tuple[list[dict], float, int]:
    """``rhaas kexec ARGS --json``: (results, wall seconds, exit code); the run's transfer line
    (the bytes the origin sent) goes to :data:`LAST_TRANSFER`."""
    LAST_TRANSFER.clear()
    t0 = time.monotonic()
    proc = run_rhaas(home, "kexec", *args, "--json", check=False, timeout=timeout)
    wall = time.monotonic() - t0
    try:
        results = json.loads(proc.stdout) if proc.stdout.strip() else []
    except ValueError:
        results = []
    for line in proc.stderr.splitlines():
        if line.startswith("{") and "rhaas_kexec_transfer" in line:
            try:
                LAST_TRANSFER.update(json.loads(line)["rhaas_kexec_transfer"])
            except (ValueError, KeyError, TypeError):
                pass
    if proc.returncode not in (0, 1) or not results:
        err = proc.stderr.strip().splitlines()
        raise CommandFailed(f"rhaas kexec {' '.join(map(str, args))} exited {proc.returncode}: "
                            + (" / ".join(err[-3:]) or "no output"))
    return results, wall, proc.returncode


def state(node) -> dict:
    # through the lab's readiness wait: just after `lab up` a guest's dropbear may still be
    # turning away new logins for a few seconds (its pre-auth slots held by the boot polls)
    out = node.wait_ssh(timeout=120, command="cat /proc/sys/kernel/random/boot_id /etc/rhaas-image /proc/cmdline")
    lines = out.splitlines()
    return {"boot_id": lines[0].strip(), "image": lines[1].strip(), "cmdline": lines[2].strip()}


def chassis_lines(node, since: int) -> list[str]:
    path = Path(node.node_dir) / "chassis.log"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [ln for ln in lines[since:] if " set " in f" {ln}"]


def chassis_mark(node) -> int:
    try:
        return len((Path(node.node_dir) / "chassis.log").read_text().splitlines())
    except OSError:
        return 0


def run_demo(out: Out, d: Path, n: int, fd: float) -> dict:
    figures: dict = {}
    names = [f"lab-{i:02d}" for i in range(1, n + 1)]
    nodeset = f"lab-[01-{n:02d}]" if n > 1 else names[0]

    out.step(f"Bring up the lab: {n} QEMU VMs behind ipmi_sim BMCs, firmware delay {fd:g} s")
    out.say("every power-on pays the firmware delay (SeaBIOS boot-menu wait); a kexec never does")
    t0 = time.monotonic()
    stack = up(d, n, fd, log=out.note)
    figures["lab_up_s"] = time.monotonic() - t0
    out.say(f"lab up in {figures['lab_up_s']:.0f}s: root rhaas in {stack.root_home}, serving {stack.url}")
    for nd in stack.info["nodes"]:
        out.say(f"  {nd['name']}  ssh {nd['ssh']}  bmc ipmi {nd['ipmi']['user']}@{nd['ipmi']['host']}:{nd['ipmi']['port']}")

    out.step("A derived rhaas leases all nodes from the lab's serve")
    home = stack.derive(d / "derived")
    out.say(f"RHAAS_HOME={home}")
    out.say(f"rhaas init --upstream {stack.url} --project lab --user tenant   (password from {d / 'tenant.password'})")
    # an assignment on serve is bookkeeping: the tenant's keys ride in the node's next kexec
    run_rhaas(home, "lease", *names)
    stack.add_image(home, "second")
    listing = json.loads(run_rhaas(home, "list", "--json").stdout)
    out.say(f"rhaas lease {' '.join(names)}  ->  leased {', '.join(x['name'] for x in listing)}; "
            "the root recorded the tenant's keys for the nodes' next kexec (no reboot in the lease)")
    out.say("rhaas image add second --kernel ... --initrd ... --append 'console=ttyS0 quiet panic=5'")

    out.step(f"rhaas kexec {nodeset} --image second --via ssh: the nodes pull the image over HTTP")
    out.say(f"this rhaas serves the image for the run on 127.0.0.1:{stack.info['blob_port']} (blob-listen); "
            f"each VM reaches it at {stack.info['blob_url']} (blob-url, QEMU guestfwd)")
    before = {nm: state(stack.node(nm)) for nm in names}
    results, wall, _rc = kexec_json(home, nodeset, "--image", "second", "--via", "ssh")
    for line in phase_table(results):
        out.say(line)
    out.say(transfer_line(LAST_TRANSFER))
    figures["origin_bytes"] = LAST_TRANSFER.get("origin_bytes", 0)
    ok = [r for r in results if r["outcome"] == "ok"]
    out.say(f"{len(ok)}/{n} verified (new boot id + rhaas.nonce on the kernel command line) in {wall:.1f}s wall")
    for r in ok:
        now = state(stack.node(r["node"]))
        if now["boot_id"] == before[r["node"]]["boot_id"] or now["image"] != "second" \
                or f"rhaas.nonce={r['nonce']}" not in now["cmdline"].split():
            raise LabError(f"{r['node']}: the node does not run what rhaas reported")
    if len(ok) != n:
        raise LabError("not every node kexec'd: " + ", ".join(f"{r['node']} {r['outcome']}" for r in results))
    figures["kexec_all_wall_s"] = wall

    victim = stack.node(names[1 % n])
    out.step(f"Break {victim.name}'s kexec on purpose; the IPMI fallback brings it back")
    rc_mv, _o, err = victim.run("mv /sbin/kexec /sbin/kexec.broken")
    if rc_mv != 0:
        raise LabError(f"{victim.name}: cannot move /sbin/kexec away: {err.strip()}")
    out.say(f"over SSH (the lab's helper): mv /sbin/kexec /sbin/kexec.broken on {victim.name}")
    old = state(victim)
    mark = chassis_mark(victim)
    results, wall, _rc = kexec_json(home, victim.name, "--image", "second")
    r = results[0]
    for line in phase_table(results):
        out.say(line)
    if r["outcome"] != "fallback":
        raise LabError(f"{victim.name}: expected outcome 'fallback', got {r['outcome']} ({r.get('reason')})")
    now = state(victim)
    out.say(f"outcome fallback after {wall:.1f}s: derived rhaas -> bootdev pxe + power cycle via the lab's "
            "serve (HIL API) -> root rhaas -> IPMI (rmcpplus) -> ipmi_sim:")
    for line in chassis_lines(victim, mark):
        call = line.split(" ", 2)[2] if line.count(" ") >= 2 else line
        out.say(f"    ipmi_sim chassis_control: {call.split(' -> ')[0]}")
    if now["boot_id"] == old["boot_id"] or now["image"] != "standby":
        raise LabError(f"{victim.name}: not back on a fresh standby boot ({now})")
    out.say(f"{victim.name} is back: image {now['image']}, new boot id {now['boot_id'][:8]} (was {old['boot_id'][:8]})")
    figures["fallback_wall_s"] = wall

    kx = stack.node(names[2 % n])
    px = stack.node(names[3 % n])
    out.step(f"Re-provision {kx.name} by kexec and {px.name} by a PXE power cycle")
    old = state(px)
    t0 = time.monotonic()
    run_rhaas(home, "bootdev", "pxe", px.name)
    run_rhaas(home, "power", "cycle", px.name)
    out.say(f"rhaas bootdev pxe {px.name} && rhaas power cycle {px.name}: started "
            f"({px.name} now sits {fd:g} s in firmware, which costs no CPU)")
    results, wall_full, _ = kexec_json(home, kx.name, "--image", "second", "--via", "ssh")
    if results[0]["outcome"] != "ok":
        raise LabError(f"{kx.name}: kexec {results[0]['outcome']}: {results[0].get('reason')}")
    out.say(f"rhaas kexec {kx.name} --image second --via ssh  {wall_full:6.1f}s  (load + jump + verify; transfer "
            f"{transfer_text(results[0])}: the image was already on its cache disk)")
    out.say(transfer_line(LAST_TRANSFER))
    figures["repeat_transfer"] = transfer_text(results[0])
    px.wait_ssh(timeout=2 * fd + 180, until=lambda t: t.strip() != old["boot_id"])
    wall_pxe = time.monotonic() - t0
    now = state(px)
    out.say(f"{px.name}: SSH answers with a new boot id after  {wall_pxe:6.1f}s  (image {now['image']})")
    results, wall_load, _ = kexec_json(home, kx.name, "--image", "second", "--load-only")
    if results[0]["outcome"] != "loaded":
        raise LabError(f"{kx.name}: --load-only {results[0]['outcome']}: {results[0].get('reason')}")
    results, wall_exec, _ = kexec_json(home, kx.name, "--exec")
    if results[0]["outcome"] != "ok":
        raise LabError(f"{kx.name}: --exec {results[0]['outcome']}: {results[0].get('reason')}")
    out.say(f"rhaas kexec {kx.name} --load-only, then --exec    {wall_exec:6.1f}s  (jump + verify; "
            f"the load took {wall_load:.1f}s beforehand)")
    figures.update(kexec_full_s=wall_full, kexec_exec_s=wall_exec, powercycle_s=wall_pxe)

    out.step("Free everything; the root returns the nodes to its standby image by kexec")
    proc = run_rhaas(home, "free", nodeset, "--json", check=False, timeout=600)
    try:
        freed = [r["node"] for r in json.loads(proc.stdout or "[]") if r.get("outcome") == "ok"]
    except (ValueError, TypeError, KeyError):
        freed = []
    out.say(f"rhaas free {nodeset}: {len(freed)}/{n} returned to the lab (exit {proc.returncode})")
    out.say("the root now kexecs them back into its standby image, in the background "
            "(its 'rhaas events' show each as a kexec by actor 'standby')")
    return figures


def summary(out: Out, figures: dict, fd: float) -> None:
    print("\n== Comparison", flush=True)
    k_full, k_exec, pxe = figures["kexec_full_s"], figures["kexec_exec_s"], figures["powercycle_s"]
    rows = [("re-provision by kexec (pre-loaded, --exec)", k_exec, ""),
            ("re-provision by kexec (image on its cache disk)", k_full,
             f"   (transfer {figures.get('repeat_transfer', '-')})"),
            ("re-provision by PXE power cycle", pxe, f"   (firmware delay {fd:g} s)")]
    for label, secs, note in rows:
        out.say(f"{label:48} {secs:6.1f} s{note}")
    out.say(f"power cycle / kexec: {pxe / k_exec:.1f}x (pre-loaded), {pxe / k_full:.1f}x (full, cached image)")
    out.say(f"first deploy to all nodes: the origin sent {figures.get('origin_bytes', 0) / 1e6:.1f} MB")
    out.say("(a real server's POST takes minutes, not seconds: the gap grows with it)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    n = max(1, int(os.environ.get("RHAAS_DEMO_NODES") or 4))
    fd = float(os.environ.get("RHAAS_DEMO_FIRMWARE_DELAY") or 30)
    d = Path(os.environ.get("RHAAS_DEMO_DIR") or ".demo").expanduser().resolve()
    out = Out(7)
    print(f"rhaas demo: {n} VMs, firmware delay {fd:g} s, in {d}", flush=True)
    # a SIGTERM (e.g. from a CI timeout) takes the same way out as Ctrl-C
    signal.signal(signal.SIGTERM, _interrupt)
    rc = 0
    figures: dict = {}
    try:
        from .lab import check_host_tools

        check_host_tools()
        if (d / "lab.json").exists():
            stopped = down(d)
            if stopped:
                out.note(f"stopped {len(stopped)} leftover process(es) of an earlier demo")
        if d.exists():
            shutil.rmtree(d)
        figures = run_demo(out, d, n, fd)
    except MissingToolError as e:
        print(f"rhaas demo: cannot run: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nrhaas demo: interrupted", file=sys.stderr)
        rc = 130
    except (LabError, CommandFailed, TimeoutError, OSError) as e:
        print(f"\nrhaas demo: failed: {e}", file=sys.stderr)
        rc = 1
    except Exception as e:  # noqa: BLE001 - one line for a human, never a traceback
        print(f"\nrhaas demo: failed: {type(e).__name__}: {e}", file=sys.stderr)
        rc = 1
    finally:
        if (d / "lab.json").exists():
            out.step("Lab down")
            try:
                stopped = down(d)
                out.say(f"stopped {len(stopped)} process(es) by PID (serve, BMCs, VMs)")
            except BaseException as e:  # noqa: BLE001
                print(f"rhaas demo: lab down failed: {e}", file=sys.stderr)
                rc = rc or 1
    if rc == 0 and figures:
        summary(out, figures, fd)
    if rc == 0 and not os.environ.get("RHAAS_DEMO_KEEP"):
        shutil.rmtree(d, ignore_errors=True)
    elif d.exists():
        print(f"rhaas demo: files kept in {d}", file=sys.stderr)
    print(f"\nrhaas demo: {'done' if rc == 0 else 'FAILED'} in {time.monotonic() - out.t0:.0f}s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
