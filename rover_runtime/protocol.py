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

PROTOCOL_VERSION = 1
MAX_LINE_LENGTH = 63  # characters before the newline; longer lines are rejected as garbage
SEQ_MODULO = 1 << 16  # sequence numbers are 0..65535 and wrap to 0
MILLI_MAX = 1000  # steering/throttle on the wire: integers in [-1000, 1000]
NEUTRAL_US = 1500

FLAG_FAILSAFE = 0x01  # ack flag: outputs are held neutral by the firmware's failsafe
FLAG_LIMITED = 0x02  # ack flag: the firmware limited a value to its own microsecond limits


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
class Version:
    """`V,<seq>,<protocol>,<name>,<version>`: reply to a ping."""

    seq: int
    protocol: int
    name: str
    version: str

    def describe(self) -> str:
        return f"{self.name} {self.version} (protocol {self.protocol})"

    def payload(self) -> str:
        return f"V,{self.seq},{self.protocol},{self.name},{self.version}"


Message = Command | Heartbeat | Ping | Ack | Telemetry | Version

_U32 = (1 << 32) - 1
_FIELD_COUNTS = {"C": 4, "H": 2, "P": 2, "A": 5, "T": 7, "V": 5}


def encode(message: Message) -> bytes:
    """A message -> its framed line."""
    return frame(message.payload())


def parse_payload(payload: str) -> Message:
    """A verified payload -> a message; raises ProtocolError naming the bad field."""
    fields = payload.split(",")
    kind = fields[0]
    if kind not in _FIELD_COUNTS:
        raise ProtocolError(f"unknown message type {kind!r}")
    if len(fields) != _FIELD_COUNTS[kind]:
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
    if not fields[3] or not fields[4]:
        raise ProtocolError("V message has an empty name or version")
    return Version(
        seq=_int_field(fields[1], "seq", 0, seq_max),
        protocol=_int_field(fields[2], "protocol", 0, 65535),
        name=fields[3],
        version=fields[4],
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


def milli_to_us(milli: int, center_us: int = NEUTRAL_US, half_range_us: int = 500) -> int:
    """The firmware's mapping: center + milli * half_range / 1000, truncated toward zero like C's `/`."""
    scaled = milli * half_range_us
    quotient = abs(scaled) // MILLI_MAX
    return center_us + (quotient if scaled >= 0 else -quotient)
