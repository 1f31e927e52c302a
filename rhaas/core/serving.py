"""Starting `rhaas serve`: the service (with its standby hooks) bound to a listening HIL server.

The caller runs the returned server's loop; nothing here blocks.
"""

from __future__ import annotations

from rhaas.errors import UsageError


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) -> (host, port); UsageError otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise UsageError(f"invalid --listen {value!r}: expected HOST:PORT with a port from 0 to 65535")
    return host, int(port)


def _shown(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(address: tuple[str, int]):
    """One listening socket for HOST:PORT, or a one-line usage error (exit 2)."""
    import socket

    host, port = address
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError, ValueError) as exc:
        raise UsageError(f"cannot listen on {_shown(address)}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except (OSError, OverflowError, ValueError) as exc:
        sock.close()
        raise UsageError(f"cannot listen on {_shown(address)}: {getattr(exc, 'strerror', None) or exc}") from None
    return sock


def open_files_limit() -> int:
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


def start_server(store, settings: dict, address: tuple[str, int], verbose: bool = False, warn=None):
    """A HIL v0 server over ``store``, bound to ``address`` (see :func:`parse_listen`; port 0 picks one).

    A derived instance passes node calls on to its upstream. With a standby image set, detached
    nodes go back to it in the background, and a node assigned to a project is re-kexec'd into
    it with the tenant's keys. ``warn(line)`` hears about limits lowered to fit this process.
    UsageError when the address cannot be bound.
    """
    from rhaas.adapters.hilserver import HILApp, HILServer
    from rhaas.core.instance import is_derived, upstream_client
    from rhaas.core.service import Service
    from rhaas.core.throttle import LoginThrottle

    upstream = upstream_client(store) if is_derived(store.snapshot()) else None
    on_detach = on_assign = None
    if settings.get("standby-image"):
        from rhaas.core.standby import return_to_standby, standby_in_background

        def on_detach(node):
            standby_in_background(store, settings, node)

        def on_assign(node, keys):
            # the tenant's keys ride in the standby image's overlay: when the lease answers,
            # the node already lets the tenant (and only them, with us) in
            return_to_standby(store, settings, [node])

    service = Service(store, settings, upstream=upstream, on_detach=on_detach, on_assign=on_assign)
    # every connection is one descriptor: keep room for the store, BMC and upstream sockets
    files = open_files_limit()
    limit = min(settings["serve-connection-limit"], max(16, files - 256))
    if limit < settings["serve-connection-limit"] and warn:
        warn(f"at most {limit} connections (open-files limit {files})")
    throttle = LoginThrottle(settings["serve-login-failures"], settings["serve-login-window"])
    sock = _bind(address)
    return HILServer(
        sock,
        HILApp(store, service, throttle, verbose=verbose),
        threads=settings["serve-threads"],
        connection_limit=limit,
        idle_timeout=settings["serve-idle-timeout"],
        max_body=settings["serve-max-body"],
    )


__all__ = ["open_files_limit", "parse_listen", "start_server"]
