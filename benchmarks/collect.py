"""Collect timings on the simulated fleet; prints JSON.

    python benchmarks/collect.py --inventory inventory/sim/hosts.yml [--minutes 10] [--cars car1,car2]

The cars must run a release with the recorder on (provision + deploy; a simulated car drives all the time,
so it records all the time). The script
1. clears the cars' recordings, lets them drive `--minutes` (episodes of 60 s), then stops their runtimes so
   nothing new is recorded while it measures,
2. runs playbooks/collect.yml into a fresh store: wall time, bytes on the controller, episodes, frames, and
   the bytes each car's ROVER RECAP line says were fetched,
3. runs it again: wall time and bytes fetched (target 0),
and starts the runtimes again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from deploy_helpers import car, run_playbook

EPISODES = "/var/lib/rover/recordings/episodes"
_COLLECTED = re.compile(r"^([\w.-]+): ok: collected (\d+) new episode\(s\), (\d+) bytes", re.MULTILINE)


def _recap(stdout: str) -> dict[str, dict[str, int]]:
    section = stdout.rsplit("ROVER RECAP", maxsplit=1)[-1]
    return {h: {"episodes": int(n), "bytes": int(b)} for h, n, b in _COLLECTED.findall(section)}


def _collect(inventory: Path, store: Path, cars: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    run = run_playbook(
        inventory,
        "collect.yml",
        "--limit",
        ",".join(cars),
        "-e",
        f"rover_collect_store={store}",
        "-e",
        f"rover_collect_dataset={store.parent / 'dataset'}",
        timeout=3600,
    )
    wall = time.monotonic() - started
    if run.rc != 0:
        raise SystemExit(f"collect.yml failed:\n{run.report()}")
    merge = json.loads((store.parent / "merge.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "per_car": _recap(run.stdout),
        "store_bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()),
        "merged_episodes": merge.get("episodes"),
        "merged_frames": merge.get("frames"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inventory", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of driving to record")
    parser.add_argument("--cars", default="car1,car2")
    args = parser.parse_args()
    cars = args.cars.split(",")
    hosts = [car(args.inventory, name) for name in cars]
    for host in hosts:
        host.check_output(f"rm -rf {EPISODES}/*")
    time.sleep(args.minutes * 60)
    for host in hosts:
        host.check_output("systemctl stop rover-runtime")  # parked: nothing new while measuring
    try:
        with tempfile.TemporaryDirectory(prefix="rover-collect-bench-") as tmp:
            store = Path(tmp) / "store"
            first = _collect(args.inventory, store, cars)
            second = _collect(args.inventory, store, cars)
    finally:
        for host in hosts:
            host.run("systemctl start rover-runtime")
    report = {
        "cars": cars,
        "minutes_driven": args.minutes,
        "first_collect": first,
        "second_collect": second,
        "second_collect_moves_nothing": all(c["bytes"] == 0 for c in second["per_car"].values()),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
