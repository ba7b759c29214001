"""Statistics for drift: is the last day different from the week before it?

Rates are compared with a one-sided Fisher exact test (only a change for
the worse alerts), reply length with a Mann-Whitney U test computed exactly
on the binned lengths (ties get mid-ranks), and p95 TTFT by testing whether
more of the recent replies than of the baseline's exceed the baseline's p95.
A finding needs both a small p-value and a change big enough to matter, so
a huge volume cannot make a trivial wobble alert, and minimum sample sizes
keep a quiet version silent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from monitoring.rollups import CHAR_EDGES, MS_EDGES, hist_mean, hist_percentile


@dataclass(slots=True)
class WindowStats:
    replies: int = 0
    errors: int = 0
    moderated: int = 0
    empty_or_truncated: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    ttft_hist: list[int] = field(default_factory=list)
    length_hist: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Finding:
    metric: str
    recent: float
    baseline: float
    z: float
    p_value: float

    def as_json(self) -> dict[str, float | str]:
        return {
            "metric": self.metric,
            "recent": round(self.recent, 4),
            "baseline": round(self.baseline, 4),
            "z": round(self.z, 2),
            "p_value": self.p_value,
        }


@dataclass(frozen=True, slots=True)
class DriftPolicy:
    alpha: float = 0.001
    min_recent: int = 200
    min_baseline: int = 500
    min_ratings_recent: int = 50
    min_ratings_baseline: int = 200
    # A rate must rise by this factor and by this many points to count.
    min_rate_ratio: float = 1.25
    min_rate_points: float = 0.01
    # Mean reply length must move by this fraction.
    min_length_change: float = 0.15
    # The share of recent replies above the baseline's p95 must reach this.
    min_tail_share: float = 0.08


def normal_sf(z: float) -> float:
    """Return P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> float:
    """Return z for p1 > p2 (pooled standard error); 0 when it is undefined."""
    if n1 == 0 or n2 == 0:
        return 0.0
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0
    return (x1 / n1 - x2 / n2) / se


def mann_whitney_z(recent: Sequence[int], baseline: Sequence[int]) -> float:
    """Return the tie-corrected Mann-Whitney z of recent vs baseline binned samples."""
    n1, n2 = sum(recent), sum(baseline)
    total = n1 + n2
    if n1 == 0 or n2 == 0 or total < 2:
        return 0.0
    u = 0.0
    below = 0
    ties = 0.0
    for r, b in zip(recent, baseline, strict=False):
        u += r * (below + 0.5 * b)
        below += b
        t = r + b
        ties += t**3 - t
    mean = n1 * n2 / 2
    var = n1 * n2 / 12 * ((total + 1) - ties / (total * (total - 1)))
    if var <= 0:
        return 0.0
    return (u - mean) / math.sqrt(var)


def fisher_greater(x1: int, n1: int, x2: int, n2: int) -> float:
    """Return the one-sided Fisher exact p-value that x1/n1 is greater than x2/n2.

    Exact, unlike the normal approximation, which for rare events (a 2 %
    moderation rate) alarms on noise ten times more often than alpha says.
    """
    total, hits = n1 + n2, x1 + x2
    if n1 == 0 or n2 == 0 or hits == 0:
        return 1.0

    def log_choose(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    top = min(hits, n1)
    if x1 > top:
        return 0.0
    term = math.exp(
        log_choose(hits, x1) + log_choose(total - hits, n1 - x1) - log_choose(total, n1)
    )
    p = 0.0
    for k in range(x1, top + 1):
        p += term
        if term < p * 1e-15:
            break  # the tail falls away geometrically past the mode
        # Ratio of consecutive hypergeometric terms.
        term *= (hits - k) * (n1 - k) / ((k + 1) * (total - hits - n1 + k + 1))
    return min(1.0, p)


def _rate(
    findings: list[Finding],
    policy: DriftPolicy,
    metric: str,
    x1: int,
    n1: int,
    x2: int,
    n2: int,
) -> None:
    z = two_proportion_z(x1, n1, x2, n2)
    p = fisher_greater(x1, n1, x2, n2)
    r1, r2 = x1 / n1, x2 / n2
    if p < policy.alpha and r1 >= r2 * policy.min_rate_ratio and r1 - r2 >= policy.min_rate_points:
        findings.append(Finding(metric, r1, r2, z, p))


def drift_findings(
    recent: WindowStats, baseline: WindowStats, policy: DriftPolicy | None = None
) -> list[Finding]:
    """Return the metrics on which `recent` is significantly worse than `baseline`."""
    policy = policy or DriftPolicy()
    findings: list[Finding] = []
    if recent.replies >= policy.min_recent and baseline.replies >= policy.min_baseline:
        n1, n2 = recent.replies, baseline.replies
        _rate(findings, policy, "error_rate", recent.errors, n1, baseline.errors, n2)
        _rate(findings, policy, "moderation_rate", recent.moderated, n1, baseline.moderated, n2)
        _rate(
            findings,
            policy,
            "empty_or_truncated_rate",
            recent.empty_or_truncated,
            n1,
            baseline.empty_or_truncated,
            n2,
        )
        if sum(recent.length_hist) and sum(baseline.length_hist):
            z = mann_whitney_z(recent.length_hist, baseline.length_hist)
            p = 2 * normal_sf(abs(z))
            m1 = hist_mean(recent.length_hist, CHAR_EDGES) or 0.0
            m2 = hist_mean(baseline.length_hist, CHAR_EDGES) or 0.0
            if p < policy.alpha and m2 > 0 and abs(m1 - m2) / m2 >= policy.min_length_change:
                findings.append(Finding("reply_length", m1, m2, z, p))
        _tail(findings, policy, recent.ttft_hist, baseline.ttft_hist)
    r1, r2 = recent.thumbs_up + recent.thumbs_down, baseline.thumbs_up + baseline.thumbs_down
    if r1 >= policy.min_ratings_recent and r2 >= policy.min_ratings_baseline:
        _rate(
            findings, policy, "thumbs_down_rate", recent.thumbs_down, r1, baseline.thumbs_down, r2
        )
    return findings


def _tail(
    findings: list[Finding], policy: DriftPolicy, recent: Sequence[int], baseline: Sequence[int]
) -> None:
    n1, n2 = sum(recent), sum(baseline)
    if n1 < policy.min_recent or n2 < policy.min_baseline:
        return
    # The first bucket at which the baseline reaches 95 %: "above" means past it.
    seen, cut = 0, len(baseline) - 1
    for i, n in enumerate(baseline):
        seen += n
        if seen >= 0.95 * n2:
            cut = i
            break
    x1, x2 = sum(recent[cut + 1 :]), sum(baseline[cut + 1 :])
    z = two_proportion_z(x1, n1, x2, n2)
    p = fisher_greater(x1, n1, x2, n2)
    if p < policy.alpha and x1 / n1 >= max(policy.min_tail_share, x2 / n2 * policy.min_rate_ratio):
        findings.append(
            Finding(
                "p95_ttft_ms",
                hist_percentile(recent, MS_EDGES, 0.95) or 0.0,
                hist_percentile(baseline, MS_EDGES, 0.95) or 0.0,
                z,
                p,
            )
        )
