"""A running lab as one object (:class:`LabStack`), and what ``rhaas lab up`` tells a human."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .labinfo import (
    ADMIN_USER,
    APPEND,
    LAB_JSON,
    PROJECT,
    SIM_LABEL,
    TENANT_USER,
    default_dir,
    read_info,
    running_pids,
)
from .rhaasproc import rhaas_exe, run_rhaas
from .vm import LabError


class LabStack:
    """A lab directory brought up by :func:`up`: its nodes, root instance and serve."""

    def __init__(self, dir: str | os.PathLike | None = None):
        self.dir = Path(dir or default_dir()).expanduser().resolve()
        self.info = read_info(self.dir)
        if "rhaas" not in self.info:
            raise LabError(f"the lab in {self.dir} has no rhaas instance (phase-1 lab?)")
        self.rh = self.info["rhaas"]

    # -- facts ---------------------------------------------------------------------
    @property
    def simulated(self) -> bool:
        return bool(self.info.get("simulated"))

    @property
    def url(self) -> str:
        return self.rh["url"]

    @property
    def root_home(self) -> Path:
        return Path(self.rh["home"])

    @property
    def client_key(self) -> Path:
        return Path(self.rh["client_key"])

    @property
    def serve_pid(self) -> int:
        return self.rh["serve"]["pid"]

    @property
    def firmware_delay(self) -> float:
        return float(self.info.get("firmware_delay") or 0.0)

    @property
    def images(self) -> dict[str, dict]:
        return self.rh["images"]

    @property
    def names(self) -> list[str]:
        return [n["name"] for n in self.info["nodes"]]

    def password(self, who: str = TENANT_USER) -> str:
        key = "tenant" if who == TENANT_USER else "admin"
        return Path(self.rh[key]["password_file"]).read_text().strip()

    @property
    def lab(self):
        """The phase-1 :class:`rhaas.lab.Lab` (VM labs only)."""
        if self.simulated:
            raise LabError("a SIMULATED lab has no VMs")
        from .lab import Lab

        return Lab(self.dir)

    @property
    def nodes(self):
        return self.lab.nodes

    def node(self, name: str):
        return self.lab.node(name)

    # -- actions -------------------------------------------------------------------
    def root(self, *args, **kw) -> subprocess.CompletedProcess:
        """Run ``rhaas ARGS`` in the root instance."""
        return run_rhaas(self.root_home, *args, **kw)

    def derive(self, home: str | os.PathLike, user: str = TENANT_USER, project: str = PROJECT,
               password: str | None = None, url: str | None = None) -> Path:
        """A derived instance in ``home`` leasing from this lab's serve (or ``url``)."""
        home = Path(home).resolve()
        if home.exists():
            shutil.rmtree(home)
        home.mkdir(parents=True)
        pw = password if password is not None else self.password(user)
        run_rhaas(home, "init", "--upstream", url or self.url, "--project", project, "--user", user,
                  env={"RHAAS_UPSTREAM_PASSWORD": pw})
        run_rhaas(home, "config", "set", "ssh-key", self.client_key)
        run_rhaas(home, "config", "set", "timeout", f"{float(self.rh.get('timeout', 120.0)):g}")
        # the root kexecs a node into its standby image (with the tenant's keys) before it
        # answers a lease: give that the time a kexec may take
        run_rhaas(home, "config", "set", "upstream-timeout", f"{float(self.rh.get('timeout', 120.0)) + 60:g}")
        blob = self.rh.get("blob")
        if blob:  # should it kexec the VMs over SSH itself, they pull from it as from the root
            from .rootinstance import set_blob

            set_blob(home, blob["listen"], blob["url"])
        return home

    def add_image(self, home: str | os.PathLike, name: str = "second") -> None:
        img = self.images[name]
        run_rhaas(home, "image", "add", name, "--kernel", img["kernel"], "--initrd", img["initrd"],
                  "--append", img["append"])

    def running(self) -> dict[str, int]:
        return running_pids(self.dir)

    def down(self) -> list[int]:
        from .stack import down

        return down(self.dir)


def describe(stack: LabStack) -> list[str]:
    """The lines ``rhaas lab up`` prints: where everything is, how to derive from it."""
    d, rh, info = stack.dir, stack.rh, stack.info
    exe = rhaas_exe()
    sim = stack.simulated
    lines = []
    if sim:
        lines.append(f"*** {SIM_LABEL} LAB: nodes are simulated by the asyncssh farm, not real machines ***")
    kind = "simulated node(s)" if sim else "QEMU VM(s)"
    fw = "" if sim else f", firmware delay {stack.firmware_delay:g} s"
    lines.append(f"lab up in {d}: {len(stack.names)} {kind}{fw}")
    lines.append("")
    lines.append(f"  {'node':10} {'ssh':28} {'bmc (rmcpplus, cipher 3)':28} mac")
    for nd in info["nodes"]:
        ssh = nd.get("ssh") or f"root@{nd.get('ssh_host')}:{nd.get('ssh_port')}"
        ipmi = nd.get("ipmi")
        bmc = f"{ipmi['user']}@{ipmi['host']}:{ipmi['port']}" if ipmi else "(none)"
        lines.append(f"  {nd['name']:10} {ssh:28} {bmc:28} {nd.get('mac', '')}" + (f"  [{SIM_LABEL}]" if sim else ""))
    lines += [
        "",
        f"  root instance   RHAAS_HOME={rh['home']}",
        f"  serve           {rh['url']}  (pid {rh['serve']['pid']}, log {rh['serve']['log']})"
        + (f"  [{SIM_LABEL}]" if sim else ""),
        f"  project         {rh['project']}",
        f"  users           {ADMIN_USER} (admin; password in {rh['admin']['password_file']})",
        f"                  {TENANT_USER} (project {rh['project']}; password in {rh['tenant']['password_file']})",
        f"  images          standby (the standby image), second   append: {APPEND!r}",
    ]
    blob = rh.get("blob")
    if blob:
        lines.append(f"  image origin    a kexec run serves on {blob['listen']} (blob-listen); the VMs pull from "
                     f"{blob['url']} (blob-url)")
    lines += [
        f"  client key      {rh['client_key']}",
        f"  lab.json        {d / LAB_JSON}",
        "",
        "Point a derived rhaas at it (in a fresh RHAAS_HOME):",
        "  export RHAAS_HOME=$(mktemp -d)",
        (f"  RHAAS_UPSTREAM_PASSWORD=$(cat {rh['tenant']['password_file']}) {exe} init --upstream {rh['url']}"
        f" --project {rh['project']} --user {TENANT_USER}"),
        f"  {exe} config set ssh-key {rh['client_key']}",
        *([f"  {exe} config set blob-listen {rh['blob']['listen']}   # if it kexecs the VMs over SSH itself",
           f"  {exe} config set blob-url {rh['blob']['url']}"] if rh.get("blob") else []),
        (f"  {exe} config set upstream-timeout {float(rh.get('timeout', 120.0)) + 60:g}"
        "   # the root kexecs each node into its standby image before a lease answers"),
        f"  {exe} lease {len(stack.names)}",
        (f"  {exe} image add second --kernel {rh['images']['second']['kernel']} "
        f"--initrd {rh['images']['second']['initrd']} --append '{APPEND}'"),
        f"  {exe} kexec {stack.names[0]} --image second",
        "",
        f"Stop it with: {exe} lab down --dir {d}",
    ]
    return lines
