"""rover_runtime.prometheus: the runtime's state as node_exporter textfile metrics, checked by the real
parsers (promtool's linter and node_exporter's textfile collector), for generated snapshots with hostile
strings."""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rover_runtime.config import ConfigError, load_config
from rover_runtime.metrics import MetricsWriter
from rover_runtime.prometheus import exposition
from rover_runtime.thermal import ThermalState
from simfleet.testing import free_port

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
PROMTOOL = "/usr/bin/promtool"


@contextlib.contextmanager
def node_exporter(textfile_dir: Path) -> Iterator[str]:
    """Debian's node_exporter with only its textfile collector, serving textfile_dir; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
            f"--collector.textfile.directory={textfile_dir}", f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def scrape(url: str) -> str:
    return str(urllib.request.urlopen(url, timeout=5).read().decode())


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False, timeout=30
    )


NASTY = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ['a"b', "back\\slash", "new\nline", "", "\\n", '"', "é ü 🚗"]
)
RC_MODES = ["pi_only", "manual", "rc_lost"]
NUMBER = st.none() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def snapshots(draw: st.DrawFn) -> dict[str, Any]:
    cameras = draw(st.dictionaries(NASTY.filter(bool), st.fixed_dictionaries(
        {"frame_age_s": NUMBER, "fps": NUMBER, "connected": st.booleans()}), max_size=3))  # fmt: skip
    return {
        "time_unix": draw(NUMBER),
        "uptime_s": draw(NUMBER),
        "ready": draw(st.booleans()),
        "healthy": draw(st.booleans()),
        "driving": draw(st.booleans()),
        "release": draw(st.none() | st.fixed_dictionaries({"id": st.none() | NASTY})),
        "bundle": draw(st.fixed_dictionaries({"content_hash": NASTY, "backend": NASTY, "mode": NASTY})),
        "serial": draw(st.fixed_dictionaries({
            "firmware_version": st.none() | NASTY, "firmware": st.none() | NASTY,
            "connected": st.booleans()})),
        "rc": draw(st.fixed_dictionaries({"mode": st.none() | st.sampled_from(RC_MODES)})),
        "failsafe": draw(st.fixed_dictionaries({
            "active": st.booleans(), "since_unix": NUMBER, "count": NUMBER,
            "reasons": st.lists(NASTY, max_size=4)})),
        "loop": draw(st.fixed_dictionaries({
            "rate_hz_achieved": NUMBER, "rate_hz_target": NUMBER, "cycles": NUMBER, "deadline_misses": NUMBER,
            "period_error_ms": st.fixed_dictionaries({"p99": NUMBER})})),
        "inference": draw(st.one_of(st.none(), st.fixed_dictionaries(
            {"latency_ms": st.fixed_dictionaries({"p95": NUMBER})}))),
        "cameras": cameras,
        "thermal": draw(st.fixed_dictionaries({
            "temperature_c": NUMBER, "throttled": st.none() | st.sampled_from(["0x0", "0x50005", "junk"])})),
        "recorder": draw(st.none() | st.fixed_dictionaries({
            "recording": st.booleans(), "stopped_reason": st.none() | NASTY, "episodes_on_disk": NUMBER,
            "bytes_finished": NUMBER, "steps_dropped": NUMBER})),
    }  # fmt: skip


# database=None: no example database; hypothesis may still keep a .hypothesis cache (galaxy.yml ignores it).
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots())
def test_any_snapshot_is_valid_exposition_that_node_exporter_serves_as_written(
    tmp_path_factory: pytest.TempPathFactory, snapshot: dict[str, Any]
) -> None:
    text = exposition(snapshot)
    check = promtool_check(text)
    assert check.returncode == 0, (check.stdout, check.stderr, text)
    textfile_dir = tmp_path_factory.mktemp("textfile")
    (textfile_dir / "rover_runtime.prom").write_text(text)
    with node_exporter(textfile_dir) as url:
        served = scrape(url)
    assert "node_textfile_scrape_error 0" in served, served
    # Label values with quotes, backslashes, newlines and any Unicode come back exactly as written.
    info = next(line for line in text.splitlines() if line.startswith("rover_release_info{"))
    assert info in served.splitlines(), (info, served)
    assert "rover_runtime_up 1" in text
    assert "rover_runtime_up 1" in served


def test_a_full_snapshot_names_every_part_of_the_car() -> None:
    snapshot = {
        "time_unix": 1_796_000_000.5,
        "driving": True,
        "release": {"id": "d3e47e8b"},
        "bundle": {"content_hash": "47a0", "backend": "onnxruntime", "mode": "static_int8"},
        "serial": {"firmware_version": "2.0.0+127a292a", "firmware": "rover_car 2.0.0 (protocol 2)"},
        "rc": {"mode": "manual"},
        "failsafe": {
            "active": True,
            "count": 3,
            "reasons": ["serial: silent", "cameras.front: stale", "serial: x"],
        },
        "loop": {"rate_hz_achieved": 29.5, "period_error_ms": {"p99": 2.5}},
        "inference": {"latency_ms": {"p95": 20.0}},
        "cameras": {"front": {"frame_age_s": 0.04}},
        "thermal": {"temperature_c": 81.5, "throttled": "0x50004"},
        "recorder": {"recording": False, "stopped_reason": "disk full", "episodes_on_disk": 7},
    }
    lines = set(exposition(snapshot).splitlines())
    for expected in (
        'rover_release_info{backend="onnxruntime",bundle="47a0",mode="static_int8",release="d3e47e8b"} 1',
        'rover_firmware_info{firmware="rover_car 2.0.0 (protocol 2)",version="2.0.0+127a292a"} 1',
        'rover_rc_mode{mode="manual"} 1',
        'rover_rc_mode{mode="pi_only"} 0',
        "rover_failsafe_active 1",
        'rover_failsafe_reasons{kind="serial"} 2',
        'rover_failsafe_reasons{kind="cameras.front"} 1',
        "rover_loop_rate_hz 29.5",
        "rover_loop_period_error_p99_seconds 0.0025",
        "rover_inference_latency_p95_seconds 0.02",
        'rover_camera_frame_age_seconds{camera="front"} 0.04',
        "rover_soc_temperature_celsius 81.5",
        'rover_throttled{flag="throttled"} 1',
        'rover_throttled{flag="under_voltage"} 0',
        'rover_throttled{flag="throttling_occurred"} 1',
        "rover_recorder_stopped 1",
        "rover_recorder_episodes_waiting 7",
        "rover_metrics_written_timestamp_seconds 1796000000.5",
        "rover_driving 1",
    ):
        assert expected in lines, expected
    # What the runtime does not know is left out, not made up.
    assert not any(line.startswith("rover_loop_target_rate_hz") for line in lines)


def test_the_writer_replaces_the_textfile_and_its_last_file_says_the_runtime_stopped(tmp_path: Path) -> None:
    ticks = iter(range(1000))

    def snapshot() -> dict[str, Any]:
        return {"time_unix": 1.0, "loop": {"cycles": next(ticks) * 30}}

    textfile = tmp_path / "metrics" / "rover_runtime.prom"
    writer = MetricsWriter(None, snapshot, 0.01, read_thermal_state=lambda: ThermalState(None, None, None),
                           textfile=textfile)  # fmt: skip
    writer.write_now()
    assert "rover_runtime_up 1" in textfile.read_text()
    writer.start()
    time.sleep(0.1)
    writer.close()
    text = textfile.read_text()
    assert "rover_runtime_up 0" in text
    assert promtool_check(text).returncode == 0
    assert [p.name for p in textfile.parent.iterdir()] == ["rover_runtime.prom"]  # no temporary left behind


def test_a_textfile_not_ending_in_prom_is_refused_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "rover.toml"
    config.write_text('[policy]\nstub = true\n[metrics]\ntextfile = "/run/rover-metrics/rover.txt"\n')
    with pytest.raises(
        ConfigError, match=r"metrics\.textfile: '/run/rover-metrics/rover\.txt' must end in \.prom"
    ):
        load_config(config)


@pytest.mark.parametrize(
    "garbage",
    [
        b"rover_runtime_up 1\nrover_runtime_up{",  # cut halfway through a line
        b"\x00\x00\x00\x00",  # what a power cut can leave of a file that was never fsynced
        b"# TYPE rover_runtime_up counter\nrover_runtime_up 1\n# TYPE rover_runtime_up gauge\n",
    ],
)
def test_a_broken_metrics_file_is_skipped_and_counted_and_the_others_still_served(
    tmp_path: Path, garbage: bytes
) -> None:
    """node_exporter reads every *.prom file of the directory: one that is not valid exposition text is
    skipped and counted (node_textfile_scrape_error 1, which RoverMetricsUnreadable fires on); the pull
    agent's file beside it is still served."""
    (tmp_path / "rover_runtime.prom").write_bytes(garbage)
    (tmp_path / "rover_pull.prom").write_text('rover_pull_outcome{outcome="applied"} 1\n')
    with node_exporter(tmp_path) as url:
        served = scrape(url)
    assert "node_textfile_scrape_error 1" in served, served
    assert 'rover_pull_outcome{outcome="applied"} 1' in served, served
