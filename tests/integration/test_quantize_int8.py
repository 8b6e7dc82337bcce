"""INT8 bundles of the tiny trained policy: what got quantized, what stayed float, and how close they stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from quantize_helpers import CALIBRATION_SAMPLES, heldout_batch, run_bundle, tiny_bundle

from quantization.calibration import action_range
from rover_runtime.bundle import open_bundle

# The documented accuracy target (docs/quantization.md): INT8 within 1 % of the action range of FP32 (mean
# absolute error). ExecuTorch's stricter 0.5 % is the trained demo policy's (0.32 % there): on this tiny
# policy (300 steps) ExecuTorch's fully static INT8 measures 0.47-0.51 %, and more training or calibration
# frames did not lower it (600 steps: 0.62 %; 64 and 128 frames: 0.47 %, 0.59 %), so it is held to 1 % here.
TARGET_MAE_PCT = {"dynamic-torch": 1.0, "static-torch": 1.0, "static-onnx": 1.0, "static-executorch": 1.0}


@pytest.fixture(scope="module")
def fp32_outputs(tiny_policy: Path, demo_dataset: Path) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    batch = heldout_batch(demo_dataset, 8)
    return batch, run_bundle(tiny_bundle(tiny_policy, demo_dataset, "fp32-torch"), batch)


def _action_range(dataset: Path) -> np.ndarray:

    return np.asarray(action_range(dataset))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dynamic-torch", "static-torch", "static-onnx", "static-executorch"])
def test_int8_bundle_stays_close_to_fp32(
    name: str, tiny_policy: Path, demo_dataset: Path, fp32_outputs
) -> None:
    batch, reference = fp32_outputs
    out = run_bundle(tiny_bundle(tiny_policy, demo_dataset, name), batch)
    mae_pct = (np.abs(out - reference).mean(axis=(0, 1)) / _action_range(demo_dataset) * 100).mean()
    assert out.shape == reference.shape
    assert 0 < mae_pct <= TARGET_MAE_PCT[name]  # quantized (not identical) yet within the target
    verification = open_bundle(tiny_bundle(tiny_policy, demo_dataset, name)).manifest.verification
    assert verification is not None  # quantize ran it with the car's runtime before writing it
    assert 0 < verification.mae_pct_range <= TARGET_MAE_PCT[name]


@pytest.mark.slow
def test_dynamic_quantizes_every_linear_including_attention(tiny_policy: Path, demo_dataset: Path) -> None:
    manifest = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "dynamic-torch")).manifest
    dynamic = [f for f in manifest.calibration.float_layers if "DynamicQuantizedLinear" in f]
    names = {f.split(" ")[0] for f in dynamic}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"encoder_layers.0.self_attn.{proj}" in names
    # The first decoder layer's input is all zeros: its self-attention and cross-attention queries are
    # precomputed constants, so only the cross-attention's key/value/output projections remain.
    for proj in ("k_proj", "v_proj", "out_proj"):
        assert f"decoder_layers.0.cross_attn.{proj}" in names
    assert not any(name.startswith(("decoder_layers.0.self_attn", "decoder_layers.0.cross_attn.q_proj"))
                   for name in names)  # fmt: skip
    assert {"state_proj", "action_head", "encoder_layers.0.linear1", "decoder_layers.0.linear2"} <= names
    assert not [
        f for f in manifest.calibration.float_layers if "(Linear: float)" in f
    ]  # no float linear left
    assert manifest.engine == "qnnpack"
    assert manifest.calibration.requested == 0


@pytest.mark.slow
def test_static_torch_reports_calibration_and_float_layers(tiny_policy: Path, demo_dataset: Path) -> None:
    bundle = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "static-torch"))
    cal = bundle.manifest.calibration
    assert (cal.requested, cal.succeeded, cal.failures) == (CALIBRATION_SAMPLES, CALIBRATION_SAMPLES, ())
    assert cal.episodes == (0, 1, 2, 3, 4)  # the demo fixture's training split (episode 5 is held out)
    assert any(f == "encoder_layers.0.norm1 (LayerNorm: float)" for f in cal.float_layers)
    assert any(f.startswith("attention scores") for f in cal.float_layers)
    # The backbone convolutions are INT8 (none is listed as float) and the file is ~4x smaller.
    assert not [f for f in cal.float_layers if "Conv2d" in f]
    fp32 = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "fp32-torch")).manifest
    assert bundle.manifest.model_bytes < fp32.model_bytes / 3


@pytest.mark.slow
def test_static_onnx_is_qdq_u8s8(tiny_policy: Path, demo_dataset: Path) -> None:

    bundle = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "static-onnx"))
    graph = onnx.load(str(bundle.model_path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 20
    assert ops.count("DequantizeLinear") > 20
    initializers = {i.name: i for i in graph.initializer}
    weight_types = {
        initializers[n.input[0]].data_type for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in initializers
    }  # fmt: skip
    assert onnx.TensorProto.INT8 in weight_types  # S8 weights
    act_types = {
        initializers[n.input[2]].data_type for n in graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in initializers
    }  # fmt: skip
    assert act_types == {onnx.TensorProto.UINT8}  # U8 activations
    cal = bundle.manifest.calibration
    assert cal.succeeded == cal.requested == CALIBRATION_SAMPLES
    assert bundle.manifest.model_format == "onnx"
    assert bundle.manifest.backend == "onnxruntime"
