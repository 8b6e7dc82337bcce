"""A soak: the vehicle drives for a long time (default 30 minutes) and reports, minute by minute, whether
anything creeps: resident memory, period error, failsafes.

The vehicle is built as `rover-runtime run` builds it (every part), with the real demo bundle (`make demo`
writes out/bundles/static-int8-onnx; or --bundle, or --stub), synthetic 640x480 cameras and the firmware
simulator in its own process on a pty. The timing is taken by one more part added after the others
(`MinuteProbe`, fixed memory), which is how a part is added without touching the loop. Prints JSON:
`rss_mb` at the start (after a warm-up minute) and the end and their difference (`rss_growth_mb`), and per
minute the period error p99, the loop work p99, deadline misses, failsafes and inferences.

    python benchmarks/soak.py [--minutes 30] [--rate 30] [--bundle DIR | --stub] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from vehicle_rig import (
    DEMO_BUNDLE,
    PolicySource,
    SimProcess,
    emit_report,
    sim_config,
    start_vehicle,
    stop_vehicle,
)

from rover_runtime.benchmark import rss_mb
from rover_runtime.vehicle import BasePart, Cycle


class MinuteProbe(BasePart):
    """A part that keeps the current minute's period errors in a preallocated array (no growth)."""

    name = "probe"

    def __init__(self, rate_hz: float) -> None:
        self.period = 1.0 / rate_hz
        self.errors = np.zeros(int(rate_hz * 60 * 1.2) + 10)
        self.count = 0
        self._previous: float | None = None

    def update(self, cycle: Cycle) -> None:
        if self._previous is not None and self.count < len(self.errors):
            self.errors[self.count] = abs(cycle.now - self._previous - self.period)
            self.count += 1
        self._previous = cycle.now

    def take_p99_ms(self) -> float | None:
        """The p99 of the period errors since the last call, in ms; starts a new minute."""
        count, self.count = self.count, 0
        return round(float(np.percentile(self.errors[:count], 99)) * 1000, 4) if count else None

    def status(self) -> dict[str, Any]:
        return {"cycles_this_minute": self.count}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="length after the warm-up minute")
    parser.add_argument("--warmup-minutes", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--bundle", type=Path, help=f"the bundle to drive (default: {DEMO_BUNDLE})")
    parser.add_argument("--stub", action="store_true", help="drive the stub policy instead of a bundle")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.minutes <= 0 or args.warmup_minutes < 0:
        parser.error("--minutes must be > 0 and --warmup-minutes >= 0")
    bundle = None if args.stub else (args.bundle or DEMO_BUNDLE)
    if bundle is not None and not (bundle / "manifest.json").is_file():
        parser.error(f"no bundle at {bundle}: run `make demo` first, or pass --bundle DIR or --stub")
    policies = PolicySource(bundle, 5.0)
    policy = policies.make()
    minutes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rover-soak-") as tmp:
        sim = SimProcess(Path(tmp), "soak")
        try:
            config = sim_config(sim.tty, args.rate)
            probe = MinuteProbe(args.rate)
            load_before = os.getloadavg()
            running = start_vehicle(config, policy, extra_parts=(probe,))
            vehicle = running.vehicle
            time.sleep(args.warmup_minutes * 60)
            probe.take_p99_ms()
            rss_start = rss_mb()
            previous = vehicle.snapshot()
            for minute in range(1, int(np.ceil(args.minutes)) + 1):
                time.sleep(60 * min(1.0, args.minutes - (minute - 1)))
                snap = vehicle.snapshot()
                minutes.append(
                    {
                        "minute": minute,
                        "period_error_p99_ms": probe.take_p99_ms(),
                        "loop_work_p99_ms": snap["loop"]["work_ms"]["p99"],
                        "deadline_misses": snap["loop"]["deadline_misses"]
                        - previous["loop"]["deadline_misses"],
                        "failsafes": snap["failsafe"]["count"] - previous["failsafe"]["count"],
                        "inferences": snap["inference"]["completed"] - previous["inference"]["completed"],
                        "rss_mb": rss_mb(),
                    }
                )
                previous = snap
                print(json.dumps(minutes[-1]), file=sys.stderr, flush=True)
            rss_end = rss_mb()
            stop_vehicle(running)
        finally:
            sim.stop()
    p99s = [m["period_error_p99_ms"] for m in minutes if m["period_error_p99_ms"] is not None]
    report = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "policy": policies.describe(),
        "rate_hz": args.rate,
        "minutes": args.minutes,
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_end,
        "rss_growth_mb": None if rss_start is None or rss_end is None else round(rss_end - rss_start, 1),
        "period_error_p99_ms_worst_minute": max(p99s) if p99s else None,
        "failsafes": sum(m["failsafes"] for m in minutes),
        "deadline_misses": sum(m["deadline_misses"] for m in minutes),
        "per_minute": minutes,
    }
    emit_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
