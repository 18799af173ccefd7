"""klmonitor.alerts.budget: the kl_budget and spike rules on real windows."""

from __future__ import annotations

from typing import Any

import pytest
from alert_windows import (
    HIGH,
    LOW,
    empty_window,
    names,
    window,
)

from klmonitor.alerts import (
    AlertEngine,
    AlertLevel,
    KLBudgetRule,
    SpikeRule,
    default_rules,
)

# -- spike ----------------------------------------------------------------------------------


def test_spike_after_stable_history() -> None:
    stable = [window(s=0.1, seed=i) for i in range(8)]
    spike = window(s=1.0, seed=99)
    rule = SpikeRule()
    assert [rule.evaluate(s, i) for i, s in enumerate(stable)] == [None] * 8
    assert len(rule.history) == 8
    alert = rule.evaluate(spike, 8)
    assert alert is not None and alert.rule == "spike" and alert.value > 6
    assert "KL (k3) jumped to" in alert.message and "recent mean" in alert.message


def test_spike_needs_history_and_ignores_drops_and_nonfinite() -> None:
    rule = SpikeRule(min_history=3)
    high, low = window(s=1.0), window(s=0.1)
    assert [rule.evaluate(s, i) for i, s in enumerate([low, low, high])] == [None] * 3  # 2 < 3 values
    rule.reset()
    assert [rule.evaluate(s, i) for i, s in enumerate([high] * 4 + [low])] == [None] * 5  # a drop
    before = rule.history
    rule.evaluate(empty_window(), 9)  # KL NaN: not applicable, not recorded
    assert rule.history == before


def test_spike_history_is_bounded() -> None:
    rule = SpikeRule(window=4, min_history=2)
    for i in range(10):
        rule.evaluate(window(s=0.1, seed=i), i)
    assert len(rule.history) == 4 and len(rule.state_dict()["history"]) == 4


# -- kl budget ------------------------------------------------------------------------------


def test_kl_budget() -> None:
    rule = KLBudgetRule(max_kl=0.1, stop_training=True)
    assert rule.evaluate(LOW(), 0) is None
    alert = rule.evaluate(HIGH(), 1)
    assert alert is not None and alert.level is AlertLevel.ERROR and alert.stop
    assert alert.value == pytest.approx(HIGH().k3.mean) and alert.threshold == rule.max_kl == 0.1
    assert "above the budget" in alert.message
    k1 = KLBudgetRule(0.1, estimator="k1", cooldown=0).evaluate(HIGH(), 1)
    assert k1 is not None and k1.value == pytest.approx(HIGH().k1.mean)
    assert KLBudgetRule(0.1).evaluate(empty_window(), 0) is None
    assert "kl_budget" not in names(AlertEngine(default_rules()).evaluate(HIGH(), 0))


# -- argument validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: KLBudgetRule(0), ValueError, "max_kl must be > 0"),
        (lambda: KLBudgetRule(-1.0), ValueError, "max_kl must be > 0"),
        (lambda: KLBudgetRule(0.1, estimator="k4"), ValueError, "estimator must be one of"),
        (lambda: SpikeRule(window=1), ValueError, "window must be an int >= 2"),
        (lambda: SpikeRule(min_history=1), ValueError, "min_history must be an int >= 2"),
        (
            lambda: SpikeRule(window=5, min_history=6),
            ValueError,
            r"min_history \(6\) must be <= window \(5\)",
        ),
        (lambda: SpikeRule(rel_floor=-0.1), ValueError, "rel_floor must be >= 0"),
        (lambda: SpikeRule(abs_floor=0), ValueError, "abs_floor must be > 0"),
    ],
)
def test_argument_validation(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()
