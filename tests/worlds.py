"""Worlds for tests: the CLI as a subprocess, `rhaas serve` processes, root instances.

Every process started here is stopped by its PID (see Served.stop and the conftest fixtures).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rhaas(home, *args, input=None, env=None, timeout=60, check=False):
    """Run the real CLI as a subprocess, the way a user or a script does."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
    full_env["RHAAS_HOME"] = str(home)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "rhaas", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,  # callers assert the exit code themselves (or pass check=True here)
        cwd=str(ROOT),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"rhaas {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr}")
    return proc


class Served:
    """A `rhaas serve` process on a loopback port."""

    def __init__(self, home: Path):
        self.home = home
        env = {k: v for k, v in os.environ.items() if not k.startswith("RHAAS_")}
        env["RHAAS_HOME"] = str(home)
        self.log = open(home / "serve.log", "w")  # noqa: SIM115 - open while serve runs; closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rhaas", "serve", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"serve did not start: {line!r}; log: {(home / 'serve.log').read_text()}")
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def make_root(home, nodes=(), users=(("admin", "adminpw", True, ()),), projects=()):
    """A root instance: registered nodes, projects, users (name, password, admin, projects)."""
    rhaas(home, "init", check=True)
    from rhaas.store import Store

    store = Store(home)
    with store.transaction("test") as tx:
        tx.put_nodes(nodes)
    for p in projects:
        rhaas(home, "project", "add", p, check=True)
    for name, pw, admin, projs in users:
        args = ["user", "add", name, "--password-stdin"] + (["--admin"] if admin else [])
        for p in projs:
            args += ["--project", p]
        rhaas(home, *args, input=pw + "\n", check=True)
    return store


def plain_node(i: int, **kw):
    from rhaas.model import new_node

    return new_node(
        f"node-{i:02d}",
        "registered",
        ssh=f"root@127.0.0.{i}:22",
        nics=[{"label": "eth0", "macaddr": f"52:54:00:00:00:{i:02x}", "networks": {}}],
        metadata={"rack": "r1"},
        **kw,
    )


def wait_for(pred, timeout=10.0, interval=0.05, what: str | None = None):
    """Poll ``pred`` until it is true or ``timeout`` seconds pass; the last answer is returned.

    With ``what`` a timeout raises AssertionError naming the condition instead of returning False.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    if pred():
        return True
    if what is not None:
        raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
    return False


def within(seconds: float, fn, *args, **kwargs):
    """Call ``fn(*args, **kwargs)`` with a deadline on the call itself: a hang fails the test.

    The call runs in a daemon thread; its result is returned and its exception re-raised here.
    This is a guard against hanging, not a speed check (figures belong to `make bench`), so
    give it several times the limit the call is configured with.
    """
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below, re-raised there
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"within-{getattr(fn, '__name__', 'call')}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)!s} did not finish within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
