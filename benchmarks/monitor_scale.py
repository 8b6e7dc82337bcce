"""Prometheus watching 2, 10 and 50 cars at the default 15 s interval; prints JSON.

    python benchmarks/monitor_scale.py [--cars 2,10,50] [--measure-s 180]

Each car is what Prometheus sees of one: Debian's node_exporter with the role's flags (rover_node_exporter's
collectors; no systemd collector, this machine runs no systemd) on its own port, its textfile directory
holding a rover_runtime.prom that a writer rewrites every second as the runtime does (the exposition of a
driving car's snapshot). Booting 50 containers would measure the containers, not the monitoring: the
exporters run on this machine's kernel, so the per-car exporter figures are the exporter's own cost, not a
Pi's. Prometheus is the one playbooks/monitor.yml starts (role rover_monitor, managed process, its rules).

Per size: Prometheus's CPU (% of one core) and resident memory over `--measure-s`, bytes per scrape per car
(uncompressed and gzip, as Prometheus asks for it) and samples per scrape, each exporter's CPU and memory;
then the time from a fault (car 1's runtime stops: its file says rover_runtime_up 0) to RoverRuntimeDown
firing, with the default rules (scrape and evaluation every 15 s, `for: 30s`). Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantization.compare import host_info  # noqa: E402
from rover_runtime.metrics import write_bytes_atomic  # noqa: E402
from rover_runtime.prometheus import exposition  # noqa: E402
from simfleet.testing import free_port  # noqa: E402

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
TICK = os.sysconf("SC_CLK_TCK")


def snapshot(running: bool = True) -> dict[str, Any]:
    """A driving car's status, as the runtime's metrics writer has it."""
    return {
        "time_unix": time.time(), "uptime_s": 600.0, "ready": True, "healthy": True, "driving": running,
        "release": {"id": "d3e47e8b8d665326"},
        "bundle": {"content_hash": "47a0336ed272c2bf675723e410f8268ebd4d2d2b5109fce6cf20de807a7987d1",
                   "backend": "onnxruntime", "mode": "static_int8"},
        "serial": {"firmware_version": "2.0.0", "firmware": "rover_car 2.0.0 (protocol 2; receiver)",
                   "connected": True},
        "rc": {"mode": "autopilot"},
        "failsafe": {"active": False, "since_unix": None, "count": 2, "reasons": []},
        "loop": {"rate_hz_achieved": 30.0, "rate_hz_target": 30.0, "cycles": 18000, "deadline_misses": 3,
                 "period_error_ms": {"p99": 1.8}},
        "inference": {"latency_ms": {"p95": 21.0}},
        "cameras": {"front": {"frame_age_s": 0.03, "fps": 30.0, "connected": True}},
        "thermal": {"temperature_c": 55.0, "throttled": "0x0"},
        "recorder": {"recording": True, "stopped_reason": None, "episodes_on_disk": 4, "bytes_finished": 9e8,
                     "steps_dropped": 0},
    }  # fmt: skip


class Writers:
    """Rewrites every car's rover_runtime.prom every second; `stop(car)` is that runtime's clean stop."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        self.stopped: set[int] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def write(self) -> None:
        for i, directory in enumerate(self.dirs):
            if i in self.stopped:
                continue
            write_bytes_atomic(directory / "rover_runtime.prom", exposition(snapshot()).encode())

    def stop_car(self, i: int) -> None:
        self.stopped.add(i)
        write_bytes_atomic(
            self.dirs[i] / "rover_runtime.prom", exposition(snapshot(False), running=False).encode()
        )

    def _run(self) -> None:
        while not self._done.wait(1.0):
            self.write()

    def start(self) -> None:
        self.write()
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def get(url: str, gzip_ok: bool = False) -> bytes:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzip_ok else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


def api(prometheus: str, path: str) -> Any:
    return json.loads(get(f"{prometheus}{path}"))["data"]


def exporter_flags() -> list[str]:
    defaults = yaml.safe_load((REPO / "roles/rover_node_exporter/defaults/main.yml").read_text())
    return [f"--no-collector.{name}" for name in defaults["rover_node_exporter_disabled_collectors"]]


def measure(cars: int, measure_s: float, work: Path) -> dict[str, Any]:
    dirs, ports, procs = [], [], []
    for i in range(cars):
        directory = work / f"car{i + 1}"
        directory.mkdir()
        dirs.append(directory)
        ports.append(free_port())
    writers = Writers(dirs)
    writers.start()
    for directory, port in zip(dirs, ports, strict=True):
        procs.append(subprocess.Popen(
            [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}",
             f"--collector.textfile.directory={directory}", *exporter_flags(), "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
    inventory = work / "hosts.yml"
    hosts = {f"car{i + 1}": {"rover_monitor_target": f"127.0.0.1:{port}"} for i, port in enumerate(ports)}
    inventory.write_text(yaml.safe_dump({"all": {"children": {"rovers": {"hosts": hosts}}}}))
    prometheus_port = free_port()
    settings = {"rover_monitor_dir": str(work / "monitor"), "rover_monitor_port": prometheus_port,
                "rover_monitor_page": False}  # fmt: skip
    playbook = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory),
                "playbooks/monitor.yml", "-e", json.dumps(settings)]  # fmt: skip
    env = {**os.environ, "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(work / "facts")}
    try:
        run = subprocess.run(playbook, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise SystemExit(f"monitor.yml failed:\n{run.stdout[-3000:]}")
        prometheus = f"http://127.0.0.1:{prometheus_port}"
        pid = int(json.loads((work / "monitor" / "prometheus.pid").read_text())["pid"])
        time.sleep(20)  # every target scraped at least once, the head block started
        start_cpu = cpu_seconds(pid)
        start_exporters = [cpu_seconds(p.pid) for p in procs]
        started = time.monotonic()
        time.sleep(measure_s)
        wall = time.monotonic() - started
        prometheus_cpu = 100 * (cpu_seconds(pid) - start_cpu) / wall
        exporter_cpu = [
            100 * (cpu_seconds(p.pid) - c) / wall for p, c in zip(procs, start_exporters, strict=True)
        ]
        body = get(f"http://127.0.0.1:{ports[0]}/metrics")
        zipped = get(f"http://127.0.0.1:{ports[0]}/metrics", gzip_ok=True)
        samples = api(prometheus, "/api/v1/query?query=scrape_samples_scraped%7Bjob%3D%22rovers%22%7D")[
            "result"
        ]
        up = api(prometheus, "/api/v1/query?query=up%7Bjob%3D%22rovers%22%7D")["result"]
        # The fault: car 1's runtime stops cleanly.
        writers.stop_car(0)
        fault = time.monotonic()
        while True:
            alerts = api(prometheus, "/api/v1/alerts")["alerts"]
            firing = {(a["labels"].get("alertname"), a["labels"].get("instance")) for a in alerts
                      if a["state"] == "firing"}  # fmt: skip
            if ("RoverRuntimeDown", "car1") in firing:
                break
            if time.monotonic() - fault > 300:
                raise SystemExit("RoverRuntimeDown did not fire within 300 s")
            time.sleep(0.5)
        alert_s = time.monotonic() - fault
        return {
            "cars": cars,
            "targets_up": sum(r["value"][1] == "1" for r in up),
            "measured_s": round(wall, 1),
            "prometheus_cpu_percent_of_one_core": round(prometheus_cpu, 2),
            "prometheus_rss_mb": round(rss_mb(pid), 1),
            "bytes_per_scrape_per_car": len(body),
            "gzip_bytes_per_scrape_per_car": len(zipped) if zipped[:2] == b"\x1f\x8b" else None,
            "samples_per_scrape_per_car": int(float(samples[0]["value"][1])) if samples else None,
            "exporter_cpu_percent_mean": round(sum(exporter_cpu) / len(exporter_cpu), 3),
            "exporter_rss_mb_mean": round(sum(rss_mb(p.pid) for p in procs) / len(procs), 1),
            "fault_to_alert_s": round(alert_s, 1),
        }
    finally:
        subprocess.run([*playbook[:-1], json.dumps({**settings, "rover_monitor_state": "stopped"})],
                       cwd=REPO, env=env, capture_output=True, check=False)  # fmt: skip
        writers.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cars", default="2,10,50", help="fleet sizes, comma-separated")
    parser.add_argument("--measure-s", type=float, default=180.0, help="seconds of steady scraping measured")
    args = parser.parse_args()
    load_before = os.getloadavg()
    sizes = []
    for cars in (int(c) for c in args.cars.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"monitor-scale-{cars}-") as tmp:
            sizes.append(measure(cars, args.measure_s, Path(tmp)))
            print(json.dumps(sizes[-1]), file=sys.stderr, flush=True)
    print(json.dumps({
        "host": {**host_info(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "settings": {"scrape_interval": "15s", "evaluation_interval": "15s", "runtime_down_for": "30s",
                     "textfile_rewritten_every_s": 1.0},
        "sizes": sizes,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
