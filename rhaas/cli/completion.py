"""`rhaas completion bash|zsh|fish`: print the shell completion script Click generates."""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")


def completion_script(shell: str) -> str:
    from click.shell_completion import get_completion_class

    from rhaas.cli import cli

    cls = get_completion_class(shell)
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
