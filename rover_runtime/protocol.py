"""The serial line protocol between the runtime and the car's Arduino (see docs/serial-protocol.md).

Every message is one ASCII line: `<payload>*<CRC>\\n`, where the payload is comma-separated fields starting
with a one-letter type and CRC is the CRC-8 (poly 0x07, init 0x00, CRC-8/SMBUS) of the payload bytes as two
hex digits. This module is pure (no I/O): the runtime's serial link, the firmware simulator and the tests
use it; the Arduino sketch implements the same rules in `firmware/rover_car/rover_protocol.h`, and both are
checked against `tests/vectors/serial_protocol.json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PROTOCOL_VERSION = 2
MAX_LINE_LENGTH = 63  # characters before the newline; longer lines are rejected as garbage
SEQ_MODULO = 1 << 16  # sequence numbers are 0..65535 and wrap to 0
MILLI_MAX = 1000  # steering/throttle on the wire: integers in [-1000, 1000]
NEUTRAL_US = 1500
HALF_RANGE_US = 500  # the sketch's HALF_RANGE_US: microseconds for a full +-1 command

FLAG_FAILSAFE = 0x01  # ack flag: outputs are held neutral by the firmware's failsafe
FLAG_LIMITED = 0x02  # ack flag: the firmware limited a value to its own microsecond limits
FLAG_RC = 0x04  # ack flag: the transmitter side decides the outputs (manual mode, or the receiver lost)

# The modes the RC receiver's switch selects (R line, field `mode`), by wire number.
MODE_NAMES = {
    0: "pi_only",  # no receiver fitted: the Pi's commands drive
    1: "manual",  # the driver's sticks pass straight through; the Pi is ignored
    2: "autopilot",  # the Pi drives; if it goes quiet, the driver's sticks take over
    3: "autopilot_neutral_fallback",  # the Pi drives; if it goes quiet, neutral
    4: "rc_lost",  # a receiver channel has no valid signal: neutral
}
MODE_MANUAL = 1
MODE_RC_LOST = 4
# V line `features` bits: what the firmware has fitted.
FEATURE_RECEIVER = 0x01
FEATURE_WHEEL = 0x02
FEATURE_BATTERY = 0x04
FEATURE_NAMES = {FEATURE_RECEIVER: "receiver", FEATURE_WHEEL: "wheel_speed", FEATURE_BATTERY: "battery"}


_HEX_DIGITS = b"0123456789abcdefABCDEF"


class ProtocolError(ValueError):
    """A line that is not a valid protocol message (bad framing, checksum, field or range)."""


def crc8(data: bytes) -> int:
    """CRC-8/SMBUS: polynomial 0x07, initial value 0, no reflection, no final xor."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def frame(payload: str) -> bytes:
    """`payload` -> `payload*XX\\n` (bytes ready for the wire)."""
    raw = payload.encode("ascii")
    if b"*" in raw or b"\n" in raw or len(raw) + 3 > MAX_LINE_LENGTH:
        raise ProtocolError(f"payload cannot be framed: {payload!r}")
    return raw + b"*%02X\n" % crc8(raw)


def unframe(line: bytes) -> str:
    """A received line (without its newline; a trailing CR is ignored) -> its payload, checksum verified."""
    if len(line) > MAX_LINE_LENGTH:
        raise ProtocolError(f"line longer than {MAX_LINE_LENGTH} characters")
    if line.endswith(b"\r"):
        line = line[:-1]
    star = line.rfind(b"*")
    if star < 0 or len(line) - star != 3:
        raise ProtocolError("no '*XX' checksum at the end of the line")
    payload, check = line[:star], line[star + 1 :]
    if any(c < 0x20 or c > 0x7E or c == 0x2A for c in payload):
        raise ProtocolError("non-printable character or '*' in the payload")
    if any(c not in _HEX_DIGITS for c in check):
        raise ProtocolError(f"checksum {check!r} is not two hex digits")
    expected = int(check, 16)
    if crc8(payload) != expected:
        raise ProtocolError(f"checksum mismatch: line says {expected:02X}, payload gives {crc8(payload):02X}")
    return payload.decode("ascii")


def _int_field(text: str, name: str, low: int, high: int) -> int:
    digits = text[1:] if text.startswith("-") else text
    if not digits.isdigit() or not digits.isascii() or len(digits) > 10:
        raise ProtocolError(f"{name} {text!r} is not an integer")
    value = int(text)
    if not low <= value <= high:
        raise ProtocolError(f"{name} {value} outside [{low}, {high}]")
    return value


# ---- messages from the runtime to the Arduino ----
@dataclass(frozen=True)
class Command:
    """`C,<seq>,<steering_milli>,<throttle_milli>`: set the outputs; also resets the firmware's watchdog."""

    seq: int
    steering_milli: int
    throttle_milli: int

    def payload(self) -> str:
        return f"C,{self.seq},{self.steering_milli},{self.throttle_milli}"


@dataclass(frozen=True)
class Heartbeat:
    """`H,<seq>`: keeps the current outputs alive (resets the watchdog) without changing them."""

    seq: int

    def payload(self) -> str:
        return f"H,{self.seq}"


@dataclass(frozen=True)
class Ping:
    """`P,<seq>`: asks for the firmware's version line."""

    seq: int

    def payload(self) -> str:
        return f"P,{self.seq}"


# ---- messages from the Arduino to the runtime ----
@dataclass(frozen=True)
class Ack:
    """`A,<seq>,<steer_us>,<throttle_us>,<flags>`: reply to a command or heartbeat: the outputs now set."""

    seq: int
    steer_us: int
    throttle_us: int
    flags: int

    @property
    def failsafe(self) -> bool:
        return bool(self.flags & FLAG_FAILSAFE)

    def payload(self) -> str:
        return f"A,{self.seq},{self.steer_us},{self.throttle_us},{self.flags}"


@dataclass(frozen=True)
class Telemetry:
    """`T,<millis>,<steer_us>,<throttle_us>,<failsafe>,<rx_ok>,<rx_bad>`: periodic state of the firmware."""

    millis: int
    steer_us: int
    throttle_us: int
    failsafe: bool
    rx_ok: int
    rx_bad: int

    def payload(self) -> str:
        fields = (self.millis, self.steer_us, self.throttle_us, int(self.failsafe), self.rx_ok, self.rx_bad)
        return "T," + ",".join(str(f) for f in fields)


@dataclass(frozen=True)
class RcStatus:
    """`R,<mode>,<rc_steer_us>,<rc_throttle_us>,<rc_switch_us>,<wheel_mmps>,<battery_mv>`: sent after every
    `T`: the mode the receiver's switch selects, the receiver's pulse widths (0: no valid signal) and the
    sensors (0: not fitted)."""

    mode: int
    rc_steer_us: int
    rc_throttle_us: int
    rc_switch_us: int
    wheel_mmps: int
    battery_mv: int

    @property
    def mode_name(self) -> str:
        return MODE_NAMES[self.mode]

    def payload(self) -> str:
        fields = (
            self.mode,
            self.rc_steer_us,
            self.rc_throttle_us,
            self.rc_switch_us,
            self.wheel_mmps,
            self.battery_mv,
        )
        return "R," + ",".join(str(f) for f in fields)


@dataclass(frozen=True)
class Version:
    """`V,<seq>,<protocol>,<name>,<version>,<features>`: reply to a ping; `features` is a bit set of
    FEATURE_* (what is fitted: receiver, wheel speed sensor, battery measurement)."""

    seq: int
    protocol: int
    name: str
    version: str
    features: int = 0

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(name for bit, name in FEATURE_NAMES.items() if self.features & bit)

    def describe(self) -> str:
        fitted = ", ".join(self.feature_names) or "no receiver or sensors"
        return f"{self.name} {self.version} (protocol {self.protocol}; {fitted})"

    def payload(self) -> str:
        return f"V,{self.seq},{self.protocol},{self.name},{self.version},{self.features}"


Message = Command | Heartbeat | Ping | Ack | Telemetry | RcStatus | Version

_U32 = (1 << 32) - 1
_FIELD_COUNTS = {"C": 4, "H": 2, "P": 2, "A": 5, "T": 7, "R": 7, "V": 6}


def encode(message: Message) -> bytes:
    """A message -> its framed line."""
    return frame(message.payload())


def parse_payload(payload: str) -> Message:
    """A verified payload -> a message; raises ProtocolError naming the bad field."""
    fields = payload.split(",")
    kind = fields[0]
    if kind not in _FIELD_COUNTS:
        raise ProtocolError(f"unknown message type {kind!r}")
    # A version line keeps its first five fields in every protocol version (v1 had no `features`), so a
    # runtime can tell which protocol an older firmware speaks.
    counts = (5, 6) if kind == "V" else (_FIELD_COUNTS[kind],)
    if len(fields) not in counts:
        raise ProtocolError(f"{kind} message needs {_FIELD_COUNTS[kind]} fields, got {len(fields)}")
    seq_max = SEQ_MODULO - 1
    if kind == "C":
        return Command(
            seq=_int_field(fields[1], "seq", 0, seq_max),
            steering_milli=_int_field(fields[2], "steering", -MILLI_MAX, MILLI_MAX),
            throttle_milli=_int_field(fields[3], "throttle", -MILLI_MAX, MILLI_MAX),
        )
    if kind == "H":
        return Heartbeat(seq=_int_field(fields[1], "seq", 0, seq_max))
    if kind == "P":
        return Ping(seq=_int_field(fields[1], "seq", 0, seq_max))
    if kind == "A":
        return Ack(
            seq=_int_field(fields[1], "seq", 0, seq_max),
            steer_us=_int_field(fields[2], "steer_us", 0, 65535),
            throttle_us=_int_field(fields[3], "throttle_us", 0, 65535),
            flags=_int_field(fields[4], "flags", 0, 255),
        )
    if kind == "T":
        return Telemetry(
            millis=_int_field(fields[1], "millis", 0, _U32),
            steer_us=_int_field(fields[2], "steer_us", 0, 65535),
            throttle_us=_int_field(fields[3], "throttle_us", 0, 65535),
            failsafe=bool(_int_field(fields[4], "failsafe", 0, 1)),
            rx_ok=_int_field(fields[5], "rx_ok", 0, _U32),
            rx_bad=_int_field(fields[6], "rx_bad", 0, _U32),
        )
    if kind == "R":
        return RcStatus(
            mode=_int_field(fields[1], "mode", 0, max(MODE_NAMES)),
            rc_steer_us=_int_field(fields[2], "rc_steer_us", 0, 65535),
            rc_throttle_us=_int_field(fields[3], "rc_throttle_us", 0, 65535),
            rc_switch_us=_int_field(fields[4], "rc_switch_us", 0, 65535),
            wheel_mmps=_int_field(fields[5], "wheel_mmps", 0, 65535),
            battery_mv=_int_field(fields[6], "battery_mv", 0, 65535),
        )
    if not fields[3] or not fields[4]:
        raise ProtocolError("V message has an empty name or version")
    return Version(
        seq=_int_field(fields[1], "seq", 0, seq_max),
        protocol=_int_field(fields[2], "protocol", 0, 65535),
        name=fields[3],
        version=fields[4],
        features=_int_field(fields[5], "features", 0, 255) if len(fields) > 5 else 0,
    )


def parse_line(line: bytes) -> Message:
    """A received line (without newline) -> a message; raises ProtocolError if anything is wrong."""
    return parse_payload(unframe(line))


def next_seq(seq: int) -> int:
    return (seq + 1) % SEQ_MODULO


def to_milli(value: float) -> int:
    """A normalized value in [-1, 1] -> the wire integer in [-1000, 1000] (non-finite -> 0)."""
    if not math.isfinite(value):
        return 0
    return max(-MILLI_MAX, min(MILLI_MAX, round(value * MILLI_MAX)))


def us_to_normalized(us: int, half_range_us: int = HALF_RANGE_US) -> float:
    """A pulse width reported by the firmware -> the normalized value in [-1, 1] it corresponds to."""
    return max(-1.0, min(1.0, (us - NEUTRAL_US) / half_range_us))


def milli_to_us(milli: int, center_us: int = NEUTRAL_US, half_range_us: int = 500) -> int:
    """The firmware's mapping: center + milli * half_range / 1000, truncated toward zero like C's `/`."""
    scaled = milli * half_range_us
    quotient = abs(scaled) // MILLI_MAX
    return center_us + (quotient if scaled >= 0 else -quotient)
