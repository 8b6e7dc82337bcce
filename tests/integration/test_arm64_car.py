"""The emulated arm64 trixie car (qemu-user): the real target architecture and OS of a Pi 5 flashed today.

One car, the whole path a user takes: provision (the aarch64 cp313 wheelhouse built on this x86_64
controller, installed offline; PyPI's aarch64 CPU torch with qnnpack, ONNX Runtime, and the ExecuTorch runtime
cross-compiled here), deploy the static INT8 ONNX bundle of the test policy through the health gate, and one
`rover-runtime check` inference on the car. Then the proof on the target architecture: every INT8 bundle kind
we ship (ExecuTorch XNNPACK, ONNX Runtime QDQ, torch qnnpack) runs on the same recorded held-out inputs on
the car, with the car's own backends, and must give the actions it gives on this x86 controller within
ARM64_TOLERANCE_MEAN_PCT / ARM64_TOLERANCE_MAX_PCT of the action range.
Emulation is ~100x slower than a Pi: deadlines are raised for this car only, speed is not judged here.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from deploy_helpers import car, container_pid, content_hash, current_bundle, run_playbook
from quantize_helpers import heldout_batch, run_bundle, tiny_bundle

from quantization.calibration import action_range
from simfleet.testing import running_fleet

pytestmark = [pytest.mark.arm64, pytest.mark.fleet, pytest.mark.slow]

ARM64_FLEET = os.environ.get("SIMFLEET_TEST_NAME", "pytest") + "-arm64-car"
# After the session fleet's ports ($SIMFLEET_TEST_BASE_PORT, default 2321) and the other modules' fleets.
ARM64_PORT = int(os.environ.get("SIMFLEET_TEST_BASE_PORT", "2321")) + 90
# What an emulated car needs: the health gate's time-outs and the loop's rate are per-host settings.
EMULATED_CAR_VARS = {
    "rover_health_timeout_s": 900,
    "rover_health_check_deadline_ms": 120000,
    # 10 Hz: the emulated loop's work (~30 ms p99) fits, and a command every 100 ms keeps the firmware's
    # 250 ms failsafe from firing. An emulated inference takes ~0.5 s alone, but `make test` runs this car
    # beside the fleet stage, where it took up to 10 s (p95) while the other cars gated: it may run for 30 s
    # before it counts as stalled (a late chunk is a hold, not a fault; a hung one still fails the gate).
    "rover_runtime_service_rate_hz": 10.0,
    # Its camera thread, emulated too, can be starved for a quarter second under that load (a CI run: the
    # newest frame 0.25 s old at the default 0.2 s limit): 0.5 s, as for the TCG VM cars.
    "rover_runtime_service_extra_config": {
        "failsafe": {"inference_timeout_s": 30.0},
        "camera": {"max_frame_age_s": 0.5},
    },
    "rover_runtime_service_timeout_start_sec": 900,
    "rover_runtime_service_watchdog_sec": 120,
    # qemu-user cannot create an IPC namespace for the service (226/NAMESPACE).
    "rover_runtime_service_private_ipc": False,
    # The black box's JPEG encoding is ~100x slower emulated and would compete with the emulated inference
    # for the 2 cores; the recorder is tested on the amd64 cars.
    "rover_runtime_service_record_enabled": False,
}


# Every INT8 bundle kind we ship, and the difference allowed between its actions on the arm64 car and on x86,
# in % of the action range (mean over the chunk, and the largest single value): the same program, different
# kernels (XNNPACK, MLAS, QNNPACK for Arm vs x86). Where the kernels requantize differently, an activation
# rounded one INT8 step the other way moves an action by about 1 % of the range in this small policy (ONNX
# Runtime static INT8: 1.16 % at most, measured); a wrong kernel, layout or scale is off by tens of percent.
INT8_KINDS = ("static-executorch", "static-onnx", "static-torch")
ARM64_TOLERANCE_MEAN_PCT = 0.3
ARM64_TOLERANCE_MAX_PCT = 3.0
PARITY_FRAMES = 4
# Run on the car with its venv and the release's rover_runtime, in one process (an emulated `import torch`
# takes tens of seconds): each bundle on the recorded inputs -> its actions (<bundle>.npy beside it).
PARITY_SCRIPT = """
import sys
import numpy as np
from rover_runtime.backends import load_model
from rover_runtime.bundle import open_bundle
data = np.load(sys.argv[1])
for path in sys.argv[2:]:
    bundle = open_bundle(path)
    model = load_model(bundle, threads=2, engine=bundle.manifest.engine)
    keys = ["observation.state", *(img.key for img in bundle.manifest.inputs.images)]
    frames = len(data["observation.state"])
    out = np.concatenate([model.run([data[k][i : i + 1] for k in keys]) for i in range(frames)])
    np.save(path + ".npy", out)
    print(bundle.manifest.backend, out.shape)
"""


def _parity_on_car(host, car_root: Path, bundles: dict[str, Path], inputs: Path) -> dict[str, np.ndarray]:
    """Put the bundles and the inputs into the car's file system (`car_root`: its root as this machine sees
    it), run the bundles there with the car's Python, read the actions back."""
    work = car_root / "tmp" / "parity"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(inputs, work / "inputs.npz")
    for name, bundle in bundles.items():
        shutil.copytree(bundle, work / name)
    run = host.run(
        "cd /tmp && PYTHONPATH=/opt/rover/current/lib /opt/rover/venv/bin/python "
        f"-c {shlex.quote(PARITY_SCRIPT)} /tmp/parity/inputs.npz "
        + " ".join(f"/tmp/parity/{name}" for name in bundles)
    )
    assert run.rc == 0, f"the bundles on the arm64 car: {run.stdout}{run.stderr}"
    return {name: np.load(work / f"{name}.npy") for name in bundles}


def test_arm64_trixie_car_provisions_deploys_and_infers(
    tiny_policy: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    bundle = tiny_bundle(tiny_policy, demo_dataset, "static-onnx")
    fleet_up = running_fleet(ARM64_FLEET, hosts=1, arch="arm64", base_port=ARM64_PORT, releases=("trixie",))
    with fleet_up as fleet:
        inventory = Path(fleet.inventory)
        name = fleet.hosts[0].name
        slow = tmp_path / "emulated.yml"
        slow.write_text(
            yaml.safe_dump({"all": {"children": {"rovers": {"hosts": {name: EMULATED_CAR_VARS}}}}})
        )

        # node_exporter is left out here: Debian's package is the same on every architecture and is tested on
        # the amd64 fleet and by Molecule; under qemu-user its dpkg run costs minutes of emulated CPU beside
        # the fleet stage (the runtime's textfile directory is then missing: it logs that once and drives).
        run = run_playbook(
            inventory, "provision.yml", "-i", str(slow), "--skip-tags", "rover_node_exporter", timeout=3600
        )
        assert run.rc == 0, run.report()
        host = car(inventory, name)
        report = host.check_output(
            "/opt/rover/venv/bin/python -c 'import json, platform, sys, torch, onnxruntime; "
            'torch.backends.quantized.engine = "qnnpack"; '
            "print(json.dumps([platform.machine(), sys.version_info[:2], torch.__version__, "
            "torch.backends.quantized.supported_engines, onnxruntime.__version__]))'"
        )
        wheels = host.check_output("ls /opt/rover/wheelhouse/*/")
        fact = json.loads(host.check_output("cat /etc/ansible/facts.d/rover_python.fact"))

        run = run_playbook(
            inventory, "deploy.yml", "-i", str(slow), "-e", f"rover_deploy_bundle={bundle}",
            "-e", "rover_deploy_force=true", timeout=3600,
        )  # fmt: skip
        assert run.rc == 0, run.report()
        assert current_bundle(host) == content_hash(bundle)
        check = host.run(
            "sudo -u rover /opt/rover/current/bin/rover-runtime check "
            "--config /opt/rover/current/runtime.toml --skip-serial --deadline-ms 120000"
        )
        os_release = host.check_output(". /etc/os-release && echo $VERSION_CODENAME")
        # The deployed release has passed its gate and its check: park it, so that its emulated loop (about
        # half a core) leaves the cores to the parity run and to the fleet stage running beside this test.
        host.check_output("systemctl stop rover-runtime")

        batch = heldout_batch(demo_dataset, PARITY_FRAMES)
        inputs = tmp_path / "inputs.npz"
        np.savez(inputs, **{k: v.numpy().astype(np.float32) for k, v in batch.items()})
        kinds = {name: tiny_bundle(tiny_policy, demo_dataset, name) for name in INT8_KINDS}
        on_car = _parity_on_car(host, Path(f"/proc/{container_pid(inventory, name)}/root"), kinds, inputs)

    machine, python, torch_version, engines, _ort = json.loads(report.splitlines()[-1])
    assert machine == "aarch64"
    assert python == [3, 13]
    assert os_release.strip() == "trixie"
    assert "torch-2.10.0-cp313-cp313-manylinux_2_28_aarch64.whl" in wheels
    assert torch_version.split("+")[0] == "2.10.0"  # PyPI's aarch64 CPU wheel reports 2.10.0+cpu
    assert "qnnpack" in engines
    assert fact["python"] == "3.13"
    assert fact["engines"] == ["torch", "onnxruntime", "executorch"]
    assert any(
        w.startswith("rover_executorch-1.5.1+rover") and w.endswith("_aarch64.whl") for w in wheels.split()
    )
    assert check.rc == 0, check.stdout + check.stderr
    result = json.loads(check.stdout)
    assert result["ok"] is True, result
    assert result["checks"]["bundle"]["content_hash"] == content_hash(bundle)
    assert result["checks"]["bundle"]["backend"] == "onnxruntime"
    assert result["checks"]["inference"]["finite"] is True

    # The proof on the target architecture: each INT8 kind's actions on the car match x86's.
    span = np.asarray(action_range(demo_dataset), dtype=np.float64)
    report = {}
    for name, bundle_dir in kinds.items():
        on_x86 = run_bundle(bundle_dir, batch)
        assert on_car[name].shape == on_x86.shape == (PARITY_FRAMES, 10, 2), name
        diff_pct = np.abs(on_car[name] - on_x86) / span * 100
        report[name] = (float(diff_pct.mean()), float(diff_pct.max()))
    print("arm64 vs x86, % of the action range (mean, max):", report)
    beyond = {
        name: stats
        for name, stats in report.items()
        if stats[0] > ARM64_TOLERANCE_MEAN_PCT or stats[1] > ARM64_TOLERANCE_MAX_PCT
    }
    assert not beyond, f"arm64 differs from x86 beyond the tolerance (mean, max % of the range): {beyond}"
