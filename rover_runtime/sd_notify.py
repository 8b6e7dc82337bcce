"""systemd's notify protocol (sd_notify(3)) spoken directly: one datagram per message to $NOTIFY_SOCKET.

Used with `Type=notify` and `WatchdogSec=`: READY=1 once the runtime drives, WATCHDOG=1 pings at half the
watchdog interval ($WATCHDOG_USEC) only while the loop is healthy, STATUS= lines for `systemctl status`,
STOPPING=1 on the way out. Without $NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET") or None
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                self.watchdog_interval_s = int(usec) / 1e6
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not an integer; watchdog pings disabled", usec)
        self._socket: socket.socket | None = None
        self._last_ping = float("-inf")
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send one message; False when it cannot be delivered (logged once until a send succeeds)."""
        if self._address is None:
            return False
        address = self._address
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode(), address)
        except OSError as exc:
            if not self._failing:
                log.warning("sd_notify to %s failed: %s", self._address, exc)
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self, now: float, healthy: bool) -> bool:
        """Ping at half the watchdog interval, only when `healthy`; returns True when a ping was sent."""
        if self.watchdog_interval_s is None or not healthy:
            return False
        if now - self._last_ping < self.watchdog_interval_s / 2:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
