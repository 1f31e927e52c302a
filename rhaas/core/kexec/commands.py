"""The shell commands of a kexec: every command line rhaas sends to a node, and how its answers are read.

This is kexec policy (where the cache lives, how the initrd is built on the node, how the
jump is detached), so it lives with the kexec pipeline; :mod:`rhaas.adapters.ssh` only
carries the commands. Every variable part goes through ``shlex.quote``.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rhaas.adapters.ssh import Result


class Commands:
    """Every command line rhaas sends to a node. Variable parts are always shlex-quoted.

    A node's pre-kexec answer is parsed by :meth:`parse_load`: the boot id on the first line,
    then ``rhaas:cached`` once the files are there and ``rhaas:loaded`` after ``kexec -l``.
    """

    CACHE_DIR = "/run/rhaas"
    BOOT_ID = "/proc/sys/kernel/random/boot_id"
    CMDLINE = "/proc/cmdline"
    KEXEC_LOADED = "/sys/kernel/kexec_loaded"
    CACHED = "rhaas:cached"
    LOADED = "rhaas:loaded"
    # A synchronous `kexec -e` never returns; the jump is detached from the SSH session with all
    # three standard streams closed, so the session ends at once (lab notes §7).
    FIRE = 'setsid sh -c "sleep 0.2; kexec -e" </dev/null >/dev/null 2>&1 &'

    @classmethod
    def cache_path(cls, sha256: str) -> str:
        if not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return f"{cls.CACHE_DIR}/{sha256}"

    @classmethod
    def _kexec_load(cls, kernel_sha: str, initrd_sha: str, cmdline: str) -> str:
        q = shlex.quote
        return (
            f"kexec -l {q(cls.cache_path(kernel_sha))} --initrd={q(cls.cache_path(initrd_sha))} "
            f"{q('--command-line=' + cmdline)}"
        )

    @classmethod
    def _tail(cls, fire: bool) -> str:
        tail = f" && echo {cls.LOADED}"
        if fire:
            # `sh -c` keeps the trailing `&` from backgrounding the whole && list
            tail += f" && sh -c {shlex.quote(cls.FIRE)}"
        return tail

    @classmethod
    def load_cached(cls, kernel_sha: str, initrd_sha: str, cmdline: str, fire: bool) -> str:
        """Read the boot id; if both files are cached, ``kexec -l`` (and fire) in the same session."""
        q = shlex.quote
        return (
            f"cat {cls.BOOT_ID} && test -f {q(cls.cache_path(kernel_sha))} && test -f {q(cls.cache_path(initrd_sha))}"
            f" && echo {cls.CACHED} && {cls._kexec_load(kernel_sha, initrd_sha, cmdline)}{cls._tail(fire)}"
        )

    @classmethod
    def combine_and_load(
        cls, kernel_sha: str, base_sha: str, overlay_sha: str, initrd_sha: str, cmdline: str, fire: bool, tag: str
    ) -> str:
        """Build the node's initrd (base + overlay) in its cache, then ``kexec -l`` (and fire)."""
        q = shlex.quote
        target = cls.cache_path(initrd_sha)
        tmp = f"{target}.tmp.{tag}"
        return (
            f"cat {cls.BOOT_ID} && cat {q(cls.cache_path(base_sha))} {q(cls.cache_path(overlay_sha))} > {q(tmp)}"
            f" && mv -f {q(tmp)} {q(target)} && echo {cls.CACHED}"
            f" && {cls._kexec_load(kernel_sha, initrd_sha, cmdline)}{cls._tail(fire)}"
        )

    @classmethod
    def fire_loaded(cls) -> str:
        """Read the boot id; jump only if a kernel is loaded (the pipelined ``--exec``)."""
        return f"cat {cls.BOOT_ID} && grep -qx 1 {cls.KEXEC_LOADED} && echo {cls.LOADED} && sh -c {shlex.quote(cls.FIRE)}"

    @classmethod
    def read_boot(cls) -> str:
        """The boot id, then the kernel command line."""
        return f"cat {cls.BOOT_ID} {cls.CMDLINE}"

    @classmethod
    def parse_load(cls, result: Result) -> tuple[str | None, bool, bool]:
        """``(boot id, files cached, kernel loaded)`` from a load/fire command's answer."""
        lines = [ln.strip() for ln in result.lines]
        boot_id = lines[0] if lines and _looks_like_boot_id(lines[0]) else None
        return boot_id, cls.CACHED in lines, cls.LOADED in lines

    @classmethod
    def parse_boot(cls, result: Result) -> tuple[str | None, str]:
        lines = result.lines
        boot_id = lines[0].strip() if lines and _looks_like_boot_id(lines[0].strip()) else None
        cmdline = lines[1] if len(lines) > 1 else ""
        return boot_id, cmdline


def _looks_like_boot_id(text: str) -> bool:
    return len(text) == 36 and text.count("-") == 4


def cmdline_has(cmdline: str, arg: str) -> bool:
    """Whether ``arg`` is one of the whitespace-separated words of a kernel command line."""
    return arg in cmdline.split()
