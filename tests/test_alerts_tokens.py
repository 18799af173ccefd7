"""klmonitor.alerts.tokens: the nonfinite and extreme rules on real log-probs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from alert_windows import (
    from_logprobs,
    names,
)

from klmonitor.alerts import (
    AlertEngine,
    AlertLevel,
    ExtremeRule,
    NonFiniteRule,
    default_rules,
)

# -- nonfinite and extreme ------------------------------------------------------------------


def test_nonfinite_fires_on_nan_and_inf() -> None:
    logq = torch.full((100,), -2.0)
    logp = logq.clone()
    logp[:3] = -math.inf
    logp[3:5] = math.nan
    s = from_logprobs(logq, logp)
    assert s.nonfinite == 5 and s.tokens == 95
    alerts = AlertEngine(default_rules()).evaluate(s, 12)
    assert names(alerts) == ["nonfinite"]
    (alert,) = alerts
    assert alert.level is AlertLevel.ERROR and alert.value == 5
    assert "5 of 100 tokens" in alert.message and "excluded" in alert.message
    assert "zero probability" in alert.message and "NaN" in alert.message
    assert NonFiniteRule(threshold=5).evaluate(s, 0) is None


def test_extreme_fires_on_huge_log_ratios_whose_values_stay_exact() -> None:
    logq = torch.full((100,), -1.0)
    logp = logq.clone()
    logp[:2] = -51.0  # |log-ratio| 50 > the extreme threshold 20
    s = from_logprobs(logq, logp)
    assert s.extreme == 2 and s.max_abs_log_ratio == pytest.approx(50.0)
    assert s.k3.mean == pytest.approx(2 * 49.0 / 100, rel=1e-6)  # k3 = 50 - 1 + e^-50, unclamped
    alerts = AlertEngine([ExtremeRule(), NonFiniteRule()]).evaluate(s, 3)
    assert names(alerts) == ["extreme"]
    assert alerts[0].level is AlertLevel.WARN and "max_abs_log_ratio = 50" in alerts[0].message
    assert "exact values" in alerts[0].message and "extreme=" in alerts[0].message
    # with the peers' clamp opted in, the clamped tokens are counted and the message says so
    clamped = from_logprobs(logq, logp, clamp=20.0)
    assert clamped.extreme == 2 and clamped.k3.mean < s.k3.mean
    assert "clamped" in ExtremeRule().evaluate(clamped, 3).message


# -- argument validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: NonFiniteRule(-1), ValueError, "threshold must be >= 0"),
        (lambda: ExtremeRule(-1), ValueError, "threshold must be >= 0"),
    ],
)
def test_argument_validation(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()
