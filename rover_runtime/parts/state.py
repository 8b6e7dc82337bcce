"""StatePart: the policy's state vector, assembled from named sources in the bundle's order.

A bundle's `inputs.state_names` says what its state holds (e.g. `[steer, throttle, speed_mps]`); each name
gets a source, from the config's [state] table or, for names the runtime knows, by itself. The sources:

| source | value | from |
|---|---|---|
| `steering`, `throttle` | what the car outputs now, normalized | the firmware's last acknowledgement |
| `wheel_speed_mps` | wheel speed, m/s | the firmware's R line (needs its wheel sensor) |
| `battery_v` | battery voltage, V | the firmware's R line (needs its battery measurement) |

`resolve_sources` refuses, before anything moves, a name without a source, naming every one of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rover_runtime import protocol
from rover_runtime.parts import CAR_BATTERY, CAR_STEERING, CAR_THROTTLE, CAR_WHEEL_SPEED, STATE
from rover_runtime.vehicle import BasePart, Cycle


@dataclass(frozen=True)
class Source:
    name: str
    value_key: str  # the cycle value it reads
    feature: int = 0  # protocol.FEATURE_* the firmware must have fitted (0: none)
    needs: str = ""  # what that feature is, in words


SOURCES = {
    s.name: s
    for s in (
        Source("steering", CAR_STEERING),
        Source("throttle", CAR_THROTTLE),
        Source("wheel_speed_mps", CAR_WHEEL_SPEED, protocol.FEATURE_WHEEL, "a wheel speed sensor"),
        Source("battery_v", CAR_BATTERY, protocol.FEATURE_BATTERY, "a battery voltage measurement"),
    )
}
# State names the runtime maps by itself (lower case).
KNOWN_NAMES = {
    "steering": "steering",
    "steer": "steering",
    "angle": "steering",
    "throttle": "throttle",
    "speed": "wheel_speed_mps",
    "speed_mps": "wheel_speed_mps",
    "wheel_speed": "wheel_speed_mps",
    "wheel_speed_mps": "wheel_speed_mps",
    "velocity": "wheel_speed_mps",
    "battery": "battery_v",
    "battery_v": "battery_v",
    "battery_voltage": "battery_v",
}


class StateSourceError(ValueError):
    """The bundle's state asks for something this car cannot supply; the message names every such input."""


def resolve_sources(state_names: Sequence[str], configured: Iterable[tuple[str, str]]) -> list[Source]:
    """One source per state name: the config's [state] entry, else the name the runtime knows."""
    table = dict(configured)
    unknown_config = sorted(set(table) - set(state_names))
    problems = [
        f"[state] {name} = {table[name]!r}: the bundle has no state named {name!r} "
        f"(its state: {', '.join(state_names)})"
        for name in unknown_config
    ]
    sources = []
    for name in state_names:
        source_name = table.get(name) or KNOWN_NAMES.get(name.lower())
        if source_name is None:
            problems.append(
                f"state {name!r} has no source: map it in the config's [state] table, e.g. "
                f'{name} = "wheel_speed_mps" (sources: {", ".join(SOURCES)})'
            )
        elif source_name not in SOURCES:
            problems.append(
                f"[state] {name} = {source_name!r}: no such source (sources: {', '.join(SOURCES)})"
            )
        else:
            sources.append(SOURCES[source_name])
    if problems:
        raise StateSourceError("the bundle's state cannot be supplied: " + "; ".join(problems))
    return sources


def needed_features(state_names: Sequence[str], sources: Sequence[Source]) -> dict[int, str]:
    """protocol.FEATURE_* bit -> "state speed_mps needs a wheel speed sensor", for the firmware check."""
    out: dict[int, str] = {}
    for name, source in zip(state_names, sources, strict=True):
        if source.feature:
            out[source.feature] = f"state {name!r} needs {source.needs}"
    return out


class StatePart(BasePart):
    name = "state"
    writes = (STATE,)

    def __init__(self, state_names: Sequence[str], sources: Sequence[Source]) -> None:
        self.state_names = tuple(state_names)
        self.sources = tuple(sources)
        self.reads = tuple(dict.fromkeys(source.value_key for source in self.sources))
        self.values: tuple[float, ...] | None = None

    def update(self, cycle: Cycle) -> None:
        values = []
        for name, source in zip(self.state_names, self.sources, strict=True):
            value = cycle.values.get(source.value_key)
            if value is None:
                cycle.fault(f"state: {name} has no value yet (source {source.name})")
                self.values = None
                return
            values.append(float(value))
        self.values = tuple(values)
        cycle.values[STATE] = self.values

    def status(self) -> dict[str, Any]:
        return {
            "names": list(self.state_names),
            "sources": [s.name for s in self.sources],
            "values": None if self.values is None else [round(v, 4) for v in self.values],
        }
