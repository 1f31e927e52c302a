"""The lab's ROOT rhaas instance, set up purely through the documented CLI, and its serve.

Every node is registered with its SSH address, pinned host key, BMC and a NIC; the images
``standby`` and ``second`` are added; project ``lab`` gets an admin and a tenant user with
random passwords in 0600 files; then ``rhaas serve`` starts on a free loopback port.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
from pathlib import Path

from .labinfo import (
    ADMIN_USER,
    IMAGE_NAMES,
    LAB_JSON,
    PROJECT,
    TENANT_USER,
    Log,
    running_pids,
    update_info,
)
from .rhaasproc import run_rhaas, start_serve
from .vm import LabError


def secret_file(path: Path, value: str | None = None) -> str:
    value = value or secrets.token_urlsafe(18)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    os.chmod(path, 0o600)
    return value


def standby_supported() -> bool:
    """Whether this rhaas has the module ``rhaas serve`` imports once standby-image is set."""
    try:
        return importlib.util.find_spec("rhaas.core.standby") is not None
    except (ImportError, ValueError):
        return False


def fresh_home(home: Path) -> None:
    """A root home left by an earlier lab in the same directory is stale: start afresh."""
    if home.exists():
        shutil.rmtree(home)


def setup_root(d: Path, home: Path, nodes: list[dict], images: dict[str, dict], *,
                timeout_setting: float, log: Log, blob: tuple[str, str] | None = None) -> dict:
    """The root instance, through the CLI. ``nodes``: name, ssh, host_key, mac, ipmi (or None);
    ``blob``: (blob-listen, blob-url) where its kexec runs serve images to the nodes."""
    run_rhaas(home, "init")
    ipmi_env = {}
    for nd in nodes:
        args = ["node", "register", nd["name"], "--ssh", nd["ssh"], "--host-key", nd["host_key"],
                "--nic", f"eth0={nd['mac']}"]
        ipmi = nd.get("ipmi")
        if ipmi:
            password = Path(ipmi["password_file"]).read_text().strip()
            ipmi_env = {"RHAAS_IPMI_PASSWORD": password}
            args += ["--ipmi", f"{ipmi['user']}@{ipmi['host']}:{ipmi['port']}",
                     "--ipmi-interface", "rmcpplus", "--cipher-suite", "3"]
        run_rhaas(home, *args, env=ipmi_env if ipmi else None)
    log(f"registered {len(nodes)} node(s) in the root instance")
    for name in IMAGE_NAMES:
        img = images[name]
        run_rhaas(home, "image", "add", name, "--kernel", img["kernel"], "--initrd", img["initrd"],
                  "--append", img["append"])
    run_rhaas(home, "config", "set", "ssh-key", d / "id_ed25519")
    run_rhaas(home, "config", "set", "timeout", f"{timeout_setting:g}")
    if blob:
        set_blob(home, *blob)
    standby_now = standby_supported()
    if standby_now:
        run_rhaas(home, "config", "set", "standby-image", "standby")
    run_rhaas(home, "project", "add", PROJECT)
    admin_pw = secret_file(d / "admin.password")
    tenant_pw = secret_file(d / "tenant.password")
    run_rhaas(home, "user", "add", ADMIN_USER, "--admin", "--password-stdin", input=admin_pw + "\n")
    run_rhaas(home, "user", "add", TENANT_USER, "--project", PROJECT, "--password-stdin",
              "--ssh-key", d / "id_ed25519.pub", input=tenant_pw + "\n")
    log("root instance: images standby and second, project lab, users admin and tenant")
    return {
        "home": str(home),
        "project": PROJECT,
        "admin": {"user": ADMIN_USER, "password_file": str(d / "admin.password")},
        "tenant": {"user": TENANT_USER, "project": PROJECT, "password_file": str(d / "tenant.password")},
        "images": images,
        "standby_image": "standby",
        "standby_set_before_serve": standby_now,
        "client_key": str(d / "id_ed25519"),
        "timeout": timeout_setting,
    }


def set_blob(home: Path, listen: str, url: str) -> None:
    """A kexec by this instance serves the run's image on ``listen`` (the lab's fixed loopback
    port) and tells the nodes ``url`` (the VMs' forward to it)."""
    run_rhaas(home, "config", "set", "blob-listen", listen)
    run_rhaas(home, "config", "set", "blob-url", url)


def start_root_serve(d: Path, rh: dict, log: Log) -> dict:
    home = Path(rh["home"])
    serve = start_serve(home)
    rh["serve"] = {"pid": serve.pid, "url": serve.url, "home": str(home), "log": serve.log}
    rh["url"] = serve.url
    update_info(d, rhaas=rh)  # the PID is on record before anything else can fail
    if not rh["standby_set_before_serve"]:
        # this rhaas has no rhaas.core.standby yet, and `rhaas serve` imports it at start
        # whenever standby-image is set: set it once serve runs (serve ignores it then)
        run_rhaas(home, "config", "set", "standby-image", "standby")
        log("note: rhaas.core.standby is missing: serve runs without return-to-standby on detach")
    log(f"rhaas serve listening on {serve.url} (pid {serve.pid})")
    return rh


def refuse_if_running(d: Path) -> None:
    if (d / LAB_JSON).exists():
        alive = running_pids(d)
        if alive:
            raise LabError(f"a lab is already up in {d} (pids {sorted(set(alive.values()))}); "
                           "run 'rhaas lab down' first")
