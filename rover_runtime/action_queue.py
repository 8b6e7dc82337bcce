"""From action chunks to one action per control step.

Steps are control-loop cycle numbers. A chunk computed from the observation taken at cycle `s` is added
with `origin = s + 1`: its entry j is the action for step `s + 1 + j` (the command for step s was already
sent when the observation, whose state is that command, was taken). Inference runs asynchronously, so a
chunk usually arrives some steps after its origin; entries for steps already past are skipped, which keeps
every action aligned with the time it was planned for.

- ChunkQueue ("chunk" mode): each chunk is executed for `n_action_steps` steps counted from its arrival
  (never beyond the chunk's end); a newer chunk replaces the current one when it arrives. The loop asks for
  the next chunk when no more than `lead` steps (the inference latency in periods plus a margin) are left.
- TemporalEnsembler ("ensemble" mode): every chunk covering the step contributes, weighted with ACT's
  w_i = exp(-coeff * i), i = 0 for the oldest chunk, normalized by the sum of the weights (the same result
  as lerobot's `ACTTemporalEnsembler` fed one chunk per step). Inference runs continuously.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray


class ActionQueue(Protocol):
    def add(self, chunk: NDArray[Any], origin: int, arrival: int) -> None: ...
    def action_at(self, step: int) -> NDArray[Any] | None: ...
    def wants_request(self, step: int, lead: int) -> bool: ...
    def clear(self) -> None: ...


class ChunkQueue:
    def __init__(self, n_action_steps: int) -> None:
        if n_action_steps <= 0:
            raise ValueError(f"n_action_steps must be > 0, got {n_action_steps}")
        self.n_action_steps = n_action_steps
        self._chunk: NDArray[Any] | None = None
        self._origin = 0
        self._end = 0  # first step not covered

    def add(self, chunk: NDArray[Any], origin: int, arrival: int) -> None:
        if self._chunk is not None and origin < self._origin:
            return  # older than what we execute
        delay = max(0, arrival - origin)
        self._chunk, self._origin = chunk, origin
        self._end = origin + min(len(chunk), delay + self.n_action_steps)

    def action_at(self, step: int) -> NDArray[Any] | None:
        if self._chunk is None or not self._origin <= step < self._end:
            return None
        return np.asarray(self._chunk[step - self._origin])

    def remaining_after(self, step: int) -> int:
        """Steps after `step` still covered by the current chunk."""
        return max(0, self._end - step - 1) if self._chunk is not None else 0

    def wants_request(self, step: int, lead: int) -> bool:
        return self.remaining_after(step) <= lead

    def clear(self) -> None:
        self._chunk = None


class TemporalEnsembler:
    def __init__(self, coeff: float, chunk_size: int) -> None:
        if not math.isfinite(coeff):
            raise ValueError(f"temporal_ensemble_coeff must be finite, got {coeff}")
        self.coeff = coeff
        self.chunk_size = chunk_size
        self.weights = np.exp(-coeff * np.arange(chunk_size, dtype=np.float64))
        self._chunks: list[tuple[int, NDArray[Any]]] = []  # (origin, chunk), oldest first

    def add(self, chunk: NDArray[Any], origin: int, arrival: int) -> None:
        if len(chunk) != self.chunk_size:
            raise ValueError(f"chunk has {len(chunk)} steps, the ensembler expects {self.chunk_size}")
        if self._chunks and origin <= self._chunks[-1][0]:
            return  # not newer than the newest
        self._chunks.append((origin, np.asarray(chunk, dtype=np.float64)))
        self._chunks = [(o, c) for o, c in self._chunks if o + self.chunk_size > arrival]

    def action_at(self, step: int) -> NDArray[Any] | None:
        covering = [c[step - o] for o, c in self._chunks if o <= step < o + self.chunk_size]
        if not covering:
            return None
        weights = self.weights[: len(covering)]
        return np.asarray(
            (weights[:, None] * np.stack(covering)).sum(axis=0) / weights.sum(), dtype=np.float32
        )

    def wants_request(self, step: int, lead: int) -> bool:
        return True

    def clear(self) -> None:
        self._chunks.clear()
