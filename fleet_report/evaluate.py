"""Each host's figures against its limits: one Check per limit, and the host's verdict."""

from __future__ import annotations

from dataclasses import dataclass

from fleet_report.limits import Limits
from fleet_report.results import HostResult


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None  # None: the car did not report it (shown as n/a, not counted as a failure)
    limit: float
    bound: str  # "<" (must stay below) or ">=" (must reach)
    unit: str

    @property
    def ok(self) -> bool:
        if self.value is None:
            return True
        return self.value < self.limit if self.bound == "<" else self.value >= self.limit


@dataclass(frozen=True)
class HostVerdict:
    result: HostResult
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)


def _hottest(result: HostResult) -> float | None:
    readings = [t for t in (result.temperature_before_c, result.temperature_after_c) if t is not None]
    return max(readings) if readings else None


def evaluate(result: HostResult, limits: Limits) -> HostVerdict:
    checks = (
        Check("latency mean", result.latency_mean_ms, limits.max_latency_mean_ms, "<", "ms"),
        Check("latency p95", result.latency_p95_ms, limits.max_latency_p95_ms, "<", "ms"),
        Check("achievable rate", result.control_rate_hz, limits.min_control_rate_hz, ">=", "Hz"),
        Check("model size", result.model_mb, limits.max_model_mb, "<", "MB"),
        Check("memory", result.memory_mb, limits.max_memory_mb, "<", "MB"),
        Check("CPU", result.cpu_percent, limits.max_cpu_percent, "<", "%"),
        Check("temperature", _hottest(result), limits.max_temperature_c, "<", "°C"),
    )
    return HostVerdict(result=result, checks=checks)
