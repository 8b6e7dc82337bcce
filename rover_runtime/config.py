"""The runtime's configuration: one TOML file over documented defaults, CLI overrides, frozen dataclasses.

The defaults live in `default_config.toml` (package data, each key documented there). A user file may set
any subset of its keys; an unknown section or key is refused by name. Every value is validated with an
error naming its key, e.g. ``config control.rate_hz: must be > 0, got -5``.

A relative `policy.bundle` in a config file is relative to that file's resolved directory (symlinks
followed), so ``bundle = "bundle"`` in ``/opt/rover/current/runtime.toml`` names the bundle of the release
``current`` pointed to when the runtime started, even if ``current`` is switched later. The resolved file is
kept in `RuntimeConfig.source`. A CLI override (``--bundle``) is taken as given, relative to the working
directory.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

CONTROL_MODES = ("auto", "chunk", "ensemble")
CAMERA_SOURCES = ("device", "libcamera", "file", "synthetic")
ENGINES = ("auto", "qnnpack", "x86", "fbgemm", "onednn")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# A command at least every 200 ms: the firmware's own failsafe fires after 250 ms without one.
MIN_RATE_HZ = 5.0


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


@dataclass(frozen=True)
class ControlConfig:
    rate_hz: float
    mode: str
    n_action_steps: int
    temporal_ensemble_coeff: float
    request_margin_steps: int
    spin_s: float
    realtime_priority: int
    background_nice: int

    @property
    def period_s(self) -> float:
        return 1.0 / self.rate_hz


@dataclass(frozen=True)
class FailsafeConfig:
    inference_timeout_s: float
    unhealthy_after_s: float


@dataclass(frozen=True)
class CameraConfig:
    source: str
    device: str
    file: str
    loop_file: bool
    width: int
    height: int
    fps: float
    fourcc: str
    max_frame_age_s: float
    retry_interval_s: float
    synthetic_stop_after_s: float


@dataclass(frozen=True)
class SerialSettings:
    port: str
    baudrate: int
    heartbeat_interval_s: float
    reconnect_interval_s: float
    steering_limits: tuple[float, float]
    throttle_limits: tuple[float, float]
    max_ack_age_s: float


@dataclass(frozen=True)
class SmoothingConfig:
    steering_rate: float
    throttle_rate: float
    ramp_s: float


@dataclass(frozen=True)
class PolicyConfig:
    bundle: str
    engine: str
    threads: int
    stub: bool
    stub_latency_ms: float
    stub_chunk_size: int


@dataclass(frozen=True)
class MetricsConfig:
    path: str
    interval_s: float
    textfile: str


@dataclass(frozen=True)
class LoggingConfig:
    level: str


@dataclass(frozen=True)
class RecordConfig:
    enabled: bool
    directory: str
    car: str
    max_gb: float
    min_free_mb: float
    episode_max_s: float
    end_after_s: float
    queue_s: float
    jpeg_quality: int


@dataclass(frozen=True)
class RuntimeConfig:
    control: ControlConfig
    failsafe: FailsafeConfig
    camera: CameraConfig
    serial: SerialSettings
    policy: PolicyConfig
    metrics: MetricsConfig
    logging: LoggingConfig
    smoothing: SmoothingConfig
    record: RecordConfig
    # [cameras]: camera name (the bundle's image key, or its last dotted part) -> device or video file.
    cameras: tuple[tuple[str, str], ...] = ()
    # [state]: state name (the bundle's inputs.state_names) -> the source that supplies it.
    state: tuple[tuple[str, str], ...] = ()
    # The config file this was loaded from, resolved (symlinks followed); "" when there was none.
    source: str = ""


_SECTIONS: dict[str, type] = {
    "control": ControlConfig,
    "failsafe": FailsafeConfig,
    "camera": CameraConfig,
    "serial": SerialSettings,
    "policy": PolicyConfig,
    "metrics": MetricsConfig,
    "logging": LoggingConfig,
    "smoothing": SmoothingConfig,
    "record": RecordConfig,
}
# Tables whose keys are the user's names (cameras, state names): string values, no fixed key set.
_NAME_TABLES = ("cameras", "state")


def make_serial_link(settings: SerialSettings) -> Any:
    """A `rover_runtime.serial_link.SerialLink` for these settings (pyserial is imported only here)."""
    from rover_runtime.serial_link import SerialConfig, SerialLink  # noqa: PLC0415

    return SerialLink(
        SerialConfig(
            port=settings.port,
            baudrate=settings.baudrate,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            reconnect_interval_s=settings.reconnect_interval_s,
            steering_limits=settings.steering_limits,
            throttle_limits=settings.throttle_limits,
            max_ack_age_s=settings.max_ack_age_s,
        )
    )


def default_config_text() -> str:
    return resources.files("rover_runtime").joinpath("default_config.toml").read_text(encoding="utf-8")


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {where}: not valid TOML: {exc}") from exc


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> RuntimeConfig:
    """Defaults, then the file at `path` (if any), then `overrides` ({"section.key": value}), validated."""
    raw = _parse_toml(default_config_text(), "defaults")
    source = ""
    if path is not None:
        path = Path(path)
        # Resolved once and read from there: the file and the paths relative to it come from one release,
        # even if a symlink on the way (/opt/rover/current) is switched meanwhile.
        resolved = path.resolve()
        try:
            text = resolved.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from exc
        data = _parse_toml(text, str(path))
        _merge(raw, data)
        _anchor_bundle(raw, data, resolved.parent)
        source = str(resolved)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        _merge(raw, {section: {key: value}})
    config = validate_config(raw)
    return dataclasses.replace(config, source=source) if source else config


def _anchor_bundle(raw: dict[str, Any], data: dict[str, Any], base: Path) -> None:
    """A relative `policy.bundle` set by the file at `base` becomes `base / bundle`."""
    policy = data.get("policy")
    bundle = policy.get("bundle") if isinstance(policy, dict) else None
    if isinstance(bundle, str) and bundle and not Path(bundle).is_absolute():
        raw["policy"]["bundle"] = str(base / bundle)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for section, values in update.items():
        if section not in base:
            raise ConfigError(f"config: unknown section [{section}] (known: {', '.join(base)})")
        if not isinstance(values, dict):
            raise ConfigError(f"config {section}: must be a table")
        for key, value in values.items():
            if key not in base[section] and section not in _NAME_TABLES:
                raise ConfigError(f"config {section}.{key}: unknown key")
            base[section][key] = value


def validate_config(raw: dict[str, Any]) -> RuntimeConfig:
    built: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        values = raw.get(section, {})
        kwargs = {}
        for f in fields(cls):
            if f.name not in values:
                raise ConfigError(f"config {section}.{f.name}: missing")
            kwargs[f.name] = _coerce(f"{section}.{f.name}", values[f.name], str(f.type))
        built[section] = cls(**kwargs)
    for table in _NAME_TABLES:
        built[table] = _name_table(table, raw.get(table, {}))
    config = RuntimeConfig(**built)
    _check_ranges(config)
    return config


def _name_table(table: str, values: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    out = []
    for name, raw in values.items():
        # `front = 0` is as good as `front = "0"`
        value = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config {table}.{name}: must be a non-empty string, got {raw!r}")
        out.append((name, value))
    return tuple(sorted(out))


def _coerce(key: str, value: Any, kind: str) -> Any:
    where = f"config {key}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        return float(value)
    if kind == "str":
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # `device = 0` is as good as `device = "0"`
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {value!r}")
        return value
    if kind == "tuple[float, float]":
        ok = isinstance(value, list | tuple) and len(value) == 2
        if not ok or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: must be two numbers [min, max], got {value!r}")
        low, high = float(value[0]), float(value[1])
        if low > high:
            raise ConfigError(f"{where}: min {low} is greater than max {high}")
        return (low, high)
    raise AssertionError(f"unhandled config type {kind} for {key}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"config {key}: must be > 0, got {value:g}")


def _not_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"config {key}: must be >= 0, got {value:g}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config {key}: must be one of {', '.join(choices)}, got {value!r}")


def _check_ranges(c: RuntimeConfig) -> None:
    _positive("control.rate_hz", c.control.rate_hz)
    if c.control.rate_hz < MIN_RATE_HZ:
        raise ConfigError(
            f"config control.rate_hz: must be >= {MIN_RATE_HZ:g}, got {c.control.rate_hz:g}: the firmware "
            "puts the car in neutral when no command arrived for 250 ms, so a slower loop makes it stutter"
        )
    if c.control.rate_hz > 1000:
        raise ConfigError(f"config control.rate_hz: must be <= 1000, got {c.control.rate_hz:g}")
    _choice("control.mode", c.control.mode, CONTROL_MODES)
    _not_negative("control.n_action_steps", c.control.n_action_steps)
    _not_negative("control.request_margin_steps", c.control.request_margin_steps)
    _not_negative("control.spin_s", c.control.spin_s)
    if not 0 <= c.control.realtime_priority <= 99:
        raise ConfigError(
            f"config control.realtime_priority: must be 0-99, got {c.control.realtime_priority}"
        )
    if not 0 <= c.control.background_nice <= 19:
        raise ConfigError(f"config control.background_nice: must be 0-19, got {c.control.background_nice}")
    if c.control.spin_s >= c.control.period_s:
        raise ConfigError(f"config control.spin_s: must be shorter than the period, got {c.control.spin_s:g}")
    _positive("failsafe.inference_timeout_s", c.failsafe.inference_timeout_s)
    _positive("failsafe.unhealthy_after_s", c.failsafe.unhealthy_after_s)
    _choice("camera.source", c.camera.source, CAMERA_SOURCES)
    if c.camera.source == "file" and not c.camera.file:
        raise ConfigError("config camera.file: must name a video file when camera.source is 'file'")
    if c.camera.source == "device" and not c.camera.device:
        raise ConfigError("config camera.device: must be an index or a path when camera.source is 'device'")
    _positive("camera.width", c.camera.width)
    _positive("camera.height", c.camera.height)
    _positive("camera.fps", c.camera.fps)
    if c.camera.fourcc and len(c.camera.fourcc) != 4:
        raise ConfigError(f"config camera.fourcc: must be 4 characters or empty, got {c.camera.fourcc!r}")
    _positive("camera.max_frame_age_s", c.camera.max_frame_age_s)
    _positive("camera.retry_interval_s", c.camera.retry_interval_s)
    _not_negative("camera.synthetic_stop_after_s", c.camera.synthetic_stop_after_s)
    if not c.serial.port:
        raise ConfigError("config serial.port: must not be empty")
    for key in ("steering_limits", "throttle_limits"):
        low, high = getattr(c.serial, key)
        if not -1.0 <= low <= high <= 1.0:
            raise ConfigError(f"config serial.{key}: must lie within [-1, 1], got [{low:g}, {high:g}]")
    _positive("serial.baudrate", c.serial.baudrate)
    _positive("serial.heartbeat_interval_s", c.serial.heartbeat_interval_s)
    _positive("serial.reconnect_interval_s", c.serial.reconnect_interval_s)
    _positive("serial.max_ack_age_s", c.serial.max_ack_age_s)
    _not_negative("smoothing.steering_rate", c.smoothing.steering_rate)
    _not_negative("smoothing.throttle_rate", c.smoothing.throttle_rate)
    _not_negative("smoothing.ramp_s", c.smoothing.ramp_s)
    _choice("policy.engine", c.policy.engine, ENGINES)
    _not_negative("policy.threads", c.policy.threads)
    if not c.policy.stub and not c.policy.bundle:
        raise ConfigError("config policy.bundle: must name a bundle directory (or set policy.stub = true)")
    _not_negative("policy.stub_latency_ms", c.policy.stub_latency_ms)
    _positive("policy.stub_chunk_size", c.policy.stub_chunk_size)
    _positive("metrics.interval_s", c.metrics.interval_s)
    if c.metrics.textfile and not c.metrics.textfile.endswith(".prom"):
        raise ConfigError(
            f"config metrics.textfile: {c.metrics.textfile!r} must end in .prom "
            "(node_exporter's textfile collector reads only *.prom files)"
        )
    _choice("logging.level", c.logging.level, LOG_LEVELS)
    if c.record.enabled and not c.record.directory:
        raise ConfigError("config record.directory: must name a directory when record.enabled = true")
    _positive("record.max_gb", c.record.max_gb)
    _not_negative("record.min_free_mb", c.record.min_free_mb)
    _positive("record.episode_max_s", c.record.episode_max_s)
    _not_negative("record.end_after_s", c.record.end_after_s)
    _positive("record.queue_s", c.record.queue_s)
    if not 1 <= c.record.jpeg_quality <= 100:
        raise ConfigError(f"config record.jpeg_quality: must be 1-100, got {c.record.jpeg_quality}")
