"""Pass/fail limits: the seed report's targets by default, overridden per fleet and per host from a file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class LimitsError(ValueError):
    """A limits file that cannot be read or holds an unknown or non-numeric key."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds (`max_*`, must stay below) and lower bounds (`min_*`, must reach)."""

    max_latency_mean_ms: float = 40.0
    max_latency_p95_ms: float = 50.0
    min_control_rate_hz: float = 22.0
    max_model_mb: float = 100.0
    max_memory_mb: float = 500.0
    max_cpu_percent: float = 80.0
    max_temperature_c: float = 80.0

    def updated(self, values: dict[str, Any], where: str) -> Limits:
        known = {f.name for f in dataclasses.fields(self)}
        changes: dict[str, float] = {}
        for key, value in values.items():
            if key not in known:
                raise LimitsError(f"{where}: unknown limit '{key}' (known: {', '.join(sorted(known))})")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise LimitsError(f"{where}: limit '{key}' must be a number, got {value!r}")
            changes[key] = float(value)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LimitSet:
    """Fleet-wide limits plus per-host overrides (e.g. an emulated or slower car)."""

    default: Limits
    hosts: dict[str, Limits]

    def for_host(self, host: str) -> Limits:
        return self.hosts.get(host, self.default)


def load_limits(path: Path | None) -> LimitSet:
    """Read `{"default": {...}, "hosts": {"name": {...}}}` (JSON or YAML); a flat mapping = the default."""
    if path is None:
        return LimitSet(default=Limits(), hosts={})
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LimitsError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise LimitsError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    raw = raw or {}
    if not isinstance(raw, dict):
        raise LimitsError(f"{path}: must be a mapping")
    if "default" not in raw and "hosts" not in raw:
        raw = {"default": raw}
    unknown = set(raw) - {"default", "hosts"}
    if unknown:
        raise LimitsError(f"{path}: unknown key '{sorted(unknown)[0]}' (use 'default' and 'hosts')")
    default = Limits().updated(_mapping(raw.get("default"), f"{path} default"), f"{path} default")
    hosts = {
        str(name): default.updated(_mapping(values, f"{path} hosts.{name}"), f"{path} hosts.{name}")
        for name, values in _mapping(raw.get("hosts"), f"{path} hosts").items()
    }
    return LimitSet(default=default, hosts=hosts)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LimitsError(f"{where}: must be a mapping")
    return value
