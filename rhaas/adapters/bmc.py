"""The BMC adapter: power and boot device of one node over IPMI-over-LAN (python-ipmi).

This module owns exactly one protocol. It knows nothing of the inventory, of upstreams or
of the command line; :mod:`rhaas.core.power` decides which node goes through here.

Every public call opens a fresh session, does its work and closes the session again
(``with ipmi:``), with python-ipmi's keep-alive thread disabled, so nothing lingers between
calls and many BMCs can be driven from a thread pool. Each call is bounded twice: by the
per-message socket timeout python-ipmi applies (at most ``MESSAGE_TIMEOUT``) and by a
watchdog around the whole call, so a BMC that answers slowly or stops answering half-way
still fails within ``timeout`` seconds.

python-ipmi is imported inside the methods: importing it costs about 90 ms, which
``rhaas --help`` and tab completion should not pay.

Failures are raised as :class:`BMCError`, one line, naming the BMC as ``host:port`` and the
user. The password never appears in a message or a log record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from rhaas.errors import RhaasError

log = logging.getLogger("rhaas.bmc")

T = TypeVar("T")

# python-ipmi waits this long for each answer (it defaults to 2 s, too); a silent BMC is
# therefore detected by the first RMCP ping after this many seconds.
MESSAGE_TIMEOUT = 2.0

BOOT_DEVICES = ("pxe", "disk", "none")

# interface names rhaas accepts -> python-ipmi's. The 'ipmitool' interface is not offered:
# it puts the password on a command line and logs that line at DEBUG.
_INTERFACES = {"rmcpplus": "rmcpplus", "lanplus": "rmcpplus", "rmcp": "rmcp", "lan": "rmcp"}

# RMCP+ message status codes that mean "this user may not log in" (IPMI 2.0 table 13-15)
_MSC_BAD_USER = {0x0D, 0x12}  # unauthorized name, invalid name length


class BMCError(RhaasError):
    """A BMC refused, failed or did not answer. The message is one line without secrets."""

    def __init__(self, msg: str, kind: str = "failed"):
        super().__init__(msg)
        # "credentials", "unreachable", "timeout", "rejected", "protocol", "config" or "failed"
        self.kind = kind


class IPMIBmc:
    """One BMC reached over IPMI 2.0 (RMCP+, the default) or IPMI 1.5 (RMCP)."""

    def __init__(
        self,
        host: str,
        port: int = 623,
        user: str = "",
        password: str = "",
        interface: str = "rmcpplus",
        cipher_suite: int | None = 3,
        timeout: float = 10.0,
    ):
        self.host = str(host)
        self.port = int(port)
        self.user = user or ""
        self._password = password or ""
        iface = (interface or "rmcpplus").lower()
        if iface not in _INTERFACES:
            raise BMCError(
                f"BMC {self.address}: unsupported IPMI interface {interface!r} (use rmcpplus or rmcp)",
                kind="config",
            )
        self.interface = _INTERFACES[iface]
        self.cipher_suite = int(cipher_suite) if cipher_suite not in (None, "") else 3
        self.timeout = float(timeout)

    # -- presentation ---------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:  # never the password
        return f"IPMIBmc({self.user}@{self.address}, {self.describe_interface()})"

    def describe_interface(self) -> str:
        if self.interface == "rmcpplus":
            return f"rmcpplus, cipher suite {self.cipher_suite}"
        return "rmcp"

    # -- public operations ----------------------------------------------------------------
    def power_status(self) -> str:
        """``"on"`` or ``"off"``."""
        return self._call("read the power status", lambda ipmi: _power_word(ipmi))

    def power_on(self) -> None:
        self._call("power up", lambda ipmi: ipmi.chassis_control_power_up())

    def power_off(self) -> None:
        self._call("power down", lambda ipmi: ipmi.chassis_control_power_down())

    def power_cycle(self) -> None:
        """Chassis power cycle; a chassis that is off is powered up instead.

        Many BMCs reject (or silently ignore) a power cycle while the chassis is off, and
        what a caller wants is "the node boots afresh", so the state is read first, in the
        same session.
        """

        def cycle(ipmi) -> None:
            if _power_word(ipmi) == "on":
                ipmi.chassis_control_power_cycle()
            else:
                ipmi.chassis_control_power_up()

        self._call("power cycle", cycle)

    def power_reset(self) -> None:
        self._call("hard reset", lambda ipmi: ipmi.chassis_control_hard_reset())

    def set_bootdev(self, dev: str) -> None:
        """Persistently boot from ``pxe``, ``disk`` or ``none`` (the BIOS's own order)."""
        if dev not in BOOT_DEVICES:
            raise BMCError(
                f"unknown boot device {dev!r}: use one of {', '.join(BOOT_DEVICES)}", kind="config"
            )

        def set_dev(ipmi) -> None:
            from pyipmi.chassis import BootDevice

            wanted = {"pxe": BootDevice.PXE, "disk": BootDevice.DEFAULT_HDD, "none": BootDevice.NO_OVERRIDE}
            ipmi.set_boot_options(wanted[dev], "legacy", True)

        self._call(f"set boot device {dev}", set_dev)

    def get_bootdev(self) -> str:
        """The boot device the BMC reports: ``pxe``, ``disk``, ``none`` or its own name."""

        def get_dev(ipmi) -> str:
            from pyipmi.chassis import BootDevice

            try:
                dev = ipmi.get_boot_device()
            except KeyError:  # a reserved device code
                return "unknown"
            names = {BootDevice.PXE: "pxe", BootDevice.DEFAULT_HDD: "disk", BootDevice.NO_OVERRIDE: "none"}
            return names.get(dev, str(getattr(dev, "name", dev)).lower())

        return self._call("read the boot device", get_dev)

    # -- machinery ------------------------------------------------------------------------
    def _connection(self):
        import pyipmi
        import pyipmi.interfaces

        kwargs = {"slave_address": 0x81, "host_target_address": 0x20, "keep_alive_interval": 0}
        if self.interface == "rmcpplus":
            kwargs["cipher_suite"] = self.cipher_suite
        intf = pyipmi.interfaces.create_interface(self.interface, **kwargs)

        # The socket only exists once the interface is opened (python-ipmi then sets 2 s);
        # narrow it right after, so every wait of this call is bounded by our own figure.
        message_timeout = min(MESSAGE_TIMEOUT, self.timeout)
        plain_open = intf.open

        def open_bounded() -> None:
            plain_open()
            intf.set_timeout(message_timeout)

        intf.open = open_bounded
        ipmi = pyipmi.create_connection(intf)
        ipmi.session.set_session_type_rmcp(self.host, port=self.port)
        ipmi.session.set_auth_type_user(self.user, self._password)
        ipmi.target = pyipmi.Target(ipmb_address=0x20)
        return ipmi

    def _call(self, what: str, work: Callable[[object], T]) -> T:
        """Open a session, run ``work(ipmi)``, close it; bounded by ``self.timeout``."""
        outcome: dict = {}
        phase = ["connect"]

        def run() -> None:
            ipmi = None
            try:
                ipmi = self._connection()
                with ipmi:
                    phase[0] = "command"
                    outcome["value"] = work(ipmi)
                    phase[0] = "close"
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
                if phase[0] == "close":
                    # the work is done; a BMC that fumbles the Close Session changes nothing
                    log.debug("BMC %s: closing the session failed: %s", self.address, type(exc).__name__)
                else:
                    outcome["error"] = exc
            finally:
                # `with` only closes what it opened; a failed session setup leaves the socket
                if ipmi is not None:
                    try:
                        ipmi.interface.close()
                    except Exception:  # noqa: BLE001, S110 - the socket may already be gone
                        pass

        started = time.monotonic()
        log.debug("BMC %s@%s: %s", self.user, self.address, what)
        worker = threading.Thread(target=run, name=f"bmc-{self.address}", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            # The worker keeps its own socket timeouts and will end by itself shortly.
            raise BMCError(
                f"BMC {self.address} did not answer within {self.timeout:g} s ({what})", kind="timeout"
            )
        if "error" in outcome:
            err = self._translate(outcome["error"], what, phase[0])
            log.debug("BMC %s: %s failed after %.2f s: %s", self.address, what, time.monotonic() - started, err)
            raise err from None
        return outcome.get("value")

    def _translate(self, exc: BaseException, what: str, phase: str) -> BMCError:
        """python-ipmi's exception for one failure -> one rhaas line."""
        try:
            from pyipmi import errors as e
        except ImportError:  # pragma: no cover - python-ipmi is a dependency
            return BMCError(self._clean(f"BMC {self.address}: {what} failed: {exc}"))

        where = f"BMC {self.address}"
        if isinstance(exc, BMCError):
            return exc
        if isinstance(exc, e.AuthenticationError):
            return BMCError(f"{where} rejected the credentials for user {self.user}", kind="credentials")
        if isinstance(exc, e.MessageStatusCodeError):
            if exc.msc in _MSC_BAD_USER:
                return BMCError(f"{where} rejected the credentials for user {self.user}", kind="credentials")
            return BMCError(
                f"{where} refused the session: {exc.msc_desc} (status 0x{exc.msc:02x})", kind="rejected"
            )
        if isinstance(exc, e.IpmiLongPasswordError):
            return BMCError(f"{where}: the password of user {self.user} is longer than IPMI allows", kind="config")
        if isinstance(exc, e.IpmiConnectionError):
            text = str(exc)
            why = "connection refused" if "refused" in text else "no answer to RMCP ping"
            return BMCError(f"{where} did not answer ({why})", kind="unreachable")
        if isinstance(exc, e.CompletionCodeError):
            if phase == "connect":
                # IPMI 1.5 reports a bad user name as a completion code on session setup
                if exc.cc in (0x81, 0x82, 0x86):
                    return BMCError(f"{where} rejected the credentials for user {self.user}", kind="credentials")
                return BMCError(
                    f"{where} refused the session: completion code 0x{exc.cc:02x} ({exc.cc_desc})",
                    kind="rejected",
                )
            return BMCError(
                f"{where} rejected {what}: completion code 0x{exc.cc:02x} ({exc.cc_desc})", kind="rejected"
            )
        if isinstance(exc, (e.RetryError, e.IpmiTimeoutError, TimeoutError)):
            if phase == "connect" and self.interface == "rmcp":
                # IPMI 1.5 BMCs drop an activation with a wrong password without a word
                return BMCError(
                    f"{where} did not answer the session setup for user {self.user} "
                    "(wrong password, or the BMC went silent)",
                    kind="timeout",
                )
            return BMCError(f"{where} did not answer ({what}, timed out)", kind="timeout")
        if isinstance(exc, e.NotSupportedError):
            return BMCError(self._clean(f"{where}: not supported: {exc}"), kind="protocol")
        if isinstance(exc, (e.DecodingError, e.EncodingError)):
            return BMCError(self._clean(f"{where} sent an answer rhaas cannot read ({what}): {exc}"), kind="protocol")
        if isinstance(exc, ConnectionRefusedError):
            return BMCError(f"{where} did not answer (connection refused)", kind="unreachable")
        if isinstance(exc, OSError):
            reason = exc.strerror or type(exc).__name__
            return BMCError(self._clean(f"{where} did not answer ({reason})"), kind="unreachable")
        return BMCError(self._clean(f"{where}: {what} failed: {type(exc).__name__}: {exc}"))

    def _clean(self, text: str) -> str:
        """Last guard: a message built from a library's text must not carry the password."""
        text = " ".join(str(text).split())
        if self._password and len(self._password) >= 3:
            text = text.replace(self._password, "***")
        return text


def _power_word(ipmi) -> str:
    return "on" if ipmi.get_chassis_status().power_on else "off"


__all__ = ["BOOT_DEVICES", "BMCError", "IPMIBmc"]
