"""A fleet's firmware upgrade on simulated cars whose Arduino runs the compiled sketch (`simfleet up --arduino
board`: a simulated Uno behind Optiboot, flashed by avrdude on the car); prints JSON.

    python benchmarks/fleet_firmware.py [--hosts 2] [--batches default|one]

1. boots the fleet and provisions it (playbooks/provision.yml),
2. deploys a release whose firmware the boards already run (nothing flashed): `deploy_same_firmware_s`,
3. deploys the same bundle with the next firmware version: `deploy_new_firmware_s`, the deploy start to every
   car driving on the new firmware (stop, flash and read back, the new firmware's answer, restart, health
   gate), and per car the flash step's own seconds and attempts (its /run/rover-firmware.json),
4. stops the fleet.

`--batches default` keeps deploy.yml's canary, 25 %, rest; `one` deploys every car at once. Each simulated
board takes about a third of a core in real time: on a 2-core machine more than 4 boards fall behind the wall
clock (the benchmark says so in `machine`). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from deploy_helpers import FORCE, ONE_BATCH, car, make_bundle, run_playbook  # noqa: E402

from quantization.compare import host_info  # noqa: E402
from simfleet.board import CAR_DEFINES  # noqa: E402
from simfleet.testing import running_fleet  # noqa: E402

NEXT = {**CAR_DEFINES, "ROVER_FIRMWARE_VERSION": '"2.0.1"'}


def deploy(inventory: Path, bundle: Path, defines: dict[str, str], batches: tuple[str, ...]) -> float:
    started = time.monotonic()
    run = run_playbook(
        inventory, "deploy.yml", *FORCE, *batches, "-e", f"rover_deploy_bundle={bundle}",
        "-e", json.dumps({"rover_firmware_defines": defines}), timeout=3600,
    )  # fmt: skip
    seconds = time.monotonic() - started
    if run.rc != 0:
        raise SystemExit(f"deploy failed (exit {run.rc}):\n{run.report()[-3000:]}")
    return round(seconds, 1)


def flash_results(inventory: Path, hosts: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in hosts:
        result = json.loads(car(inventory, name).file("/run/rover-firmware.json").content_string)
        out[name] = {k: result[k] for k in ("flashed", "attempts", "seconds", "image_version")}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--batches", choices=["default", "one"], default="default")
    parser.add_argument("--base-port", type=int, default=2501)
    args = parser.parse_args()
    batches = ONE_BATCH if args.batches == "one" else ()
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_fleet("bench-firmware", hosts=args.hosts, base_port=args.base_port, arduino="board") as state,
    ):
        inventory = Path(state.inventory)
        hosts = [h.name for h in state.hosts]
        started = time.monotonic()
        run = run_playbook(inventory, "provision.yml", timeout=3600)
        if run.rc != 0:
            raise SystemExit(f"provision failed:\n{run.report()[-3000:]}")
        provision_s = round(time.monotonic() - started, 1)
        bundle = make_bundle(Path(tmp) / "bundle", chunk_size=10)
        same_s = deploy(inventory, bundle, dict(CAR_DEFINES), batches)
        same = flash_results(inventory, hosts)
        new_s = deploy(inventory, bundle, NEXT, batches)
        new = flash_results(inventory, hosts)
    flashes = [r["seconds"] for r in new.values()]
    print(
        json.dumps(
            {
                "hosts": args.hosts,
                "batches": args.batches,
                "provision_s": provision_s,
                "deploy_same_firmware_s": same_s,
                "deploy_new_firmware_s": new_s,
                "flash_step_s": {"min": min(flashes), "max": max(flashes)},
                "same_firmware": same,
                "new_firmware": new,
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()],
                "machine": host_info(),
                "note": "a simulated board runs in real time at about a third of a core",
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
