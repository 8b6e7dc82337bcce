"""`rover-runtime check`: the self-test a deploy gates on.

In order: the bundle verifies (sha256, schema) and loads; the car can supply its inputs (a device for every
camera it lists, a source for every entry of its state); one inference on camera-sized frames finishes
within the deadline; the thermal state is acceptable (temperature <= max, not throttled now, where the host
reports them); every camera delivers frames for about a second (its real frame rate and the age of its
newest frame are reported); the serial device opens and the firmware answers a ping with this runtime's
protocol version and the sensors the state needs. The serial line is not touched when the bundle fails.
The report is JSON with `ok` and one entry per check. The camera and serial checks need the devices, which
the running service holds: the camera check runs when asked (`--cameras`), the serial one unless skipped
(`--skip-serial`).
"""

from __future__ import annotations

import platform
import socket
import time
from typing import Any

import numpy as np

from rover_runtime import protocol
from rover_runtime.bundle import BundleError
from rover_runtime.config import RuntimeConfig, make_serial_link
from rover_runtime.drive import InputError, InputPlan, describe_plan, make_cameras, plan_inputs
from rover_runtime.parts.car import missing_features
from rover_runtime.policy import BundlePolicy, PolicyError, load_policy
from rover_runtime.thermal import THROTTLE_NOW_FLAGS, read_thermal

CAMERA_SECONDS = 1.0


def run_check(
    config: RuntimeConfig,
    deadline_ms: float = 500.0,
    max_temp_c: float = 80.0,
    test_serial: bool = True,
    test_camera: bool = False,
) -> dict[str, Any]:
    checks: dict[str, dict[str, Any]] = {}
    policy: BundlePolicy | None = None
    plan: InputPlan | None = None
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
        try:
            plan = plan_inputs(config, policy.info.image_keys, policy.info.state_names)
            checks["inputs"] = {"ok": True, **describe_plan(plan)}
        except InputError as exc:
            checks["inputs"] = {"ok": False, "error": str(exc)}

    if policy is not None:
        rng = np.random.default_rng(0)
        frames = [
            rng.integers(0, 256, size=(config.camera.height, config.camera.width, 3), dtype=np.uint8)
            for _ in policy.info.image_keys
        ]
        start = time.perf_counter()
        try:
            chunk = policy.predict(frames, [0.0] * len(policy.info.state_names))
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
    thermal_problems = []
    if too_hot:
        thermal_problems.append(
            f"the SoC is at {thermal.temperature_c:.1f} °C, above the {max_temp_c:g} °C limit"
        )
    if thermal.throttled_now and thermal.throttled is not None:
        flags = [name for bit, name in THROTTLE_NOW_FLAGS.items() if thermal.throttled & (1 << bit)]
        thermal_problems.append(f"throttled now ({thermal.throttled:#x}: {', '.join(flags)})")
    checks["thermal"] = {
        "ok": not thermal_problems,
        "max_temp_c": max_temp_c,
        **thermal.to_dict(),
        **({"error": "; ".join(thermal_problems)} if thermal_problems else {}),
    }

    if not test_camera:
        checks["cameras"] = {"ok": True, "skipped": True, "hint": "--cameras captures from them"}
    elif plan is None:
        checks["cameras"] = {"ok": False, "error": "not tried: the bundle or its inputs failed"}
    else:
        checks["cameras"] = _check_cameras(config, plan)

    if not test_serial:
        checks["serial"] = {"ok": True, "skipped": True}
    elif policy is None or plan is None:
        checks["serial"] = {"ok": False, "port": config.serial.port, "error": "not tried: the bundle failed"}
    else:
        checks["serial"] = _check_serial(config, plan)

    return {
        "ok": all(c["ok"] for c in checks.values()),
        "checks": checks,
        "hostname": socket.gethostname(),
        "architecture": platform.machine(),
        "time_unix": time.time(),
    }


def _check_cameras(config: RuntimeConfig, plan: InputPlan) -> dict[str, Any]:
    """Every camera of the plan captures for CAMERA_SECONDS: its real frame rate and newest frame's age."""
    cameras = make_cameras(config, plan)
    for camera in cameras:
        camera.connect()
    try:
        time.sleep(CAMERA_SECONDS)
        report: dict[str, Any] = {}
        for camera in cameras:
            stats = camera.stats
            stamp = camera.latest_timestamp()
            age = None if stamp is None else round(time.monotonic() - stamp, 3)
            fresh = age is not None and age <= config.camera.max_frame_age_s
            report[camera.name] = {
                "ok": fresh,
                "source": camera.source.name,
                "frames": stats.frames,
                "fps": stats.fps,
                "frame_age_s": age,
                "timestamps": stats.timestamps,
                "error": None
                if fresh
                else (stats.last_error or f"no fresh frame within {CAMERA_SECONDS:g} s"),
            }
        return {"ok": all(r["ok"] for r in report.values()), **report}
    finally:
        for camera in cameras:
            camera.disconnect()


def _check_serial(config: RuntimeConfig, plan: InputPlan) -> dict[str, Any]:
    port = config.serial.port
    link = make_serial_link(config.serial)
    try:
        if not link.open():
            return {"ok": False, "port": port, "error": "cannot open the serial device"}
        version = link.ping(timeout_s=2.0)
        if version is None:
            return {"ok": False, "port": port, "error": "the firmware did not answer a ping within 2 s"}
        if version.protocol != protocol.PROTOCOL_VERSION:
            return {
                "ok": False,
                "port": port,
                "firmware": version.describe(),
                "error": f"the firmware speaks protocol {version.protocol}, this runtime "
                f"{protocol.PROTOCOL_VERSION}: flash firmware/rover_car from this release",
            }
        missing = missing_features(plan.needed_features, version)
        if missing:
            return {"ok": False, "port": port, "firmware": version.describe(), "error": "; ".join(missing)}
        return {"ok": True, "port": port, "firmware": version.describe()}
    finally:
        link.close()
