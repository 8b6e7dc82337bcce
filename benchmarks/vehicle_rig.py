"""Shared by the control-loop and soak benchmarks: the firmware simulator in its own process, the policy to
drive, and the vehicle built as `rover-runtime run` builds it with synthetic cameras."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rover_runtime.camera import Camera, SyntheticSource
from rover_runtime.config import RuntimeConfig, load_config, make_serial_link
from rover_runtime.drive import build_vehicle
from rover_runtime.metrics import write_json_atomic
from rover_runtime.policy import Policy, StubPolicy, load_policy
from rover_runtime.serial_link import SerialLink
from rover_runtime.vehicle import Part, Vehicle

NEUTRAL_US = 1500


def emit_report(report: dict[str, Any], output: Path | None) -> None:
    """A benchmark's JSON on stdout, and atomically in `output` when given."""
    print(json.dumps(report, indent=2))
    if output is not None:
        write_json_atomic(output, report)


DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "out" / "bundles" / "static-int8-onnx"


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

    def neutral_after(self, t0: float) -> float:
        """Seconds from t0 to the first commanded neutral the simulator logged after it."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for e in self.entries():
                if e["mono"] > t0 and e["throttle_us"] == NEUTRAL_US:
                    return float(e["mono"] - t0)
            time.sleep(0.02)
        raise RuntimeError("no neutral on the wire within 5 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=5)


def sim_config(port: Path, rate: float, **extra: Any) -> RuntimeConfig:
    values = {
        "control.rate_hz": rate,
        "camera.source": "synthetic",
        "serial.port": str(port),
        "metrics.path": "",
        "policy.stub": True,
    }
    values.update(extra)
    return load_config(None, values)


class PolicySource:
    """The policy every measurement drives: the demo bundle (loaded once) or the stub."""

    def __init__(self, bundle: Path | None, stub_latency_ms: float) -> None:
        self.bundle = bundle
        self.stub_latency_ms = stub_latency_ms
        self._loaded: Policy | None = load_policy(bundle) if bundle is not None else None

    def make(self) -> Policy:
        if self._loaded is not None:
            return self._loaded
        return StubPolicy(chunk_size=20, latency_s=self.stub_latency_ms / 1000)

    def describe(self) -> dict[str, Any]:
        policy = self.make()
        return {
            "bundle": None if self.bundle is None else str(self.bundle),
            "backend": policy.info.backend,
            "mode": policy.info.mode,
            "threads": policy.info.threads,
            "cameras": list(policy.info.image_keys),
        }


@dataclass
class Running:
    vehicle: Vehicle
    thread: threading.Thread
    link: SerialLink
    sources: list[SyntheticSource]
    policy: Policy


def start_vehicle(config: RuntimeConfig, policy: Policy, extra_parts: tuple[Part, ...] = ()) -> Running:
    sources = [SyntheticSource(640, 480, fps=30) for _ in policy.info.image_keys]
    cameras = [
        Camera(source, retry_interval_s=1.0, name=key.rsplit(".", 1)[-1], nice=config.control.background_nice)
        for source, key in zip(sources, policy.info.image_keys, strict=True)
    ]
    link = make_serial_link(config.serial)
    vehicle = build_vehicle(
        config, policy, link, cameras=cameras, record_timings=not extra_parts, extra_parts=extra_parts
    )
    thread = threading.Thread(target=vehicle.run, daemon=True)
    thread.start()
    return Running(vehicle, thread, link, sources, policy)


def stop_vehicle(run: Running) -> None:
    run.vehicle.request_stop()
    run.thread.join(timeout=10)
    run.link.close()


def wait_driving(run: Running, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not run.vehicle.driving:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the vehicle did not drive: {run.vehicle.failsafe_reasons}")
        time.sleep(0.01)
