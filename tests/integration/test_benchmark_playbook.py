"""playbooks/benchmark.yml against two simulated cars: every car benchmarked with its service stopped and
restored, the JSON fetched into a run folder, and a fleet report built from the cars' own figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deploy_helpers import car, fleet_inventory, make_bundle, run_playbook

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

CARS = ("car1", "car2")


@pytest.fixture(scope="module")
def fleet_with_release(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    inventory = fleet_inventory(request)
    run = run_playbook(inventory, "provision.yml", timeout=1800)
    assert run.rc == 0, run.stdout[-4000:]
    bundle = make_bundle(tmp_path_factory.mktemp("bench") / "bundle", chunk_size=10)
    run = run_playbook(
        inventory, "deploy.yml", "-e", f"rover_deploy_bundle={bundle}", "-e", "rover_deploy_force=true"
    )
    assert run.rc == 0, run.stdout[-4000:]
    return inventory


def test_benchmark_playbook_builds_a_report_from_the_cars(fleet_with_release: Path, tmp_path: Path) -> None:
    inventory = fleet_with_release
    # car2's service is stopped before the run: it must stay stopped; car1's must be running again after.
    car(inventory, "car2").check_output("systemctl stop rover-runtime")
    run = run_playbook(
        inventory,
        "benchmark.yml",
        "-e",
        f"rover_benchmark_output_dir={tmp_path}",
        "-e",
        "rover_benchmark_iterations=40",
        "-e",
        "rover_benchmark_warmup=5",
    )
    assert run.rc == 0, run.stdout[-4000:]
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
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["hosts"]) == set(CARS)
    assert set(json.loads((run_dir / "limits.json").read_text())["hosts"]) == set(CARS)
    assert car(inventory, "car1").service("rover-runtime").is_running
    assert not car(inventory, "car2").service("rover-runtime").is_running
    car(inventory, "car2").check_output("systemctl start rover-runtime")
