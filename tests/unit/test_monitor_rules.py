"""The monitor's Prometheus files as role rover_monitor writes them (ansible-playbook, its defaults, each file
checked by promtool before it is written), and every alert unit-tested with `promtool test rules`
(tests/prometheus/rover_alerts_test.yml: a case where it fires and one where it must not)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rover_runtime.thermal import THROTTLE_NOW_FLAGS

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = "/usr/bin/promtool"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "rover_alerts_test.yml"

RENDER = """\
- name: Write the monitor's files
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Render them
      ansible.builtin.include_role:
        name: rover_monitor
        tasks_from: files
"""


def render(tmp_path: Path, inventory: dict[str, object], *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "render.yml").write_text(RENDER)
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(tmp_path / "hosts.yml"),
            str(tmp_path / "render.yml"), "-e", f"rover_monitor_dir={tmp_path / 'monitor'}",
            "-e", "rover_monitor_manager=process", *extra,
        ],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip


CARS = {
    "car1": {"ansible_host": "127.0.0.1", "rover_node_exporter_port": 12600},
    "car2": {"ansible_host": "10.0.0.2"},
    "car3": {"rover_monitor_target": "127.0.0.1:19100"},
    "car4": {"ansible_host": "fd00::4"},
}


@pytest.fixture(scope="module")
def monitor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("monitor")
    run = render(tmp, {"all": {"children": {"rovers": {"hosts": CARS}}}})
    assert run.returncode == 0, run.stdout[-3000:]
    return tmp / "monitor"


def test_every_car_of_the_inventory_is_a_target_named_for_the_car(monitor_dir: Path) -> None:
    targets = json.loads((monitor_dir / "targets" / "rovers.json").read_text())
    assert targets == [
        {"labels": {"car": "car1"}, "targets": ["127.0.0.1:12600"]},
        {"labels": {"car": "car2"}, "targets": ["10.0.0.2:9100"]},
        {"labels": {"car": "car3"}, "targets": ["127.0.0.1:19100"]},
        {"labels": {"car": "car4"}, "targets": ["[fd00::4]:9100"]},
    ]
    check = subprocess.run(
        [PROMTOOL, "check", "config", str(monitor_dir / "prometheus.yml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say(monitor_dir: Path, tmp_path: Path) -> None:
    rules = monitor_dir / "rules"
    alerts = yaml.safe_load((rules / "rover_alerts.yml").read_text())["groups"][0]["rules"]
    spec = yaml.safe_load(ALERT_TESTS.read_text())
    tested = {case["alertname"] for test in spec["tests"] for case in test["alert_rule_test"]}
    assert {rule["alert"] for rule in alerts} == tested  # a new alert comes with its tests
    fires = {
        case["alertname"] for test in spec["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]
    }
    assert fires == tested  # each is seen firing, not only silent
    test_file = tmp_path / "rover_alerts_test.yml"
    test_file.write_text(ALERT_TESTS.read_text().replace("RULES/", f"{rules}/"))
    run = subprocess.run(
        [PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("-e", "rover_monitor_port=70000"), "a port 1-65535 (rover_monitor_port=70000)"),
        (("-e", "rover_monitor_disk_free_ratio=1.5"), "a free-disk ratio between 0 and 1"),
        (("-e", "rover_monitor_hot_for=soon"), "durations such as 30s or 5m (not: soon)"),
        (
            ("-e", "rover_monitor_scrape_interval=2s", "-e", "rover_monitor_scrape_timeout=5s"),
            "scrape timeout",
        ),
        (("-e", "rover_monitor_manager=docker"), "rover_monitor_manager"),
    ],
)
def test_bad_settings_are_refused_in_one_line_and_nothing_is_written(
    tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    run = render(tmp_path, {"all": {"children": {"rovers": {"hosts": CARS}}}}, *extra)
    assert run.returncode != 0
    assert message in run.stdout, run.stdout[-3000:]
    assert not (tmp_path / "monitor" / "prometheus.yml").exists()


def test_an_inventory_without_cars_is_refused(tmp_path: Path) -> None:
    run = render(tmp_path, {"all": {"children": {"monitor": {"hosts": {"localhost": {}}}}}})
    assert run.returncode != 0
    assert "at least one car in the inventory group rovers (0 cars)" in run.stdout, run.stdout[-3000:]


def test_a_car_with_a_port_that_is_not_one_is_named(tmp_path: Path) -> None:
    cars = {**CARS, "car4": {"ansible_host": "10.0.0.4", "rover_node_exporter_port": 99999}}
    run = render(tmp_path, {"all": {"children": {"rovers": {"hosts": cars}}}})
    assert run.returncode != 0
    assert "car4: rover_node_exporter_port 99999 is not a port (1-65535)" in run.stdout, run.stdout[-3000:]


def test_an_ipv6_listen_address_is_bracketed_where_prometheus_scrapes_itself(tmp_path: Path) -> None:
    run = render(tmp_path, {"all": {"children": {"rovers": {"hosts": CARS}}}},
                 "-e", "rover_monitor_listen_address=::1", "-e", "rover_monitor_port=19090")  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    config = yaml.safe_load((tmp_path / "monitor" / "prometheus.yml").read_text())
    scraped = [target for job in config["scrape_configs"] for group in job.get("static_configs", [])
               for target in group["targets"]]  # fmt: skip
    assert "[::1]:19090" in scraped, scraped


def test_the_throttled_alert_names_exactly_the_flags_that_mean_now(monitor_dir: Path) -> None:
    """RoverThrottled fires on the get_throttled flags for the present (bits 0-3), not on the "has occurred"
    ones; its expression names them, so a flag renamed in rover_runtime.thermal must be renamed there too."""
    groups = yaml.safe_load((monitor_dir / "rules" / "rover_alerts.yml").read_text())["groups"]
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "RoverThrottled")
    match = re.search(r'flag=~"([^"]+)"', rule["expr"])
    assert match, rule["expr"]
    assert set(match.group(1).split("|")) == set(THROTTLE_NOW_FLAGS.values())
