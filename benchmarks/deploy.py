"""Deploy timings on the simulated fleet; prints JSON.

    python benchmarks/deploy.py --inventory inventory/sim/hosts.yml [--skip-provision]

1. provisions the cars (playbooks/provision.yml; a no-op when done before),
2. a full deploy of a new bundle (a fresh tiny ONNX bundle, unique per run) to every car: wall time,
3. a redeploy of the same, unchanged release: wall time, changed tasks per car (target 0), bundle bytes
   sent (target 0: the role's own count, and the model file's inode and mtime on each car unchanged).
Target from the issue: redeploy to 2 simulated cars with changed=0, zero bundle bytes, in <= 30 s.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from deploy_helpers import car, content_hash, make_bundle, run_playbook

# Simulated cars always drive (their policy commands throttle): a model swap needs force.
_FORCE = ("-e", "rover_deploy_force=true")
# The deploy's last task prints "<car>: release <hash> (<what happened>, <n> bundle bytes sent)".
_SENT = re.compile(r"([\w.-]+): release \w+\s+\([^)]*?,\s+(\d+)\s+bundle\s+bytes\s+sent\)", re.S)


def _model_stat(inventory: Path, hosts: list[str]) -> dict[str, str]:
    return {
        h: car(inventory, h).check_output("stat -L -c '%i %Y' /opt/rover/models/current/model.onnx")
        for h in hosts
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inventory", type=Path, default=Path("inventory/sim/hosts.yml"))
    parser.add_argument("--skip-provision", action="store_true")
    args = parser.parse_args()
    inventory = args.inventory.resolve()
    result: dict[str, object] = {"inventory": str(inventory)}
    if not args.skip_provision:
        t = time.perf_counter()
        run = run_playbook(inventory, "provision.yml", timeout=3600)
        if run.rc != 0:
            print(f"deploy benchmark: provisioning failed:\n{run.stdout[-3000:]}", file=sys.stderr)
            return 1
        result["provision_s"] = round(time.perf_counter() - t, 1)
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        # A chunk size from the clock makes a bundle no car has yet: a genuinely new release.
        bundle = make_bundle(Path(tmp) / "bundle", chunk_size=10 + int(time.time()) % 50)
        runs = {}
        for phase in ("full_deploy", "redeploy_unchanged"):
            t = time.perf_counter()
            run = run_playbook(inventory, "deploy.yml", *_FORCE, "-e", f"rover_deploy_bundle={bundle}")
            seconds = time.perf_counter() - t
            if run.rc != 0:
                print(f"deploy benchmark: {phase} failed:\n{run.stdout[-3000:]}", file=sys.stderr)
                return 1
            recap = {h: c for h, c in run.recap().items() if h != "localhost"}
            sent = {h: int(n) for h, n in _SENT.findall(run.stdout)}
            runs[phase] = {
                "seconds": round(seconds, 1),
                "hosts": len(recap),
                "changed_per_host": {h: c["changed"] for h, c in recap.items()},
                "bundle_bytes_sent_per_host": sent,
            }
            if phase == "full_deploy":
                before = _model_stat(inventory, sorted(recap))
        after = _model_stat(inventory, sorted(before))
        redeploy = runs["redeploy_unchanged"]
        redeploy["model_file_untouched"] = before == after
        redeploy["meets_target"] = (
            all(c == 0 for c in redeploy["changed_per_host"].values())  # type: ignore[attr-defined]
            and all(b == 0 for b in redeploy["bundle_bytes_sent_per_host"].values())  # type: ignore[attr-defined]
            and before == after
            and redeploy["seconds"] <= 30  # type: ignore[operator]
        )
        result.update(runs)
        result["bundle"] = {"content_hash": content_hash(bundle), "format": "onnx (tiny test model)"}
    result["git_commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
