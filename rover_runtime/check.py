"""`rover-runtime check`: the self-test a deploy gates on.

In order: the bundle verifies (sha256, schema) and loads; one inference on a camera-sized frame finishes
within the deadline; the thermal state is acceptable (temperature <= max, not throttled now, where the host
reports them); the serial device opens and the firmware answers a ping. The serial line is not touched
when the bundle fails. The report is JSON with `ok` and one entry per check.
"""

from __future__ import annotations

import platform
import socket
import time
from typing import Any

import numpy as np

from rover_runtime.bundle import BundleError
from rover_runtime.config import RuntimeConfig, make_serial_link
from rover_runtime.policy import BundlePolicy, PolicyError, load_policy
from rover_runtime.thermal import read_thermal


def run_check(
    config: RuntimeConfig, deadline_ms: float = 500.0, max_temp_c: float = 80.0, test_serial: bool = True
) -> dict[str, Any]:
    checks: dict[str, dict[str, Any]] = {}
    policy: BundlePolicy | None = None
    try:
        policy = load_policy(config.policy.bundle, config.policy.engine, config.policy.threads)
        checks["bundle"] = {
            "ok": True,
            "path": config.policy.bundle,
            "content_hash": policy.info.content_hash,
            "mode": policy.info.mode,
            "backend": policy.info.backend,
            "engine": policy.info.engine,
        }
    except (BundleError, PolicyError) as exc:
        checks["bundle"] = {"ok": False, "path": config.policy.bundle, "error": str(exc)}

    if policy is not None:
        frame = np.random.default_rng(0).integers(
            0, 256, size=(config.camera.height, config.camera.width, 3), dtype=np.uint8
        )
        start = time.perf_counter()
        try:
            chunk = policy.predict(frame, 0.0, 0.0)
            latency_ms = (time.perf_counter() - start) * 1000
            finite = bool(np.all(np.isfinite(chunk)))
            checks["inference"] = {
                "ok": finite and latency_ms <= deadline_ms,
                "latency_ms": round(latency_ms, 3),
                "deadline_ms": deadline_ms,
                "finite": finite,
            }
        except Exception as exc:
            checks["inference"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    else:
        checks["inference"] = {"ok": False, "error": "not run: the bundle failed"}

    thermal = read_thermal()
    too_hot = thermal.temperature_c is not None and thermal.temperature_c > max_temp_c
    checks["thermal"] = {
        "ok": not too_hot and not thermal.throttled_now,
        "max_temp_c": max_temp_c,
        **thermal.to_dict(),
    }

    if not test_serial:
        checks["serial"] = {"ok": True, "skipped": True}
    elif policy is None:
        checks["serial"] = {"ok": False, "port": config.serial.port, "error": "not tried: the bundle failed"}
    else:
        checks["serial"] = _check_serial(config)

    return {
        "ok": all(c["ok"] for c in checks.values()),
        "checks": checks,
        "hostname": socket.gethostname(),
        "architecture": platform.machine(),
        "time_unix": time.time(),
    }


def _check_serial(config: RuntimeConfig) -> dict[str, Any]:
    port = config.serial.port
    link = make_serial_link(config.serial)
    try:
        if not link.open():
            return {"ok": False, "port": port, "error": "cannot open the serial device"}
        version = link.ping(timeout_s=2.0)
        if version is None:
            return {"ok": False, "port": port, "error": "the firmware did not answer a ping within 2 s"}
        return {"ok": True, "port": port, "firmware": version}
    finally:
        link.close()
