"""Who runs a kexec, and whether that run is still alive: ``provisioning`` versus ``interrupted``.

A run writes its owner next to the ``provisioning`` marker in its first inventory write: the
process id, the process's start time (field 22 of ``/proc/PID/stat``, clock ticks since the
host booted) and the host's boot id, so a recycled PID or a rebooted host never passes for
the run. When the run ends normally its second write replaces the marker with the result.
If the process dies first (SIGKILL, a crash, a power cut), readers see a ``provisioning``
node whose owner is gone and show it as ``interrupted`` with the run's start time
(:func:`live_view`); the next kexec of the node simply starts over.

Hand-written because nothing in the standard library names a process by more than its
PID; ``/proc`` is read directly (Linux). Where there is no ``/proc``, a PID that exists
counts as alive.
"""

from __future__ import annotations

import os
import time

from rhaas import model

STATUS_INTERRUPTED = "interrupted"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks after boot, or None if there is none."""
    stat = _read(f"/proc/{int(pid)}/stat")
    if not stat:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields resume after the last ')'
    rest = stat[stat.rfind(")") + 2:].split()
    if len(rest) < 20 or rest[0] == "Z":  # a zombie has ended
        return None
    try:
        return int(rest[19])  # field 22
    except ValueError:
        return None


def host_boot() -> str | None:
    text = _read(_BOOT_ID)
    return text.strip() if text else None


def current(started: float | None = None) -> dict:
    """This process as the owner of a run that starts now (or at ``started``)."""
    pid = os.getpid()
    return {"pid": pid, "start": process_start(pid), "boot": host_boot(), "started": started or time.time()}


def alive(owner) -> bool:
    """Whether the process recorded in ``owner`` (see :func:`current`) still runs."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int) or owner["pid"] <= 0:
        return False
    if not os.path.isdir("/proc/self"):  # no /proc: the PID alone
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    if owner.get("boot") != host_boot():
        return False
    start = process_start(owner["pid"])
    return start is not None and start == owner.get("start")


def is_ours(owner) -> bool:
    return isinstance(owner, dict) and owner.get("pid") == os.getpid() and alive(owner)


def started_text(owner) -> str:
    started = owner.get("started") if isinstance(owner, dict) else None
    if not isinstance(started, (int, float)):
        return "at an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started))


def live_view(doc: dict) -> dict:
    """``doc`` as a reader should show it: a ``provisioning`` node whose run has died is
    ``interrupted``, with the run's start time in its reason (and ``run_started``)."""
    if doc.get("status") != model.STATUS_PROVISIONING:
        return doc
    owner = doc.get("kexec_run")
    return doc if alive(owner) else _interrupted(doc, owner)


def _interrupted(doc: dict, owner) -> dict:
    pid = owner.get("pid") if isinstance(owner, dict) else None
    who = f" (pid {pid})" if pid else ""
    return {
        **doc,
        "status": STATUS_INTERRUPTED,
        "reason": f"interrupted: the kexec run started {started_text(owner)}{who} ended before this node finished",
        "run_started": owner.get("started") if isinstance(owner, dict) else None,
    }


def live_views(docs) -> list[dict]:
    """:func:`live_view` of many nodes; the host's boot id is read once per owner, not per node."""
    seen: dict[tuple, bool] = {}
    out = []
    for d in docs:
        if d.get("status") != model.STATUS_PROVISIONING:
            out.append(d)
            continue
        owner = d.get("kexec_run")
        key = (owner.get("pid"), owner.get("start"), owner.get("boot")) if isinstance(owner, dict) else None
        if key is not None and key not in seen:
            seen[key] = alive(owner)
        out.append(d if key is not None and seen[key] else _interrupted(d, owner))
    return out
