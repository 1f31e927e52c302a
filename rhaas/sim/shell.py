"""The simulated node's shell: runs a parsed command string (:mod:`rhaas.sim.syntax`) on one node.

rhaas's named scripts (``sh -c SCRIPT rhaas-NAME ARGS``) run in the host's ``/bin/sh``
(:mod:`rhaas.sim.pull`). Otherwise it knows only the commands rhaas sends: ``cat``, ``test``, ``mkdir``, ``mv``, ``rm``, ``echo``,
``sha256sum``, ``grep -qx``, ``sleep``, ``true``, ``sh -c``, ``setsid``, ``nohup``, ``hostname``
and ``kexec -l/-e/-u`` (handed to :meth:`rhaas.sim.node.SimNode.kexec`); anything else exits
127.  File paths stay inside the node's root (:meth:`rhaas.sim.node.SimNode.real_path`).
Background jobs (``&``) run as tasks of the farm.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from rhaas.sim.syntax import ShellError, Simple, parse

if TYPE_CHECKING:
    from rhaas.sim.farm import Farm
    from rhaas.sim.node import SimNode


class NodeGone(Exception):
    """The node jumped into a new kernel: whatever ran there is gone without an exit status."""


class _Sink:
    def write(self, data: bytes) -> None:
        pass


class Channel:
    """A channel stream that drops output once the session is gone."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except Exception:  # noqa: BLE001, S110 - the session closed under a background job
            pass


class Shell:
    """Runs one command string for one node; file paths are confined to the node's root."""

    def __init__(self, farm: Farm, node: SimNode, stdout, stderr):
        self.farm = farm
        self.node = node
        self.io = {1: stdout, 2: stderr}
        self.holders: list[asyncio.Task] = []  # background jobs still writing to the channel

    async def run(self, text: str, io: dict | None = None) -> int:
        io = io or self.io
        try:
            jobs = parse(text)
        except ShellError as exc:
            io[2].write(f"{exc}\n".encode())
            return exc.status
        status = 0
        for andor, background in jobs:
            if background:
                task = asyncio.get_running_loop().create_task(self._guard(self._andor(andor, dict(io))))
                self.farm.tasks.add(task)
                task.add_done_callback(self.farm.tasks.discard)
                if self._holds_channel(andor, io):
                    self.holders.append(task)
                status = 0
            else:
                status = await self._andor(andor, io)
        return status

    async def _guard(self, coro) -> None:
        try:
            await coro
        except NodeGone:
            pass
        except ShellExit:
            pass

    def _holds_channel(self, andor, io) -> bool:
        for _, cmd in andor:
            fds = dict(io)
            try:
                self._apply_redirs(cmd, fds, dry=True)
            except ShellError:
                continue
            if fds[1] in self.io.values() or fds[2] in self.io.values():
                return True
        return False

    async def _andor(self, andor, io) -> int:
        status = 0
        for connector, cmd in andor:
            if connector == "&&" and status != 0:
                continue
            if connector == "||" and status == 0:
                continue
            status = await self._simple(cmd, io)
        return status

    def _apply_redirs(self, cmd: Simple, fds: dict, dry: bool = False) -> list:
        opened = []
        for fd, op, target in cmd.redirs:
            if op == ">&":
                if not target.isdigit() or int(target) not in fds:
                    raise ShellError(f"sh: {target}: bad file descriptor")
                fds[fd] = fds[int(target)]
            elif op == "<":
                if target != "/dev/null":
                    raise ShellError("sh: input redirection is only supported from /dev/null")
            elif op in (">", ">>"):
                if target == "/dev/null" or dry:
                    fds[fd] = _Sink()
                else:
                    # closed by _simple() once the command is done
                    fh = open(self.node.real_path(target, for_write=True), "ab" if op == ">>" else "wb")  # noqa: SIM115
                    opened.append(fh)
                    fds[fd] = fh
            else:
                raise ShellError(f"sh: unsupported redirection {op}")
        return opened

    async def _simple(self, cmd: Simple, io: dict) -> int:
        fds = dict(io)
        try:
            opened = self._apply_redirs(cmd, fds)
        except (ShellError, OSError) as exc:
            io[2].write(f"{_msg(exc)}\n".encode())
            return 1
        try:
            return await self.exec(cmd.argv, fds)
        finally:
            for fh in opened:
                fh.close()

    async def exec(self, argv: list[str], fds: dict) -> int:
        name = argv[0]
        fn = getattr(self, "cmd_" + name, None) if name.isidentifier() else None
        if name == ":":
            fn = self.cmd_true
        if fn is None:
            fds[2].write(f"sh: {name}: not found\n".encode())
            return 127
        try:
            return await fn(argv[1:], fds)
        except ShellError as exc:
            fds[2].write(f"{exc}\n".encode())
            return exc.status
        except OSError as exc:
            fds[2].write(f"{name}: {_msg(exc)}\n".encode())
            return 1

    # -- commands ----------------------------------------------------------------------------------
    async def cmd_true(self, args, fds) -> int:
        return 0

    async def cmd_false(self, args, fds) -> int:
        return 1

    async def cmd_exit(self, args, fds) -> int:
        raise ShellExit(int(args[0]) if args and args[0].isdigit() else 0)

    async def cmd_echo(self, args, fds) -> int:
        newline = True
        if args and args[0] == "-n":
            newline, args = False, args[1:]
        fds[1].write((" ".join(args) + ("\n" if newline else "")).encode())
        return 0

    async def cmd_hostname(self, args, fds) -> int:
        fds[1].write(f"{self.node.name}\n".encode())
        return 0

    async def cmd_cat(self, args, fds) -> int:
        if hasattr(fds[1], "fileno") and all(self.node.virtual(p) is None for p in args):
            # file to file (a node's initrd built from an image's): tens of MB, copied off the
            # event loop, as a real node would on its own CPU, so other nodes' sessions go on
            status, err = await asyncio.to_thread(self._cat_files, args, fds[1])
            if err:
                fds[2].write(err)  # on the loop: a channel is not for other threads
            return status
        status = 0
        for path in args:
            data = self.node.virtual(path)
            if data is not None:
                fds[1].write(data)
                continue
            try:
                with open(self.node.real_path(path), "rb") as fh:  # noqa: ASYNC230 - small local files
                    while chunk := fh.read(1 << 20):
                        fds[1].write(chunk)
            except (OSError, ShellError) as exc:
                fds[2].write(f"cat: {path}: {_msg(exc)}\n".encode())
                status = 1
        return status

    def _cat_files(self, args, out) -> tuple[int, bytes]:
        status, err = 0, b""
        for path in args:
            try:
                with open(self.node.real_path(path), "rb") as fh:
                    out.flush()
                    # in the kernel (sendfile between files): a real node's cat costs its own
                    # CPU, not the farm's, so the farm should not copy through Python buffers
                    while os.sendfile(out.fileno(), fh.fileno(), None, 1 << 24):
                        pass
            except (OSError, ShellError) as exc:
                err += f"cat: {path}: {_msg(exc)}\n".encode()
                status = 1
        return status, err

    async def cmd_test(self, args, fds) -> int:
        negate = False
        if args and args[0] == "!":
            negate, args = True, args[1:]
        if len(args) == 2 and args[0] in ("-f", "-d", "-e", "-s"):
            ok = self._test_file(args[0], args[1])
        elif len(args) == 2 and args[0] in ("-n", "-z"):
            ok = bool(args[1]) == (args[0] == "-n")
        elif len(args) == 3 and args[1] in ("=", "!="):
            ok = (args[0] == args[2]) == (args[1] == "=")
        else:
            raise ShellError(f"test: unsupported expression: {' '.join(args)}")
        return 0 if ok != negate else 1

    def _test_file(self, op: str, path: str) -> bool:
        if self.node.virtual(path) is not None:
            return op in ("-f", "-e", "-s")
        try:
            p = self.node.real_path(path)
        except ShellError:
            return False
        if op == "-f":
            return p.is_file()
        if op == "-d":
            return p.is_dir()
        if op == "-s":
            return p.is_file() and p.stat().st_size > 0
        return p.exists()

    async def cmd_mkdir(self, args, fds) -> int:
        parents = "-p" in args
        for path in [a for a in args if not a.startswith("-")]:
            p = self.node.real_path(path, for_write=True)
            p.mkdir(parents=parents, exist_ok=parents)
        return 0

    async def cmd_mv(self, args, fds) -> int:
        paths = [a for a in args if a not in ("-f",)]
        if len(paths) != 2:
            raise ShellError("mv: usage: mv [-f] SOURCE DEST")
        os.replace(self.node.real_path(paths[0]), self.node.real_path(paths[1], for_write=True))
        return 0

    async def cmd_rm(self, args, fds) -> int:
        force = "-f" in args
        status = 0
        for path in [a for a in args if not a.startswith("-")]:
            try:
                self.node.real_path(path).unlink()
            except (OSError, ShellError) as exc:
                if not force:
                    fds[2].write(f"rm: {path}: {_msg(exc)}\n".encode())
                    status = 1
        return status

    async def cmd_sha256sum(self, args, fds) -> int:
        import hashlib

        status = 0
        for path in args:
            try:
                h = hashlib.sha256()
                with open(self.node.real_path(path), "rb") as fh:  # noqa: ASYNC230 - small local files
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
                fds[1].write(f"{h.hexdigest()}  {path}\n".encode())
            except (OSError, ShellError) as exc:
                fds[2].write(f"sha256sum: {path}: {_msg(exc)}\n".encode())
                status = 1
        return status

    async def cmd_grep(self, args, fds) -> int:
        flags = {a for a in args if a.startswith("-")}
        rest = [a for a in args if not a.startswith("-")]
        if not flags <= {"-q", "-x", "-F", "-qx", "-xq"} or len(rest) != 2:
            raise ShellError("grep: only 'grep -q[x] PATTERN FILE' is supported")
        pattern, path = rest
        data = self.node.virtual(path)
        if data is None:
            with open(self.node.real_path(path), "rb") as fh:  # noqa: ASYNC230 - small local files
                data = fh.read()
        whole = any("x" in f for f in flags)
        lines = data.decode("utf-8", "replace").splitlines()
        found = [ln for ln in lines if (ln == pattern if whole else pattern in ln)]
        if found and not any("q" in f for f in flags):
            fds[1].write(("\n".join(found) + "\n").encode())
        return 0 if found else 1

    async def cmd_sync(self, args, fds) -> int:
        return 0  # the farm's files are the host's: nothing a simulated power cut could lose

    async def cmd_sleep(self, args, fds) -> int:
        try:
            await asyncio.sleep(float(args[0]))
        except (IndexError, ValueError):
            raise ShellError("sleep: invalid time interval") from None
        return 0

    async def cmd_sh(self, args, fds) -> int:
        from rhaas.sim import pull

        if pull.wants_real_shell(args):  # rhaas's own node scripts: the host's /bin/sh (sim/pull.py)
            return await pull.run_script(self.node, args, fds)
        if len(args) >= 2 and args[0] == "-c":
            try:
                return await self.run(args[1], fds)
            except ShellExit as exc:
                return exc.status
        raise ShellError("sh: only 'sh -c COMMAND' is supported", 127)

    async def cmd_setsid(self, args, fds) -> int:
        if args and args[0] in ("-f", "--fork"):
            args = args[1:]
        if not args:
            raise ShellError("setsid: no command")
        return await self.exec(args, fds)

    async def cmd_nohup(self, args, fds) -> int:
        if not args:
            raise ShellError("nohup: no command")
        return await self.exec(args, fds)

    async def cmd_kexec(self, args, fds) -> int:
        return await self.node.kexec(args, fds)


class ShellExit(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _msg(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "No such file or directory"
    if isinstance(exc, IsADirectoryError):
        return "Is a directory"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)

