"""Control-loop timing and failsafe reaction, measured against the firmware simulator over a real pty.

Prints one JSON document:
- `timing`: for each rate, the loop with the stub policy, the synthetic camera (640x480) and the real
  SerialLink: absolute period error p50/p95/p99/max, deadline misses, achieved rate, and the loop's own
  work per cycle (everything but inference, which runs in the worker thread) median/p99.
- `failsafe_stall`: the policy stalls; when does neutral reach the wire (the simulator's log, monotonic
  clock)? Once with a fresh chunk needed every step (n_action_steps = 1), once in the default chunk mode
  where the stall is detected by failsafe.inference_timeout_s.
- `sigkill`: `rover-runtime run` killed with SIGKILL while driving; when does the firmware go neutral by its
  own timeout?

    python benchmarks/control_loop.py [--cycles 3000] [--rates 30,100] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rover_runtime.camera import Camera, SyntheticSource
from rover_runtime.config import load_config, make_serial_link
from rover_runtime.control_loop import ControlLoop
from rover_runtime.metrics import write_json_atomic
from rover_runtime.policy import StubPolicy

NEUTRAL_US = 1500


class SimProcess:
    """The firmware simulator in its own process, on a pty linked at `tty`."""

    def __init__(self, work: Path, name: str) -> None:
        self.tty = work / f"{name}.tty"
        self.log = work / f"{name}.jsonl"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rover_runtime.firmware_sim",
                "--pty-link",
                str(self.tty),
                "--log",
                str(self.log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.tty.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("firmware simulator did not start")
            time.sleep(0.05)

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=5)


def _config(port: Path, rate: float, **extra: Any) -> Any:
    values = {
        "control.rate_hz": rate,
        "camera.source": "synthetic",
        "serial.port": str(port),
        "metrics.path": "",
        "policy.stub": True,
    }
    values.update(extra)
    return load_config(None, values)


def _start_loop(config: Any, policy: StubPolicy) -> tuple[ControlLoop, threading.Thread, Camera, Any]:
    camera = Camera(SyntheticSource(640, 480, fps=30), retry_interval_s=1.0)
    link = make_serial_link(config.serial)
    link.open()
    camera.start()
    loop = ControlLoop(config, policy, camera, link, record_timings=True)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    return loop, thread, camera, link


def _stop_loop(loop: ControlLoop, thread: threading.Thread, camera: Camera, link: Any) -> None:
    loop.request_stop()
    thread.join(timeout=10)
    link.close()
    camera.close()


def _ms(values: NDArray[np.float64]) -> dict[str, float]:
    ms = values * 1000
    return {
        "p50": round(float(np.percentile(ms, 50)), 4),
        "p95": round(float(np.percentile(ms, 95)), 4),
        "p99": round(float(np.percentile(ms, 99)), 4),
        "max": round(float(ms.max()), 4),
    }


def measure_timing(
    work: Path, rate: float, cycles: int, stub_latency_ms: float, priority: int = 0
) -> dict[str, Any]:
    sim = SimProcess(work, f"timing{rate:g}")
    try:
        config = _config(sim.tty, rate, **{"control.realtime_priority": priority})
        policy = StubPolicy(chunk_size=20, latency_s=stub_latency_ms / 1000)
        loop, thread, camera, link = _start_loop(config, policy)
        while loop.cycles < cycles + 10:
            time.sleep(0.2)
        _stop_loop(loop, thread, camera, link)
        assert loop.record is not None
        wake = np.asarray(loop.record.wake[10:])  # skip start-up
        work_s = np.asarray(loop.record.work[10:])
        errors = np.abs(np.diff(wake) - 1.0 / rate)
        return {
            "rate_hz": rate,
            "realtime_priority": priority,
            "cycles": len(wake),
            "achieved_rate_hz": round((len(wake) - 1) / (wake[-1] - wake[0]), 4),
            "period_error_abs_ms": _ms(errors),
            "deadline_misses": loop.deadline_misses,
            "failsafe_cycles": int(np.sum(loop.record.neutral[10:])),
            "loop_work_ms": _ms(work_s),
            "stub_latency_ms": stub_latency_ms,
            "inference_latency_ms": loop.snapshot()["inference"]["latency_ms"],
            "serial": {k: v for k, v in vars(link.stats).items() if isinstance(v, int | bool)},
        }
    finally:
        sim.stop()


def measure_stall(
    work: Path, rate: float, n_action_steps: int, timeout_s: float, repeats: int
) -> dict[str, Any]:
    sim = SimProcess(work, f"stall{n_action_steps}")
    period = 1.0 / rate
    reactions, after_timeout = [], []
    try:
        config = _config(
            sim.tty,
            rate,
            **{"control.n_action_steps": n_action_steps, "failsafe.inference_timeout_s": timeout_s},
        )
        for _ in range(repeats):
            policy = StubPolicy(chunk_size=20, latency_s=0.002)
            loop, thread, camera, link = _start_loop(config, policy)
            deadline = time.monotonic() + 5
            while not loop.driving and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)
            stalled_at = time.monotonic()
            policy.stall()
            while policy.stalled_call_started is None or loop.driving:
                time.sleep(0.005)
            time.sleep(0.1)
            blocked_at = policy.stalled_call_started
            entries = [e for e in sim.entries() if e["mono"] > stalled_at]
            neutral = next(e for e in entries if e["throttle_us"] == NEUTRAL_US and not e["failsafe"])
            policy.release()
            _stop_loop(loop, thread, camera, link)
            reactions.append(neutral["mono"] - blocked_at)
            after_timeout.append(neutral["mono"] - (blocked_at + timeout_s))
        out: dict[str, Any] = {
            "rate_hz": rate,
            "n_action_steps": n_action_steps,
            "inference_timeout_s": timeout_s,
            "repeats": repeats,
        }
        if n_action_steps == 1:
            out["neutral_after_stall_periods"] = _periods(reactions, period)
        else:
            out["neutral_after_timeout_periods"] = _periods(after_timeout, period)
        return out
    finally:
        sim.stop()


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
    parser.add_argument("--stub-latency-ms", type=float, default=5.0)
    parser.add_argument("--stall-repeats", type=int, default=5)
    parser.add_argument(
        "--realtime-priority", type=int, default=50, help="also measure with SCHED_FIFO (0: no)"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rover-bench-") as tmp:
        work = Path(tmp)
        report = {
            "host": platform.node(),
            "architecture": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_before": os.getloadavg(),
            "timing": [
                measure_timing(work, float(r), args.cycles, args.stub_latency_ms, priority)
                for priority in sorted({0, args.realtime_priority})
                for r in args.rates.split(",")
            ],
            "failsafe_stall": [
                measure_stall(work, 30.0, 1, 0.5, args.stall_repeats),
                measure_stall(work, 30.0, 20, 0.1, args.stall_repeats),
            ],
            "sigkill": measure_sigkill(work),
            "load_average_after": os.getloadavg(),
        }
    print(json.dumps(report, indent=2))
    if args.output:
        write_json_atomic(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
