"""ONNX Runtime static INT8 variants on the trained demo policy: U8S8 against S8S8 activations, and the
attention's activation x activation MatMuls quantized against left in float.

Each variant is a real bundle of the demo policy (`make demo`'s dataset and policy, built if missing, cached
under $ROVER_CACHE like the demo's bundles) compared by `quantization.compare` on the held-out episodes
against the FP32 ONNX bundle: action MAE and max error in % of the action range, latency median/p95 at the
demo's input size with `--threads` threads, file size. Prints JSON with the host's load average.

    python benchmarks/onnx_int8_variants.py [--threads 2] [--runs 100] [--samples 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from quantization.backends.onnxruntime import DEFAULT_VARIANT, ONNX_VARIANTS, Options
from quantization.compare import compare_bundles
from quantization.demo import ensure_bundle
from quantization.demo_data import DemoDataConfig, ensure_demo_dataset
from quantization.quantize import QuantizeRequest
from quantization.train_demo import TrainConfig, dataset_fingerprint, ensure_demo_policy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--samples", type=int, default=200, help="calibration samples")
    parser.add_argument("--max-samples", type=int, default=200, help="held-out frames to evaluate")
    args = parser.parse_args(argv)
    cache = Path(os.environ.get("ROVER_CACHE") or Path.home() / ".cache" / "rover")
    dataset = ensure_demo_dataset(cache, DemoDataConfig())
    policy = ensure_demo_policy(cache, dataset, TrainConfig())
    fingerprint = dataset_fingerprint(dataset)

    def bundle(mode: str, variant: str) -> Path:
        request = QuantizeRequest(
            policy=policy, mode=mode, backend="onnxruntime", dataset=dataset, output=Path("unused"),
            samples=args.samples, options=Options(variant=variant),
        )  # fmt: skip
        return ensure_bundle(request, cache, fingerprint).root

    roots = [bundle("fp32", DEFAULT_VARIANT.name), *(bundle("static", v.name) for v in ONNX_VARIANTS)]
    comparison = compare_bundles(roots, dataset, args.threads, args.runs, args.max_samples)
    rows = {}
    for variant, row in zip(ONNX_VARIANTS, comparison["bundles"][1:], strict=True):
        rows[variant.name] = {
            "activations": variant.activations,
            "attention_matmuls": variant.attention_matmuls,
            "accuracy_loss_pct": row["accuracy_loss_pct"],
            "max_error_pct": row["vs_fp32"]["max_pct_range"],
            "latency_median_ms": row["latency"]["median_ms"],
            "latency_p95_ms": row["latency"]["p95_ms"],
            "model_mb": row["model_bytes"] / 1e6,
        }
    fp32 = comparison["bundles"][0]
    report = {
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "threads": args.threads,
        "runs": args.runs,
        "frames": comparison.get("samples"),
        "fp32_latency_median_ms": fp32["latency"]["median_ms"],
        "default": DEFAULT_VARIANT.name,
        "variants": rows,
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
