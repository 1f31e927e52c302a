"""Real BMCs for tests: Debian's ``ipmi_sim`` on loopback UDP ports, one process per node.

Each BMC gets its own directory with a generated ``lan.conf`` (user ``admin`` with a random
password), the emulator command file, ipmi_sim's state directory and a ``chassis_control``
script that keeps the chassis state in plain files:

* ``power`` holds ``0`` or ``1``; ``boot`` the device ipmi_sim last set (``pxe``,
  ``default`` for disk, ``none``, ...);
* ``calls.log`` has one line per script call: ``<epoch seconds> <arguments>``, e.g.
  ``1700000000.12 set power 0``. A power cycle shows as ``set power 0``, ``get power``,
  ``set power 1`` about a second apart (ipmi_sim drives the cycle itself).

Use from a test module::

    from ipmi_fixtures import ipmi_sim_factory, ipmi_bmc, requires_ipmi_sim  # noqa: F401

    @requires_ipmi_sim
    def test_x(ipmi_sim_factory):
        bmc = ipmi_sim_factory("node1")   # started and answering
        bmc.host, bmc.port, bmc.user, bmc.password, bmc.dir
        bmc.ipmi_doc()                    # the node["ipmi"] dict for the inventory
        bmc.power(), bmc.boot(), bmc.calls(), bmc.wait_for_call("set power 1")

Outside a fixture, ``start_bmc(name, directory)`` returns the same :class:`SimBMC`; call
``bmc.stop()`` yourself. Processes are stopped by their own PID only.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

IPMI_SIM = shutil.which("ipmi_sim")

requires_ipmi_sim = pytest.mark.skipif(
    IPMI_SIM is None, reason="ipmi_sim is not on PATH (apt-get install openipmi)"
)

EMU_FILE = """\
mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""

# The chassis_control contract of ipmi_sim (lab notes §9), state only: no machine behind it.
CHASSIS_SCRIPT = """\
#!/bin/sh
# chassis_control for ipmi_sim: DIR get PARAM...  |  DIR set PARAM VALUE [PARAM VALUE...]
dir="$1"; shift
# the call is logged when the script ends, so a logged "set power 1" means the state is written
line="$(date +%s.%N) $*"
trap 'echo "$line" >> "$dir/calls.log"' EXIT
op="$1"; shift
case "$op" in
get)
    for p in "$@"; do
        case "$p" in
        power) echo "power:$(cat "$dir/power")" ;;
        boot) echo "boot:$(cat "$dir/boot")" ;;
        *) echo "unknown parameter $p"; exit 1 ;;
        esac
    done ;;
set)
    while [ $# -ge 2 ]; do
        case "$1" in
        power) echo "$2" > "$dir/power.tmp" && mv "$dir/power.tmp" "$dir/power" ;;
        boot) echo "$2" > "$dir/boot.tmp" && mv "$dir/boot.tmp" "$dir/boot" ;;
        reset|shutdown|identify) ;;  # logged above; power state unchanged
        *) echo "unknown parameter $1"; exit 1 ;;
        esac
        shift 2
    done ;;
*) exit 1 ;;
esac
exit 0
"""

LAN_CONF = """\
name "{name}"
set_working_mc 0x20
  startlan 1
    addr {host} {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid {guid}
  endlan
  chassis_control "{chassis}"
  user 1 true  ""      "anonymous-unused" user  10 none md2 md5 straight
  user 2 true  "{user}" "{password}" admin 10 none md2 md5 straight
"""


@dataclass
class SimBMC:
    """One running ipmi_sim and the files its chassis_control script keeps."""

    name: str
    host: str
    port: int
    user: str
    password: str
    dir: Path  # power, boot, calls.log, lan.conf, ipmi_sim.log live here
    pid: int
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    # -- the chassis state, as the script wrote it ------------------------------------------
    @property
    def power_file(self) -> Path:
        return self.dir / "power"

    @property
    def boot_file(self) -> Path:
        return self.dir / "boot"

    @property
    def calls_file(self) -> Path:
        return self.dir / "calls.log"

    def power(self) -> str:
        """``"on"`` or ``"off"``."""
        return "on" if self.power_file.read_text().strip() == "1" else "off"

    def boot(self) -> str:
        """The script's boot word: ``pxe``, ``default`` (disk), ``none``, ``cdrom``, ``bios``."""
        return self.boot_file.read_text().strip()

    def calls(self) -> list[str]:
        """Script calls so far, oldest first, without the time stamps."""
        return [c for _, c in self.timed_calls()]

    def timed_calls(self) -> list[tuple[float, str]]:
        if not self.calls_file.exists():
            return []
        out = []
        for line in self.calls_file.read_text().splitlines():
            stamp, _, call = line.partition(" ")
            out.append((float(stamp), call))
        return out

    def actions(self) -> list[str]:
        """Only the ``set ...`` calls: what changed the chassis."""
        return [c for c in self.calls() if c.startswith("set ")]

    def set_power(self, on: bool) -> None:
        """Change the chassis state behind the BMC's back (test set-up)."""
        self.power_file.write_text("1\n" if on else "0\n")

    def clear_calls(self) -> None:
        self.calls_file.write_text("")

    def wait_for_call(self, call: str, timeout: float = 5.0, after: int = 0) -> int:
        """Wait until ``call`` appears at index >= ``after``; return its index."""
        deadline = time.monotonic() + timeout
        while True:
            calls = self.calls()
            for i in range(after, len(calls)):
                if calls[i] == call:
                    return i
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {call!r} in chassis calls {calls!r}")
            time.sleep(0.05)

    # -- for the inventory ----------------------------------------------------------------------
    def ipmi_doc(self, **over) -> dict:
        doc = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "interface": "rmcpplus",
            "cipher_suite": 3,
        }
        doc.update(over)
        return doc

    # -- lifecycle --------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# RMCP header (version 6, seq 0xff, class ASF) + ASF presence ping (IANA 4542, type 0x80)
_ASF_PING = bytes([0x06, 0x00, 0xFF, 0x06, 0x00, 0x00, 0x11, 0xBE, 0x80, 0x00, 0x00, 0x00])


def _answers_ping(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(_ASF_PING, (host, port))
            data = s.recv(512)
        except OSError:  # timeout, or refused while ipmi_sim is still starting
            return False
        return len(data) >= 9 and data[8] == 0x40  # presence pong


def start_bmc(
    name: str,
    directory: Path | str,
    *,
    user: str = "admin",
    password: str | None = None,
    host: str = "127.0.0.1",
    power_on: bool = False,
    boot: str = "none",
    chassis_command: str | None = None,
    ready_timeout: float = 10.0,
) -> SimBMC:
    """Start one ipmi_sim BMC for node ``name`` under ``directory/name``; wait until it answers.

    ``chassis_command`` replaces the state-only script (ipmi_sim appends the operation to
    it); the ``power``/``boot``/``calls.log`` helpers then only work if your command keeps
    the same files.
    """
    if IPMI_SIM is None:
        raise RuntimeError("ipmi_sim is not on PATH")
    bmc_dir = Path(directory) / name
    state = bmc_dir / "state"
    state.mkdir(parents=True, exist_ok=True)
    password = password or secrets.token_hex(8)  # IPMI passwords are at most 20 bytes
    script = bmc_dir / "chassis-control.sh"
    script.write_text(CHASSIS_SCRIPT)
    script.chmod(0o755)
    (bmc_dir / "power").write_text("1\n" if power_on else "0\n")
    (bmc_dir / "boot").write_text(boot + "\n")
    (bmc_dir / "calls.log").write_text("")
    (bmc_dir / "bmc.emu").write_text(EMU_FILE)
    chassis = chassis_command or f"{script} {bmc_dir}"

    last_error = ""
    for _attempt in range(3):  # another process may grab the free port before ipmi_sim binds it
        port = free_udp_port(host)
        conf = bmc_dir / "lan.conf"
        conf.write_text(
            LAN_CONF.format(
                name=name, host=host, port=port, guid=secrets.token_hex(16),
                chassis=chassis, user=user, password=password,
            )
        )
        conf.chmod(0o600)
        with open(bmc_dir / "ipmi_sim.log", "ab") as logf:  # ipmi_sim keeps its own copy of the fd
            proc = subprocess.Popen(
                [IPMI_SIM, "-c", str(conf), "-f", str(bmc_dir / "bmc.emu"), "-s", str(state), "-n"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            )
        bmc = SimBMC(name, host, port, user, password, bmc_dir, proc.pid, proc)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers_ping(host, port):
                return bmc
            time.sleep(0.05)
        bmc.stop()
        last_error = (bmc_dir / "ipmi_sim.log").read_text(errors="replace")[-500:]
    raise RuntimeError(f"ipmi_sim for {name} did not come up: {last_error.strip()}")


@pytest.fixture
def ipmi_sim_factory(tmp_path_factory):
    """``start(name, **kw) -> SimBMC``; every BMC started is stopped (by PID) at teardown."""
    if IPMI_SIM is None:
        pytest.skip("ipmi_sim is not on PATH (apt-get install openipmi)")
    base = tmp_path_factory.mktemp("bmcs")
    started: list[SimBMC] = []

    def start(name: str, **kw) -> SimBMC:
        bmc = start_bmc(name, base, **kw)
        started.append(bmc)
        return bmc

    yield start
    for bmc in started:
        bmc.stop()


@pytest.fixture
def ipmi_bmc(ipmi_sim_factory) -> SimBMC:
    """One running BMC for a node named ``n1``, chassis off, boot device none."""
    return ipmi_sim_factory("n1")
