"""The runtime's state as Prometheus metrics, for node_exporter's textfile collector (docs/monitoring.md).

`exposition(snapshot)` turns the status snapshot (the same dict the JSON status file holds) into the text
exposition format; `MetricsWriter` writes it atomically beside the JSON file, so node_exporter never reads a
part of one. Every metric is named `rover_*`; a value the snapshot does not have (no firmware identified
yet, no thermal source) is left out rather than written as a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rover_runtime.protocol import MODE_NAMES
from rover_runtime.thermal import THROTTLE_FLAGS

# Bump when a metric changes meaning or name: the fleet's rules can tell an older runtime's file.
SCHEMA = 1


@dataclass
class Family:
    """One metric family: its samples as (labels, value)."""

    name: str
    kind: str  # gauge | counter
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | int | bool | None, **labels: str) -> None:
        if value is None:
            return
        number = float(value)
        if math.isfinite(number):
            self.samples.append((labels, number))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for family in families:
        if not family.samples:
            continue
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            text = ",".join(f'{key}="{_escape(str(val))}"' for key, val in sorted(labels.items()))
            lines.append(
                f"{family.name}{{{text}}} {_format_value(value)}"
                if text
                else f"{family.name} {_format_value(value)}"
            )
    return "\n".join(lines) + "\n"


def _get(data: Mapping[str, Any] | None, *keys: str) -> Any:
    value: Any = data
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


def _seconds(ms: Any) -> float | None:
    return None if not isinstance(ms, int | float) else float(ms) / 1000.0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def exposition(snapshot: Mapping[str, Any], *, running: bool = True) -> str:
    """The snapshot as exposition text. `running` False: the runtime's last words (it stopped cleanly)."""
    f: dict[str, Family] = {}

    def family(name: str, kind: str, help_text: str) -> Family:
        return f.setdefault(name, Family(name, kind, help_text))

    family(
        "rover_runtime_up", "gauge", "1 while the runtime runs, 0 in the file it leaves when it stops"
    ).add(running)
    family("rover_metrics_schema", "gauge", "version of these metrics' names and meanings").add(SCHEMA)
    family(
        "rover_metrics_written_timestamp_seconds", "gauge", "when the runtime wrote this file (Unix time)"
    ).add(_number(snapshot.get("time_unix")))
    family("rover_runtime_uptime_seconds", "gauge", "seconds since the runtime started").add(
        _number(snapshot.get("uptime_s"))
    )
    family("rover_runtime_ready", "gauge", "1 once the runtime is ready").add(bool(snapshot.get("ready")))
    family(
        "rover_runtime_healthy", "gauge", "1 while the loop keeps its deadline and its parts are sound"
    ).add(bool(snapshot.get("healthy")))
    bundle = _section(snapshot, "bundle")
    release = _get(snapshot, "release", "id")
    family("rover_release_info", "gauge", "the release and bundle the runtime drives with").add(
        1,
        release=str(release or ""),
        bundle=str(_get(bundle, "content_hash") or ""),
        backend=str(_get(bundle, "backend") or ""),
        mode=str(_get(bundle, "mode") or ""),
    )
    firmware_version = _get(snapshot, "serial", "firmware_version")
    if firmware_version:
        family("rover_firmware_info", "gauge", "the firmware the Arduino answered with").add(
            1, version=str(firmware_version), firmware=str(_get(snapshot, "serial", "firmware") or "")
        )
    family("rover_serial_connected", "gauge", "1 while the Arduino's serial port is open").add(
        _get(snapshot, "serial", "connected")
    )
    family("rover_driving", "gauge", "1 while the Pi's command drives the car").add(
        bool(snapshot.get("driving"))
    )
    rc_mode = _get(snapshot, "rc", "mode")
    if rc_mode is not None:
        modes = family("rover_rc_mode", "gauge", "the receiver's mode switch: 1 for the mode it selects")
        for name in MODE_NAMES.values():
            modes.add(name == rc_mode, mode=name)

    failsafe = _section(snapshot, "failsafe")
    family("rover_failsafe_active", "gauge", "1 while the car is held neutral").add(
        bool(failsafe.get("active"))
    )
    family(
        "rover_failsafe_since_timestamp_seconds", "gauge", "when the current failsafe began (Unix time)"
    ).add(_number(failsafe.get("since_unix")))
    family("rover_failsafe_entries_total", "counter", "times the car went into failsafe").add(
        _number(failsafe.get("count"))
    )
    reasons = family("rover_failsafe_reasons", "gauge", "the current failsafe's reasons, counted per kind")
    kinds: dict[str, int] = {}
    for reason in failsafe.get("reasons") or []:
        kind = str(reason).split(":", maxsplit=1)[0].strip() or "unknown"
        kinds[kind] = kinds.get(kind, 0) + 1
    for kind, count in sorted(kinds.items()):
        reasons.add(count, kind=kind)

    loop = _section(snapshot, "loop")
    family("rover_loop_rate_hz", "gauge", "the loop's achieved rate since the previous write").add(
        _number(loop.get("rate_hz_achieved"))
    )
    family("rover_loop_target_rate_hz", "gauge", "the loop's configured rate").add(
        _number(loop.get("rate_hz_target"))
    )
    family("rover_loop_cycles_total", "counter", "cycles the loop ran").add(_number(loop.get("cycles")))
    family("rover_loop_deadline_misses_total", "counter", "cycles that overran their period").add(
        _number(loop.get("deadline_misses"))
    )
    family(
        "rover_loop_period_error_p99_seconds", "gauge", "99th percentile of the period error, last 10 s"
    ).add(_seconds(_get(loop, "period_error_ms", "p99")))
    family("rover_inference_latency_p95_seconds", "gauge", "95th percentile of the policy's latency").add(
        _seconds(_get(snapshot, "inference", "latency_ms", "p95"))
    )

    cameras = _section(snapshot, "cameras")
    for name, camera in sorted(cameras.items()):
        if not isinstance(camera, Mapping):
            continue
        family("rover_camera_frame_age_seconds", "gauge", "age of the camera's newest frame").add(
            _number(camera.get("frame_age_s")), camera=str(name)
        )
        family("rover_camera_fps", "gauge", "frames per second the camera delivered, last 2 s").add(
            _number(camera.get("fps")), camera=str(name)
        )
        family("rover_camera_connected", "gauge", "1 while the camera is open").add(
            camera.get("connected"), camera=str(name)
        )

    thermal = _section(snapshot, "thermal")
    family("rover_soc_temperature_celsius", "gauge", "the SoC's temperature").add(
        _number(thermal.get("temperature_c"))
    )
    throttled = thermal.get("throttled")
    if isinstance(throttled, str):
        try:
            bits = int(throttled, 16)
        except ValueError:
            bits = None
        if bits is not None:
            flags = family(
                "rover_throttled", "gauge", "the firmware's throttled flags (vcgencmd get_throttled)"
            )
            for bit, flag in THROTTLE_FLAGS.items():
                flags.add(bool(bits & (1 << bit)), flag=flag)

    recorder = _section(snapshot, "recorder")
    if recorder:
        family("rover_recorder_recording", "gauge", "1 while an episode is being recorded").add(
            bool(recorder.get("recording"))
        )
        family(
            "rover_recorder_stopped", "gauge", "1 when the recorder stopped for good (disk full, write error)"
        ).add(recorder.get("stopped_reason") is not None)
        family(
            "rover_recorder_episodes_waiting", "gauge", "finished episodes on the car, not yet collected"
        ).add(_number(recorder.get("episodes_on_disk")))
        family("rover_recorder_bytes", "gauge", "bytes of finished episodes on the car").add(
            _number(recorder.get("bytes_finished"))
        )
        family(
            "rover_recorder_steps_dropped_total", "counter", "steps the recorder could not keep up with"
        ).add(_number(recorder.get("steps_dropped")))
    return render(f.values())
