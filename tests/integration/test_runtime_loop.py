"""The control loop end to end: real SerialLink over a pty to the firmware simulator, faults injected.

Each test runs the loop in a thread with the stub policy and the synthetic camera, and reads what the
simulated Arduino actually received (its outputs in microseconds).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rover_runtime.camera import Camera, SyntheticSource
from rover_runtime.config import RuntimeConfig, load_config, make_serial_link
from rover_runtime.control_loop import ControlLoop
from rover_runtime.firmware_sim import FirmwareSimulator
from rover_runtime.policy import StubPolicy
from rover_runtime.sd_notify import Notifier

NEUTRAL = 1500
DRIVING_THROTTLE_US = 1600  # the stub's throttle 0.2 on the firmware's 1000-2000 us range


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def make_config(tmp_path: Path, **overrides: Any) -> RuntimeConfig:
    values: dict[str, Any] = {
        "control.rate_hz": 50.0,
        "camera.source": "synthetic",
        "camera.retry_interval_s": 0.3,
        "serial.port": str(tmp_path / "tty"),
        "serial.reconnect_interval_s": 0.1,
        "failsafe.inference_timeout_s": 0.2,
        "failsafe.unhealthy_after_s": 0.5,
        "metrics.path": "",
        "policy.stub": True,
    }
    values.update(overrides)
    return load_config(None, values)


class Rig:
    """Firmware simulator on a pty + the loop (stub policy, synthetic camera) running in a thread."""

    def __init__(self, tmp_path: Path, config: RuntimeConfig, notifier: Notifier | None = None) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.sim: FirmwareSimulator | None = None
        self.policy = StubPolicy(chunk_size=10, latency_s=0.005)
        self.source = SyntheticSource(64, 48, fps=30, stop_after_s=config.camera.synthetic_stop_after_s)
        self.camera = Camera(self.source, retry_interval_s=config.camera.retry_interval_s)
        self.link = make_serial_link(config.serial)
        self.loop = ControlLoop(config, self.policy, self.camera, self.link, notifier=notifier)
        self._thread = threading.Thread(target=self.loop.run, daemon=True)

    def start_sim(self) -> FirmwareSimulator:
        self.sim = FirmwareSimulator(
            pty_link=self.tmp_path / "tty", log_file=self.tmp_path / "fw.jsonl", status_file=None
        ).start()
        return self.sim

    def start(self, with_sim: bool = True) -> Rig:
        if with_sim:
            self.start_sim()
        self.link.open()
        self.camera.start()
        self._thread.start()
        return self

    def outputs(self) -> tuple[int, int, bool]:
        assert self.sim is not None
        snap = self.sim.snapshot()
        return snap["steer_us"], snap["throttle_us"], snap["failsafe"]

    def driving_on_wire(self) -> bool:
        return self.outputs()[1] == DRIVING_THROTTLE_US

    def neutral_on_wire(self) -> bool:
        _, throttle, failsafe = self.outputs()
        return throttle == NEUTRAL and not failsafe  # commanded neutral, not the firmware's own timeout

    def stop(self) -> None:
        self.loop.request_stop()
        self._thread.join(timeout=5)
        self.link.close()
        self.camera.close()
        if self.sim is not None:
            self.sim.stop()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(notifier: Notifier | None = None, **overrides: Any) -> Rig:
        rig = Rig(tmp_path, make_config(tmp_path, **overrides), notifier)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.stop()


def test_drives_then_leaves_the_car_neutral(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory().start()
    assert wait_for(rig.driving_on_wire)
    assert wait_for(lambda: rig.loop.driving)  # set just after the command is written
    snap = rig.loop.snapshot()
    assert snap["driving"] is True
    assert snap["serial"]["connected"] is True
    assert snap["inference"]["completed"] > 0
    rig.stop()
    assert rig.neutral_on_wire()
    assert not rig.loop.driving


def test_ensemble_mode_drives(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(**{"control.mode": "ensemble"}).start()
    assert wait_for(rig.driving_on_wire)
    assert wait_for(lambda: rig.loop.worker.completed >= 10)  # inference runs continuously


def test_inference_raising_goes_neutral_is_counted_and_the_loop_continues(
    rig_factory: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = rig_factory().start()
    assert wait_for(rig.driving_on_wire)
    with caplog.at_level(logging.WARNING, logger="rover_runtime"):
        rig.policy.fail(3)
        rig.loop.queue.clear()  # make the next cycle ask for a chunk (instead of waiting for the queue)
        assert wait_for(lambda: rig.loop.inference_errors >= 3)
        assert wait_for(rig.neutral_on_wire)
    cycles = rig.loop.cycles
    assert wait_for(rig.driving_on_wire)  # recovered on the next good inference
    assert rig.loop.cycles > cycles
    assert rig.loop.failsafe_count >= 1
    assert "inference failed" in caplog.text
    assert "RuntimeError: stub policy: injected inference failure" in caplog.text


def test_camera_without_frames_goes_neutral_and_is_retried(
    rig_factory: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rover_runtime"):
        rig = rig_factory(**{"camera.synthetic_stop_after_s": 1.0}).start()
        assert wait_for(rig.driving_on_wire)
        assert wait_for(rig.neutral_on_wire, timeout=3.0)
        assert wait_for(lambda: rig.camera.stats.reopens >= 1)
    assert any(r.startswith("camera stale") for r in rig.loop.failsafe_reasons)
    assert "failsafe #1: neutral (camera stale: newest frame" in caplog.text
    assert "no frames for" in caplog.text
    assert "reopening" in caplog.text


def test_serial_missing_at_start_then_plugged_unplugged_and_replugged(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory().start(with_sim=False)  # no device at the port path yet
    assert wait_for(lambda: rig.loop.cycles > 20)  # the loop runs without the Arduino
    assert not rig.link.stats.connected
    rig.start_sim()  # plugged in
    assert wait_for(rig.driving_on_wire)
    assert rig.link.stats.connected
    assert rig.sim is not None
    rig.sim.stop()  # unplugged mid-run
    assert wait_for(lambda: not rig.link.stats.connected)
    cycles = rig.loop.cycles
    assert wait_for(lambda: rig.loop.cycles > cycles + 10)  # still cycling
    rig.start_sim()  # back: a new device at the same path
    assert wait_for(rig.driving_on_wire)
    assert rig.link.stats.reconnects >= 2


def _datagrams(sock: socket.socket) -> list[tuple[float, str]]:
    out = []
    sock.settimeout(0.01)
    try:
        while True:
            out.append((time.monotonic(), sock.recv(4096).decode()))
    except TimeoutError:
        return out


def test_policy_stall_goes_neutral_and_watchdog_pings_stop_while_unhealthy(
    rig_factory: Callable[..., Rig], tmp_path: Path
) -> None:
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    try:
        rig = rig_factory(notifier=Notifier(env)).start()
        assert wait_for(rig.driving_on_wire)
        messages = [m for _, m in _datagrams(sock)]
        assert messages[0].startswith("READY=1")
        assert "WATCHDOG=1" in messages
        rig.policy.stall()
        rig.loop.queue.clear()  # the next cycle submits an inference, which hangs
        stalled_at = time.monotonic()
        assert wait_for(rig.neutral_on_wire, timeout=2.0)
        assert time.monotonic() - stalled_at < 1.0
        time.sleep(max(0.0, stalled_at + 0.7 - time.monotonic()))  # past unhealthy_after_s (0.5 s)
        assert rig.loop.inference_stalls == 1
        assert not rig.loop.healthy(time.monotonic())
        assert "WATCHDOG=1" in [m for _, m in _datagrams(sock)], "pings went on while the failsafe was young"
        time.sleep(0.5)  # ten ping intervals
        assert "WATCHDOG=1" not in [m for _, m in _datagrams(sock)]
        rig.policy.release()
        assert wait_for(rig.driving_on_wire)
        assert wait_for(lambda: any(m == "WATCHDOG=1" for _, m in _datagrams(sock)))
    finally:
        sock.close()
