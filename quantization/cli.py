"""`python -m quantization <command>`: quantize, compare, report, demo, demo-data, train-demo.

Heavy imports (torch, lerobot, onnxruntime) happen inside the command handlers, so `--help` is fast. Bad
input ends with one line `error: ...` on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from quantization.backends import BACKENDS
from quantization.errors import QuantizationError

EXIT_BAD_INPUT = 2
EXIT_SOME_FAILED = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def cache_root() -> Path:
    return Path(os.environ.get("ROVER_CACHE") or Path.home() / ".cache" / "rover")


def _quantize(args: argparse.Namespace) -> int:
    from quantization.backends import backend_for, options_from_args  # noqa: PLC0415
    from quantization.quantize import QuantizeRequest, quantize_policy  # noqa: PLC0415

    backend = backend_for(args.backend, args.mode)
    bundle = quantize_policy(
        QuantizeRequest(
            policy=args.policy,
            mode=args.mode,
            backend=args.backend,
            dataset=args.calibration_dataset,
            output=args.output,
            samples=args.calibration_samples,
            force=args.force,
            options=options_from_args(backend, args),
            verify_frames=args.verify_frames,
        )
    )
    m = bundle.manifest
    print(f"bundle: {bundle.root}")
    print(
        f"model: {m.model_file} ({m.model_bytes / 1e6:.1f} MB), mode {m.mode}, backend {m.backend}, "
        f"engine {m.engine}"
    )
    if m.mode == "static":
        print(f"calibration: {m.calibration.succeeded}/{m.calibration.requested} samples succeeded")
        for failure in m.calibration.failures:
            print(f"  failed: {failure}")
    if m.delegation is not None:
        d = m.delegation
        print(
            f"delegated to {d.delegate}: {d.nodes_delegated} of {d.nodes_delegated + d.nodes_not_delegated} "
            f"compute nodes ({d.fraction:.0%}); outside: {', '.join(d.not_delegated) or 'none'}"
        )
    if m.mode != "fp32":
        print(
            f"layers left in float ({len(m.calibration.float_layers)}): "
            "see manifest.json calibration.float_layers"
        )
    if m.verification is not None:
        v = m.verification
        ratio = "" if v.weights_ratio is None else f"; {v.weights_ratio:.2f}x the float weights' size"
        print(
            f"verified: the car's {m.backend} runtime ({v.runtime_version}) ran {v.frames} held-out frames, "
            f"{v.mae_pct_range:.3f} % of the action range from the float model on average, "
            f"{v.max_pct_range:.2f} % at most{ratio}"
        )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from quantization.compare import compare_bundles, format_table  # noqa: PLC0415
    from rover_runtime.metrics import write_json_atomic  # noqa: PLC0415

    comparison = compare_bundles(args.bundles, args.dataset, args.threads, args.runs, args.max_samples)
    print(format_table(comparison))
    if args.output:
        write_json_atomic(args.output, comparison)
        print(f"comparison: {args.output}")
    failed = [b for b in comparison["bundles"] if b["failed"]]
    for row in failed:
        print(f"failed: {row['name']}: {row['failed']}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(comparison['bundles'])} bundles failed; the others were compared",
              file=sys.stderr)  # fmt: skip
        return EXIT_SOME_FAILED
    return 0


def _report(args: argparse.Namespace) -> int:
    from quantization.report import write_report  # noqa: PLC0415

    md, js = write_report(args.comparison, args.output, args.policy)
    print(f"report: {md}\nreport data: {js}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from quantization.demo import DemoOptions, run_demo  # noqa: PLC0415

    paths = run_demo(
        DemoOptions(out=args.out, cache_root=cache_root(), samples=args.calibration_samples,
                    engine=args.engine, threads=args.threads, runs=args.runs)
    )  # fmt: skip
    from quantization.compare import format_table  # noqa: PLC0415

    print(format_table(json.loads(paths["comparison"].read_text(encoding="utf-8"))))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _add_q2_command(sub: Any, name: str, help_text: str, selected: bool) -> None:
    """`demo-data` / `train-demo` live in modules that import lerobot: load them only when selected."""
    parser = sub.add_parser(name, help=help_text, add_help=selected)
    if not selected:
        parser.set_defaults(handler=None)
        return
    from importlib import import_module  # noqa: PLC0415

    module = import_module("quantization.demo_data" if name == "demo-data" else "quantization.train_demo")
    module.add_arguments(parser)
    parser.set_defaults(handler=module.run)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    command = words[0] if words else None

    parser = _Parser(prog="python -m quantization", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="write an FP32 or INT8 model bundle from a LeRobot ACT checkpoint")
    q.add_argument("--policy", type=Path, required=True, help="LeRobot ACT checkpoint directory")
    q.add_argument("--mode", choices=("fp32", "dynamic", "static"), required=True)
    q.add_argument("--backend", choices=tuple(BACKENDS), default="torch",
                   help="torch (TorchScript), onnxruntime (ONNX) or executorch (.pte, XNNPACK)")  # fmt: skip
    q.add_argument("--calibration-dataset", type=Path, required=True, help="LeRobotDataset directory")
    q.add_argument(
        "--calibration-samples", type=int, default=200, help="static: frames drawn from training episodes"
    )
    q.add_argument("--output", type=Path, required=True, help="bundle directory to create")
    q.add_argument("--force", action="store_true", help="replace an existing output directory")
    if command == "quantize":  # the backends' options come from their modules, which import torch
        from quantization.backends import add_backend_arguments  # noqa: PLC0415
        from quantization.verify import DEFAULT_FRAMES  # noqa: PLC0415

        q.add_argument("--verify-frames", type=int, default=DEFAULT_FRAMES,
                       help="held-out frames the car's runtime must run within tolerance before the bundle "
                       f"is written ({DEFAULT_FRAMES})")  # fmt: skip
        add_backend_arguments(q)
    q.set_defaults(handler=_quantize)

    c = sub.add_parser("compare", help="accuracy, latency and size of bundles on held-out episodes")
    c.add_argument("--bundles", type=Path, nargs="+", required=True)
    c.add_argument("--dataset", type=Path, required=True)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--runs", type=int, default=100, help="timed runs per bundle (after 10 warm-up runs)")
    c.add_argument("--max-samples", type=int, default=200, help="held-out frames to evaluate (0: all)")
    c.add_argument("--output", type=Path, help="write the comparison JSON here")
    c.set_defaults(handler=_compare)

    r = sub.add_parser("report", help="summary table (Markdown + JSON) from a comparison JSON")
    r.add_argument("--comparison", type=Path, required=True)
    r.add_argument("--policy", type=Path, help="training checkpoint directory (its size is the baseline)")
    r.add_argument("--output", type=Path, required=True, help="directory for report.md and report.json")
    r.set_defaults(handler=_report)

    d = sub.add_parser("demo", help="demo dataset -> demo policy -> bundles -> compare -> report")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--calibration-samples", type=int, default=200)
    d.add_argument("--engine", default="qnnpack")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--runs", type=int, default=100)
    d.set_defaults(handler=_demo)

    _add_q2_command(sub, "demo-data", "write the synthetic RC-car dataset", command == "demo-data")
    _add_q2_command(sub, "train-demo", "train the demo ACT policy on CPU", command == "train-demo")
    return parser


# Loggers whose records are this project's progress and results; everything else is a library's.
OWN_LOGGERS = ("quantization", "rover_runtime", "__main__")
LIBRARY_LOGGERS = ("torch", "executorch", "torchao", "onnxruntime", "datasets", "lerobot", "huggingface_hub")


def configure_output(verbose: bool) -> None:
    """Our own progress at INFO; the libraries' warnings (FutureWarning, TracerWarning, dynamo's guards,
    datasets' progress bars) only with --verbose, which also turns on debug logging."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if verbose:
        return
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault(
        "TORCH_CPP_LOG_LEVEL", "ERROR"
    )  # c10's warnings (qnnpack's reduce_range), before torch loads


def main(argv: list[str] | None = None) -> int:
    verbose = any(a in ("-v", "--verbose") for a in (sys.argv[1:] if argv is None else argv))
    configure_output(verbose)  # before the parser: `quantize` imports the backends (torch) to build it
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from rover_runtime.bundle import BundleError  # noqa: PLC0415

    try:
        return int(args.handler(args))
    except (QuantizationError, BundleError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
