"""One car's benchmark result, read from the JSON `rover-runtime benchmark --output` wrote on the car."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ResultError(ValueError):
    """A benchmark file that is missing, not JSON, or lacks a required key."""


@dataclass(frozen=True)
class HostResult:
    host: str  # the inventory name (the file name)
    hostname: str  # as the car reported it
    architecture: str
    engine: str | None
    backend: str | None
    mode: str | None
    content_hash: str | None
    release: str | None  # the release the car drove during the benchmark (None: not measured driving)
    firmware: str | None  # the version its Arduino answered then, e.g. "2.0.0+127a292a"
    latency_mean_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    fps: float
    control_rate_hz: float | None  # achievable: 1000 / p99 of the policy flat out
    loop_rate_hz: float | None  # achieved by the whole loop while driving at its set rate
    memory_mb: float
    cpu_percent: float  # of all the car's cores (the raw process figure divided by cpu_count)
    cpu_count: int
    model_mb: float
    temperature_before_c: float | None
    temperature_after_c: float | None
    throttled_before: str | None
    throttled_after: str | None
    iterations: int
    latency_samples_ms: tuple[float, ...]  # empty when the car did not report samples


def _get(data: dict[str, Any], dotted: str, where: str, *, optional: bool = False) -> Any:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            if optional:
                return None
            raise ResultError(f"{where}: missing key '{dotted}'")
        value = value[part]
    return value


def _number(data: dict[str, Any], dotted: str, where: str, *, optional: bool = False) -> float | None:
    value = _get(data, dotted, where, optional=optional)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ResultError(f"{where}: key '{dotted}' must be a number, got {value!r}")
    return float(value)


def _text(data: dict[str, Any], dotted: str, where: str) -> str | None:
    """An optional short string (a release id, a version): anything else a car sends is refused."""
    value = _get(data, dotted, where, optional=True)
    if value is not None and not (isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable()):
        raise ResultError(f"{where}: key '{dotted}' must be a short printable string, got {value!r:.80}")
    return value


def parse_result(host: str, data: Any, where: str) -> HostResult:
    if not isinstance(data, dict):
        raise ResultError(f"{where}: must be a JSON object")

    def num(key: str) -> float:
        value = _number(data, key, where)
        assert value is not None
        return value

    cpu_count = int(_number(data, "cpu_count", where, optional=True) or 1)
    samples = _get(data, "latency_ms.samples", where, optional=True) or _get(
        data, "latency_samples_ms", where, optional=True
    )
    if samples is not None and not (
        isinstance(samples, list)
        and all(isinstance(s, int | float) and not isinstance(s, bool) for s in samples)
    ):
        raise ResultError(f"{where}: latency samples must be a list of numbers")
    return HostResult(
        host=host,
        hostname=str(_get(data, "hostname", where)),
        architecture=str(_get(data, "architecture", where)),
        engine=_get(data, "engine", where, optional=True),
        backend=_get(data, "backend", where, optional=True),
        mode=_get(data, "mode", where, optional=True),
        content_hash=_get(data, "content_hash", where, optional=True),
        release=_text(data, "driving.release", where),
        firmware=_text(data, "driving.firmware_version", where),
        latency_mean_ms=num("latency_ms.mean"),
        latency_p50_ms=num("latency_ms.p50"),
        latency_p95_ms=num("latency_ms.p95"),
        latency_p99_ms=num("latency_ms.p99"),
        latency_max_ms=num("latency_ms.max"),
        fps=num("throughput_fps"),
        control_rate_hz=_number(data, "achievable_control_rate_hz", where, optional=True),
        loop_rate_hz=_number(data, "driving.rate_hz_achieved", where, optional=True),
        memory_mb=num("peak_rss_mb"),
        cpu_percent=num("cpu_percent") / max(cpu_count, 1),
        cpu_count=cpu_count,
        model_mb=num("model_bytes") / 1e6,
        temperature_before_c=_number(data, "temperature_c_before", where, optional=True),
        temperature_after_c=_number(data, "temperature_c_after", where, optional=True),
        throttled_before=_get(data, "throttled_before", where, optional=True),
        throttled_after=_get(data, "throttled_after", where, optional=True),
        iterations=int(num("iterations")),
        latency_samples_ms=tuple(float(s) for s in samples or ()),
    )


def load_run(run_dir: Path) -> list[HostResult]:
    """Every `<host>.json` in the run folder, sorted by host; a bad file stops with its name and key."""
    if not run_dir.is_dir():
        raise ResultError(f"{run_dir}: run folder does not exist")
    results = []
    for path in sorted(run_dir.glob("*.json")):
        if path.name in {"limits.json", "summary.json"}:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResultError(f"{path}: not a readable JSON file: {exc}") from exc
        results.append(parse_result(path.stem, data, str(path)))
    return results
