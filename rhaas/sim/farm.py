"""A farm of simulated nodes: one asyncssh process answering SSH for N nodes on loopback.

Run it as::

    python -m rhaas.sim.farm --nodes 1000 --dir DIR [--port 2222] [--down-time 0.5]

Node ``i`` (0-based) is ``sim-0001``... and listens on ``127.0.{1+i//250}.{1+i%250}:PORT``
(the base address is ``--base``). Each node has its own ed25519 host key, kept in
``DIR/hostkeys.json`` so a restarted farm keeps its identities, and ``DIR/farm.json`` lists
``name``, ``ssh`` (``root@ADDR:PORT``), ``host_key`` (one OpenSSH line) and ``root`` per
node. Logins are as ``root`` with a key listed in ``--authorized-keys`` (re-read when the
file changes). SFTP is chrooted to ``DIR/nodes/<name>/``, so ``/run/rhaas/...`` lands there.

No real shell ever runs. Commands are parsed by a small POSIX-like lexer and interpreter
(``;``, ``&&``, ``||``, ``&``, redirections, quoting) that knows only the commands rhaas
sends: ``cat``, ``test``, ``mkdir``, ``mv``, ``rm``, ``echo``, ``sha256sum``, ``grep -qx``,
``sleep``, ``true``, ``sh -c``, ``setsid``, ``kexec -l/-e/-u``. Expansions (``$``, backquotes,
globs) are refused with exit 127; unknown commands exit 127 too.

Per node, in memory: the boot id, ``/proc/cmdline``, what ``kexec -l`` loaded. ``kexec -e``
drops the node's connections without a clean close, keeps its port closed for
``--down-time`` seconds, then brings the node back with a new boot id and the loaded
command line. ``DIR/state/<name>.json`` mirrors that state for tests, written on request
(SIGUSR1; see :func:`read_state`) and when the farm stops.

Faults, per node, from ``DIR/faults.json`` (re-read when it changes)::

    {"sim-0003": ["load_fails"], "sim-0004": {"slow": 2.5}, "sim-0005": {"power_file": "/x/power"}}

``load_fails`` (kexec -l exits 1), ``never_returns`` (connections freeze, port stays closed),
``old_boot_id`` (comes back with the old boot id and command line), ``slow`` (extra
seconds down), ``refuse_ssh`` (connections are dropped before the SSH banner), and
``power_file``: a file holding ``0``/``1`` (e.g. an ``ipmi_sim`` BMC's power state) that the
node follows: ``0`` powers it off, ``1`` boots it afresh (network boot, no rhaas nonce).
``dies_slowly`` (seconds, e.g. ``{"dies_slowly": 1.0}``): after ``kexec -e`` the old kernel
takes that long to go away, as a real dying one does: it still accepts connections, but
cuts every session it is asked for: a channel closed without exit status, half an answer
then a close, a reset connection, or a login cut short (in turn). ``load_fails_first`` (a
count N): the node's first N ``kexec -l`` fail, later ones work.

The farm prints ``READY <n> nodes`` on stdout once every node listens, and writes its PID to
``DIR/farm.pid``. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import os
import posixpath
import signal
import sys
import time
import uuid
from pathlib import Path

import asyncssh

BOOT_ID = "/proc/sys/kernel/random/boot_id"
CMDLINE = "/proc/cmdline"
IMAGE_FILE = "/etc/rhaas-image"
KEXEC_LOADED = "/sys/kernel/kexec_loaded"
FLUSHED = ".flushed"  # in DIR/state: how many times the state files were brought up to date
FAULTS = ("load_fails", "never_returns", "old_boot_id", "slow", "refuse_ssh", "power_file", "dies_slowly",
          "load_fails_first")


def node_address(base: str, i: int) -> str:
    return str(ipaddress.IPv4Address(base) + (1 + i // 250) * 256 + (1 + i % 250))


# -- the shell: lexer -------------------------------------------------------------------------------
class ShellError(Exception):
    def __init__(self, msg: str, status: int = 2):
        super().__init__(msg)
        self.status = status


class NodeGone(Exception):
    """The node jumped into a new kernel: whatever ran there is gone without an exit status."""


OPERATORS = (";", "&&", "||", "&", "|", "(", ")")
_UNSUPPORTED_UNQUOTED = set("*?[]{}~`$")


def tokenize(text: str) -> list[tuple[str, str]]:
    """POSIX-ish tokens: ("word", text) or ("op", symbol); redirections are ("redir", "N>" ...).

    Quoting follows sh: '...' is literal, "..." allows backslash escapes of $`"\\ and
    newline, a bare backslash escapes the next character. Operators are only recognised
    outside quotes. Expansions and globs are refused (this farm never expands anything).
    """
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(text)
    word: list[str] = []
    in_word = False
    quoted = False

    def flush():
        nonlocal word, in_word, quoted
        if in_word:
            tokens.append(("word", "".join(word)))
        word, in_word, quoted = [], False, False

    while i < n:
        c = text[i]
        if c in " \t":
            flush()
            i += 1
        elif c == "\n":
            flush()
            tokens.append(("op", ";"))
            i += 1
        elif c == "#" and not in_word:
            while i < n and text[i] != "\n":
                i += 1
        elif c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise ShellError("sh: unterminated quoted string")
            word.append(text[i + 1 : j])
            in_word = quoted = True
            i = j + 1
        elif c == '"':
            i += 1
            in_word = quoted = True
            while True:
                if i >= n:
                    raise ShellError("sh: unterminated quoted string")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in '$`"\\\n':
                    if text[i + 1] != "\n":
                        word.append(text[i + 1])
                    i += 2
                    continue
                if c in "$`":
                    raise ShellError("sh: expansion is not supported by the simulated node", 127)
                word.append(c)
                i += 1
        elif c == "\\":
            if i + 1 < n and text[i + 1] != "\n":
                word.append(text[i + 1])
                in_word = quoted = True
            i += 2
        elif c in "<>":
            fd = None
            if in_word and not quoted and "".join(word).isdigit():
                fd = "".join(word)
                word, in_word = [], False
            flush()
            op = c
            if i + 1 < n and text[i + 1] in (">", "&") and not (c == "<" and text[i + 1] == ">"):
                op += text[i + 1]
                i += 1
            i += 1
            tokens.append(("redir", (fd or ("0" if c == "<" else "1")) + op))
        elif c in ";&|()":
            flush()
            two = text[i : i + 2]
            if two in ("&&", "||"):
                tokens.append(("op", two))
                i += 2
            else:
                tokens.append(("op", c))
                i += 1
        else:
            if c in _UNSUPPORTED_UNQUOTED:
                raise ShellError(f"sh: {c!r} (expansion or glob) is not supported by the simulated node", 127)
            word.append(c)
            in_word = True
            i += 1
    flush()
    return tokens


# -- the shell: parser ---------------------------------------------------------------------------------
class Simple:
    def __init__(self):
        self.argv: list[str] = []
        self.redirs: list[tuple[int, str, str]] = []  # (fd, op, target) op in < > >> >&


def parse(text: str) -> list[tuple[list[tuple[str | None, Simple]], bool]]:
    """A list of (and-or list, background?); an and-or list is [(connector, command)]."""
    tokens = tokenize(text)
    jobs: list[tuple[list, bool]] = []
    current: list = []
    cmd: Simple | None = None
    connector: str | None = None
    i = 0

    def end_command():
        nonlocal cmd
        if cmd is None or not cmd.argv:
            raise ShellError("sh: syntax error: missing command")
        current.append((connector, cmd))
        cmd = None

    while i < len(tokens):
        kind, val = tokens[i]
        if kind == "word":
            cmd = cmd or Simple()
            cmd.argv.append(val)
        elif kind == "redir":
            cmd = cmd or Simple()
            if i + 1 >= len(tokens) or tokens[i + 1][0] != "word":
                raise ShellError("sh: syntax error: redirection without a target")
            fd, op = int(val[: -len(val.lstrip("0123456789"))] or 0), val.lstrip("0123456789")
            cmd.redirs.append((fd, op, tokens[i + 1][1]))
            i += 1
        elif val in ("&&", "||"):
            end_command()
            connector = val
        elif val in (";", "&"):
            if cmd is None and not current and val == ";":
                i += 1
                continue
            end_command()
            jobs.append((current, val == "&"))
            current, connector = [], None
        elif val == "|":
            raise ShellError("sh: pipes are not supported by the simulated node", 127)
        else:
            raise ShellError(f"sh: syntax error near {val!r}")
        i += 1
    if cmd is not None:
        end_command()
    elif connector is not None:
        raise ShellError("sh: syntax error: unexpected end of command")
    if current:
        jobs.append((current, False))
    return jobs


# -- the shell: interpreter ---------------------------------------------------------------------------
class _Sink:
    def write(self, data: bytes) -> None:
        pass


class _Channel:
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
        except _Exit:
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
        raise _Exit(int(args[0]) if args and args[0].isdigit() else 0)

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

    async def cmd_sleep(self, args, fds) -> int:
        try:
            await asyncio.sleep(float(args[0]))
        except (IndexError, ValueError):
            raise ShellError("sleep: invalid time interval") from None
        return 0

    async def cmd_sh(self, args, fds) -> int:
        if len(args) >= 2 and args[0] == "-c":
            try:
                return await self.run(args[1], fds)
            except _Exit as exc:
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


class _Exit(Exception):
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


# -- nodes ------------------------------------------------------------------------------------------
class SimNode:
    def __init__(self, farm: Farm, index: int, name: str, address: str, key: asyncssh.SSHKey):
        self.farm = farm
        self.index = index
        self.name = name
        self.address = address
        self.key = key
        self.root = farm.dir / "nodes" / name
        self.boot_id = str(uuid.uuid4())
        self.cmdline = f"BOOT_IMAGE=/vmlinuz console=ttyS0 rhaas_sim={name}"
        self.image = "standby"
        self.boot_initrd: str | None = None  # the initrd of the running "kernel", to read /etc/rhaas-image
        self.loaded: dict | None = None
        self.boots = 0
        self.up = False
        self.powered = True
        self.acceptor = None
        self.conns: set = set()
        self.frozen: list = []  # connections of a node that vanished (never_returns)
        self.stuck = False  # down for good until its never_returns fault is lifted
        self.dying = False  # between kexec -e and going down, with the dies_slowly fault
        self.cuts = 0  # sessions cut while dying (picks the next way to cut one)
        self.load_failures = 0  # kexec -l refused by load_fails_first so far
        self.options: asyncssh.SSHServerConnectionOptions | None = None
        self.listen_options: asyncssh.SSHServerConnectionOptions | None = None  # built from options once

    @property
    def ssh(self) -> str:
        return f"root@{self.address}:{self.farm.port}"

    @property
    def host_key_line(self) -> str:
        typ, blob = self.key.export_public_key("openssh").decode().split()[:2]
        return f"{typ} {blob}"

    # -- files -----------------------------------------------------------------------------------
    def virtual(self, path: str) -> bytes | None:
        p = posixpath.normpath("/" + path.lstrip("/"))
        if p == BOOT_ID:
            return (self.boot_id + "\n").encode()
        if p == CMDLINE:
            return (self.cmdline + "\n").encode()
        if p == KEXEC_LOADED:
            return b"1\n" if self.loaded else b"0\n"
        if p == IMAGE_FILE:
            return (self.image_id() + "\n").encode()
        if p == "/etc/hostname":
            return (self.name + "\n").encode()
        return None

    def image_id(self) -> str:
        if self.boot_initrd:
            try:
                from rhaas.core.overlay import overlay_files

                with open(self.boot_initrd, "rb") as fh:
                    files = overlay_files(fh.read())
                self.image = files.get(IMAGE_FILE, b"unknown\n").decode().strip() or "unknown"
            except (OSError, ValueError):
                self.image = "unknown"
            self.boot_initrd = None
        return self.image

    def real_path(self, path: str, for_write: bool = False) -> Path:
        """``path`` inside this node's root; nothing may resolve outside it."""
        p = posixpath.normpath("/" + path.lstrip("/"))
        if p.startswith(("/proc/", "/sys/", "/dev/")) or p in ("/proc", "/sys", "/dev"):
            raise ShellError(f"{path}: Permission denied")
        # normpath has removed every "..", and no symlink can exist under the root (neither
        # the shell nor the SFTP server (_NodeSFTP) makes one), so the path stays inside it
        return self.root / p.lstrip("/")

    # -- kexec -----------------------------------------------------------------------------------
    async def kexec(self, args: list[str], fds) -> int:
        action, kernel, initrd, cmdline = None, None, None, None
        i = 0
        while i < len(args):
            a = args[i]
            if a in ("-l", "--load", "-s", "--kexec-file-syscall"):
                action = "load" if a in ("-l", "--load") else action
            elif a in ("-e", "--exec"):
                action = "exec"
            elif a in ("-u", "--unload"):
                action = "unload"
            elif a in ("-i", "--no-checks", "-f", "--force"):
                pass
            elif a.startswith(("--initrd=", "--ramdisk=")):
                initrd = a.split("=", 1)[1]
            elif a in ("--initrd", "--ramdisk") and i + 1 < len(args):
                initrd = args[i + 1]
                i += 1
            elif a.startswith(("--command-line=", "--append=")):
                cmdline = a.split("=", 1)[1]
            elif a in ("--command-line", "--append") and i + 1 < len(args):
                cmdline = args[i + 1]
                i += 1
            elif a.startswith("-"):
                fds[2].write(f"kexec: unrecognized option '{a}'\n".encode())
                return 1
            elif kernel is None:
                kernel = a
            else:
                fds[2].write(b"kexec: too many arguments\n")
                return 1
            i += 1
        if action == "unload":
            self.loaded = None
            self.farm.save_state(self)
            return 0
        if action == "exec":
            if not self.loaded:
                fds[2].write(b"Nothing has been loaded!\n")
                return 1
            self.farm.spawn(self.reboot())
            raise NodeGone()
        if action != "load" or kernel is None:
            fds[2].write(b"kexec: usage: kexec -l KERNEL [--initrd=FILE] [--command-line=ARGS] | -e | -u\n")
            return 1
        for what, path in (("kernel", kernel), ("initrd", initrd)):
            if path is None:
                continue
            try:
                ok = self.real_path(path).is_file()
            except ShellError:
                ok = False
            if not ok:
                fds[2].write(f"kexec: cannot open {what} {path}: No such file or directory\n".encode())
                return 1
        if self.farm.fault(self.name, "load_fails") or self.load_failures < int(
                self.farm.fault(self.name, "load_fails_first") or 0):
            self.load_failures += 1
            fds[2].write(b"kexec_load failed: Device or resource busy\n")
            return 1
        self.loaded = {"kernel": kernel, "initrd": initrd, "cmdline": cmdline or ""}
        self.farm.save_state(self)
        return 0

    def _drop_connections(self, freeze: bool) -> None:
        for conn in list(self.conns):
            if freeze:
                # a vanished host: no FIN, no answer; the client must rely on its timeouts
                transport = getattr(conn, "_transport", None)
                if transport is not None:
                    transport.pause_reading()
                self.frozen.append(conn)
            else:
                conn.abort()
        self.conns.clear()

    async def go_down(self, freeze: bool = False) -> None:
        self.up = False
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
        self._drop_connections(freeze)

    async def reboot(self) -> None:
        """``kexec -e``: the node vanishes, stays away for the down time, then the new kernel runs."""
        loaded = self.loaded
        dying = float(self.farm.fault(self.name, "dies_slowly") or 0)
        if dying > 0:
            self.dying = True
            await asyncio.sleep(dying)
            self.dying = False
        await self.go_down(freeze=bool(self.farm.fault(self.name, "never_returns")))
        if self.farm.fault(self.name, "never_returns"):
            self.stuck = True
            self.farm.save_state(self)
            return
        await asyncio.sleep(self.farm.down_time + float(self.farm.fault(self.name, "slow") or 0))
        if not self.farm.fault(self.name, "old_boot_id"):
            self.boot_id = str(uuid.uuid4())
            self.cmdline = loaded["cmdline"]
            self.boot_initrd = str(self.real_path(loaded["initrd"])) if loaded.get("initrd") else None
            self.image = "unknown"
            self.boots += 1
        self.loaded = None
        await self.come_up()

    async def power_off(self) -> None:
        self.powered = False
        self.loaded = None
        await self.go_down()
        self.farm.save_state(self)

    async def power_on(self) -> None:
        self.powered = True
        await asyncio.sleep(min(0.2, self.farm.down_time))
        self.boot_id = str(uuid.uuid4())
        self.cmdline = f"BOOT_IMAGE=pxe console=ttyS0 rhaas_sim={self.name}"
        self.image = "pxe"
        self.boot_initrd = None
        self.boots += 1
        await self.come_up()

    async def come_up(self) -> None:
        await self.farm.listen(self)
        self.up = True
        self.farm.save_state(self)

    def cut_way(self) -> int:
        """dies_slowly: how to cut the next session (0 no exit status, 1 half an answer,
        2 reset, 3 login cut short)."""
        self.cuts += 1
        return self.cuts % 4

    async def cut(self, process) -> None:
        """dies_slowly: a session of a dying kernel, cut before it can answer."""
        way = self.cut_way()
        if way == 1:
            process.stdout.write(self.boot_id[:9].encode())
        if way == 2 or way == 3:
            process.get_extra_info("connection").abort()
            return
        process.close()  # the channel closes without an exit status

    def state(self) -> dict:
        return {
            "name": self.name,
            "ssh": self.ssh,
            "up": self.up,
            "powered": self.powered,
            "boot_id": self.boot_id,
            "cmdline": self.cmdline,
            "loaded": self.loaded,
            "boots": self.boots,
        }


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


class _FileWatch:
    """A file's identity (inode, mtime, size), looked up at most every ``every`` seconds.

    The farm asks about faults.json and authorized_keys on every command and login; one
    stat per 20 ms keeps it from paying a syscall each time, and no client of the farm can
    change a file and reach a node within 20 ms anyway.
    """

    def __init__(self, every: float = 0.02):
        self.every = every
        self._at = -1.0
        self._sig = None

    def signature(self, path: Path):
        now = time.monotonic()
        if now - self._at >= self.every:
            self._at = now
            try:
                st = path.stat()
                self._sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                self._sig = None
        return self._sig


# -- the farm ---------------------------------------------------------------------------------------------
class Farm:
    def __init__(self, directory: Path, count: int, port: int, down_time: float, base: str,
                 authorized_keys: Path, prefix: str = "sim-", log_commands: bool = False, algs: dict | None = None):
        self.dir = directory
        self.state_dir = str(directory / "state")
        self.count = count
        self.port = port
        self.down_time = down_time
        self.base = base
        self.authorized_path = authorized_keys
        self.prefix = prefix
        self.log_commands = log_commands
        self.algs = algs or {}  # asyncssh kex_algs / encryption_algs / mac_algs overrides
        self.nodes: list[SimNode] = []
        self.tasks: set[asyncio.Task] = set()
        self._faults: dict = {}
        self._faults_sig = None
        self._auth: set[bytes] = set()
        self._auth_sig = None
        self._cmd_log = None
        self._dirty: set[SimNode] = set()
        self._flushes = 0
        self._faults_watch = _FileWatch()
        self._auth_watch = _FileWatch()

    # -- files the tests and rhaas read --------------------------------------------------------------
    def _host_keys(self) -> dict[str, str]:
        path = self.dir / "hostkeys.json"
        try:
            keys = json.loads(path.read_text())
        except FileNotFoundError:
            keys = {}
        changed = False
        for i in range(self.count):
            name = self.node_name(i)
            if name not in keys:
                keys[name] = asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()
                changed = True
        if changed:
            _write_json(path, keys, mode=0o600)
        return keys

    def node_name(self, i: int) -> str:
        return f"{self.prefix}{i + 1:04d}"

    def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "state").mkdir(exist_ok=True)
        keys = self._host_keys()
        for i in range(self.count):
            name = self.node_name(i)
            node = SimNode(self, i, name, node_address(self.base, i), asyncssh.import_private_key(keys[name]))
            node.root.mkdir(parents=True, exist_ok=True)
            node.options = asyncssh.SSHServerConnectionOptions(
                server_factory=lambda node=node: NodeServer(node),
                server_host_keys=[node.key],
                process_factory=lambda proc, node=node: self.handle(node, proc),
                sftp_factory=lambda chan, node=node: _NodeSFTP(chan, chroot=str(node.root).encode()),
                encoding=None,
                allow_pty=False,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
                keepalive_interval=0,
                login_timeout=30,
                **self.algs,
            )
            self.nodes.append(node)
        if self.log_commands:
            self._cmd_log = open(self.dir / "commands.log", "a", buffering=1)  # noqa: SIM115 - lives with the farm

    def write_inventory(self) -> None:
        doc = {
            "pid": os.getpid(),
            "port": self.port,
            "down_time": self.down_time,
            "nodes": [
                {"name": n.name, "ssh": n.ssh, "host_key": n.host_key_line, "root": str(n.root)} for n in self.nodes
            ],
        }
        _write_json(self.dir / "farm.json", doc)
        self._dirty.update(self.nodes)
        self.flush_states()

    def save_state(self, node: SimNode) -> None:
        """Mark the node's state file stale; it is written when someone asks (flush_states)."""
        self._dirty.add(node)

    def flush_states(self) -> None:
        """Write the state files of nodes that changed, then bump ``state/.flushed``.

        Writing a file per state change cost the farm about a quarter of its CPU at a
        thousand nodes, on the cores the client it serves needs, so the files are written on
        request (:func:`read_state` sends SIGUSR1 and waits for the counter to move) and when
        the farm stops.
        """
        dirty, self._dirty = self._dirty, set()
        for node in dirty:
            _write_json(f"{self.state_dir}/{node.name}.json", node.state())
        self._flushes += 1
        _write_json(f"{self.state_dir}/{FLUSHED}", self._flushes)

    # -- faults and keys, re-read when their files change ----------------------------------------------
    def fault(self, name: str, what: str):
        path = self.dir / "faults.json"
        sig = self._faults_watch.signature(path)
        if sig != self._faults_sig:
            self._faults_sig = sig
            self._faults = {}
            if sig is not None:
                try:
                    raw = json.loads(path.read_text() or "{}")
                except ValueError:
                    raw = {}
                for node, spec in raw.items():
                    self._faults[node] = {k: True for k in spec} if isinstance(spec, list) else dict(spec)
            self._watch_power()
        return self._faults.get(name, {}).get(what)

    def authorized(self) -> set[bytes]:
        sig = self._auth_watch.signature(self.authorized_path)
        if sig != self._auth_sig:
            self._auth_sig = sig
            keys: set[bytes] = set()
            if sig is not None:
                for line in self.authorized_path.read_text().splitlines():
                    line = line.strip()
                    if line and not line.startswith("#"):
                        try:
                            keys.add(asyncssh.import_public_key(line).public_data)
                        except (asyncssh.KeyImportError, ValueError):
                            pass
            self._auth = keys
        return self._auth

    def _watch_power(self) -> None:
        watched = {n: f["power_file"] for n, f in self._faults.items() if f.get("power_file")}
        self._power_watch = watched

    async def power_loop(self) -> None:
        """Nodes with a ``power_file`` follow it: 0 powers off, 1 boots afresh.

        A node that vanished (``never_returns``) boots afresh once that fault is lifted, as
        if someone had pressed its power button.
        """
        by_name = {n.name: n for n in self.nodes}
        while True:
            await asyncio.sleep(0.1)
            self.fault("", "")  # re-read faults.json if it changed
            for node in [n for n in self.nodes if n.stuck]:
                if not self.fault(node.name, "never_returns"):
                    node.stuck = False
                    for conn in node.frozen:
                        conn.abort()
                    node.frozen.clear()
                    self.spawn(node.power_on())
            for name, path in getattr(self, "_power_watch", {}).items():
                node = by_name.get(name)
                if node is None:
                    continue
                try:
                    on = Path(path).read_text().strip() == "1"
                except OSError:
                    continue
                if not on and node.powered:
                    await node.power_off()
                elif on and not node.powered:
                    node.powered = True
                    self.spawn(node.power_on())

    # -- serving -------------------------------------------------------------------------------------
    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def listen(self, node: SimNode) -> None:
        """Open the node's port. ``asyncssh.listen`` would rebuild the node's options in an
        executor thread on every call (every simulated boot); they never change, so they are
        built once and each boot only opens a socket with asyncssh's connection class behind it."""
        loop = asyncio.get_running_loop()
        if node.listen_options is None:
            opts = await asyncssh.SSHServerConnectionOptions.construct(node.options, host=node.address, port=self.port)
            opts.proxy_command = None
            node.listen_options = opts
        opts = node.listen_options
        node.acceptor = await loop.create_server(
            lambda: asyncssh.connection.SSHServerConnection(loop, opts), node.address, self.port,
            reuse_address=True, backlog=100,
        )

    async def handle(self, node: SimNode, process) -> None:
        command = process.command
        if self._cmd_log is not None:
            self._cmd_log.write(f"{node.name}\t{command!r}\n")
        if node.dying:
            await node.cut(process)
            return
        if command is None:
            process.stderr.write(b"this simulated node has no interactive shell\n")
            process.exit(1)
            return
        shell = Shell(self, node, _Channel(process.stdout), _Channel(process.stderr))
        try:
            status = await shell.run(command)
            if shell.holders:
                await asyncio.gather(*shell.holders, return_exceptions=True)
        except _Exit as exc:
            status = exc.status
        except NodeGone:
            return  # the kernel is gone: no exit status, the connection just drops
        try:
            process.exit(status)
        except Exception:  # noqa: BLE001, S110 - the connection was dropped meanwhile
            pass

    async def serve(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self.flush_states)
        await asyncio.gather(*(self.listen(n) for n in self.nodes))
        for n in self.nodes:
            n.up = True
        self.write_inventory()
        (self.dir / "farm.pid").write_text(f"{os.getpid()}\n")
        self.spawn(self.power_loop())
        print(f"READY {len(self.nodes)} nodes port {self.port}", flush=True)
        await stop.wait()
        self.flush_states()
        for n in self.nodes:
            if n.acceptor is not None:
                n.acceptor.close()
            for c in list(n.conns):
                c.abort()
        try:
            (self.dir / "farm.pid").unlink()
        except FileNotFoundError:
            pass


# -- starting a farm from another process (tests, benchmarks) ------------------------------------------
class FarmProcess:
    """A running farm started by :func:`launch`; stop it with :meth:`stop` (by its PID)."""

    def __init__(self, directory: Path, proc, nodes: list[dict], port: int, base: str):
        self.dir = directory
        self.proc = proc
        self.nodes = nodes  # farm.json entries: name, ssh, host_key, root
        self.port = port
        self.base = base

    @property
    def names(self) -> list[str]:
        return [n["name"] for n in self.nodes]

    def node(self, name: str) -> dict:
        return next(n for n in self.nodes if n["name"] == name)

    def state(self, name: str) -> dict:
        """What the node reports: up, boot_id, cmdline, loaded, boots (as of this call)."""
        return read_state(self.dir, name, self._live_pid())

    def set_faults(self, faults: dict) -> None:
        _write_json(self.dir / "faults.json", faults)

    def commands(self) -> list[tuple[str, str]]:
        """(node, command) for every command run so far (with ``log_commands``), oldest first."""
        import ast

        path = self.dir / "commands.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            node, _, cmd = line.partition("\t")
            out.append((node, ast.literal_eval(cmd)))
        return out

    def _live_pid(self) -> int | None:
        """The farm's PID while it runs; None once it has exited (its files are final then)."""
        return self.proc.pid if self.proc.poll() is None else None

    def states(self, names) -> dict[str, dict]:
        """``state`` of several nodes, from one flush."""
        flush_states(self.dir, self._live_pid())
        return {n: json.loads((self.dir / "state" / f"{n}.json").read_text()) for n in names}

    def wait_up(self, names, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            down = [n for n, st in self.states(names).items() if not st["up"]]
            if not down:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not up after {timeout}s: {down}")
            time.sleep(0.05)

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def read_state(directory: Path | str, name: str, pid: int | None, timeout: float = 10.0) -> dict:
    """A node's state file, brought up to date first by the running farm ``pid`` (a process
    we started; None when it has exited, and its files are as it left them when it stopped).

    The farm writes state files only on request: the counter in ``state/.flushed`` is read,
    the farm gets SIGUSR1, and the file is read once the counter has moved (a flush that
    ends after the counter was read includes every change made before this call).
    """
    flush_states(directory, pid, timeout)
    return json.loads((Path(directory) / "state" / f"{name}.json").read_text())


def flush_states(directory: Path | str, pid: int | None, timeout: float = 10.0) -> None:
    """Have the running farm ``pid`` (ours) write its state files in ``directory`` now."""
    if pid is None:
        return
    state_dir = Path(directory) / "state"
    before = _flush_count(state_dir)
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _flush_count(state_dir) <= before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node farm (pid {pid}) did not write its state within {timeout:g}s")
        time.sleep(0.002)


def _flush_count(state_dir: Path) -> int:
    try:
        return int((state_dir / FLUSHED).read_text())
    except (OSError, ValueError):
        return 0


def launch(directory: Path, nodes: int, authorized_keys: Path, down_time: float = 0.5,
           log_commands: bool = False, timeout: float = 120.0, tries: int = 5) -> FarmProcess:
    """Start a farm subprocess on a random free port and 127.X.0.0/16 block; wait for READY."""
    import random
    import subprocess
    import threading

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(tries):
        port = random.randint(20000, 60000)
        base = f"127.{random.randint(100, 250)}.0.0"
        cmd = [sys.executable, "-m", "rhaas.sim.farm", "--nodes", str(nodes), "--dir", str(directory),
               "--port", str(port), "--base", base, "--down-time", str(down_time),
               "--authorized-keys", str(authorized_keys)]
        if log_commands:
            cmd.append("--log-commands")
        with open(directory / "farm.err", "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda out=proc.stdout, got=line: got.append(out.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if line and line[0].startswith("READY"):
            doc = json.loads((directory / "farm.json").read_text())
            return FarmProcess(directory, proc, doc["nodes"], port, base)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        last = (directory / "farm.err").read_text()
    raise RuntimeError(f"the node farm did not start: {last[-2000:]}")


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


def run_loop(main, uvloop_ok: bool = True):
    """Run the farm on uvloop when it is installed (the ``test`` extra): the farm shares the
    machine's cores with the client it serves, and uvloop's loop costs the farm some 15 % less
    CPU per SSH connection than asyncio's. Nothing a client sees changes."""
    if uvloop_ok:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


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


def _write_json(path: Path | str, doc, mode: int = 0o644) -> None:
    path = str(path)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    data = json.dumps(doc).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rhaas.sim.farm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--port", type=int, default=2222)
    ap.add_argument("--down-time", type=float, default=0.5)
    ap.add_argument("--base", default="127.0.0.0", help="base address; node i gets base+(1+i//250).(1+i%%250)")
    ap.add_argument("--authorized-keys", type=Path, help="public keys allowed to log in (default DIR/authorized_keys)")
    ap.add_argument("--prefix", default="sim-")
    ap.add_argument("--log-commands", action="store_true", help="append every command to DIR/commands.log")
    ap.add_argument("--kex", default="curve25519-sha256,curve25519-sha256@libssh.org",
                    help="comma-separated key exchange algorithms to offer (default: curve25519, as the "
                    "lab's dropbear nodes; '' for asyncssh's full list)")
    ap.add_argument("--ciphers", help="comma-separated ciphers to offer (default: asyncssh's)")
    ap.add_argument("--macs", help="comma-separated MACs to offer (default: asyncssh's)")
    ap.add_argument("--no-coalesce", action="store_true",
                    help="write each SSH packet as it is made, and keep asyncssh's per-login config reload")
    ap.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop even if uvloop is installed")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not 0 < args.nodes <= 250 * 254:
        ap.error("--nodes must be between 1 and 63500")
    base = ipaddress.IPv4Address(args.base)
    if base not in ipaddress.IPv4Network("127.0.0.0/8") or not ipaddress.IPv4Address(
        node_address(args.base, args.nodes - 1)
    ) in ipaddress.IPv4Network("127.0.0.0/8"):
        ap.error("--base must leave every node address inside 127.0.0.0/8")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncssh.set_log_level(logging.INFO if args.verbose else logging.CRITICAL)
    farm = Farm(
        args.dir.resolve(), args.nodes, args.port, args.down_time, args.base,
        (args.authorized_keys or args.dir / "authorized_keys").resolve(), args.prefix, args.log_commands,
        {k: v.split(",") for k, v in (("kex_algs", args.kex), ("encryption_algs", args.ciphers),
                                       ("mac_algs", args.macs)) if v},
    )
    if not args.no_coalesce:
        coalesce_writes()
        skip_idle_work()
    farm.setup()
    # the node objects built above live as long as the farm: keep the collector off them, and
    # let it collect asyncssh's per-connection cycles in larger batches (less farm CPU)
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        run_loop(farm.serve(), uvloop_ok=not args.no_uvloop)
    except OSError as exc:
        print(f"farm: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
