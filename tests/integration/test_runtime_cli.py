"""`rover-runtime` as a process: SIGTERM, bad bundles refused before serial, check, benchmark, systemd.

The firmware simulator runs on a real pty in the test process; the runtime is a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rover_runtime.firmware_sim import FirmwareSimulator
from rover_runtime.testing import ensure_tiny_bundle

CACHE = Path(os.environ.get("ROVER_CACHE", "/root/.cache/rover")) / "test-fixtures"
NEUTRAL = 1500


def runtime(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rover_runtime.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[FirmwareSimulator]:
    simulator = FirmwareSimulator(pty_link=tmp_path / "tty", log_file=tmp_path / "fw.jsonl").start()
    yield simulator
    simulator.stop()


@pytest.fixture(scope="module")
def bundle() -> Path:
    pytest.importorskip("torch")
    return ensure_tiny_bundle(CACHE, "torchscript")


def test_sigterm_leaves_neutral_on_the_wire_and_exits_0(sim: FirmwareSimulator, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    proc = runtime(
        "run", "--policy-stub", "--camera", "synthetic", "--serial-port", str(tmp_path / "tty"),
        "--metrics-path", str(metrics),
    )  # fmt: skip
    try:
        assert wait_for(lambda: sim.snapshot()["throttle_us"] != NEUTRAL), "the car never drove"
        assert wait_for(lambda: metrics.exists() and json.loads(metrics.read_text())["driving"])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    snap = sim.snapshot()
    assert (snap["steer_us"], snap["throttle_us"], snap["failsafe"]) == (NEUTRAL, NEUTRAL, False)
    assert "SIGTERM: stopping" in out
    final = json.loads(metrics.read_text())
    assert final["driving"] is False
    assert final["loop"]["cycles"] > 0
    assert final["serial"]["commands_sent"] > 0


@pytest.mark.parametrize("damage", ["corrupt", pytest.param("mismatched", marks=pytest.mark.slow)])
def test_bad_bundle_is_refused_before_the_serial_line_is_touched(
    sim: FirmwareSimulator, bundle: Path, tmp_path: Path, damage: str
) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(bundle, bad)
    if damage == "corrupt":
        with (bad / "model.pt").open("r+b") as stream:
            stream.seek(100)
            stream.write(b"\xff\xff")
        expected = "model.pt does not match its sha256"
    else:
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["inputs"]["images"][0]["shape"] = [3, 24, 40]  # still valid JSON schema, wrong for the model
        manifest["outputs"]["chunk_size"] = 12
        (bad / "manifest.json").write_text(json.dumps(manifest))
        expected = "the manifest says [1, 12, 2]"
    proc = runtime(
        "run", "--bundle", str(bad), "--camera", "synthetic", "--serial-port", str(tmp_path / "tty")
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert expected in err
    snap = sim.snapshot()
    assert snap["rx_ok"] == 0
    assert snap["rx_bad"] == 0  # not a byte arrived


@pytest.mark.slow  # imports torch in a subprocess
def test_bundle_drives_the_car(sim: FirmwareSimulator, bundle: Path, tmp_path: Path) -> None:
    proc = runtime(
        "run", "--bundle", str(bundle), "--camera", "synthetic", "--serial-port", str(tmp_path / "tty"),
        "--metrics-path", "", "--threads", "1", "--max-cycles", "60",
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "policy loaded: torch fp32" in out
    assert sim.snapshot()["rx_ok"] >= 60
    moved = [json.loads(line) for line in (tmp_path / "fw.jsonl").read_text().splitlines()]
    assert any(e["steer_us"] != NEUTRAL for e in moved)


@pytest.mark.slow  # imports torch in a subprocess
def test_check_passes_with_firmware_and_fails_without(
    sim: FirmwareSimulator, bundle: Path, tmp_path: Path
) -> None:
    proc = runtime(
        "check", "--bundle", str(bundle), "--serial-port", str(tmp_path / "tty"), "--max-temp-c", "200"
    )
    out, err = proc.communicate(timeout=60)
    report = json.loads(out)
    assert proc.returncode == 0, err
    assert report["ok"] is True
    assert report["checks"]["serial"]["firmware"].startswith("rover_car")
    assert report["checks"]["inference"]["latency_ms"] <= 500
    proc = runtime("check", "--bundle", str(bundle), "--serial-port", str(tmp_path / "missing"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert json.loads(out)["checks"]["serial"]["ok"] is False


def test_check_with_a_corrupt_bundle_does_not_touch_serial(
    sim: FirmwareSimulator, bundle: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(bundle, bad)
    (bad / "extra.bin").write_bytes(b"x")
    proc = runtime("check", "--bundle", str(bad), "--serial-port", str(tmp_path / "tty"))
    out, _ = proc.communicate(timeout=60)
    report = json.loads(out)
    assert proc.returncode == 1
    assert "extra.bin is not listed in the manifest" in report["checks"]["bundle"]["error"]
    assert report["checks"]["serial"]["error"] == "not tried: the bundle failed"
    assert sim.snapshot()["rx_ok"] == 0


@pytest.mark.slow  # imports torch in a subprocess
def test_benchmark_json(bundle: Path, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    proc = runtime(
        "benchmark", "--bundle", str(bundle), "--iterations", "30", "--warmup", "3", "--threads", "1",
        "--output", str(output),
    )  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report == json.loads(output.read_text())
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert len(latency["samples"]) == 30
    assert max(latency["samples"]) == pytest.approx(latency["max"], abs=1e-3)
    for key in ("throughput_fps", "achievable_control_rate_hz", "peak_rss_mb", "cpu_percent", "model_bytes"):
        assert report[key] > 0, key
    assert report["backend"] == "torch"
    assert report["versions"]["torch"]
    assert {
        "temperature_c_before",
        "temperature_c_after",
        "throttled_before",
        "hostname",
        "architecture",
    } <= set(report)
    proc = runtime("benchmark", "--bundle", str(tmp_path / "nothing"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "not a directory" in err


def test_systemd_notify_ready_and_watchdog_from_the_process(sim: FirmwareSimulator, tmp_path: Path) -> None:
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(20)
    proc = runtime(
        "run", "--policy-stub", "--camera", "synthetic", "--serial-port", str(tmp_path / "tty"),
        "--metrics-path", "",
        env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"},
    )  # fmt: skip
    try:
        messages = []
        while "WATCHDOG=1" not in messages:
            messages.append(sock.recv(4096).decode())
        assert any(m.startswith("READY=1") for m in messages)
        assert messages.index("WATCHDOG=1") > next(
            i for i, m in enumerate(messages) if m.startswith("READY=1")
        )
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
        sock.settimeout(1)
        rest = []
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
    finally:
        proc.kill()
        sock.close()
    assert proc.returncode == 0
