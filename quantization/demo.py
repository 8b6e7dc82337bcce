"""The `demo` command: this stage end to end on the embedded demo dataset and policy.

demo dataset -> trained demo ACT -> bundles (FP32/dynamic/static torch, FP32/static ONNX Runtime, FP32/static
ExecuTorch XNNPACK) ->
compare on the held-out episodes -> report. Datasets, policies and bundles are cached under the cache root
keyed by their inputs (and the quantization code), and so is the comparison (by the bundles, the dataset,
the settings and the host), so a second run reuses all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from quantization.backends.torch import Options as TorchOptions
from quantization.bundle_writer import publish_directory
from quantization.code_fingerprint import code_fingerprint, package_files
from quantization.compare import compare_bundles
from quantization.demo_data import DemoDataConfig, ensure_demo_dataset
from quantization.errors import QuantizationError
from quantization.quantize import QuantizeRequest, quantize_policy
from quantization.report import write_report
from quantization.train_demo import TrainConfig, dataset_fingerprint, ensure_demo_policy
from rover_runtime.bundle import Bundle, BundleError, open_bundle, sha256_file
from rover_runtime.metrics import write_json_atomic

log = logging.getLogger(__name__)

# name, mode, backend
DEMO_VARIANTS = (
    ("fp32-torch", "fp32", "torch"),
    ("dynamic-int8-torch", "dynamic", "torch"),
    ("static-int8-torch", "static", "torch"),
    ("fp32-onnx", "fp32", "onnxruntime"),
    ("static-int8-onnx", "static", "onnxruntime"),
    ("fp32-executorch", "fp32", "executorch"),
    ("static-int8-executorch", "static", "executorch"),
)
# The code a bundle is the output of (with the lock): any change makes a new cache entry.
BUNDLE_CODE = (
    "quantization/*.py",
    "quantization/backends/*.py",
    "rover_runtime/bundle.py",
    "rover_runtime/backends/*.py",
)


@dataclass(frozen=True)
class DemoOptions:
    out: Path
    cache_root: Path
    samples: int = 200
    engine: str = "qnnpack"
    threads: int = 2
    runs: int = 100
    max_samples: int = 200


def bundle_code_fingerprint() -> str:
    return code_fingerprint(package_files(*BUNDLE_CODE))


def bundle_cache_key(request: QuantizeRequest, dataset_fingerprint: str) -> str:
    payload = {
        "weights": sha256_file(request.policy / "model.safetensors"),
        "dataset": dataset_fingerprint,
        "settings": request.settings(),
        "code": bundle_code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ensure_bundle(request: QuantizeRequest, cache_root: Path, dataset_fingerprint: str) -> Bundle:
    """The bundle for `request`, built once into the cache (`request.output` is ignored)."""
    cached = cache_root / "bundles" / bundle_cache_key(request, dataset_fingerprint)
    if cached.exists():
        try:
            bundle = open_bundle(cached)
            log.info("reusing cached bundle %s", cached)
            return bundle
        except BundleError as exc:
            log.warning("rebuilding cached bundle: %s", exc)

    return quantize_policy(replace(request, output=cached, force=True))


def comparison_cache_key(bundles: list[Bundle], dataset_fingerprint: str, options: DemoOptions) -> str:
    """What a demo comparison measured: these exact bundles, the dataset, the settings, this host and the
    comparison code. A second demo run reuses the measurements; `python -m quantization compare` never
    does."""
    payload = {
        "bundles": [b.manifest.content_hash for b in bundles],
        "dataset": dataset_fingerprint,
        "settings": [options.threads, options.runs, options.max_samples],
        "host": [platform.node(), platform.machine(), os.cpu_count()],
        "code": hashlib.sha256((Path(__file__).parent / "compare.py").read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def copy_bundle(bundle: Bundle, target: Path) -> Bundle:
    """Copy a bundle to `target` (staged, then renamed) unless an identical one is already there."""
    try:
        if open_bundle(target).manifest.content_hash == bundle.manifest.content_hash:
            return open_bundle(target)
    except BundleError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        copied = stage / "bundle"
        shutil.copytree(bundle.root, copied)
        publish_directory(copied, target, force=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return open_bundle(target)


def run_demo(options: DemoOptions) -> dict[str, Path]:

    out = options.out.absolute()
    log.info("[1/5] demo dataset")
    dataset = ensure_demo_dataset(options.cache_root, DemoDataConfig())
    log.info("[2/5] demo policy (trains on CPU the first time: a few minutes)")
    policy = ensure_demo_policy(options.cache_root, dataset, TrainConfig())
    fingerprint = dataset_fingerprint(dataset)
    bundles: list[Bundle] = []
    backend_options = {"torch": TorchOptions(engine=options.engine)}  # the others: their defaults
    for i, (name, mode, backend) in enumerate(DEMO_VARIANTS, start=1):
        log.info("[3/5] bundle %d/%d: %s", i, len(DEMO_VARIANTS), name)
        request = QuantizeRequest(
            policy=policy, mode=mode, backend=backend, dataset=dataset, output=out / "bundles" / name,
            samples=options.samples, options=backend_options.get(backend),
        )  # fmt: skip
        bundle = ensure_bundle(request, options.cache_root, fingerprint)
        bundles.append(copy_bundle(bundle, out / "bundles" / name))
    comparison_path = out / "comparison.json"
    key = comparison_cache_key(bundles, fingerprint, options)
    cached = options.cache_root / "comparisons" / f"{key}.json"
    if cached.is_file():
        log.info("[4/5] compare: reusing the measurements of these bundles on this host (%s)", cached)
        shutil.copyfile(cached, comparison_path)
    else:
        log.info("[4/5] compare on the held-out episodes (%d timed runs per bundle)", options.runs)
        roots = [b.root for b in bundles]
        comparison = compare_bundles(roots, dataset, options.threads, options.runs, options.max_samples)
        write_json_atomic(comparison_path, comparison)
        write_json_atomic(cached, comparison)
    log.info("[5/5] report")
    md, js = write_report(comparison_path, out / "report", policy)
    if not md.is_file():
        raise QuantizationError(f"report {md} was not written")
    return {"dataset": dataset, "policy": policy, "bundles": out / "bundles", "comparison": comparison_path,
             "report": md, "report_json": js}  # fmt: skip
