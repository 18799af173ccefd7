"""klmonitor.alerts.event: the Alert event, its dict and its one text form."""

from __future__ import annotations

import json
import math

import pytest

from klmonitor.alerts import (
    Alert,
    AlertLevel,
    parse_alert_text,
)

# -- Alert ----------------------------------------------------------------------------------


def test_alert_dict_round_trip() -> None:
    alert = Alert("sampling_mismatch", 42, AlertLevel.WARN, math.inf, 6.0, "msg", stop=True)
    d = alert.to_dict()
    assert d == {
        "rule": "sampling_mismatch",
        "step": 42,
        "level": "warn",
        "value": "inf",
        "threshold": 6.0,
        "message": "msg",
        "stop": True,
    }
    json.dumps(d, allow_nan=False)
    assert Alert.from_dict(json.loads(json.dumps(d))) == alert
    nan = Alert("x", 0, "info", math.nan, -math.inf, "")  # type: ignore[arg-type]
    back = Alert.from_dict(nan.to_dict())
    assert math.isnan(back.value) and back.threshold == -math.inf and back.level is AlertLevel.INFO
    assert Alert.from_dict({"rule": "r", "step": 1, "level": "error"}).stop is False
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['level'\]"):
        Alert.from_dict({"rule": "r", "step": 1})
    with pytest.raises(ValueError, match="level"):
        Alert.from_dict({"rule": "r", "step": 1, "level": "fatal"})


@pytest.mark.parametrize(
    ("rule", "level", "step", "message"),
    [
        ("drift", "warn", 7, "k2 and k3 disagree"),
        ("kl_budget", "error", 0, "KL per token (k3 mean) is 0.5: above the budget max_kl = 0.1 (5x)"),
        ("my rule", "info", 123456789, "a message with **stars**, (parentheses) and: colons"),
        ("x", "warn", 3, ""),
    ],
)
def test_text_round_trip(rule: str, level: str, step: int, message: str) -> None:
    alert = Alert(rule, step, level, 1.0, 0.5, message)  # type: ignore[arg-type]
    text = alert.text()
    assert text == f"**{rule}** ({level}) at step {step}: {message}"
    assert parse_alert_text(text) == (rule, level, step, message)
    # as a sink writes it: inside other text (a TensorBoard markdown entry, a log line)
    assert parse_alert_text(f"WARNING klmonitor: {text}\n") == (rule, level, step, message)


def test_parse_alert_text_ignores_other_text_and_levels_are_case_blind() -> None:
    assert parse_alert_text("step 7: k2 and k3 disagree") is None
    assert parse_alert_text("") is None
    assert Alert("r", 1, "WARN", 0.0, 0.0, "").level is AlertLevel.WARN  # type: ignore[arg-type]
    assert [level.value for level in AlertLevel] == ["info", "warn", "error"]
    with pytest.raises(
        ValueError, match=r"^level must be an AlertLevel or one of \('info', 'warn', 'error'\), got 'fatal'$"
    ):
        Alert("r", 1, "fatal", 0.0, 0.0, "")  # type: ignore[arg-type]
