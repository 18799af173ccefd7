"""klmonitor.alerts.sampling: the sampling_mismatch rule on real windows (rollout_mismatch end to end: tests/test_sampling.py, test_report.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from alert_windows import (
    HIGH,
    run,
    window,
)

from klmonitor.alerts import (
    AlertEngine,
    AlertLevel,
    RolloutMismatchRule,
    SamplingMismatchRule,
)

# -- sampling mismatch ----------------------------------------------------------------------


def test_sampling_mismatch_quiet_for_honest_samples_close_to_reference() -> None:
    rule = SamplingMismatchRule()
    summaries = [window(8000, s=s, seed=i) for s in (1e-3, 0.1, 0.3) for i in range(3)]
    assert all(abs(s.r_minus_1.z) < 4 for s in summaries)
    assert [rule.evaluate(s, i) for i, s in enumerate(summaries)] == [None] * 9


@pytest.mark.parametrize(
    ("n", "kwargs"),
    [
        (4000, {"mode": "sharp", "s": 3.0, "vocab": 64}),  # KL ~0.5, ess ~0.1
        (300, {"mode": "sharp", "s": 3.0, "vocab": 8}),  # KL ~0.5 in 300 tokens
        (4000, {"mode": "noise", "s": 2.0, "vocab": 64, "sig": 1.0}),  # KL ~1.5, ess ~0.02
        (4000, {"mode": "noise", "s": 3.0, "vocab": 64, "sig": 1.0}),  # KL ~2.9, ess ~0.001
        (4000, {"mode": "sharp", "s": 3.0, "vocab": 64, "level": "sequence"}),
    ],
)
def test_sampling_mismatch_quiet_for_honest_samples_under_large_drift(n: int, kwargs: dict[str, Any]) -> None:
    summaries = [window(n, seed=seed, **kwargs) for seed in range(8)]
    zs = [s.r_minus_1.z for s in summaries]
    # The honest samples often miss part of r's heavy right tail, so z leans negative...
    assert min(zs) < -2, zs
    assert max(zs) < 4, zs  # (the positive side stays honest)
    # ...and the rule, which allows for the tail beyond the window's largest ratio, stays
    # quiet, also with patience 1 and no cooldown, at any KL (no gate on the KL or the ESS).
    rule = SamplingMismatchRule(patience=1, cooldown=0)
    assert [rule.evaluate(s, i) for i, s in enumerate(summaries)] == [None] * 8
    assert all(alert == [] for alert in run(AlertEngine([SamplingMismatchRule()]), summaries))


def test_sampling_mismatch_cannot_see_a_tail_no_window_samples() -> None:
    # The policy is the reference at temperature 1/8: about half the reference's mass sits on
    # tokens the policy gives e^-10 or less, which 4000 samples never contain. Such windows
    # look exactly like top-k sampling (mean r ~0.5 with no large r to explain it) and fire,
    # with a message that says so and names the estimate to trust (k1).
    summaries = [window(4000, seed=seed, mode="sharp", s=8.0, vocab=64) for seed in range(8)]
    rule = SamplingMismatchRule(patience=1, cooldown=0)
    fired = [a for a in (rule.evaluate(s, i) for i, s in enumerate(summaries)) if a is not None]
    assert fired
    for alert in fired:
        assert "cannot tell that from truncated sampling" in alert.message and "k1 does not" in alert.message


@pytest.mark.parametrize(
    ("sampler", "s", "sign"),
    [
        ("reference", 0.3, 1),  # the batch was sampled from the reference model
        ("reference", 1.0, 1),  # ... also far from the reference (KL ~0.4)
        ("temperature:0.5", 0.3, -1),  # the sampler ran at temperature 0.5, log-probs at 1
    ],
)
def test_sampling_mismatch_fires_for_samples_from_another_distribution(
    sampler: str, s: float, sign: int
) -> None:
    summaries = [window(8000, s=s, seed=seed, sampler=sampler) for seed in range(3)]
    assert all(sign * x.r_minus_1.z > 8 for x in summaries), [x.r_minus_1.z for x in summaries]
    rule = SamplingMismatchRule()
    alerts = [rule.evaluate(x, i) for i, x in enumerate(summaries)]
    assert alerts[:2] == [None, None]  # patience 3
    alert = alerts[2]
    assert alert is not None and alert.rule == "sampling_mismatch" and alert.level is AlertLevel.WARN
    assert alert.value == pytest.approx(summaries[2].r_minus_1.z)
    assert "stale log-probs" in alert.message and "standard errors" in alert.message


def test_sampling_mismatch_guards() -> None:
    s = window(8000, s=0.3, sampler="reference")
    assert SamplingMismatchRule(patience=1, min_samples=10_000).evaluate(s, 0) is None
    assert SamplingMismatchRule(patience=1, min_abs_mean=1.0).evaluate(s, 0) is None
    neg = window(8000, s=0.3, sampler="temperature:0.5")
    assert SamplingMismatchRule(patience=1).evaluate(neg, 0) is not None
    # The low side needs a deficit of mean(r) beyond tail_factor samples at the largest ratio.
    bound = -neg.r_minus_1.mean * neg.count / math.exp(neg.max_abs_log_ratio)
    assert SamplingMismatchRule(patience=1, tail_factor=0.9 * bound).side(neg) == -1
    assert SamplingMismatchRule(patience=1, tail_factor=1.1 * bound).side(neg) == 0
    # The high side fires on mean(r) >= max_mean_ratio even when z is small.
    pos = window(8000, s=0.3, sampler="reference")
    mean_r = 1 + pos.r_minus_1.mean
    assert SamplingMismatchRule(pos.r_minus_1.z + 1, patience=1, max_mean_ratio=mean_r).side(pos) == 1
    assert SamplingMismatchRule(pos.r_minus_1.z + 1, patience=1, max_mean_ratio=mean_r + 0.01).side(pos) == 0


# -- argument validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: SamplingMismatchRule(0), ValueError, "threshold must be > 0"),
        (lambda: SamplingMismatchRule(min_samples=1), ValueError, "min_samples must be an int >= 2"),
        (lambda: SamplingMismatchRule(tail_factor=-1), ValueError, "tail_factor must be >= 0"),
        (lambda: SamplingMismatchRule(max_mean_ratio=1), ValueError, "max_mean_ratio must be > 1"),
        (lambda: SamplingMismatchRule(min_abs_mean=-1), ValueError, "min_abs_mean must be >= 0"),
    ],
)
def test_argument_validation(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (
            lambda: RolloutMismatchRule(0),
            ValueError,
            r"threshold must be > 0.0 \(per-token KL\(rollout \|\| trainer\) in nats\)",
        ),
        (lambda: RolloutMismatchRule(min_z=-1), ValueError, "min_z must be >= 0"),
        (lambda: RolloutMismatchRule(patience=0), ValueError, "patience must be an int >= 1"),
    ],
)
def test_rollout_argument_validation(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


def test_rollout_rule_does_not_apply_without_rollout_logprobs() -> None:
    rule = RolloutMismatchRule(patience=1)
    assert rule.measure(HIGH()) is None and rule.evaluate(HIGH(), 0) is None
    default = RolloutMismatchRule()
    assert (default.threshold, default.min_z, default.patience, default.cooldown) == (0.01, 3.0, 2, 10)
