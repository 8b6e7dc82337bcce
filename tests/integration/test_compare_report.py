"""`compare` measures bundles on the held-out episodes; `report` rebuilds the summary table from that JSON."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from quantize_helpers import CALIBRATION_SAMPLES, tiny_bundle

from quantization.cli import main
from rover_runtime.bundle import file_entries, open_bundle, write_manifest

RUNS = 5


@pytest.fixture(scope="module")
def comparison(tiny_policy: Path, demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundles = [
        tiny_bundle(tiny_policy, demo_dataset, n) for n in ("fp32-torch", "static-torch", "static-onnx")
    ]
    output = tmp_path_factory.mktemp("compare") / "comparison.json"
    argv = ["compare", "--bundles", *map(str, bundles), "--dataset", str(demo_dataset), "--threads", "1",
            "--runs", str(RUNS), "--max-samples", "12", "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    return output


@pytest.mark.slow
def test_compare_measures_every_bundle(comparison: Path, tiny_policy: Path) -> None:
    data = json.loads(comparison.read_text())
    assert data["heldout_episodes"] == [5]
    assert data["samples"] == 12
    assert data["runs"] == RUNS
    assert data["threads"] == 1
    assert data["action_names"] == ["steering", "throttle"]
    assert all(r > 0 for r in data["action_range"])
    names = [b["name"] for b in data["bundles"]]
    assert data["reference"] == names[0]
    fp32, static_torch, static_onnx = data["bundles"]
    assert fp32["vs_fp32"]["max_abs"] == 0.0
    assert fp32["accuracy_loss_pct"] == 0.0
    for b in (static_torch, static_onnx):
        assert 0 < b["vs_fp32"]["mae"] <= b["vs_fp32"]["max_abs"]
        assert b["accuracy_loss_pct"] == pytest.approx(b["vs_fp32"]["mae_pct_range"])
        assert b["model_bytes"] < fp32["model_bytes"] / 3
        assert b["calibration"]["succeeded"] == b["calibration"]["requested"] > 0
    for b in data["bundles"]:
        lat = b["latency"]
        assert lat["runs"] == RUNS
        assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p95_ms"]
        assert b["vs_truth"]["mae"] > 0
        assert len(b["vs_truth"]["mae_per_dim"]) == 2
        assert b["checkpoint_bytes"] == (tiny_policy / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_report_rebuilds_the_summary_table(comparison: Path, tiny_policy: Path, tmp_path: Path) -> None:
    assert main(["report", "--comparison", str(comparison), "--policy", str(tiny_policy),
                 "--output", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    data = json.loads(comparison.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    checkpoint = (tiny_policy / "model.safetensors").stat().st_size
    for b in data["bundles"]:
        row = rows[b["name"]]
        assert row["compression_vs_checkpoint"] == pytest.approx(checkpoint / b["model_bytes"])
        assert row["reduction_vs_checkpoint_pct"] == pytest.approx((1 - b["model_bytes"] / checkpoint) * 100)
        assert row["latency_median_ms"] == b["latency"]["median_ms"]
    static = rows[data["bundles"][1]["name"]]
    assert static["calibration"] == f"{CALIBRATION_SAMPLES}/{CALIBRATION_SAMPLES}"
    assert static["compression_vs_fp32_bundle"] == pytest.approx(
        data["bundles"][0]["model_bytes"] / data["bundles"][1]["model_bytes"]
    )
    markdown = (tmp_path / "report.md").read_text()
    assert "| Model | Size (MB) | Compression vs checkpoint |" in markdown
    assert f"| **{data['bundles'][1]['name']}** (static, torch, qnnpack)" in markdown
    assert f"{CALIBRATION_SAMPLES}/{CALIBRATION_SAMPLES}" in markdown


def test_report_refuses_a_file_that_is_not_a_comparison(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"bundles": []}))
    assert main(["report", "--comparison", str(bad), "--output", str(tmp_path / "r")]) == 2
    assert "not a comparison" in capsys.readouterr().err


def test_compare_refuses_when_nothing_is_a_bundle(tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    assert main(["compare", "--bundles", str(bundle), "--dataset", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no model bundle among the 1 given: bundle {bundle}: manifest.json is missing"
    )


@pytest.mark.slow
def test_compare_keeps_going_past_bundles_that_fail(
    tiny_policy: Path, demo_dataset: Path, tmp_path: Path, capsys
) -> None:
    """A directory that is not a bundle and a bundle whose model the car's runtime cannot load each get a
    failed row; the others are compared, the report recommends among them, and the exit status is 1."""
    fp32 = tiny_bundle(tiny_policy, demo_dataset, "fp32-torch")
    onnx = tiny_bundle(tiny_policy, demo_dataset, "static-onnx")
    dynamic = tiny_bundle(tiny_policy, demo_dataset, "dynamic-torch")
    broken = tmp_path / "static-executorch-broken"
    shutil.copytree(tiny_bundle(tiny_policy, demo_dataset, "static-executorch"), broken)
    program = open_bundle(broken)
    program.model_path.write_bytes(program.model_path.read_bytes()[:4096])  # cut short, manifest to match
    write_manifest(broken, replace(program.manifest, files=file_entries(broken)))
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "README").write_text("not a bundle\n")
    output = tmp_path / "comparison.json"
    bundles = [str(fp32), str(broken), str(stranger), str(onnx), str(dynamic)]
    argv = ["compare", "--bundles", *bundles, "--dataset", str(demo_dataset), "--runs", "3",
            "--max-samples", "6", "--output", str(output)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "2 of 5 bundles failed; the others were compared" in err
    data = json.loads(output.read_text())
    rows = {b["name"]: b for b in data["bundles"]}
    assert list(rows) == [fp32.name, broken.name, stranger.name, onnx.name, dynamic.name]
    assert data["failed"] == [broken.name, stranger.name]
    assert rows[broken.name]["failed"].startswith("bundle ")
    assert "does not load" in rows[broken.name]["failed"]
    assert rows[stranger.name]["failed"] == f"not a model bundle: bundle {stranger}: manifest.json is missing"
    assert f"failed: {broken.name}: " in err
    assert rows[fp32.name]["failed"] is None
    assert rows[onnx.name]["failed"] is None
    assert data["reference"] == fp32.name
    working_int8 = [rows[b.name] for b in (onnx, dynamic)]
    assert all(r["accuracy_loss_pct"] > 0 for r in working_int8)
    report_dir = tmp_path / "report"
    assert main(["report", "--comparison", str(output), "--output", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    # The fastest working INT8 bundle within the 1 % target; never one that failed.
    within = [r for r in working_int8 if r["accuracy_loss_pct"] <= 1.0]
    assert within, "the tiny policy's INT8 bundles should meet the target"
    assert report["recommended"] == min(within, key=lambda r: r["latency"]["median_ms"])["name"]
    assert [f["name"] for f in report["failed"]] == [broken.name, stranger.name]
    markdown = (report_dir / "report.md").read_text()
    assert f"| **{broken.name}** | failed: bundle " in markdown
    assert f"failed in `compare`: {broken.name}, {stranger.name}." in markdown
