"""The one place the runtime's parts are composed into a vehicle, and the inputs a bundle asks for are
matched to what the car has.

Order of the parts (each sees what the earlier ones wrote; see `rover_runtime.parts`):
serial in -> cameras -> transmitter -> state -> policy -> smoothing -> serial out -> recorder (when
`record.enabled`).

`plan_inputs` checks, before anything moves, that every camera the bundle lists has a device and every
entry of its state a source, and raises InputError naming every input the car cannot supply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rover_runtime.camera import Camera, make_source
from rover_runtime.config import RuntimeConfig
from rover_runtime.episode_format import CameraSpec, EpisodeInfo
from rover_runtime.parts.cameras import CameraPart
from rover_runtime.parts.car import CarInput, CarOutput
from rover_runtime.parts.pilot import PilotPart, PilotSettings
from rover_runtime.parts.recorder import RecorderPart
from rover_runtime.parts.smoothing import SmoothingPart, SmoothingSettings
from rover_runtime.parts.state import Source, StatePart, StateSourceError, needed_features, resolve_sources
from rover_runtime.parts.transmitter import TransmitterPart
from rover_runtime.policy import Policy, PolicyInfo
from rover_runtime.recording import Recorder, RecorderSettings, default_car_name
from rover_runtime.sd_notify import Notifier
from rover_runtime.serial_link import SerialLink
from rover_runtime.vehicle import Part, Vehicle, VehicleSettings


class InputError(ValueError):
    """The bundle asks for an input this car's config cannot supply; the message names every one."""


@dataclass(frozen=True)
class CameraPlan:
    name: str  # short name: the image key's last dotted part ("front"), unless two cameras share it
    key: str  # the bundle's image key
    device: str | None  # from [cameras]; None = camera.device (one-camera bundles) or a synthetic source


@dataclass(frozen=True)
class InputPlan:
    cameras: tuple[CameraPlan, ...]
    state_sources: tuple[Source, ...]
    needed_features: dict[int, str]  # protocol.FEATURE_* -> why, for the firmware check


def plan_inputs(config: RuntimeConfig, image_keys: Sequence[str], state_names: Sequence[str]) -> InputPlan:
    problems: list[str] = []
    cameras = _plan_cameras(config, image_keys, problems)
    try:
        sources = resolve_sources(state_names, config.state)
    except StateSourceError as exc:
        problems.append(str(exc))
        sources = []
    if problems:
        raise InputError("; ".join(problems))
    return InputPlan(tuple(cameras), tuple(sources), needed_features(state_names, sources))


def _plan_cameras(config: RuntimeConfig, image_keys: Sequence[str], problems: list[str]) -> list[CameraPlan]:
    shorts = [key.rsplit(".", 1)[-1] for key in image_keys]
    names = [
        short if shorts.count(short) == 1 else key for short, key in zip(shorts, image_keys, strict=True)
    ]
    table = dict(config.cameras)
    known = set(names) | set(image_keys)
    for entry in sorted(set(table) - known):
        problems.append(
            f"[cameras] {entry}: the bundle has no camera of that name (its cameras: {', '.join(names)})"
        )
    plans = []
    for name, key in zip(names, image_keys, strict=True):
        device = table.get(key, table.get(name))
        needs_mapping = len(image_keys) > 1 and config.camera.source != "synthetic"
        if device is None and needs_mapping:
            what = "video file" if config.camera.source == "file" else "device"
            problems.append(
                f'camera {name!r} ({key}) has no {what}: add {name} = "..." to the config\'s [cameras] '
                f"table (the bundle takes {len(image_keys)} cameras: {', '.join(names)})"
            )
        plans.append(CameraPlan(name, key, device))
    return plans


def make_cameras(config: RuntimeConfig, plan: InputPlan) -> list[Camera]:
    return [
        Camera(
            make_source(config.camera, c.device),
            config.camera.retry_interval_s,
            name=c.name,
            nice=config.control.background_nice,
        )
        for c in plan.cameras
    ]


def build_vehicle(
    config: RuntimeConfig,
    policy: Policy,
    link: SerialLink,
    *,
    plan: InputPlan | None = None,
    cameras: Sequence[Camera] | None = None,
    notifier: Notifier | None = None,
    record_timings: bool = False,
    extra_parts: Sequence[Part] = (),
    neutral_only: bool = False,
) -> Vehicle:
    """The vehicle for this config and policy. `cameras` replaces the ones the config describes (tests and
    benchmarks pass synthetic ones, one per camera of the plan, same names). `extra_parts` run after the
    command is sent (e.g. a recorder). `neutral_only` writes neutral whatever the policy says (benchmarks)."""
    info = policy.info
    plan = plan or plan_inputs(config, info.image_keys, info.state_names)
    cams = list(cameras) if cameras is not None else make_cameras(config, plan)
    if [c.name for c in cams] != [c.name for c in plan.cameras]:
        raise ValueError(
            f"cameras {[c.name for c in cams]} do not match the plan {[c.name for c in plan.cameras]}"
        )
    period = config.control.period_s
    parts: list[Part] = [
        CarInput(link, plan.needed_features),
        *(CameraPart(camera, config.camera.max_frame_age_s) for camera in cams),
        TransmitterPart(),
        StatePart(info.state_names, plan.state_sources),
        PilotPart(
            policy,
            PilotSettings(
                mode=config.control.mode,
                n_action_steps=config.control.n_action_steps,
                temporal_ensemble_coeff=config.control.temporal_ensemble_coeff,
                request_margin_steps=config.control.request_margin_steps,
                inference_timeout_s=config.failsafe.inference_timeout_s,
                period_s=period,
                background_nice=config.control.background_nice,
            ),
            [camera.name for camera in cams],
        ),
        SmoothingPart(
            SmoothingSettings(
                steering_rate=config.smoothing.steering_rate,
                throttle_rate=config.smoothing.throttle_rate,
                ramp_s=config.smoothing.ramp_s,
                period_s=period,
            )
        ),
        CarOutput(link, neutral_only=neutral_only),
        *([make_recorder_part(config, info, plan)] if config.record.enabled else []),
        *extra_parts,
    ]
    settings = VehicleSettings(
        rate_hz=config.control.rate_hz,
        spin_s=config.control.spin_s,
        unhealthy_after_s=config.failsafe.unhealthy_after_s,
        realtime_priority=config.control.realtime_priority,
    )
    static = {
        "release": release_info(config.source),
        "bundle": {
            "content_hash": info.content_hash,
            "mode": info.mode,
            "backend": info.backend,
            "engine": info.engine,
            "model_bytes": info.model_bytes,
            "threads": info.threads,
            "image_keys": list(info.image_keys),
            "state_names": list(info.state_names),
            "path": config.policy.bundle if info.backend != "stub" else None,
        },
    }
    return Vehicle(parts, settings, notifier=notifier, info=static, record_timings=record_timings)


def make_recorder_part(config: RuntimeConfig, info: PolicyInfo, plan: InputPlan) -> RecorderPart:
    """The black box for this config: episodes at the bundle's image sizes, named for this car and release."""
    record = config.record
    shapes = dict(zip(info.image_keys, info.image_shapes, strict=True))
    episode = EpisodeInfo(
        car=record.car or default_car_name(),
        release=release_info(config.source)["id"],
        bundle=info.content_hash,
        cameras=tuple(CameraSpec(c.name, c.key, shapes[c.key]) for c in plan.cameras),
        state_names=info.state_names,
        action_names=info.action_names,
    )
    settings = RecorderSettings(
        directory=Path(record.directory),
        max_bytes=int(record.max_gb * 1e9),
        min_free_bytes=int(record.min_free_mb * 1e6),
        episode_max_s=record.episode_max_s,
        end_after_s=record.end_after_s,
        min_steps=max(1, int(config.control.rate_hz)),  # a recovered episode keeps at least a second
        queue_steps=max(1, int(record.queue_s * config.control.rate_hz)),
        jpeg_quality=record.jpeg_quality,
        fps=config.control.rate_hz,
        nice=config.control.background_nice,
    )
    return RecorderPart(Recorder(settings), episode, record.end_after_s)


def release_info(config_source: str) -> dict[str, str | None]:
    """The release the runtime started from: the resolved config file's directory, if it holds release.json.

    `config_source` is `RuntimeConfig.source` (already resolved, so this names the release `current` pointed
    to at start, not whatever it points to now). Computed once; the snapshot only copies it.
    """
    if not config_source:
        return {"id": None, "config": None}
    directory = Path(config_source).parent
    try:
        is_release = (directory / "release.json").exists()
    except OSError:
        is_release = False
    return {"id": directory.name if is_release else None, "config": config_source}


def describe_plan(plan: InputPlan) -> dict[str, Any]:
    return {
        "cameras": {c.name: {"key": c.key, "device": c.device} for c in plan.cameras},
        "state": [s.name for s in plan.state_sources],
    }
