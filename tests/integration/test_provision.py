"""`ansible-playbook playbooks/provision.yml` for real against the simulated fleet: a clean run and the bad
inputs (unreachable car, unsupported OS, release or architecture, tampered wheelhouse, a car Python without
the wheels it needs, hot car, wrongly typed inventory variable); and a fleet mixing Debian trixie and
bookworm cars provisioned in one run. A second run that changes nothing and check mode, on a mixed fleet
of the same kind: `molecule test` (molecule/default: idempotence, check), a stage of `make test`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    RELEASES,
    REPO,
    PlaybookRun,
    car,
    content_hash,
    current_bundle,
    make_bundle,
    metrics,
    playbook_command,
    playbook_env,
    releases,
    run_infra_suite,
    run_playbook,
)

from rover_runtime.testing import write_tiny_bundle
from simfleet.fleet import set_thermal
from simfleet.host import DEFAULT_THERMAL
from simfleet.pi_tools import ThermalReading
from simfleet.state import FleetState
from simfleet.testing import free_port, running_fleet

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

PLAYBOOK = "provision.yml"
# Ports of this module's own fleets, after the session fleet's ($SIMFLEET_TEST_BASE_PORT, default 2321).
BASE_PORT = int(os.environ.get("SIMFLEET_TEST_BASE_PORT", "2321"))
SUPPORTED = "supported: Debian bookworm/trixie on aarch64, x86_64"
FAILED = "[ERROR]: Task failed: Action failed:"
WHEELHOUSE_CACHE = Path(os.environ.get("ROVER_CACHE") or Path.home() / ".cache" / "rover") / "wheelhouse"


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
        assert recap[name]["failed"] == 0, run.report()
        assert recap[name]["unreachable"] == 0, run.report()


def changed_on_cars(run: PlaybookRun) -> list[str]:
    """Results of tasks that changed a car (not the controller: "changed: [car1 -> localhost]")."""
    return [
        line
        for line in run.stdout.splitlines()
        if line.startswith("changed: [") and "-> localhost]" not in line
    ]


def error_lines(run: PlaybookRun) -> list[str]:
    """ansible-core's one-line summaries of the failed tasks ("[ERROR]: Task failed: ...")."""
    return [line for line in run.stdout.splitlines() if line.startswith("[ERROR]: Task failed")]


@pytest.fixture(scope="module")
def first_run(fleet_provisioned: PlaybookRun) -> PlaybookRun:
    """The session's first provisioning of its fleet (the other fleet tests share it)."""
    return fleet_provisioned


def test_first_run_provisions_every_car(first_run: PlaybookRun, sim_fleet: FleetState) -> None:
    assert_ok(first_run, cars(sim_fleet))
    assert f"ready ({len(sim_fleet.hosts)}/{len(sim_fleet.hosts)})" in first_run.stdout
    host = car(Path(sim_fleet.inventory), sim_fleet.hosts[0].name)
    assert host.file("/opt/rover/venv/bin/python").exists


def test_the_testinfra_suite_passes_on_the_provisioned_fleet(
    first_run: PlaybookRun, sim_fleet: FleetState
) -> None:
    """The suite a user runs against a real fleet (tests/infra), on every car of the session's fleet: only
    the checks a container cannot answer (udev, the camera device, the kernel's view of the sandbox: the VM
    stage runs them) and torch where the car has none may skip."""
    run = run_infra_suite(Path(sim_fleet.inventory))
    assert run.rc == 0, run.report()
    passed = re.findall(r"^PASSED ", run.stdout, re.MULTILINE)
    assert len(passed) >= 10 * len(sim_fleet.hosts), run.report()
    allowed = ("a container car has no kernel or udev of its own", "no torch", "torch")
    for skipped in re.findall(r"^SKIPPED \[\d+\] (.*)$", run.stdout, re.MULTILINE):
        assert any(reason in skipped for reason in allowed), skipped


@pytest.mark.parametrize("transfer", ["http", "copy"])
def test_a_car_that_lost_wheels_gets_them_back(
    first_run: PlaybookRun, sim_fleet: FleetState, transfer: str
) -> None:
    """A wheel gone from the car's wheelhouse (a full SD card, a hand): the next install puts back what is
    missing, over HTTP from the controller's server (the default; the other wheels are not fetched again)
    or with copy, and the server of the run is gone afterwards."""
    name = cars(sim_fleet)[0]
    host = car(Path(sim_fleet.inventory), name)
    (house,) = host.check_output("ls -d /opt/rover/wheelhouse/*").split()
    wheels = host.check_output(f"ls {house}").split()
    lost = next(w for w in wheels if w.startswith("pyserial-"))
    kept = next(w for w in wheels if w.startswith("onnxruntime-"))
    inode = host.check_output(f"stat -c %i {house}/{kept}")
    assert host.run(f"rm {house}/{lost}").rc == 0
    run = provision(
        sim_fleet,
        "--limit",
        name,
        "-e",
        "rover_python_force_install=true",
        "-e",
        f"rover_python_wheelhouse_transfer={transfer}",
    )
    assert run.rc == 0, run.report()
    task = (
        "Fetch the wheelhouse from the controller over HTTP" if transfer == "http" else "Push the wheelhouse"
    )
    assert re.search(
        rf"TASK \[rover_python : {task}[^\n]*\]\s*\*+\n(?:(?!TASK ).*\n)*?changed: \[{name}\]", run.stdout
    ), run.report()
    assert host.run(f"cd {house} && sha256sum --check --strict --quiet SHA256SUMS").rc == 0
    if transfer == "http":
        assert host.check_output(f"stat -c %i {house}/{kept}") == inode  # only the lost wheel moved
    assert_no_server_outlives_its_run()


def alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphaned_servers() -> list[str]:
    """Wheelhouse servers still serving whose provisioning run has ended: each server's ready file names its
    pid and its run's (ansible-playbook's). A file whose server is gone (one killed with SIGKILL leaves it)
    does not count, nor does a server of a run still going (CI's arm64 stage provisions beside this one)."""
    found = []
    for ready in WHEELHOUSE_CACHE.glob(".server-*.json"):
        try:
            info = json.loads(ready.read_text())
        except (OSError, ValueError):
            continue  # removed or being written meanwhile
        if alive(info.get("pid")) and not alive(info.get("run_pid")):
            found.append(f"{ready.name}: {info}")
    return found


def assert_no_server_outlives_its_run(timeout: float = 60) -> None:
    """A server stops within a second or so of its run ending; the timeout is a hang guard (a CI run at
    load 5 took > 10 s for a server's last poll)."""
    deadline = time.monotonic() + timeout
    while found := orphaned_servers():
        assert time.monotonic() < deadline, f"a wheelhouse server outlived its run: {found}"
        time.sleep(0.2)


def test_ctrl_c_during_provisioning_leaves_no_wheelhouse_server(
    first_run: PlaybookRun, sim_fleet: FleetState
) -> None:
    """Ctrl-C in the operator's terminal once the run's wheelhouse server is up: the run never reaches the
    task that stops the server, which stops by itself once the run's ansible-playbook has ended (it listened
    on every address for up to an hour before)."""
    inventory = Path(sim_fleet.inventory)
    before = set(WHEELHOUSE_CACHE.glob(".server-*.json"))
    run = subprocess.Popen(
        ["env", "--default-signal=INT", *playbook_command(
            inventory, PLAYBOOK, "--limit", cars(sim_fleet)[0], "-e", "rover_python_force_install=true",
        )],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=playbook_env(inventory),
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not (ours := [r for r in set(WHEELHOUSE_CACHE.glob(".server-*.json")) - before if r.exists()]):
            assert run.poll() is None, (run.communicate()[0] or "")[-4000:]
            assert time.monotonic() < deadline, "the run's wheelhouse server never started"
            time.sleep(0.2)
        info = json.loads(ours[0].read_text())
        assert info["run_pid"] == run.pid, info  # the server knows its run: ansible-playbook itself
        os.killpg(run.pid, signal.SIGINT)  # the terminal's Ctrl-C: to the whole process group
        out, _ = run.communicate(timeout=300)  # a hang guard
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode != 0, out[-3000:]
    assert_no_server_outlives_its_run()
    # The server removes its ready file before its process has ended (a CI run saw it still there just
    # after): its process ends too, the deadline a hang guard.
    deadline = time.monotonic() + 60
    while alive(info["pid"]):
        assert time.monotonic() < deadline, f"the interrupted run's server is still up: {info}"
        time.sleep(0.2)


def test_unreachable_car_does_not_stop_the_others(
    first_run: PlaybookRun, sim_fleet: FleetState, tmp_path: Path
) -> None:
    ghost = {"ghost": {"ansible_host": "127.0.0.1", "ansible_port": free_port(), "ansible_user": "pi"}}
    run = provision(sim_fleet, extra=extra_inventory(tmp_path / "ghost.yml", ghost))
    assert run.rc != 0, run.report()
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
    assert run.rc != 0, run.report()
    assert run.recap()[bad]["failed"] == 1
    assert_ok(run, [good])
    release = next(host.release for host in sim_fleet.hosts if host.name == bad)
    narrowed_message = SUPPORTED.replace(", x86_64", "")
    assert f"{bad}: unsupported host: Debian {release} on x86_64; {narrowed_message}" in run.text, (
        run.report()
    )


@contextmanager
def pretending(inventory: Path, name: str, os_release: str) -> Iterator[None]:
    """The car `name` pretends to run another OS (its /etc/os-release), restored afterwards."""
    host = car(inventory, name)
    host.check_output("mv /etc/os-release /etc/os-release.rover-test")
    try:
        host.check_output(f"printf %s {shlex.quote(os_release)} > /etc/os-release")
        yield
    finally:
        host.check_output("mv -f /etc/os-release.rover-test /etc/os-release")


UBUNTU_JAMMY = (
    'NAME=Ubuntu\nID=ubuntu\nID_LIKE=debian\nVERSION_ID="22.04"\nVERSION_CODENAME=jammy\n'
    'PRETTY_NAME="Ubuntu 22.04 LTS"\n'
)
DEBIAN_BULLSEYE = (
    'PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\nNAME="Debian GNU/Linux"\nVERSION_ID="11"\n'
    'VERSION="11 (bullseye)"\nVERSION_CODENAME=bullseye\nID=debian\n'
)


def test_unsupported_os_is_stopped_by_preflight(first_run: PlaybookRun, sim_fleet: FleetState) -> None:
    ubuntu_car = cars(sim_fleet)[-1]
    with pretending(Path(sim_fleet.inventory), ubuntu_car, UBUNTU_JAMMY):
        run = provision(sim_fleet, "--tags", "preflight")
    assert run.rc != 0, run.report()
    assert run.recap()[ubuntu_car]["failed"] == 1
    assert_ok(run, [name for name in cars(sim_fleet) if name != ubuntu_car])
    assert f"{ubuntu_car}: unsupported host: Ubuntu jammy on x86_64; {SUPPORTED}" in run.text, run.report()


def test_unsupported_debian_release_gets_one_error_line_and_no_change(
    first_run: PlaybookRun, sim_fleet: FleetState
) -> None:
    """A whole provisioning run: the bullseye car stops at preflight with one line naming the supported
    releases and is not changed; the other cars are provisioned as usual."""
    old_car = cars(sim_fleet)[0]
    with pretending(Path(sim_fleet.inventory), old_car, DEBIAN_BULLSEYE):
        run = provision(sim_fleet)
    assert run.rc != 0, run.report()
    recap = run.recap()
    assert recap[old_car]["failed"] == 1
    assert recap[old_car]["changed"] == 0
    assert_ok(run, [name for name in cars(sim_fleet) if name != old_car])
    assert error_lines(run) == [
        f"{FAILED} {old_car}: unsupported host: Debian bullseye on x86_64; {SUPPORTED}"
    ]
    assert f"NOT ready (1): {old_car}" in run.stdout


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
    victim = tampered_wheelhouse(WHEELHOUSE_CACHE, tmp_path / "wheelhouse")
    run = provision(
        sim_fleet, "--tags", "rover_python", "-e", f"rover_python_wheelhouse_root={tmp_path / 'wheelhouse'}"
    )
    assert run.rc != 0, run.report()
    # One line for the whole run, before any car is touched: every car stops.
    (line,) = error_lines(run)
    assert "wheelhouse refused:" in line
    assert f"{victim} has sha256" in line
    assert "SHA256SUMS says" in line
    assert line.endswith("stopped before any change on any car")
    recap = run.recap()
    assert all(recap[name]["changed"] == 0 for name in cars(sim_fleet)), recap
    assert "ready (" not in run.stdout  # no car got past the wheelhouse


def test_car_python_without_a_wheel_stops_the_run_before_any_change(
    first_run: PlaybookRun, sim_fleet: FleetState, tmp_path: Path
) -> None:
    """numpy 1.22.4 has wheels for CPython 3.8-3.10 only: the first car's Python (3.11 on bookworm, 3.13 on
    trixie) has none. The run stops with one line naming the car, its Python and the package; nothing
    changes on any car (the controller's wheelhouse cache included)."""
    bad = cars(sim_fleet)[0]
    release = next(host.release for host in sim_fleet.hosts if host.name == bad)
    python = {"trixie": "3.13", "bookworm": "3.11"}[release]
    pins = {bad: {"rover_python_requirements": ["numpy==1.22.4", "pyserial==3.5", "onnxruntime==1.32.0"]}}
    before = sorted(WHEELHOUSE_CACHE.glob("*/*"))
    run = provision(sim_fleet, extra=extra_inventory(tmp_path / "pins.yml", pins))
    assert run.rc != 0, run.report()
    assert error_lines(run) == [
        f"{FAILED} {bad} (Python {python} on x86_64): wheelhouse refused: no wheel of numpy==1.22.4"
        f" for CPython {python} on manylinux_2_28_x86_64, manylinux_2_17_x86_64, "
        "manylinux2014_x86_64; stopped before any change on any car"
    ]
    recap = run.recap()
    assert all(recap[name]["changed"] == 0 for name in cars(sim_fleet)), recap
    assert sorted(WHEELHOUSE_CACHE.glob("*/*")) == before, "the wheelhouse cache changed"


def test_inventory_values_reach_the_cars_commands_as_data_not_shell(
    first_run: PlaybookRun, sim_fleet: FleetState
) -> None:
    """A value with shell syntax in it (a typo, or a hostile inventory) is passed and stored as one word."""
    name = cars(sim_fleet)[0]
    host = car(Path(sim_fleet.inventory), name)
    host.run("rm -f /tmp/pwned")
    hostile = "/sys/class/thermal/thermal_zone0/temp $(touch /tmp/pwned); touch /tmp/pwned"
    try:
        run = provision(
            sim_fleet,
            "--limit",
            name,
            "--tags",
            "rover_thermal",
            "-e",
            f"rover_thermal_sysfs_path={hostile!r}",
        )
        assert_ok(run, [name])
        host.run("sh -c '. /etc/rover/thermal.conf; echo \"$sysfs\"' > /tmp/sysfs-read")
        assert host.file("/tmp/sysfs-read").content_string.strip() == hostile
        host.run("/etc/ansible/facts.d/rover_thermal.fact")
        assert not host.file("/tmp/pwned").exists
    finally:
        provision(sim_fleet, "--limit", name, "--tags", "rover_thermal")
        host.run("rm -f /tmp/pwned /tmp/sysfs-read")


def test_a_car_renamed_by_hand_provisions_and_resolves_its_name_again(
    first_run: PlaybookRun, sim_fleet: FleetState
) -> None:
    """A Pi renamed by hand (a new /etc/hostname, /etc/hosts left as it was): every sudo warns that it cannot
    resolve the host; provisioning still works and puts the name back on 127.0.1.1."""
    name = cars(sim_fleet)[-1]
    host = car(Path(sim_fleet.inventory), name)
    old = host.check_output("hostname").strip()
    host.check_output("hostname renamed-by-hand && echo renamed-by-hand > /etc/hostname")
    host.check_output("sed -i '/^127.0.1.1/d' /etc/hosts")
    try:
        assert "unable to resolve host renamed-by-hand" in host.run("sudo -u pi sudo -n true").stderr
        run = provision(sim_fleet, "--limit", name)
        assert_ok(run, [name])
        assert "127.0.1.1\trenamed-by-hand" in host.file("/etc/hosts").content_string.splitlines()
        assert host.run("sudo -u pi sudo -n true").stderr == ""
        again = provision(sim_fleet, "--limit", name, "--tags", "rover_base_hosts")
        assert_ok(again, [name])
        assert changed_on_cars(again) == []
    finally:
        host.run(
            f"hostname {old} && echo {old} > /etc/hostname && sed -i 's/renamed-by-hand/{old}/' /etc/hosts"
        )


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
    assert run.rc != 0, run.report()
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
    assert run.rc == 0, run.report()
    assert f"WARNING: {name}: 72.5 °C (warn at 70.0, limit 80.0)" in " ".join(run.stdout.split())
    assert '"status": "warn", "temp_c": 72.5' in local_fact


def test_wrongly_typed_inventory_variable_is_rejected(
    first_run: PlaybookRun, sim_fleet: FleetState, tmp_path: Path
) -> None:
    bad, good = cars(sim_fleet)[:2]
    typo = {bad: {"rover_thermal_max_temp_c": "very hot"}}
    run = provision(sim_fleet, "--tags", "rover_thermal", extra=extra_inventory(tmp_path / "typo.yml", typo))
    assert run.rc != 0, run.report()
    assert run.recap()[bad]["failed"] == 1
    assert_ok(run, [good])
    flat = " ".join(run.stdout.split())
    assert "rover_thermal_max_temp_c" in flat
    assert "float" in flat


MIXED_FLEET = os.environ.get("SIMFLEET_TEST_NAME", "pytest") + "-provision-mixed"
# car1 runs trixie (Python 3.13, systemd 257), car2 bookworm (Python 3.11, systemd 252).
MIXED = {"car1": ("trixie", "3.13"), "car2": ("bookworm", "3.11")}


@pytest.fixture(scope="module")
def mixed_fleet() -> Iterator[FleetState]:
    """This module's own fleet of two fresh cars, one per release. The tests below run in order: the bad
    input first, on cars nothing has touched yet."""
    with running_fleet(
        MIXED_FLEET, hosts=2, base_port=BASE_PORT + 80, releases=[release for release, _ in MIXED.values()]
    ) as fleet:
        yield fleet


def untouched(inventory: Path, name: str) -> list[str]:
    """What provisioning would have left on a fresh car (empty when nothing is there)."""
    host = car(inventory, name)
    found = [path for path in ("/opt/rover", "/etc/ansible/facts.d", "/etc/rover") if host.file(path).exists]
    if host.user("rover").exists:
        found.append("user rover")
    return found


def test_mixed_fleet_car_without_a_wheel_stops_the_run_before_any_change(
    mixed_fleet: FleetState, tmp_path: Path
) -> None:
    """onnxruntime 1.19.2 has wheels for CPython 3.11 (bookworm) but none for 3.13 (trixie): with it pinned
    for the whole fleet, the trixie car's Python lacks a wheel. One line names the car, its Python and the
    package, and neither car is touched."""
    pins = {
        "rover_python_requirements": ["numpy==2.2.6", "pyserial==3.5", "onnxruntime==1.19.2"],
        "rover_python_torch_versions": {},  # (keeps the bookworm car's throwaway wheelhouse small)
    }
    fleet_wide = extra_inventory(tmp_path / "pins.yml", dict.fromkeys(cars(mixed_fleet), pins))
    # A throwaway cache: the bookworm car's wheelhouse for these pins is built there too.
    root = tmp_path / "wheelhouse"
    run = provision(mixed_fleet, "-e", f"rover_python_wheelhouse_root={root}", extra=fleet_wide)
    assert run.rc != 0, run.report()
    assert error_lines(run) == [
        f"{FAILED} car1 (Python 3.13 on x86_64): wheelhouse refused: no wheel of onnxruntime==1.19.2"
        " for CPython 3.13 on manylinux_2_28_x86_64, manylinux_2_17_x86_64, "
        "manylinux2014_x86_64; stopped before any change on any car"
    ]
    # (The bookworm car's wheelhouse was built on the controller; nothing ran on a car.)
    assert changed_on_cars(run) == []
    for name in cars(mixed_fleet):
        assert untouched(Path(mixed_fleet.inventory), name) == [], name


@pytest.fixture(scope="module")
def mixed_run(mixed_fleet: FleetState) -> PlaybookRun:
    run = provision(mixed_fleet)
    assert run.rc == 0, run.report()
    return run


def test_mixed_fleet_is_provisioned_in_one_run(mixed_run: PlaybookRun, mixed_fleet: FleetState) -> None:
    """One run: each car's venv on its own Python, a wheelhouse per Python built on the controller and
    pushed to the car that needs it; torch only where rover_python_torch_versions has an entry (x86_64
    3.11), the trixie car runs ONNX Runtime only. The local fact says which."""
    assert_ok(mixed_run, cars(mixed_fleet))
    assert "ready (2/2): car1, car2" in mixed_run.stdout
    inventory = Path(mixed_fleet.inventory)
    for name, (release, python) in MIXED.items():
        host = car(inventory, name)
        venv_python = host.check_output("/opt/rover/venv/bin/python -c 'import sys; print(sys.version[:4])'")
        assert venv_python == python, name
        (wheelhouse,) = host.check_output("ls /opt/rover/wheelhouse").split()
        assert wheelhouse.startswith(f"cp{python.replace('.', '')}-"), (name, wheelhouse)
        assert list(WHEELHOUSE_CACHE.glob(f"manylinux_2_28_x86_64/{wheelhouse}/SHA256SUMS")), wheelhouse
        fact = json.loads(host.check_output("cat /etc/ansible/facts.d/rover_python.fact"))
        assert fact["python"] == python
        assert fact["onnxruntime"] == "1.32.0"
        has_torch = host.run("/opt/rover/venv/bin/python -c 'import torch'").rc == 0
        if release == "bookworm":
            assert fact["torch"].split("+")[0] == "2.13.0"
            assert fact["engines"] == ["torch", "onnxruntime", "executorch"]
            assert has_torch
        else:
            assert fact["torch"] is None
            assert fact["engines"] == ["onnxruntime", "executorch"]
            assert not has_torch
        assert fact["executorch"].startswith("1.5.1+rover")
    flat = mixed_run.text
    assert "car1: Python 3.13 on x86_64" in flat
    assert "no torch (no entry in rover_python_torch_versions: no TorchScript bundles)" in flat


def test_mixed_fleet_deploy_refuses_a_torch_bundle_on_the_onnx_only_car(
    mixed_run: PlaybookRun, mixed_fleet: FleetState, tmp_path: Path
) -> None:
    """The release's runtime code runs on both Pythons; the unit gets RestartSteps only where systemd
    has it (>= 254: trixie). A TorchScript bundle is refused on the trixie car (no torch) before anything
    there changes, and runs on the bookworm car."""
    inventory = Path(mixed_fleet.inventory)
    force = ("-e", "rover_deploy_force=true")  # a simulated car always drives
    onnx = make_bundle(tmp_path / "onnx", chunk_size=10)
    run = run_playbook(inventory, "deploy.yml", *force, "-e", f"rover_deploy_bundle={onnx}")
    assert run.rc == 0, run.report()
    for name, (release, _) in MIXED.items():
        host = car(inventory, name)
        assert current_bundle(host) == content_hash(onnx), name
        steps = host.check_output("systemctl show -p RestartSteps --value rover-runtime")
        assert steps == ("5" if release == "trixie" else ""), (name, steps)

    torch_bundle = write_tiny_bundle(tmp_path / "torch", "torchscript")
    unit = "/etc/systemd/system/rover-runtime.service"
    before = car(inventory, "car1").check_output(f"stat -c '%Y' {unit} {RELEASES}/releases")
    releases_before = releases(car(inventory, "car1"))
    # car1 (trixie) is the canary: refused, so the rollout stops before car2.
    run = run_playbook(inventory, "deploy.yml", *force, "-e", f"rover_deploy_bundle={torch_bundle}")
    assert run.rc != 0, run.report()
    assert error_lines(run) == [
        f"{FAILED} car1: bundle {content_hash(torch_bundle)[:12]} needs torch, which this car's venv"
        " does not have (Python 3.13 on x86_64 runs onnxruntime, executorch only); deploy a bundle for one"
        " of those, or install torch on the car (rover_python_torch_versions /"
        " rover_python_executorch_version) and provision it again"
    ]
    trixie, bookworm = car(inventory, "car1"), car(inventory, "car2")
    assert run.recap()["car1"]["changed"] == 0
    assert current_bundle(trixie) == content_hash(onnx)
    assert not trixie.file(f"{RELEASES}/bundles/{content_hash(torch_bundle)}").exists
    assert releases(trixie) == releases_before
    assert trixie.check_output(f"stat -c '%Y' {unit} {RELEASES}/releases") == before
    assert current_bundle(bookworm) == content_hash(onnx)

    run = run_playbook(
        inventory, "deploy.yml", *force, "-e", f"rover_deploy_bundle={torch_bundle}", "--limit", "car2"
    )
    assert run.rc == 0, run.report()
    assert current_bundle(bookworm) == content_hash(torch_bundle)
    assert metrics(bookworm)["bundle"]["content_hash"] == content_hash(torch_bundle)


# The emulated arm64 trixie car (provision, deploy, one inference): tests/integration/test_arm64_car.py.
