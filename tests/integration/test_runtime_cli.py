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

from rover_runtime.firmware_sim import FirmwareLimits, FirmwareSimulator, SimulatedSensors
from rover_runtime.testing import ensure_tiny_bundle, write_tiny_bundle

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

    def wire() -> tuple[int, int, bool]:
        snap = sim.snapshot()
        return snap["steer_us"], snap["throttle_us"], snap["failsafe"]

    # The runtime's last bytes reach the simulator's thread through the pty a moment after it exits.
    wait_for(lambda: wire() == (NEUTRAL, NEUTRAL, False), timeout=5.0)
    assert wire() == (NEUTRAL, NEUTRAL, False)
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
    # The seed's command line, with a bundle where the seed had a .pth.
    proc = runtime(
        "run", "--checkpoint", str(bundle), "--camera_id", "synthetic",
        "--arduino_port", str(tmp_path / "tty"), "--control_freq", "30",
        "--metrics-path", "", "--threads", "1", "--max-cycles", "60",
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "policy loaded: torch fp32" in out
    assert wait_for(lambda: sim.snapshot()["rx_ok"] >= 60, timeout=5.0), sim.snapshot()
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


@pytest.mark.slow  # imports torch in a subprocess
def test_check_reports_each_cameras_real_frame_rate_and_age(
    sim: FirmwareSimulator, two_camera_bundle: Path, tmp_path: Path
) -> None:
    config = tmp_path / "runtime.toml"
    config.write_text('[camera]\nsource = "synthetic"\nfps = 20.0\n')
    proc = runtime(
        "check", "--config", str(config), "--bundle", str(two_camera_bundle), "--serial-port",
        str(tmp_path / "tty"), "--max-temp-c", "200", "--cameras",
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    report = json.loads(out)
    assert proc.returncode == 0, err
    assert report["checks"]["inputs"]["cameras"] == {
        "front": {"key": "observation.images.front", "device": None},
        "rear": {"key": "observation.images.rear", "device": None},
    }
    for name in ("front", "rear"):
        camera = report["checks"]["cameras"][name]
        assert camera["ok"] is True
        assert 15 <= camera["fps"] <= 25
        assert camera["frame_age_s"] <= 0.2
        assert camera["timestamps"] == "driver"  # the synthetic source knows its capture time
    assert "wheel_speed" in report["checks"]["serial"]["firmware"]


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
        "benchmark", "--checkpoint", str(bundle), "--iterations", "30", "--warmup", "3", "--threads", "1",
        "--output", str(output), "--drive-s", "0",
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
    assert report["driving"] is None
    assert report["cpu_measured_while"] == "inference flat out"
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


@pytest.fixture(scope="module")
def two_camera_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle from a car with a front and a rear camera whose state adds wheel speed."""
    pytest.importorskip("onnxruntime")
    return write_tiny_bundle(
        tmp_path_factory.mktemp("b2") / "bundle",
        "onnx",
        cameras=("front", "rear"),
        state_names=("steer", "throttle", "speed_mps"),
    )


@pytest.mark.slow  # imports torch in a subprocess
def test_a_two_camera_wheel_speed_bundle_drives_end_to_end(
    sim: FirmwareSimulator, two_camera_bundle: Path, tmp_path: Path
) -> None:
    """Both cameras feed the policy, the state is assembled from the car's output and the firmware's wheel
    speed (the simulated car's speed follows its throttle), and the car drives."""
    metrics = tmp_path / "metrics.json"
    proc = runtime(
        "run", "--bundle", str(two_camera_bundle), "--camera", "synthetic",
        "--serial-port", str(tmp_path / "tty"), "--metrics-path", str(metrics), "--threads", "1",
    )  # fmt: skip
    try:

        def moving() -> bool:
            if not metrics.exists():
                return False
            snap = json.loads(metrics.read_text())
            values = snap["state"]["values"]
            return bool(snap["driving"] and values and values[2] > 0)

        assert wait_for(moving), proc.stderr
        snap = json.loads(metrics.read_text())
        assert set(snap["cameras"]) == {"front", "rear"}
        assert all(camera["frames"] > 0 for camera in snap["cameras"].values())
        assert snap["state"]["names"] == ["steer", "throttle", "speed_mps"]
        assert snap["state"]["sources"] == ["steering", "throttle", "wheel_speed_mps"]
        # SimulatedSensors: 6 mm/s per us of throttle; serial.throttle_limits 0.5 = 250 us: at most 1.5 m/s.
        assert 0 < snap["state"]["values"][2] <= 1.5
        assert snap["bundle"]["image_keys"] == ["observation.images.front", "observation.images.rear"]
        assert snap["inference"]["completed"] > 0
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0


@pytest.mark.slow  # imports torch in a subprocess
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["--camera", "/dev/video-rover-front"],
            "camera 'rear' (observation.images.rear) has no device: add rear = \"...\" to the config's "
            "[cameras] table",
            id="unmapped-camera",
        ),
        pytest.param(
            ["--camera", "synthetic", "--config", "STATE_CONFIG"],
            "state 'speed_mps'",  # mapped to a source that does not exist
            id="unknown-state-source",
        ),
    ],
)
def test_inputs_the_car_cannot_supply_are_refused_by_name(
    sim: FirmwareSimulator, two_camera_bundle: Path, tmp_path: Path, args: list[str], expected: str
) -> None:
    config = tmp_path / "runtime.toml"
    config.write_text('[state]\nspeed_mps = "odometer"\n')
    args = [str(config) if a == "STATE_CONFIG" else a for a in args]
    proc = runtime("run", "--bundle", str(two_camera_bundle), "--serial-port", str(tmp_path / "tty"), *args)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "refusing the bundle, the car stays untouched" in err
    assert expected.replace("state 'speed_mps'", "[state] speed_mps = 'odometer': no such source") in err
    assert sim.snapshot()["rx_ok"] == 0  # not a byte arrived


@pytest.mark.slow  # imports torch in a subprocess
def test_a_firmware_without_the_wheel_sensor_the_state_needs_is_refused(
    two_camera_bundle: Path, tmp_path: Path
) -> None:
    no_wheel = SimulatedSensors(wheel_mmps_per_us=0.0)
    with FirmwareSimulator(pty_link=tmp_path / "tty", sensors=no_wheel) as simulator:
        proc = runtime(
            "run", "--bundle", str(two_camera_bundle), "--camera", "synthetic",
            "--serial-port", str(tmp_path / "tty"),
        )  # fmt: skip
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2
        assert (
            "the car cannot supply the bundle's inputs: state 'speed_mps' needs a wheel speed sensor, but "
            "the firmware (rover_car 2.0.0 (protocol 2; battery)) has none fitted; not driving"
        ) in err
        assert simulator.snapshot()["throttle_us"] == NEUTRAL


def test_a_firmware_speaking_another_protocol_is_refused_at_start(tmp_path: Path) -> None:
    with FirmwareSimulator(pty_link=tmp_path / "tty", limits=FirmwareLimits(protocol_version=1)) as simulator:
        proc = runtime(
            "run", "--policy-stub", "--camera", "synthetic", "--serial-port", str(tmp_path / "tty")
        )
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2
        assert "speaks protocol 1, this runtime 2: flash firmware/rover_car from this release" in err
        assert simulator.snapshot()["throttle_us"] == NEUTRAL


@pytest.mark.slow  # imports torch in a subprocess
def test_benchmark_measures_the_car_driving_at_its_control_rate(
    sim: FirmwareSimulator, bundle: Path, tmp_path: Path
) -> None:
    """CPU (as a share of all cores) and memory while the whole vehicle runs through the config's camera and
    serial line; the wire stays neutral (not --live)."""
    config = tmp_path / "runtime.toml"
    config.write_text(
        f'[camera]\nsource = "synthetic"\n[serial]\nport = "{tmp_path / "tty"}"\n[metrics]\npath = ""\n'
    )
    proc = runtime(
        "benchmark", "--checkpoint", str(bundle), "--iterations", "20", "--warmup", "2", "--threads", "1",
        "--config", str(config), "--drive-s", "2",
    )  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads(out)
    driving = report["driving"]
    assert driving["live"] is False
    assert driving["rate_hz_achieved"] == pytest.approx(30.0, rel=0.1)
    cores = os.cpu_count() or 1
    assert driving["cpu_percent_of_all_cores"] == pytest.approx(
        driving["cpu_percent_of_one_core"] / cores, abs=0.2
    )
    assert 0 < driving["cpu_percent_of_all_cores"] <= 100
    assert driving["rss_mb"] > 0
    assert driving["failsafe"]["active"] is False
    assert driving["inference"]["completed"] > 0
    assert report["cpu_measured_while"] == "driving"
    assert report["cpu_percent"] == driving["cpu_percent_of_one_core"]
    assert report["peak_rss_mb"] == driving["peak_rss_mb"]
    moved = [json.loads(line) for line in (tmp_path / "fw.jsonl").read_text().splitlines()]
    assert all(e["throttle_us"] == NEUTRAL for e in moved)  # the car stayed still


def test_benchmark_will_not_drive_beside_a_running_runtime(sim: FirmwareSimulator, tmp_path: Path) -> None:
    """Two processes on one serial line would fight over the car: the driving measurement refuses to start
    while the car's runtime is running, and says how to proceed."""
    metrics = tmp_path / "metrics.json"
    config = tmp_path / "runtime.toml"
    config.write_text(
        f'[camera]\nsource = "synthetic"\n[serial]\nport = "{tmp_path / "tty"}"\n'
        f'[metrics]\npath = "{metrics}"\n[policy]\nstub = true\n'
    )
    service = runtime("run", "--config", str(config))
    try:
        assert wait_for(metrics.exists)
        bench = runtime("benchmark", "--policy-stub", "--iterations", "5", "--config", str(config))
        _, err = bench.communicate(timeout=60)
        assert bench.returncode == 2
        assert f"the car's runtime is running (pid {service.pid}, metrics {metrics}): stop it first" in err
        assert "or pass --drive-s 0 to time inference only" in err
    finally:
        service.send_signal(signal.SIGTERM)
        service.communicate(timeout=10)


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
