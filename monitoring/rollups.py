"""Histograms on fixed log-spaced buckets: hours add up, percentiles read back.

Bucket i holds values in (EDGES[i-1], EDGES[i]]; bucket 0 holds values up to
EDGES[0] and the last bucket everything above the last edge. Percentiles are
reported as the geometric middle of their bucket, so the error is bounded by
half a bucket (about 12 %).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

_RATIO = 1.25
# Milliseconds: 10 ms .. ~13 min. Characters: 1 .. ~100k.
MS_EDGES: tuple[float, ...] = tuple(10 * _RATIO**i for i in range(52))
CHAR_EDGES: tuple[float, ...] = (0.0, *(_RATIO**i for i in range(52)))


def hist_new(edges: Sequence[float]) -> list[int]:
    return [0] * (len(edges) + 1)


def hist_add(hist: list[int], edges: Sequence[float], value: float) -> None:
    hist[bisect.bisect_left(edges, value)] += 1


def hist_merge(hists: Iterable[Sequence[int]], edges: Sequence[float]) -> list[int]:
    total = hist_new(edges)
    for hist in hists:
        for i, n in enumerate(hist[: len(total)]):
            total[i] += n
    return total


def bucket_value(index: int, edges: Sequence[float]) -> float:
    """Return a representative value for a bucket."""
    if index == 0:
        return edges[0]
    if index >= len(edges):
        return edges[-1]
    low, high = edges[index - 1], edges[index]
    return math.sqrt(low * high) if low > 0 else high / 2


def hist_percentile(hist: Sequence[int], edges: Sequence[float], q: float) -> float | None:
    """Return the q-quantile (0..1) of a histogram, or None when it is empty."""
    count = sum(hist)
    if count == 0:
        return None
    rank = q * count
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank and n:
            return bucket_value(i, edges)
    return bucket_value(len(hist) - 1, edges)


def hist_mean(hist: Sequence[int], edges: Sequence[float]) -> float | None:
    count = sum(hist)
    if count == 0:
        return None
    return sum(n * bucket_value(i, edges) for i, n in enumerate(hist)) / count
