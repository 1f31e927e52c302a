"""`rhaas init` and `rhaas config`."""

from __future__ import annotations

import os

import click

from rhaas.cli.common import App, emit_json, json_option, pass_app
from rhaas.errors import UsageError


def read_secret(env: str, prompt: str) -> str:
    """A secret from the environment or a hidden prompt; never from argv."""
    value = os.environ.get(env)
    if value:
        return value
    if not click.get_text_stream("stdin").isatty():
        raise UsageError(f"no {prompt.lower()}: set {env} or run interactively")
    return click.prompt(prompt, hide_input=True)


@click.command()
@click.option("--upstream", metavar="URL", help="Upstream HaaS (HIL v0 API), e.g. http://127.0.0.1:7780.")
@click.option("--project", metavar="P", help="Upstream project to lease into.")
@click.option("--user", metavar="U", help="Upstream user (password: RHAAS_UPSTREAM_PASSWORD or a prompt).")
@pass_app
def init(app: App, upstream, project, user):
    """Create this instance's inventory in RHAAS_HOME.

    Without --upstream this is a root instance that owns hardware (register nodes with
    'rhaas node register'). With --upstream it is derived: it leases nodes from that HaaS.

    \b
    Examples:
      rhaas init
      RHAAS_UPSTREAM_PASSWORD=... rhaas init --upstream http://127.0.0.1:7780 --project p1 --user alice
    """
    from rhaas.core.instance import init_instance

    password = None
    if upstream:
        if not project or not user:
            raise UsageError("a derived instance needs --project and --user with --upstream")
        from rhaas.core.instance import check_upstream_url

        check_upstream_url(upstream)
        password = read_secret("RHAAS_UPSTREAM_PASSWORD", "Upstream password")
    mode = init_instance(app.store, upstream, project, user, password)
    click.echo(f"initialised a {mode} instance in {app.store.home}", err=True)


@click.group()
def config():
    """Get and set settings (precedence: option > RHAAS_* env > config > default).

    \b
    Examples:
      rhaas config list
      rhaas config set parallel 128
      rhaas config get standby-image
    """


@config.command("list")
@json_option
@pass_app
def config_list(app: App, as_json):
    """List every setting with its effective value and source."""
    from rhaas import settings

    stored = app.snapshot().config()
    rows = []
    for key in sorted(settings.SETTINGS):
        value, source = settings.resolve(stored, key)
        rows.append({"key": key, "value": value, "source": source, "env": settings.env_name(key)})
    if as_json:
        emit_json(rows)
        return
    from rhaas.cli.output import table

    table(["key", "value", "source", "env"], [[r["key"], r["value"], r["source"], r["env"]] for r in rows])


@config.command("get")
@click.argument("key")
@pass_app
def config_get(app: App, key):
    """Print one setting's effective value (empty line when unset)."""
    from rhaas import settings

    value, _ = settings.resolve(app.snapshot().config(), key) if key in settings.SETTINGS else settings.coerce(key, None)
    click.echo("" if value is None else value)


@config.command("set")
@click.argument("key")
@click.argument("value", required=False)
@click.option("--unset", is_flag=True, help="Remove the stored value.")
@pass_app
def config_set(app: App, key, value, unset):
    """Store a setting in the inventory (use --unset to remove it)."""
    from rhaas.core.instance import set_config

    set_config(app.store, key, value, unset=unset)
