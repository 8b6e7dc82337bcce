"""The vehicle end to end: real SerialLink over a pty to the firmware simulator, faults injected.

Each test runs the vehicle (built by `rover_runtime.drive.build_vehicle`, as `rover-runtime run` builds it)
in a thread with the stub policy and synthetic cameras, and reads what the simulated Arduino actually
received (its outputs in microseconds).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rover_runtime import protocol
from rover_runtime.camera import Camera, SyntheticSource
from rover_runtime.config import RuntimeConfig, load_config, make_serial_link
from rover_runtime.drive import build_vehicle
from rover_runtime.firmware_sim import FirmwareLimits, FirmwareSimulator
from rover_runtime.parts.pilot import PilotPart
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
        "smoothing.ramp_s": 0.0,
        "smoothing.throttle_rate": 0.0,
        "smoothing.steering_rate": 0.0,
    }
    values.update(overrides)
    return load_config(None, values)


class Rig:
    """Firmware simulator on a pty + the vehicle (stub policy, synthetic cameras) running in a thread."""

    def __init__(
        self,
        tmp_path: Path,
        config: RuntimeConfig,
        notifier: Notifier | None = None,
        policy: StubPolicy | None = None,
        sim_limits: FirmwareLimits | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.sim_limits = sim_limits
        self.sim: FirmwareSimulator | None = None
        self.policy = policy or StubPolicy(chunk_size=10, latency_s=0.005)
        self.sources = {
            key.rsplit(".", 1)[-1]: SyntheticSource(
                64, 48, fps=30, stop_after_s=config.camera.synthetic_stop_after_s
            )
            for key in self.policy.info.image_keys
        }
        self.cameras = [
            Camera(source, retry_interval_s=config.camera.retry_interval_s, name=name)
            for name, source in self.sources.items()
        ]
        self.camera = self.cameras[0]
        self.source = self.sources[self.camera.name]
        self.link = make_serial_link(config.serial)
        self.vehicle = build_vehicle(config, self.policy, self.link, cameras=self.cameras, notifier=notifier)
        self.pilot = next(p for p in self.vehicle.parts if isinstance(p, PilotPart))
        self._thread = threading.Thread(target=self.vehicle.run, daemon=True)

    def start_sim(self) -> FirmwareSimulator:
        self.sim = FirmwareSimulator(
            pty_link=self.tmp_path / "tty",
            log_file=self.tmp_path / "fw.jsonl",
            status_file=None,
            limits=self.sim_limits,
            rc_file=self.tmp_path / "rc.json",
        ).start()
        return self.sim

    def start(self, with_sim: bool = True) -> Rig:
        if with_sim:
            self.start_sim()
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

    def set_receiver(self, steer_us: int, throttle_us: int, switch_us: int) -> None:
        path = self.tmp_path / "rc.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"steer_us": steer_us, "throttle_us": throttle_us, "switch_us": switch_us}))
        tmp.replace(path)

    def stop(self) -> None:
        self.vehicle.request_stop()
        self._thread.join(timeout=5)
        self.link.close()
        if self.sim is not None:
            self.sim.stop()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(
        notifier: Notifier | None = None,
        policy: StubPolicy | None = None,
        sim_limits: FirmwareLimits | None = None,
        **overrides: Any,
    ) -> Rig:
        rig = Rig(tmp_path, make_config(tmp_path, **overrides), notifier, policy, sim_limits)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.stop()


def test_drives_then_leaves_the_car_neutral(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    assert rig.vehicle.snapshot()["driving_age_s"] is None  # never drove
    rig.start()
    assert wait_for(rig.driving_on_wire)
    assert wait_for(lambda: rig.vehicle.driving)  # set just after the command is written
    snap = rig.vehicle.snapshot()
    assert snap["driving"] is True
    assert 0 <= snap["driving_age_s"] < 0.5
    assert snap["serial"]["connected"] is True
    assert snap["inference"]["completed"] > 0
    rig.stop()
    assert rig.neutral_on_wire()
    assert not rig.vehicle.driving


def test_ensemble_mode_drives(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(**{"control.mode": "ensemble"}).start()
    assert wait_for(rig.driving_on_wire)
    assert wait_for(lambda: rig.pilot.worker.completed >= 10)  # inference runs continuously


def test_inference_raising_goes_neutral_is_counted_and_the_loop_continues(
    rig_factory: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = rig_factory().start()
    assert wait_for(rig.driving_on_wire)
    with caplog.at_level(logging.WARNING, logger="rover_runtime"):
        rig.policy.fail(3)
        rig.pilot.queue.clear()  # make the next cycle ask for a chunk (instead of waiting for the queue)
        assert wait_for(lambda: rig.pilot.errors >= 3)
        assert wait_for(rig.neutral_on_wire)
    cycles = rig.vehicle.cycles
    assert wait_for(rig.driving_on_wire)  # recovered on the next good inference
    assert rig.vehicle.cycles > cycles
    assert rig.vehicle.failsafe_count >= 1
    assert "inference failed" in caplog.text
    assert "RuntimeError: stub policy: injected inference failure" in caplog.text


def test_camera_without_frames_goes_neutral_and_is_retried(
    rig_factory: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    started = time.time()
    with caplog.at_level(logging.WARNING, logger="rover_runtime"):
        rig = rig_factory(**{"camera.synthetic_stop_after_s": 1.0}).start()
        assert wait_for(rig.driving_on_wire)
        assert wait_for(rig.neutral_on_wire, timeout=3.0)
        failsafe = rig.vehicle.snapshot()["failsafe"]
        # It began after the frames stopped (1 s in), by the runtime's own clock, and is still on.
        assert failsafe["active"], failsafe
        assert started + 1.0 < failsafe["since_unix"] <= time.time(), failsafe
        assert wait_for(lambda: rig.camera.stats.reopens >= 1)
    assert any(r.startswith("camera front") for r in rig.vehicle.failsafe_reasons)
    assert "failsafe #1: neutral (camera front stale: newest frame" in caplog.text
    assert "no frames for" in caplog.text
    assert "reopening" in caplog.text


def test_serial_missing_at_start_then_plugged_unplugged_and_replugged(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory().start(with_sim=False)  # no device at the port path yet
    assert wait_for(lambda: rig.vehicle.cycles > 20)  # the loop runs without the Arduino
    assert not rig.link.stats.connected
    rig.start_sim()  # plugged in
    assert wait_for(rig.driving_on_wire)
    assert rig.link.stats.connected
    assert rig.sim is not None
    rig.sim.stop()  # unplugged mid-run
    assert wait_for(lambda: not rig.link.stats.connected)
    cycles = rig.vehicle.cycles
    assert wait_for(lambda: rig.vehicle.cycles > cycles + 10)  # still cycling
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
        rig.pilot.queue.clear()  # the next cycle submits an inference, which hangs
        stalled_at = time.monotonic()
        assert wait_for(rig.neutral_on_wire, timeout=2.0)
        assert time.monotonic() - stalled_at < 1.0
        # A fault after inference_timeout_s (0.2 s), unhealthy after unhealthy_after_s (0.5 s) more.
        time.sleep(max(0.0, stalled_at + 0.9 - time.monotonic()))
        assert rig.pilot.stalls == 1
        assert not rig.vehicle.healthy(time.monotonic())
        assert "WATCHDOG=1" in [m for _, m in _datagrams(sock)], "pings went on while the failsafe was young"
        time.sleep(0.5)  # ten ping intervals
        assert "WATCHDOG=1" not in [m for _, m in _datagrams(sock)]
        rig.policy.release()
        assert wait_for(rig.driving_on_wire)
        assert wait_for(lambda: any(m == "WATCHDOG=1" for _, m in _datagrams(sock)))
    finally:
        sock.close()


def test_acks_that_stop_under_a_garbage_flood_drop_health_and_stop_the_watchdog(
    rig_factory: Callable[..., Rig], tmp_path: Path
) -> None:
    """The firmware stops answering and the line fills with garbage: the loop keeps its rate, but the car
    is not driving, the reason names the missing acknowledgements, and after the grace period the runtime
    is unhealthy (no more watchdog pings)."""
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    stop_flood = threading.Event()
    try:
        rig = rig_factory(notifier=Notifier(env)).start()
        assert wait_for(lambda: rig.vehicle.driving)
        assert rig.sim is not None
        sim = rig.sim
        sim.mute()

        def flood() -> None:
            noise = bytes(range(256)) * 4 + b"\nT,1,2,3*ZZ\n"
            while not stop_flood.is_set():
                sim.inject(noise)
                time.sleep(0.002)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        muted_at = time.monotonic()
        assert wait_for(lambda: not rig.vehicle.driving, timeout=2.0)
        assert time.monotonic() - muted_at < 0.5 + 0.15  # serial.max_ack_age_s plus a few periods
        assert any("no acknowledgement from the firmware" in r for r in rig.vehicle.failsafe_reasons)
        time.sleep(max(0.0, muted_at + 1.2 - time.monotonic()))  # past max_ack_age + unhealthy_after_s
        _datagrams(sock)
        assert not rig.vehicle.healthy(time.monotonic())
        time.sleep(0.3)
        assert "WATCHDOG=1" not in [m for _, m in _datagrams(sock)]
        snap = rig.vehicle.snapshot()
        assert snap["healthy"] is False
        assert snap["driving"] is False
        # It drove until the acks stopped: the deploy's driving guard still sees a car on the road.
        assert 1.0 < snap["driving_age_s"] < 3.0
        assert snap["serial"]["garbage_lines"] > 100
        cycles = rig.vehicle.cycles
        time.sleep(0.2)
        assert rig.vehicle.cycles - cycles >= 8  # still cycling at about 50 Hz
        stop_flood.set()
        flooder.join()
        sim.mute(False)
        assert wait_for(lambda: rig.vehicle.driving)  # answers again: driving again
        assert wait_for(lambda: rig.vehicle.healthy(time.monotonic()))
    finally:
        stop_flood.set()
        sock.close()


def test_the_firmwares_failsafe_flag_is_a_fault(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory().start()
    assert wait_for(lambda: rig.vehicle.driving)
    assert rig.sim is not None
    rig.sim.mute()
    stop = threading.Event()

    def failsafe_acks() -> None:  # acks arrive, but say the firmware holds neutral
        seq = 0
        while not stop.is_set():
            assert rig.sim is not None
            rig.sim.inject(protocol.encode(protocol.Ack(seq, 1500, 1500, protocol.FLAG_FAILSAFE)))
            seq += 1
            time.sleep(0.02)

    thread = threading.Thread(target=failsafe_acks, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: any(r.startswith("firmware failsafe") for r in rig.vehicle.failsafe_reasons))
        assert not rig.vehicle.driving
    finally:
        stop.set()
        thread.join()


def test_a_replugged_arduino_with_other_firmware_is_not_driven(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory().start()
    assert wait_for(lambda: rig.vehicle.driving)
    assert rig.sim is not None
    rig.sim.stop()  # unplugged ...
    rig.sim_limits = FirmwareLimits(protocol_version=1)
    rig.start_sim()  # ... and a board with protocol 1 firmware plugged in at the same path
    assert wait_for(lambda: any("protocol mismatch" in r for r in rig.vehicle.failsafe_reasons))
    (reason,) = [r for r in rig.vehicle.failsafe_reasons if "protocol mismatch" in r]
    assert "speaks protocol 1, this runtime 2" in reason
    time.sleep(0.3)
    assert not rig.vehicle.driving
    assert rig.outputs()[1] == NEUTRAL


def test_the_transmitter_is_in_charge(rig_factory: Callable[..., Rig]) -> None:
    """Manual: the driver's sticks reach the car, the Pi is not driving but healthy, and its state is the
    driver's command. Autopilot: the Pi drives, continuing smoothly from the driver's steering. Receiver
    lost: neutral."""
    rig = rig_factory(
        sim_limits=FirmwareLimits(rc_receiver=True),
        **{"smoothing.steering_rate": 1.0, "smoothing.throttle_rate": 1.0},
    )
    rig.set_receiver(1900, 1700, 1000)  # manual, steering hard right, some throttle
    rig.start()
    assert wait_for(lambda: rig.outputs()[:2] == (1900, 1700))
    assert wait_for(lambda: rig.vehicle.snapshot()["rc"]["mode"] == "manual")
    snap = rig.vehicle.snapshot()
    assert snap["driving"] is False
    assert snap["healthy"] is True
    assert snap["failsafe"]["active"] is False
    assert snap["failsafe"]["since_unix"] is None
    assert snap["failsafe"]["holds"] == ["transmitter in charge: manual"]
    assert snap["state"]["values"] == [pytest.approx(0.8), pytest.approx(0.4)]  # the driver's command
    # The policy keeps running in manual (autopilot resumes at once), on the driver's command as its state.
    assert wait_for(lambda: rig.policy.last_state == pytest.approx((0.8, 0.4)))
    log = rig.tmp_path / "fw.jsonl"
    before = len(log.read_text().splitlines())
    rig.set_receiver(1900, 1700, 2000)  # the switch to autopilot
    assert wait_for(lambda: rig.vehicle.driving)
    # The ack says at once that the Pi's command applies; the mode comes with the next R line (100 ms).
    assert wait_for(lambda: rig.vehicle.snapshot()["rc"]["mode"] == "autopilot_neutral_fallback")
    changes = [json.loads(line) for line in log.read_text().splitlines()[before:]]
    assert changes, "the outputs changed after the switch"
    first = changes[0]
    assert 1880 <= first["steer_us"] <= 1900  # from the driver's 0.8, at most 1.0/s (0.02 a cycle)
    assert all(c["throttle_us"] <= 1700 for c in changes)  # slowing to the policy's 0.2: no jump up
    (rig.tmp_path / "rc.json").unlink()  # the transmitter switched off: no pulses
    assert wait_for(lambda: rig.vehicle.snapshot()["rc"]["mode"] == "rc_lost")
    assert wait_for(lambda: rig.outputs()[:2] == (NEUTRAL, NEUTRAL))
    assert wait_for(lambda: not rig.vehicle.driving, timeout=0.2)  # the next acknowledgement says so


def test_throttle_ramps_up_after_a_failsafe(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(**{"smoothing.ramp_s": 2.0}).start()
    assert wait_for(rig.driving_on_wire)
    log = rig.tmp_path / "fw.jsonl"
    rig.source.stall()
    assert wait_for(rig.neutral_on_wire)
    before = len(log.read_text().splitlines())
    rig.source.resume()
    assert wait_for(rig.driving_on_wire)
    throttles = [json.loads(line)["throttle_us"] for line in log.read_text().splitlines()[before:]]
    ramp = sorted({t for t in throttles if NEUTRAL < t < DRIVING_THROTTLE_US})
    # The cap grows 0.01 a cycle (2 s at 50 Hz): the policy's 0.2 is reached over 0.4 s in small steps.
    assert len(ramp) >= 10, throttles
    assert throttles == sorted(throttles)


def test_an_empty_action_queue_does_not_throw_away_the_running_inference(
    rig_factory: Callable[..., Rig],
) -> None:
    """Inference slower than a chunk lasts: the queue runs dry again and again. Each time is a short hold:
    no failsafe, no dropped result, and the car drives on when the chunk arrives."""
    # A chunk of 10 steps arrives 6 steps after it was asked for, and the next is asked for then: the
    # queue runs dry for about 2 of every 6 steps.
    slow = StubPolicy(chunk_size=10, latency_s=0.12)
    rig = rig_factory(policy=slow).start()
    assert wait_for(rig.driving_on_wire)
    failsafes = rig.vehicle.failsafe_count
    time.sleep(1.5)
    snap = rig.vehicle.snapshot()
    assert snap["inference"]["underruns"] >= 3
    assert snap["inference"]["dropped_results"] == 0
    assert rig.vehicle.failsafe_count == failsafes
    assert rig.pilot.worker.completed >= 8


def test_the_black_box_records_autopilot_takeover_and_manual(
    rig_factory: Callable[..., Rig], tmp_path: Path
) -> None:
    """The recorder in the real loop: an episode begins with the driving modes, marks the driver's takeover,
    records what the car applied (the driver's sticks in manual) and frames at the bundle's size, and ends
    when the receiver's signal is lost."""
    from rover_runtime.episode_format import (  # noqa: PLC0415
        EPISODES,
        FRAMES_SUFFIX,
        decode_jpeg,
        finished_episodes,
    )

    rig = rig_factory(
        sim_limits=FirmwareLimits(rc_receiver=True),
        **{"record.enabled": True, "record.directory": str(tmp_path / "rec"), "record.end_after_s": 0.3},
    )
    rig.set_receiver(1500, 1500, 1500)  # autopilot: the Pi drives
    rig.start()
    assert wait_for(rig.driving_on_wire)
    time.sleep(0.5)
    rig.set_receiver(1900, 1700, 1000)  # the driver grabs the transmitter: manual
    assert wait_for(lambda: rig.outputs()[:2] == (1900, 1700))
    time.sleep(0.5)
    rig.set_receiver(1500, 1500, 1500)  # back to the Pi
    assert wait_for(rig.driving_on_wire)
    time.sleep(0.3)
    (rig.tmp_path / "rc.json").unlink()  # the transmitter switched off: the episode ends
    episodes_dir = tmp_path / "rec" / EPISODES
    assert wait_for(lambda: len(finished_episodes(episodes_dir)) == 1, timeout=5)
    (episode,) = finished_episodes(episodes_dir)
    meta = json.loads((episode / "episode.json").read_text())
    lines = [json.loads(line) for line in (episode / "steps.jsonl").read_text().splitlines()]
    assert meta["end_reason"] == "mode"
    assert meta["steps"] == len(lines) >= 50  # about 1.3 s at 50 Hz
    assert meta["modes"]["autopilot"] >= 20
    assert meta["modes"]["manual"] >= 10
    assert len(meta["takeovers"]) == 1
    start, end = meta["takeovers"][0]
    manual = lines[start:end]
    assert all(line["driver"] for line in manual)
    assert [0.8, 0.4] in [line["applied"] for line in manual]  # the driver's sticks, as the car applied them
    assert all(line["command"] is not None for line in lines[: start - 1])  # the Pi's commands before
    assert all(0 < line["latency_ms"] < 1000 for line in lines[5:])  # the stub's ~5 ms inferences
    offset, length, _ = lines[-1]["frames"]["front"]
    frames = (episode / f"front{FRAMES_SUFFIX}").read_bytes()
    assert decode_jpeg(frames[offset : offset + length]).shape == (96, 128, 3)  # the bundle's size
    assert wait_for(lambda: rig.vehicle.snapshot()["recorder"]["episodes_finished"] == 1)
    assert rig.vehicle.snapshot()["recorder"]["steps_dropped"] == 0
