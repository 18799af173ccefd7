"""The trend rules (klmonitor.alerts.trend) and the entropy estimate they read (summary.entropy)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from klmonitor import KLStats, Monitor
from klmonitor.alerts import AlertEngine, EntropyCollapseRule, KLAccelerationRule
from klmonitor.summary import EstimatorStats, KLSummary


# -- the entropy estimate -----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_entropy_covers_the_exact_entropy_of_a_categorical_policy(seed: int, level: str) -> None:
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.full(50, 0.3))
    tokens = rng.choice(50, size=(200, 20), p=q)
    logp = torch.tensor(np.log(q)[tokens], dtype=torch.float32)
    mask = torch.tensor(rng.random((200, 20)) < 0.9)
    mon = Monitor(log_every_n_steps=1, level=level, rules=[])
    mon.update(logp, logp - 0.05, mask)
    res = mon.step(1)
    assert res is not None and res.summary.entropy is not None
    ent = res.summary.entropy
    exact = float(-(q * np.log(q)).sum())
    if level == "sequence":  # a sequence's sum over its valid tokens: H times their mean count
        exact *= float(mask.sum()) / 200
        # the row lengths vary, which adds to the spread; the mean is still unbiased
    assert abs(ent.mean - exact) < 4 * ent.stderr, (ent, exact)
    assert {"kl/entropy/mean", "kl/entropy/std", "kl/entropy/stderr"} <= set(res.metrics)


def test_entropy_uses_the_tokens_the_kl_counts_and_can_be_off() -> None:
    logp = torch.tensor([-1.0, -2.0, float("-inf"), -3.0, -4.0])
    ref = torch.tensor([-1.0, float("nan"), -2.0, -3.0, -4.0])
    mon = Monitor(log_every_n_steps=1, rules=[])
    mon.update(logp, ref, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    res = mon.step(1)
    assert res is not None and res.summary.entropy is not None
    assert res.summary.entropy.mean == pytest.approx((1.0 + 3.0) / 2)  # the finite, valid tokens
    off = Monitor(log_every_n_steps=1, rules=[], entropy=False)
    off.update(logp, ref)
    res = off.step(1)
    assert res is not None and res.summary.entropy is None and "kl/entropy/mean" not in res.metrics
    assert "EntropyMoments" not in off.state_dict()["diagnostics"]


# -- entropy_collapse ----------------------------------------------------------------------
def summary_with(entropy: float, stderr: float = 0.01, k3: float = 0.1, k3_se: float = 0.01) -> KLSummary:
    s = KLStats()
    s.update(torch.zeros(4), torch.tensor([0.1, -0.1, 0.2, -0.2]))
    base = s.compute()
    return dataclasses.replace(
        base,
        entropy=EstimatorStats(entropy, stderr**2 * 100, stderr * 10, stderr),
        k3=EstimatorStats(k3, k3_se**2 * 100, k3_se * 10, k3_se),
    )


def run(rule: object, summaries: list[KLSummary]) -> list[int]:
    engine = AlertEngine([rule])  # type: ignore[list-item]
    return [i + 1 for i, s in enumerate(summaries) if engine.evaluate(s, i + 1)]


def test_entropy_collapse_fires_after_a_fall_below_the_fraction_with_patience() -> None:
    seq = [summary_with(h) for h in (3.0, 3.1, 2.9, 2.5, 1.0, 0.5, 0.3, 0.2, 0.1)]
    # The level is 3.0; 0.5 and 0.3 are below 0.2 of it (0.6): the second such window fires.
    assert run(EntropyCollapseRule(), seq) == [7]
    # A fall within noise (a huge standard error) is not a collapse.
    noisy = [summary_with(h, stderr=1.0) for h in (3.0, 3.1, 2.9, 0.3, 0.2, 0.1)]
    assert run(EntropyCollapseRule(), noisy) == []
    # A healthy run that sharpens to a third of its start stays quiet.
    assert run(EntropyCollapseRule(), [summary_with(h) for h in (2.0, 1.9, 2.0, 1.2, 0.7, 0.65, 0.7)]) == []


def test_entropy_collapse_state_resumes_the_baseline() -> None:
    rule = EntropyCollapseRule()
    for i, h in enumerate((3.0, 3.0, 3.0)):
        rule.evaluate(summary_with(h), i)
    state = json.loads(json.dumps(rule.state_dict()))
    other = EntropyCollapseRule()
    other.load_state_dict(state)
    assert other.baseline == pytest.approx(3.0)
    with pytest.raises(ValueError, match="baseline"):
        other.load_state_dict({"baseline": ["x"]})
    with pytest.raises(ValueError, match="below 1"):
        EntropyCollapseRule(1.5)


# -- kl_acceleration -----------------------------------------------------------------------
def test_kl_acceleration_fires_on_a_take_off_after_levelling() -> None:
    kl = [0.05, 0.2, 0.3, 0.37, 0.42, 0.43, 1.0, 4.1, 5.9]
    assert run(KLAccelerationRule(), [summary_with(2.0, k3=x) for x in kl]) == [8]


@pytest.mark.parametrize(
    "kl",
    [
        [0.72, 0.77, 0.60, 0.55, 0.45, 0.61, 0.98, 1.16],  # healthy, noisy around 0.7 (bench_alerts)
        [0.017, 0.058, 0.070, 0.087, 0.142, 0.256, 0.458, 0.636, 0.56],  # healthy take-off from 0.09
        [0.1 * i for i in range(1, 15)],  # steady growth
        [1e-7] * 6 + [2e-7] * 6,  # near the reference: noise, no growth worth a word
    ],
)
def test_kl_acceleration_stays_quiet_on_healthy_courses(kl: list[float]) -> None:
    assert run(KLAccelerationRule(), [summary_with(2.0, k3=x) for x in kl]) == []


def test_kl_acceleration_needs_a_significant_growth_and_resumes() -> None:
    kl = [0.05, 0.2, 0.3, 0.37, 0.42, 0.43, 1.0, 4.1, 5.9]
    noisy = [summary_with(2.0, k3=x, k3_se=2.0) for x in kl]
    assert run(KLAccelerationRule(), noisy) == []
    rule = KLAccelerationRule()
    for i, x in enumerate(kl[:7]):
        rule.evaluate(summary_with(2.0, k3=x), i)
    other = KLAccelerationRule()
    other.load_state_dict(json.loads(json.dumps(rule.state_dict(), allow_nan=False)))
    assert other.evaluate(summary_with(2.0, k3=4.1), 8) is not None
    with pytest.raises(ValueError, match="history"):
        other.load_state_dict({"history": [1.0]})
    assert math.isfinite(KLAccelerationRule(span=2).threshold)
