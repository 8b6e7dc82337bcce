#!/usr/bin/env bash
# The whole story on the simulated fleet (run by `make demo` after bootstrap.sh):
# simulated fleet up -> demo dataset and policy -> quantize (FP32, dynamic, static; torch, ONNX Runtime and
# ExecuTorch) -> compare + report -> provision -> deploy the report's recommendation -> watch the fleet
# (Prometheus, alerts, the live fleet page) -> benchmark -> drive
# (autopilot, the driver taking over with the transmitter, autopilot again; every car's black box records)
# -> collect the drives into one LeRobotDataset + the drive report -> fine-tune the demo policy on them ->
# where the reports are.
# A second run reuses every cache (image, dataset, policy, bundles, wheelhouse, running fleet) and is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-out}")
fleet=${ROVER_FLEET:-demo}
hosts=${ROVER_FLEET_HOSTS:-2}
inventory=inventory/sim/hosts.yml
started=$SECONDS
step() { printf '\n==> [%s +%ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - started)) "$*"; }

step "1/10 simulated fleet '$fleet' ($hosts cars, RC transmitters): python -m simfleet up --transmitter"
if python -m simfleet status --name "$fleet" --json 2>/dev/null \
    | python -c 'import json, sys; sys.exit(0 if all(h["transmitter"] for h in json.load(sys.stdin)["hosts"]) else 1)'; then
  echo "fleet '$fleet' is already up: reusing it"
else
  python -m simfleet down --name "$fleet" >/dev/null 2>&1 || true
  python -m simfleet up --name "$fleet" --hosts "$hosts" --inventory "$inventory" --transmitter
fi
# Parked (the transmitters off) until the drive: a car that is not driving records nothing, and the deploy
# and the benchmark need no force. A team parks its cars before a deploy in the same way.
transmitter() { python -m simfleet transmitter --name "$fleet" all "$@" >/dev/null; }
transmitter off

step "2/10 demo dataset, demo policy, bundles, comparison, report: python -m quantization demo"
python -m quantization demo --out "$out"

# The bundle the cars run: the report's recommendation (the fastest INT8 bundle within the accuracy
# target, report.json), unless ROVER_DEMO_BUNDLE names one.
bundle=${ROVER_DEMO_BUNDLE:-$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["recommended"] or "")' "$out/report/report.json")}
if [[ -z $bundle ]]; then
  echo "error: $out/report/report.json recommends no bundle (no INT8 bundle is within the accuracy target); set ROVER_DEMO_BUNDLE=<name in $out/bundles> to deploy one anyway" >&2
  exit 1
fi
echo "the report recommends $bundle"

step "3/10 provision: ansible-playbook playbooks/provision.yml"
ansible-playbook -i "$inventory" playbooks/provision.yml

step "4/10 deploy $bundle: ansible-playbook playbooks/deploy.yml"
ansible-playbook -i "$inventory" playbooks/deploy.yml -e rover_deploy_bundle="$out/bundles/$bundle"

step "5/10 watch the fleet: ansible-playbook playbooks/monitor.yml (Prometheus, alert rules, the live fleet page)"
ansible-playbook -i "$inventory" playbooks/monitor.yml

step "6/10 benchmark every car: ansible-playbook playbooks/benchmark.yml"
# 5 s of driving through every part per car (the role's default is 10 s).
ansible-playbook -i "$inventory" playbooks/benchmark.yml -e rover_benchmark_output_dir="$out/benchmarks" \
  -e rover_benchmark_drive_s="${ROVER_DEMO_BENCHMARK_DRIVE_S:-5}"

step "7/10 drive: autopilot, the driver takes over (python -m simfleet transmitter), autopilot again"
transmitter autopilot && sleep "${ROVER_DEMO_DRIVE_S:-10}"
transmitter manual --steering 0.4 --throttle 0.3 && sleep 5     # the driver grabs the transmitter
transmitter autopilot && sleep "${ROVER_DEMO_DRIVE_S:-10}"
transmitter off && sleep 4                                       # switched off: every episode ends, parked

step "8/10 collect the drives and write the drive report: ansible-playbook playbooks/collect.yml"
training=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["dataset"])' "$out/comparison.json")
ansible-playbook -i "$inventory" playbooks/collect.yml -e rover_collect_store="$out/drives/store" \
  -e rover_collect_dataset="$out/drives/dataset" -e rover_collect_training_dataset="$training"

step "9/10 fine-tune the demo policy on the fleet's drives: python -m quantization train-demo --init-policy"
policy=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["source"]["path"])' "$out/bundles/$bundle/manifest.json")
python -m quantization train-demo --dataset "$out/drives/dataset" --init-policy "$policy" \
  --out "$out/drives/finetuned" --steps "${ROVER_DEMO_FINETUNE_STEPS:-20}" --no-quality-check --force

step "10/10 done in $((SECONDS - started)) s"
run=$(find "$out/benchmarks/runs" -mindepth 1 -maxdepth 1 -type d | sort | tail -n 1)
cat <<MSG
Quantization report:   $out/report/report.md (and report.json; comparison in $out/comparison.json)
Model bundles:         $out/bundles/
Fleet benchmark:       $run/report.md, report.html, latency.png
The fleet's drives:    $out/drives/dataset (LeRobotDataset), drive report $out/drives/report/report.md
Fine-tuned on them:    $out/drives/finetuned/policy
The live fleet page:   http://127.0.0.1:8090/ (Prometheus http://127.0.0.1:9090/, its alerts /alerts); make monitor-down stops both
The simulated fleet is still up, its cars parked: python -m simfleet status --name $fleet;
drive them with python -m simfleet transmitter --name $fleet all autopilot; stop them with make fleet-down.
MSG
