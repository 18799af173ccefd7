"""klmonitor.alerts.initial: InitialKLRule's arguments and state (its decisions on real runs: tests/test_initial_kl.py)."""

from __future__ import annotations

from typing import Any

import pytest
from alert_windows import (
    HIGH,
)

from klmonitor.alerts import (
    AlertLevel,
    InitialKLRule,
)

# -- argument validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: InitialKLRule(0), ValueError, "threshold must be > 0"),
    ],
)
def test_argument_validation(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (
            lambda: InitialKLRule(min_share=1.5),
            ValueError,
            r"min_share is a fraction of the tokens in \[0, 1\], got 1.5",
        ),
        (lambda: InitialKLRule(min_share=-0.1), ValueError, "min_share must be >= 0"),
        (lambda: InitialKLRule(min_tokens=0), ValueError, "min_tokens must be an int >= 1"),
        (lambda: InitialKLRule(patience=2), TypeError, r"InitialKLRule\(\) does not take 'patience'"),
    ],
)
def test_initial_argument_validation(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


def test_initial_rule_fires_once_and_its_state_says_so() -> None:
    rule = InitialKLRule(level="error", stop_training=True)
    assert (rule.patience, rule.cooldown, rule.level, rule.stop_training) == (1, 0, AlertLevel.ERROR, True)
    # No window held the untrained policy's batches (summary.initial is None): not applicable.
    assert rule.evaluate(HIGH(), 0) is None and not rule.checked
    assert rule.state_dict() == {"streak": 0, "cooldown_left": 0, "checked": False}
    rule.load_state_dict({"streak": 0, "cooldown_left": 0, "checked": True})
    assert rule.checked
    rule.reset()
    assert not rule.checked
    # A checkpoint without this rule's state comes from a run past its start: silent.
    rule.restore_missing()
    assert rule.checked and rule.state_dict() == {"streak": 0, "cooldown_left": 0, "checked": True}
