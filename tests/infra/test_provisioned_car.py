"""What `playbooks/provision.yml` promises on each car (see the roles' READMEs)."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest

pytestmark = pytest.mark.fleet


def test_service_user_exists_with_groups_and_no_login(host: Any, settings: dict[str, Any]) -> None:
    user = host.user(settings["rover_base_user"])
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"
    assert set(settings["rover_base_user_groups"]) <= set(user.groups)
    with host.sudo():
        shadow = host.check_output(f"getent shadow {user.name}")
    assert shadow.split(":")[1].startswith(("!", "*")), "password must be locked"


def test_service_user_cannot_log_in(host: Any, settings: dict[str, Any]) -> None:
    with host.sudo():
        result = host.run(f"su - {settings['rover_base_user']} -c true")
    assert result.rc != 0
    assert "not available" in result.stdout + result.stderr


def python_fact(host: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The rover_python role's local fact: the venv's Python and engines."""
    return dict(json.loads(host.file(settings["rover_python_fact_file"]).content_string))


def expected_torch(host: Any, settings: dict[str, Any]) -> str | None:
    """The torch version the settings give this car's architecture and Python (None: no torch)."""
    python = host.check_output(
        f"{settings['rover_python_interpreter']} -c 'import sys; print(sys.version[:4])'"
    )
    versions = settings["rover_python_torch_versions"].get(host.system_info.arch, {})
    return versions.get(python.strip())


def test_venv_runs_on_the_cars_own_python(host: Any, settings: dict[str, Any]) -> None:
    interpreter = settings["rover_python_interpreter"]
    own = host.check_output(f"{interpreter} -c 'import sys; print(sys.version_info[:2])'")
    venv = host.check_output(
        f"{settings['rover_python_venv_dir']}/bin/python -c 'import sys; print(sys.version_info[:2])'"
    )
    assert venv == own


def test_python_fact_records_the_venvs_engines(host: Any, settings: dict[str, Any]) -> None:
    fact = python_fact(host, settings)
    python = f"{settings['rover_python_venv_dir']}/bin/python"
    probe = (
        "import importlib.metadata as m, json, sys\n"
        "def v(name):\n"
        "    try:\n"
        "        return m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({'python': sys.version[:4], 'torch': v('torch'), 'onnxruntime': v('onnxruntime'),"
        " 'executorch': v('rover-executorch')}))"
    )
    actual = json.loads(host.check_output(f"{python} -c {shlex.quote(probe)}"))
    assert fact["python"] == actual["python"]
    assert fact["torch"] == actual["torch"]
    assert fact["onnxruntime"] == actual["onnxruntime"]
    assert fact["executorch"] == actual["executorch"]
    assert fact["engines"] == [engine for engine in ("torch", "onnxruntime", "executorch") if actual[engine]]
    assert (actual["torch"] or "").split("+")[0] == (expected_torch(host, settings) or "")


def test_executorch_runtime_loads_without_torch(host: Any, settings: dict[str, Any]) -> None:
    if not settings["rover_python_executorch_version"]:
        pytest.skip("rover_python_executorch_version is empty: no ExecuTorch runtime on the cars")
    python = f"{settings['rover_python_venv_dir']}/bin/python"
    # torch blocked: the car's ExecuTorch runtime is its own C++ libraries, called through ctypes.
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import ctypes, json, rover_executorch\n"
        "lib = ctypes.CDLL(str(rover_executorch.LIBRARY))\n"
        "print(json.dumps([rover_executorch.EXECUTORCH_VERSION, lib.rover_et_abi_version()]))"
    )
    result = host.run(f"{python} -c {shlex.quote(script)}")
    assert result.rc == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        settings["rover_python_executorch_version"],
        1,
    ]


def test_venv_imports_torch_with_qnnpack_engine(host: Any, settings: dict[str, Any]) -> None:
    torch_version = expected_torch(host, settings)
    if torch_version is None:
        pytest.skip(
            "no torch for this car's architecture and Python (rover_python_torch_versions): ONNX only"
        )
    python = f"{settings['rover_python_venv_dir']}/bin/python"
    engine = settings["rover_python_required_quantized_engine"]
    # A dynamically quantized Linear run on the engine proves the engine works, not only that it is listed.
    script = (
        "import json, torch;"
        f"torch.backends.quantized.engine = '{engine}';"
        "m = torch.ao.quantization.quantize_dynamic("
        "torch.nn.Sequential(torch.nn.Linear(8, 4)), {torch.nn.Linear});"
        "y = m(torch.ones(2, 8));"
        "print(json.dumps({'engines': torch.backends.quantized.supported_engines, 'shape': list(y.shape),"
        " 'version': torch.__version__}))"
    )
    result = host.run(f'{python} -W ignore -c "{script}"')
    assert result.rc == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert engine in report["engines"]
    assert report["shape"] == [2, 4]
    assert report["version"].split("+")[0] == torch_version


@pytest.mark.parametrize("module", ["numpy", "serial", "cv2", "onnxruntime"])
def test_venv_has_runtime_module(host: Any, settings: dict[str, Any], module: str) -> None:
    result = host.run(f"{settings['rover_python_venv_dir']}/bin/python -c 'import {module}'")
    assert result.rc == 0, result.stderr


def test_pushed_wheelhouse_matches_its_hashes(host: Any, settings: dict[str, Any]) -> None:
    root = settings["rover_python_remote_wheelhouse_root"]
    sums = host.check_output(f"ls {root}/*/SHA256SUMS").split()
    assert len(sums) == 1, f"expected exactly one wheelhouse under {root}, found {sums}"
    result = host.run(f"cd $(dirname {sums[0]}) && sha256sum --check --strict --quiet SHA256SUMS")
    assert result.rc == 0, result.stdout + result.stderr


def test_udev_rule_names_the_arduino(host: Any, settings: dict[str, Any]) -> None:
    rule = host.file(settings["rover_serial_rules_file"])
    assert rule.is_file
    assert rule.user == "root"
    assert rule.mode == 0o644
    lines = [line for line in rule.content_string.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1, lines
    expected = [
        'SUBSYSTEM=="tty"',
        f'ATTRS{{idVendor}}=="{settings["rover_serial_usb_vendor_id"].lower()}"',
        f'ATTRS{{idProduct}}=="{settings["rover_serial_usb_product_id"].lower()}"',
        f'SYMLINK+="{settings["rover_serial_device_name"]}"',
        f'GROUP="{settings["rover_serial_device_group"]}"',
        f'MODE="{settings["rover_serial_device_mode"]}"',
    ]
    if settings["rover_serial_usb_serial"]:
        expected.append(f'ATTRS{{serial}}=="{settings["rover_serial_usb_serial"]}"')
    for clause in expected:
        assert clause in lines[0]


def has_a_kernel(host: Any) -> bool:
    """A car with its own kernel and udev (a Pi, a VM car); a container car shares the controller's."""
    return host.run("systemd-detect-virt --container --quiet").rc != 0


NO_KERNEL = "a container car has no kernel or udev of its own (docs/simulation.md); VM and real cars run this"


def test_udev_names_the_usb_arduino(host: Any, settings: dict[str, Any]) -> None:
    """The rule fired: its name points at a USB serial device with the rule's ids (and serial number),
    group and mode."""
    if not has_a_kernel(host):
        pytest.skip(NO_KERNEL)
    node = host.check_output(f"readlink -f /dev/{settings['rover_serial_device_name']}")
    assert re.fullmatch(r"/dev/tty(USB|ACM)\d+", node), node
    props = dict(
        line.split("=", 1)
        for line in host.check_output(f"udevadm info --query=property --name={node}").splitlines()
        if "=" in line
    )
    assert props["ID_VENDOR_ID"] == settings["rover_serial_usb_vendor_id"].lower()
    assert props["ID_MODEL_ID"] == settings["rover_serial_usb_product_id"].lower()
    if settings["rover_serial_usb_serial"]:
        assert props["ID_SERIAL_SHORT"] == settings["rover_serial_usb_serial"]
    assert host.file(node).group == settings["rover_serial_device_group"]
    assert host.file(node).mode == int(settings["rover_serial_device_mode"], 8)


QUERYCAP = (
    "import fcntl, struct, sys\n"
    "buf = bytearray(104)\n"
    "with open(sys.argv[1], 'rb', buffering=0) as dev:\n"
    "    fcntl.ioctl(dev, 0x80685600, buf)  # VIDIOC_QUERYCAP\n"
    "print(struct.unpack_from('<I', buf, 88)[0] & 0x1)  # device_caps & V4L2_CAP_VIDEO_CAPTURE\n"
)


def test_the_camera_is_a_v4l2_capture_device(host: Any) -> None:
    if not has_a_kernel(host):
        pytest.skip(NO_KERNEL)
    with host.sudo():
        caps = host.check_output(f"python3 -c {shlex.quote(QUERYCAP)} /dev/video0")
    assert caps == "1"
    assert host.file("/dev/video0").group == "video"


def test_the_runtimes_sandbox_holds_on_the_kernel(host: Any) -> None:
    """systemd's own rating of the unit, and its network namespace as the kernel has it: loopback only."""
    if not has_a_kernel(host):
        pytest.skip(NO_KERNEL)
    if host.run("systemctl cat rover-runtime.service").rc != 0:
        pytest.skip("no rover-runtime.service yet (the first deploy installs it)")
    with host.sudo():
        security = host.check_output("systemd-analyze security --no-pager rover-runtime.service")
        score = re.search(r"Overall exposure level for rover-runtime\.service: (\d+\.\d+)", security)
        assert score, security[-2000:]
        assert float(score.group(1)) <= 2.0, security
        pid = host.check_output("systemctl show -P MainPID rover-runtime.service")
        if pid == "0":
            pytest.skip("rover-runtime is not running")
        links = host.check_output(f"nsenter -t {pid} -n ip -o link").splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"], links
        assert host.check_output(f"readlink /proc/{pid}/ns/ipc") != host.check_output(
            "readlink /proc/1/ns/ipc"
        )


def test_cpu_governor_is_applied_and_persistent(host: Any, settings: dict[str, Any]) -> None:
    unit = host.service("rover-cpu-governor.service")
    assert unit.is_enabled
    # The unit's command names the files it manages; every one of them must hold the governor now.
    exec_start = host.check_output("systemctl show -p ExecStart --value rover-cpu-governor.service")
    match = re.search(r"for f in (\S+); do echo (\w+)", exec_start)
    assert match, exec_start
    pattern, governor = match.groups()
    assert governor == settings["rover_base_cpu_governor"]
    values = host.check_output(f"cat {pattern}").split()
    assert values, f"no files match {pattern}"
    assert set(values) == {governor}


def test_thermal_fact_is_recorded(host: Any, settings: dict[str, Any]) -> None:
    fact_file = host.file("/etc/ansible/facts.d/rover_thermal.fact")
    assert fact_file.is_file
    assert fact_file.mode & 0o111
    local = host.ansible("setup", "filter=ansible_local", check=False)["ansible_facts"]["ansible_local"]
    reading = local["rover_thermal"]
    assert reading["status"] in {"ok", "warn"}
    assert reading["limit_c"] == float(settings["rover_thermal_max_temp_c"])
    assert isinstance(reading["temp_c"], float)
    assert reading["temp_c"] <= reading["limit_c"]


def test_avrdude_can_flash_the_arduino(host: Any) -> None:
    """avrdude (role rover_base) knows the Arduino's MCU and its bootloader's programmer, for the release's
    firmware step (role rover_firmware)."""
    assert host.package("avrdude").is_installed
    parts = host.run("avrdude -c arduino -p '?'")  # lists the parts it knows (on stderr), exit 1
    assert "m328p" in parts.stdout + parts.stderr, parts.stderr[-500:]


def test_time_sync_is_on(host: Any) -> None:
    timesyncd = host.service("systemd-timesyncd.service")
    assert timesyncd.is_enabled
    assert host.file("/etc/systemd/timesyncd.conf.d/rover.conf").contains("^FallbackNTP=")
    in_container = host.run("systemd-detect-virt --container").rc == 0
    if in_container:
        # systemd skips timesyncd in a container (it cannot set the clock); the host syncs it.
        condition = host.check_output("systemctl show -p ConditionResult --value systemd-timesyncd.service")
        assert condition == "no"
    else:
        assert timesyncd.is_running, host.run("journalctl -u systemd-timesyncd -n 20 --no-pager").stdout


def test_car_trusts_the_bundle_signing_key(host: Any, settings: dict[str, Any]) -> None:
    """Signed bundles: the allowed signers file each new release's manifest signature is checked against."""
    allowed = host.file(settings["rover_release_allowed_signers"])
    assert allowed.is_file
    assert allowed.user == "root"
    assert allowed.mode == 0o644
    keys = [line for line in allowed.content_string.splitlines() if line and not line.startswith("#")]
    assert len(keys) == 1 + len(settings["rover_release_trusted_keys"])
    identity = settings["rover_release_signer_identity"]
    # Bundle signatures only: pull mode's publications are signed by the update repository's keys (TUF).
    prefix = f'{identity} namespaces="{settings["rover_release_signature_namespace"]}" '
    assert all(line.startswith(prefix + "ssh-") for line in keys), keys
    assert host.exists("ssh-keygen")


def test_node_exporter_runs_sandboxed_and_serves_the_cars_metrics(
    host: Any, settings: dict[str, Any]
) -> None:
    """Role rover_node_exporter: Debian's exporter, enabled, on the car's address and port, sandboxed, its
    textfile collector reading the runtime's metrics directory without errors."""
    service = host.service("prometheus-node-exporter")
    assert service.is_running
    assert service.is_enabled
    address, port = settings["rover_node_exporter_listen_address"], int(settings["rover_node_exporter_port"])
    assert host.socket(f"tcp://{address}:{port}").is_listening
    shown = host.check_output(
        "systemctl show -p User -p NoNewPrivileges -p ProtectSystem -p CapabilityBoundingSet -p MemoryMax "
        "-p PrivateDevices prometheus-node-exporter"
    )
    props = dict(line.split("=", 1) for line in shown.splitlines())
    assert props["User"] == "prometheus"
    assert (props["NoNewPrivileges"], props["ProtectSystem"], props["PrivateDevices"]) == (
        "yes",
        "strict",
        "yes",
    )
    assert props["CapabilityBoundingSet"] == ""
    assert int(props["MemoryMax"]) == 64 * 1024 * 1024
    url = f"http://{'127.0.0.1' if address in ('0.0.0.0', '::') else address}:{port}/metrics"
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    body = host.check_output(f"python3 -c {shlex.quote(fetch)}")
    assert "node_textfile_scrape_error 0" in body
    assert 'node_systemd_unit_state{name="prometheus-node-exporter.service",state="active"' in body
