"""The live fleet page against what a hostile car can send and a Prometheus that stops answering, with the
real parts: Debian's node_exporter serving a car's textfile, the Prometheus playbooks/monitor.yml starts,
`python -m fleet_report serve`, and headless Chromium reading the page."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rover_runtime.prometheus import exposition
from simfleet.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
HOSTILE = '<img src=x onerror="document.title=1">'


@dataclass
class Stack:
    prometheus: str
    page: str
    monitor_dir: Path


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def api_fleet(stack: Stack) -> dict[str, Any]:
    with urllib.request.urlopen(f"{stack.page}api/fleet", timeout=20) as response:
        return dict(json.loads(response.read()))


def dump_dom(url: str, tmp: Path) -> str:
    done = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=2000", "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One car whose runtime reports a release id and firmware version made of markup; Prometheus and the
    page as monitor.yml runs them (managed processes), scraping every second."""
    tmp = tmp_path_factory.mktemp("page")
    textfile = tmp / "textfile"
    textfile.mkdir()
    snapshot = {
        "time_unix": time.time() + 3600, "driving": True, "healthy": True,
        "release": {"id": HOSTILE}, "bundle": {"content_hash": "b" * 64, "backend": "onnxruntime"},
        "serial": {"firmware_version": HOSTILE}, "failsafe": {"active": True, "reasons": [f"{HOSTILE}: x"]},
    }  # fmt: skip
    (textfile / "rover_runtime.prom").write_text(exposition(snapshot))
    exporter_port = free_port()
    exporter = subprocess.Popen(
        ["/usr/bin/prometheus-node-exporter", "--collector.disable-defaults", "--collector.textfile",
         f"--collector.textfile.directory={textfile}", f"--web.listen-address=127.0.0.1:{exporter_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    inventory = tmp / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"rovers": {"hosts": {
        "car1": {"rover_monitor_target": f"127.0.0.1:{exporter_port}"}}}}}}))  # fmt: skip
    prometheus_port, page_port = free_port(), free_port()
    settings = {
        "rover_monitor_dir": str(tmp / "monitor"), "rover_monitor_port": prometheus_port,
        "rover_monitor_page_port": page_port, "rover_monitor_scrape_interval": "1s",
        "rover_monitor_evaluation_interval": "1s", "rover_monitor_page_refresh_s": 1,
    }  # fmt: skip
    command = [
        str(Path(sys.executable).with_name("ansible-playbook")),
        "-i",
        str(inventory),
        "playbooks/monitor.yml",
    ]
    env = {**os.environ, "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(tmp / "facts")}
    run = subprocess.run([*command, "-e", json.dumps(settings)], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=False, timeout=600)  # fmt: skip
    try:
        assert run.returncode == 0, run.stdout[-3000:]
        yield Stack(f"http://127.0.0.1:{prometheus_port}", f"http://127.0.0.1:{page_port}/", tmp / "monitor")
    finally:
        stop = {**settings, "rover_monitor_state": "stopped"}
        subprocess.run(
            [*command, "-e", json.dumps(stop)], cwd=ROOT, env=env, capture_output=True, check=False
        )
        exporter.terminate()
        exporter.wait(timeout=10)


def test_what_a_car_sends_is_shown_as_text_never_as_markup(stack: Stack, tmp_path: Path) -> None:
    wait_for(lambda: any(c["release"] == HOSTILE for c in api_fleet(stack)["cars"]), 30, "the car scraped")
    dom = dump_dom(stack.page, tmp_path)
    row = re.search(r'<tr data-car="car1" data-status="([^"]+)">(.*?)</tr>', dom, re.S)
    assert row, dom
    assert "&lt;img src=x onerror=" in row.group(2)  # the release id and firmware, as text
    assert "<img" not in dom
    assert "<title>Rover fleet</title>" in dom  # the onerror never ran


def test_a_prometheus_that_stops_answering_is_one_line_on_the_page(stack: Stack, tmp_path: Path) -> None:
    record = json.loads((stack.monitor_dir / "prometheus.pid").read_text())
    os.kill(int(record["pid"]), signal.SIGSTOP)  # frozen: connections hang until the page's timeout
    try:
        fleet = api_fleet(stack)
        assert fleet["cars"] == []
        assert fleet["error"].startswith(f"Prometheus at {stack.prometheus} does not answer"), fleet
        dom = dump_dom(stack.page, tmp_path)
        assert re.search(r'<div id="error" role="alert" style="display: block;">Prometheus at ', dom), dom
    finally:
        os.kill(int(record["pid"]), signal.SIGCONT)
    wait_for(lambda: api_fleet(stack)["error"] is None, 30, "Prometheus answers again")
