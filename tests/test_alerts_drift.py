"""klmonitor.alerts.drift: the drift rule on real windows from categorical policies."""

from __future__ import annotations

import math
from typing import Any

import pytest
from alert_windows import (
    empty_window,
    window,
)

from klmonitor.alerts import (
    AlertLevel,
    DriftRule,
    SamplingMismatchRule,
)

# -- drift ----------------------------------------------------------------------------------


def test_drift_default_is_quiet_on_a_far_policy_and_fires_when_k2_triples_k3() -> None:
    # KL ~0.8 per token (k2 ~30% above k3): a healthy run can get there; the default (2.0,
    # measured on real runs by benchmarks/bench_alerts.py) stays quiet.
    far = [window(4000, s=1.5, seed=i) for i in range(3)]
    rule = DriftRule()
    assert rule.threshold == 2.0
    assert [rule.evaluate(s, step) for step, s in enumerate(far)] == [None] * 3
    # A runaway: logit noise of 10 (KL ~4 nats per token) puts k2 at three times k3.
    runaway = [window(4000, s=10.0, seed=i) for i in range(2)]
    assert all(s.drift > 2.0 and s.drift_z > 3 for s in runaway), [(s.kl, s.drift) for s in runaway]
    alerts = [rule.evaluate(s, step) for step, s in enumerate(runaway, 3)]
    assert alerts[0] is None and alerts[1] is not None and alerts[1].threshold == 2.0


def test_drift_fires_for_a_drifted_policy_after_patience() -> None:
    summaries = [window(4000, s=1.5, seed=i) for i in range(3)]
    for s in summaries:  # KL ~0.8 per token: k2 is ~30% above k3, many standard errors
        assert s.kl > 0.5 and s.drift > 0.2 and s.drift_z > 5, (s.kl, s.drift, s.drift_z)
    rule = DriftRule(threshold=0.1)
    alerts = [rule.evaluate(s, step) for step, s in enumerate(summaries)]
    assert alerts[0] is None  # patience 2
    alert = alerts[1]
    assert alert is not None and alerts[2] is None  # then cooldown
    assert (alert.rule, alert.step, alert.level) == ("drift", 1, AlertLevel.WARN)
    assert alert.value == pytest.approx(summaries[1].drift) and alert.threshold == 0.1
    assert "k2 and k3 disagree by" in alert.message and "learning rate" in alert.message


def test_drift_of_a_sharpened_policy_is_negative_and_fires() -> None:
    s = window(4000, mode="sharp", s=2.0)
    assert s.drift < -0.1 and s.drift_z < -3
    alert = DriftRule(0.1, patience=1).evaluate(s, 0)
    assert alert is not None and "k2 is below k3" in alert.message


def test_drift_needs_significance() -> None:
    s = window(4000, s=1.5)
    assert DriftRule(patience=1, min_z=1e6).evaluate(s, 0) is None
    assert DriftRule(patience=1).evaluate(empty_window(), 0) is None


# -- argument validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: DriftRule(0), ValueError, "threshold must be > 0"),
        (lambda: DriftRule(math.nan), ValueError, "threshold must be finite"),
        (lambda: DriftRule("0.1"), TypeError, "threshold must be a real number"),  # type: ignore[arg-type]
        (lambda: DriftRule(True), TypeError, "threshold must be a real number"),
        (lambda: DriftRule(min_z=-1), ValueError, "min_z must be >= 0"),
    ],
)
def test_argument_validation(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


def test_drift_from_a_sampling_mistake_says_to_fix_the_sampling_not_the_learning_rate() -> None:
    # Samples from the reference (or a sampler at temperature 0.5) scored as the policy's: k2
    # and k3 separate, but so do k1 and k3, and the default sampling check sees it.
    for summary in (window(4000, s=1.5, sampler="reference"), window(4000, s=1.0, sampler="temperature:0.5")):
        assert SamplingMismatchRule().side(summary) != 0
        alert = DriftRule(0.1, patience=1).evaluate(summary, 4)
        assert alert is not None
        assert "but k1 and k3 disagree too" in alert.message and "fix the sampling first" in alert.message
        assert "learning rate and the KL coefficient" not in alert.message
    # An honest drifted window: the learning-rate advice.
    honest = window(4000, s=1.5)
    assert SamplingMismatchRule().side(honest) == 0
    alert = DriftRule(0.1, patience=1).evaluate(honest, 4)
    assert alert is not None and alert.message.endswith("Check the learning rate and the KL coefficient.")
