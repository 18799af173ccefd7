"""Alert rules: decisions from a window's :class:`~klmonitor.stats.KLSummary` (no I/O).

A :class:`Rule` turns a summary into a number (:meth:`Rule.measure`), compares it with its
threshold (:meth:`Rule.triggered`) and fires an :class:`Alert` once the condition has held for
``patience`` consecutive windows, then stays quiet for ``cooldown`` windows so a lasting
condition does not raise a storm. An :class:`AlertEngine` evaluates a list of rules on each
summary and keeps a bounded history. Everything is decided from the (rank-synced) summary, so
every rank of a distributed job decides the same; speaking is left to the caller.

The default rules (:func:`default_rules`):

=====================  ===============================================  =========  ========
name                   fires when                                       threshold  level
=====================  ===============================================  =========  ========
``drift``              ``|(k2 - k3) / k3| > threshold``, and the paired  2.0        warn
                       gap is ``> min_z`` standard errors
``spike``              the KL jumps ``> threshold`` robust standard      6          warn
                       deviations above its recent running mean
``nonfinite``          NaN/inf log-ratios (and mask values other than 0  0          error
                       or 1) counted ``> threshold``
``extreme``            tokens with |l| > ``extreme`` counted ``> thr.``  0          warn
``sampling_mismatch``  the mean of ``r`` is off 1 by ``> threshold``     5          warn
                       standard errors (low side: also beyond what the
                       tail past the window's largest ``r`` can hide),
                       or is ``>= max_mean_ratio`` (20); 3 windows
``initial_kl``         before the first optimizer step, >= 1 % of the    2.5e-4     warn
                       tokens differ beyond float rounding and their
                       per-token KL is above ``threshold``; once per run
``rollout_mismatch``   KL(rollout || trainer) per token ``> threshold``  0.01       warn
                       and ``> min_z`` standard errors; 2 windows
``kl_budget``          the chosen estimator's mean ``> max_kl``          user's     error
=====================  ===============================================  =========  ========
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from klmonitor._validate import check_int as _check_int
from klmonitor._validate import check_number as _check_number
from klmonitor.summary import ESTIMATORS, KLSummary

__all__ = [
    "Alert",
    "AlertEngine",
    "AlertLevel",
    "DriftRule",
    "ExtremeRule",
    "InitialKLRule",
    "KLBudgetRule",
    "NonFiniteRule",
    "Rule",
    "SamplingMismatchRule",
    "RolloutMismatchRule",
    "SpikeRule",
    "DEFAULT_DRIFT_THRESHOLD",
    "default_rules",
    "parse_alert_text",
]

_STATE_VERSION = 1
# Estimator names accepted by KLBudgetRule (those KLSummary.estimator knows).
_BUDGET_ESTIMATORS = ESTIMATORS
#: The ``drift`` rule's default threshold on ``(mean k2 - mean k3) / mean k3`` (also drawn by
#: ``klmonitor report``): k2 three times k3. Healthy runs of ``benchmarks/bench_alerts.py``
#: reach gaps of 0.3-1.5 at per-token KLs of 0.3-1.5 (0.1 fired on every one of them).
DEFAULT_DRIFT_THRESHOLD = 2.0
# The one text form of an alert (TensorBoard text, log lines); parse_alert_text reads it back.
_TEXT_FORMAT = "**{rule}** ({level}) at step {step}: {message}"
_TEXT_RE = re.compile(r"\*\*(?P<rule>[^*]+)\*\*\s*\((?P<level>\w+)\)\s*at step\s*(?P<step>-?\d+)")
# Windows a default rule stays quiet after firing: at most one alert per 11 windows per rule.
_DEFAULT_COOLDOWN = 10
# SamplingMismatchRule's defaults, also used by DriftRule to tell a sampling gap from drift.
_SM_THRESHOLD = 5.0
_SM_MIN_SAMPLES = 100
_SM_TAIL_FACTOR = 10.0
_SM_MAX_MEAN_RATIO = 20.0
_SM_MIN_ABS_MEAN = 1e-3


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


# -- rules -------------------------------------------------------------------------------


class Rule(ABC):
    """Base class of alert rules: a measured value, a threshold, patience and cooldown.

    Subclasses implement :meth:`measure` (and usually :meth:`message`); :meth:`triggered`
    defaults to ``value > threshold``. A window where :meth:`measure` returns ``None`` (not
    applicable) resets the patience streak and never fires.

    Args:
        threshold: the value :meth:`triggered` compares with (a finite number).
        patience: consecutive triggered windows needed before the rule fires (``>= 1``).
            After firing, the streak starts again from 0.
        cooldown: windows after a firing during which the rule cannot fire again (``>= 0``),
            so a lasting condition gives one alert per ``cooldown + 1`` windows, not a storm.
        level: the :class:`AlertLevel` of its alerts (or ``"info"``, ``"warn"``, ``"error"``).
        stop_training: mark its alerts ``stop=True`` (the callback then stops training).
        name: overrides the class's default name (names must be unique in an engine).

    >>> class TokensBelow(Rule):
    ...     name = "few_tokens"
    ...     def measure(self, summary):
    ...         return float(summary.tokens)
    ...     def triggered(self, value, summary):
    ...         return value < self.threshold
    >>> import torch; from klmonitor import KLStats
    >>> stats = KLStats(); stats.update(torch.zeros(3), torch.zeros(3))
    >>> TokensBelow(10).evaluate(stats.compute(), step=7).message
    'few_tokens: value 3 (threshold 10)'
    """

    name: str = "rule"

    def __init__(
        self,
        threshold: float,
        *,
        patience: int = 1,
        cooldown: int = 0,
        level: AlertLevel | str = AlertLevel.WARN,
        stop_training: bool = False,
        name: str | None = None,
    ) -> None:
        self.threshold = _check_number(threshold, "threshold")
        self.patience = _check_int(patience, "patience", low=1, hint=" (consecutive windows before firing)")
        self.cooldown = _check_int(cooldown, "cooldown", low=0, hint=" (quiet windows after firing)")
        self.level = _as_level(level)
        if not isinstance(stop_training, bool):
            raise TypeError(f"stop_training must be True or False, got {stop_training!r}")
        self.stop_training = stop_training
        if name is not None:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"name must be a non-empty string, got {name!r}")
            self.name = name
        self._streak = 0
        self._cooldown_left = 0

    @abstractmethod
    def measure(self, summary: KLSummary) -> float | None:
        """The value compared with the threshold; ``None`` when the rule does not apply."""

    def triggered(self, value: float, summary: KLSummary) -> bool:
        """Whether ``value`` crosses the threshold in this window (default: ``value > threshold``)."""
        return value > self.threshold

    def message(self, value: float, summary: KLSummary) -> str:
        """A sentence for a person: what happened, how big, what to check."""
        return f"{self.name}: value {_fmt(value)} (threshold {_fmt(self.threshold)})"

    def observe(self, summary: KLSummary) -> None:
        """Hook run after every evaluation (e.g. to update a running history); no-op here."""
        return None

    def evaluate(self, summary: KLSummary, step: int) -> Alert | None:
        """Update patience and cooldown with this window; return an :class:`Alert` if it fires.

        Args:
            summary: the window's :class:`KLSummary`.
            step: the training step the window is logged at.
        """
        if not isinstance(summary, KLSummary):
            raise TypeError(
                f"summary must be a KLSummary (from KLStats.compute()), got {type(summary).__name__}"
            )
        step = _check_int(step, "step", low=0, hint=" (the trainer's global_step)")
        alert = None
        value = self.measure(summary)
        fired = False
        if value is None:
            self._streak = 0
        elif self.triggered(value, summary):
            self._streak += 1
            fired = self._cooldown_left == 0 and self._streak >= self.patience
        else:
            self._streak = 0
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
        if fired and value is not None:
            self._streak = 0
            self._cooldown_left = self.cooldown
            alert = Alert(
                rule=self.name,
                step=step,
                level=self.level,
                value=float(value),
                threshold=self.threshold,
                message=self.message(value, summary),
                stop=self.stop_training,
            )
        self.observe(summary)
        return alert

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to decide exactly like an uninterrupted one."""
        return {"streak": self._streak, "cooldown_left": self._cooldown_left}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; missing keys take their fresh-rule defaults.

        Raises:
            ValueError: a value out of range (a negative or non-integer streak, a cooldown
                left outside ``[0, cooldown]``): such a state would silence the rule.
        """
        streak = _state_int(state.get("streak", 0), f"rule {self.name!r}: streak", high=None)
        left = _state_int(state.get("cooldown_left", 0), f"rule {self.name!r}: cooldown_left", self.cooldown)
        self._streak, self._cooldown_left = streak, left

    def reset(self) -> None:
        """Forget the streak, the cooldown and any history."""
        self._streak = 0
        self._cooldown_left = 0

    def restore_missing(self) -> None:
        """Called by :meth:`AlertEngine.load_state_dict` when the state has none for this rule.

        Resets it by default; a rule whose fresh state means "at the start of training" (like
        :class:`InitialKLRule`) overrides this.
        """
        self.reset()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(threshold={self.threshold}, patience={self.patience}, "
            f"cooldown={self.cooldown}, level={self.level.value!r}, name={self.name!r})"
        )


class DriftRule(Rule):
    """k2 and k3 separate: the policy has left the region where KL is quadratic.

    Measures ``summary.drift = (mean k2 - mean k3) / mean k3`` and fires when
    ``|drift| > threshold`` and the paired difference ``k2 - k3`` is more than ``min_z``
    standard errors from 0 (the gap is real, not noise). With a per-token KL of about 1e-7
    the relative gap is about 1e-5; it passes 0.1 at a per-token KL of roughly 0.1 to 0.4
    (see ESTIMATORS.md: the gap is third order in the change of the policy), which healthy
    runs reach, and the gap depends on the shape of the log-ratio's distribution as much as
    on the KL. The default threshold, 2.0 (k2 three times k3), is where the quadratic picture
    has failed outright: in ``benchmarks/bench_alerts.py`` healthy runs up to a per-token KL of
    1.5 peak at gaps of 0.3-1.5, and two of three runaway runs pass 2.3 within three windows
    (the third is caught by ``sampling_mismatch``). It is not a KL limit: set yours with
    ``max_kl`` (the ``kl_budget`` rule); lower this threshold to hear of the policy leaving the
    quadratic region earlier.

    Args:
        threshold: the largest ``|drift|`` tolerated (a fraction: 2.0 is 200%).
        min_z: the gap must also be more than this many standard errors.
        patience, cooldown, level, stop_training, name: as in :class:`Rule`.

    >>> import torch; from klmonitor import KLStats
    >>> s = KLStats(); s.update(torch.zeros(4), torch.tensor([0.01, -0.01, 0.02, -0.02]))
    >>> DriftRule().evaluate(s.compute(), step=1) is None
    True
    """

    name = "drift"

    def __init__(
        self,
        threshold: float = DEFAULT_DRIFT_THRESHOLD,
        *,
        min_z: float = 3.0,
        patience: int = 2,
        cooldown: int = _DEFAULT_COOLDOWN,
        level: AlertLevel | str = AlertLevel.WARN,
        stop_training: bool = False,
        name: str | None = None,
    ) -> None:
        _check_number(threshold, "threshold", low=0.0, hint=" (the relative k2-k3 gap, e.g. 2.0)")
        super().__init__(
            threshold,
            patience=patience,
            cooldown=cooldown,
            level=level,
            stop_training=stop_training,
            name=name,
        )
        self.min_z = _check_number(min_z, "min_z", low=0.0, low_inclusive=True)

    def measure(self, summary: KLSummary) -> float | None:
        """The signed relative gap ``drift``; ``None`` when undefined (no samples)."""
        return summary.drift if math.isfinite(summary.drift) else None

    def triggered(self, value: float, summary: KLSummary) -> bool:
        """``|drift| > threshold`` and ``|drift_z| > min_z``."""
        z = summary.drift_z
        return abs(value) > self.threshold and not math.isnan(z) and abs(z) > self.min_z

    def message(self, value: float, summary: KLSummary) -> str:
        """Explain the gap and what to check."""
        side = "above" if value > 0 else "below"
        return (
            f"k2 and k3 disagree by {abs(value):.0%} (k2 is {side} k3: mean k2 = {_fmt(summary.k2.mean)}, "
            f"mean k3 = {_fmt(summary.k3.mean)}, gap {_fmt(abs(summary.drift_z))} standard errors; "
            f"threshold {self.threshold:.0%}): "
        ) + self._cause(summary)

    @staticmethod
    def _cause(summary: KLSummary) -> str:
        # k3 = k1 + (r - 1): when the mean of r - 1 is off, k3 (and so the gap) carries the
        # sampling error, and the learning rate is the wrong thing to change.
        side = 0
        if summary.count >= _SM_MIN_SAMPLES:
            side = _mismatch_side(
                summary, _SM_THRESHOLD, _SM_TAIL_FACTOR, _SM_MAX_MEAN_RATIO, _SM_MIN_ABS_MEAN
            )
        if side == 0:
            return (
                "the policy has left the region where the quadratic approximation of KL holds. "
                "Check the learning rate and the KL coefficient."
            )
        rm1 = summary.r_minus_1
        return (
            f"but k1 and k3 disagree too (mean k1 = {_fmt(summary.k1.mean)}, mean k3 = "
            f"{_fmt(summary.k3.mean)}; their difference, the mean of r - 1, is {_fmt(rm1.mean)}, "
            f"{_fmt(rm1.z)} standard errors from 0, where exact sampling gives 0). The samples were "
            "probably not drawn from the policy whose log-probs were given (see the "
            "sampling_mismatch alert: top-k/top-p or temperature in the sampler only, shifted "
            "tokens, stale log-probs), so this gap is not a learning-rate signal: fix the "
            "sampling first."
        )


class KLBudgetRule(Rule):
    """The KL estimate exceeds the user's budget ``max_kl``.

    Args:
        max_kl: the largest KL tolerated, in nats, on the summary's scale (per token at
            token level, per sequence at sequence level); the rule's ``threshold``.
        estimator: whose mean is compared: ``"k3"`` (default: unbiased, never negative),
            ``"k1"``, ``"k2"`` or ``"kl_pq"`` (the reverse KL).
        patience, cooldown, level, stop_training, name: as in :class:`Rule`.

    >>> import torch; from klmonitor import KLStats
    >>> s = KLStats(); s.update(torch.zeros(4), torch.tensor([1.0, -1.0, 2.0, -2.0]))
    >>> KLBudgetRule(max_kl=0.5).evaluate(s.compute(), step=3).level.value
    'error'
    """

    name = "kl_budget"

    def __init__(
        self,
        max_kl: float,
        *,
        estimator: str = "k3",
        patience: int = 1,
        cooldown: int = _DEFAULT_COOLDOWN,
        level: AlertLevel | str = AlertLevel.ERROR,
        stop_training: bool = False,
        name: str | None = None,
    ) -> None:
        _check_number(max_kl, "max_kl", low=0.0, hint=" (the KL budget in nats)")
        if estimator not in _BUDGET_ESTIMATORS:
            raise ValueError(f"estimator must be one of {_BUDGET_ESTIMATORS}, got {estimator!r}")
        super().__init__(
            max_kl, patience=patience, cooldown=cooldown, level=level, stop_training=stop_training, name=name
        )
        self.estimator = estimator

    @property
    def max_kl(self) -> float:
        """The budget (the same number as ``threshold``)."""
        return self.threshold

    def measure(self, summary: KLSummary) -> float | None:
        """The chosen estimator's mean; ``None`` when undefined (no samples)."""
        mean = summary.estimator(self.estimator).mean
        return None if math.isnan(mean) else mean

    def message(self, value: float, summary: KLSummary) -> str:
        """Say how far over budget the KL is."""
        per = "sequence" if summary.level == "sequence" else "token"
        return (
            f"KL per {per} ({self.estimator} mean) is {_fmt(value)}, above the budget max_kl = "
            f"{_fmt(self.threshold)} ({value / self.threshold:.2g}x): the policy is further from the "
            "reference than allowed. Lower the learning rate, raise the KL coefficient, or roll back "
            "to an earlier checkpoint."
        )


class SpikeRule(Rule):
    """The KL jumps far above its recent running mean.

    Keeps the finite KL values (the mean of k3: never negative, one estimator in every window,
    where the headline ``summary.kl`` switches to k1 in some) of the last ``window``
    windows. With at least ``min_history`` of them, the measured value is the jump in robust
    standard deviations, ``(kl - mean) / max(std, rel_floor * |mean|, abs_floor)``, and the
    rule fires when it exceeds ``threshold``. The floors keep a flat history (a KL of 1e-7,
    or exactly 0, with tiny noise) from turning a negligible change into a spike: a jump must
    exceed ``threshold * rel_floor`` of the recent mean (60% by default) and
    ``threshold * abs_floor`` nats (6e-3). Drops are never spikes.

    Args:
        threshold: the jump, in (floored) standard deviations, that fires (``n_std``).
        window: how many past windows the running mean/std are over.
        min_history: past values needed before the rule can fire.
        rel_floor: the std used is at least this fraction of ``|mean|``.
        abs_floor: ... and at least this many nats.
        patience, cooldown, level, stop_training, name: as in :class:`Rule`.

    >>> import torch; from klmonitor import KLStats
    >>> rule, s = SpikeRule(min_history=3), KLStats()
    >>> for shift in (0.1, 0.1, 0.1, 3.0):
    ...     s.reset(); s.update(torch.zeros(4), torch.tensor([shift, -shift, shift, -shift]))
    ...     alert = rule.evaluate(s.compute(), step=1)
    >>> alert.rule, alert.value > rule.threshold
    ('spike', True)
    """

    name = "spike"

    def __init__(
        self,
        threshold: float = 6.0,
        *,
        window: int = 20,
        min_history: int = 5,
        rel_floor: float = 0.1,
        abs_floor: float = 1e-3,
        patience: int = 1,
        cooldown: int = _DEFAULT_COOLDOWN,
        level: AlertLevel | str = AlertLevel.WARN,
        stop_training: bool = False,
        name: str | None = None,
    ) -> None:
        _check_number(threshold, "threshold", low=0.0, hint=" (standard deviations, e.g. 6)")
        super().__init__(
            threshold,
            patience=patience,
            cooldown=cooldown,
            level=level,
            stop_training=stop_training,
            name=name,
        )
        self.window = _check_int(window, "window", low=2, hint=" (past windows in the running mean/std)")
        self.min_history = _check_int(min_history, "min_history", low=2, hint=" (past values needed)")
        if self.min_history > self.window:
            raise ValueError(
                f"min_history ({min_history}) must be <= window ({window}); the history keeps only "
                "`window` values"
            )
        self.rel_floor = _check_number(rel_floor, "rel_floor", low=0.0, low_inclusive=True)
        self.abs_floor = _check_number(abs_floor, "abs_floor", low=0.0, hint=" (nats; keeps a flat KL quiet)")
        self._history: deque[float] = deque(maxlen=self.window)

    def _baseline(self) -> tuple[float, float]:
        n = len(self._history)
        mean = math.fsum(self._history) / n
        var = math.fsum((x - mean) * (x - mean) for x in self._history) / (n - 1)  # inf, not OverflowError
        scale = max(math.sqrt(var), self.rel_floor * abs(mean), self.abs_floor)
        return mean, scale

    def measure(self, summary: KLSummary) -> float | None:
        """``(kl - mean) / scale`` of the recent history; ``None`` before ``min_history``."""
        kl = summary.k3.mean
        if len(self._history) < self.min_history or not math.isfinite(kl):
            return None
        mean, scale = self._baseline()
        return (kl - mean) / scale

    def message(self, value: float, summary: KLSummary) -> str:
        """Say how big the jump is against the recent history."""
        mean, _ = self._baseline()
        times = f", {summary.k3.mean / mean:.3g}x its recent mean" if mean > 0 else ""
        return (
            f"KL (k3) jumped to {_fmt(summary.k3.mean)} from a recent mean of {_fmt(mean)} over the last "
            f"{len(self._history)} windows{times} ({_fmt(value)} standard deviations; threshold "
            f"{_fmt(self.threshold)}). Check this step's batch (an outlier prompt or reward), a "
            "learning-rate spike, or a policy collapse."
        )

    def observe(self, summary: KLSummary) -> None:
        """Append this window's KL to the history (finite values only)."""
        if math.isfinite(summary.k3.mean):
            self._history.append(float(summary.k3.mean))

    @property
    def history(self) -> list[float]:
        """The recent KL values, oldest first."""
        return list(self._history)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {**super().state_dict(), "history": list(self._history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        history = state.get("history", [])
        if not isinstance(history, list | tuple) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in history
        ):
            raise ValueError(f"rule {self.name!r}: history is {history!r}, not a list of finite numbers")
        super().load_state_dict(state)
        self._history = deque((float(x) for x in history), maxlen=self.window)

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self._history.clear()


class _TokenCountRule(Rule):
    """A rule that fires when a per-window token count exceeds ``threshold`` (default 0)."""

    default_level = AlertLevel.WARN

    def __init__(
        self,
        threshold: float = 0,
        *,
        patience: int = 1,
        cooldown: int = _DEFAULT_COOLDOWN,
        level: AlertLevel | str | None = None,
        stop_training: bool = False,
        name: str | None = None,
    ) -> None:
        _check_number(threshold, "threshold", low=0.0, low_inclusive=True, hint=" (a token count)")
        super().__init__(
            threshold,
            patience=patience,
            cooldown=cooldown,
            level=self.default_level if level is None else level,
            stop_training=stop_training,
            name=name,
        )


class NonFiniteRule(_TokenCountRule):
    """Tokens whose log-ratio was NaN or infinite, or whose mask value was not 0 or 1 (kept out).

    Args:
        threshold: fires when more than this many such tokens are in a window.
        patience, cooldown, level (default error), stop_training, name: as in :class:`Rule`.

    >>> import torch; from klmonitor import KLStats
    >>> s = KLStats(); s.update(torch.zeros(3), torch.tensor([0.0, -float("inf"), 0.0]))
    >>> NonFiniteRule().evaluate(s.compute(), step=2).value
    1.0
    """

    name = "nonfinite"
    default_level = AlertLevel.ERROR

    def measure(self, summary: KLSummary) -> float | None:
        """The number of NaN/inf log-ratio tokens (and of tokens with an invalid mask value)."""
        return float(summary.nonfinite)

    def message(self, value: float, summary: KLSummary) -> str:
        """Say how many tokens, that they were excluded, and the usual causes."""
        total = summary.tokens + summary.nonfinite
        return (
            f"{int(value)} of {total} tokens had a NaN or infinite log-ratio log p - log q (or one "
            "above +700, whose ratio e^l is at float64's limit) and were excluded from the KL "
            "statistics (the true KL is infinite if a token is impossible under the reference). "
            "-inf usually means the reference gives a sampled token zero probability: "
            "a different tokenizer or vocabulary, or top-k/top-p masking applied to one model's "
            "logits; +inf the same for the policy; NaN means a bug upstream (NaN logits or log-probs). "
            "A numeric mask value other than 0 or 1 (0.5, -1, NaN) is counted here too: pass a bool "
            "mask, or one of 0s and 1s."
        )


class ExtremeRule(_TokenCountRule):
    """Tokens whose |log-ratio| exceeded ``KLStats(extreme=...)`` (20 nats by default).

    Such a token is one that policy and reference disagree on by a factor of e^20 (5e8) or
    more: the mark of a policy collapsing onto text the reference finds nearly impossible, or
    of a scoring bug. By default the estimates include it with its exact value (no clamp);
    this rule keeps it from passing unnoticed.

    Args:
        threshold: fires when more than this many tokens were extreme in a window.
        patience, cooldown, level (default warn), stop_training, name: as in :class:`Rule`.

    >>> import torch; from klmonitor import KLStats
    >>> s = KLStats(); s.update(torch.zeros(2), torch.tensor([0.0, -50.0]))
    >>> "50" in ExtremeRule().evaluate(s.compute(), step=2).message
    True
    """

    name = "extreme"

    def measure(self, summary: KLSummary) -> float | None:
        """The number of extreme tokens."""
        return float(summary.extreme)

    def message(self, value: float, summary: KLSummary) -> str:
        """Say how many tokens, how extreme, what the estimates did with them, and the causes."""
        m = summary.max_abs_log_ratio
        return (
            f"{int(value)} of {summary.tokens} tokens had |log p - log q| above the extreme "
            f"threshold (KLStats(extreme=...), 20 nats by default; largest: max_abs_log_ratio = "
            f"{_fmt(m)} nats, a probability ratio of e^{_fmt(m)}). Without a clamp (the default) "
            "they count in the KL estimates with their exact values, which such tokens can "
            "dominate; with clamp=... set they were clamped and the estimates are too small. "
            "Policy and reference disagree massively on these tokens: either the policy now emits "
            "text the reference finds nearly impossible (reward hacking, collapse; see the top "
            "sequences), or both do not score the same tokens (tokenizer, inputs, a one-token "
            "shift, masked logits of -1e9 scored as tokens). Raise extreme=... if such ratios are "
            "expected."
        )


def _per_sample_token_ratio(summary: KLSummary) -> float:
    # At sequence level each sample is a sum over its tokens; divide by the mean length.
    if summary.level == "sequence" and summary.tokens > 0:
        return summary.count / summary.tokens
    return 1.0


def _largest_ratio_bound(summary: KLSummary) -> float:
    """An upper bound on the largest per-sample ``r`` (per sequence: ``sum r_t``) of the window.

    Samuelson's inequality bounds any sample by ``mean + std * (n - 1) / sqrt(n)``; at token
    level ``r <= exp(max |l|)`` as well (the smaller of the two is used). The bound is loose
    when ``max |l|`` comes from a negative log-ratio (``r`` near 0), never too small.
    """
    n = summary.count
    rm1 = summary.r_minus_1
    # The mean of a sample's r: 1 per token, the mean length per sequence (a sum of r_t).
    length = summary.tokens / n if summary.level == "sequence" and n > 0 else 1.0
    bound = length + rm1.mean + (rm1.std * (n - 1) / math.sqrt(n) if n > 1 else 0.0)
    if summary.level == "token" and math.isfinite(summary.max_abs_log_ratio):
        bound = min(bound, math.exp(min(summary.max_abs_log_ratio, 700.0)))
    return bound


def _mismatch_side(
    summary: KLSummary, threshold: float, tail_factor: float, max_mean_ratio: float, min_abs_mean: float
) -> int:
    """+1 or -1 when the window's ``mean(r)`` says its samples are not the policy's, else 0.

    See :class:`SamplingMismatchRule` for the three tests and why each is sound.
    """
    rm1 = summary.r_minus_1
    z, n = rm1.z, summary.count
    if n < 2 or math.isnan(z):
        return 0
    if abs(rm1.mean) * _per_sample_token_ratio(summary) < min_abs_mean:
        return 0
    if z > threshold or 1.0 + rm1.mean * _per_sample_token_ratio(summary) >= max_mean_ratio:
        return 1
    if z < -threshold and -rm1.mean > tail_factor * _largest_ratio_bound(summary) / n:
        return -1
    return 0


class SamplingMismatchRule(Rule):
    """The samples were probably not drawn from the policy whose log-probs were given.

    Under exact sampling from the policy ``q``, ``r = p/q >= 0`` and ``E[r] = 1`` (when the
    reference gives no mass to tokens the policy cannot emit: ``E[r] <= 1`` otherwise), so
    ``mean(r) - 1 = mean(k3) - mean(k1)`` is 0 up to sampling noise. A sampler that differs
    from the scoring (top-k, top-p, a temperature, another engine, stale log-probs) or log-probs
    of other tokens (a one-token shift, a wrong mask) break it. The value measured is
    ``z = r_minus_1.z``; the rule fires (subject to ``min_samples``, ``min_abs_mean`` and
    ``patience``) when one of these holds:

    - **z > threshold** (``mean(r)`` too high): a heavy right tail of ``r`` inflates the
      standard error with the mean it inflates, so under exact sampling the self-normalised
      ``z`` is large only by chance (honest windows gave at most +3.7 in 2,600).
    - **mean(r) >= max_mean_ratio** (per token): by Markov's inequality an exact sampler gives a
      mean of ``r`` this high with probability at most ``1 / max_mean_ratio`` per window
      (``1 / max_mean_ratio**patience`` for ``patience`` windows in a row), whatever the tails.
      It catches a one-token shift when ``r``'s tail makes ``z`` small.
    - **z < -threshold and 1 - mean(r) > tail_factor * R / n** (``mean(r)`` too low), where
      ``R`` bounds the window's largest ``r``: the smaller of ``exp(max_abs_log_ratio)`` and
      Samuelson's ``mean + std * (n - 1) / sqrt(n)`` (per sequence, of ``sum r_t``; loose
      when ``max |l|`` comes from a negative log-ratio, never too small). ``r >= 0``, so
      ``mean(r)`` cannot fall far below 1 by chance, except by *missing* the part of ``r``'s
      right tail that the window did not sample (tokens the reference likes and the policy
      almost never emits). For a tail the window does sample, with ``P(r > x)`` falling like
      ``x**-a``, the mass beyond the largest sample is about ``a / (a - 1) * R / n``, so the
      second condition keeps such windows quiet for ``a >= 1.1`` (``tail_factor = 10``),
      at any KL. Truncated sampling leaves a deficit with no large ``r`` to explain it.

    What no test on these samples can tell apart: a sampler that never emits some tokens
    (top-k/top-p) from an exact sampler whose policy gives those tokens so little probability
    that a window rarely sees one (for example ``q = p * e^-8`` on tokens holding a few percent
    of the reference's mass: about one sample in 100,000 tokens, each with ``r = e^8``). Both
    fire on the negative side; the message says so, with the numbers.

    Args:
        threshold: the ``|z|`` that fires.
        min_samples: samples (tokens, or sequences) needed in the window.
        tail_factor: the low side needs a deficit of ``mean(r)`` above this many samples at the
            window's largest ratio, spread over the window (see above).
        max_mean_ratio: a per-token ``mean(r)`` at or above this fires whatever ``z``.
        min_abs_mean: the smallest per-token ``|mean(r - 1)|`` that can fire: a mismatch that
            moves the KL estimate (k3 - k1) by less than that many nats is not worth an alarm.
        patience, cooldown, level, stop_training, name: as in :class:`Rule`.

    >>> import torch; from klmonitor import KLStats
    >>> s = KLStats(); s.update(torch.zeros(200), torch.linspace(-0.1, 0.1, 200))
    >>> SamplingMismatchRule(patience=1).evaluate(s.compute(), step=0) is None
    True
    """

    name = "sampling_mismatch"

    def __init__(
        self,
        threshold: float = _SM_THRESHOLD,
        *,
        min_samples: int = _SM_MIN_SAMPLES,
        tail_factor: float = _SM_TAIL_FACTOR,
        max_mean_ratio: float = _SM_MAX_MEAN_RATIO,
        min_abs_mean: float = _SM_MIN_ABS_MEAN,
        patience: int = 3,
        cooldown: int = _DEFAULT_COOLDOWN,
        level: AlertLevel | str = AlertLevel.WARN,
        stop_training: bool = False,
        name: str | None = None,
    ) -> None:
        _check_number(threshold, "threshold", low=0.0, hint=" (standard errors, e.g. 5)")
        super().__init__(
            threshold,
            patience=patience,
            cooldown=cooldown,
            level=level,
            stop_training=stop_training,
            name=name,
        )
        self.min_samples = _check_int(min_samples, "min_samples", low=2)
        self.tail_factor = _check_number(
            tail_factor, "tail_factor", low=0.0, low_inclusive=True, hint=" (samples at the largest ratio)"
        )
        self.max_mean_ratio = _check_number(
            max_mean_ratio, "max_mean_ratio", low=1.0, hint=" (a per-token mean of r, e.g. 20)"
        )
        self.min_abs_mean = _check_number(min_abs_mean, "min_abs_mean", low=0.0, low_inclusive=True)

    def measure(self, summary: KLSummary) -> float | None:
        """``r_minus_1.z``, or ``None`` with fewer than ``min_samples`` samples."""
        z = summary.r_minus_1.z
        if summary.count < self.min_samples or math.isnan(z):
            return None
        return z

    def side(self, summary: KLSummary) -> int:
        """``+1`` (mean of r too high), ``-1`` (too low) or ``0`` (consistent) for this window."""
        if summary.count < self.min_samples:
            return 0
        return _mismatch_side(
            summary, self.threshold, self.tail_factor, self.max_mean_ratio, self.min_abs_mean
        )

    def triggered(self, value: float, summary: KLSummary) -> bool:
        """One of the tests of the class doc holds (see :meth:`side`)."""
        return self.side(summary) != 0

    def message(self, value: float, summary: KLSummary) -> str:
        """Explain what the mean of r says, what it cannot tell apart, and what to check."""
        rm1 = summary.r_minus_1
        per = _per_sample_token_ratio(summary)
        mean_r = 1.0 + rm1.mean * per
        head = (
            f"The mean of r = p/q is {_fmt(mean_r)} per token over {summary.count} samples "
            f"({_fmt(value)} standard errors from 1; threshold {_fmt(self.threshold)}); it is 1 "
            "when the tokens are sampled from the policy whose log-probs were given, so they "
            f"probably are not. k1 and k3, which agree then, are {_fmt(summary.k1.mean)} and "
            f"{_fmt(summary.k3.mean)} (mean k3 - k1 = mean(r - 1))."
        )
        if mean_r > 1:
            return (
                f"{head} Too high a mean of r means tokens the reference likes far more than the "
                "policy are over-represented: typically log-probs of other tokens than those "
                "sampled (tokens shifted by one between samples and log-probs, or policy and "
                "reference log-probs of different positions), a wrong mask, or samples drawn from "
                "another model (the reference, or stale log-probs: the sampler's weights behind "
                "the trainer's). Check the alignment of tokens, log-probs and mask first."
            )
        missing = 1.0 - mean_r
        if missing >= 0.8:
            return (
                f"{head} The tokens that hold {missing:.0%} of the reference's probability are "
                "missing from the samples. Either the policy has run away from the reference: it "
                "now gives them almost no probability (KL per token k1 = "
                f"{_fmt(summary.k1.mean)}, far past the quadratic regime; k3 then underestimates "
                f"the KL by about {_fmt(missing)} nats per token): check the KL coefficient, the "
                "learning rate and the reward for hacking (see the top sequences). Or the sampler "
                "truncates or sharpens the policy's distribution (top-k, top-p, a temperature "
                "below the scoring one) or lags the trainer's weights. The sampler's own "
                "log-probs (rollout_logprobs) let the rollout check tell the two apart."
            )
        return (
            f"{head} Too low a mean of r means the tokens the policy rarely emits are missing "
            "from the samples: typically the sampler truncates or sharpens the policy's "
            "distribution (top-k, top-p, a temperature below the scoring one; transformers' "
            "generate(do_sample=True) applies top_k=50 by default), an inference engine with "
            "other numerics, or stale log-probs (the sampler's weights behind the trainer's). "
            "Score the tokens with the exact distribution they were sampled from (same "
            "temperature, top-k/top-p applied to the log-probs too), or sample without "
            "truncation. If the sampler is exact, the policy gives almost no probability to "
            f"tokens that hold about {missing:.0%} of the reference's, and this window cannot "
            "tell that from truncated sampling: mean k3 then underestimates the KL by about "
            f"{_fmt(missing)} nats per token (k1 does not), and a longer window resolves it."
        )


class InitialKLRule(Rule):
    """The untrained policy differs from the reference, when it should start as an exact copy.

    RL fine-tuning usually starts the policy as a copy of the reference, so the batches scored
    before the first optimizer step give a log-ratio of 0 on every token, up to the rounding of
    the log-probs' dtype. The rule reads those batches only (``summary.initial``: fed by
    :class:`~klmonitor.Monitor` and every adapter until the first optimizer step; a run resumed
    from a checkpoint is past it), so training inside the first window cannot trip it. It asks
    two things, token by token rather than of a mean, so that one heavy token can neither
    raise nor hide it:

    - at least ``min_share`` of the tokens differ by more than float rounding (``|l|`` above
      twice the dtype's machine epsilon times the larger ``|log-prob|``; bf16: 1.6 %), and
    - their mean KL (k3, nats per token) is above ``threshold``, so the numerical noise of
      other kernels, batch shapes or TF32 on the same weights (a KL far below 1e-4) is not
      taken for a bug.

    Dropout left on while scoring (TRL's ``disable_dropout=False``), a temperature or
    top-k/top-p applied to one side's logits, a one-token shift, different weights (the wrong
    checkpoint) or dtypes change most tokens. It decides once, at the end of the first window
    that holds at least ``min_tokens`` such tokens, and stays silent for the rest of the run
    (also after a resume).

    Args:
        threshold: the mean KL per token (k3, nats) of the untrained policy's tokens above
            which it fires. The default, 2.5e-4, is half of what a dropout of only 0.001 gives
            a tiny GPT-2 scored in train mode (4.8e-4, 94 % of the tokens differing; dropout
            0.1: 0.077), 17x what a bf16 copy of a float32 reference gives (1.5e-5, every token
            differing) and far above float32 kernel noise (~1e-12). Bigger bf16 models scored
            with other kernels or batch shapes on the two sides may differ by more: raise it
            if that is your setup and you accept it.
        min_share: the share of tokens that must differ beyond rounding.
        min_tokens: tokens (over all ranks) the check needs; with fewer before the first
            step it is skipped (and not made later).
        level, stop_training, name: as in :class:`Rule` (fires at most once: no patience or
            cooldown).

    To silence it when the policy deliberately starts elsewhere (a policy fine-tuned before the
    reference was frozen, a distilled model), leave it out: ``rules=[r for r in
    default_rules() if r.name != "initial_kl"]``, or pass ``InitialKLRule(threshold=...)``.

    >>> import torch; from klmonitor import Monitor
    >>> mon = Monitor(log_every_n_steps=5)
    >>> lp = torch.full((400,), -2.0)
    >>> for step in range(1, 6):
    ...     # An exact copy before the first optimizer step; then training moves the policy.
    ...     mon.update(lp, lp if step == 1 else lp - 0.5)
    ...     res = mon.step(step)
    >>> [a.rule for a in res.alerts if a.rule == "initial_kl"], res.summary.initial.differing
    ([], 0)
    """

    name = "initial_kl"

    def __init__(
        self,
        threshold: float = 2.5e-4,
        *,
        min_share: float = 0.01,
        min_tokens: int = 16,
        level: AlertLevel | str = AlertLevel.WARN,
        stop_training: bool = False,
        name: str | None = None,
    ) -> None:
        _check_number(threshold, "threshold", low=0.0, hint=" (a per-token KL in nats, e.g. 2.5e-4)")
        super().__init__(
            threshold, patience=1, cooldown=0, level=level, stop_training=stop_training, name=name
        )
        self.min_share = _check_number(min_share, "min_share", low=0.0, low_inclusive=True)
        if self.min_share > 1:
            raise ValueError(f"min_share is a fraction of the tokens in [0, 1], got {min_share!r}")
        self.min_tokens = _check_int(min_tokens, "min_tokens", low=1)
        self._checked = False

    @property
    def checked(self) -> bool:
        """Whether the untrained policy has been checked (the rule is then silent for good)."""
        return self._checked

    def _ready(self, summary: KLSummary) -> bool:
        init = summary.initial
        return not self._checked and init is not None and init.tokens >= self.min_tokens

    def measure(self, summary: KLSummary) -> float | None:
        """The untrained policy's mean KL per token (k3), or ``None`` when there is nothing to check."""
        if not self._ready(summary):
            return None
        assert summary.initial is not None
        kl = summary.initial.kl
        return kl if math.isfinite(kl) else None

    def triggered(self, value: float, summary: KLSummary) -> bool:
        """``value > threshold`` and at least ``min_share`` of the tokens differ beyond rounding."""
        assert summary.initial is not None
        return value > self.threshold and summary.initial.share >= self.min_share

    def message(self, value: float, summary: KLSummary) -> str:
        """Give the numbers, the usual causes and how to silence the rule."""
        init = summary.initial
        assert init is not None
        return (
            f"Before the first optimizer step the policy already differs from the reference: "
            f"{init.share:.1%} of {init.tokens} tokens have log-probs that differ by more than float "
            f"rounding, and the KL is {_fmt(value)} nats per token (k3; k1 {_fmt(init.k1)}; threshold "
            f"{_fmt(self.threshold)}). A policy that starts as a copy of the reference gives 0 on "
            "every token. Usual causes: dropout active (train mode) while scoring one side (TRL: "
            "disable_dropout=True), a temperature or top-k/top-p applied to one side's logits "
            "only, a one-token shift between the two log-probs, different weights (wrong "
            "checkpoint), or different dtypes for the two models. If the policy deliberately "
            "starts elsewhere, drop this rule (rules=[r for r in default_rules() if r.name != "
            "'initial_kl']) or raise InitialKLRule(threshold=...)."
        )

    def observe(self, summary: KLSummary) -> None:
        """Mark the check done once a window held enough of the untrained policy's tokens."""
        if self._ready(summary):
            self._checked = True

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {**super().state_dict(), "checked": self._checked}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        self._checked = bool(state.get("checked", False))

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self._checked = False

    def restore_missing(self) -> None:
        """A checkpoint without this rule's state comes from a run past its start: stay silent."""
        self.reset()
        self._checked = True


class RolloutMismatchRule(Rule):
    """The engine that sampled the tokens disagrees with the trainer: KL(rollout || trainer) is large.

    Needs ``rollout_logprobs`` (the sampled tokens' log-probs under the rollout engine: vLLM,
    SGLang, HF generate). Measures the per-token KL(rollout || trainer), the rollout's ``k3``
    mean (or its ``k1`` mean when that is larger and significant: an engine that truncates,
    top-k or top-p, never samples part of the trainer's distribution, which k3 cannot see and
    k1 measures exactly), and fires when it exceeds ``threshold`` and is more than ``min_z``
    standard errors from 0. This is what catches truncated sampling when the policy is near
    the reference, where the main ``sampling_mismatch`` check is blind (E[r] = 1 whatever the
    sampler when the policy equals the reference). Matched engines in bf16 typically disagree by 1e-4 to 1e-3 nats per token; 1e-2
    means the policy gradient is computed on samples the trainer would not draw.

    Args:
        threshold: the per-token KL(rollout || trainer) tolerated, in nats.
        min_z: the KL must also be this many standard errors above 0.
        patience, cooldown, level, stop_training, name: as in :class:`Rule`.
    """

    name = "rollout_mismatch"

    def __init__(
        self,
        threshold: float = 0.01,
        *,
        min_z: float = 3.0,
        patience: int = 2,
        cooldown: int = _DEFAULT_COOLDOWN,
        level: AlertLevel | str = AlertLevel.WARN,
        stop_training: bool = False,
        name: str | None = None,
    ) -> None:
        _check_number(threshold, "threshold", low=0.0, hint=" (per-token KL(rollout || trainer) in nats)")
        super().__init__(
            threshold,
            patience=patience,
            cooldown=cooldown,
            level=level,
            stop_training=stop_training,
            name=name,
        )
        self.min_z = _check_number(min_z, "min_z", low=0.0, low_inclusive=True)

    @staticmethod
    def _estimate(summary: KLSummary) -> tuple[str, float, float]:
        """The KL(rollout || trainer) estimate judged: name, mean and z.

        k3 (lowest variance) unless k1 is larger and significant: k3 is unbiased only when
        the rollout engine can sample every token the trainer can (E[r] = 1); an engine that
        truncates (top-k, top-p) puts r's mean below 1 and k3 near 0, while k1 stays exact.
        """
        assert summary.rollout is not None
        k1, k3 = summary.rollout.kl.k1, summary.rollout.kl.k3
        if k1.mean > k3.mean and k1.z > 3.0:
            return "k1", k1.mean, k1.z
        return "k3", k3.mean, k3.z

    def measure(self, summary: KLSummary) -> float | None:
        """KL(rollout || trainer) per token (k3, or k1 when larger and significant); ``None`` without rollout log-probs."""
        if summary.rollout is None or summary.rollout.kl.count == 0:
            return None
        return self._estimate(summary)[1]

    def triggered(self, value: float, summary: KLSummary) -> bool:
        """``value > threshold`` and ``z > min_z``."""
        _, _, z = self._estimate(summary)
        return value > self.threshold and not math.isnan(z) and z > self.min_z

    def message(self, value: float, summary: KLSummary) -> str:
        """The numbers, what they mean and what to check."""
        r = summary.rollout
        assert r is not None
        name, _, _ = self._estimate(summary)
        truncated = (
            f" The mean ratio is {_fmt(r.ratio_mean)}: the engine never samples tokens holding about "
            f"{1 - r.ratio_mean:.0%} of the trainer's probability (top-k/top-p in the engine only, "
            "or the engine's log-probs taken after truncation while the trainer scores the full "
            "softmax)."
            if name == "k1" and r.ratio_mean < 1
            else ""
        )
        return (
            f"The rollout engine and the trainer disagree: KL(rollout || trainer) = {_fmt(value)} nats per "
            f"token ({name}) over {r.kl.tokens} tokens (threshold {_fmt(self.threshold)}); the ratio "
            f"pi_trainer / pi_rollout ranges {_fmt(r.ratio_min)} to {_fmt(r.ratio_max)} and is outside "
            f"[0.5, 2] for {r.ratio_outside:.2%} of tokens.{truncated} The samples are then off-policy "
            "for the trainer. Check that the engine has the trainer's latest weights, the same dtype and "
            "sampling settings (temperature, top-k/top-p applied to the engine's log-probs the same way "
            "as the trainer's), and that both score the same tokens; or correct with importance weights "
            "(truncated IS)."
        )


# -- engine ------------------------------------------------------------------------------


def _state_int(value: Any, what: str, high: int | None) -> int:
    """``value`` as a saved counter: an int in ``[0, high]`` (``high=None``: no upper bound)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 0
        or (high is not None and value > high)
    ):
        bound = "" if high is None else f" <= {high}"
        raise ValueError(f"{what} is {value!r}, not an int >= 0{bound}")
    return value


class AlertEngine:
    """Evaluates a list of rules on each summary and keeps a bounded history of alerts.

    Args:
        rules: the rules, evaluated in this order; their names must be unique.
        history_size: the most alerts kept in :attr:`history` (oldest dropped first).

    >>> import torch; from klmonitor import KLStats
    >>> engine = AlertEngine(default_rules(max_kl=0.05))
    >>> s = KLStats(); s.update(torch.zeros(4), torch.tensor([1.0, -1.0, 2.0, -2.0]))
    >>> [a.rule for a in engine.evaluate(s.compute(), step=10)]
    ['kl_budget']
    >>> engine.state_dict()["history"][0]["step"]
    10
    """

    def __init__(self, rules: Sequence[Rule], history_size: int = 1000) -> None:
        if isinstance(rules, Rule) or not isinstance(rules, Sequence):
            raise TypeError(f"rules must be a list of Rule objects, got {type(rules).__name__}")
        bad = [r for r in rules if not isinstance(r, Rule)]
        if bad:
            raise TypeError(f"rules must hold Rule objects only, got {type(bad[0]).__name__} {bad[0]!r}")
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"rule names must be unique, got duplicates {dupes}; pass name=... to one of them"
            )
        self._rules = list(rules)
        self.history_size = _check_int(history_size, "history_size", low=1)
        self._history: deque[Alert] = deque(maxlen=self.history_size)

    @property
    def rules(self) -> list[Rule]:
        """The rules, in evaluation order."""
        return list(self._rules)

    @property
    def history(self) -> list[Alert]:
        """The alerts fired so far (at most ``history_size``), oldest first."""
        return list(self._history)

    def evaluate(self, summary: KLSummary, step: int) -> list[Alert]:
        """Evaluate every rule on ``summary``; return (and record) the alerts that fired."""
        fired = [a for a in (rule.evaluate(summary, step) for rule in self._rules) if a is not None]
        self._history.extend(fired)
        return fired

    def state_dict(self) -> dict[str, Any]:
        """``{"version": 1, "rules": {name: rule state}, "history": [alert dicts]}``."""
        return {
            "version": _STATE_VERSION,
            "rules": {r.name: r.state_dict() for r in self._rules},
            "history": [a.to_dict() for a in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Rules missing from ``state`` are reset (:meth:`Rule.restore_missing`: an
        :class:`InitialKLRule` counts its check as done, the run being past its start); state of
        rules this engine does not have is ignored; a missing history is empty.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from AlertEngine.state_dict(), got {type(state).__name__}")
        rule_states = state.get("rules", {})
        for rule in self._rules:
            if rule.name in rule_states:
                rule.load_state_dict(rule_states[rule.name])
            else:
                rule.restore_missing()
        self._history = deque(
            (Alert.from_dict(d) for d in state.get("history", [])), maxlen=self.history_size
        )

    def reset(self) -> None:
        """Reset every rule and clear the history."""
        for rule in self._rules:
            rule.reset()
        self._history.clear()


def default_rules(max_kl: float | None = None) -> list[Rule]:
    """The default rules: drift, spike, nonfinite, clamped, sampling_mismatch, initial_kl, rollout_mismatch (+ kl_budget).

    Args:
        max_kl: when given, adds a :class:`KLBudgetRule` with this budget on the k3 mean.

    >>> [r.name for r in default_rules(max_kl=0.1)]
    ['drift', 'spike', 'nonfinite', 'extreme', 'sampling_mismatch', 'initial_kl', 'rollout_mismatch', 'kl_budget']
    """
    rules: list[Rule] = [
        DriftRule(),
        SpikeRule(),
        NonFiniteRule(),
        ExtremeRule(),
        SamplingMismatchRule(),
        InitialKLRule(),
        RolloutMismatchRule(),
    ]
    if max_kl is not None:
        rules.append(KLBudgetRule(max_kl))
    return rules
