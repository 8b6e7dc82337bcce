"""Latency and size of a default-size ACT: lerobot's own FP32 ACTPolicy vs our FP32 and INT8 model files.

Default lerobot ACT (random weights, `pretrained_backbone_weights=None`), one 224x224 camera, state dim 2,
action dim 2, batch 1, `--threads` threads, all paths measured in the same run:
lerobot FP32 `predict_action_chunk` (no_grad), TorchScript FP32, torch dynamic INT8, torch static INT8
(static backbone + dynamic linears), ONNX Runtime FP32, ONNX Runtime static QDQ (U8S8 and S8S8, with the
attention's activation x activation MatMuls quantized or left in float), ExecuTorch XNNPACK FP32 and PT2E
static INT8 (run by the car's runtime, rover_executorch, without torch). Every path is loaded first, then
timed in `--rounds` interleaved rounds, so a machine whose speed drifts skews every figure alike.
The torch INT8 paths use this host's fast engine (x86/fbgemm on x86; the Raspberry Pi runs qnnpack).
Every model file is written once; then, for each thread count of `--threads` (a sweep, e.g. `1,2`), every
path is loaded with that many threads and timed. Prints JSON with the CPU model and ISA flags (the ratios
depend on them), the load average before and after, each figure's spread over the interleaved rounds, and
the targets of issue #26: best INT8 <= 0.12x lerobot FP32, ExecuTorch INT8 <= 0.15x, every static INT8 file
<= 0.27x its FP32 file, and a two-camera ACT's ExecuTorch INT8 program <= 0.27x its FP32 program.

    python benchmarks/quantization_latency.py [--threads 1,2] [--runs 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.act.configuration_act import ACTConfig
from lerobot.policies.act.modeling_act import ACTPolicy
from lerobot.policies.factory import make_pre_post_processors

from quantization.act_inference import build_inference_model, model_spec
from quantization.backends import ExportJob
from quantization.backends.executorch import export_program, write_model
from quantization.backends.onnxruntime import ONNX_VARIANTS, quantize_static_qdq
from quantization.backends.torch import quantize_dynamic, quantize_static
from quantization.calibration import CalibrationSet
from quantization.compare import host_info, measure_latencies
from quantization.export import export_onnx, export_torchscript, input_names
from rover_runtime.backends.executorch_model import open_program

IMAGE_KEY = "observation.images.front"
SIZE = 224


def _fast_engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm", "qnnpack"):
        if engine in engines:
            return engine
    raise SystemExit(f"no quantized engine in {engines}")


def _policy(cameras: int = 1) -> tuple[Any, Any, Any]:
    keys = [IMAGE_KEY, *(f"{IMAGE_KEY}{i}" for i in range(1, cameras))]
    config = ACTConfig(
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (2,)),
            **{key: PolicyFeature(FeatureType.VISUAL, (3, SIZE, SIZE)) for key in keys},
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))},
        pretrained_backbone_weights=None,
        device="cpu",
    )
    stats = {
        "observation.state": {"mean": torch.zeros(2), "std": torch.ones(2)},
        "action": {"mean": torch.zeros(2), "std": torch.ones(2)},
        **{key: {"mean": torch.full((3, 1, 1), 0.45), "std": torch.full((3, 1, 1), 0.25)} for key in keys},
    }
    torch.manual_seed(0)
    policy = ACTPolicy(config).eval()
    pre, post = make_pre_post_processors(config, dataset_stats=stats)
    return policy, pre, post


def _two_camera_program_ratio(work: Path, samples: int) -> dict[str, Any]:
    """The ExecuTorch INT8 program of a two-camera default ACT against its FP32 program (bytes)."""
    policy, pre, post = _policy(cameras=2)
    model = build_inference_model(policy, pre, post)
    spec = model_spec(policy.config)
    gen = torch.Generator().manual_seed(2)
    calibration = CalibrationSet(dataset=work, episodes=(), requested=samples)
    calibration.inputs = [
        (torch.randn(1, 2, generator=gen), *(torch.rand(1, 3, SIZE, SIZE, generator=gen) for _ in range(2)))
        for _ in range(samples)
    ]
    sizes = {}
    for mode in ("fp32", "static"):
        path = work / f"two_camera_{mode}.pte"
        write_model(ExportJob(model, spec, mode, calibration if mode == "static" else None, None), path)
        sizes[mode] = path.stat().st_size
    return {
        "fp32_bytes": sizes["fp32"],
        "int8_bytes": sizes["static"],
        "ratio": sizes["static"] / sizes["fp32"],
    }


def add_measurement_arguments(
    parser: argparse.ArgumentParser, *, runs: int, calibration_samples: int
) -> None:
    """The options every latency benchmark of the default ACT takes."""
    parser.add_argument("--threads", default="1,2", help="thread counts to measure, comma-separated")
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the runs are split into")
    parser.add_argument("--calibration-samples", type=int, default=calibration_samples)


def calibration_inputs(samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random (state, image) calibration inputs for the one-camera default ACT."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(1, 2, generator=gen), torch.rand(1, 3, SIZE, SIZE, generator=gen))
            for _ in range(samples)]  # fmt: skip


def lerobot_runner(policy: Any, pre: Any, example: tuple[torch.Tensor, ...]) -> Any:
    """lerobot's own FP32 `predict_action_chunk` on `example`, as a runner for `measure_latencies`."""
    normalized = pre({"observation.state": example[0], IMAGE_KEY: example[1]})

    def lerobot_fp32(_: Any) -> Any:
        with torch.no_grad():
            return policy.predict_action_chunk(normalized)

    return lerobot_fp32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_measurement_arguments(parser, runs=100, calibration_samples=16)
    args = parser.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")]
    load_before = os.getloadavg()
    engine = _fast_engine()
    policy, pre, post = _policy()
    model = build_inference_model(policy, pre, post)
    spec = model_spec(policy.config)
    example = spec.example_inputs(1)
    calibration = calibration_inputs(args.calibration_samples)
    lerobot_fp32 = lerobot_runner(policy, pre, example)

    file_bytes: dict[str, int] = {"lerobot_fp32": sum(p.numel() * 4 for p in policy.parameters())}
    by_threads: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
        work = Path(tmp)
        torch.backends.quantized.engine = engine
        torch_files = {}
        for name, module in {
            "torch_fp32": model,
            "torch_dynamic_int8": quantize_dynamic(model, engine),
            "torch_static_int8": quantize_static(model, calibration, engine),
        }.items():
            torch_files[name] = export_torchscript(module, example, work / f"{name}.pt")
        onnx_files = {"ort_fp32": export_onnx(model, spec, example, work / "ort_fp32.onnx")}
        for variant in ONNX_VARIANTS:
            path = work / f"ort_static_{variant.name}_int8.onnx"
            quantize_static_qdq(onnx_files["ort_fp32"], path, input_names(spec), calibration, variant=variant)
            onnx_files[f"ort_static_{variant.name}_int8"] = path
        et_files = {}
        delegations = {}
        for name, samples in (("executorch_fp32", None), ("executorch_static_int8", calibration)):
            path = work / f"{name}.pte"
            delegations[name] = asdict(export_program(model, example, path, samples))
            et_files[name] = path
        for name, path in {**torch_files, **onnx_files, **et_files}.items():
            file_bytes[name] = path.stat().st_size
        two_camera = _two_camera_program_ratio(work, args.calibration_samples)

        import onnxruntime as ort  # noqa: PLC0415

        for threads in thread_counts:
            torch.set_num_threads(threads)
            runners: dict[str, Any] = {"lerobot_fp32": lerobot_fp32}
            for name, path in torch_files.items():
                jit_load: Any = torch.jit.load
                loaded = jit_load(str(path))

                def run(inputs: tuple[Any, ...], m: Any = loaded) -> Any:
                    with torch.inference_mode():
                        return m(*inputs)

                runners[name] = run
            names = input_names(spec)
            for name, path in onnx_files.items():
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

                def run_ort(inputs: tuple[Any, ...], s: Any = session, n: list[str] = names) -> Any:
                    return s.run(None, {k: t.numpy() for k, t in zip(n, inputs, strict=True)})

                runners[name] = run_ort
            for name, path in et_files.items():
                program = open_program(path, threads)

                def run_et(inputs: tuple[Any, ...], p: Any = program) -> Any:
                    return p.run([t.numpy() for t in inputs])

                runners[name] = run_et
            results = measure_latencies(runners, example, args.runs, rounds=args.rounds)
            base = results["lerobot_fp32"]["median_ms"]
            for name, r in results.items():
                r["ratio_vs_lerobot_fp32"] = r["median_ms"] / base
                r["file_mb"] = file_bytes[name] / 1e6
            int8 = {k: v for k, v in results.items() if "int8" in k}
            best = min(int8, key=lambda k: int8[k]["median_ms"])
            by_threads[str(threads)] = {
                "results": results,
                "best_int8": best,
                "targets": {
                    "best_int8_le_0.12x": results[best]["ratio_vs_lerobot_fp32"] <= 0.12,
                    "executorch_int8_le_0.15x": results["executorch_static_int8"]["ratio_vs_lerobot_fp32"]
                    <= 0.15,
                },
            }
    static_ratios = {
        "torch_static_int8": file_bytes["torch_static_int8"] / file_bytes["torch_fp32"],
        **{k: file_bytes[k] / file_bytes["ort_fp32"] for k in onnx_files if k != "ort_fp32"},
        "executorch_static_int8": file_bytes["executorch_static_int8"] / file_bytes["executorch_fp32"],
    }
    report = {
        "host": {**host_info(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "torch": torch.__version__,
        "threads": thread_counts,
        "runs": args.runs,
        "rounds": args.rounds,
        "engine_torch_int8": engine,
        "engine_note": "x86/fbgemm here; the Raspberry Pi 5 runs qnnpack (Pi bundles use --engine qnnpack)",
        "model": {"image": [3, SIZE, SIZE], "state_dim": 2, "action_dim": 2, "chunk_size": spec.chunk_size,
                  "lerobot_parameters": sum(p.numel() for p in policy.parameters()),
                  "inference_parameters": sum(p.numel() for p in model.parameters())},
        "file_bytes": file_bytes,
        "static_int8_file_vs_fp32_file": static_ratios,
        "two_camera_executorch_program": two_camera,
        "by_threads": by_threads,
        "executorch_delegation": delegations,
        "targets": {
            "every_static_int8_file_le_0.27x_its_fp32_file": all(r <= 0.27 for r in static_ratios.values()),
            "two_camera_int8_program_le_0.27x_its_fp32": two_camera["ratio"] <= 0.27,
            **{f"{k}_at_{t}_threads": v for t, row in by_threads.items() for k, v in row["targets"].items()},
        },
    }  # fmt: skip
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
