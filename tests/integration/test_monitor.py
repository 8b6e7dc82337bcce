"""Seeing the fleet (#30) on the session's simulated fleet: each car's node_exporter (role
rover_node_exporter, provisioned) scraped by the Prometheus that playbooks/monitor.yml runs as a managed
process, its alerts firing for real faults, and the live fleet page in a real headless Chromium.

Short intervals (scrape and rules every second, every alert's `for` 5 s) so that each fault's alert is seen
in seconds; the rules are the role's templates, as a user gets them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    FORCE,
    ONE_BATCH,
    car,
    content_hash,
    current_release,
    fleet_inventory,
    fleet_state,
    make_bundle,
    metrics,
    provision_and_deploy,
    run_playbook,
    wait_running,
)

from simfleet.fleet import power_off, power_on
from simfleet.state import FleetState
from simfleet.testing import free_port

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

CARS = ("car1", "car2", "car3")
FOR_S = 5
FAST = {
    "rover_monitor_scrape_interval": "1s",
    "rover_monitor_evaluation_interval": "1s",
    "rover_monitor_metrics_stale_s": 5,
    **{
        f"rover_monitor_{name}_for": f"{FOR_S}s"
        for name in ("car_down", "runtime_down", "failsafe", "release_drift", "hot", "recorder", "pull_stale")
    },
}
# From a fault to its alert: the next scrape (1 s), the rule's evaluation (1 s), its `for`, one more
# evaluation, and the machine's load (a 2-core CI machine with other tests' fleets beside).
ALERT_DEADLINE_S = FOR_S + 25
CHROMIUM = "/usr/bin/chromium"


class Monitor:
    def __init__(self, inventory: Path, prometheus: str, page: str) -> None:
        self.inventory = inventory
        self.prometheus = prometheus
        self.page = page

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return list(json.loads(response.read())["data"]["result"])

    def firing(self) -> set[tuple[str, str]]:
        with urllib.request.urlopen(f"{self.prometheus}/api/v1/alerts", timeout=10) as response:
            alerts = json.loads(response.read())["data"]["alerts"]
        return {
            (a["labels"]["alertname"], a["labels"].get("instance", ""))
            for a in alerts
            if a["state"] == "firing"
        }

    def wait_for_alert(self, name: str, instance: str, timeout: float = ALERT_DEADLINE_S) -> float:
        """Seconds until the alert fires."""
        started = time.monotonic()
        while (name, instance) not in self.firing():
            assert time.monotonic() - started < timeout, (name, instance, self.firing())
            time.sleep(0.5)
        return time.monotonic() - started

    def wait_resolved(self, name: str, instance: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (name, instance) in self.firing():
            assert time.monotonic() < deadline, (name, instance)
            time.sleep(0.5)

    def page_rows(self, budget_ms: int = 2500) -> tuple[dict[str, dict[str, str]], int]:
        """The page as headless Chromium renders it after `budget_ms` of (virtual) time: per car its status,
        faults and alerts, and how many times the page refreshed itself."""
        with_profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"rover-chromium-{os.getpid()}"
        done = subprocess.run(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={with_profile}", f"--virtual-time-budget={budget_ms}",
                "--dump-dom", self.page,
            ],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        refreshes = re.search(r'<body data-refreshes="(\d+)"', done.stdout)
        rows: dict[str, dict[str, str]] = {}
        for match in re.finditer(
            r'<tr data-car="([^"]+)" data-status="([^"]+)">(.*?)</tr>', done.stdout, re.S
        ):
            cells = re.findall(r"<td[^>]*>(.*?)</td>", match.group(3), re.S)
            rows[match.group(1)] = {
                "status": match.group(2),
                "faults": cells[5] if len(cells) > 5 else "",
                "alerts": " ".join(re.findall(r'data-alert="([^"]+)"', match.group(3))),
                "release": cells[2] if len(cells) > 2 else "",
            }
        return rows, int(refreshes.group(1)) if refreshes else 0

    def wait_page(self, name: str, status: str, timeout: float) -> float:
        started = time.monotonic()
        while True:
            rows, _ = self.page_rows(budget_ms=500)
            if rows.get(name, {}).get("status") == status:
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, (name, status, rows)
            time.sleep(0.5)


@pytest.fixture(scope="module")
def deployed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's fleet, every car driving: as the deploy tests before this module leave it (then nothing
    is deployed here), else after a deploy of a tiny bundle."""
    request.getfixturevalue("fleet_provisioned")
    inventory = fleet_inventory(request)
    if all(_driving(car(inventory, name)) for name in CARS):
        return inventory
    return provision_and_deploy(request, tmp_path_factory)


def _driving(host: Any) -> bool:
    try:
        status = metrics(host)
    except (AssertionError, ValueError, RuntimeError):
        return False
    return bool(status.get("driving")) and bool(status.get("healthy"))


@pytest.fixture(scope="module")
def monitor(deployed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitor]:
    prometheus_port, page_port = free_port(), free_port()
    settings = {**FAST, "rover_monitor_port": prometheus_port, "rover_monitor_page_port": page_port,
                "rover_monitor_page_refresh_s": 1}  # fmt: skip
    run = run_playbook(deployed, "monitor.yml", "-e", json.dumps(settings))
    assert run.rc == 0, run.report()
    assert f"Prometheus watches 3 cars at http://127.0.0.1:{prometheus_port}/" in run.text, run.report()
    assert f"fleet page: http://127.0.0.1:{page_port}/" in run.text, run.report()
    try:
        yield Monitor(deployed, f"http://127.0.0.1:{prometheus_port}", f"http://127.0.0.1:{page_port}/")
    finally:
        stop = run_playbook(
            deployed, "monitor.yml", "-e", json.dumps({**settings, "rover_monitor_state": "stopped"})
        )
        assert stop.rc == 0, stop.report()


def test_prometheus_scrapes_every_car_and_the_page_lists_them(deployed: Path, monitor: Monitor) -> None:
    deadline = time.monotonic() + 30
    while True:
        up = {r["metric"]["instance"]: r["value"][1] for r in monitor.query('up{job="rovers"}')}
        releases = {r["metric"]["instance"]: r["metric"] for r in monitor.query("rover_release_info")}
        if up == dict.fromkeys(CARS, "1") and set(releases) == set(CARS):
            break
        assert time.monotonic() < deadline, (up, releases)
        time.sleep(1)
    for name in CARS:
        assert releases[name]["release"] == current_release(car(deployed, name))
    rows, refreshes = monitor.page_rows(budget_ms=3500)
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(CARS, "driving"), rows
    assert refreshes >= 3, refreshes  # the page asked again by itself, every second


def test_a_stopped_runtime_fires_its_alert_and_shows_on_the_page(deployed: Path, monitor: Monitor) -> None:
    host = car(deployed, "car1")
    release = current_release(host)
    assert host.run("sudo systemctl stop rover-runtime").rc == 0
    try:
        monitor.wait_page("car1", "stopped", timeout=15)
        monitor.wait_for_alert("RoverRuntimeDown", "car1")
        rows, _ = monitor.page_rows()
        assert "RoverRuntimeDown" in rows["car1"]["alerts"], rows
    finally:
        assert host.run("sudo systemctl start rover-runtime").rc == 0
    wait_running(host, release)
    monitor.wait_resolved("RoverRuntimeDown", "car1")


def test_an_arduino_that_stops_answering_is_failsafe_with_its_reason(
    deployed: Path, monitor: Monitor
) -> None:
    firmware = next(h for h in fleet_state(deployed)["hosts"] if h["name"] == "car2")["firmware"]["pid"]
    os.kill(firmware, signal.SIGSTOP)
    try:
        monitor.wait_page("car2", "failsafe", timeout=20)
        monitor.wait_for_alert("RoverFailsafe", "car2")
        rows, _ = monitor.page_rows()
        assert "serial" in rows["car2"]["faults"], rows
        assert "RoverFailsafe" in rows["car2"]["alerts"], rows
    finally:
        os.kill(firmware, signal.SIGCONT)
    monitor.wait_resolved("RoverFailsafe", "car2")


def test_a_car_switched_off_is_down_and_on_the_old_release_after_a_deploy(
    request: pytest.FixtureRequest,
    deployed: Path,
    monitor: Monitor,
    sim_fleet: FleetState,
    tmp_path: Path,
) -> None:
    """car3 is switched off: the page shows it down within a scrape and a refresh, RoverCarDown fires. A
    deploy while it is off moves car1 and car2 to the new release (their release label changes) and makes
    it the fleet's intended one; car3 boots on its old release and RoverReleaseDrift names it until it is
    deployed too."""
    before = {name: current_release(car(deployed, name)) for name in CARS}
    power_off(sim_fleet.name, "car3", hard=False)
    try:
        seen_down = monitor.wait_page("car3", "down", timeout=30)
        assert seen_down < 15, seen_down
        monitor.wait_for_alert("RoverCarDown", "car3")
        bundle = make_bundle(tmp_path / "new", chunk_size=12)
        run = run_playbook(deployed, "deploy.yml", "-e", f"rover_deploy_bundle={bundle}", *FORCE, *ONE_BATCH)
        assert run.rc == 4, run.report()  # ansible-playbook's "some hosts were unreachable"
        assert "unreachable (1/3), not changed, run again for them: car3" in run.stdout, run.report()
    finally:
        power_on(sim_fleet.name, "car3")
    after = {name: current_release(car(deployed, name)) for name in ("car1", "car2")}
    deadline = time.monotonic() + 30
    while True:
        labels = {r["metric"]["instance"]: r["metric"] for r in monitor.query("rover_release_info")}
        if all(labels.get(name, {}).get("release") == after[name] for name in after):
            break
        assert time.monotonic() < deadline, (labels, after)
        time.sleep(1)
    for name, release in after.items():
        assert release != before[name]
        assert labels[name]["bundle"] == content_hash(bundle)
    assert monitor.query("rover:fleet_intended_release")[0]["metric"]["bundle"] == content_hash(bundle)
    monitor.wait_for_alert("RoverReleaseDrift", "car3", timeout=120)  # once it booted and answers
    rows, _ = monitor.page_rows()
    assert rows["car3"]["status"] == "driving", rows
    assert "RoverReleaseDrift" in rows["car3"]["alerts"], rows
    run = run_playbook(
        deployed, "deploy.yml", "-e", f"rover_deploy_bundle={bundle}", *FORCE, "--limit", "car3"
    )
    assert run.rc == 0, run.report()
    monitor.wait_resolved("RoverReleaseDrift", "car3")


def test_a_port_in_use_is_named_and_the_other_is_left_alone(deployed: Path, monitor: Monitor) -> None:
    taken = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        settings = {**FAST, "rover_monitor_port": taken, "rover_monitor_page": False}
        env_dir = deployed.parent / "monitor-second"
        run = subprocess.run(
            [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(deployed),
             "playbooks/monitor.yml", "-e", json.dumps({**settings, "rover_monitor_dir": str(env_dir)})],
            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, check=False, timeout=300,
            env={**os.environ, "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(deployed.parent / "ansible-facts")},
        )  # fmt: skip
    assert run.returncode != 0
    assert f"prometheus cannot start: 127.0.0.1:{taken} is in use by another program" in run.stdout, (
        run.stdout[-3000:]
    )
    assert monitor.query('up{job="rovers"}')  # the running monitor still watches


def test_inventory_without_the_monitor_host_is_named(request: pytest.FixtureRequest) -> None:
    run = run_playbook(fleet_inventory(request), "monitor.yml", "-e", "rover_monitor_host=watchtower")
    assert run.rc != 0, run.report()
    assert "the monitor host watchtower is not in the inventory" in run.text, run.report()


def test_a_monitor_host_named_in_the_inventory_runs_debians_prometheus_under_systemd(
    deployed: Path, tmp_path: Path
) -> None:
    """The inventory's `monitor` group names car1 (a host with systemd): monitor.yml installs Debian's
    prometheus there and runs it as Debian's prometheus.service with the role's drop-in, watching every car;
    `rover_monitor_state=stopped` stops it."""
    overlay = tmp_path / "monitor-host.yml"
    overlay.write_text(json.dumps({"all": {"children": {"monitor": {"hosts": {"car1": {}}}}}}))
    port = free_port()
    settings = {**FAST, "rover_monitor_port": port, "rover_monitor_page": False}
    host = car(deployed, "car1")
    try:
        run = run_playbook(
            overlay, "monitor.yml", "-i", str(deployed), "-e", json.dumps(settings), timeout=1200
        )
        assert run.rc == 0, run.report()
        assert f"Prometheus watches 3 cars at http://127.0.0.1:{port}/ (systemd;" in run.text, run.report()
        assert host.service("prometheus").is_running
        assert "/etc/prometheus/rover/prometheus.yml" in host.check_output(
            "systemctl show -p ExecStart prometheus"
        )
        watched = Monitor(deployed, f"http://127.0.0.1:{port}", "")
        deadline = time.monotonic() + 30
        while {r["metric"]["instance"] for r in watched.query('up{job="rovers"} == 1')} != set(CARS):
            assert time.monotonic() < deadline, watched.query('up{job="rovers"}')
            time.sleep(1)
        again = run_playbook(overlay, "monitor.yml", "-i", str(deployed), "-e", json.dumps(settings))
        assert again.rc == 0, again.report()
        assert again.recap()["car1"]["changed"] == 0, again.report()  # idempotent
    finally:
        stop = {**settings, "rover_monitor_state": "stopped"}
        run = run_playbook(overlay, "monitor.yml", "-i", str(deployed), "-e", json.dumps(stop))
        host.run("sudo systemctl disable prometheus")
    assert run.rc == 0, run.report()
    assert not host.service("prometheus").is_running
