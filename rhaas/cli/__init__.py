"""The `rhaas` command line: a thin face over rhaas.core.

Command modules are imported only when their command runs (Click's lazy group pattern), so
`rhaas --help` and tab completion stay fast and never import Fabric or python-ipmi.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from rhaas import __version__
from rhaas.errors import RhaasError

# command name -> (module, attribute, one-line help shown by `rhaas --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "init": ("rhaas.cli.setup", "init", "Create this instance: a root, or derived from an upstream."),
    "config": ("rhaas.cli.setup", "config", "Get and set settings."),
    "node": ("rhaas.cli.node", "node", "Register, change and trust nodes."),
    "lease": ("rhaas.cli.inventory", "lease", "Lease nodes from the upstream."),
    "free": ("rhaas.cli.inventory", "free", "Return leased nodes to the upstream."),
    "reconcile": ("rhaas.cli.inventory", "reconcile", "Repair drift between inventory and upstream."),
    "list": ("rhaas.cli.inventory", "list_nodes", "List nodes in the inventory."),
    "show": ("rhaas.cli.inventory", "show", "Show one node."),
    "events": ("rhaas.cli.inventory", "events", "Show the event log."),
    "network": ("rhaas.cli.network", "network", "Create, list and attach networks."),
    "power": ("rhaas.cli.power", "power", "Power nodes on, off, cycle them or read status."),
    "console": ("rhaas.cli.console", "console", "Show a node's serial console."),
    "bootdev": ("rhaas.cli.power", "bootdev", "Set nodes' boot device."),
    "image": ("rhaas.cli.images", "image", "Manage kernel+initrd images."),
    "kexec": ("rhaas.cli.provision", "kexec", "Jump nodes into a new kernel over SSH."),
    "serve": ("rhaas.cli.serve", "serve", "Serve this inventory as a HIL v0 API."),
    "user": ("rhaas.cli.serve", "user", "Manage users of `rhaas serve`."),
    "project": ("rhaas.cli.serve", "project", "Manage projects of `rhaas serve`."),
    "lab": ("rhaas.cli.lab", "lab", "A local virtual datacenter for demos and tests."),
    "completion": ("rhaas.cli.completion", "completion", "Print a shell completion script."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        spec = COMMANDS.get(name)
        if spec is None:
            return None
        module = importlib.import_module(spec[0])
        return getattr(module, spec[1])

    def format_commands(self, ctx, formatter):
        # use the short help from the table so --help imports no command module
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rhaas")
def cli():
    """rhaas: a recursive HaaS with fast kexec provisioning.

    Lease bare-metal nodes from an upstream HaaS (HIL, or another rhaas), serve them to
    the next level with the same HIL v0 API, and re-provision them in seconds by kexec.

    \b
    Exit codes: 0 all ok, 1 some nodes failed, 2 usage error,
                3 upstream unreachable, 4 inventory damaged or unusable,
                130 interrupted.
    State lives in RHAAS_HOME (default ~/.local/share/rhaas).
    """


def main() -> None:
    try:
        rv = cli.main(prog_name="rhaas", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("rhaas: aborted", err=True)
        sys.exit(130)
    except RhaasError as exc:
        click.echo(f"rhaas: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("rhaas: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        # the reader of a pipeline went away (e.g. `| head`); that is not an error
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # stays open until exit
        except OSError:
            pass
        sys.exit(0)
    except Exception as exc:  # a bug: one line, the traceback only on request
        if os.environ.get("RHAAS_DEBUG"):
            raise
        click.echo(f"rhaas: internal error: {type(exc).__name__}: {exc} (set RHAAS_DEBUG=1 for a traceback)", err=True)
        sys.exit(70)
    sys.exit(rv if isinstance(rv, int) else 0)
