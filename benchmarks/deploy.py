"""Deploy timings on the simulated fleet; prints JSON.

    python benchmarks/deploy.py --inventory inventory/sim/hosts.yml [--skip-provision]

1. provisions the cars (playbooks/provision.yml; a no-op when done before),
2. a full deploy of a new release (a fresh tiny ONNX bundle, unique per run) to every car: wall time,
3. a redeploy of the same, unchanged release: wall time, changed tasks per car (target 0), bundle bytes
   sent (target 0: the role's own count, and the model file's inode and mtime on each car unchanged).
Target from the issue: redeploy to 2 simulated cars with changed=0, zero bundle bytes, in <= 30 s.

A deploy that switches a car restarts it and holds it in the health gate's soak (rover_health_soak_s: 10 s
on simulated cars, 30 s by default), batch after batch (canary, 25 %, the rest). The soak each car passed
is read from the ROVER RECAP ("healthy for X s after Y s to start"): `soak_s` and `gate_start_s` per car,
`soak_total_s` (per batch the longest soak of its cars, summed: the soak's share of the wall time) and
`full_deploy_s_minus_soak`.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from deploy_helpers import car, content_hash, make_bundle, run_playbook

# Simulated cars always drive (their policy commands throttle): a release switch needs force.
_FORCE = ("-e", "rover_deploy_force=true")
# One ROVER RECAP line per car (plugins/callback/rover_recap.py), e.g.
#   car1: ok: deployed release <id> (from <id|none>, <n> bundle bytes sent, gated: loop at 30.0 Hz, ...,
#         healthy for 10.0 s after 2.1 s to start)
#   car1: ok: release <id> unchanged
_RECAP_LINE = re.compile(r"^([\w.-]+): (ok|SKIPPED|FAILED|not attempted): (.*)$", re.MULTILINE)
_SENT = re.compile(r"(\d+) bundle bytes sent")
_GATE = re.compile(r"healthy for ([\d.]+) s after ([\d.]+) s to start")
# A task result naming a car: "ok: [car1]", "changed: [car1 -> localhost]", "skipping: [car1]".
_RESULT_HOST = re.compile(r"^\w+: \[([\w.-]+)[\] ]", re.MULTILINE)
_DEPLOY_PLAY = "PLAY [Deploy the release"


def _recap(stdout: str) -> dict[str, tuple[str, str]]:
    """{car: (status, text)} from the ROVER RECAP at the end of the run."""
    section = stdout.rsplit("ROVER RECAP", maxsplit=1)[-1] if "ROVER RECAP" in stdout else ""
    return {host: (status, text) for host, status, text in _RECAP_LINE.findall(section)}


def _soak_total(stdout: str, soak: dict[str, float]) -> float:
    """Seconds of the run spent in soaks: batches run one after another (one play header per batch), the
    cars of a batch in parallel, so per batch the longest soak of its cars."""
    total = 0.0
    for chunk in stdout.split(_DEPLOY_PLAY)[1:]:
        batch = chunk.split("\nPLAY ")[0]
        cars = set(_RESULT_HOST.findall(batch)) & set(soak)
        total += max((soak[h] for h in cars), default=0.0)
    return total


def _model_stat(inventory: Path, hosts: list[str]) -> dict[str, str]:
    return {
        h: car(inventory, h).check_output("stat -L -c '%i %Y' /opt/rover/current/bundle/model.onnx")
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
        runs: dict[str, dict[str, Any]] = {}
        for phase in ("full_deploy", "redeploy_unchanged"):
            t = time.perf_counter()
            run = run_playbook(inventory, "deploy.yml", *_FORCE, "-e", f"rover_deploy_bundle={bundle}")
            seconds = time.perf_counter() - t
            if run.rc != 0:
                print(f"deploy benchmark: {phase} failed:\n{run.stdout[-3000:]}", file=sys.stderr)
                return 1
            recap = {h: c for h, c in run.recap().items() if h != "localhost"}
            outcomes = _recap(run.stdout)
            sent: dict[str, int] = {}
            soak: dict[str, float] = {}
            start: dict[str, float] = {}
            for host, (status, text) in outcomes.items():
                if status != "ok":
                    continue
                # A car whose release was already there reports no count: nothing was sent.
                bytes_sent = _SENT.search(text)
                sent[host] = int(bytes_sent.group(1)) if bytes_sent else 0
                gate = _GATE.search(text)
                if gate:
                    soak[host], start[host] = float(gate.group(1)), float(gate.group(2))
            soak_total = _soak_total(run.stdout, soak)
            runs[phase] = {
                "seconds": round(seconds, 1),
                "hosts": len(recap),
                "changed_per_host": {h: c["changed"] for h, c in recap.items()},
                "bundle_bytes_sent_per_host": sent,
                "soak_s": soak,
                "gate_start_s": start,
                "soak_total_s": round(soak_total, 1),
                "outcome_per_host": {h: f"{status}: {text}" for h, (status, text) in outcomes.items()},
            }
            if phase == "full_deploy":
                before = _model_stat(inventory, sorted(recap))
                result["full_deploy_s_minus_soak"] = round(seconds - soak_total, 1)
        after = _model_stat(inventory, sorted(before))
        redeploy = runs["redeploy_unchanged"]
        redeploy["model_file_untouched"] = before == after
        redeploy["meets_target"] = (
            all(c == 0 for c in redeploy["changed_per_host"].values())
            and all(b == 0 for b in redeploy["bundle_bytes_sent_per_host"].values())
            and before == after
            and redeploy["seconds"] <= 30
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
