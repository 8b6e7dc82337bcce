"""The serial protocol: framing, checksum, parsing and the firmware logic, in Python and in the sketch's C.

The shared vectors (tests/vectors/serial_protocol.json) are run through rover_runtime.protocol, the firmware
simulator's core, and, when g++ is installed, the sketch's own rover_protocol.h compiled for this host.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from rover_runtime import protocol
from rover_runtime.firmware_sim import FirmwareCore, FirmwareLimits
from rover_runtime.serial_link import SerialConfig

REPO = Path(__file__).resolve().parents[2]
VECTORS = json.loads((REPO / "tests" / "vectors" / "serial_protocol.json").read_text())
FIRMWARE = REPO / "firmware"


def _as_dict(message: protocol.Message) -> dict[str, Any]:
    data = asdict(message)
    if "failsafe" in data:
        data["failsafe"] = int(data["failsafe"])
    return {"type": message.payload()[0], **data}


@pytest.mark.parametrize("case", VECTORS["crc8"]["cases"], ids=lambda c: c["input"] or "empty")
def test_crc8_matches_the_vectors(case: dict[str, str]) -> None:
    assert f"{protocol.crc8(case['input'].encode()):02X}" == case["crc"]


@pytest.mark.parametrize("case", VECTORS["valid_lines"], ids=lambda c: c["line"])
def test_valid_lines_parse_and_round_trip(case: dict[str, Any]) -> None:
    message = protocol.parse_line(case["line"].encode())
    assert _as_dict(message) == case["message"]
    line = case["line"]
    if case.get("round_trip", True):
        assert (
            protocol.encode(message).decode() == line[:-2] + line[-2:].upper() + "\n"
        )  # senders use upper case


@pytest.mark.parametrize("case", VECTORS["invalid_lines"], ids=lambda c: c["why"])
def test_invalid_lines_are_rejected(case: dict[str, str]) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_line(case["line"].encode())


def test_a_changed_byte_fails_the_checksum() -> None:
    line = protocol.encode(protocol.Command(12, 345, -678)).rstrip(b"\n")
    corrupted = line.replace(b"345", b"346")
    with pytest.raises(protocol.ProtocolError, match="checksum mismatch"):
        protocol.parse_line(corrupted)


def test_a_trailing_cr_is_accepted() -> None:
    assert protocol.parse_line(b"H,4*09\r") == protocol.Heartbeat(4)


@pytest.mark.parametrize(("milli", "us"), VECTORS["us_mapping"]["cases"])
def test_milli_to_us_truncates_like_c(milli: int, us: int) -> None:
    assert protocol.milli_to_us(milli) == us


@pytest.mark.parametrize(
    ("value", "milli"),
    [
        (0.0, 0),
        (0.5, 500),
        (-0.2506, -251),
        (1.0, 1000),
        (7.0, 1000),
        (-7.0, -1000),
        (math.nan, 0),
        (math.inf, 0),
    ],
)
def test_to_milli_rounds_and_bounds(value: float, milli: int) -> None:
    assert protocol.to_milli(value) == milli


def test_sequence_numbers_wrap() -> None:
    assert protocol.next_seq(65535) == 0
    assert protocol.next_seq(0) == 1


def test_frame_refuses_payloads_that_cannot_be_framed() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.frame("C,1*2")
    with pytest.raises(protocol.ProtocolError):
        protocol.frame("V,1,1," + "x" * 70 + ",1")


# The timed sessions: without a receiver (the Pi drives), and with one (its switch decides).
SESSIONS = {"firmware_session": False, "rc_session": True}


@pytest.mark.parametrize("session", SESSIONS)
def test_firmware_core_follows_the_session_vectors(session: str) -> None:
    core = FirmwareCore(FirmwareLimits(rc_receiver=SESSIONS[session]), now_ms=0)
    for step in VECTORS[session]["steps"]:
        for channel, width in enumerate(step.get("rc", ())):
            core.rc_pulse(channel, width, step["at_ms"])
        if "sensors" in step:
            core.wheel_mmps, core.battery_mv = step["sensors"]
        out = core.feed(step["send"].encode() + b"\n", step["at_ms"]) if step["send"] is not None else []
        telemetry = core.tick(step["at_ms"])
        if telemetry is not None:
            out.append(telemetry)
        assert [line for chunk in out for line in chunk.decode().splitlines()] == step["expect"], step


def test_every_telemetry_line_is_followed_by_the_rc_line() -> None:
    for session in SESSIONS:
        for step in VECTORS[session]["steps"]:
            kinds = [line[0] for line in step["expect"] if line[0] in "TR"]
            assert kinds in ([], ["T", "R"]), step


def test_firmware_core_accepts_only_its_own_valid_lines() -> None:
    for case in VECTORS["valid_lines"]:
        core = FirmwareCore()
        core.feed(case["line"].encode() + b"\n", 0)
        accepted = case["message"]["type"] in ("C", "H", "P")
        assert (core.rx_ok, core.rx_bad) == ((1, 0) if accepted else (0, 1)), case
    for case in VECTORS["invalid_lines"]:
        core = FirmwareCore()
        core.feed(case["line"].encode() + b"\n", 0)
        assert (core.rx_ok, core.rx_bad) == (0, 1), case


def test_firmware_core_limits_and_flags_out_of_limit_pulses() -> None:
    core = FirmwareCore(FirmwareLimits(throttle_min_us=1300, throttle_max_us=1700))
    (reply,) = core.feed(protocol.encode(protocol.Command(3, 200, 900)), 5)
    ack = protocol.parse_line(reply.rstrip(b"\n"))
    assert ack == protocol.Ack(3, 1600, 1700, protocol.FLAG_LIMITED)


def test_firmware_core_failsafe_survives_millis_wrap() -> None:
    start = (1 << 32) - 100
    core = FirmwareCore(now_ms=start)
    core.feed(protocol.encode(protocol.Command(1, 1000, 1000)), start)
    core.tick(start + 249)  # wraps past 2**32 on the way
    assert not core.failsafe
    core.tick(start + 250)
    assert core.failsafe
    assert (core.steer_us, core.throttle_us) == (1500, 1500)


def test_firmware_core_counts_an_overlong_line_once_and_recovers() -> None:
    core = FirmwareCore()
    out = core.feed(b"x" * 200 + b"\n" + protocol.encode(protocol.Heartbeat(9)), 0)
    assert core.rx_bad == 1
    assert out == [protocol.encode(protocol.Ack(9, 1500, 1500, protocol.FLAG_FAILSAFE))]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"throttle_limits": (0.5, -0.5)}, "throttle_limits"),
        ({"steering_limits": (-2.0, 1.0)}, "steering_limits"),
        ({"baudrate": 0}, "baudrate"),
        ({"heartbeat_interval_s": 0.0}, "heartbeat_interval_s"),
    ],
)
def test_serial_config_errors_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        SerialConfig(**kwargs)


# ---- the sketch's C code, compiled for this host ----
@pytest.fixture(scope="module")
def protocol_host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed (apt-get install g++): cannot compile the sketch's protocol core")
    binary = tmp_path_factory.mktemp("fw") / "protocol_host"
    source = FIRMWARE / "test" / "protocol_host.cpp"
    cmd = ["g++", "-std=c++11", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(binary), str(source)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return binary


def _run_host(binary: Path, commands: list[str]) -> list[str]:
    result = subprocess.run(
        [str(binary)],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.splitlines()


def test_sketch_crc_and_mapping_match_the_vectors(protocol_host: Path) -> None:
    crc_cases = VECTORS["crc8"]["cases"]
    us_cases = VECTORS["us_mapping"]["cases"]
    commands = [f"crc {c['input'].encode().hex() or '-'}" for c in crc_cases]
    commands += [f"us {milli}" for milli, _ in us_cases]
    out = _run_host(protocol_host, commands)
    assert out == [c["crc"] for c in crc_cases] + [str(us) for _, us in us_cases]


def test_sketch_accepts_and_rejects_like_the_vectors(protocol_host: Path) -> None:
    valid, invalid = VECTORS["valid_lines"], VECTORS["invalid_lines"]
    out = _run_host(protocol_host, [f"accept {c['line'].encode().hex()}" for c in valid + invalid])
    expected = ["ok" if c["message"]["type"] in ("C", "H", "P") else "bad" for c in valid]
    assert out == expected + ["bad"] * len(invalid)


@pytest.mark.parametrize("session", SESSIONS)
def test_sketch_follows_the_session_vectors(protocol_host: Path, session: str) -> None:
    steps = VECTORS[session]["steps"]
    commands = [f"boot 0 {int(SESSIONS[session])}"]
    for s in steps:
        if "rc" in s:
            commands.append(f"rc {s['at_ms']} {' '.join(map(str, s['rc']))}")
        if "sensors" in s:
            commands.append(f"sensors {' '.join(map(str, s['sensors']))}")
        commands.append(f"step {s['at_ms']} {s['send'].encode().hex() if s['send'] is not None else '-'}")
    out = _run_host(protocol_host, commands)
    per_step: list[list[str]] = [[]]
    for line in out:
        if line == ".":
            per_step.append([])
        else:
            per_step[-1].append(line)
    assert per_step[:-1] == [s["expect"] for s in steps]


ARDUINO_CORE = Path("/usr/share/arduino/hardware/arduino/avr/cores/arduino")


@pytest.fixture(scope="module")
def firmware_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make -C firmware` into a temporary build directory; the ELF is BUILD/atmega328p/rover_car.elf."""
    if shutil.which("avr-gcc") is None or not ARDUINO_CORE.is_dir():
        pytest.skip("AVR toolchain missing: apt-get install gcc-avr avr-libc binutils-avr arduino-core-avr")
    build = tmp_path_factory.mktemp("firmware-build")
    result = subprocess.run(
        ["make", "-C", str(FIRMWARE), f"BUILD={build}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return build


def test_sketch_compiles_for_the_uno(firmware_build: Path) -> None:
    elf = firmware_build / "atmega328p" / "rover_car.elf"
    assert (firmware_build / "atmega328p" / "rover_car.hex").stat().st_size > 0
    size = subprocess.run(["avr-size", str(elf)], capture_output=True, text=True, check=True)
    text, data, bss = (int(v) for v in size.stdout.splitlines()[1].split()[:3])
    assert text + data <= 32256  # ATmega328P flash minus the Optiboot bootloader
    assert data + bss <= 1536  # leave a quarter of the 2 KB RAM for the stack


def _simavr_session(build: Path, commands: list[str]) -> list[dict[str, Any]]:
    """Runs the ELF under simavr; one dict per `run` command: uart lines, pulse widths, compare registers."""
    if not Path("/usr/include/simavr/sim_avr.h").exists():
        pytest.skip("simavr headers missing: apt-get install libsimavr-dev")
    subprocess.run(
        ["make", "-C", str(FIRMWARE), f"BUILD={build}", "simavr-test"], capture_output=True, check=True
    )
    result = subprocess.run(
        [str(build / "simavr_run"), str(build / "atmega328p" / "rover_car.elf")],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    runs: list[dict[str, Any]] = [{"uart": []}]
    for line in result.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "uart":
            runs[-1]["uart"].append(rest)
        elif word in ("pulses", "ocr_us"):
            runs[-1][word] = [int(v) for v in rest.split()]
        elif word == ".":
            runs.append({"uart": []})
    return runs[:-1]


def _send(line: str) -> str:
    return f"send {(line + chr(10)).encode().hex()}"


def _command(seq: int, steering: int, throttle: int) -> str:
    return _send(protocol.encode(protocol.Command(seq, steering, throttle)).decode().strip())


def _near(measured: list[int], expected: list[int], tolerance_us: int = 8) -> bool:
    """Receiver pulses pass through as the sketch measured them: micros() has 4 us steps, plus ISR latency."""
    return all(abs(m - e) <= tolerance_us for m, e in zip(measured, expected, strict=True))


def _lines(run: dict[str, Any], kind: type[protocol.Message]) -> list[Any]:
    messages = [protocol.parse_line(line.encode()) for line in run["uart"]]
    return [m for m in messages if isinstance(m, kind)]


def test_sketch_runs_on_a_simulated_atmega328p(firmware_build: Path) -> None:
    runs = _simavr_session(
        firmware_build,
        [
            "rc 1500 1500 2000",  # the transmitter on, its switch on autopilot
            "run 100",
            _send("P,7*F3"),
            _send("C,3,0,0*00"),  # bad checksum: ignored, counted
            "run 20",
            _send("C,1,500,-251*52"),
            "run 40",
            "run 60",
            "run 300",
        ],
    )
    boot, pinged, commanded, driving, silent = runs
    assert boot["pulses"] == [1500, 1500, 20000]  # neutral from the first pulse, 50 Hz
    assert all(t.failsafe for t in _lines(boot, protocol.Telemetry))  # the Pi's link is timed out at boot
    assert "V,7,2,rover_car,2.0.0,1*C1" in pinged["uart"]  # features: a receiver
    assert commanded["uart"][0] == "A,1,1750,1375,0*FD"
    assert commanded["ocr_us"] == [1750, 1375]
    assert driving["ocr_us"] == [1750, 1375]
    telemetry = _lines(driving, protocol.Telemetry)
    assert telemetry
    assert all(not t.failsafe and t.rx_bad == 1 for t in telemetry)
    # The receiver's pulses, measured by the sketch's pin-change interrupt (4 us resolution of micros()).
    (rc, *_) = _lines(driving, protocol.RcStatus)
    assert rc.mode_name == "autopilot_neutral_fallback"
    assert [
        abs(v - w) <= 8
        for v, w in zip((rc.rc_steer_us, rc.rc_throttle_us, rc.rc_switch_us), (1500, 1500, 2000), strict=True)
    ] == [True] * 3
    assert silent["ocr_us"] == [1500, 1500]  # no command for 300 ms: neutral (the switch's fallback)
    last = _lines(silent, protocol.Telemetry)[-1]
    assert (last.failsafe, last.steer_us, last.throttle_us, last.rx_ok, last.rx_bad) == (
        True,
        1500,
        1500,
        2,
        1,
    )


def test_the_transmitter_is_in_charge_on_a_simulated_atmega328p(firmware_build: Path) -> None:
    """The mode switch on the receiver pins: manual passes the sticks through and ignores the Pi; autopilot
    obeys the Pi; when the Pi goes quiet the middle position hands the car to the sticks and the high one
    stops it; without the receiver's pulses the car stops whatever the Pi says."""
    runs = _simavr_session(
        firmware_build,
        [
            "rc 1600 1700 1000",  # manual, the driver steering right with some throttle
            "run 150",
            _command(1, -500, -500),
            "run 20",
            "rc 1600 1700 2000",  # switch to autopilot (neutral fallback)
            "run 50",
            _command(2, -500, 200),
            "run 20",
            "run 400",  # the Pi goes quiet
            "rc 1600 1700 1500",  # middle: autopilot, the driver takes over when the Pi is quiet
            "run 100",
            _command(3, 300, 100),
            "run 20",
            "rc 0 0 0",  # the transmitter off: no pulses
            _command(4, 300, 100),
            "run 20",
            "run 150",
            _command(5, 300, 100),
            "run 20",
        ],
    )
    manual, manual_cmd, _switched, auto_cmd, quiet, middle, middle_cmd, lost_soon, lost, lost_cmd = runs
    assert _near(manual["ocr_us"], [1600, 1700])
    assert _lines(manual, protocol.RcStatus)[-1].mode_name == "manual"
    (ack,) = _lines(manual_cmd, protocol.Ack)
    assert ack.flags == protocol.FLAG_RC  # the Pi is ignored
    assert _near([ack.steer_us, ack.throttle_us], [1600, 1700])
    assert _near(manual_cmd["ocr_us"], [1600, 1700])
    (ack,) = _lines(auto_cmd, protocol.Ack)
    assert (ack.steer_us, ack.throttle_us, ack.flags) == (1250, 1600, 0)
    assert auto_cmd["ocr_us"] == [1250, 1600]
    assert quiet["ocr_us"] == [1500, 1500]  # the Pi quiet for 250 ms with the switch high: neutral
    assert _lines(quiet, protocol.Telemetry)[-1].failsafe
    assert _near(middle["ocr_us"], [1600, 1700])  # switch in the middle while the Pi is quiet: the sticks
    assert _lines(middle, protocol.RcStatus)[-1].mode_name == "autopilot"
    (ack,) = _lines(middle_cmd, protocol.Ack)
    assert (ack.steer_us, ack.throttle_us, ack.flags) == (1650, 1550, 0)  # the Pi speaks again: it drives
    assert lost_soon["ocr_us"] == [1650, 1550]  # pulses stopped 20 ms ago: not yet lost
    assert lost["ocr_us"] == [1500, 1500]
    assert _lines(lost, protocol.RcStatus)[-1].mode_name == "rc_lost"
    (ack,) = _lines(lost_cmd, protocol.Ack)
    assert (ack.steer_us, ack.throttle_us, ack.flags) == (1500, 1500, protocol.FLAG_RC)
