"""fleet_report on real `rover-runtime benchmark` output (stub policy) and on edited copies of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet_report.cli import main
from fleet_report.limits import LimitsError, load_limits
from fleet_report.results import ResultError, load_run
from rover_runtime.benchmark import run_benchmark


@pytest.fixture(scope="module")
def bench_json() -> dict[str, Any]:
    return run_benchmark(None, iterations=30, warmup=2)


def _write_run(tmp_path: Path, hosts: dict[str, dict[str, Any]]) -> Path:
    run = tmp_path / "runs" / "20250101T000000Z"
    run.mkdir(parents=True)
    for host, data in hosts.items():
        (run / f"{host}.json").write_text(json.dumps(data))
    return run


def _car(base: dict[str, Any], hostname: str, mean: float, p95: float, **extra: object) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(base))
    data["hostname"] = hostname
    data["latency_ms"].update(mean=mean, p50=mean * 0.9, p95=p95, p99=p95 * 1.1, max=p95 * 1.3)
    data["achievable_control_rate_hz"] = round(1000.0 / (p95 * 1.1), 3)
    data["latency_ms"].pop("samples", None)  # the stub's samples would contradict the figures set here
    data["model_bytes"] = 34_000_000
    # Set explicitly: the benchmark ran inside pytest, whose RSS and CPU are not a car's.
    data["peak_rss_mb"] = 180.0
    data["cpu_percent"] = 55.0
    data.update(extra)
    return data


def test_report_tables_verdicts_and_plot(
    tmp_path: Path, bench_json: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    run = _write_run(
        tmp_path,
        {
            "car-a": _car(
                bench_json, "pi-alpha", 21.5, 27.25, temperature_c_before=51.0, temperature_c_after=63.0
            ),
            "car-b": _car(bench_json, "pi-bravo", 45.0, 61.5),  # too slow: mean, p95 and control rate fail
        },
    )
    assert main(["--run-dir", str(run), "--hosts", "car-a,car-b,car-c"]) == 0
    out = capsys.readouterr().out
    assert "car-a: PASS" in out
    assert "car-b: FAIL" in out
    assert "car-c: NO RESULT" in out
    md = (run / "report.md").read_text()
    # The figures are the cars' own: hostnames and per-host values from their JSON.
    assert "pi-alpha" in md
    assert "pi-bravo" in md
    assert "| 21.50 | 27.25 |" in md
    assert "61.50 ✗" in md
    assert "51.0 | 63.0" in md
    assert "car-b: latency mean 45.00 ms (limit < 40 ms)" in md
    assert "**Fleet: FAIL**" in md
    html = (run / "report.html").read_text()
    assert "pi-bravo" in html
    assert '<tr class="fail">' in html
    assert (run / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["hosts"]["car-a"]["ok"] is True
    assert summary["hosts"]["car-b"]["ok"] is False
    assert summary["missing_hosts"] == ["car-c"]
    assert main(["--run-dir", str(run), "--fail-on-limits"]) == 1


def test_limits_per_host_override(tmp_path: Path, bench_json: dict[str, Any]) -> None:
    run = _write_run(tmp_path, {"slow-arm": _car(bench_json, "emulated", 300.0, 400.0)})
    limits = tmp_path / "limits.yml"
    limits.write_text(
        "default: {max_latency_mean_ms: 40}\n"
        "hosts:\n  slow-arm: {max_latency_mean_ms: 1000, max_latency_p95_ms: 1000, min_control_rate_hz: 1}\n"
    )
    assert main(["--run-dir", str(run), "--limits", str(limits), "--fail-on-limits"]) == 0
    assert load_limits(limits).for_host("other").max_latency_mean_ms == 40


def test_cpu_is_a_share_of_all_cores(tmp_path: Path, bench_json: dict[str, Any]) -> None:
    run = _write_run(tmp_path, {"car": _car(bench_json, "h", 10.0, 12.0, cpu_percent=190.0, cpu_count=4)})
    (result,) = load_run(run)
    assert result.cpu_percent == pytest.approx(47.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_latency_mean_ms: fast\n", "limit 'max_latency_mean_ms' must be a number"),
        ("max_latency_meen_ms: 3\n", "unknown limit 'max_latency_meen_ms'"),
        ("default: {}\nextra: {}\n", "unknown key 'extra'"),
        ("[1, 2]\n", "must be a mapping"),
    ],
)
def test_bad_limits_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "limits.yml"
    path.write_text(text)
    with pytest.raises(LimitsError, match=message):
        load_limits(path)


def test_bad_result_names_file_and_key(
    tmp_path: Path, bench_json: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    data = _car(bench_json, "h", 10.0, 12.0)
    del data["latency_ms"]["p95"]
    run = _write_run(tmp_path, {"car": data})
    with pytest.raises(ResultError, match=r"car\.json: missing key 'latency_ms\.p95'"):
        load_run(run)
    assert main(["--run-dir", str(run)]) == 2
    assert "latency_ms.p95" in capsys.readouterr().err
    assert not (run / "report.md").exists()


DRIVING = {"rate_hz_achieved": 29.87, "release": "b3d19d845494edb9", "firmware_version": "2.0.0+127a292a"}


def test_each_row_names_the_release_and_firmware_the_car_drove_with(
    tmp_path: Path, bench_json: dict[str, Any]
) -> None:
    """The release and the Arduino's version the car drove with during its benchmark, and its loop rate
    while driving beside the achievable rate (n/a for a car measured without driving)."""
    run = _write_run(
        tmp_path,
        {
            "car-a": _car(bench_json, "pi-alpha", 20.0, 25.0, driving=DRIVING),
            "car-b": _car(bench_json, "b", 20.0, 25.0),
        },
    )
    assert main(["--run-dir", str(run)]) == 0
    md = (run / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| host"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    rows = {
        line.split("|")[1].strip(): dict(
            zip(cells, (c.strip() for c in line.strip("|").split("|")), strict=True)
        )
        for line in md.splitlines()
        if line.startswith("| car-")
    }
    assert rows["car-a"]["release"] == "b3d19d845494edb9"
    assert rows["car-a"]["firmware"] == "2.0.0+127a292a"
    assert rows["car-a"]["loop rate while driving (Hz)"] == "29.9"
    assert rows["car-a"]["achievable rate (Hz)"] == "36.4"
    assert (rows["car-b"]["release"], rows["car-b"]["firmware"]) == ("n/a", "n/a")
    assert "b3d19d845494edb9" in (run / "report.html").read_text()


@pytest.mark.parametrize(
    "bad", [{"nested": "dict"}, 12, "", "x" * 65, "line\nbreak", ["list"]], ids=lambda v: repr(v)[:12]
)
@pytest.mark.parametrize("key", ["release", "firmware_version"])
def test_a_release_or_firmware_that_is_not_a_short_string_is_refused(
    tmp_path: Path, bench_json: dict[str, Any], key: str, bad: object
) -> None:
    data = _car(bench_json, "h", 10.0, 12.0, driving={**DRIVING, key: bad})
    with pytest.raises(
        ResultError, match=rf"car\.json: key 'driving\.{key}' must be a short printable string"
    ):
        load_run(_write_run(tmp_path, {"car": data}))


def test_empty_or_missing_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--run-dir", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["--run-dir", str(tmp_path / "empty")]) == 2
    assert "no benchmark results" in capsys.readouterr().err
