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

    A derived instance passes node calls on to its upstream. Assignment is bookkeeping: the
    tenant's keys are recorded and ride in the node's next kexec. With a standby image set,
    detached (and reclaimed) nodes go back to it in the background. The lease reaper
    (rhaas.core.lease_reaper) runs beside the server until it is closed. ``warn(line)`` hears
    about limits lowered to fit this process.
    UsageError when the address cannot be bound.
    """
    from rhaas.adapters.hilserver import HILApp, HILServer
    from rhaas.core.instance import is_derived, upstream_client
    from rhaas.core.lease_reaper import Reaper
    from rhaas.core.service import Service
    from rhaas.core.throttle import LoginThrottle

    upstream = upstream_client(store) if is_derived(store.snapshot()) else None
    on_detach = None
    if settings.get("standby-image"):
        from rhaas.core.standby import standby_in_background

        def on_detach(node):
            # in the background: the node is held out of the free list until it is back
            standby_in_background(store, settings, node)

    service = Service(store, settings, upstream=upstream, on_detach=on_detach)
    # every connection is one descriptor: keep room for the store, BMC and upstream sockets
    files = open_files_limit()
    limit = min(settings["serve-connection-limit"], max(16, files - 256))
    if limit < settings["serve-connection-limit"] and warn:
        warn(f"at most {limit} connections (open-files limit {files})")
    throttle = LoginThrottle(settings["serve-login-failures"], settings["serve-login-window"])
    sock = _bind(address)
    server = HILServer(
        sock,
        HILApp(store, service, throttle, verbose=verbose),
        threads=settings["serve-threads"],
        connection_limit=limit,
        idle_timeout=settings["serve-idle-timeout"],
        max_body=settings["serve-max-body"],
    )
    reaper = Reaper(service).start()
    close_server = server.close

    def close() -> None:  # the reaper lives as long as the server
        reaper.stop()
        close_server()

    server.close = close
    server.reaper = reaper
    return server


__all__ = ["open_files_limit", "parse_listen", "start_server"]
