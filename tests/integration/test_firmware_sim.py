"""The firmware simulator as the fleet runs it (`python -m rover_runtime.firmware_sim`), over real ptys.

The failsafe is measured from the simulator's own log (monotonic timestamps, the same clock as this
process): neutral within its timeout of the last valid command, also after the sender is SIGKILLed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rover_runtime.serial_link import SerialConfig, SerialLink

REPO = Path(__file__).resolve().parents[2]
MARGIN_S = 0.1  # scheduling slack on a busy 2-core machine (benchmarks/serial_failsafe.py measures it)


class SimProcess:
    def __init__(self, tmp_path: Path, timeout_ms: int) -> None:
        self.link = tmp_path / "rover-arduino"
        self.status = tmp_path / "fw.json"
        self.log = tmp_path / "fw.jsonl"
        self.timeout_s = timeout_ms / 1000
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rover_runtime.firmware_sim",
                "--pty-link",
                str(self.link),
                "--timeout-ms",
                str(timeout_ms),
                "--status-file",
                str(self.status),
                "--log",
                str(self.log),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not (self.link.exists() and self.status.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"firmware_sim did not start: {err}")
            time.sleep(0.01)

    def status_data(self) -> dict[str, Any]:
        return json.loads(self.status.read_text())

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=5)
        return self.proc.returncode, err.decode()


@pytest.fixture
def sim_250(tmp_path: Path) -> Iterator[SimProcess]:
    sim = SimProcess(tmp_path, 250)
    yield sim
    sim.stop()


def _failsafe_after(events: list[dict[str, Any]], t: float) -> dict[str, Any]:
    later = [e for e in events if e["event"] == "failsafe" and e["mono"] >= t]
    assert later, f"no failsafe after {t}: {events}"
    return later[0]


@pytest.mark.parametrize("timeout_ms", [100, 250])
def test_neutral_within_the_timeout_after_the_last_command(tmp_path: Path, timeout_ms: int) -> None:
    sim = SimProcess(tmp_path, timeout_ms)
    link = SerialLink(SerialConfig(port=str(sim.link)))
    try:
        assert link.open()
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            link.send_command(0.6, 0.4)
            time.sleep(1 / 30)
        last_send = time.monotonic()
        time.sleep(sim.timeout_s + 0.2)  # no more commands, no poll(): no heartbeats either
        status = sim.status_data()
        failsafe = _failsafe_after(sim.events(), last_send - 0.05)
        assert (failsafe["steer_us"], failsafe["throttle_us"]) == (1500, 1500)
        reaction = failsafe["mono"] - status["last_valid_mono"]
        assert sim.timeout_s - 0.002 <= reaction <= sim.timeout_s + MARGIN_S
        assert failsafe["mono"] - last_send <= sim.timeout_s + MARGIN_S
        assert (status["failsafe"], status["steer_us"], status["failsafe_events"]) == (True, 1500, 1)
        driving = [e for e in sim.events() if e["event"] == "command"]
        assert (driving[-1]["steer_us"], driving[-1]["throttle_us"]) == (1800, 1700)
    finally:
        link.close()
        assert sim.stop()[0] == 0


_SENDER = """
import sys, time
from rover_runtime.serial_link import SerialConfig, SerialLink
link = SerialLink(SerialConfig(port=sys.argv[1]))
assert link.open()
print("ready", flush=True)
while True:
    link.send_command(-0.5, 0.3)
    link.poll()
    time.sleep(1 / 30)
"""


def test_neutral_within_the_timeout_after_the_sender_is_sigkilled(sim_250: SimProcess) -> None:
    sender = subprocess.Popen(
        [sys.executable, "-c", _SENDER, str(sim_250.link)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert sender.stdout is not None
        assert sender.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 2
        while sim_250.status_data()["steer_us"] != 1250 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sim_250.status_data()["throttle_us"] == 1650
        time.sleep(0.2)
        killed_at = time.monotonic()
        sender.send_signal(signal.SIGKILL)
        sender.wait()
        time.sleep(0.45)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    failsafe = _failsafe_after(sim_250.events(), killed_at - 0.1)
    assert failsafe["mono"] - killed_at <= 0.25 + MARGIN_S
    assert failsafe["mono"] - killed_at >= 0.25 - 1 / 30 - 0.02  # not before its timeout
    assert sim_250.status_data()["throttle_us"] == 1500


def test_survives_the_client_closing_and_reopening(sim_250: SimProcess) -> None:
    for round_ in range(3):
        link = SerialLink(SerialConfig(port=str(sim_250.link)))
        assert link.open()
        version = link.ping(timeout_s=0.5)
        assert version is not None, f"round {round_}"
        assert version.describe() == "rover_car 2.0.0 (protocol 2; wheel_speed, battery)"
        link.send_command(0.1 * (round_ + 1), 0.0)
        deadline = time.monotonic() + 0.5
        while sim_250.status_data()["steer_us"] != 1500 + 50 * (round_ + 1) and time.monotonic() < deadline:
            link.poll()
            time.sleep(0.01)
        assert sim_250.status_data()["steer_us"] == 1500 + 50 * (round_ + 1)
        link.close()
        time.sleep(0.3)  # telemetry written while nobody listens is dropped, not queued forever
    status = sim_250.status_data()
    assert status["rx_bad"] == 0
    code, err = sim_250.stop()
    assert code == 0, err
    assert not sim_250.link.exists(), "the pty link is removed on SIGTERM"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pty-link", "/tmp/x", "--timeout-ms", "0"], "--timeout-ms must be in [1, 60000]"),
        (["--pty-link", "/nonexistent-dir/x"], "--pty-link: directory /nonexistent-dir does not exist"),
        (["--pty-link", "/tmp/x", "--status-file", "/nonexistent-dir/s.json"], "--status-file: directory"),
        ([], "one of the arguments --device --pty-link is required"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rover_runtime.firmware_sim", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_device_that_is_not_a_tty_is_refused(tmp_path: Path) -> None:
    not_a_tty = tmp_path / "plain-file"
    not_a_tty.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "rover_runtime.firmware_sim", "--device", str(not_a_tty)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert f"{not_a_tty} is not a tty" in result.stderr
