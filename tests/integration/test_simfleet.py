"""The simulated fleet (simfleet): real systemd-nspawn hosts with systemd, sshd, sudo, a serial stand-in
wired to the firmware simulator, and a vcgencmd stand-in. See docs/simulation.md."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rover_runtime.protocol import Ack, Command, Telemetry, encode, parse_line
from simfleet import fleet
from simfleet.errors import SimFleetError
from simfleet.fleet import FleetConfig, set_thermal, target_for, up
from simfleet.host_root import mounts_under
from simfleet.paths import fleet_dir
from simfleet.pi_tools import CPUFREQ_ROOT, THERMAL_ZONE_TEMP, ThermalReading
from simfleet.processes import is_alive
from simfleet.ssh import ssh_run
from simfleet.state import FleetState, HostState, load_state
from simfleet.testing import fleet_lock, running_fleet


@pytest.fixture(scope="module")
def sim_fleet() -> Iterator[FleetState]:
    """This module's own two cars (fleet "pytest-simfleet", ports 2331-2332), overriding the session fleet:
    these tests check pristine hosts (governor, serial line counts), which the session fleet no longer is
    once the playbook tests have provisioned and deployed to it."""
    with running_fleet("pytest-simfleet", hosts=2, base_port=2331) as state:
        yield state


def run_on(fleet: FleetState, host: HostState, command: str, timeout: float = 60) -> str:
    result = ssh_run(target_for(fleet, host), [command], timeout=timeout)
    assert result.returncode == 0, f"{host.name}: {command!r} failed ({result.returncode}): {result.stderr}"
    return result.stdout.strip()


def read_status(host: HostState) -> dict[str, object]:
    return json.loads(Path(host.firmware_status).read_text())


# ---- bad input: refused before anything starts (no fleet needed) ----
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad_Name"}, "--name"),
        ({"hosts": 0}, "--hosts 0"),
        ({"hosts": 17}, "--hosts 17"),
        ({"arch": "riscv64"}, "--arch"),
        ({"base_port": 80}, "--base-port 80"),
    ],
)
def test_config_rejects_bad_options(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SimFleetError, match=message):
        FleetConfig(**kwargs)


def test_up_refuses_a_port_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROVER_CACHE", str(tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SimFleetError, match=rf"port\(s\) \[{port}\] in use"):
            up(FleetConfig(name="pytest-busy", hosts=1, base_port=port, inventory=tmp_path / "hosts.yml"))
    assert load_state("pytest-busy") is None


def test_a_fleet_in_use_by_another_session_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROVER_CACHE", str(tmp_path))
    message = rf"in use by another test session \(pid {os.getpid()}\)"
    with fleet_lock("pytest-lock"), pytest.raises(SimFleetError, match=message), fleet_lock("pytest-lock"):
        pass
    with fleet_lock("pytest-lock"):  # released at the end of the block
        pass


@pytest.mark.parametrize(("temp", "throttled"), [(130.0, "0x0"), (50.0, "50005"), (50.0, "0xZZ")])
def test_thermal_reading_rejects_bad_values(temp: float, throttled: str) -> None:
    with pytest.raises(SimFleetError):
        ThermalReading(temp_c=temp, throttled=throttled)


# ---- the session fleet ----


@pytest.mark.fleet
@pytest.mark.parametrize("index", [0, 1])
def test_pi_logs_in_with_passwordless_sudo(sim_fleet: FleetState, index: int) -> None:
    host = sim_fleet.hosts[index]
    assert run_on(sim_fleet, host, "id -un; hostname") == f"pi\n{host.name}"
    assert run_on(sim_fleet, host, "sudo -n id -u") == "0"
    groups = run_on(sim_fleet, host, "id -Gn").split()
    assert {"sudo", "dialout", "video"} <= set(groups)


@pytest.mark.fleet
def test_systemd_is_pid1_and_the_system_is_running(sim_fleet: FleetState) -> None:
    for host in sim_fleet.hosts:
        assert run_on(sim_fleet, host, "cat /proc/1/comm") == "systemd"
        result = ssh_run(target_for(sim_fleet, host), ["systemctl is-system-running --wait"], timeout=60)
        assert result.stdout.strip() in ("running", "degraded"), result.stdout + result.stderr
        assert run_on(sim_fleet, host, "systemctl is-active ssh") == "active"


@pytest.mark.fleet
def test_sshd_listens_on_loopback_only(sim_fleet: FleetState) -> None:
    for host in sim_fleet.hosts:
        listeners = subprocess.run(
            ["ss", "-ltnH", f"sport = :{host.port}"], capture_output=True, text=True, check=True
        ).stdout
        addresses = {line.split()[3] for line in listeners.splitlines()}
        assert addresses == {f"127.0.0.1:{host.port}"}


@pytest.mark.fleet
def test_ansible_reaches_every_host_through_the_inventory(sim_fleet: FleetState, tmp_path: Path) -> None:
    ansible = Path(sys.executable).parent / "ansible"
    result = subprocess.run(
        [
            str(ansible),
            "-i",
            sim_fleet.inventory,
            "rovers",
            "-b",
            "-m",
            "ansible.builtin.command",
            "-a",
            "id -u",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # no project ansible.cfg: the inventory alone must be enough
        env={**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp")},
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for host in sim_fleet.hosts:
        assert f"{host.name} | CHANGED | rc=0 >>\n0\n" in result.stdout


@pytest.mark.fleet
def test_serial_lines_from_the_host_reach_the_firmware_sim(sim_fleet: FleetState) -> None:
    host = sim_fleet.hosts[0]
    assert run_on(sim_fleet, host, "test -c /dev/ttyUSB0 && echo tty") == "tty"
    before = read_status(host)
    assert before["connected"] is True
    seq = 4242
    line = encode(Command(seq=seq, steering_milli=300, throttle_milli=0)).decode().strip()
    run_on(sim_fleet, host, f"sudo sh -c \"printf '%s\\n' '{line}' > /dev/ttyUSB0\"")
    deadline = time.monotonic() + 10
    status = before
    while time.monotonic() < deadline:
        status = read_status(host)
        if status["last_seq"] == seq:
            break
        time.sleep(0.1)
    assert status["last_seq"] == seq, status
    assert int(status["rx_ok"]) == int(before["rx_ok"]) + 1  # type: ignore[call-overload]
    assert status["rx_bad"] == before["rx_bad"]


@pytest.mark.fleet
def test_the_firmware_sim_answers_back_into_the_host(sim_fleet: FleetState) -> None:
    host = sim_fleet.hosts[1]
    # Whatever the simulator sent (acks, periodic telemetry) arrives in the host on /dev/ttyUSB0.
    out = run_on(sim_fleet, host, "sudo timeout 5 head -n 6 /dev/ttyUSB0")
    messages = []
    for raw in out.splitlines():
        try:
            messages.append(parse_line(raw.encode()))
        except ValueError:
            continue  # the first line may have been cut when the buffer was full
    assert any(isinstance(m, Telemetry | Ack) for m in messages), out


@pytest.mark.fleet
def test_set_thermal_chooses_what_vcgencmd_reports(sim_fleet: FleetState) -> None:
    host = sim_fleet.hosts[1]
    assert run_on(sim_fleet, host, "vcgencmd measure_temp") == "temp=48.3'C"
    try:
        set_thermal(sim_fleet.name, host.name, ThermalReading(temp_c=85, throttled="0x50005"))
        assert run_on(sim_fleet, host, "vcgencmd measure_temp; vcgencmd get_throttled") == (
            "temp=85.0'C\nthrottled=0x50005"
        )
        assert run_on(sim_fleet, host, f"cat {THERMAL_ZONE_TEMP}") == "85000"
        assert run_on(sim_fleet, sim_fleet.hosts[0], "vcgencmd measure_temp") == "temp=48.3'C"
    finally:
        set_thermal(sim_fleet.name, host.name, ThermalReading(temp_c=48.3, throttled="0x0"))


@pytest.mark.fleet
def test_cpufreq_stand_in_looks_like_a_pi5_and_takes_a_governor(sim_fleet: FleetState) -> None:
    host = sim_fleet.hosts[0]
    governors = f"{CPUFREQ_ROOT}/cpu*/cpufreq/scaling_governor"
    assert run_on(sim_fleet, host, f"cat {governors}").split() == ["ondemand"] * 4
    assert "performance" in run_on(
        sim_fleet, host, f"cat {CPUFREQ_ROOT}/cpu0/cpufreq/scaling_available_governors"
    )
    try:
        run_on(sim_fleet, host, f"echo performance | sudo tee {governors} >/dev/null")
        assert run_on(sim_fleet, host, f"cat {governors}").split() == ["performance"] * 4
    finally:
        run_on(sim_fleet, host, f"echo ondemand | sudo tee {governors} >/dev/null")


@pytest.mark.fleet
def test_cli_status_and_errors(sim_fleet: FleetState) -> None:
    cli = [sys.executable, "-m", "simfleet"]
    result = subprocess.run(
        [*cli, "status", "--name", sim_fleet.name, "--json"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [h["host"] for h in report["hosts"]] == ["car1", "car2"]
    assert all(h["running"] and h["ssh"] and h["serial"] and h["firmware_sim"] for h in report["hosts"])
    bad = subprocess.run(
        [*cli, "set-thermal", "--name", sim_fleet.name, "car9", "--temp", "50"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    expected = f"simfleet: error: fleet '{sim_fleet.name}' has no host 'car9' (hosts: car1, car2)"
    assert bad.stderr.strip() == expected
    again = subprocess.run(
        [*cli, "up", "--name", sim_fleet.name, "--base-port", "2391"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 2
    assert "is already up" in again.stderr


@pytest.mark.fleet
@pytest.mark.slow
def test_down_leaves_nothing_running(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    with running_fleet("pytest-down", hosts=1, base_port=2371, inventory=inventory) as state:
        procs = [p for h in state.hosts for p in (h.nspawn, h.init, h.socat, h.firmware) if p is not None]
        roots = [Path(h.root) for h in state.hosts]
        assert len(procs) == 4
        assert all(is_alive(p) for p in procs)
        assert inventory.is_file()
        assert mounts_under(fleet_dir("pytest-down")) == [Path(state.hosts[0].root)]  # the overlay
    assert not any(is_alive(p) for p in procs)
    assert not any(r.exists() for r in roots)
    assert mounts_under(fleet_dir("pytest-down")) == []
    assert not inventory.exists()
    assert load_state("pytest-down") is None
    assert not Path("/run/systemd/nspawn/propagate/pytest-down-car1").exists()
    assert fleet.port_free(2371)  # nothing listens there any more


@pytest.mark.fleet
@pytest.mark.slow
def test_down_ends_a_container_whose_nspawn_was_killed(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    with running_fleet("pytest-orphan", hosts=1, base_port=2377, inventory=inventory) as state:
        host = state.hosts[0]
        assert host.nspawn is not None
        assert host.init is not None
        os.kill(host.nspawn.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while is_alive(host.nspawn) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not is_alive(host.nspawn)
        assert is_alive(host.init)  # the container outlives its nspawn process...
    assert not is_alive(host.init)  # ...until down ends it
    assert fleet.port_free(2377)


@pytest.mark.fleet
@pytest.mark.slow
def test_a_host_that_does_not_answer_in_time_fails_up_with_its_boot_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(fleet.BOOT_TIMEOUT, "amd64", 0.0)  # sshd cannot be up the instant nspawn starts
    config = FleetConfig(name="pytest-slow", hosts=1, base_port=2375, inventory=tmp_path / "hosts.yml")
    with pytest.raises(SimFleetError, match=r"(?s)did not answer within 0 s; .*boot\.log ends with:\n.+"):
        up(config)
    assert load_state("pytest-slow") is None  # what up had started was stopped and removed
    assert not (fleet_dir("pytest-slow")).exists()
    assert not config.inventory.exists()


@pytest.mark.fleet
@pytest.mark.arm64
@pytest.mark.slow
def test_arm64_host_runs_aarch64_under_qemu_user() -> None:
    with running_fleet("pytest-arm64", hosts=1, arch="arm64", base_port=2381) as arm_fleet:
        host = arm_fleet.hosts[0]
        machine = run_on(
            arm_fleet, host, "python3 -c 'import platform; print(platform.machine())'", timeout=120
        )
        assert machine == "aarch64"
        assert run_on(arm_fleet, host, "cat /proc/1/comm") == "systemd"
        # Not "degraded": the credential drop-ins keep the early units working under qemu-user.
        state = ssh_run(target_for(arm_fleet, host), ["systemctl is-system-running --wait"], timeout=120)
        assert state.stdout.strip() == "running", state.stdout + state.stderr
        assert run_on(arm_fleet, host, "sudo -n true && vcgencmd get_throttled") == "throttled=0x0"
        assert run_on(arm_fleet, host, "test -c /dev/ttyUSB0 && echo tty") == "tty"
