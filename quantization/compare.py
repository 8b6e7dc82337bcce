"""The `compare` command: accuracy, latency and size of model bundles on a dataset's held-out episodes.

For each bundle: the predicted action chunks on held-out frames against the FP32 reference bundle (the first
FP32 bundle given, TorchScript preferred) and against the recorded actions (padding past an episode's end
masked), in real units and in percent of the dataset's action range; latency (median and p95 over `runs`
timed calls after a warm-up, batch of one, `threads` threads); and file sizes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantization.act_inference import ACTION_KEY, ModelSpec
from quantization.calibration import (
    action_range,
    check_dataset_features,
    frame_indices,
    model_inputs,
    open_dataset,
)
from quantization.dataset_split import evenly_spaced, train_and_heldout_episodes
from quantization.errors import QuantizationError, one_line
from rover_runtime.backends import ModelError, load_model
from rover_runtime.bundle import Bundle, BundleError, open_bundle

log = logging.getLogger(__name__)

DEFAULT_RUNS = 100
DEFAULT_WARMUP = 10
DEFAULT_MAX_SAMPLES = 200
# The ISA extensions that decide which INT8 and float kernels a CPU gets (x86 and Arm names).
INTERESTING_FLAGS = frozenset({
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
    "amx_tile", "amx_int8", "amx_bf16", "sse4_2", "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "fphp",
})  # fmt: skip


class BundleRunner:
    """Runs a bundle's model with the car's own backend (rover_runtime.backends) on positional inputs."""

    def __init__(self, bundle: Bundle, threads: int) -> None:
        self.bundle = bundle
        try:
            self._model = load_model(bundle, threads, bundle.manifest.engine)
        except ModelError as exc:
            raise QuantizationError(str(exc)) from exc

    def __call__(self, inputs: tuple[Any, ...]) -> Any:
        return self._model.run([np.asarray(t) for t in inputs])


def measure_latency(
    run: Any, inputs: tuple[Any, ...], runs: int, warmup: int = DEFAULT_WARMUP
) -> dict[str, Any]:
    for _ in range(warmup):
        run(inputs)
    return _latency_summary([_time_ms(run, inputs) for _ in range(runs)], warmup)


def measure_latencies(
    runners: Mapping[str, Any],
    inputs: tuple[Any, ...],
    runs: int,
    rounds: int = 5,
    warmup: int = DEFAULT_WARMUP,
) -> dict[str, dict[str, Any]]:
    """Time several paths on the same inputs in `rounds` interleaved rounds of `runs / rounds` each, so a
    machine whose speed drifts during the measurement (other tenants, clocks) skews every path alike."""
    for run in runners.values():
        for _ in range(warmup):
            run(inputs)
    times: dict[str, list[float]] = {name: [] for name in runners}
    round_medians: dict[str, list[float]] = {name: [] for name in runners}
    per_round = max(1, -(-runs // rounds))
    for _ in range(rounds):
        for name, run in runners.items():
            this_round = [_time_ms(run, inputs) for _ in range(per_round)]
            times[name].extend(this_round)
            round_medians[name].append(statistics.median(this_round))
    summaries = {name: _latency_summary(t, warmup) for name, t in times.items()}
    for name, medians in round_medians.items():
        # How far the rounds' medians spread, as % of the overall median: the figure's own noise.
        summaries[name]["round_medians_ms"] = medians
        summaries[name]["round_spread_pct"] = (
            (max(medians) - min(medians)) / summaries[name]["median_ms"] * 100
        )
    return summaries


def _time_ms(run: Any, inputs: tuple[Any, ...]) -> float:
    start = time.perf_counter()
    run(inputs)
    return (time.perf_counter() - start) * 1000


def _latency_summary(times: list[float], warmup: int) -> dict[str, Any]:
    times = sorted(times)
    return {
        "median_ms": statistics.median(times),
        "p95_ms": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
        "mean_ms": statistics.fmean(times),
        "min_ms": times[0],
        "runs": len(times),
        "warmup": warmup,
    }


@dataclass
class EvalSet:
    """Held-out frames as model inputs, with the recorded action chunks and their padding masks."""

    indices: list[int]
    inputs: list[tuple[Any, ...]]
    truth: Any  # numpy [N, chunk, action_dim]
    valid: Any  # numpy bool [N, chunk]
    episodes: list[int]


def load_eval_set(dataset_root: Path, spec: ModelSpec, max_samples: int) -> EvalSet:

    check_dataset_features(dataset_root, spec)
    _, heldout = train_and_heldout_episodes(dataset_root)
    fps = int(json.loads((Path(dataset_root) / "meta" / "info.json").read_text())["fps"])
    dataset = open_dataset(dataset_root, {ACTION_KEY: [i / fps for i in range(spec.chunk_size)]})
    indices = frame_indices(dataset, heldout)
    if not indices:
        raise QuantizationError(f"the held-out episodes {heldout} of {dataset_root} have no frames")
    if 0 < max_samples < len(indices):
        indices = [indices[i] for i in evenly_spaced(len(indices), max_samples)]
    inputs, truth, valid = [], [], []
    for index in indices:
        item = dataset[index]
        try:
            inputs.append(model_inputs(item, spec))
        except ValueError as exc:
            raise QuantizationError(f"{dataset_root}: held-out frame {index}: {exc}") from exc
        # [chunk, action_dim]; a one-entry action comes back from the dataset as [chunk]
        truth.append(np.asarray(item[ACTION_KEY], dtype=np.float32).reshape(spec.chunk_size, spec.action_dim))
        valid.append(~np.asarray(item[f"{ACTION_KEY}_is_pad"], dtype=bool))
    log.info("evaluating on %d frames of held-out episodes %s", len(indices), heldout)
    return EvalSet(indices, inputs, np.stack(truth), np.stack(valid), heldout)


def _spec_of(bundle: Bundle) -> ModelSpec:
    m = bundle.manifest
    return ModelSpec(
        state_dim=m.inputs.state_dim,
        image_keys=tuple(img.key for img in m.inputs.images),
        image_shapes=tuple(img.shape for img in m.inputs.images),
        action_dim=m.outputs.action_dim,
        chunk_size=m.outputs.chunk_size,
        n_action_steps=m.outputs.n_action_steps,
        temporal_ensemble_coeff=m.outputs.temporal_ensemble_coeff,
    )


def action_errors(pred: Any, target: Any, mask: Any, ranges: Any) -> dict[str, Any]:
    """MAE / max error per dimension and overall, in real units and in % of the action range."""

    diff = np.abs(pred - target)[mask]  # [M, action_dim]
    mae = diff.mean(axis=0)
    worst = diff.max(axis=0)
    return {
        "mae": float(mae.mean()),
        "mae_per_dim": [float(v) for v in mae],
        "max_abs": float(worst.max()),
        "max_abs_per_dim": [float(v) for v in worst],
        "mae_pct_range": float((mae / ranges).mean() * 100),
        "max_pct_range": float((worst / ranges).max() * 100),
    }


def _failed_row(path: Path, reason: str, bundle: Bundle | None = None) -> dict[str, Any]:
    """A comparison row for a bundle that could not be compared: its name, what is known, and why."""
    log.error("%s: failed: %s", path, reason)
    row: dict[str, Any] = {"name": path.name, "path": str(path.absolute()), "failed": reason}
    if bundle is not None:
        m = bundle.manifest
        row.update(mode=m.mode, backend=m.backend, engine=m.engine, model_bytes=m.model_bytes)
    return row


def _measure(
    bundle: Bundle, evalset: EvalSet, ranges: Any, threads: int, runs: int
) -> tuple[dict[str, Any], Any]:
    """One bundle's row (without the FP32 columns) and its predictions; QuantizationError if it fails."""
    runner = BundleRunner(bundle, threads)
    log.info("running %s on %d frames", bundle.root.name, len(evalset.inputs))
    try:
        preds = np.concatenate([runner(inputs) for inputs in evalset.inputs], axis=0)
    except Exception as exc:
        raise QuantizationError(
            f"the car's {bundle.manifest.backend} runtime cannot run it: {one_line(exc)}"
        ) from exc
    if preds.shape != evalset.truth.shape:
        raise QuantizationError(
            f"its actions have shape {list(preds.shape)}, expected {list(evalset.truth.shape)}"
        )
    if not np.isfinite(preds).all():
        raise QuantizationError("it returns non-finite actions on held-out frames")
    log.info("timing %s: %d runs", bundle.root.name, runs)
    latency = measure_latency(runner, evalset.inputs[0], runs)
    m = bundle.manifest
    row = {
        "name": bundle.root.name,
        "path": str(bundle.root.absolute()),
        "failed": None,
        "mode": m.mode,
        "backend": m.backend,
        "engine": m.engine,
        "model_format": m.model_format,
        "model_bytes": m.model_bytes,
        "bundle_bytes": sum(f.size for f in m.files) + (bundle.root / "manifest.json").stat().st_size,
        "checkpoint_bytes": m.source.checkpoint_bytes,
        "calibration": {"requested": m.calibration.requested, "succeeded": m.calibration.succeeded,
                        "failures": list(m.calibration.failures)},
        "float_layers": list(m.calibration.float_layers),
        "latency": latency,
        "vs_truth": action_errors(preds, evalset.truth, evalset.valid, ranges),
        "vs_truth_first_action": action_errors(
            preds[:, :1], evalset.truth[:, :1], evalset.valid[:, :1], ranges
        ),
    }  # fmt: skip
    return row, preds


def compare_bundles(
    bundle_dirs: list[Path],
    dataset_root: Path,
    threads: int = 2,
    runs: int = DEFAULT_RUNS,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> dict[str, Any]:
    """Compare every bundle that loads and runs; one that does not gets a row with `failed` set (the others
    are still compared). Refused outright: no bundles, bad settings, a dataset that does not match, or no
    bundle that can be compared at all."""
    if not bundle_dirs:
        raise QuantizationError("no bundles to compare")
    if runs < 1:
        raise QuantizationError(f"--runs must be at least 1, got {runs}")
    opened: list[tuple[Path, Bundle | None, str | None]] = []
    for path in bundle_dirs:
        try:
            opened.append((path, open_bundle(path), None))
        except BundleError as exc:
            opened.append((path, None, str(exc)))
    first = next((b for _, b, _ in opened if b is not None), None)
    if first is None:
        problems = "; ".join(str(problem) for _, _, problem in opened)
        raise QuantizationError(f"no model bundle among the {len(bundle_dirs)} given: {problems}")
    spec = _spec_of(first)
    evalset = load_eval_set(dataset_root, spec, max_samples)
    ranges = np.asarray(action_range(dataset_root), dtype=np.float64)
    results: list[dict[str, Any]] = []
    predictions: dict[int, Any] = {}
    for path, bundle, problem in opened:
        if bundle is None:
            results.append(_failed_row(path, f"not a model bundle: {problem}"))
            continue
        if _spec_of(bundle) != spec:
            reason = f"its inputs/outputs differ from {first.root.name}'s (another policy?)"
            results.append(_failed_row(path, reason, bundle))
            continue
        try:
            row, preds = _measure(bundle, evalset, ranges, threads, runs)
        except QuantizationError as exc:
            results.append(_failed_row(path, str(exc), bundle))
            continue
        predictions[len(results)] = preds
        results.append(row)
    if not predictions:
        reasons = "; ".join(f"{r['name']}: {r['failed']}" for r in results)
        raise QuantizationError(f"no bundle could be compared: {reasons}")
    working = {i: b for i, (_, b, _) in enumerate(opened) if i in predictions and b is not None}
    ref_index = _reference_index(working)
    for i, result in enumerate(results):
        if i not in predictions:
            continue
        if ref_index is None:
            result["vs_fp32"] = None
            result["accuracy_loss_pct"] = None
            continue
        result["vs_fp32"] = action_errors(
            predictions[i], predictions[ref_index], np.ones(evalset.valid.shape, bool), ranges
        )
        result["accuracy_loss_pct"] = result["vs_fp32"]["mae_pct_range"]
    return {
        "dataset": str(Path(dataset_root).absolute()),
        "heldout_episodes": evalset.episodes,
        "samples": len(evalset.inputs),
        "action_names": list(first.manifest.outputs.action_names),
        "action_range": [float(r) for r in ranges],
        "reference": None if ref_index is None else results[ref_index]["name"],
        "threads": threads,
        "runs": runs,
        "host": host_info(),
        "bundles": results,
        "failed": [r["name"] for r in results if r["failed"]],
    }


def host_info() -> dict[str, Any]:
    """The machine the latencies were measured on: its CPU model and the ISA flags that decide the kernels."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", cpu.get("Features", "")).split())
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": cpu.get("model name") or cpu.get("Model") or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "isa_flags": sorted(flags & INTERESTING_FLAGS),
        "python": platform.python_version(),
    }


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _reference_index(bundles: Mapping[int, Bundle]) -> int | None:
    fp32 = [i for i, b in bundles.items() if b.manifest.mode == "fp32"]
    torch_fp32 = [i for i in fp32 if bundles[i].manifest.backend == "torch"]
    candidates = torch_fp32 or fp32
    return candidates[0] if candidates else None


def format_table(comparison: dict[str, Any]) -> str:
    header = [
        "bundle",
        "mode",
        "backend",
        "size MB",
        "median ms",
        "p95 ms",
        "MAE vs FP32 (% range)",
        "MAE vs truth",
    ]
    rows = [header]
    for b in comparison["bundles"]:
        if b.get("failed"):
            rows.append([b["name"], b.get("mode", "?"), b.get("backend", "?"), "-", "-", "-",
                         f"failed: {b['failed']}", "-"])  # fmt: skip
            continue
        loss = b["accuracy_loss_pct"]
        rows.append([
            b["name"], b["mode"], b["backend"], f"{b['model_bytes'] / 1e6:.1f}",
            f"{b['latency']['median_ms']:.2f}", f"{b['latency']['p95_ms']:.2f}",
            "-" if loss is None else f"{b['vs_fp32']['mae']:.5f} ({loss:.3f} %)",
            f"{b['vs_truth']['mae']:.4f}",
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
