"""Time `ansible-playbook playbooks/provision.yml` on fresh simulated x86_64 cars with a warm wheelhouse.

Boots a fleet (simfleet), warms the controller's wheelhouse (an untimed run of the wheelhouse tasks
only; the cars are untouched), then times a first run (fresh cars) and a second run (nothing to do) and
prints JSON: seconds, ratio, changed counts from the PLAY RECAP, and whether the targets hold
(first <= 600 s, second <= 25 % of the first, changed=0 on the second run). The fleet is stopped at the
end. Usage: python benchmarks/provision.py [--hosts 2] [--base-port 2361] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simfleet.testing import running_fleet  # noqa: E402

FIRST_RUN_LIMIT_S = 600.0
SECOND_RUN_RATIO_LIMIT = 0.25


@dataclass
class Run:
    seconds: float
    rc: int
    recap: dict[str, dict[str, int]]


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap: dict[str, dict[str, int]] = {}
    section = output.rsplit("PLAY RECAP", maxsplit=1)[-1].split("TASKS RECAP", maxsplit=1)[0]
    for line in section.splitlines():
        match = re.match(r"^(\S+)\s+:\s+(.*)$", line.strip())
        if match:
            recap[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
    return recap


def run_provision(inventory: Path, facts_dir: Path, *args: str) -> Run:
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_CACHE_PLUGIN_CONNECTION=str(facts_dir),
        ANSIBLE_NOCOLOR="1",
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    command = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        str(inventory),
        str(REPO / "playbooks" / "provision.yml"),
        *args,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-2000:])
    return Run(seconds=round(seconds, 1), rc=done.returncode, recap=parse_recap(done.stdout))


def changed(run: Run, hosts: list[str]) -> dict[str, int]:
    return {name: run.recap.get(name, {}).get("changed", -1) for name in hosts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--name", default="bench-provision")
    parser.add_argument("--base-port", type=int, default=2361)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="rover-bench-facts-") as facts,
        running_fleet(args.name, hosts=args.hosts, base_port=args.base_port) as fleet,
    ):
        inventory = Path(fleet.inventory)
        hosts = [host.name for host in fleet.hosts]
        warmup = run_provision(inventory, Path(facts), "--tags", "rover_python_wheelhouse")
        first = run_provision(inventory, Path(facts))
        second = run_provision(inventory, Path(facts))

    ok = first.rc == 0 and second.rc == 0 and warmup.rc == 0
    ratio = round(second.seconds / first.seconds, 3) if first.seconds else None
    result = {
        "benchmark": "provision",
        "hosts": len(hosts),
        "arch": "x86_64 (simulated, systemd-nspawn)",
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "wheelhouse_warmup_s": warmup.seconds,
        "first_run_s": first.seconds,
        "second_run_s": second.seconds,
        "second_to_first_ratio": ratio,
        "first_run_changed": changed(first, hosts),
        "second_run_changed": changed(second, hosts),
        "first_run": asdict(first),
        "second_run": asdict(second),
        "targets": {
            "first_run_s_max": FIRST_RUN_LIMIT_S,
            "second_to_first_ratio_max": SECOND_RUN_RATIO_LIMIT,
            "first_run_ok": ok and first.seconds <= FIRST_RUN_LIMIT_S,
            "ratio_ok": ok and ratio is not None and ratio <= SECOND_RUN_RATIO_LIMIT,
            "second_run_changed_zero": ok and all(v == 0 for v in changed(second, hosts).values()),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
