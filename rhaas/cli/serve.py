"""`rhaas serve`, `rhaas user`, `rhaas project`: this instance as an upstream for others."""

from __future__ import annotations

import signal
import sys

import click

from rhaas.cli.common import App, emit_json, json_option, pass_app
from rhaas.errors import UsageError
from rhaas.model import check_name


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise UsageError(f"invalid --listen {value!r}: expected HOST:PORT with a port from 0 to 65535")
    return host, int(port)


def _bind(host: str, port: int, listen: str):
    """One listening socket for HOST:PORT, or a one-line usage error (exit 2)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError, ValueError) as exc:
        raise UsageError(f"cannot listen on {listen}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except (OSError, OverflowError, ValueError) as exc:
        sock.close()
        raise UsageError(f"cannot listen on {listen}: {getattr(exc, 'strerror', None) or exc}") from None
    return sock


def _open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft if soft != resource.RLIM_INFINITY else want
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    except (OSError, ValueError):
        return soft


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
    from rhaas.adapters.hilserver import HILApp, HILServer
    from rhaas.core.service import Service
    from rhaas.core.throttle import LoginThrottle

    host, port = _listen(listen)
    view = app.snapshot()
    upstream = app.upstream if view.config().get("upstream") else None
    on_detach = on_assign = None
    if app.setting("standby-image"):
        from rhaas.core.standby import return_to_standby, standby_in_background

        def on_detach(node):
            standby_in_background(app.store, app.settings, node)

        def on_assign(node, keys):
            # the tenant's keys ride in the standby image's overlay: when the lease answers,
            # the node already lets the tenant (and only them, with us) in
            return_to_standby(app.store, app.settings, [node])

    service = Service(app.store, app.settings, upstream=upstream, on_detach=on_detach, on_assign=on_assign)
    # every connection is one descriptor: keep room for the store, BMC and upstream sockets
    files = _open_files_limit()
    limit = min(app.setting("serve-connection-limit"), max(16, files - 256))
    if limit < app.setting("serve-connection-limit"):
        click.echo(f"rhaas serve: at most {limit} connections (open-files limit {files})", err=True)
    throttle = LoginThrottle(app.setting("serve-login-failures"), app.setting("serve-login-window"))
    sock = _bind(host, port, listen)
    server = HILServer(
        sock,
        HILApp(app.store, service, throttle, verbose=verbose),
        threads=app.setting("serve-threads"),
        connection_limit=limit,
        idle_timeout=app.setting("serve-idle-timeout"),
        max_body=app.setting("serve-max-body"),
    )
    bound = server.server_address
    click.echo(f"rhaas serve: listening on http://{bound[0]}:{bound[1]}", err=False)
    sys.stdout.flush()
    if not view.all("users"):
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


def _local_admin(app: App):
    from rhaas.core.service import Caller, Service

    return Service(app.store, app.settings), Caller("local-admin", True, [])


def _api(fn, *args, **kwargs):
    """Run a service call as the local operator; HIL errors become one-line CLI errors."""
    from rhaas.errors import APIError

    try:
        return fn(*args, **kwargs)
    except APIError as exc:
        raise UsageError(exc.msg) from None


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
    check_name(name, "user name")
    view = app.snapshot()
    for p in projects:
        if view.get("projects", p) is None:
            raise UsageError(f"unknown project {p!r}; add it with 'rhaas project add {p}'")
    key_line = None
    if ssh_key:
        with open(ssh_key, encoding="utf-8") as fh:
            key_line = fh.read().strip()
        if not key_line.startswith(("ssh-", "ecdsa-")) or "\n" in key_line:
            raise UsageError(f"{ssh_key} does not hold one OpenSSH public key line")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    if not password:
        raise UsageError("empty password")
    service, caller = _local_admin(app)
    _api(service.user_create, caller, name, password, admin)
    for p in projects:
        _api(service.user_add_project, caller, name, p)
    if key_line:
        with app.store.transaction() as tx:
            doc = tx.get("users", name)
            tx.put("users", dict(doc, ssh_keys=[key_line]))
    click.echo(f"added user {name}", err=True)


@user.command("rm")
@click.argument("name")
@pass_app
def user_rm(app: App, name):
    """Remove a user."""
    service, caller = _local_admin(app)
    _api(service.user_delete, caller, name)


@user.command("list")
@json_option
@pass_app
def user_list(app: App, as_json):
    """List users, their admin flag and projects."""
    service, caller = _local_admin(app)
    users = service.list_users(caller, app.snapshot())
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
@pass_app
def project_add(app: App, name):
    """Add a project.

    \b
    Example:
      rhaas project add p1 && rhaas user add alice --project p1
    """
    check_name(name, "project name")
    service, caller = _local_admin(app)
    _api(service.project_create, caller, name)


@project.command("rm")
@click.argument("name")
@pass_app
def project_rm(app: App, name):
    """Remove an empty project."""
    service, caller = _local_admin(app)
    _api(service.project_delete, caller, name)


@project.command("list")
@json_option
@pass_app
def project_list(app: App, as_json):
    """List projects."""
    names = [p["name"] for p in app.snapshot().all("projects")]
    if as_json:
        emit_json(names)
    else:
        click.echo("\n".join(names)) if names else None
