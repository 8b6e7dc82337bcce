"""Action chunks -> one action per step: chunk execution and ACT temporal ensembling."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from rover_runtime.action_queue import ChunkQueue, TemporalEnsembler


def _chunk(start: float, size: int = 10) -> NDArray[Any]:
    values = start + np.arange(size, dtype=np.float32)
    return np.stack([values, -values], axis=1)


def test_chunk_queue_aligns_entries_with_steps_and_executes_n_action_steps() -> None:
    queue = ChunkQueue(n_action_steps=4)
    assert queue.action_at(0) is None
    queue.add(_chunk(100), origin=5, arrival=5)
    assert queue.action_at(4) is None
    assert [queue.action_at(s)[0] for s in range(5, 9)] == [100, 101, 102, 103]  # type: ignore[index]
    assert queue.action_at(9) is None  # n_action_steps used up


def test_chunk_queue_skips_entries_that_arrived_late_and_counts_from_arrival() -> None:
    queue = ChunkQueue(n_action_steps=3)
    queue.add(_chunk(0), origin=10, arrival=12)  # two steps late: entries 0, 1 are for the past
    assert queue.action_at(11) is not None  # still in the chunk, but the loop never asks for the past
    assert [queue.action_at(s)[0] for s in (12, 13, 14)] == [2, 3, 4]  # type: ignore[index]
    assert queue.action_at(15) is None


def test_chunk_queue_never_runs_past_the_chunk_end() -> None:
    queue = ChunkQueue(n_action_steps=10)
    queue.add(_chunk(0, size=5), origin=0, arrival=3)
    assert queue.action_at(4) is not None
    assert queue.action_at(5) is None


def test_chunk_queue_requests_the_next_chunk_lead_steps_before_running_dry() -> None:
    queue = ChunkQueue(n_action_steps=10)
    assert queue.wants_request(0, lead=2)  # empty
    queue.add(_chunk(0), origin=1, arrival=1)  # covers steps 1..10
    assert not queue.wants_request(7, lead=2)  # steps 8, 9, 10 left
    assert queue.wants_request(8, lead=2)  # steps 9, 10 left: ask now
    queue.add(_chunk(50), origin=9, arrival=10)  # the newer chunk replaces the old one on arrival
    assert queue.action_at(10)[0] == 51  # type: ignore[index]
    queue.add(_chunk(0), origin=3, arrival=11)  # an older plan never replaces a newer one
    assert queue.action_at(11)[0] == 52  # type: ignore[index]


def _reference_ensemble(chunks: list[NDArray[Any]], coeff: float) -> list[NDArray[Any]]:
    """ACT's Algorithm 2 computed offline: step k averages chunks j <= k with weights exp(-coeff*i)."""
    out = []
    size = len(chunks[0])
    for k in range(len(chunks)):
        covering = [chunks[j][k - j] for j in range(len(chunks)) if 0 <= k - j < size]
        w = np.exp(-coeff * np.arange(len(covering)))
        out.append((w[:, None] * np.stack(covering)).sum(0) / w.sum())
    return out


@pytest.mark.parametrize("coeff", [0.01, 0.0, 0.5, -0.2])
def test_ensembler_matches_acts_weights(coeff: float) -> None:
    rng = np.random.default_rng(1)
    chunks = [rng.normal(size=(6, 2)).astype(np.float32) for _ in range(15)]
    ensembler = TemporalEnsembler(coeff, chunk_size=6)
    got = []
    for k, chunk in enumerate(chunks):
        ensembler.add(chunk, origin=k, arrival=k)
        action = ensembler.action_at(k)
        assert action is not None
        got.append(action)
    for a, b in zip(got, _reference_ensemble(chunks, coeff), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # importing lerobot takes seconds
def test_ensembler_matches_lerobots_act_temporal_ensembler() -> None:
    """The same numbers as lerobot's own ACTTemporalEnsembler (only where lerobot is installed)."""
    torch = pytest.importorskip("torch")
    modeling_act = pytest.importorskip("lerobot.policies.act.modeling_act")
    rng = np.random.default_rng(2)
    chunks = [rng.normal(size=(8, 2)).astype(np.float32) for _ in range(20)]
    theirs = modeling_act.ACTTemporalEnsembler(temporal_ensemble_coeff=0.01, chunk_size=8)
    ours = TemporalEnsembler(0.01, chunk_size=8)
    for k, chunk in enumerate(chunks):
        expected = theirs.update(torch.from_numpy(chunk)[None]).numpy()[0]
        ours.add(chunk, origin=k, arrival=k)
        action = ours.action_at(k)
        assert action is not None
        np.testing.assert_allclose(action, expected, rtol=1e-5, atol=1e-6)


def test_ensembler_with_gaps_and_expiry() -> None:
    ensembler = TemporalEnsembler(0.0, chunk_size=4)
    ensembler.add(_chunk(0, 4), origin=0, arrival=0)
    ensembler.add(_chunk(10, 4), origin=2, arrival=2)
    assert ensembler.action_at(3)[0] == pytest.approx((3 + 11) / 2)  # type: ignore[index]
    assert ensembler.action_at(5)[0] == pytest.approx(13)  # type: ignore[index]
    assert ensembler.action_at(6) is None
    with pytest.raises(ValueError, match="chunk has 10 steps"):
        ensembler.add(_chunk(0), origin=9, arrival=9)
