"""rhaas as child processes of the lab: the CLI (:func:`run_rhaas`) and ``rhaas serve``.

Each runs with ``RHAAS_HOME`` set and every other ``RHAAS_*`` setting of the caller dropped;
secrets travel only in the environment or on stdin.  ``rhaas serve`` is started in its own
session so that it outlives ``rhaas lab up``, and is stopped only by its PID after checking
that the process still is that serve (:func:`serve_pid_matches`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .hostproc import term_then_kill
from .vm import LabError, pid_alive, pid_cmdline, proc_list


class CommandFailed(LabError):
    """A ``rhaas`` command run by the lab exited non-zero."""

    def __init__(self, msg: str, proc: subprocess.CompletedProcess | None = None):
        super().__init__(msg)
        self.proc = proc


def rhaas_exe() -> str:
    """How to spell the rhaas command for a human: ``rhaas`` if that is ours on PATH."""
    beside = Path(sys.executable).parent / "rhaas"
    found = shutil.which("rhaas")
    if found and (not beside.exists() or Path(found).resolve() == beside.resolve()):
        return "rhaas"
    return str(beside) if beside.exists() else "rhaas"


def rhaas_env(home: str | os.PathLike, extra: dict | None = None) -> dict:
    """The caller's environment without any RHAAS_* setting, plus ``RHAAS_HOME=home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    env["RHAAS_HOME"] = str(home)
    env.update(extra or {})
    return env


def run_rhaas(home: str | os.PathLike, *args, env: dict | None = None, input: str | None = None,
              timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``rhaas ARGS`` with ``RHAAS_HOME=home`` and capture its output.

    Secrets only ever travel in ``env`` or on stdin, so error messages may quote the
    arguments.
    """
    argv = [sys.executable, "-m", "rhaas", *map(str, args)]
    try:
        proc = subprocess.run(argv, check=False, env=rhaas_env(home, env), input=input, capture_output=True,
                              text=True, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"rhaas {' '.join(map(str, args))}: no answer within {timeout:g}s") from None
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise CommandFailed(f"rhaas {' '.join(map(str, args))} exited {proc.returncode}: "
                            + (" / ".join(err[-3:]) or "no output"), proc)
    return proc


@dataclasses.dataclass
class ServeProcess:
    pid: int
    url: str
    home: str
    log: str


children: dict[int, subprocess.Popen] = {}  # our own children, so stopping them reaps them


def start_serve(home: str | os.PathLike, timeout: float = 30.0, verbose: bool = False) -> ServeProcess:
    """``rhaas serve --listen 127.0.0.1:0`` for ``home``, detached; returns once it listens."""
    home = Path(home).resolve()
    out_path, log_path = home / "serve.out", home / "serve.log"
    argv = [sys.executable, "-m", "rhaas", "serve", "--listen", "127.0.0.1:0"] + (["-v"] if verbose else [])
    with open(out_path, "wb") as out, open(log_path, "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=rhaas_env(home), cwd=str(home), start_new_session=True)
    children[proc.pid] = proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", out_path.read_text(errors="replace"))
        if m:
            return ServeProcess(proc.pid, m.group(1), str(home), str(log_path))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_serve(proc.pid, home)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    raise LabError(f"rhaas serve for {home} did not start: {' / '.join(tail) or 'no output'}")


def _environ(pid: int) -> list[str]:
    return proc_list(pid, "environ")


def serve_pid_matches(pid: int | None, home: str | os.PathLike) -> bool:
    """True if ``pid`` is a live ``rhaas serve`` running with ``RHAAS_HOME=home``."""
    if not pid_alive(pid):
        return False
    argv = pid_cmdline(pid)  # type: ignore[arg-type]
    if "serve" not in argv or "rhaas" not in " ".join(argv):
        return False
    return f"RHAAS_HOME={Path(home).resolve()}" in _environ(pid)  # type: ignore[arg-type]


def stop_serve(pid: int | None, home: str | os.PathLike, timeout: float = 5.0) -> bool:
    """Stop our serve process ``pid`` (only if it still is ours). True if it was running."""
    if not serve_pid_matches(pid, home):
        children.pop(pid or -1, None)
        return False
    assert pid is not None
    term_then_kill(pid, timeout)
    child = children.pop(pid, None)
    if child is not None:
        with contextlib.suppress(Exception):
            child.wait(timeout=1)
    else:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return True
