"""Drift: alerts on a real shift, stays quiet on noise of the same volume."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from django.utils import timezone

from monitoring import tasks
from monitoring.drift import DriftPolicy, WindowStats, drift_findings, mann_whitney_z
from monitoring.models import Alert, HourlyRollup
from monitoring.rollups import CHAR_EDGES, MS_EDGES, hist_add, hist_new

RECENT, BASELINE = 1000, 7000
NOISE_RUNS = 200


def window(
    rng: random.Random,
    n: int,
    *,
    error_rate: float = 0.03,
    ttft_scale: float = 1.0,
    length_scale: float = 1.0,
) -> WindowStats:
    stats = WindowStats(ttft_hist=hist_new(MS_EDGES), length_hist=hist_new(CHAR_EDGES))
    stats.replies = n
    for _ in range(n):
        roll = rng.random()
        if roll < error_rate:
            stats.errors += 1
            continue
        if roll < error_rate + 0.02:
            stats.moderated += 1
        elif roll < error_rate + 0.05:
            stats.empty_or_truncated += 1
        hist_add(stats.ttft_hist, MS_EDGES, rng.lognormvariate(6, 0.5) * ttft_scale)
        hist_add(stats.length_hist, CHAR_EDGES, rng.lognormvariate(6, 0.7) * length_scale)
        if rng.random() < 0.1:
            if rng.random() < 0.2:
                stats.thumbs_down += 1
            else:
                stats.thumbs_up += 1
    return stats


def test_noise_of_the_same_volume_rarely_alarms():
    rng = random.Random(20240601)
    alarms = 0
    for _ in range(NOISE_RUNS):
        if drift_findings(window(rng, RECENT), window(rng, BASELINE)):
            alarms += 1
    rate = alarms / NOISE_RUNS
    print(f"drift false-alarm rate on noise: {alarms}/{NOISE_RUNS} = {rate:.1%}")
    assert rate <= 0.02


@pytest.mark.parametrize(
    ("shift", "metric"),
    [
        ({"error_rate": 0.07}, "error_rate"),
        ({"ttft_scale": 1.8}, "p95_ttft_ms"),
        ({"length_scale": 0.6}, "reply_length"),
    ],
)
def test_a_real_shift_is_found(shift, metric):
    rng = random.Random(7)
    found = {f.metric for f in drift_findings(window(rng, RECENT, **shift), window(rng, BASELINE))}
    assert metric in found


def test_small_samples_never_alarm():
    rng = random.Random(3)
    assert drift_findings(window(rng, 50, error_rate=0.5), window(rng, BASELINE)) == []


def test_mann_whitney_is_zero_for_identical_samples():
    assert mann_whitney_z([5, 10, 5], [5, 10, 5]) == pytest.approx(0.0)
    assert mann_whitney_z([0, 0, 10], [10, 0, 0]) > 3


def _store(stats: WindowStats, hours: list[dt.datetime], version_id: int) -> None:
    """Spread a window's counts over its hours as rollup rows, like the rollup job writes."""
    per = len(hours)
    rows = []
    for i, hour in enumerate(hours):

        def share(total: int, i: int = i) -> int:
            return total // per + (1 if i < total % per else 0)

        rows.append(
            HourlyRollup(
                hour=hour,
                model="demo:demo",
                version_id=version_id,
                replies=share(stats.replies),
                errors=share(stats.errors),
                moderated=share(stats.moderated),
                empty=share(stats.empty_or_truncated),
                thumbs_up=share(stats.thumbs_up),
                thumbs_down=share(stats.thumbs_down),
                ttft_hist=[share(n) for n in stats.ttft_hist],
                length_hist=[share(n) for n in stats.length_hist],
                latency_hist=hist_new(MS_EDGES),
            )
        )
    HourlyRollup.objects.bulk_create(rows)


@pytest.mark.django_db
def test_drift_task_alerts_once_per_condition_and_resolves(settings):
    rng = random.Random(11)
    now = timezone.now()
    top = now.replace(minute=0, second=0, microsecond=0)
    recent_hours = [top - dt.timedelta(hours=h) for h in range(24)]
    baseline_hours = [top - dt.timedelta(hours=24 + h) for h in range(7 * 24)]
    _store(window(rng, RECENT, error_rate=0.08), recent_hours, version_id=2)
    _store(window(rng, BASELINE), baseline_hours, version_id=2)
    _store(window(rng, RECENT), recent_hours, version_id=3)
    _store(window(rng, BASELINE), baseline_hours, version_id=3)

    tasks.drift_check.apply()
    tasks.drift_check.apply()
    (alert,) = Alert.objects.filter(resolved_at__isnull=True)
    assert alert.key == "drift:v2:error_rate"
    assert alert.occurrences == 2
    assert alert.detail["recent"] > alert.detail["baseline"]

    # The shift goes away: the alert resolves.
    HourlyRollup.objects.filter(version_id=2, hour__in=recent_hours).delete()
    _store(window(rng, RECENT), recent_hours, version_id=2)
    tasks.drift_check.apply()
    assert not Alert.objects.filter(resolved_at__isnull=True).exists()


def test_default_policy_is_conservative():
    policy = DriftPolicy()
    assert policy.alpha <= 0.001 and policy.min_recent >= 200
