"""`rhaas completion bash|zsh|fish`: print the shell completion script Click generates.

Click's bash script inserts each offered value unquoted (``COMPREPLY+=($value)``), so a value
like ``$(touch F)`` would land on the command line as shell code. Offered names are already
only valid ones (rhaas.cli.complete); the bash script here escapes each value with
``printf -v VAR %q`` as well (no fork per value), and reads it with ``read -r``. zsh's
``compadd`` (without -Q) and fish quote what they insert themselves.
"""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")


def completion_script(shell: str) -> str:
    from click.shell_completion import BashComplete, get_completion_class

    from rhaas.cli import cli

    cls = get_completion_class(shell)
    if shell == "bash":

        class QuotedBashComplete(BashComplete):
            source_template = BashComplete.source_template.replace(
                "IFS=',' read type value", "IFS=',' read -r type value"
            ).replace(
                "COMPREPLY+=($value)", "local quoted\n            printf -v quoted '%%q' \"$value\"\n"
                "            COMPREPLY+=(\"$quoted\")"
            )

        if "printf -v quoted" not in QuotedBashComplete.source_template:
            raise RuntimeError("Click's bash completion template changed; update rhaas.cli.completion")
        cls = QuotedBashComplete
    return cls(cli, {}, "rhaas", "_RHAAS_COMPLETE").source()


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell):
    """Print the completion script for SHELL.

    \b
    Examples:
      rhaas completion bash > ~/.local/share/bash-completion/completions/rhaas
      rhaas completion zsh > "${fpath[1]}/_rhaas"
      rhaas completion fish > ~/.config/fish/completions/rhaas.fish
    """
    click.echo(completion_script(shell), nl=False)
