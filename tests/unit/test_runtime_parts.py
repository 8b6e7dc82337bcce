"""The vehicle's parts on their own, cycle by cycle: smoothing, the action queue the bundle asks for, the
state assembled by name, the bundle's inputs matched to the config."""

from __future__ import annotations

import pytest

from rover_runtime.action_queue import ChunkQueue, TemporalEnsembler
from rover_runtime.config import load_config
from rover_runtime.drive import InputError, plan_inputs
from rover_runtime.parts import (
    CAR_STEERING,
    CAR_THROTTLE,
    CAR_TRANSMITTER,
    CAR_WHEEL_SPEED,
    COMMAND,
    PILOT_ACTION,
)
from rover_runtime.parts.pilot import PilotSettings, make_action_queue, queue_mode
from rover_runtime.parts.smoothing import SmoothingPart, SmoothingSettings
from rover_runtime.parts.state import StatePart, StateSourceError, resolve_sources
from rover_runtime.policy import StubPolicy
from rover_runtime.vehicle import Cycle

PERIOD = 0.02  # 50 Hz


def smooth(
    part: SmoothingPart, step: int, action: tuple[float, float] | None, **values: object
) -> tuple[float, float]:
    cycle = Cycle(step, step * PERIOD, values={PILOT_ACTION: action, **values})
    part.update(cycle)
    return cycle.values[COMMAND]


def test_steering_is_slew_limited_and_throttle_only_on_the_way_up() -> None:
    part = SmoothingPart(SmoothingSettings(steering_rate=1.0, throttle_rate=2.0, ramp_s=0.0, period_s=PERIOD))
    first = smooth(part, 0, (1.0, 0.5), **{CAR_STEERING: 0.0, CAR_THROTTLE: 0.0})
    assert first == pytest.approx((0.02, 0.04))  # 1.0/s and 2.0/s over one 20 ms period
    second = smooth(part, 1, (1.0, 0.5))
    assert second == pytest.approx((0.04, 0.08))
    slower = smooth(part, 2, (1.0, 0.01))
    assert slower[1] == pytest.approx(0.01)  # slowing down is never delayed
    reverse = smooth(part, 3, (1.0, -0.5))
    assert reverse[1] == pytest.approx(-0.04)  # to zero at once, then the speed-up is limited


def test_a_fault_is_neutral_at_once_and_the_ramp_starts_again() -> None:
    part = SmoothingPart(SmoothingSettings(steering_rate=0.0, throttle_rate=0.0, ramp_s=0.1, period_s=PERIOD))
    assert smooth(part, 0, (0.3, 0.5)) == (0.3, 0.0)  # the ramp's first cycle: no throttle yet
    assert smooth(part, 5, (0.3, 0.5)) == pytest.approx((0.3, 0.5))  # 0.1 s later: full
    faulty = Cycle(6, 6 * PERIOD, values={PILOT_ACTION: None})
    faulty.fault("camera front stale")
    part.update(faulty)
    assert faulty.values[COMMAND] == (0.0, 0.0)
    assert smooth(part, 7, (0.3, 0.5)) == (0.3, 0.0)  # after the fault the ramp starts from zero
    assert smooth(part, 8, (0.3, 0.5))[1] == pytest.approx(0.2)  # 0.1 s ramp: 0.2 a cycle


def test_while_the_transmitter_has_the_car_the_command_mirrors_the_driver() -> None:
    part = SmoothingPart(SmoothingSettings(steering_rate=1.0, throttle_rate=1.0, ramp_s=0.0, period_s=PERIOD))
    held = Cycle(
        0,
        0.0,
        values={PILOT_ACTION: (-1.0, 0.5), CAR_TRANSMITTER: True, CAR_STEERING: 0.8, CAR_THROTTLE: 0.4},
    )
    held.hold("transmitter in charge: manual")
    part.update(held)
    assert held.values[COMMAND] == (0.8, 0.4)
    # The switch hands the car to the Pi: the limits continue from the driver's command.
    handed = smooth(part, 1, (-1.0, 0.5), **{CAR_STEERING: 0.8, CAR_THROTTLE: 0.4})
    assert handed == pytest.approx((0.78, 0.42))


def _settings(mode: str, coeff: float = -1.0) -> PilotSettings:
    return PilotSettings(mode, 0, coeff, 1, 0.5, PERIOD)


def test_temporal_ensembling_follows_the_bundle_unless_the_config_says() -> None:
    trained_with = StubPolicy(chunk_size=10, temporal_ensemble_coeff=0.05).info
    trained_without = StubPolicy(chunk_size=10).info
    assert queue_mode(_settings("auto"), trained_with) == "ensemble"
    assert queue_mode(_settings("auto"), trained_without) == "chunk"
    assert queue_mode(_settings("chunk"), trained_with) == "chunk"
    queue = make_action_queue(_settings("auto"), trained_with)
    assert isinstance(queue, TemporalEnsembler)
    assert queue.coeff == 0.05  # the bundle's
    configured = make_action_queue(_settings("ensemble", 0.2), trained_with)
    assert isinstance(configured, TemporalEnsembler)
    assert configured.coeff == 0.2  # the config's, over the bundle's
    default = make_action_queue(_settings("ensemble"), trained_without)
    assert isinstance(default, TemporalEnsembler)
    assert default.coeff == 0.01  # ACT's default when neither says
    assert isinstance(make_action_queue(_settings("auto"), trained_without), ChunkQueue)


def test_state_sources_by_name_and_by_config() -> None:
    sources = resolve_sources(("steer", "throttle", "velocity"), ())
    assert [s.name for s in sources] == ["steering", "throttle", "wheel_speed_mps"]
    sources = resolve_sources(("a", "b"), (("a", "throttle"), ("b", "battery_v")))
    assert [s.name for s in sources] == ["throttle", "battery_v"]
    with pytest.raises(StateSourceError) as excinfo:
        resolve_sources(("steer", "odometer", "gear"), (("gear", "gearbox"), ("brake", "steering")))
    message = str(excinfo.value)
    assert "state 'odometer' has no source" in message
    assert "[state] gear = 'gearbox': no such source" in message
    assert "[state] brake = 'steering': the bundle has no state named 'brake'" in message


def test_the_state_part_faults_until_every_source_has_a_value() -> None:
    part = StatePart(
        ("steer", "throttle", "speed_mps"), resolve_sources(("steer", "throttle", "speed_mps"), ())
    )
    cycle = Cycle(0, 0.0, values={CAR_STEERING: 0.1, CAR_THROTTLE: 0.2, CAR_WHEEL_SPEED: None})
    part.update(cycle)
    assert cycle.faults == ["state: speed_mps has no value yet (source wheel_speed_mps)"]
    cycle = Cycle(1, 0.02, values={CAR_STEERING: 0.1, CAR_THROTTLE: 0.2, CAR_WHEEL_SPEED: 1.5})
    part.update(cycle)
    assert cycle.values["state"] == (0.1, 0.2, 1.5)


def test_every_camera_needs_a_device_and_each_problem_is_named() -> None:
    keys = ("observation.images.front", "observation.images.rear")
    config = load_config(None, {"camera.device": "0"})
    with pytest.raises(InputError) as excinfo:
        plan_inputs(config, keys, ("steering", "throttle", "odometer"))
    message = str(excinfo.value)
    assert "camera 'front' (observation.images.front) has no device" in message
    assert "camera 'rear' (observation.images.rear) has no device" in message
    assert "state 'odometer' has no source" in message
    mapped = load_config(None, {"cameras.front": "/dev/video0", "cameras.observation.images.rear": "2"})
    plan = plan_inputs(mapped, keys, ("steering", "throttle"))
    assert [(c.name, c.device) for c in plan.cameras] == [("front", "/dev/video0"), ("rear", "2")]
    one = plan_inputs(config, keys[:1], ("steering", "throttle"))
    assert one.cameras[0].device is None  # a one-camera bundle uses camera.device
    with pytest.raises(InputError, match=r"\[cameras\] side: the bundle has no camera of that name"):
        plan_inputs(load_config(None, {"cameras.side": "3"}), keys[:1], ("steering", "throttle"))
