"""How provisioning and deploys scale with the fleet: N simulated cars for each N; prints JSON.

    python benchmarks/fleet_scale.py [--sizes 2,10,50] [--base-port 2401] [--out FILE] [--merge STDERR]

For each N: boots N simulated trixie cars (their memory per car: MemAvailable before and after), then times
  provision_cold       playbooks/provision.yml on fresh cars (the controller's wheelhouse already built)
  provision_unchanged  the same again (nothing to do)
  deploy               playbooks/deploy.yml of a new release (a tiny ONNX bundle): a canary, then batches
                       of at most 10 cars (rover_deploy_serial: [1, 9, 10])
  redeploy_unchanged   the same release again (no bundle byte may move)
  benchmark            playbooks/benchmark.yml (every car, and the fleet report)
and for each phase reports, separately:
  wall_s               the run's wall time
  controller_cpu_s     CPU seconds of ansible-playbook and everything it started (its workers, ssh
                       clients) plus the ssh connection masters (ControlPersist) the run used
  cars_cpu_s           CPU seconds inside the cars (every process of every container, reaped ones included)
  bytes_sent           bytes over the loopback interface during the run (the cars listen on 127.0.0.1; both
                       directions, headers included: the cars' replies are a small part), so run it on a
                       quiet machine
  retries              how often a task waiting for a car (`until`) had to try again
and the same per car. On this machine the cars share the controller's 2 cores, so the wall time mixes the
controller's work with every car's; a real fleet runs each car's share on its own CPU: the controller's
CPU per car is the figure that says how the controller scales.

Concessions to one machine hosting 50 cars, the same at every N: the cars get no torch
(rover_python_torch_versions: {}; ONNX Runtime and ExecuTorch bundles, as the recommended one) so that 50
venvs fit its disk, the benchmark phase runs 200 iterations and 5 s of driving per car, a deploy gates at most
10 cars at once (the default batches, a canary, 25 % and the rest, restart 37 runtimes at once at N = 50),
and each running car is made light, because every running car's loop shares the 2 cores with the
controller: the runtime's loop runs at 5 Hz (its minimum, the firmware's failsafe wants a command every
250 ms), the black box is off (it JPEG-encodes every frame while the simulated transmitter drives), and the
synthetic camera makes 160x120 frames at 15 fps. Measured beside a 2-car fleet: a running car's runtime took
4 % of a core with the black box on and 640x480 frames at 30 fps, 1.4 % with these settings (its firmware
simulator, on the controller's side, about 1.1 %). Without the black box and camera settings (docs/scale.md,
runs A and B), the 40 cars already running at N = 50 kept the last batch's gates from passing: that deploy
measured the host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from deploy_helpers import make_bundle  # noqa: E402

from simfleet.state import FleetState  # noqa: E402
from simfleet.testing import running_fleet  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SETTINGS = {
    "rover_python_torch_versions": {},
    "rover_runtime_service_rate_hz": 5.0,
    "rover_benchmark_iterations": 200,
    "rover_benchmark_drive_s": 5,
    "rover_deploy_serial": [1, 9, 10],
    "rover_runtime_service_record_enabled": False,
    "rover_runtime_service_camera_width": 160,
    "rover_runtime_service_camera_height": 120,
    "rover_runtime_service_camera_fps": 15.0,
}


@dataclass
class Phase:
    wall_s: float
    rc: int
    controller_cpu_s: float
    cars_cpu_s: float
    bytes_sent: int
    per_car: dict[str, float] = field(default_factory=dict)
    changed: int = 0
    retries: int = 0  # attempts of `until` tasks that had to be repeated (cars slow to get ready)


def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds of itself and its reaped children, command line start)."""
    table: dict[int, tuple[int, float, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()[:200].replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        table[int(entry.name)] = (ppid, (utime + stime + cutime + cstime) / CLOCK_TICKS, cmdline)
    return table


def cars_cpu(fleet: FleetState) -> float:
    """CPU seconds so far of every process inside the cars: each live process's own time and that of the
    children it reaped (every dead process was reaped by a live one or by the container's init)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    for host in fleet.hosts:
        if host.init is None:
            continue
        todo = [host.init.pid]
        while todo:
            pid = todo.pop()
            if pid in table:
                total += table[pid][1]
                todo.extend(children.get(pid, []))
    return total


def process_cpu(pid_file: Path | None) -> float:
    """CPU seconds so far of the process whose pid `pid_file` holds (0 without one)."""
    if pid_file is None:
        return 0.0
    table = _proc_table()
    entry = table.get(int(pid_file.read_text()))
    return entry[1] if entry else 0.0


def ssh_masters_cpu(control_dir: Path) -> dict[int, float]:
    """The ssh connection masters of this benchmark (ControlPersist): they outlive each run."""
    return {
        pid: cpu
        for pid, (_, cpu, cmdline) in _proc_table().items()
        if cmdline.startswith("ssh:") and str(control_dir) in cmdline
    }


def loopback_bytes() -> int:
    """Bytes that crossed the loopback interface so far (the simulated cars listen on 127.0.0.1)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])  # transmit bytes
    return 0


def run_phase(
    fleet: FleetState,
    control_dir: Path,
    playbook: str | Path,
    *args: str,
    facts: Path,
    extra: Path | None = None,
) -> tuple[Phase, str]:
    """Runs the playbook (a name in playbooks/, or a path) with SETTINGS; measures as the docstring says.
    `extra`: one more process (a server) whose CPU counts as the controller's."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_CACHE_PLUGIN_CONNECTION=str(facts),
        ANSIBLE_SSH_CONTROL_PATH_DIR=str(control_dir),
        ANSIBLE_NOCOLOR="1",
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    command = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        fleet.inventory,
        str(playbook if isinstance(playbook, Path) else REPO / "playbooks" / playbook),
        "-e",
        json.dumps(SETTINGS),
        *args,
    ]
    extra_before = process_cpu(extra)
    masters_before = ssh_masters_cpu(control_dir)
    lo_before = loopback_bytes()
    cars_before = cars_cpu(fleet)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cars_after = cars_cpu(fleet)
    sent = loopback_bytes() - lo_before
    masters_after = ssh_masters_cpu(control_dir)
    masters = sum(cpu - masters_before.get(pid, 0.0) for pid, cpu in masters_after.items())
    masters += process_cpu(extra) - extra_before
    controller = (
        children_after.ru_utime
        - children_before.ru_utime
        + children_after.ru_stime
        - children_before.ru_stime
    )
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-6000:] + done.stderr[-2000:])
    changed = sum(int(v) for v in re.findall(r"\bchanged=(\d+)", done.stdout.rsplit("PLAY RECAP", 1)[-1]))
    phase = Phase(
        wall_s=round(wall, 1),
        rc=done.returncode,
        controller_cpu_s=round(controller + masters, 2),
        cars_cpu_s=round(cars_after - cars_before, 2),
        bytes_sent=sent,
        changed=changed,
        retries=done.stdout.count("FAILED - RETRYING"),
    )
    n = len(fleet.hosts)
    phase.per_car = {
        "controller_cpu_s": round(phase.controller_cpu_s / n, 3),
        "cars_cpu_s": round(phase.cars_cpu_s / n, 3),
        "bytes_sent": sent // n,
        "wall_s": round(wall / n, 2),
    }
    return phase, done.stdout


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


PHASES = ("provision_cold", "provision_unchanged", "deploy", "redeploy_unchanged", "benchmark")


def measure(size: int, base_port: int, work: Path, wanted: tuple[str, ...] = PHASES) -> dict[str, Any]:
    control_dir = work / f"cp-{size}"
    control_dir.mkdir()
    facts = work / f"facts-{size}"
    bundle = make_bundle(work / f"bundle-{size}", chunk_size=10 + size % 7)
    before = mem_available_mb()
    result: dict[str, Any] = {"cars": size, "phases": {}}
    with running_fleet(f"scale{size}", hosts=size, base_port=base_port, releases=("trixie",)) as fleet:
        time.sleep(10)  # the cars' boot jobs settle
        result["memory_per_idle_car_mb"] = round((before - mem_available_mb()) / size, 1)
        force = ("-e", f"rover_deploy_bundle={bundle}", "-e", "rover_deploy_force=true")
        bench = (
            "-e",
            "rover_benchmark_force=true",
            "-e",
            f"rover_benchmark_output_dir={work / f'bench-{size}'}",
        )
        runs: dict[str, tuple[str, tuple[str, ...]]] = {
            "provision_cold": ("provision.yml", ()),
            "provision_unchanged": ("provision.yml", ()),
            "deploy": ("deploy.yml", force),
            "redeploy_unchanged": ("deploy.yml", force),
            "benchmark": ("benchmark.yml", bench),
        }
        for name in PHASES:
            if name not in wanted:
                continue
            playbook, args = runs[name]
            phase, out = run_phase(fleet, control_dir, playbook, *args, facts=facts)
            result["phases"][name] = asdict(phase)
            if name == "redeploy_unchanged":
                result["redeploy_bundle_bytes"] = sum(
                    int(v) for v in re.findall(r"(\d+) bundle bytes sent", out)
                )
            if name == "deploy":
                result["memory_per_running_car_mb"] = round((before - mem_available_mb()) / size, 1)
            # What is measured so far survives an interrupted run.
            print(json.dumps({"partial": size, name: result["phases"][name]}), file=sys.stderr, flush=True)
        result["load_average_at_end"] = os.getloadavg()
    subprocess.run(["pkill", "-f", f"ssh: {control_dir}"], check=False)
    return result


def emit(report: dict[str, Any], out: Path | None) -> None:
    """The report as JSON on stdout, and in `out` when given (the benchmarks' --out)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def judge(by: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals from the per-size results."""

    def per_car(size: int, phase: str) -> float:
        return float(by[str(size)]["phases"][phase]["per_car"]["controller_cpu_s"])

    def has(size: str, phase: str) -> bool:
        return phase in by.get(size, {}).get("phases", {})

    goals: dict[str, Any] = {}
    for phase in PHASES:
        if has("10", phase) and has("50", phase):
            ratio = per_car(50, phase) / max(per_car(10, phase), 1e-9)
            goals[f"{phase}_controller_cpu_per_car_50_over_10"] = round(ratio, 2)
            goals[f"{phase}_controller_cpu_per_car_50_le_1.2x_10"] = ratio <= 1.2
    for size in by:
        if not (has(size, "deploy") and has(size, "redeploy_unchanged")):
            continue
        ratio = per_car(int(size), "redeploy_unchanged") / max(per_car(int(size), "deploy"), 1e-9)
        goals[f"redeploy_over_deploy_controller_cpu_{size}"] = round(ratio, 2)
        goals[f"redeploy_le_0.3x_deploy_{size}"] = ratio <= 0.3
        goals[f"redeploy_moves_no_bundle_byte_{size}"] = by[size]["redeploy_bundle_bytes"] == 0
    return goals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,10,50")
    parser.add_argument("--base-port", type=int, default=2401)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--phases", default=",".join(PHASES), help="a comma list of " + ", ".join(PHASES))
    parser.add_argument(
        "--merge",
        type=Path,
        action="append",
        help="an earlier run's stderr (its JSON line per size), judged with this one",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    report: dict[str, Any] = {"load_average_at_start": os.getloadavg(), "settings": SETTINGS, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        for size in sizes:
            report["sizes"][str(size)] = measure(
                size, args.base_port, Path(tmp), tuple(args.phases.split(","))
            )
            print(json.dumps({str(size): report["sizes"][str(size)]}), file=sys.stderr, flush=True)
    for earlier in args.merge or []:
        for line in earlier.read_text().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if "partial" not in entry:
                for size, result in entry.items():
                    report["sizes"].setdefault(size, result)
    goals = judge(report["sizes"])
    report["goals"] = goals
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
