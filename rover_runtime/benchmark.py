"""The on-car benchmark: the policy flat out, then the car driving at its control rate.

1. Inference flat out: the model call on preprocessed inputs (`latency_ms`) over `iterations` after `warmup`
   calls, and the preprocessing of camera-sized frames (every camera the bundle takes) separately
   (`preprocess_ms`). `achievable_control_rate_hz` is the rate at which one inference per control period
   still fits 99 % of the time (1000 / p99 ms); with chunked actions the loop can run faster than that.
   `inference_cpu_percent` is the process's CPU time over wall time while it runs back to back (one core =
   100; several inference threads can pass 100).
2. Driving (`driving`, when `drive_s` > 0 and a config is given): the whole vehicle (the config's cameras
   and serial line, the policy, every part) runs at the control rate for `drive_s` seconds after a 2 s
   warm-up. It reports what the seed's resource table means: CPU as a share of all cores
   (`cpu_percent_of_all_cores`: process CPU time / (wall time x cores)), resident memory, the achieved
   rate and the loop's timing. The commands sent are neutral unless `live` (the car stays still while
   every part does its real work; writing a neutral line costs what writing the policy's does).
The top-level `cpu_percent` and `peak_rss_mb` are the driving figures when measured (the fleet report
judges those), else the flat-out ones.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from rover_runtime.config import RuntimeConfig
from rover_runtime.policy import BundlePolicy, Policy, StubPolicy, load_policy
from rover_runtime.thermal import read_thermal


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "rover_fleet": _version("rover-fleet"),
        "numpy": _version("numpy"),
        "opencv": _version("opencv-python-headless") or _version("opencv-python"),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "executorch": _version("rover-executorch"),
        "pyserial": _version("pyserial"),
    }


def _stats_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {
        "mean": round(float(ms.mean()), 4),
        "p50": round(float(np.percentile(ms, 50)), 4),
        "p95": round(float(np.percentile(ms, 95)), 4),
        "p99": round(float(np.percentile(ms, 99)), 4),
        "max": round(float(ms.max()), 4),
        "min": round(float(ms.min()), 4),
    }


def rss_mb() -> float | None:
    """The process's resident memory now, from /proc (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def measure_driving(
    config: RuntimeConfig, policy: Policy, seconds: float, *, live: bool = False
) -> dict[str, Any]:
    """The whole vehicle at the control rate for `seconds` after a 2 s warm-up: CPU share, memory, timing."""
    from rover_runtime.config import make_serial_link  # noqa: PLC0415
    from rover_runtime.drive import build_vehicle  # noqa: PLC0415

    link = make_serial_link(config.serial)
    vehicle = build_vehicle(config, policy, link, neutral_only=not live)
    runner = threading.Thread(target=vehicle.run, name="benchmark-vehicle", daemon=True)
    runner.start()
    try:
        time.sleep(DRIVE_WARMUP_S)
        cycles0, cpu0, wall0 = vehicle.cycles, time.process_time(), time.perf_counter()
        time.sleep(seconds)
        cycles1, cpu1, wall1 = vehicle.cycles, time.process_time(), time.perf_counter()
        snapshot = vehicle.snapshot()
        memory = rss_mb()
    finally:
        vehicle.request_stop()
        runner.join(timeout=10)
    wall = wall1 - wall0
    cores = os.cpu_count() or 1
    cpu_share = 100.0 * (cpu1 - cpu0) / wall
    return {
        "seconds": round(wall, 3),
        "live": live,
        "rate_hz_target": config.control.rate_hz,
        "rate_hz_achieved": round((cycles1 - cycles0) / wall, 3),
        "cpu_percent_of_all_cores": round(cpu_share / cores, 1),
        "cpu_percent_of_one_core": round(cpu_share, 1),
        "rss_mb": memory,
        "peak_rss_mb": peak_rss_mb(),
        "period_error_ms": snapshot["loop"]["period_error_ms"],
        "work_ms": snapshot["loop"]["work_ms"],
        "deadline_misses": snapshot["loop"]["deadline_misses"],
        "failsafe": snapshot["failsafe"],
        "inference": snapshot["inference"],
        "cameras": snapshot.get("cameras", {}),
        "serial_firmware": snapshot["serial"]["firmware"],
        # What the car drove with: the fleet report's release and firmware columns.
        "firmware_version": snapshot["serial"]["firmware_version"],
        "release": (snapshot.get("release") or {}).get("id"),
    }


DRIVE_WARMUP_S = 2.0


def run_benchmark(
    bundle_dir: Path | str | None,
    *,
    iterations: int = 1000,
    warmup: int = 50,
    threads: int = 0,
    engine: str = "auto",
    frame_size: tuple[int, int] = (640, 480),
    drive_config: RuntimeConfig | None = None,
    drive_s: float = 0.0,
    live: bool = False,
) -> dict[str, Any]:
    """Time the bundle's policy (or the stub when `bundle_dir` is None), then (with `drive_config` and
    `drive_s` > 0) measure the car driving with it; describe the host."""
    thermal_before = read_thermal()
    width, height = frame_size
    rng = np.random.default_rng(0)
    policy: Policy
    if bundle_dir is None:
        stub = StubPolicy(latency_s=0.0)
        stub_frames = [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)]
        call: Any = lambda: stub.predict(stub_frames, (0.0, 0.0))  # noqa: E731
        info, preprocess_times = stub.info, [0.0]
        load_s = 0.0
        policy = stub
    else:
        t = time.perf_counter()
        bundle_policy: BundlePolicy = load_policy(bundle_dir, engine, threads)
        load_s = time.perf_counter() - t
        policy = bundle_policy
        info = bundle_policy.info
        frames = [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in info.image_keys]
        state_values = [0.1] * len(info.state_names)
        preprocess_times = []
        for _ in range(min(iterations, 200)):
            t = time.perf_counter()
            state, images = bundle_policy.preprocess(frames, state_values)
            preprocess_times.append(time.perf_counter() - t)
        call = lambda: bundle_policy.infer(state, images)  # noqa: E731
    for _ in range(warmup):
        call()
    latencies = []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(iterations):
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    latency = _stats_ms(latencies)
    inference_peak_rss = peak_rss_mb()
    driving = (
        measure_driving(drive_config, policy, drive_s, live=live)
        if drive_config is not None and drive_s > 0
        else None
    )
    thermal_after = read_thermal()
    cores = os.cpu_count() or 1
    return {
        "iterations": iterations,
        "warmup": warmup,
        "threads": info.threads,
        # The samples too, rounded to 1 µs: the fleet report plots each car's latency distribution.
        "latency_ms": {**latency, "samples": [round(x * 1000.0, 3) for x in latencies]},
        "preprocess_ms": _stats_ms(preprocess_times),
        "frame_size": [width, height],
        "throughput_fps": round(iterations / wall, 3),
        "achievable_control_rate_hz": round(1000.0 / latency["p99"], 3) if latency["p99"] > 0 else None,
        "inference_cpu_percent": round(100.0 * cpu / wall, 1),
        "inference_peak_rss_mb": inference_peak_rss,
        "driving": driving,
        # What the fleet report judges: the driving figures when measured (raw, one core = 100; the report
        # divides by cpu_count), else the flat-out ones.
        "cpu_percent": driving["cpu_percent_of_one_core"] if driving else round(100.0 * cpu / wall, 1),
        "cpu_percent_of_all_cores": (
            driving["cpu_percent_of_all_cores"] if driving else round(100.0 * cpu / wall / cores, 1)
        ),
        "cpu_measured_while": "driving" if driving else "inference flat out",
        "peak_rss_mb": driving["peak_rss_mb"] if driving else inference_peak_rss,
        "load_s": round(load_s, 3),
        "thermal_before": thermal_before.to_dict(),
        "thermal_after": thermal_after.to_dict(),
        "temperature_c_before": thermal_before.temperature_c,
        "temperature_c_after": thermal_after.temperature_c,
        "throttled_before": thermal_before.to_dict()["throttled"],
        "throttled_after": thermal_after.to_dict()["throttled"],
        "model_bytes": info.model_bytes,
        "bundle": None if bundle_dir is None else str(bundle_dir),
        "content_hash": info.content_hash,
        "engine": info.engine,
        "backend": info.backend,
        "mode": info.mode,
        "chunk_size": info.chunk_size,
        "versions": versions(),
        "hostname": socket.gethostname(),
        "architecture": platform.machine(),
        "platform": sys.platform,
        "cpu_count": os.cpu_count(),
        "time_unix": time.time(),
    }
