"""The fleet as Prometheus sees it now: one row per car (release, firmware, mode, health and faults,
temperature, last seen, alerts firing) and the fleet's intended release, from Prometheus's HTTP API.

A car that does not answer is a row that says so (with what was last known of it), never an error; when
Prometheus itself does not answer, the whole answer says that in one line and lists no car.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from rover_runtime.thermal import THROTTLE_NOW_FLAGS

log = logging.getLogger(__name__)

# How far back "last seen" and the last known release look.
LOOKBACK = "6h"
# The throttle flags that hold now (bits 0-3 of get_throttled), as the runtime names them.
THROTTLE_NOW = "|".join(THROTTLE_NOW_FLAGS.values())

QUERIES = {
    "up": 'up{job="rovers"}',
    "last_seen": f'max_over_time(timestamp(up{{job="rovers"}} == 1)[{LOOKBACK}:])',
    "release": f"last_over_time(rover_release_info[{LOOKBACK}])",
    "firmware": f"last_over_time(rover_firmware_info[{LOOKBACK}])",
    "mode": "rover_rc_mode == 1",
    "driving": "rover_driving",
    "running": "rover:runtime_running",
    "failsafe": "rover_failsafe_active",
    "reasons": "rover_failsafe_reasons",
    "temperature": "rover_soc_temperature_celsius",
    "throttled": f'rover_throttled{{flag=~"{THROTTLE_NOW}"}} == 1',
    "loop_rate": "rover_loop_rate_hz",
    "metrics_age": "rover:metrics_age_seconds",
    "pull": "rover_pull_outcome == 1",
    "intended": "rover:fleet_intended_release",
}


class PrometheusError(Exception):
    """Prometheus did not answer, or answered something that is not its API's."""


@dataclass
class Car:
    name: str
    address: str = ""
    status: str = "unknown"  # down | stopped | failsafe | driving | idle | unknown
    answering: bool = False
    last_seen_unix: float | None = None
    release: str = ""
    bundle: str = ""
    backend: str = ""
    on_intended: bool | None = None  # None: no intended release known
    firmware: str = ""
    mode: str = ""
    driving: bool = False
    failsafe: bool = False
    faults: list[str] = field(default_factory=list)
    temperature_c: float | None = None
    throttled: list[str] = field(default_factory=list)
    loop_rate_hz: float | None = None
    metrics_age_s: float | None = None
    pull: str = ""
    alerts: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Fleet:
    prometheus: str
    updated_unix: float
    intended: dict[str, str] | None
    cars: list[Car]
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PrometheusApi:
    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=self.timeout_s) as response:
                body = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PrometheusError(f"Prometheus at {self.url} does not answer: {reason}") from exc
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            raise PrometheusError(f"Prometheus at {self.url} refused {path}: {error}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query", {"query": expr})
        result = data.get("result", []) if isinstance(data, dict) else []
        return [r for r in result if isinstance(r, dict) and isinstance(r.get("metric"), dict)]

    def alerts(self) -> list[dict[str, Any]]:
        data = self._get("/api/v1/alerts")
        return [a for a in data.get("alerts", []) if isinstance(a, dict)] if isinstance(data, dict) else []


def _value(sample: dict[str, Any]) -> float | None:
    """The sample's value; None when it is missing or not a finite number (NaN, +Inf)."""
    try:
        value = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def fleet_state(api: PrometheusApi, now: float | None = None) -> Fleet:
    now = time.time() if now is None else now
    try:
        results = {key: api.query(expr) for key, expr in QUERIES.items()}
        alerts = api.alerts()
    except PrometheusError as exc:
        return Fleet(prometheus=api.url, updated_unix=now, intended=None, cars=[], error=str(exc))
    by_car: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for key, samples in results.items():
        for sample in samples:
            car = sample["metric"].get("instance")
            if car:
                by_car[str(car)][key].append(sample)
    intended_samples = results["intended"]
    intended = (
        {k: str(v) for k, v in intended_samples[0]["metric"].items() if k != "__name__"}
        if intended_samples
        else None
    )
    firing: dict[str, list[dict[str, str]]] = defaultdict(list)
    for alert in alerts:
        labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
        if alert.get("state") == "firing" and isinstance(labels, dict) and labels.get("instance"):
            firing[str(labels["instance"])].append(
                {"name": str(labels.get("alertname", "")), "summary": str(annotations.get("summary", ""))}
            )
    cars = [
        _car(name, by_car[name], intended, firing.get(name, []))
        for name in sorted(by_car)
        if by_car[name]["up"]
    ]
    return Fleet(prometheus=api.url, updated_unix=now, intended=intended, cars=cars)


def _car(
    name: str,
    samples: dict[str, list[dict[str, Any]]],
    intended: dict[str, str] | None,
    alerts: list[dict[str, str]],
) -> Car:
    def first(key: str) -> dict[str, Any] | None:
        return samples[key][0] if samples.get(key) else None

    def number(key: str) -> float | None:
        sample = first(key)
        return None if sample is None else _value(sample)

    up = first("up")
    car = Car(name=name, address=str(up["metric"].get("address", "")) if up else "")
    car.answering = number("up") == 1.0
    car.last_seen_unix = number("last_seen")
    release = first("release")
    if release is not None:
        car.release = str(release["metric"].get("release", ""))
        car.bundle = str(release["metric"].get("bundle", ""))
        car.backend = str(release["metric"].get("backend", ""))
        if intended is not None:
            car.on_intended = car.bundle == intended.get("bundle")
    firmware = first("firmware")
    car.firmware = str(firmware["metric"].get("version", "")) if firmware else ""
    mode = first("mode")
    car.mode = str(mode["metric"].get("mode", "")) if mode else ""
    car.driving = number("driving") == 1.0
    car.failsafe = number("failsafe") == 1.0
    car.faults = sorted(
        f"{s['metric'].get('kind', '?')}" + (f" ×{int(v)}" if (v := _value(s)) and v > 1 else "")
        for s in samples.get("reasons", [])
        if (_value(s) or 0) > 0
    )
    car.temperature_c = number("temperature")
    car.throttled = sorted(str(s["metric"].get("flag", "")) for s in samples.get("throttled", []))
    car.loop_rate_hz = number("loop_rate")
    car.metrics_age_s = number("metrics_age")
    pull = first("pull")
    car.pull = str(pull["metric"].get("outcome", "")) if pull else ""
    car.alerts = sorted(alerts, key=lambda a: a["name"])
    running = number("running")
    if not car.answering:
        car.status = "down"
    elif running != 1.0:
        car.status = "stopped"
    elif car.failsafe:
        car.status = "failsafe"
    elif car.driving:
        car.status = "driving"
    else:
        car.status = "idle"
    return car
