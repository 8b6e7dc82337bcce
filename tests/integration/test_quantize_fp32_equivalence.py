"""The FP32 bundles (TorchScript, ONNX and ExecuTorch) compute what lerobot's ACTPolicy computes, within 1e-4.

The reference is lerobot's own code path: pre-processor -> ACTPolicy.predict_action_chunk / select_action ->
post-processor, on held-out frames of the demo dataset. The bundles get the raw frames (real units, images
in [0, 1]) because normalization is baked in.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from quantize_helpers import heldout_batch, run_bundle, tiny_bundle

from rover_runtime.bundle import open_bundle

TOLERANCE = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference(tiny_policy: Path, demo_dataset: Path) -> dict[str, object]:
    from quantization.policy_loading import load_policy  # noqa: PLC0415

    loaded = load_policy(tiny_policy)
    batch = heldout_batch(demo_dataset, 4)
    with torch.no_grad():
        chunk = loaded.postprocessor(loaded.policy.predict_action_chunk(loaded.preprocessor(dict(batch))))
        loaded.policy.reset()
        first = loaded.postprocessor(loaded.policy.select_action(loaded.preprocessor(dict(batch))))
        second = loaded.postprocessor(loaded.policy.select_action(loaded.preprocessor(dict(batch))))
    return {"batch": batch, "chunk": chunk.numpy(), "first": first.numpy(), "second": second.numpy(),
            "camera_keys": list(loaded.config.image_features)}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32-torch", "fp32-onnx", "fp32-executorch"])
def test_fp32_bundle_matches_lerobot(name: str, tiny_policy: Path, demo_dataset: Path, reference) -> None:
    bundle_dir = tiny_bundle(tiny_policy, demo_dataset, name)
    out = run_bundle(bundle_dir, reference["batch"], reference["camera_keys"])
    chunk = reference["chunk"]
    assert out.shape == chunk.shape  # (batch 4, chunk_size, action_dim)
    assert np.abs(out - chunk).max() <= TOLERANCE
    # select_action pops the chunk's first, then second action (n_action_steps > 1).
    assert np.abs(out[:, 0] - reference["first"]).max() <= TOLERANCE
    assert np.abs(out[:, 1] - reference["second"]).max() <= TOLERANCE
    # The predictions are not trivially constant: the frames give different actions.
    assert np.abs(chunk[0] - chunk[-1]).max() > 1e-3


@pytest.mark.slow
def test_fp32_manifest_records_the_source(tiny_policy: Path, demo_dataset: Path) -> None:
    from rover_runtime.bundle import sha256_file  # noqa: PLC0415

    manifest = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "fp32-torch")).manifest
    assert manifest.source.weights_sha256 == sha256_file(tiny_policy / "model.safetensors")
    assert manifest.source.policy_type == "act"
    assert manifest.source.lerobot_version == "0.6.1"  # the lerobot that read the checkpoint
    assert manifest.tool_versions["checkpoint_saved_by_lerobot"] == "0.6.x"  # the tests' own lerobot saved it
    assert manifest.source.checkpoint_bytes == (tiny_policy / "model.safetensors").stat().st_size
    assert 0 < manifest.source.parameters_inference < manifest.source.parameters_total  # VAE encoder dropped
    assert manifest.normalization == "baked"
    assert manifest.inputs.state_names == ("steering", "throttle")
    assert [i.key for i in manifest.inputs.images] == ["observation.images.front"]
    assert manifest.inputs.images[0].shape == (3, 96, 128)
    assert manifest.outputs.action_names == ("steering", "throttle")
    assert (manifest.outputs.chunk_size, manifest.outputs.n_action_steps) == (10, 10)
    assert manifest.engine is None
    assert manifest.mode == "fp32"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32-torch", "static-torch", "static-onnx", "static-executorch"])
def test_bundle_runs_without_lerobot_or_pickle(name: str, tiny_policy: Path, demo_dataset: Path) -> None:
    """A fresh interpreter where importing lerobot fails (and torch too, for the backends a car runs without
    it) loads and runs the model file with the car's backend."""
    bundle_dir = tiny_bundle(tiny_policy, demo_dataset, name)
    script = textwrap.dedent(
        """
        import sys
        sys.modules["lerobot"] = None  # any import of lerobot now raises ImportError
        import json
        from pathlib import Path
        if json.loads((Path(sys.argv[1]) / "manifest.json").read_text())["backend"] != "torch":
            sys.modules["torch"] = None  # ONNX Runtime and ExecuTorch bundles run without torch
        import numpy as np
        from rover_runtime.backends import load_model
        from rover_runtime.bundle import open_bundle
        bundle = open_bundle(sys.argv[1])
        m = bundle.manifest
        state = np.zeros((1, m.inputs.state_dim), np.float32)
        images = [np.full((1, *img.shape), 0.5, np.float32) for img in m.inputs.images]
        out = load_model(bundle, threads=2, engine=m.engine).run([state, *images])
        assert out.shape == (1, m.outputs.chunk_size, m.outputs.action_dim), out.shape
        assert np.isfinite(out).all()
        print("ok", "torch" in sys.modules and sys.modules["torch"] is not None)
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(bundle_dir)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok {name.endswith('-torch')}"


def test_nothing_unpickles_with_weights_only_false() -> None:
    needle = "weights_only" + "=False"
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for folder in ("quantization", "rover_runtime", "benchmarks", "tests")
        if (REPO_ROOT / folder).is_dir()
        for path in (REPO_ROOT / folder).rglob("*.py")
        if needle in path.read_text(encoding="utf-8").replace(" ", "")
    ]
    assert offenders == []
