"""The on-car policy benchmark: latency percentiles, throughput, resources, thermal state, versions.

Times the model call on preprocessed inputs (`latency_ms`) over `iterations` after `warmup` calls, and the
preprocessing of a camera-sized frame separately (`preprocess_ms`). `achievable_control_rate_hz` is the
rate at which one inference per control period still fits 99 % of the time (1000 / p99 ms); with chunked
actions the loop can run faster than that, see docs/runtime.md.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rover_runtime.policy import BundlePolicy, StubPolicy, load_policy
from rover_runtime.preprocess import preprocess_image, preprocess_state
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


def run_benchmark(
    bundle_dir: Path | str | None,
    *,
    iterations: int = 1000,
    warmup: int = 50,
    threads: int = 0,
    engine: str = "auto",
    frame_size: tuple[int, int] = (640, 480),
) -> dict[str, Any]:
    """Time the bundle's policy (or the stub when `bundle_dir` is None) and describe the host."""
    thermal_before = read_thermal()
    width, height = frame_size
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    if bundle_dir is None:
        stub = StubPolicy(latency_s=0.0)
        call: Any = lambda: stub.predict(frame, 0.0, 0.0)  # noqa: E731
        info, preprocess_times = stub.info, [0.0]
        load_s = 0.0
    else:
        t = time.perf_counter()
        policy: BundlePolicy = load_policy(bundle_dir, engine, threads)
        load_s = time.perf_counter() - t
        info = policy.info
        state = preprocess_state(0.1, 0.1)
        preprocess_times = []
        for _ in range(min(iterations, 200)):
            t = time.perf_counter()
            image = preprocess_image(frame, policy.image_spec)
            preprocess_times.append(time.perf_counter() - t)
        call = lambda: policy.infer(state, image)  # noqa: E731
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
    thermal_after = read_thermal()
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
        "cpu_percent": round(100.0 * cpu / wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
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
