"""`ansible-playbook playbooks/provision.yml` for real against the simulated fleet: a clean run, a second
run with changed=0, check mode, and the bad inputs (unreachable car, unsupported OS or architecture,
tampered wheelhouse, hot car, wrongly typed inventory variable)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml
from deploy_helpers import PlaybookRun, car, run_playbook

from simfleet.fleet import set_thermal
from simfleet.host import DEFAULT_THERMAL
from simfleet.pi_tools import ThermalReading
from simfleet.state import FleetState
from simfleet.testing import running_fleet

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

PLAYBOOK = "provision.yml"


def cars(fleet: FleetState) -> list[str]:
    return [host.name for host in fleet.hosts]


def extra_inventory(path: Path, hosts: Mapping[str, Mapping[str, object]]) -> Path:
    """A second inventory source that adds hosts or host variables to the `rovers` group."""
    path.write_text(yaml.safe_dump({"all": {"children": {"rovers": {"hosts": hosts}}}}))
    return path


def provision(fleet: FleetState, *args: str, extra: Path | None = None) -> PlaybookRun:
    more = ("-i", str(extra)) if extra else ()
    return run_playbook(Path(fleet.inventory), PLAYBOOK, *more, *args)


def assert_ok(run: PlaybookRun, hosts: list[str]) -> None:
    recap = run.recap()
    for name in hosts:
        assert recap[name]["failed"] == 0, run.stdout[-4000:]
        assert recap[name]["unreachable"] == 0, run.stdout[-4000:]


@pytest.fixture(scope="module")
def first_run(sim_fleet: FleetState) -> PlaybookRun:
    run = provision(sim_fleet)
    assert run.rc == 0, run.stdout[-6000:]
    return run


def test_first_run_provisions_every_car(first_run: PlaybookRun, sim_fleet: FleetState) -> None:
    assert_ok(first_run, cars(sim_fleet))
    assert f"ready ({len(sim_fleet.hosts)}/{len(sim_fleet.hosts)})" in first_run.stdout
    host = car(Path(sim_fleet.inventory), sim_fleet.hosts[0].name)
    assert host.file("/opt/rover/venv/bin/python").exists


def test_second_run_changes_nothing(first_run: PlaybookRun, sim_fleet: FleetState) -> None:
    second = provision(sim_fleet)
    assert second.rc == 0, second.stdout[-4000:]
    assert_ok(second, cars(sim_fleet))
    for name in cars(sim_fleet):
        assert second.recap()[name]["changed"] == 0, second.stdout[-6000:]


def test_check_mode_runs_and_reports_no_change(first_run: PlaybookRun, sim_fleet: FleetState) -> None:
    check = provision(sim_fleet, "--check")
    assert check.rc == 0, check.stdout[-4000:]
    for name in cars(sim_fleet):
        assert check.recap()[name]["changed"] == 0, check.stdout[-6000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_car_does_not_stop_the_others(
    first_run: PlaybookRun, sim_fleet: FleetState, tmp_path: Path
) -> None:
    ghost = {"ghost": {"ansible_host": "127.0.0.1", "ansible_port": free_port(), "ansible_user": "pi"}}
    run = provision(sim_fleet, extra=extra_inventory(tmp_path / "ghost.yml", ghost))
    assert run.rc != 0
    recap = run.recap()
    assert recap["ghost"]["unreachable"] == 1
    assert_ok(run, cars(sim_fleet))
    assert "NOT ready (1): ghost" in run.stdout
    assert f"ready ({len(sim_fleet.hosts)}/{len(sim_fleet.hosts) + 1})" in run.stdout


def test_unsupported_architecture_is_stopped_by_preflight(
    first_run: PlaybookRun, sim_fleet: FleetState, tmp_path: Path
) -> None:
    bad, good = cars(sim_fleet)[:2]
    narrowed = {bad: {"preflight_supported_architectures": ["aarch64"]}}
    run = provision(sim_fleet, "--tags", "preflight", extra=extra_inventory(tmp_path / "arch.yml", narrowed))
    assert run.rc != 0
    assert run.recap()[bad]["failed"] == 1
    assert_ok(run, [good])
    assert f"{bad}: unsupported host: Debian bookworm on x86_64; supported: Debian bookworm on aarch64" in (
        " ".join(run.stdout.split())
    )


@pytest.fixture
def ubuntu_car(sim_fleet: FleetState) -> Iterator[str]:
    """The last car pretends to be Ubuntu jammy (its /etc/os-release), restored afterwards."""
    name = cars(sim_fleet)[-1]
    host = car(Path(sim_fleet.inventory), name)
    host.check_output("mv /etc/os-release /etc/os-release.rover-test")
    host.check_output(
        'printf \'NAME=Ubuntu\\nID=ubuntu\\nID_LIKE=debian\\nVERSION_ID="22.04"\\n'
        'VERSION_CODENAME=jammy\\nPRETTY_NAME="Ubuntu 22.04 LTS"\\n\' > /etc/os-release'
    )
    try:
        yield name
    finally:
        host.check_output("mv -f /etc/os-release.rover-test /etc/os-release")


def test_unsupported_os_is_stopped_by_preflight(
    first_run: PlaybookRun, sim_fleet: FleetState, ubuntu_car: str
) -> None:
    run = provision(sim_fleet, "--tags", "preflight")
    assert run.rc != 0
    assert run.recap()[ubuntu_car]["failed"] == 1
    assert_ok(run, [name for name in cars(sim_fleet) if name != ubuntu_car])
    assert f"{ubuntu_car}: unsupported host: Ubuntu jammy on x86_64" in " ".join(run.stdout.split())


def tampered_wheelhouse(source: Path, target: Path, victim_prefix: str = "pyserial-") -> str:
    """A copy of the wheelhouse cache (symlinks) where one small wheel has a byte appended."""
    victim = ""
    for directory in source.glob("*/cp*-*"):
        copy = target / directory.relative_to(source)
        copy.mkdir(parents=True)
        for item in directory.iterdir():
            if item.name.startswith(victim_prefix):
                shutil.copyfile(item, copy / item.name)
                with (copy / item.name).open("ab") as handle:
                    handle.write(b"\0")
                victim = item.name
            else:
                (copy / item.name).symlink_to(item)
    assert victim, f"no {victim_prefix}* wheel under {source}"
    return victim


def test_wheelhouse_file_with_wrong_hash_is_refused(
    first_run: PlaybookRun, sim_fleet: FleetState, tmp_path: Path
) -> None:
    source = Path(os.environ.get("ROVER_CACHE") or Path.home() / ".cache" / "rover") / "wheelhouse"
    victim = tampered_wheelhouse(source, tmp_path / "wheelhouse")
    run = provision(
        sim_fleet, "--tags", "rover_python", "-e", f"rover_python_wheelhouse_root={tmp_path / 'wheelhouse'}"
    )
    assert run.rc != 0
    for name in cars(sim_fleet):
        assert run.recap()[name]["failed"] == 1
    flat = " ".join(run.stdout.split())
    assert "wheelhouse for x86_64 refused:" in flat
    assert f"{victim} has sha256" in flat
    assert "SHA256SUMS says" in flat


@pytest.fixture
def hot_car(sim_fleet: FleetState) -> Iterator[str]:
    name = cars(sim_fleet)[0]
    set_thermal(sim_fleet.name, name, ThermalReading(temp_c=85.0, throttled="0x20002"))
    try:
        yield name
    finally:
        set_thermal(sim_fleet.name, name, DEFAULT_THERMAL)


def test_car_over_the_thermal_limit_fails_with_its_reading(
    first_run: PlaybookRun, sim_fleet: FleetState, hot_car: str
) -> None:
    run = provision(sim_fleet, "--tags", "rover_thermal")
    assert run.rc != 0
    assert run.recap()[hot_car]["failed"] == 1
    others = [name for name in cars(sim_fleet) if name != hot_car]
    assert_ok(run, others)
    flat = " ".join(run.stdout.split())
    assert f"{hot_car}: 85.0 °C is above the limit of 80.0 °C (throttled=0x20002, read with vcgencmd)" in flat


def test_warm_car_gets_a_warning_and_its_reading_is_recorded(
    first_run: PlaybookRun, sim_fleet: FleetState
) -> None:
    name = cars(sim_fleet)[0]
    set_thermal(sim_fleet.name, name, ThermalReading(temp_c=72.5))
    try:
        run = provision(sim_fleet, "--tags", "rover_thermal")
        host = car(Path(sim_fleet.inventory), name)
        local_fact = host.check_output("/etc/ansible/facts.d/rover_thermal.fact")
    finally:
        set_thermal(sim_fleet.name, name, DEFAULT_THERMAL)
    assert run.rc == 0, run.stdout[-4000:]
    assert f"WARNING: {name}: 72.5 °C (warn at 70.0, limit 80.0)" in " ".join(run.stdout.split())
    assert '"status": "warn", "temp_c": 72.5' in local_fact


def test_wrongly_typed_inventory_variable_is_rejected(
    first_run: PlaybookRun, sim_fleet: FleetState, tmp_path: Path
) -> None:
    bad, good = cars(sim_fleet)[:2]
    typo = {bad: {"rover_thermal_max_temp_c": "very hot"}}
    run = provision(sim_fleet, "--tags", "rover_thermal", extra=extra_inventory(tmp_path / "typo.yml", typo))
    assert run.rc != 0
    assert run.recap()[bad]["failed"] == 1
    assert_ok(run, [good])
    flat = " ".join(run.stdout.split())
    assert "rover_thermal_max_temp_c" in flat
    assert "float" in flat


ARM64_FLEET = os.environ.get("SIMFLEET_TEST_NAME", "pytest") + "-provision-arm64"


@pytest.mark.arm64
def test_arm64_car_gets_the_aarch64_cpu_torch_with_qnnpack() -> None:
    """The real target architecture (through qemu-user): the aarch64 wheelhouse is built on this x86_64
    controller, installed offline on the car, and torch's qnnpack engine runs there."""
    with running_fleet(ARM64_FLEET, hosts=1, arch="arm64", base_port=2391) as fleet:
        run = provision(fleet)
        assert run.rc == 0, run.stdout[-6000:]
        assert_ok(run, cars(fleet))
        host = car(Path(fleet.inventory), cars(fleet)[0])
        wheel = host.check_output("ls /opt/rover/wheelhouse/*/torch-*.whl")
        report = host.check_output(
            "/opt/rover/venv/bin/python -c 'import json, platform, torch; "
            'torch.backends.quantized.engine = "qnnpack"; '
            "print(json.dumps([platform.machine(), torch.__version__, "
            "torch.backends.quantized.supported_engines]))'"
        )
    machine, version, engines = json.loads(report.splitlines()[-1])
    assert "manylinux_2_28_aarch64" in wheel
    assert machine == "aarch64"
    assert version.split("+")[0] == "2.10.0"  # PyPI's aarch64 CPU wheel reports 2.10.0+cpu
    assert "qnnpack" in engines
