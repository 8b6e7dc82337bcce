"""The `report` command: the seed report's summary table, rebuilt from a `compare` JSON (Markdown + JSON)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from quantization.errors import QuantizationError
from quantization.policy_loading import WEIGHTS_FILE

log = logging.getLogger(__name__)

ACCURACY_TARGET_PCT = 1.0
REPORT_MD = "report.md"
REPORT_JSON = "report.json"


def load_comparison(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise QuantizationError(f"cannot read comparison {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizationError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("bundles"), list) or not data["bundles"]:
        raise QuantizationError(f"{path}: not a comparison (no 'bundles' list); write one with `compare`")
    for i, bundle in enumerate(data["bundles"]):
        if not isinstance(bundle, dict) or "name" not in bundle:
            raise QuantizationError(f"{path}: bundles[{i}] is not a bundle row (no 'name')")
        if bundle.get("failed"):
            continue
        for key in ("name", "mode", "backend", "model_bytes", "latency", "calibration", "checkpoint_bytes"):
            if key not in bundle:
                raise QuantizationError(f"{path}: bundles[{i}] lacks key '{key}'")
    return data


def build_report(comparison: dict[str, Any], policy_dir: Path | None = None) -> dict[str, Any]:
    """The report's data; bundles that failed in `compare` are listed apart and never recommended."""
    failed = [{"name": b["name"], "reason": b["failed"]} for b in comparison["bundles"] if b.get("failed")]
    bundles = [b for b in comparison["bundles"] if not b.get("failed")]
    if not bundles:
        raise QuantizationError("every bundle of the comparison failed: nothing to report")
    checkpoint = bundles[0]["checkpoint_bytes"]
    if policy_dir is not None:
        weights = policy_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise QuantizationError(f"policy directory {policy_dir}: {WEIGHTS_FILE} is missing")
        checkpoint = weights.stat().st_size
    fp32_by_backend = {b["backend"]: b for b in bundles if b["mode"] == "fp32"}
    reference = next((b for b in bundles if b["name"] == comparison.get("reference")), None)
    rows = []
    for b in bundles:
        fp32 = fp32_by_backend.get(b["backend"], reference)
        size = b["model_bytes"]
        calib = b["calibration"]
        rows.append(
            {
                "name": b["name"],
                "mode": b["mode"],
                "backend": b["backend"],
                "engine": b.get("engine"),
                "size_mb": size / 1e6,
                "compression_vs_checkpoint": checkpoint / size,
                "compression_vs_fp32_bundle": None if fp32 is None else fp32["model_bytes"] / size,
                "fp32_bundle": None if fp32 is None else fp32["name"],
                "reduction_vs_checkpoint_pct": (1 - size / checkpoint) * 100,
                "latency_median_ms": b["latency"]["median_ms"],
                "latency_p95_ms": b["latency"]["p95_ms"],
                "accuracy_loss_pct": b.get("accuracy_loss_pct"),
                "max_error_pct": None if not b.get("vs_fp32") else b["vs_fp32"]["max_pct_range"],
                "mae_vs_truth": b.get("vs_truth", {}).get("mae"),
                "calibration": f"{calib['succeeded']}/{calib['requested']}"
                if calib["requested"]
                else "not needed",
                "float_layers": len(b.get("float_layers", [])),
            }
        )
    int8 = [r for r in rows if r["mode"] != "fp32"]
    within = [
        r
        for r in int8
        if r["accuracy_loss_pct"] is not None and r["accuracy_loss_pct"] <= ACCURACY_TARGET_PCT
    ]
    best = min(within, key=lambda r: r["latency_median_ms"]) if within else None
    static = [r for r in rows if r["mode"] == "static"]
    return {
        "checkpoint_bytes": checkpoint,
        "reference": comparison.get("reference"),
        "dataset": comparison.get("dataset"),
        "samples": comparison.get("samples"),
        "threads": comparison.get("threads"),
        "runs": comparison.get("runs"),
        "host": comparison.get("host"),
        "accuracy_target_pct": ACCURACY_TARGET_PCT,
        "static_within_target": {r["name"]: r["accuracy_loss_pct"] is not None
                                 and r["accuracy_loss_pct"] <= ACCURACY_TARGET_PCT for r in static},
        "recommended": None if best is None else best["name"],
        "rows": rows,
        "failed": failed,
        "float_layers": {b["name"]: b.get("float_layers", []) for b in bundles},
    }  # fmt: skip


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def render_markdown(report: dict[str, Any]) -> str:
    host = report.get("host") or {}
    lines = [
        "# ACT model quantization report",
        "",
        "Measured by `python -m quantization compare` on the held-out episodes of "
        f"`{report['dataset']}` ({report['samples']} frames), latency over {report['runs']} runs after "
        f"warm-up with {report['threads']} threads on {host.get('machine', '?')}"
        f"{_cpu(host)}. "
        + (
            "This host is not a Raspberry Pi: latencies are for comparison between rows, not Pi figures "
            "(qnnpack, the Pi's engine for the torch INT8 bundles, is slow on x86)."
            if host.get("machine") != "aarch64"
            else ""
        ),
        "",
        "## Summary",
        "",
        "| Model | Size (MB) | Compression vs checkpoint | Compression vs FP32 bundle | Reduction | "
        "Latency median / p95 (ms) | Accuracy loss (% of action range) | Calibration |",
        "|---|---|---|---|---|---|---|---|",
        f"| Training checkpoint (`model.safetensors`) | {report['checkpoint_bytes'] / 1e6:.1f} | 1.0x "
        "| - | - | - | - "
        "| - |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| **{r['name']}** ({r['mode']}, {r['backend']}{', ' + r['engine'] if r['engine'] else ''}) "
            f"| {r['size_mb']:.1f} | {r['compression_vs_checkpoint']:.1f}x "
            f"| {_fmt(r['compression_vs_fp32_bundle'], '{:.1f}x')} "
            f"| {r['reduction_vs_checkpoint_pct']:.1f} % "
            f"| {r['latency_median_ms']:.2f} / {r['latency_p95_ms']:.2f} "
            f"| {_fmt(r['accuracy_loss_pct'], '{:.3f} %')} (max {_fmt(r['max_error_pct'], '{:.2f} %')}) "
            f"| {r['calibration']} |"
        )
    for f in report.get("failed", []):
        lines.append(f"| **{f['name']}** | failed: {_cell(f['reason'])} | | | | | | |")
    lines += [
        "",
        "Accuracy loss: mean absolute difference of the predicted action chunks from the FP32 reference "
        f"bundle `{report['reference']}`, in percent of the dataset's action range (mean over action "
        "dimensions; max: the largest single error). Reduction: size saved against the training checkpoint, "
        "which also holds the training-only VAE encoder.",
        "",
        "## Targets",
        "",
    ]
    for name, ok in report["static_within_target"].items():
        verdict = "meets" if ok else "MISSES"
        lines.append(
            f"- `{name}` {verdict} the static INT8 target "
            f"(accuracy loss <= {report['accuracy_target_pct']} %)."
        )
    lines += [
        "",
        f"Recommended (fastest INT8 bundle within the accuracy target): `{report['recommended'] or 'none'}`."
        + (
            " Not considered, because they failed in `compare`: "
            f"{', '.join(f['name'] for f in report['failed'])}."
            if report.get("failed")
            else ""
        ),
        "",
        "## Layers left in float",
        "",
    ]
    for name, layers in report["float_layers"].items():
        if not layers:
            continue
        lines.append(f"<details><summary>{name}: {len(layers)}</summary>\n")
        lines += [f"- {layer}" for layer in layers]
        lines.append("\n</details>\n")
    return "\n".join(lines) + "\n"


def _cpu(host: dict[str, Any]) -> str:
    """The CPU model and ISA flags the comparison recorded, as a parenthesis ("" if none)."""
    model = host.get("cpu_model") or host.get("processor")
    flags = " ".join(host.get("isa_flags") or [])
    parts = [p for p in (model, f"ISA {flags}" if flags else "") if p]
    return f" ({', '.join(parts)})" if parts else ""


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (one line, no column breaks)."""
    return " ".join(text.split()).replace("|", "\\|")


def write_report(comparison_path: Path, output: Path, policy_dir: Path | None = None) -> tuple[Path, Path]:
    report = build_report(load_comparison(comparison_path), policy_dir)
    output.mkdir(parents=True, exist_ok=True)
    md, js = output / REPORT_MD, output / REPORT_JSON
    for path, text in ((md, render_markdown(report)), (js, json.dumps(report, indent=2) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    log.info("wrote %s and %s", md, js)
    return md, js
