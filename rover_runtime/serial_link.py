"""The runtime's serial link to the car's Arduino (protocol: docs/serial-protocol.md).

`SerialLink` never raises for I/O problems: a missing or vanished device marks the link disconnected and is
counted; reconnect attempts (rate-limited by `reconnect_interval_s`) happen inside `send_command` and `poll`,
so a control loop only has to keep calling them. Values are clamped to the configured limits before they
are sent; `send_command` returns what was written, or None when nothing was. Neutral is sent on (re)connect
and on close; if the link dies, the firmware's own watchdog puts the car in neutral within its timeout.

After every (re)connect the link asks the firmware who it is (`P`, repeated every 250 ms while the board
boots) and keeps the answer in `firmware`. `faults()` says, in words, why the link cannot be trusted to
drive the car right now: disconnected, firmware not identified or speaking another protocol version, no
acknowledgement for longer than `max_ack_age_s`, or the firmware's own failsafe engaged.

Not thread-safe by design beyond a lock around each public call: one control loop owns the link.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import serial

from rover_runtime import protocol
from rover_runtime.protocol import RcStatus, Telemetry, Version

__all__ = ["SerialConfig", "SerialLink", "SerialStats", "Telemetry"]

log = logging.getLogger(__name__)

_READ_CHUNK = 4096
_WRITE_TIMEOUT_S = 0.02  # a stalled peer must not stall the control loop for long
_PING_RETRY_S = 0.25  # an Arduino that resets on open misses the first pings while it boots
_SENT_HISTORY = 256  # write times kept for matching acks (8 s of commands at 30 Hz)


@dataclass(frozen=True)
class SerialConfig:
    """Where the Arduino is and how to talk to it.

    `steering_limits` and `throttle_limits` are normalized [-1, 1] bounds applied before sending (the
    defaults keep throttle at half power); the firmware applies its own microsecond limits on top.
    """

    port: str = "/dev/rover-arduino"
    baudrate: int = 115200
    heartbeat_interval_s: float = 0.1
    reconnect_interval_s: float = 1.0
    steering_limits: tuple[float, float] = (-1.0, 1.0)
    throttle_limits: tuple[float, float] = (-0.5, 0.5)
    max_ack_age_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("steering_limits", "throttle_limits"):
            low, high = getattr(self, name)
            if not -1.0 <= low <= high <= 1.0:
                raise ValueError(f"serial.{name} must satisfy -1 <= low <= high <= 1, got ({low}, {high})")
        if self.baudrate <= 0:
            raise ValueError(f"serial.baudrate must be positive, got {self.baudrate}")
        if self.heartbeat_interval_s <= 0 or self.reconnect_interval_s <= 0 or self.max_ack_age_s <= 0:
            raise ValueError(
                "serial.heartbeat_interval_s, serial.reconnect_interval_s and serial.max_ack_age_s must be "
                "positive"
            )


@dataclass
class SerialStats:
    """Counters since the link was created (monotonic; never reset)."""

    commands_sent: int = 0
    replies_ok: int = 0  # valid lines from the firmware (acks, telemetry, version)
    garbage_lines: int = 0  # lines from the firmware that failed framing, checksum or parsing
    write_errors: int = 0
    reconnects: int = 0  # connections made by the automatic reconnect (not by an explicit open())
    clamped: int = 0  # commands where a value was clamped (or non-finite and replaced by 0)
    connected: bool = False
    last_telemetry: Telemetry | None = None
    heartbeats_sent: int = 0
    disconnects: int = 0
    last_ack: protocol.Ack | None = None
    last_rx_monotonic: float | None = None  # time.monotonic() of the last valid line from the firmware
    firmware_failsafe_seen: int = 0  # acks or telemetry reporting the firmware's failsafe active
    last_rc: RcStatus | None = None  # the receiver's mode and pulses, wheel speed and battery (R line)
    # When the newest acknowledged command or heartbeat was written (time.monotonic()): the firmware has
    # confirmed everything up to then. Its age is how stale the firmware's confirmation is.
    last_ack_monotonic: float | None = None
    firmware: str | None = None  # the identified firmware, e.g. "rover_car 2.0.0 (protocol 2; receiver)"
    firmware_version: str | None = None  # its version alone, e.g. "2.0.0" or "2.0.0+127a292a"
    unsent_commands: int = 0  # commands that could not be written (port closed, write failed or timed out)


def _clamp(value: float, limits: tuple[float, float]) -> tuple[float, bool]:
    if not math.isfinite(value):
        return 0.0, True
    low, high = limits
    clamped = min(max(value, low), high)
    return clamped, clamped != value


class SerialLink:
    """Sends commands and heartbeats to the firmware and parses its replies; survives unplugging."""

    def __init__(self, config: SerialConfig) -> None:
        self.config = config
        self._stats = SerialStats()
        self._port: serial.Serial | None = None
        self._lock = threading.RLock()
        self._seq = 0
        self._rx = bytearray()
        self._rx_overflow = False
        self._last_write = -math.inf
        self._last_attempt = -math.inf
        self._ever_connected = False
        self._warned_missing = False
        self._firmware: Version | None = None
        self._sent_at: dict[int, float] = {}  # seq -> when it was written, for the recent C and H lines
        self._last_ping = -math.inf
        self._connected_at = -math.inf
        self._status_failsafe = False  # the newest ack or telemetry says the firmware's failsafe is on

    # ---- public API ----
    @property
    def stats(self) -> SerialStats:
        return self._stats

    def open(self) -> bool:
        """Opens the port (no-op when connected). Never raises for I/O problems; True when connected."""
        with self._lock:
            return self._connect(automatic=False)

    @property
    def firmware(self) -> Version | None:
        """The firmware's answer to the last ping on the current connection (None: not identified yet)."""
        return self._firmware

    def send_command(self, steering: float, throttle: float) -> tuple[float, float] | None:
        """Clamps and sends one command; returns the values written (after clamping and rounding), or None
        when nothing was written (no port, write failed or timed out)."""
        with self._lock:
            steer, steer_clamped = _clamp(steering, self.config.steering_limits)
            thr, thr_clamped = _clamp(throttle, self.config.throttle_limits)
            if steer_clamped or thr_clamped:
                self._stats.clamped += 1
            steer_milli, thr_milli = protocol.to_milli(steer), protocol.to_milli(thr)
            self._maybe_reconnect()
            if not self._write(protocol.Command(self._next_seq(), steer_milli, thr_milli)):
                self._stats.unsent_commands += 1
                return None
            self._stats.commands_sent += 1
            return steer_milli / protocol.MILLI_MAX, thr_milli / protocol.MILLI_MAX

    def send_neutral(self) -> bool:
        """Sends neutral (0, 0: never clamped); True when it was written."""
        with self._lock:
            self._maybe_reconnect()
            if not self._write(protocol.Command(self._next_seq(), 0, 0)):
                self._stats.unsent_commands += 1
                return False
            self._stats.commands_sent += 1
            return True

    def poll(self) -> None:
        """Non-blocking: reads what has arrived, parses it, sends a heartbeat if one is due and, until the
        firmware has answered on this connection, a ping every 250 ms."""
        with self._lock:
            self._maybe_reconnect()
            self._read_available()
            self._maybe_ping()
            due = time.monotonic() - self._last_write >= self.config.heartbeat_interval_s
            if self._port is not None and due and self._write(protocol.Heartbeat(self._next_seq())):
                self._stats.heartbeats_sent += 1

    def ping(self, timeout_s: float = 1.0) -> Version | None:
        """Opens the port if needed and waits up to `timeout_s` for the firmware to identify itself (an
        Arduino that resets on open answers after about 1.5 s); the firmware's version line, or None."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if not self._connect(automatic=False):
                return None
            while time.monotonic() < deadline and self._port is not None:
                self._maybe_ping()
                self._read_available()
                if self._firmware is not None:
                    return self._firmware
                time.sleep(0.005)
            return self._firmware

    def faults(self, now: float | None = None) -> list[str]:
        """Why the link cannot be trusted to drive the car now, in words ([] when it can)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._port is None:
                return [f"serial: {self.config.port} not connected"]
            firmware = self._firmware
            if firmware is None:
                waited = now - self._connected_at
                return [f"serial: the firmware has not identified itself ({waited:.1f}s since connecting)"]
            if firmware.protocol != protocol.PROTOCOL_VERSION:
                return [
                    f"serial: protocol mismatch: the firmware ({firmware.describe()}) speaks protocol "
                    f"{firmware.protocol}, this runtime {protocol.PROTOCOL_VERSION}"
                ]
            faults = []
            last_ack = self._stats.last_ack_monotonic
            age = now - max(last_ack if last_ack is not None else -math.inf, self._connected_at)
            if age >= self.config.max_ack_age_s:
                faults.append(
                    f"serial: no acknowledgement from the firmware for {age:.2f}s "
                    f"(max {self.config.max_ack_age_s:g}s)"
                )
            if self._status_failsafe:
                faults.append("firmware failsafe: the Arduino stopped applying the Pi's commands (timeout)")
            return faults

    def close(self) -> None:
        """Sends neutral (when connected) and closes the port."""
        with self._lock:
            if self._port is not None:
                # No flush(): tcdrain could block for good on a peer that stopped reading; closing a real
                # serial port drains its output anyway.
                self._write(protocol.Command(self._next_seq(), 0, 0))
            self._disconnect(reason=None)

    # ---- internals ----
    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = protocol.next_seq(seq)
        return seq

    def _maybe_reconnect(self) -> None:
        if self._port is not None:
            self._check_same_device()
            return
        if time.monotonic() - self._last_attempt >= self.config.reconnect_interval_s:
            self._connect(automatic=True)

    def _check_same_device(self) -> None:
        """Notices a device replaced at the same path (re-plugged, socat restarted) while our fd looks ok."""
        if self._port is None or time.monotonic() - self._last_attempt < self.config.reconnect_interval_s:
            return
        self._last_attempt = time.monotonic()
        try:
            same = Path(self.config.port).stat().st_rdev == os.fstat(self._port.fileno()).st_rdev
        except OSError:
            same = False
        if not same:
            self._disconnect(reason="the device at the port path changed or vanished")

    def _connect(self, *, automatic: bool) -> bool:
        if self._port is not None:
            return True
        self._last_attempt = time.monotonic()
        try:
            port = serial.Serial(
                self.config.port, self.config.baudrate, timeout=0, write_timeout=_WRITE_TIMEOUT_S
            )
            port.reset_input_buffer()
        except (serial.SerialException, OSError, ValueError) as exc:
            if not self._warned_missing:
                log.warning("serial port %s unavailable: %s", self.config.port, exc)
                self._warned_missing = True
            return False
        self._port = port
        self._rx.clear()
        self._rx_overflow = False
        self._warned_missing = False
        self._firmware = None  # a replugged board may carry other firmware: identify it again
        self._sent_at.clear()
        self._stats.firmware = None
        self._stats.firmware_version = None
        self._last_ping = -math.inf
        self._connected_at = time.monotonic()
        self._status_failsafe = False
        self._stats.connected = True
        if automatic or self._ever_connected:
            self._stats.reconnects += 1
        self._ever_connected = True
        log.info("serial port %s connected", self.config.port)
        self._write(protocol.Command(self._next_seq(), 0, 0))  # start from a known, neutral state
        return self._port is not None

    def _maybe_ping(self) -> None:
        if self._port is None or self._firmware is not None:
            return
        if time.monotonic() - self._last_ping >= _PING_RETRY_S:
            self._last_ping = time.monotonic()
            self._write(protocol.Ping(self._next_seq()))

    def _disconnect(self, reason: str | None) -> None:
        if self._port is None:
            return
        if reason is not None:
            log.warning("serial port %s lost: %s", self.config.port, reason)
            self._stats.disconnects += 1
        with contextlib.suppress(serial.SerialException, OSError):
            self._port.close()
        self._port = None
        self._stats.connected = False
        self._last_attempt = time.monotonic()

    def _write(self, message: protocol.Message) -> bool:
        if self._port is None:
            return False
        try:
            self._port.write(protocol.encode(message))
        except serial.SerialTimeoutException:
            self._stats.write_errors += 1  # the other end is not draining; keep the port, drop the line
            with contextlib.suppress(serial.SerialException, OSError):
                self._port.reset_output_buffer()
            return False
        except (serial.SerialException, OSError) as exc:
            self._stats.write_errors += 1
            self._disconnect(reason=f"write failed: {exc}")
            return False
        self._last_write = time.monotonic()
        if isinstance(message, protocol.Command | protocol.Heartbeat):
            self._sent_at[message.seq] = self._last_write
            if len(self._sent_at) > _SENT_HISTORY:
                del self._sent_at[next(iter(self._sent_at))]
        return True

    def _read_available(self) -> None:
        if self._port is None:
            return
        try:
            data = self._port.read(_READ_CHUNK)
        except (serial.SerialException, OSError) as exc:
            self._disconnect(reason=f"read failed: {exc}")
            return
        if data:
            self._consume(data)

    def _consume(self, data: bytes) -> None:
        self._rx.extend(data)
        while (newline := self._rx.find(b"\n")) >= 0:
            line = bytes(self._rx[:newline])
            del self._rx[: newline + 1]
            if self._rx_overflow:
                self._rx_overflow = False
                self._stats.garbage_lines += 1
                continue
            self._handle_line(line)
        if len(self._rx) > protocol.MAX_LINE_LENGTH + 1:
            self._rx.clear()
            self._rx_overflow = True

    def _handle_line(self, line: bytes) -> None:
        if line in (b"", b"\r"):
            return
        try:
            message = protocol.parse_line(line)
        except protocol.ProtocolError as exc:
            self._stats.garbage_lines += 1
            log.debug("garbage from firmware %r: %s", line[:80], exc)
            return
        now = time.monotonic()
        if isinstance(message, protocol.Ack | protocol.Telemetry):
            if isinstance(message, protocol.Ack):
                self._stats.last_ack = message
                sent = self._sent_at.pop(message.seq, None)
                if sent is not None:  # an ack of something this connection did not send does not count
                    self._stats.last_ack_monotonic = max(sent, self._stats.last_ack_monotonic or sent)
            else:
                self._stats.last_telemetry = message
            self._status_failsafe = message.failsafe
            if message.failsafe:
                self._stats.firmware_failsafe_seen += 1
        elif isinstance(message, protocol.RcStatus):
            self._stats.last_rc = message
        elif isinstance(message, protocol.Version):
            if self._firmware is None:
                self._firmware = message
                self._stats.firmware = message.describe()
                self._stats.firmware_version = message.version
                log.info("firmware on %s: %s", self.config.port, message.describe())
                if message.protocol != protocol.PROTOCOL_VERSION:
                    log.error(
                        "firmware on %s speaks protocol %d, this runtime %d: it will not drive the car",
                        self.config.port,
                        message.protocol,
                        protocol.PROTOCOL_VERSION,
                    )
        else:
            self._stats.garbage_lines += 1  # the firmware never sends C/H/P
            return
        self._stats.replies_ok += 1
        self._stats.last_rx_monotonic = now
