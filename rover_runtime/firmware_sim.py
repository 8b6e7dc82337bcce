"""A Python stand-in for the car's Arduino firmware (firmware/rover_car), speaking the protocol over a tty.

`FirmwareCore` is the firmware's logic with the time passed in; it mirrors
`firmware/rover_car/rover_protocol.h`, and both are checked against tests/vectors/serial_protocol.json.
`FirmwareSimulator` runs a core on a tty: an existing one (`--device`, e.g. one end of a socat pty pair) or
a pty pair it creates and links at a path (`--pty-link`). It writes its state to a JSON status file
(atomically replaced) and every output change to a JSON-lines log with monotonic and wall timestamps, so
tests can measure when the outputs went neutral.

    python -m rover_runtime.firmware_sim --pty-link /tmp/rover-arduino --status-file /tmp/fw.json \
        --log /tmp/fw.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from rover_runtime import protocol
from rover_runtime.metrics import write_json_atomic

log = logging.getLogger(__name__)

FIRMWARE_NAME = "rover_car"
FIRMWARE_VERSION = "2.0.0"
_U32 = 1 << 32
_STATUS_MIN_INTERVAL_S = 0.1  # status writes for counter-only changes are spaced at least this much
_REOPEN_INTERVAL_S = 0.05


@dataclass(frozen=True)
class FirmwareLimits:
    """The constants at the top of rover_car.ino (defaults are the sketch's)."""

    steer_min_us: int = 1000
    steer_max_us: int = 2000
    throttle_min_us: int = 1000
    throttle_max_us: int = 2000
    half_range_us: int = 500
    timeout_ms: int = 250
    telemetry_ms: int = 100
    rc_receiver: bool = False  # the sketch's RC_RECEIVER (1 there: a real car has a receiver)
    rc_timeout_ms: int = 100
    sensors: int = 0  # protocol.FEATURE_WHEEL | FEATURE_BATTERY: the sensors fitted (the sketch's #defines)
    protocol_version: int = protocol.PROTOCOL_VERSION  # another number plays an older or newer firmware


# rover_protocol.h's receiver constants
RC_MIN_US, RC_MAX_US = 800, 2200
RC_SWITCH_LOW_US, RC_SWITCH_HIGH_US = 1300, 1700
MODE_PI, MODE_MANUAL, MODE_AUTO, MODE_AUTO_NEUTRAL, MODE_RC_LOST = range(5)


class FirmwareCore:
    """The firmware's state machine: feed it bytes and ticks with a millisecond clock, get replies back."""

    def __init__(self, limits: FirmwareLimits | None = None, now_ms: int = 0) -> None:
        self.limits = limits or FirmwareLimits()
        self.steer_us = protocol.NEUTRAL_US
        self.throttle_us = protocol.NEUTRAL_US
        self.pi_steer_us = protocol.NEUTRAL_US
        self.pi_throttle_us = protocol.NEUTRAL_US
        self.failsafe = True  # the Pi's link is timed out at boot
        self.mode = MODE_PI
        self.from_rc = False
        self.last_seq: int | None = None
        self.last_valid_ms = now_ms % _U32
        self.last_telemetry_ms = now_ms % _U32
        self.rx_ok = 0
        self.rx_bad = 0
        self.rc_us = [0, 0, 0]  # steering, throttle, mode switch pulse widths (0: none yet)
        self.rc_ms = [0, 0, 0]
        self.wheel_mmps = 0
        self.battery_mv = 0
        self._buf = bytearray()
        self._overflow = False
        self.update(now_ms)

    def rc_pulse(self, channel: int, width_us: int, now_ms: int) -> None:
        """A pulse width measured on receiver channel 0 (steering), 1 (throttle) or 2 (mode switch)."""
        self.rc_us[channel] = width_us
        self.rc_ms[channel] = now_ms % _U32

    def rc_valid(self, channel: int, now_ms: int) -> bool:
        us = self.rc_us[channel]
        age = (now_ms % _U32 - self.rc_ms[channel]) % _U32
        return RC_MIN_US <= us <= RC_MAX_US and age < self.limits.rc_timeout_ms

    def rc_mode(self, now_ms: int) -> int:
        if not self.limits.rc_receiver:
            return MODE_PI
        if not all(self.rc_valid(ch, now_ms) for ch in range(3)):
            return MODE_RC_LOST
        switch = self.rc_us[2]
        if switch < RC_SWITCH_LOW_US:
            return MODE_MANUAL
        return MODE_AUTO if switch <= RC_SWITCH_HIGH_US else MODE_AUTO_NEUTRAL

    def update(self, now_ms: int) -> None:
        """The failsafe timeout, the mode and the outputs (rover_update)."""
        now_ms %= _U32
        if not self.failsafe and (now_ms - self.last_valid_ms) % _U32 >= self.limits.timeout_ms:
            self.failsafe = True
        mode = self.rc_mode(now_ms)
        sticks = mode == MODE_MANUAL or (mode == MODE_AUTO and self.failsafe)
        if sticks:
            self.steer_us = self._limit_steer(self.rc_us[0])
            self.throttle_us = self._limit_throttle(self.rc_us[1])
        elif mode == MODE_RC_LOST or self.failsafe:
            self.steer_us = self.throttle_us = protocol.NEUTRAL_US
        else:
            self.steer_us, self.throttle_us = self.pi_steer_us, self.pi_throttle_us
        self.mode = mode
        self.from_rc = sticks or mode == MODE_RC_LOST

    def flags(self) -> int:
        return (protocol.FLAG_FAILSAFE if self.failsafe else 0) | (protocol.FLAG_RC if self.from_rc else 0)

    def _limit_steer(self, us: int) -> int:
        return min(max(us, self.limits.steer_min_us), self.limits.steer_max_us)

    def _limit_throttle(self, us: int) -> int:
        return min(max(us, self.limits.throttle_min_us), self.limits.throttle_max_us)

    def feed(self, data: bytes, now_ms: int) -> list[bytes]:
        """Received bytes -> the replies to every line they complete."""
        replies = []
        for byte in data:
            if byte == 0x0A:
                line, overflow = bytes(self._buf), self._overflow
                self._buf.clear()
                self._overflow = False
                if overflow:
                    self.rx_bad += 1
                    continue
                reply = self.handle_line(line, now_ms)
                if reply is not None:
                    replies.append(reply)
            elif len(self._buf) >= protocol.MAX_LINE_LENGTH:
                self._overflow = True
            else:
                self._buf.append(byte)
        return replies

    def handle_line(self, line: bytes, now_ms: int) -> bytes | None:
        """One complete line (without newline) -> the reply line, or None (invalid lines are counted)."""
        if line in (b"", b"\r"):
            return None
        try:
            message = protocol.parse_line(line)
        except protocol.ProtocolError as exc:
            log.debug("rejected line %r: %s", line, exc)
            self.rx_bad += 1
            return None
        now_ms %= _U32
        if isinstance(message, protocol.Command):
            steer = protocol.milli_to_us(
                message.steering_milli, protocol.NEUTRAL_US, self.limits.half_range_us
            )
            throttle = protocol.milli_to_us(
                message.throttle_milli, protocol.NEUTRAL_US, self.limits.half_range_us
            )
            self.pi_steer_us, self.pi_throttle_us = self._limit_steer(steer), self._limit_throttle(throttle)
            limited = (self.pi_steer_us, self.pi_throttle_us) != (steer, throttle)
            self.failsafe = False
            self.last_valid_ms = now_ms
            self.last_seq = message.seq
            self.rx_ok += 1
            self.update(now_ms)
            flags = self.flags() | (protocol.FLAG_LIMITED if limited else 0)
            return protocol.encode(protocol.Ack(message.seq, self.steer_us, self.throttle_us, flags))
        if isinstance(message, protocol.Heartbeat):
            self.last_valid_ms = now_ms
            self.last_seq = message.seq
            self.rx_ok += 1
            self.update(now_ms)
            return protocol.encode(protocol.Ack(message.seq, self.steer_us, self.throttle_us, self.flags()))
        if isinstance(message, protocol.Ping):
            self.rx_ok += 1
            features = (protocol.FEATURE_RECEIVER if self.limits.rc_receiver else 0) | self.limits.sensors
            version = protocol.Version(
                message.seq, self.limits.protocol_version, FIRMWARE_NAME, FIRMWARE_VERSION, features
            )
            if self.limits.protocol_version == 1:  # protocol 1's version line had no features field
                return protocol.frame(version.payload().rsplit(",", 1)[0])
            return protocol.encode(version)
        self.rx_bad += 1  # a well-formed line the firmware does not accept (A, T, V)
        return None

    def tick(self, now_ms: int) -> bytes | None:
        """Periodic work: the failsafe timeout, mode and outputs, then the T and R lines when they are due."""
        now_ms %= _U32
        self.update(now_ms)
        if (now_ms - self.last_telemetry_ms) % _U32 < self.limits.telemetry_ms:
            return None
        self.last_telemetry_ms = now_ms
        rc = [self.rc_us[ch] if self.rc_valid(ch, now_ms) else 0 for ch in range(3)]
        return protocol.encode(
            protocol.Telemetry(
                now_ms, self.steer_us, self.throttle_us, self.failsafe, self.rx_ok, self.rx_bad
            )
        ) + protocol.encode(
            protocol.RcStatus(self.mode, rc[0], rc[1], rc[2], self.wheel_mmps, self.battery_mv)
        )

    def ms_until_next_tick(self, now_ms: int) -> int:
        """Milliseconds until the failsafe deadline or the next telemetry line, whichever comes first."""
        now_ms %= _U32
        due = self.limits.telemetry_ms - (now_ms - self.last_telemetry_ms) % _U32
        if not self.failsafe:
            due = min(due, self.limits.timeout_ms - (now_ms - self.last_valid_ms) % _U32)
        if self.limits.rc_receiver:
            due = min(due, 10)  # receiver channels can time out at any moment
        return max(0, due)


@dataclass(frozen=True)
class SimulatedSensors:
    """The simulated car's sensors: wheel speed follows the throttle output, the battery is steady."""

    wheel_mmps_per_us: float = 6.0  # mm/s per us of throttle away from neutral (500 us -> 3 m/s); 0: none
    battery_mv: int = 7400  # a charged 2S pack; 0: not measured

    @property
    def features(self) -> int:
        """The V line's sensor bits for what is simulated."""
        wheel = protocol.FEATURE_WHEEL if self.wheel_mmps_per_us > 0 else 0
        return wheel | (protocol.FEATURE_BATTERY if self.battery_mv > 0 else 0)

    def wheel_mmps(self, throttle_us: int) -> int:
        return min(65535, round(abs(throttle_us - protocol.NEUTRAL_US) * self.wheel_mmps_per_us))


def read_rc_file(path: Path) -> tuple[int, int, int] | None:
    """The simulated receiver's pulse widths from a JSON file {"steer_us", "throttle_us", "switch_us"};
    None (no pulses) when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
        return (int(data["steer_us"]), int(data["throttle_us"]), int(data["switch_us"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _set_raw(fd: int) -> None:
    tty.setraw(fd, termios.TCSANOW)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~(termios.ECHO | termios.ECHONL)
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class FirmwareSimulator:
    """Runs a FirmwareCore on a tty until stopped: in-process (`start`/`stop`) or from the CLI (`run`)."""

    def __init__(
        self,
        *,
        device: Path | None = None,
        pty_link: Path | None = None,
        limits: FirmwareLimits | None = None,
        status_file: Path | None = None,
        log_file: Path | None = None,
        rc_file: Path | None = None,
        sensors: SimulatedSensors | None = None,
    ) -> None:
        if (device is None) == (pty_link is None):
            raise ValueError("give exactly one of device or pty_link")
        self.rc_file = rc_file
        self.sensors = sensors or SimulatedSensors()
        limits = dataclasses.replace(limits or FirmwareLimits(), sensors=self.sensors.features)
        self._rc_cache: tuple[float, tuple[int, int, int] | None] | None = None
        self._muted = False
        self.device = device
        self.pty_link = pty_link
        self.limits = limits or FirmwareLimits()
        self.status_file = status_file
        self.log_file = log_file
        self._t0 = time.monotonic()
        self.core = FirmwareCore(self.limits, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._slave_fd: int | None = None  # pty mode: kept open so the master survives client reopen
        self._log_handle: Any = None
        self._last_valid_mono: float | None = None
        self._last_valid_wall: float | None = None
        self._failsafe_events = 0
        self._tx_dropped = 0
        self._last_outputs = (self.core.steer_us, self.core.throttle_us, self.core.failsafe)
        self._last_status_write = 0.0
        self._status_dirty = True
        self._device_missing_logged = False

    # ---- lifecycle ----
    def open(self) -> Path:
        """Creates the pty (pty mode) or tries to open the device; returns the path a client opens."""
        if self.log_file is not None:
            self._log_handle = self.log_file.open("a", buffering=1)
        self._log_change("boot")
        if self.pty_link is not None:
            master, slave = os.openpty()
            _set_raw(slave)
            os.set_blocking(master, False)
            self._fd, self._slave_fd = master, slave
            tmp = self.pty_link.with_name(f".{self.pty_link.name}.{os.getpid()}.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(os.ttyname(slave))
            tmp.replace(self.pty_link)
            log.info("firmware simulator on %s -> %s", self.pty_link, os.ttyname(slave))
            self._write_status(force=True)
            return self.pty_link
        self._try_open_device()
        self._write_status(force=True)
        assert self.device is not None
        return self.device

    def start(self) -> FirmwareSimulator:
        """Opens and runs in a background thread (for tests)."""
        self.open()
        self._thread = threading.Thread(target=self._loop, name="firmware-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        self._close()

    def run(self) -> None:
        """Opens and runs in the calling thread until `request_stop` (e.g. from a signal handler)."""
        self.open()
        try:
            self._loop()
        finally:
            self._close()

    def request_stop(self) -> None:
        self._stop.set()

    def __enter__(self) -> FirmwareSimulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def mute(self, muted: bool = True) -> None:
        """Stop (or resume) writing anything to the runtime: acks and telemetry stop, commands still apply.
        From the CLI: SIGUSR1 toggles it."""
        self._muted = muted

    @property
    def muted(self) -> bool:
        return self._muted

    def inject(self, data: bytes) -> None:
        """Write raw bytes to the runtime (garbage, hand-made lines), even while muted."""
        with self._lock:
            self._send(data, force=True)

    def snapshot(self) -> dict[str, Any]:
        """The current state, as written to the status file."""
        with self._lock:
            return self._snapshot_locked()

    # ---- internals ----
    def _now_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000) % _U32

    def _snapshot_locked(self) -> dict[str, Any]:
        core = self.core
        return {
            "steer_us": core.steer_us,
            "throttle_us": core.throttle_us,
            "failsafe": core.failsafe,
            "mode": protocol.MODE_NAMES[core.mode],
            "rc_us": list(core.rc_us),
            "wheel_mmps": core.wheel_mmps,
            "rx_ok": core.rx_ok,
            "rx_bad": core.rx_bad,
            "last_seq": core.last_seq,
            "last_valid_mono": self._last_valid_mono,
            "last_valid_wall": self._last_valid_wall,
            "failsafe_events": self._failsafe_events,
            "tx_dropped": self._tx_dropped,
            "timeout_ms": self.limits.timeout_ms,
            "device": str(self.pty_link or self.device),
            "connected": self._fd is not None,
            "pid": os.getpid(),
            "updated_mono": time.monotonic(),
            "updated_wall": time.time(),
        }

    def _try_open_device(self) -> None:
        assert self.device is not None
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            if not self._device_missing_logged:
                log.warning("cannot open %s (%s); retrying", self.device, exc.strerror)
                self._device_missing_logged = True
            return
        try:
            _set_raw(fd)
        except termios.error as exc:
            os.close(fd)
            raise SystemExit(f"error: {self.device} is not a tty ({exc})") from None
        self._fd = fd
        self._device_missing_logged = False
        self._status_dirty = True
        log.info("firmware simulator opened %s", self.device)

    def _drop_device(self, reason: str) -> None:
        log.warning("lost %s (%s); reopening", self.device, reason)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self._status_dirty = True

    def _close(self) -> None:
        for fd in (self._fd, self._slave_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._slave_fd = None
        if self.pty_link is not None and self.pty_link.is_symlink():
            with contextlib.suppress(OSError):
                self.pty_link.unlink()
        with self._lock:
            self._write_status(force=True)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def _send(self, data: bytes, *, force: bool = False) -> None:
        if self._fd is None or (self._muted and not force):
            return
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if self.device is not None:
                self._drop_device(exc.strerror or str(exc))
            return
        if written < len(data):
            self._tx_dropped += 1  # nobody reads the other end: drop, like a UART with no listener

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._fd is None and self.device is not None:
                self._try_open_device()
            with self._lock:
                wait_s = self.core.ms_until_next_tick(self._now_ms()) / 1000 + 0.0005
            wait_s = min(wait_s, _REOPEN_INTERVAL_S)
            data = b""
            if self._fd is None:
                self._stop.wait(wait_s)
            else:
                try:
                    ready, _, _ = select.select([self._fd], [], [], wait_s)
                    if ready:
                        data = os.read(self._fd, 4096)
                        if not data and self.device is not None:
                            self._drop_device("end of file")
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if self.device is not None:
                        self._drop_device(exc.strerror or str(exc))
                    elif exc.errno != errno.EIO:
                        raise
            with self._lock:
                now_ms = self._now_ms()
                replies = self.core.feed(data, now_ms) if data else []
                if data:
                    self._status_dirty = True
                if any(r.startswith(b"A,") for r in replies):  # acks answer exactly the valid C and H lines
                    self._last_valid_mono = time.monotonic()
                    self._last_valid_wall = time.time()
                self._feed_inputs(self._now_ms())
                telemetry = self.core.tick(self._now_ms())
                self._check_outputs()
                self._write_status(force=False)
            for reply in replies:
                self._send(reply)
            if telemetry is not None:
                self._send(telemetry)

    def _feed_inputs(self, now_ms: int) -> None:
        """The receiver's pulses (from the rc file, re-read when it changes) and the sensors."""
        if self.rc_file is not None:
            try:
                mtime = self.rc_file.stat().st_mtime
            except OSError:
                mtime = -1.0
            if self._rc_cache is None or self._rc_cache[0] != mtime:
                self._rc_cache = (mtime, read_rc_file(self.rc_file) if mtime >= 0 else None)
            widths = self._rc_cache[1]
            if widths is not None:
                for channel, width in enumerate(widths):
                    self.core.rc_pulse(channel, width, now_ms)
        self.core.wheel_mmps = self.sensors.wheel_mmps(self.core.throttle_us)
        self.core.battery_mv = self.sensors.battery_mv

    def _check_outputs(self) -> None:
        outputs = (self.core.steer_us, self.core.throttle_us, self.core.failsafe)
        if outputs == self._last_outputs:
            return
        became_failsafe = self.core.failsafe and not self._last_outputs[2]
        self._last_outputs = outputs
        if became_failsafe:
            self._failsafe_events += 1
        self._log_change("failsafe" if became_failsafe else "command")
        self._write_status(force=True)

    def _log_change(self, event: str) -> None:
        entry = {
            "event": event,
            "mono": time.monotonic(),
            "wall": time.time(),
            "steer_us": self.core.steer_us,
            "throttle_us": self.core.throttle_us,
            "failsafe": self.core.failsafe,
            "last_seq": self.core.last_seq,
        }
        log.debug("outputs: %s", entry)
        if self._log_handle is not None:
            self._log_handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def _write_status(self, *, force: bool) -> None:
        if self.status_file is None:
            return
        now = time.monotonic()
        if not force and (not self._status_dirty or now - self._last_status_write < _STATUS_MIN_INTERVAL_S):
            return
        write_json_atomic(self.status_file, self._snapshot_locked())
        self._last_status_write = now
        self._status_dirty = False


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rover_runtime.firmware_sim",
        description="Simulate the rover_car Arduino firmware on a tty.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--device", type=Path, help="open this existing tty (e.g. one end of a socat pty pair)"
    )
    where.add_argument("--pty-link", type=Path, help="create a pty pair and symlink its client end here")
    parser.add_argument("--timeout-ms", type=int, default=250, help="failsafe timeout (default 250)")
    parser.add_argument("--telemetry-ms", type=int, default=100, help="telemetry period (default 100)")
    parser.add_argument(
        "--rc-receiver",
        action="store_true",
        help="an RC receiver is fitted (the sketch's RC_RECEIVER 1): its mode switch decides; without "
        "--rc-file it has no signal and the outputs stay neutral",
    )
    parser.add_argument(
        "--rc-file",
        type=Path,
        help='the receiver\'s pulse widths: JSON {"steer_us": .., "throttle_us": .., "switch_us": ..}, '
        "re-read when it changes; missing or unreadable = no signal",
    )
    parser.add_argument(
        "--protocol-version",
        type=int,
        default=protocol.PROTOCOL_VERSION,
        help=f"the protocol version the firmware claims (default {protocol.PROTOCOL_VERSION}; another plays "
        "an older or newer firmware)",
    )
    parser.add_argument("--status-file", type=Path, help="JSON state, atomically replaced on every change")
    parser.add_argument("--log", type=Path, help="JSON lines: every output change with monotonic/wall time")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    for name in ("timeout_ms", "telemetry_ms"):
        if not 1 <= getattr(args, name) <= 60000:
            parser.error(f"--{name.replace('_', '-')} must be in [1, 60000], got {getattr(args, name)}")
    if args.rc_file is not None and not args.rc_receiver:
        parser.error("--rc-file needs --rc-receiver (without a receiver the pulses are not read)")
    for name in ("status_file", "log", "pty_link", "rc_file"):
        path = getattr(args, name)
        if path is not None and not path.parent.is_dir():
            parser.error(f"--{name.replace('_', '-')}: directory {path.parent} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    limits = FirmwareLimits(
        timeout_ms=args.timeout_ms,
        telemetry_ms=args.telemetry_ms,
        rc_receiver=args.rc_receiver,
        protocol_version=args.protocol_version,
    )
    sim = FirmwareSimulator(
        device=args.device,
        pty_link=args.pty_link,
        limits=limits,
        status_file=args.status_file,
        log_file=args.log,
        rc_file=args.rc_file,
    )

    def _stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        sim.request_stop()

    def _toggle_mute(signum: int, frame: FrameType | None) -> None:
        sim.mute(not sim.muted)
        log.info("SIGUSR1: %s", "muted (no acks, no telemetry)" if sim.muted else "answering again")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGUSR1, _toggle_mute)
    sim.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
