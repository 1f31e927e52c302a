"""`rhaas lab up|status|down`: a local virtual datacenter (QEMU VMs behind ipmi_sim BMCs, a root
rhaas that owns them, and its `rhaas serve`), all on loopback.

Only click is imported here; the lab itself (:mod:`rhaas.lab.stack`) is imported when a
command runs.  The lab and its simulated node farm are the optional ``rhaas[lab]`` extra:
without asyncssh every ``rhaas lab`` command stops with a one-line error (exit 2) naming it.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import click

from rhaas.cli.common import CommandError

DIR_HELP = "Lab directory (default: $RHAAS_LAB_DIR or ./.lab)."


class LabCommandError(CommandError):
    prefix = "rhaas lab"


def _say(msg: str) -> None:
    click.echo(f"rhaas lab: {msg}", err=True)


def _require_extra() -> None:
    """Stop with a one-line usage error (exit 2) unless the ``rhaas[lab]`` extra is installed."""
    try:
        found = importlib.util.find_spec("asyncssh") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise LabCommandError("the lab needs the optional extra: pip install 'rhaas[lab]'", exit_code=2)


def _dir(value):
    from rhaas.lab.stack import default_dir

    return value or default_dir()


@click.group()
def lab():
    """A local virtual datacenter for demos and tests.

    `lab up` starts N QEMU VMs (kexec-capable Debian guests) behind one ipmi_sim BMC each,
    then a root rhaas instance in DIR/root that owns them, served by `rhaas serve` on a
    loopback port; it prints how to point a derived rhaas at it. Nothing listens beyond
    127.0.0.0/8. `lab down` stops exactly the processes recorded in DIR/lab.json.

    \b
    Examples:
      rhaas lab up --nodes 2 --firmware-delay 30
      rhaas lab status
      rhaas lab up --sim 8 --dir /tmp/simlab     # SIMULATED nodes, no QEMU needed
      rhaas lab down
    """
    _require_extra()


@lab.command("up")
@click.option("--nodes", type=click.IntRange(1, 16), default=2, show_default=True, help="Number of VMs.")
@click.option("--firmware-delay", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="Modelled firmware (POST) time paid by every power-on and reset, never by kexec.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None, help=DIR_HELP)
@click.option("--sim", type=click.IntRange(min=1), default=None, metavar="N",
              help="N SIMULATED nodes (asyncssh farm, state-only BMCs) instead of VMs.")
@click.option("--memory", type=click.IntRange(128, 4096), default=256, show_default=True, metavar="MIB",
              help="Memory per VM.")
@click.option("--json", "as_json", is_flag=True, help="Print lab.json on stdout instead of the summary.")
def up(nodes, firmware_delay, directory, sim, memory, as_json):
    """Bring up the lab: nodes, BMCs, a root rhaas and its serve.

    Needs the Debian packages qemu-system-x86 and openipmi (and cpio, kmod, apt to build
    the guest from Debian packages); with --sim N only python is needed.
    """
    from rhaas.lab import stack
    from rhaas.lab.vm import LabError, MissingToolError

    if sim and firmware_delay:
        _say("--firmware-delay is ignored for SIMULATED nodes")
    what = f"{sim} SIMULATED node(s)" if sim else f"{nodes} VM(s), firmware delay {firmware_delay:g} s"
    _say(f"bringing up {what} in {_dir(directory)}")
    log = (lambda msg: _say(f"[SIMULATED] {msg}")) if sim else _say
    try:
        st = stack.up(_dir(directory), nodes, firmware_delay, sim=sim, memory_mb=memory, log=log)
    except MissingToolError as exc:
        raise LabCommandError(f"{exc}\n  (or run 'rhaas lab up --sim N' for SIMULATED nodes without QEMU)") from None
    except LabError as exc:
        raise LabCommandError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(st.info, indent=2, sort_keys=True))
        return
    click.echo("\n".join(stack.describe(st)))


@lab.command("status")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None, help=DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def status(directory, as_json):
    """Show what the lab recorded and what is running."""
    from rhaas.lab import stack
    from rhaas.lab.vm import LabError

    try:
        st = stack.status(_dir(directory))
    except LabError as exc:
        raise LabCommandError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    sim = st["simulated"]
    tag = " [SIMULATED]" if sim else ""
    serve = st["serve"]
    click.echo(f"lab {st['dir']}: {st['state']}{tag}")
    if st.get("url"):
        click.echo(f"  serve      {st['url']}  pid {serve['pid']} {'running' if serve['running'] else 'NOT running'}")
    if st.get("root_home"):
        click.echo(f"  root home  {st['root_home']}")
    if sim and "farm" in st:
        farm = st["farm"]
        click.echo(f"  farm       pid {farm['pid']} {'running' if farm['running'] else 'NOT running'}  [SIMULATED]")
    else:
        click.echo(f"  firmware   {st['firmware_delay']:g} s")
    click.echo(f"  {'node':10} {'power':6} {'ssh':28} {'bmc':26} detail")
    for n in st["nodes"]:
        power = "on" if n.get("power") else "off"
        if sim:
            detail = f"ssh {'up' if n.get('ssh_up') else 'down'}, ipmi_sim pid {n.get('ipmi_sim_pid')}  [SIMULATED]"
        else:
            detail = (f"qemu pid {n.get('qemu_pid')}, ipmi_sim pid {n.get('ipmi_sim_pid')}, "
                      f"bootdev {n.get('boot_device')}, image {n.get('reported_image')}, "
                      f"ssh {'answers' if n.get('ssh_banner') else 'silent'}")
        click.echo(f"  {n['name']:10} {power:6} {n.get('ssh') or '':28} {n.get('bmc') or '(none)':26} {detail}")


@lab.command("down")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None, help=DIR_HELP)
def down(directory):
    """Stop exactly the processes recorded in lab.json (serve, BMCs, VMs); remove nothing."""
    from rhaas.lab import stack
    from rhaas.lab.vm import LabError

    try:
        simulated = bool(stack.read_info(_dir(directory)).get("simulated"))
        stopped = stack.down(_dir(directory))
    except LabError as exc:
        raise LabCommandError(str(exc)) from None
    tag = "[SIMULATED] " if simulated else ""
    if stopped:
        _say(f"{tag}stopped {len(stopped)} process(es): {' '.join(map(str, sorted(stopped)))}")
    else:
        _say(f"{tag}nothing was running")
    sys.stdout.flush()
