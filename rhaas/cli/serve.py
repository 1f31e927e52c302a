"""`rhaas serve`, `rhaas user`, `rhaas project`: this instance as an upstream for others."""

from __future__ import annotations

import signal
import sys

import click

from rhaas.cli.common import App, emit_json, json_option, pass_app


@click.command()
@click.option("--listen", default="127.0.0.1:7780", show_default=True, metavar="HOST:PORT",
              help="Address to serve on (loopback unless told otherwise; port 0 picks one).")
@click.option("-v", "--verbose", is_flag=True, help="Log each request on stderr.")
@pass_app
def serve(app: App, listen, verbose):
    """Serve this inventory as a HIL v0 REST API for a derived rhaas (or HIL's tools).

    Users authenticate with HTTP Basic (see 'rhaas user add'); a project member sees and
    touches only its own project's nodes and the free ones.

    \b
    Example:
      rhaas user add admin --admin --password-stdin <<< "$ADMIN_PW"
      rhaas serve --listen 127.0.0.1:7780
    """
    from rhaas.core.serving import parse_listen, start_server

    address = parse_listen(listen)
    server = start_server(app.store, app.settings, address, verbose=verbose,
                          warn=lambda line: click.echo(f"rhaas serve: {line}", err=True))
    bound = server.server_address
    click.echo(f"rhaas serve: listening on http://{bound[0]}:{bound[1]}", err=False)
    sys.stdout.flush()
    if not app.snapshot().all("users"):
        click.echo("rhaas serve: no users yet; add one with 'rhaas user add NAME --admin'", err=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


@click.group()
def user():
    """Manage users of 'rhaas serve' (HTTP Basic; passwords kept as salted hashes)."""


@user.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="An administrator of this instance.")
@click.option("--project", "projects", multiple=True, metavar="P", help="Member of project P (repeatable).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (for scripts).")
@click.option("--ssh-key", "ssh_key", type=click.Path(exists=True, dir_okay=False),
              help="The user's SSH public key, injected into nodes assigned to their projects.")
@pass_app
def user_add(app: App, name, admin, projects, password_stdin, ssh_key):
    """Add a user; the password comes from a prompt or stdin, never from argv.

    \b
    Examples:
      rhaas user add alice --project p1 --ssh-key ~/.ssh/id_ed25519.pub
      printf '%s\\n' "$PW" | rhaas user add bot --project p1 --password-stdin
    """
    from rhaas.core.accounts import add_user

    def password():
        if password_stdin:
            return sys.stdin.readline().rstrip("\r\n")
        return click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)

    add_user(app.store, name, password, admin=admin, projects=projects, ssh_key=ssh_key)
    click.echo(f"added user {name}", err=True)


@user.command("rm")
@click.argument("name")
@pass_app
def user_rm(app: App, name):
    """Remove a user."""
    from rhaas.core.accounts import remove_user

    remove_user(app.store, name)


@user.command("list")
@json_option
@pass_app
def user_list(app: App, as_json):
    """List users, their admin flag and projects."""
    from rhaas.core.accounts import list_users

    users = list_users(app.store)
    if as_json:
        emit_json(users)
        return
    from rhaas.cli.output import table

    table(["user", "admin", "projects"], [[u, d["is_admin"], ",".join(d["projects"])] for u, d in users.items()])


@click.group()
def project():
    """Manage the projects 'rhaas serve' offers to downstream users."""


@project.command("add")
@click.argument("name")
@click.option("--lease-for", metavar="DURATION",
              help="Nodes the project takes come back by themselves after DURATION (5s, 10m, 2h).")
@pass_app
def project_add(app: App, name, lease_for):
    """Add a project.

    \b
    Examples:
      rhaas project add p1 && rhaas user add alice --project p1
      rhaas project add batch --lease-for 1h
    """
    from rhaas.core.accounts import add_project
    from rhaas.core.batch_lease import parse_duration

    seconds = parse_duration(lease_for) if lease_for else None
    add_project(app.store, name)
    if seconds:
        from rhaas.core.lease_reaper import set_lease_for

        set_lease_for(app.store, name, seconds)


@project.command("rm")
@click.argument("name")
@pass_app
def project_rm(app: App, name):
    """Remove an empty project."""
    from rhaas.core.accounts import remove_project

    remove_project(app.store, name)


@project.command("list")
@json_option
@pass_app
def project_list(app: App, as_json):
    """List projects."""
    from rhaas.core.accounts import list_projects

    names = list_projects(app.store)
    if as_json:
        emit_json(names)
    else:
        click.echo("\n".join(names)) if names else None
