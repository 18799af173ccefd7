"""The alert event and its one text form: :class:`AlertLevel`, :class:`Alert`, :func:`parse_alert_text`.

An :class:`Alert` is what a rule returns when it fires; sinks write it (TensorBoard text, log
lines, W&B alerts) and readers parse it back. :meth:`Alert.text` and :func:`parse_alert_text`
define the text form once; :meth:`Alert.to_dict` and :meth:`Alert.from_dict` the JSON-safe dict
kept in checkpoints.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["Alert", "AlertLevel", "parse_alert_text"]

# The one text form of an alert (TensorBoard text, log lines); parse_alert_text reads it back.
_TEXT_FORMAT = "**{rule}** ({level}) at step {step}: {message}"
_TEXT_RE = re.compile(r"\*\*(?P<rule>[^*]+)\*\*\s*\((?P<level>\w+)\)\s*at step\s*(?P<step>-?\d+)")


class AlertLevel(str, Enum):
    """How serious an alert is; the value is the lower-case name used in logs and dicts.

    >>> AlertLevel("warn") is AlertLevel.WARN, AlertLevel.ERROR.value
    (True, 'error')
    """

    INFO = "info"
    WARN = "warn"
    ERROR = "error"


_LEVELS = tuple(level.value for level in AlertLevel)


def _as_level(level: Any, arg: str = "level") -> AlertLevel:
    if isinstance(level, AlertLevel):
        return level
    if isinstance(level, str) and level.lower() in _LEVELS:
        return AlertLevel(level.lower())
    raise ValueError(f"{arg} must be an AlertLevel or one of {_LEVELS}, got {level!r}")


def _float_to_json(x: float) -> float | str:
    # Strict JSON (W&B, browsers) has no NaN/Infinity; keep them as strings float() reads back.
    return x if math.isfinite(x) else str(x)


@dataclass
class Alert:
    """One firing of a rule.

    Attributes:
        rule: the name of the rule that fired.
        step: the training step (the trainer's ``global_step``) of the window.
        level: :class:`AlertLevel` (a plain string is converted).
        value: what the rule measured (its unit depends on the rule, see its docstring).
        threshold: the rule's threshold ``value`` was compared with.
        message: a sentence for a person: what happened, how big, what to check.
        stop: ``True`` when the rule asks to stop training.

    >>> a = Alert("drift", 100, AlertLevel.WARN, 0.25, 0.1, "k2 and k3 disagree by 25%")
    >>> a.level, a.to_dict()["level"], Alert.from_dict(a.to_dict()) == a
    (<AlertLevel.WARN: 'warn'>, 'warn', True)
    """

    rule: str
    step: int
    level: AlertLevel
    value: float
    threshold: float
    message: str
    stop: bool = False

    def __post_init__(self) -> None:
        self.level = _as_level(self.level)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: the level as its string, non-finite floats as ``"inf"``/``"nan"``.

        ``json.dumps(alert.to_dict(), allow_nan=False)`` always works.
        """
        return {
            "rule": self.rule,
            "step": int(self.step),
            "level": self.level.value,
            "value": _float_to_json(float(self.value)),
            "threshold": _float_to_json(float(self.threshold)),
            "message": self.message,
            "stop": bool(self.stop),
        }

    def text(self) -> str:
        """The alert as one line of text (TensorBoard text entries; :func:`parse_alert_text` reads it).

        >>> Alert("drift", 7, "warn", 0.2, 0.1, "k2 and k3 disagree").text()
        '**drift** (warn) at step 7: k2 and k3 disagree'
        """
        return _TEXT_FORMAT.format(
            rule=self.rule, level=self.level.value, step=self.step, message=self.message
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Alert:
        """Rebuild an alert from :meth:`to_dict` output (missing optional keys get defaults).

        Raises:
            ValueError: ``rule``, ``step`` or ``level`` missing, or an unknown level.
        """
        missing = [k for k in ("rule", "step", "level") if k not in d]
        if missing:
            raise ValueError(f"alert dict lacks the key(s) {missing}; got keys {sorted(d)}")
        return cls(
            rule=str(d["rule"]),
            step=int(d["step"]),
            level=_as_level(d["level"], "alert dict 'level'"),
            value=float(d.get("value", math.nan)),
            threshold=float(d.get("threshold", math.nan)),
            message=str(d.get("message", "")),
            stop=bool(d.get("stop", False)),
        )


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def parse_alert_text(text: str) -> tuple[str, str, int, str] | None:
    """``(rule, level, step, message)`` from :meth:`Alert.text`, or ``None`` for other text.

    >>> parse_alert_text("**drift** (warn) at step 120: k2 and k3 disagree")
    ('drift', 'warn', 120, 'k2 and k3 disagree')
    """
    m = _TEXT_RE.search(text)
    if m is None:
        return None
    return m["rule"].strip(), m["level"].lower(), int(m["step"]), text[m.end() :].lstrip(": ").strip()
