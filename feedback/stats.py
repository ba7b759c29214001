"""Small, exact statistics for scorecards: intervals, tests, latency histograms."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

Z_95 = 1.959963984540054

# Latency histograms use log buckets 8 % wide: bucket i holds values up to
# BASE**i ms, so a percentile read from them is at most 8 % high. Bucket 0
# holds 0 and 1 ms.
_BASE = 1.08


def wilson_interval(successes: int, n: int, *, z: float = Z_95) -> tuple[float, float] | None:
    """Return the Wilson score interval for successes/n, or None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_p_value(x1: int, n1: int, x2: int, n2: int) -> float | None:
    """Return the two-sided p-value of a pooled two-proportion z-test, or None if undefined."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance <= 0:
        # Both are 0 % or both 100 %: no evidence of any difference.
        return 1.0
    z = (x1 / n1 - x2 / n2) / math.sqrt(variance)
    return math.erfc(abs(z) / math.sqrt(2))


def bucket_of(ms: int) -> int:
    """Return the histogram bucket that holds a duration in milliseconds."""
    if ms <= 1:
        return 0
    return math.ceil(math.log(ms) / math.log(_BASE) - 1e-9)


def bucket_upper_ms(bucket: int) -> int:
    return 1 if bucket <= 0 else round(_BASE**bucket)


def histogram_merge(into: dict[str, int], other: Mapping[str, int]) -> None:
    for key, count in other.items():
        into[key] = into.get(key, 0) + count


def histogram_of(values: Iterable[int | None]) -> dict[str, int]:
    hist: dict[str, int] = {}
    for value in values:
        if value is not None:
            key = str(bucket_of(value))
            hist[key] = hist.get(key, 0) + 1
    return hist


def histogram_percentile(hist: Mapping[str, int], q: float) -> int | None:
    """Return the q-quantile (0..1) of a histogram as its bucket's upper bound in ms."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(int(k) for k in hist):
        seen += hist[str(bucket)]
        if seen >= rank:
            return bucket_upper_ms(bucket)
    return None  # unreachable: the ranks add up to total
