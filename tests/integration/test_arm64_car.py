"""The emulated arm64 trixie car (qemu-user): the real target architecture and OS of a Pi 5 flashed today.

One car, the whole path a user takes: provision (the aarch64 cp313 wheelhouse built on this x86_64
controller, installed offline; PyPI's aarch64 CPU torch with qnnpack), deploy the static INT8 ONNX bundle of
the test policy through the health gate, and one `rover-runtime check` inference on the car.
Emulation is ~100x slower than a Pi: deadlines are raised for this car only, speed is not judged here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from deploy_helpers import car, content_hash, current_bundle, run_playbook
from quantize_helpers import tiny_bundle

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
    # 250 ms failsafe from firing; an emulated inference takes ~0.5 s, so it may run for 5 s before it counts
    # as stalled.
    "rover_runtime_service_rate_hz": 10.0,
    "rover_runtime_service_extra_config": {"failsafe": {"inference_timeout_s": 5.0}},
    "rover_runtime_service_timeout_start_sec": 900,
    "rover_runtime_service_watchdog_sec": 120,
    # qemu-user cannot create an IPC namespace for the service (226/NAMESPACE).
    "rover_runtime_service_private_ipc": False,
}


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

        run = run_playbook(inventory, "provision.yml", "-i", str(slow), timeout=3600)
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

    machine, python, torch_version, engines, _ort = json.loads(report.splitlines()[-1])
    assert machine == "aarch64"
    assert python == [3, 13]
    assert os_release.strip() == "trixie"
    assert "torch-2.10.0-cp313-cp313-manylinux_2_28_aarch64.whl" in wheels
    assert torch_version.split("+")[0] == "2.10.0"  # PyPI's aarch64 CPU wheel reports 2.10.0+cpu
    assert "qnnpack" in engines
    assert fact["python"] == "3.13"
    assert fact["engines"] == ["torch", "onnxruntime"]
    assert check.rc == 0, check.stdout + check.stderr
    result = json.loads(check.stdout)
    assert result["ok"] is True, result
    assert result["checks"]["bundle"]["content_hash"] == content_hash(bundle)
    assert result["checks"]["bundle"]["backend"] == "onnxruntime"
    assert result["checks"]["inference"]["finite"] is True
