"""The SSH face of the farm, on asyncssh: one server per node, SFTP, and the ports.

Logins are as ``root`` with a key the farm authorizes (:meth:`rhaas.sim.farm.Farm.authorized`);
commands go to the farm's handler, SFTP is chrooted to the node's root and makes no links.
:func:`coalesce_writes` and :func:`skip_idle_work` trim what asyncssh spends per connection;
neither changes what a client sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncssh

if TYPE_CHECKING:
    from rhaas.sim.node import SimNode


class _NodeSFTP(asyncssh.SFTPServer):
    """SFTP chrooted to the node's root, without links: a symlink could point out of the
    root, and the shell's path checks rely on there being none."""

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPPermissionDenied("links are not supported by the simulated node")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPPermissionDenied("links are not supported by the simulated node")


class NodeServer(asyncssh.SSHServer):
    def __init__(self, node: SimNode):
        self.node = node
        self.conn = None

    def connection_made(self, conn) -> None:
        self.conn = conn
        if not self.node.up or self.node.farm.fault(self.node.name, "refuse_ssh"):
            asyncio.get_running_loop().call_soon(conn.abort)
            return
        self.node.conns.add(conn)

    def connection_lost(self, exc) -> None:
        self.node.conns.discard(self.conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self.node.dying and self.node.cut_way() == 3:  # dies_slowly: the login is cut short
            asyncio.get_running_loop().call_soon(self.conn.abort)
            return False
        return username == "root" and key.public_data in self.node.farm.authorized()



def server_options(node: SimNode, handle: Callable, algs: dict) -> asyncssh.SSHServerConnectionOptions:
    """The node's server options: its host key, key logins, commands to ``handle(node, process)``."""
    return asyncssh.SSHServerConnectionOptions(
        server_factory=lambda: NodeServer(node),
        server_host_keys=[node.key],
        process_factory=lambda proc: handle(node, proc),
        sftp_factory=lambda chan: _NodeSFTP(chan, chroot=str(node.root).encode()),
        encoding=None,
        allow_pty=False,
        allow_scp=False,
        agent_forwarding=False,
        x11_forwarding=False,
        keepalive_interval=0,
        login_timeout=30,
        **algs,
    )


async def listen(node: SimNode, port: int) -> None:
    """Open the node's port. ``asyncssh.listen`` would rebuild the node's options in an
    executor thread on every call (every simulated boot); they never change, so they are
    built once and each boot only opens a socket with asyncssh's connection class behind it."""
    loop = asyncio.get_running_loop()
    if node.listen_options is None:
        opts = await asyncssh.SSHServerConnectionOptions.construct(node.options, host=node.address, port=port)
        opts.proxy_command = None
        node.listen_options = opts
    opts = node.listen_options
    node.acceptor = await loop.create_server(
        lambda: asyncssh.connection.SSHServerConnection(loop, opts), node.address, port,
        reuse_address=True, backlog=100,
    )


def coalesce_writes() -> None:
    """Send each connection's SSH packets of one event-loop turn in one ``send()``.

    asyncssh writes every packet as it is made; on loopback each write is a separate TCP
    segment whose whole receive path the sender pays for. A handshake makes ~20 of them,
    about a sixth of the farm's CPU per connection. Buffering until the end of the loop
    turn keeps the byte order and only merges what was due at the same moment anyway.
    """
    cls = asyncssh.connection.SSHConnection
    if getattr(cls, "_rhaas_coalesced", False) or not hasattr(cls, "_send"):
        return

    def _send(self, data: bytes) -> None:
        if not self._transport:
            return
        pending = self.__dict__.get("_rhaas_out")
        if pending is None:
            self._rhaas_out = [data]
            self._loop.call_soon(_flush, self)
        else:
            pending.append(data)

    def _flush(self) -> None:
        data = self.__dict__.pop("_rhaas_out", None)
        if data and self._transport:
            try:
                self._transport.write(b"".join(data))
            except ConnectionError:
                pass

    cls._send = _send
    cls._rhaas_coalesced = True



def skip_idle_work() -> None:
    """Drop two costs asyncssh pays per connection that a simulated node does not need.

    * Its logger formats every argument of every debug/info call before the logging level
      is looked at; with logging off that is pure waste (about 7 % of the farm's CPU).
    * Each login re-builds the server options in an executor thread (``reload_config``) to
      evaluate ``Match`` blocks of an sshd-style config file. The farm has no such file, so
      the options built at start-up are the ones every login would get again (about 10 %).

    Both only change how much CPU the farm burns per handshake, not what any client sees.
    """
    from asyncssh.logging import SSHLogger

    if getattr(SSHLogger, "_rhaas_lazy", False):
        return
    plain_log = SSHLogger.log

    def log(self, level, msg, *args, **kwargs):
        if self.isEnabledFor(level):
            plain_log(self, level, msg, *args, **kwargs)

    SSHLogger.log = log
    SSHLogger._rhaas_lazy = True

    async def reload_config(self) -> None:
        return None

    asyncssh.connection.SSHServerConnection.reload_config = reload_config

