"""Starting `rhaas serve`: the service (with its standby hooks) bound to a listening HIL server.

The caller runs the returned server's loop; nothing here blocks.
"""

from __future__ import annotations

from rhaas.errors import UsageError


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) -> (host, port); UsageError otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"invalid --listen {value!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def start_server(store, settings: dict, address: tuple[str, int], verbose: bool = False):
    """A HIL v0 server over ``store``, bound to ``address`` (see :func:`parse_listen`; port 0 picks one).

    A derived instance passes node calls on to its upstream. With a standby image set, detached nodes go back to it in the background, and a node
    assigned to a project is re-kexec'd into it with the tenant's keys. UsageError when the
    address cannot be bound.
    """
    from rhaas.adapters.hilserver import HILServer
    from rhaas.core.instance import is_derived, upstream_client
    from rhaas.core.service import Service

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
    try:
        return HILServer(address, store, service, verbose=verbose)
    except OSError as exc:
        host, port = address
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise UsageError(f"cannot listen on {shown}: {exc.strerror}") from None


__all__ = ["parse_listen", "start_server"]
