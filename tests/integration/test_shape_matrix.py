"""The shape matrix: ACTs of generated shapes through every backend and mode, proven by the car's runtime.

The cases are drawn, not picked: `generate_cases(n, seed)` spreads every setting's values over the cases (each
setting's values in a seeded random order, round-robin), then draws camera sizes (odd ones and every aspect
ratio), and repairs only what lerobot itself forbids (heads must divide `dim_model`; temporal ensembling
needs `n_action_steps` 1). CI runs `CASES` cases of seed `SEED`; `ROVER_SHAPE_CASES` and `ROVER_SHAPE_SEED`
draw others (e.g. `ROVER_SHAPE_SEED=$RANDOM`), and a failing case's id says its whole shape.

Every (backend, mode) either writes a bundle that quantize verified with the car's runtime (and that this test
runs again against lerobot's own `predict_action_chunk`), or is refused with one `error:` line and no bundle.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot_checkpoints import ActShape, camera_key, lerobot_chunk, save_act_shape, write_shape_dataset
from quantize_helpers import run_bundle

from quantization.backends import BACKENDS
from quantization.cli import main
from rover_runtime.bundle import open_bundle

SEED = int(os.environ.get("ROVER_SHAPE_SEED", "20261204"))
CASES = int(os.environ.get("ROVER_SHAPE_CASES", "4"))
CALIBRATION_SAMPLES = 8
VALUES = {
    "dim_model": (64, 96, 160, 256, 512),
    "n_heads": (1, 2, 3, 4, 5, 6, 8),
    "ff_factor": (1, 2, 4),
    "n_encoder_layers": (1, 2, 3, 4),
    "n_decoder_layers": (1, 2),
    "cameras": (1, 2, 3),
    "state_dim": (1, 2, 3, 4),
    "action_dim": (1, 2, 3),
    "chunk_size": (1, 5, 8, 20, 33),
    "temporal_ensembling": (False, True),
}
IMAGE_SIDES = (17, 24, 31, 40, 48, 57, 64, 72, 96)
# Static INT8 files against the same backend's FP32 file (issue #26's goal for every static INT8 file).
MAX_STATIC_RATIO = 0.27
VARIANTS = [(backend.name, mode) for backend in BACKENDS.values() for mode in backend.modes]


def generate_cases(count: int, seed: int) -> list[ActShape]:
    rng = random.Random(seed)
    orders = {name: rng.sample(values, len(values)) for name, values in VALUES.items()}
    cases = []
    for i in range(count):
        pick = {name: order[i % len(order)] for name, order in orders.items()}
        dim = pick["dim_model"]
        heads = pick["n_heads"]
        if dim % heads:
            heads = rng.choice([h for h in VALUES["n_heads"] if dim % h == 0])
        chunk = pick["chunk_size"]
        ensemble = pick["temporal_ensembling"]
        steps = 1 if ensemble else rng.randint(1, chunk)
        cameras = tuple((rng.choice(IMAGE_SIDES), rng.choice(IMAGE_SIDES)) for _ in range(pick["cameras"]))
        cases.append(
            ActShape(
                dim_model=dim, n_heads=heads, dim_feedforward=dim * pick["ff_factor"],
                n_encoder_layers=pick["n_encoder_layers"], n_decoder_layers=pick["n_decoder_layers"],
                cameras=cameras, state_dim=pick["state_dim"], action_dim=pick["action_dim"], chunk_size=chunk,
                n_action_steps=steps, temporal_ensemble_coeff=0.01 if ensemble else None,
            )
        )  # fmt: skip
    return cases


CASE_LIST = generate_cases(CASES, SEED)


def test_the_generated_cases_cover_what_the_issue_names() -> None:
    """Across the default cases: 1 to 3 cameras, a head size that is not a power of two, non-square odd
    camera sizes, temporal ensembling and more than one state size (a generator change that loses one of
    these fails here, not silently)."""
    assert {len(c.cameras) for c in CASE_LIST} >= {1, 2, 3} or CASES < 3
    head_sizes = {c.dim_model // c.n_heads for c in CASE_LIST}
    assert any(h & (h - 1) for h in head_sizes), head_sizes
    sides = [s for c in CASE_LIST for hw in c.cameras for s in hw]
    assert any(s % 2 for s in sides)
    assert any(h != w for c in CASE_LIST for h, w in c.cameras)
    assert len({c.state_dim for c in CASE_LIST}) > 1
    assert generate_cases(CASES, SEED) == CASE_LIST  # the same seed, the same cases


@pytest.fixture(scope="module", params=CASE_LIST, ids=[c.label() for c in CASE_LIST])
def shaped(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ActShape, Path, Path]:
    shape: ActShape = request.param
    root = tmp_path_factory.mktemp("shape")
    return shape, save_act_shape(root / "policy", shape), write_shape_dataset(root / "dataset", shape)


@pytest.mark.slow
def test_every_backend_and_mode_is_proven_or_refused(
    shaped: tuple[ActShape, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shape, policy, dataset = shaped
    batch = _heldout_batch(dataset, shape)
    expected = lerobot_chunk(policy, batch)
    written: dict[tuple[str, str], Path] = {}
    for backend, mode in VARIANTS:
        output = tmp_path / f"{mode}-{backend}"
        argv = ["quantize", "--policy", str(policy), "--mode", mode, "--backend", backend,
                "--calibration-dataset", str(dataset), "--calibration-samples", str(CALIBRATION_SAMPLES),
                "--output", str(output)]  # fmt: skip
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        if rc != 0:
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert rc == 2, err
            assert len(lines) == 1, err
            assert not output.exists()
            assert not list(tmp_path.glob(f".{output.name}*")), "a partial bundle was left"
            pytest.fail(f"{shape.label()}: quantize refused {mode} {backend}: {lines[0]}")
        bundle = open_bundle(output)
        verification = bundle.manifest.verification
        assert verification is not None
        assert verification.mae_pct_range <= verification.tolerance_mae_pct
        actions = run_bundle(output, batch)  # the car's backend, again, on lerobot's own inputs
        assert actions.shape == expected.shape
        if mode == "fp32":
            np.testing.assert_allclose(actions, expected, rtol=1e-3, atol=1e-4)
        written[(backend, mode)] = output
    comparison = tmp_path / "comparison.json"
    argv = ["compare", "--bundles", *map(str, written.values()), "--dataset", str(dataset), "--runs", "2",
            "--max-samples", "6", "--output", str(comparison)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rows = json.loads(comparison.read_text())["bundles"]
    assert [r["name"] for r in rows if not r["failed"]] == [p.name for p in written.values()]
    for (backend, mode), path in written.items():
        if mode == "static" and (backend, "fp32") in written:
            ratio = (
                open_bundle(path).manifest.model_bytes
                / open_bundle(written[(backend, "fp32")]).manifest.model_bytes
            )
            assert ratio <= MAX_STATIC_RATIO, f"{backend} static INT8 is {ratio:.3f}x its FP32 file"


def test_a_policy_without_a_state_input_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lerobot's ACT cannot run without `observation.state` (KeyError at inference): refused up front."""
    shape = ActShape(64, 4, 128, 1, 1, ((40, 57),), 0, 2, 5, 5)
    policy = save_act_shape(tmp_path / "policy", shape)
    dataset = write_shape_dataset(tmp_path / "dataset", shape)
    output = tmp_path / "bundle"
    argv = ["quantize", "--policy", str(policy), "--mode", "fp32", "--backend", "onnxruntime",
            "--calibration-dataset", str(dataset), "--output", str(output)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1] == "error: the policy has no 'observation.state' input (lerobot's ACT needs it at inference)"
    )
    assert not output.exists()


def _heldout_batch(dataset: Path, shape: ActShape) -> dict[str, torch.Tensor]:
    """The held-out episode's frames as a lerobot observation batch."""
    from quantization.calibration import frame_indices, open_dataset  # noqa: PLC0415

    info = json.loads((dataset / "meta" / "info.json").read_text())
    start, stop = (int(v) for v in info["splits"]["test"].split(":"))
    ds = open_dataset(dataset)
    items = [ds[i] for i in frame_indices(ds, list(range(start, stop)))]
    batch = {k: torch.stack([item[k] for item in items]) for k in (camera_key(n) for n in shape.camera_names)}
    # A one-entry state comes back from the dataset as a scalar per frame: [N] -> [N, 1].
    batch["observation.state"] = torch.stack([item["observation.state"] for item in items]).reshape(
        len(items), -1
    )
    return batch
