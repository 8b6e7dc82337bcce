"""Percentiles of the loop's and the inference's timings, as the status file reports them."""

from __future__ import annotations

import numpy as np


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def ms_stats(values: list[float]) -> dict[str, float | None]:
    """Seconds -> p50/p95/p99/max in milliseconds (None when there are no values)."""
    out: dict[str, float | None] = {}
    for q in (50, 95, 99):
        p = percentile(values, q)
        out[f"p{q}"] = None if p is None else round(p * 1000, 4)
    out["max"] = round(max(values) * 1000, 4) if values else None
    return out
