"""How fast an INT8 ACT can be on this CPU, against lerobot's FP32: the model's work over XNNPACK's INT8 rate.

For the default lerobot ACT (random weights, one 224x224 camera, state and action of 2, batch 1), at each
of `--threads`:

- `macs`: the multiply-accumulates of one inference of the model the bundles run, counted with torch's
  `FlopCounterMode` (convolutions, matrix products; elementwise work is not counted);
- `int8_gmacs` / `fp32_gmacs`: the rates reached on a large matrix product (256x2048 by 2048x2048) and a
  ResNet 3x3 convolution (256 channels, 14x14) by XNNPACK through the car's ExecuTorch runtime, lowered
  exactly as the bundles are (PT2E static INT8, or FP32), and on the same matrix product by torch (FP32
  `torch.mm`; INT8 with this host's quantized engine, fbgemm's kernels on x86);
- `floor_ms`: `macs` at the best INT8 rate: no INT8 program runs faster on this CPU unless its kernels beat
  these libraries' own best case; `floor_ratio`: that floor over lerobot FP32's median. An INT8 dot product
  instruction (AVX-512 VNNI, Arm's SDOT) does 4 multiply-accumulates where an FMA does 1, so `4 x` the best
  FP32 rate is the ceiling of any INT8 kernel (`vnni_ceiling_ratio`: `macs` at that ceiling);
- the measured ExecuTorch INT8 program and lerobot FP32 beside it.

If `floor_ratio` exceeds a latency goal stated as a ratio to lerobot FP32, the goal cannot be met on this CPU
by any change of ours to the program: only a model with less work (or a slower FP32) would meet it. Prints
JSON with the CPU model and ISA flags and the load average before and after. Run it on a quiet machine.

    python benchmarks/int8_floor.py [--threads 1,2] [--runs 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantization_latency import (
    SIZE,
    _fast_engine,
    _policy,
    add_measurement_arguments,
    calibration_inputs,
    lerobot_runner,
)

from quantization.act_inference import build_inference_model, model_spec
from quantization.backends.executorch import export_program
from quantization.compare import host_info, measure_latencies
from rover_runtime.backends.executorch_model import open_program

GEMM_ROWS, GEMM_IN, GEMM_OUT = 256, 2048, 2048
CONV_CHANNELS, CONV_SIZE = 256, 14


def _kernels() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], int]]:
    """Each kernel: the module, its example input and its multiply-accumulates."""
    gemm = nn.Linear(GEMM_IN, GEMM_OUT)
    conv = nn.Conv2d(CONV_CHANNELS, CONV_CHANNELS, 3, padding=1)
    return {
        "gemm": (gemm, (torch.randn(GEMM_ROWS, GEMM_IN),), GEMM_ROWS * GEMM_IN * GEMM_OUT),
        "conv3x3": (
            conv,
            (torch.randn(1, CONV_CHANNELS, CONV_SIZE, CONV_SIZE),),
            CONV_CHANNELS * CONV_CHANNELS * 9 * CONV_SIZE * CONV_SIZE,
        ),
    }


def _torch_gemm_runners() -> dict[str, Any]:
    """FP32 `torch.mm` and a quantized INT8 linear (this host's engine) on the benchmark's matrix product."""
    x, weight = torch.randn(GEMM_ROWS, GEMM_IN), torch.randn(GEMM_OUT, GEMM_IN)
    linear = torch.ao.nn.quantized.Linear(GEMM_IN, GEMM_OUT)
    linear.set_weight_bias(torch.quantize_per_tensor(weight, 0.01, 0, torch.qint8), torch.zeros(GEMM_OUT))
    x_q = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)

    def fp32(_: Any) -> Any:
        with torch.inference_mode():
            return torch.mm(x, weight.t())

    def int8(_: Any) -> Any:
        with torch.inference_mode():
            return linear(x_q)

    return {"torch_gemm_fp32": fp32, "torch_gemm_int8": int8}


def _count_macs(model: nn.Module, example: tuple[torch.Tensor, ...]) -> dict[str, int]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*example)
    by_op = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    return {"total": counter.get_total_flops() // 2, **by_op}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_measurement_arguments(parser, runs=60, calibration_samples=8)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    policy, pre, post = _policy()
    model = build_inference_model(policy, pre, post)
    example = model_spec(policy.config).example_inputs(1)
    macs = _count_macs(model, example)
    torch.backends.quantized.engine = _fast_engine()
    calibration = calibration_inputs(args.calibration_samples)
    lerobot_fp32 = lerobot_runner(policy, pre, example)
    kernels = _kernels()
    by_threads: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="int8-floor-") as tmp:
        work = Path(tmp)
        programs: dict[str, tuple[Path, tuple[torch.Tensor, ...]]] = {}
        export_program(model, example, work / "act_int8.pte", calibration)
        programs["act_int8"] = (work / "act_int8.pte", example)
        for name, (module, inputs, _) in kernels.items():
            for mode, samples in (("fp32", None), ("int8", [inputs] * 4)):
                path = work / f"{name}_{mode}.pte"
                export_program(module.eval(), inputs, path, samples)
                programs[f"{name}_{mode}"] = (path, inputs)
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            runners: dict[str, Any] = {"lerobot_fp32": lerobot_fp32, **_torch_gemm_runners()}
            for name, (path, inputs) in programs.items():
                program = open_program(path, threads)
                arrays = [t.numpy() for t in inputs]

                def run(_: Any, p: Any = program, a: list[Any] = arrays) -> Any:
                    return p.run(a)

                runners[name] = run
            results = measure_latencies(runners, example, args.runs, rounds=args.rounds)
            modes = ("fp32", "int8")
            work_of = {f"torch_gemm_{mode}": GEMM_ROWS * GEMM_IN * GEMM_OUT for mode in modes}
            work_of |= {f"{name}_{mode}": w for name, (_, _, w) in kernels.items() for mode in modes}
            rates = {name: w / (results[name]["median_ms"] * 1e6) for name, w in work_of.items()}
            int8_rates = {k.removesuffix("_int8"): v for k, v in rates.items() if k.endswith("int8")}
            fp32_rates = {k.removesuffix("_fp32"): v for k, v in rates.items() if k.endswith("fp32")}
            floor_ms = macs["total"] / (max(int8_rates.values()) * 1e6)
            ceiling_ms = macs["total"] / (4 * max(fp32_rates.values()) * 1e6)
            lerobot_ms = results["lerobot_fp32"]["median_ms"]
            by_threads[str(threads)] = {
                "lerobot_fp32_ms": lerobot_ms,
                "executorch_int8_ms": results["act_int8"]["median_ms"],
                "executorch_int8_ratio": results["act_int8"]["median_ms"] / lerobot_ms,
                "int8_gmacs": int8_rates,
                "fp32_gmacs": fp32_rates,
                "lerobot_fp32_gmacs": macs["total"] / (lerobot_ms * 1e6),
                "floor_ms": floor_ms,
                "floor_ratio": floor_ms / lerobot_ms,
                "vnni_ceiling_ratio": ceiling_ms / lerobot_ms,
                "executorch_int8_over_floor": results["act_int8"]["median_ms"] / floor_ms,
                "results": results,
            }
    report = {
        "model": f"default lerobot ACT, one {SIZE}x{SIZE} camera, batch 1",
        "macs": macs,
        "kernels": {name: {"macs": work_macs} for name, (_, _, work_macs) in kernels.items()},
        "by_threads": by_threads,
        "host": {**host_info(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
