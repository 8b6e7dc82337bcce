"""VM cars (`simfleet up --kind vm`): boot, memory, `up`, the runtime's loop, a pulled and replugged Arduino
and a power cut, measured on this machine; prints JSON.

    python benchmarks/vm_car.py [--bundle DIR] [--base-port 2451] [--out FILE]

  image_build_s          building the VM image (0 when it was cached)
  up_2_cars_s            `up` of 2 VM cars from the cached image, until both answer ssh
  boot_to_ssh_s          per car, from QEMU's start until sshd answered
  qemu_rss_mb            per car, QEMU's resident memory: idle after boot, and car1 driving
  provision_s, deploy_s  provision.yml and deploy.yml of --bundle (default: a tiny ONNX bundle) on car1
  loop                   car1's runtime over 30 s of driving: its loop's achieved rate (cycles / s), the
                         target, inference latency p50/p95 (the runtime's own metrics)
  unplug                 the Arduino pulled through QMP: from the guest kernel's "USB disconnect" to the
                         start of the runtime's cycle that went neutral (failsafe.since_unix), in ms and
                         in control periods
  replug                 the Arduino plugged back: from the kernel's "attached to ttyUSB" to the runtime's
                         "failsafe cleared" (driving again), in ms
  power_cut              a deploy's new release cut 3 s into its soak (poweroff --hard); after poweron:
                         the release the runtime drives, and whether it is the last good one
The guest's times come from its own journal (one clock). Run it on a quiet machine (no test suite or fleet
beside it): under TCG every guest instruction is translated on the controller's cores. The JSON records
the CPU, its flags, the accelerator and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from deploy_helpers import make_bundle, playbook_command, playbook_env, run_playbook  # noqa: E402

from quantization.compare import host_info  # noqa: E402
from simfleet.fleet import FleetConfig, down, plug, power_off, power_on, target_for, unplug, up  # noqa: E402
from simfleet.ssh import ssh_run  # noqa: E402
from simfleet.state import FleetState, load_state  # noqa: E402

FLEET = "bench-vm"
FORCE = ("-e", "rover_deploy_force=true")


def _guest(state: FleetState, command: str, timeout: float = 120) -> str:
    fresh = load_state(state.name)
    assert fresh is not None
    result = ssh_run(target_for(fresh, fresh.host("car1")), [command], timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{command}: exit {result.returncode}: {result.stderr.strip()[:500]}")
    return result.stdout


def _metrics(state: FleetState) -> dict[str, Any]:
    try:
        return dict(json.loads(_guest(state, "cat /run/rover/metrics.json")))
    except (RuntimeError, ValueError):
        return {}


def _wait(what: str, check: Any, timeout: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - started


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _journal_since(state: FleetState, since_epoch: float) -> list[dict[str, Any]]:
    """The guest's journal (kernel and units) since `since_epoch`, as journalctl's JSON records."""
    out = _guest(state, f"sudo -n journalctl -o json --no-pager --since=@{int(since_epoch) - 2}")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _kernel_time_us(record: dict[str, Any]) -> int:
    """When the kernel printed a record, as Unix time in µs: journald stamps a record when it reads it,
    which under TCG can be tens of ms later; a kernel record carries its own (monotonic) time too."""
    received = int(record["__REALTIME_TIMESTAMP"])
    source = record.get("_SOURCE_MONOTONIC_TIMESTAMP")
    return received if source is None else received - (int(record["__MONOTONIC_TIMESTAMP"]) - int(source))


def _first(records: list[dict[str, Any]], text: str, after_us: int = 0) -> int | None:
    for record in records:
        stamp = _kernel_time_us(record)
        if stamp >= after_us and text in str(record.get("MESSAGE", "")):
            return stamp
    return None


def _guest_now(state: FleetState) -> float:
    return float(_guest(state, "date +%s.%N").strip())


def _unplug_replug(state: FleetState, period_ms: float) -> dict[str, Any]:
    """The kernel's own times for the device leaving and coming back; the runtime's own for its failsafe
    beginning (metrics: failsafe.since_unix, the cycle that went neutral) and "failsafe cleared" (the
    journal's time of the line: good to a few tens of ms, against a limit of 3 s)."""
    start = _guest_now(state)
    unplug(FLEET, "car1", "arduino")
    _wait(
        "the runtime's serial fault", lambda: not _metrics(state).get("serial", {}).get("connected", True), 60
    )
    neutral_unix = _metrics(state).get("failsafe", {}).get("since_unix")
    time.sleep(2)
    plug(FLEET, "car1", "arduino")
    _wait("driving again", lambda: bool(_metrics(state).get("driving")), 120)
    records = _journal_since(state, start)
    start_us = int(start * 1e6)
    gone = _first(records, "USB disconnect", start_us)
    back = _first(records, "now attached to ttyUSB", gone or start_us)
    cleared = _first(records, "failsafe cleared", back or start_us)
    unplug_ms = None
    if gone is not None and neutral_unix is not None:
        unplug_ms = round(neutral_unix * 1000 - gone / 1000, 1)
    return {
        "unplug": {
            "ms": unplug_ms,
            "control_periods": round(unplug_ms / period_ms, 2) if unplug_ms is not None else None,
            "note": "negative: the car was already neutral for another fault when the device left"
            if unplug_ms is not None and unplug_ms < 0
            else None,
        },
        "replug": {"ms": round((cleared - back) / 1000, 1) if back and cleared else None},
    }


def _power_cut(state: FleetState, inventory: Path, good: str, tmp: Path) -> dict[str, Any]:
    fresh = make_bundle(tmp / "fresh", chunk_size=16)
    command = playbook_command(
        inventory,
        "deploy.yml",
        "--limit",
        "car1",
        *FORCE,
        "-e",
        f"rover_deploy_bundle={fresh}",
        "-e",
        "rover_health_soak_s=300",
    )
    deploy = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=playbook_env(inventory), cwd=REPO
    )
    try:

        def soaking() -> bool:
            running = (_metrics(state).get("release") or {}).get("id")
            return running not in (None, good)

        _wait("the new release's soak", soaking, 900)
        trial = (_metrics(state).get("release") or {}).get("id")
        time.sleep(3)
        power_off(FLEET, "car1", hard=True)
        deploy.wait(timeout=300)
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
    host = power_on(FLEET, "car1")
    _wait("driving after the power cut", lambda: bool(_metrics(state).get("driving")), 300)
    drives = (_metrics(state).get("release") or {}).get("id")
    return {
        "boot_to_ssh_s": host.boot_seconds,
        "cut_release": trial,
        "drives_release": drives,
        "drives_last_good": drives == good,
        "ungated_release_drove": drives == trial,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, help="the bundle to deploy (default: a tiny ONNX bundle)")
    parser.add_argument("--base-port", type=int, default=2451)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report: dict[str, Any] = {"host": host_info(), "load_average_at_start": os.getloadavg()}
    down(FLEET)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vm-"))
    inventory = tmp / "hosts.yml"
    started = time.monotonic()
    state = up(FleetConfig(name=FLEET, hosts=2, kind="vm", base_port=args.base_port, inventory=inventory))
    try:
        report["image_build_s"] = state.image_build_seconds
        report["up_2_cars_s"] = round(time.monotonic() - started - state.image_build_seconds, 1)
        report["accelerator"] = sorted({h.accelerator for h in state.hosts})
        report["boot_to_ssh_s"] = {h.name: h.boot_seconds for h in state.hosts}
        time.sleep(20)  # settled
        report["qemu_rss_mb"] = {"idle": {h.name: _rss_mb(h.qemu.pid) for h in state.hosts if h.qemu}}
        started = time.monotonic()
        run = run_playbook(inventory, "provision.yml", "--limit", "car1", timeout=3600)
        report["provision_s"] = round(time.monotonic() - started, 1)
        if run.rc != 0:
            raise RuntimeError(f"provision failed:\n{run.report()}")
        bundle = args.bundle or make_bundle(tmp / "bundle", chunk_size=10)
        report["bundle"] = str(bundle)
        started = time.monotonic()
        run = run_playbook(
            inventory, "deploy.yml", "--limit", "car1", *FORCE, "-e", f"rover_deploy_bundle={bundle}"
        )
        report["deploy_s"] = round(time.monotonic() - started, 1)
        if run.rc != 0:
            raise RuntimeError(f"deploy failed:\n{run.report()}")
        first = _metrics(state)
        time.sleep(30)
        last = _metrics(state)
        seconds = last["time_unix"] - first["time_unix"]
        report["loop"] = {
            "rate_hz_achieved": round((last["loop"]["cycles"] - first["loop"]["cycles"]) / seconds, 2),
            "rate_hz_target": last["loop"]["rate_hz_target"],
            "inference_latency_ms": last["inference"]["latency_ms"],
            "camera_fps": last["cameras"]["front"]["fps"] if "front" in last["cameras"] else None,
            "work_ms": last["loop"]["work_ms"],  # one cycle, wake to end: when its output was written
        }
        car1 = load_state(FLEET)
        assert car1 is not None
        report["qemu_rss_mb"]["driving_car1"] = _rss_mb(car1.host("car1").qemu.pid)  # type: ignore[union-attr]
        good = last["release"]["id"]
        report.update(_unplug_replug(state, 1000.0 / float(last["loop"]["rate_hz_target"])))
        report["power_cut"] = _power_cut(state, inventory, good, tmp)
    finally:
        report["load_average_at_end"] = os.getloadavg()
        down(FLEET)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
