"""Control-loop timing and failsafe reaction, measured against the firmware simulator over a real pty.

The vehicle is built as `rover-runtime run` builds it (`rover_runtime.drive.build_vehicle`: every part on),
with the real demo bundle (`make demo` writes out/bundles/static-int8-onnx; or --bundle, or --stub) and
synthetic 640x480 cameras, one per camera the bundle takes. Prints one JSON document:
- `timing`: for each rate (and with SCHED_FIFO when asked): absolute period error p50/p95/p99/max, deadline
  misses, achieved rate, and the loop's own work per cycle (every part; inference runs in its worker
  thread) p50/p99.
- `failsafe_stall`: the policy stalls; when does neutral reach the wire (the simulator's log, monotonic
  clock)? Measured from the moment the stall is detected (failsafe.inference_timeout_s), in periods.
- `camera_loss`: the camera's driver raises (an unplugged camera); neutral on the wire after, in periods.
- `link_loss`: the firmware stops answering (the simulator muted by SIGUSR1; it still applies and logs what
  it receives); neutral on the wire after the acknowledgements are older than serial.max_ack_age_s, in
  periods.
- `sigkill`: `rover-runtime run` killed with SIGKILL while driving; when does the firmware go neutral by its
  own timeout?
- `recorder`: the black box off and on, back to back at 30 Hz: the loop's work p99 growth, steps recorded
  and dropped, frames missing, megabytes recorded per minute of driving.

    python benchmarks/control_loop.py [--cycles 3000] [--rates 30,100] [--bundle DIR | --stub] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from vehicle_rig import (
    DEMO_BUNDLE,
    NEUTRAL_US,
    PolicySource,
    SimProcess,
    emit_report,
    sim_config,
    start_vehicle,
    stop_vehicle,
    wait_driving,
)

from rover_runtime.policy import StubPolicy


def _ms(values: NDArray[np.float64]) -> dict[str, float]:
    ms = values * 1000
    return {
        "p50": round(float(np.percentile(ms, 50)), 4),
        "p95": round(float(np.percentile(ms, 95)), 4),
        "p99": round(float(np.percentile(ms, 99)), 4),
        "max": round(float(ms.max()), 4),
    }


def measure_timing(
    work: Path,
    rate: float,
    cycles: int,
    policies: PolicySource,
    priority: int = 0,
    *,
    recording: bool = False,
) -> dict[str, Any]:
    sim = SimProcess(work, f"timing{rate:g}{'-record' if recording else ''}")
    recordings = work / f"recordings-{rate:g}-{priority}"
    try:
        extra: dict[str, Any] = {"control.realtime_priority": priority}
        if recording:
            extra |= {"record.enabled": True, "record.directory": str(recordings), "record.min_free_mb": 0.0}
        config = sim_config(sim.tty, rate, **extra)
        run = start_vehicle(config, policies.make())
        wait_driving(run)
        start = run.vehicle.cycles
        while run.vehicle.cycles < start + cycles:
            time.sleep(0.2)
        snapshot = run.vehicle.snapshot()
        stop_vehicle(run)
        record = run.vehicle.record
        assert record is not None
        wake = np.asarray(record.wake[start:])
        work_s = np.asarray(record.work[start:])
        errors = np.abs(np.diff(wake) - 1.0 / rate)
        result = {
            "rate_hz": rate,
            "realtime_priority": priority,
            "recorder": snapshot.get("recorder"),
            "cycles": len(wake),
            "achieved_rate_hz": round((len(wake) - 1) / (wake[-1] - wake[0]), 4),
            "period_error_abs_ms": _ms(errors),
            "deadline_misses": run.vehicle.deadline_misses,
            "failsafe_cycles": int(np.sum(record.neutral[start:])),
            "loop_work_ms": _ms(work_s),
            "inference": snapshot["inference"],
            "serial": {k: v for k, v in vars(run.link.stats).items() if isinstance(v, int | bool)},
        }
        if recording:
            result["recorded_bytes"] = sum(f.stat().st_size for f in recordings.rglob("*") if f.is_file())
        return result
    finally:
        sim.stop()


def measure_recorder(work: Path, rate: float, cycles: int, policies: PolicySource) -> dict[str, Any]:
    """The same loop with the black box off and on, back to back: what recording costs the loop."""
    off = measure_timing(work, rate, cycles, policies)
    on = measure_timing(work, rate, cycles, policies, recording=True)
    recorder = on["recorder"] or {}
    return {
        "rate_hz": rate,
        "off": off,
        "on": on,
        "loop_work_p99_growth_ms": round(on["loop_work_ms"]["p99"] - off["loop_work_ms"]["p99"], 4),
        "steps_recorded": recorder.get("steps_written"),
        "steps_dropped": recorder.get("steps_dropped"),
        "frames_missing": recorder.get("frames_missing"),
        "recorded_mb_per_minute": round(on["recorded_bytes"] / 1e6 / (on["cycles"] / rate / 60), 2),
    }


def measure_stall(work: Path, rate: float, timeout_s: float, repeats: int) -> dict[str, Any]:
    """The policy stalls: neutral on the wire after the stall is detected (inference_timeout_s)."""
    sim = SimProcess(work, "stall")
    period = 1.0 / rate
    after_timeout = []
    try:
        config = sim_config(sim.tty, rate, **{"failsafe.inference_timeout_s": timeout_s})
        for _ in range(repeats):
            policy = StubPolicy(chunk_size=20, latency_s=0.002)
            run = start_vehicle(config, policy)
            wait_driving(run)
            time.sleep(0.5)
            policy.stall()
            while policy.stalled_call_started is None:
                time.sleep(0.002)
            blocked_at = policy.stalled_call_started
            after_timeout.append(sim.neutral_after(blocked_at) - timeout_s)
            policy.release()
            stop_vehicle(run)
        return {
            "rate_hz": rate,
            "inference_timeout_s": timeout_s,
            "repeats": repeats,
            "neutral_after_detection_periods": _periods(after_timeout, period),
        }
    finally:
        sim.stop()


def measure_camera_loss(work: Path, rate: float, policies: PolicySource, repeats: int) -> dict[str, Any]:
    """The camera's driver raises (unplugged): neutral on the wire after, in periods."""
    sim = SimProcess(work, "camera")
    period = 1.0 / rate
    delays = []
    try:
        config = sim_config(sim.tty, rate)
        for _ in range(repeats):
            run = start_vehicle(config, policies.make())
            wait_driving(run)
            time.sleep(0.5)
            lost_at = time.monotonic()
            run.sources[0].fail(OSError(19, "No such device"))
            delays.append(sim.neutral_after(lost_at))
            stop_vehicle(run)
        return {"rate_hz": rate, "repeats": repeats, "neutral_after_loss_periods": _periods(delays, period)}
    finally:
        sim.stop()


def measure_link_loss(work: Path, rate: float, policies: PolicySource, repeats: int) -> dict[str, Any]:
    """The firmware stops answering (the simulator muted by SIGUSR1; it still logs what it receives): neutral
    on the wire after the acknowledgements are older than serial.max_ack_age_s (the detection), in periods."""
    period = 1.0 / rate
    after_detection = []
    for i in range(repeats):
        sim = SimProcess(work, f"link{i}")
        try:
            config = sim_config(sim.tty, rate)
            max_age = config.serial.max_ack_age_s
            run = start_vehicle(config, policies.make())
            wait_driving(run)
            time.sleep(0.5)
            sim.proc.send_signal(signal.SIGUSR1)
            muted_at = time.monotonic()
            after_detection.append(sim.neutral_after(muted_at) - max_age)
            stop_vehicle(run)
        finally:
            sim.stop()
    return {
        "rate_hz": rate,
        "repeats": repeats,
        "max_ack_age_s": max_age,
        "neutral_after_detection_periods": _periods(after_detection, period),
    }


def _periods(values: list[float], period: float) -> dict[str, float]:
    p = np.asarray(values) / period
    return {"mean": round(float(p.mean()), 3), "max": round(float(p.max()), 3)}


def measure_sigkill(work: Path) -> dict[str, Any]:
    sim = SimProcess(work, "sigkill")
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rover_runtime.cli",
                "run",
                "--policy-stub",
                "--camera",
                "synthetic",
                "--serial-port",
                str(sim.tty),
                "--metrics-path",
                "",
                "--log-level",
                "WARNING",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            entries = sim.entries()
            if entries and entries[-1]["throttle_us"] != NEUTRAL_US:
                break
            time.sleep(0.05)
        time.sleep(0.5)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.6)
        last_command = max(e["mono"] for e in sim.entries() if e["event"] == "command")
        failsafe = next(e for e in sim.entries() if e["event"] == "failsafe" and e["mono"] > killed_at)
        return {
            "firmware_timeout_ms": 250,
            "neutral_after_kill_ms": round((failsafe["mono"] - killed_at) * 1000, 1),
            "neutral_after_last_command_ms": round((failsafe["mono"] - last_command) * 1000, 1),
            "outputs_after": {"steer_us": failsafe["steer_us"], "throttle_us": failsafe["throttle_us"]},
        }
    finally:
        sim.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--rates", default="30,100")
    parser.add_argument("--bundle", type=Path, help=f"the bundle to drive (default: {DEMO_BUNDLE})")
    parser.add_argument("--stub", action="store_true", help="drive the stub policy instead of a bundle")
    parser.add_argument("--stub-latency-ms", type=float, default=5.0)
    parser.add_argument("--stall-repeats", type=int, default=5)
    parser.add_argument(
        "--realtime-priority", type=int, default=50, help="also measure with SCHED_FIFO (0: no)"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    bundle = None if args.stub else (args.bundle or DEMO_BUNDLE)
    if bundle is not None and not (bundle / "manifest.json").is_file():
        parser.error(f"no bundle at {bundle}: run `make demo` first, or pass --bundle DIR or --stub")
    policies = PolicySource(bundle, args.stub_latency_ms)
    with tempfile.TemporaryDirectory(prefix="rover-bench-") as tmp:
        work = Path(tmp)
        report = {
            "host": platform.node(),
            "architecture": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_before": os.getloadavg(),
            "policy": policies.describe(),
            "timing": [
                measure_timing(work, float(r), args.cycles, policies, priority)
                for priority in sorted({0, args.realtime_priority})
                for r in args.rates.split(",")
            ],
            "recorder": measure_recorder(work, 30.0, args.cycles, policies),
            "failsafe_stall": measure_stall(work, 30.0, 0.1, args.stall_repeats),
            "camera_loss": measure_camera_loss(work, 30.0, policies, args.stall_repeats),
            "link_loss": measure_link_loss(work, 30.0, policies, args.stall_repeats),
            "sigkill": measure_sigkill(work),
            "load_average_after": os.getloadavg(),
        }
    emit_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
