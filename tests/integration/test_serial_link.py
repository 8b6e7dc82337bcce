"""SerialLink over real ptys (pyserial), against the firmware simulator or a scripted Arduino side.

Faults: garbage and partial lines from the Arduino, the device missing at start, and the device unplugged
mid-run (socat killed, then restarted at the same path).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from rover_runtime import protocol
from rover_runtime.firmware_sim import FirmwareSimulator
from rover_runtime.serial_link import SerialConfig, SerialLink

M = TypeVar("M")

REPO = Path(__file__).resolve().parents[2]
FAST = {"heartbeat_interval_s": 0.05, "reconnect_interval_s": 0.1}


def wait_until(
    condition: Callable[[], bool], timeout_s: float, poll: Callable[[], object] | None = None
) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if poll is not None:
            poll()
        if condition():
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def link_path(tmp_path: Path) -> Path:
    return tmp_path / "rover-arduino"


@pytest.fixture
def sim(tmp_path: Path, link_path: Path) -> Iterator[FirmwareSimulator]:
    with FirmwareSimulator(pty_link=link_path, status_file=tmp_path / "fw.json") as simulator:
        yield simulator


@pytest.fixture
def link(link_path: Path) -> Iterator[SerialLink]:
    serial_link = SerialLink(SerialConfig(port=str(link_path), **FAST))  # type: ignore[arg-type]
    yield serial_link
    serial_link.close()


def test_commands_are_acked_and_telemetry_parsed(sim: FirmwareSimulator, link: SerialLink) -> None:
    assert link.open()
    version = link.ping(timeout_s=0.5)
    assert version is not None
    assert version.describe() == "rover_car 2.0.0 (protocol 2; wheel_speed, battery)"
    assert link.send_command(0.3, -0.2) == (0.3, -0.2)
    assert wait_until(
        lambda: link.stats.last_ack is not None and link.stats.last_ack.steer_us == 1650, 0.5, link.poll
    )
    assert link.stats.last_ack is not None
    assert (link.stats.last_ack.throttle_us, link.stats.last_ack.flags) == (1400, 0)
    assert wait_until(lambda: link.stats.last_telemetry is not None, 0.5, link.poll)
    telemetry = link.stats.last_telemetry
    assert telemetry is not None
    assert (telemetry.steer_us, telemetry.throttle_us, telemetry.failsafe) == (1650, 1400, False)
    assert sim.snapshot()["steer_us"] == 1650
    assert link.stats.garbage_lines == 0
    assert link.stats.commands_sent == 1  # the neutral sent on connect is not a caller's command
    assert link.stats.connected


def test_heartbeats_keep_the_firmware_out_of_failsafe(sim: FirmwareSimulator, link: SerialLink) -> None:
    assert link.open()
    link.send_command(0.5, 0.1)
    # 0.6 s without commands: only poll()'s heartbeats (every 50 ms) keep the outputs alive.
    wait_until(lambda: False, 0.6, link.poll)
    state = sim.snapshot()
    assert (state["steer_us"], state["failsafe"]) == (1750, False)
    assert link.stats.heartbeats_sent >= 8
    # Without poll() the firmware's watchdog takes over.
    assert wait_until(lambda: sim.snapshot()["failsafe"], 0.5)
    assert sim.snapshot()["steer_us"] == 1500


def test_values_are_clamped_to_the_configured_limits(sim: FirmwareSimulator, link_path: Path) -> None:
    config = SerialConfig(port=str(link_path), steering_limits=(-0.8, 0.8), throttle_limits=(-0.25, 0.5))
    link = SerialLink(config)
    try:
        assert link.open()
        assert link.send_command(2.0, 0.9) == (0.8, 0.5)
        assert link.send_command(-0.1, -1.0) == (-0.1, -0.25)
        assert link.send_command(float("nan"), 0.2) == (0.0, 0.2)
        assert link.send_command(0.1, 0.2) == (0.1, 0.2)
        assert link.stats.clamped == 3
        assert wait_until(lambda: sim.snapshot()["last_seq"] == 4, 0.5, link.poll)  # seq 0 was the neutral
        assert (sim.snapshot()["steer_us"], sim.snapshot()["throttle_us"]) == (1550, 1600)
    finally:
        link.close()
    assert wait_until(lambda: sim.snapshot()["throttle_us"] == 1500, 0.5), "close() sends neutral"


def test_garbage_and_partial_lines_from_the_arduino_are_counted(link_path: Path) -> None:
    master, slave = os.openpty()  # the test plays the Arduino on the master side
    try:
        link_path.symlink_to(os.ttyname(slave))
        link = SerialLink(SerialConfig(port=str(link_path), heartbeat_interval_s=10.0))
        assert link.open()
        valid_t = protocol.encode(protocol.Telemetry(42, 1600, 1500, False, 7, 1))
        chunks = [
            b"\x00\xff\xfe garbage\n",  # binary noise
            b"T,1,1500,1500,0,0,0*00\n",  # bad checksum
            b"A,5,1500",  # partial line: completed by the next chunk into one bad line
            valid_t,
            b"x" * 300,  # an endless line without newline
            b"\n",
            b"\r\n",  # an empty line: ignored, not garbage
            protocol.encode(protocol.Command(1, 0, 0)),  # well-formed but not something the Arduino sends
            valid_t[:10],  # a valid line split across reads
        ]
        for chunk in chunks:
            os.write(master, chunk)
            time.sleep(0.01)
            link.poll()
        os.write(master, valid_t[10:])
        assert wait_until(lambda: link.stats.replies_ok == 1, 0.5, link.poll)
        assert link.stats.garbage_lines == 5
        assert link.stats.last_telemetry == protocol.Telemetry(42, 1600, 1500, False, 7, 1)
        assert link.stats.connected
        link.close()
    finally:
        os.close(master)
        os.close(slave)


def test_device_missing_at_start_then_appearing(tmp_path: Path, link_path: Path) -> None:
    link = SerialLink(SerialConfig(port=str(link_path), **FAST))  # type: ignore[arg-type]
    assert link.open() is False
    assert link.send_command(0.2, 0.1) is None  # no exception; nothing written, and it says so
    assert link.send_neutral() is False
    link.poll()
    assert link.ping(timeout_s=0.1) is None
    assert (link.stats.commands_sent, link.stats.unsent_commands, link.stats.connected) == (0, 2, False)
    assert link.faults() == [f"serial: {link_path} not connected"]
    with FirmwareSimulator(pty_link=link_path, status_file=tmp_path / "fw.json") as sim:
        assert wait_until(lambda: link.stats.connected, 1.0, lambda: link.send_command(0.2, 0.1))
        assert link.stats.reconnects == 1
        assert wait_until(
            lambda: sim.snapshot()["steer_us"] == 1600, 0.5, lambda: link.send_command(0.2, 0.1)
        )
        link.close()


def _start_socat(a: Path, b: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["socat", f"PTY,link={a},raw,echo=0", f"PTY,link={b},raw,echo=0"])
    if not wait_until(lambda: a.exists() and b.exists(), 5.0):
        proc.kill()
        pytest.fail("socat did not create its pty links")
    return proc


@pytest.fixture
def socat_pair(tmp_path: Path) -> Iterator[tuple[Path, Path, list[subprocess.Popen[bytes]]]]:
    if shutil.which("socat") is None:
        pytest.skip("socat not installed (apt-get install socat)")
    a, b = tmp_path / "controller-side", tmp_path / "car-side"
    procs = [_start_socat(a, b)]
    yield a, b, procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def test_unplug_mid_run_then_reconnect(
    tmp_path: Path, socat_pair: tuple[Path, Path, list[subprocess.Popen[bytes]]]
) -> None:
    """socat killed (device gone) and restarted at the same paths; the simulator runs as the fleet runs it."""
    a, b, procs = socat_pair
    status = tmp_path / "fw.json"
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rover_runtime.firmware_sim",
            "--device",
            str(a),
            "--status-file",
            str(status),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    link = SerialLink(SerialConfig(port=str(b), **FAST))  # type: ignore[arg-type]
    try:
        # The simulator process starts slowly on a loaded machine: wait until it has opened its end.
        assert wait_until(lambda: status.exists() and '"connected": true' in status.read_text(), 10.0)
        assert link.open()
        assert link.ping(timeout_s=2.0) is not None
        assert wait_until(lambda: link.stats.last_ack is not None, 0.5, lambda: link.send_command(0.4, 0.2))

        procs[0].send_signal(signal.SIGKILL)  # unplug
        procs[0].wait()
        for _ in range(20):  # the control loop keeps calling; nothing raises
            link.send_command(0.4, 0.2)
            link.poll()
            time.sleep(0.01)
        assert not link.stats.connected
        assert link.stats.disconnects == 1
        assert link.ping(timeout_s=0.05) is None

        def drive() -> None:
            link.send_command(-0.4, 0.2)
            link.poll()

        procs.append(_start_socat(a, b))  # plugged back in at the same path
        acked_before = link.stats.replies_ok
        assert wait_until(
            lambda: link.stats.connected and link.stats.replies_ok > acked_before + 2,
            5.0,
            drive,
        )
        assert link.stats.reconnects == 1
        assert wait_until(lambda: '"steer_us": 1300' in status.read_text(), 2.0, link.poll)
    finally:
        link.close()
        sim.send_signal(signal.SIGTERM)
        _, err = sim.communicate(timeout=5)
    assert sim.returncode == 0, err.decode()
    assert b"lost" in err, "the simulator noticed the device vanish"
    assert b"reopening" in err


class FakeArduino:
    """The test plays the Arduino on the master side of a pty the link opens."""

    def __init__(self, link_path: Path) -> None:
        self.master, self.slave = os.openpty()
        link_path.symlink_to(os.ttyname(self.slave))
        os.set_blocking(self.master, False)

    def say(self, *messages: protocol.Message) -> None:
        os.write(self.master, b"".join(protocol.encode(m) for m in messages))

    def heard(self, kind: type[M], timeout_s: float = 2.0) -> list[M]:
        """The messages of `kind` the link has written, waiting up to `timeout_s` for the first: a pty hands
        written bytes to the other side through a kernel work queue, so they can arrive a moment later."""
        data = b""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(BlockingIOError):
                data += os.read(self.master, 65536)
            lines = [line for line in data.split(b"\n") if line] if data.endswith(b"\n") else []
            found: list[M] = [m for m in (protocol.parse_line(line) for line in lines) if isinstance(m, kind)]
            if found or time.monotonic() >= deadline:
                return found
            select.select([self.master], [], [], 0.05)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def arduino(link_path: Path) -> Iterator[FakeArduino]:
    fake = FakeArduino(link_path)
    yield fake
    fake.close()


def _settle(link: SerialLink, seconds: float = 0.05) -> None:
    wait_until(lambda: False, seconds, link.poll)


def test_faults_name_why_the_link_cannot_be_trusted(arduino: FakeArduino, link_path: Path) -> None:
    link = SerialLink(SerialConfig(port=str(link_path), max_ack_age_s=0.2, heartbeat_interval_s=10.0))
    assert link.open()
    link.poll()
    (fault,) = link.faults()
    assert fault.startswith("serial: the firmware has not identified itself")
    pings = arduino.heard(protocol.Ping)
    assert pings, "the link asks the firmware who it is after connecting"
    arduino.say(protocol.Version(pings[-1].seq, 2, "rover_car", "2.0.0+127a292a", 0))
    _settle(link)
    assert link.firmware is not None
    assert link.firmware.protocol == 2
    assert link.stats.firmware_version == "2.0.0+127a292a"  # what the metrics and the fleet report show

    def ack_a_command(flags: int = 0) -> None:
        assert link.send_command(0.1, 0.0) is not None
        (command,) = arduino.heard(protocol.Command)
        arduino.say(protocol.Ack(command.seq, 1550, 1500, flags))
        _settle(link)

    ack_a_command()
    assert link.faults() == []
    arduino.say(protocol.Ack(999, 1500, 1500, 0))  # an ack of nothing this link sent does not count
    time.sleep(0.25)  # the newest acknowledged command is older than max_ack_age_s
    _settle(link)
    (fault,) = link.faults()
    assert fault.startswith("serial: no acknowledgement from the firmware for 0.")
    assert fault.endswith("s (max 0.2s)")
    ack_a_command(protocol.FLAG_FAILSAFE)
    assert link.faults() == ["firmware failsafe: the Arduino stopped applying the Pi's commands (timeout)"]
    arduino.say(protocol.Telemetry(100, 1600, 1500, False, 5, 0))  # the newest word: not in failsafe
    _settle(link)
    assert link.faults() == []
    link.close()


def test_an_older_firmware_is_named_with_its_protocol(arduino: FakeArduino, link_path: Path) -> None:
    link = SerialLink(SerialConfig(port=str(link_path), heartbeat_interval_s=10.0))
    assert link.open()
    link.poll()
    pings = arduino.heard(protocol.Ping)
    os.write(arduino.master, protocol.frame(f"V,{pings[-1].seq},1,rover_car,1.0.0"))  # a protocol 1 line
    _settle(link)
    (fault,) = link.faults()
    assert fault == (
        "serial: protocol mismatch: the firmware (rover_car 1.0.0 (protocol 1; no receiver or sensors)) "
        "speaks protocol 1, this runtime 2"
    )
    link.close()


def test_garbage_alone_never_makes_a_sound_link(arduino: FakeArduino, link_path: Path) -> None:
    link = SerialLink(SerialConfig(port=str(link_path), heartbeat_interval_s=10.0))
    assert link.open()
    for _ in range(50):
        os.write(arduino.master, bytes(range(256)) + b"\nA,1,1500,1500,0*00\n")
        link.poll()
    assert link.stats.garbage_lines >= 50
    assert link.stats.replies_ok == 0
    assert link.faults()[0].startswith("serial: the firmware has not identified itself")
    link.close()
