"""playbooks/benchmark.yml against the simulated fleet: every car benchmarked with its service stopped and
restored, the JSON fetched into a run folder, and a fleet report built from the cars' own figures; a
driving car is skipped (and reported) unless forced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deploy_helpers import car, current_release, provision_and_deploy, run_playbook, wait_driving

from rover_runtime.firmware_sim import FIRMWARE_VERSION

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

# The cars the report's figures are checked on (the session's fleet may have more: every car is benchmarked).
CARS = ("car1", "car2")
# A simulated car drives all the time (its policy commands throttle): benchmarking it, which stops its
# runtime, needs force.
FORCE = ("-e", "rover_benchmark_force=true")


def fleet_cars(inventory: Path) -> set[str]:
    """Every car of the simulated fleet's inventory (group `rovers`)."""
    return set(yaml.safe_load(inventory.read_text())["all"]["children"]["rovers"]["hosts"])


@pytest.fixture(scope="module")
def fleet_with_release(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provision_and_deploy(request, tmp_path_factory)


def test_benchmark_playbook_builds_a_report_from_the_cars(fleet_with_release: Path, tmp_path: Path) -> None:
    inventory = fleet_with_release
    # car2's service is stopped before the run: it must stay stopped; car1's must be running again after.
    car(inventory, "car2").check_output("systemctl stop rover-runtime")
    run = run_playbook(
        inventory,
        "benchmark.yml",
        *FORCE,
        "-e",
        f"rover_benchmark_output_dir={tmp_path}",
        "-e",
        "rover_benchmark_iterations=40",
        "-e",
        "rover_benchmark_warmup=5",
    )
    assert run.rc == 0, run.report()
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    assert (run_dir / "latency.png").read_bytes()[:4] == b"\x89PNG"
    for name in CARS:
        data = json.loads((run_dir / f"{name}.json").read_text())
        host = car(inventory, name)
        # The figures are the car's: its hostname (not the controller's) and its own latency numbers.
        assert data["hostname"] == host.check_output("hostname").strip()
        assert data["iterations"] == 40
        assert data["hostname"] in report
        assert data["hostname"] in html
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {data['latency_ms']['mean']:.2f}" in row
        assert f"{data['latency_ms']['p95']:.2f}" in row
        assert f"{data['throughput_fps']:.1f}" in row
        # CPU and memory as the seed's table means them: the car driving at its control rate through its
        # own (synthetic) camera and serial line, the wire kept neutral; the report divides by the cores.
        assert data["cpu_measured_while"] == "driving"
        assert data["driving"]["live"] is False
        assert data["driving"]["failsafe"]["active"] is False, data["driving"]["failsafe"]
        assert data["driving"]["rate_hz_achieved"] > 20
        # The release and the firmware it drove with, in its row: the simulated Arduino's version.
        assert data["driving"]["release"] == current_release(host)
        assert data["driving"]["firmware_version"] == FIRMWARE_VERSION
        assert f"| {current_release(host)} | {FIRMWARE_VERSION} |" in row
        assert f"{data['cpu_percent'] / data['cpu_count']:.1f}" in row
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["hosts"]) == fleet_cars(inventory)
    assert set(json.loads((run_dir / "limits.json").read_text())["hosts"]) == fleet_cars(inventory)
    assert car(inventory, "car1").service("rover-runtime").is_running
    assert not car(inventory, "car2").service("rover-runtime").is_running
    car(inventory, "car2").check_output("systemctl start rover-runtime")


def test_benchmark_skips_a_driving_car_without_force(fleet_with_release: Path, tmp_path: Path) -> None:
    """Without force the driving car1 is skipped, named in the ROVER RECAP, and not failed; car2 (stopped,
    so not driving) is benchmarked, which gives the run a report (a few inferences keep it short)."""
    inventory = fleet_with_release
    driving, parked = car(inventory, "car1"), car(inventory, "car2")
    wait_driving(driving, timeout=60)
    parked.check_output("systemctl stop rover-runtime")
    try:
        run = run_playbook(
            inventory,
            "benchmark.yml",
            "-e",
            f"rover_benchmark_output_dir={tmp_path}",
            "-e",
            "rover_benchmark_iterations=5",
            "-e",
            "rover_benchmark_warmup=1",
        )
    finally:
        parked.check_output("systemctl start rover-runtime")
    assert run.rc == 0, run.report()
    recap = run.stdout.split("ROVER RECAP")[-1]
    line = re.search(r"^car1: (.*)$", recap, re.MULTILINE)
    assert line, run.report()
    assert line.group(1).startswith("SKIPPED: driving"), line.group(1)
    assert "rover_benchmark_force=true" in line.group(1)
    assert re.search(r"^car2: ok: benchmarked", recap, re.MULTILINE), recap
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "car1.json").exists()
    assert (run_dir / "car2.json").exists()
    assert json.loads((run_dir / "summary.json").read_text())["missing_hosts"] == []
    assert driving.service("rover-runtime").is_running
