"""The base of every alert rule: :class:`Rule`, its shared options and their one validation.

Every rule takes a threshold and the same keyword options, :class:`RuleOptions`: ``patience``,
``cooldown``, ``level``, ``stop_training`` and ``name``. A rule declares its own defaults for
them as class attributes (``default_patience``, ``default_cooldown``, ``default_level``) and
how its threshold is checked (:class:`ThresholdSpec`); :meth:`Rule.__init__` validates them
all, once, for every rule. A rule's own constructor takes only what is its own (``min_z``,
``window``, ...) and passes the options on: ``super().__init__(threshold, **options)``.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypedDict

from klmonitor._validate import check_int as _check_int
from klmonitor._validate import check_number as _check_number
from klmonitor.alerts.event import Alert, AlertLevel, _as_level, _fmt
from klmonitor.summary import KLSummary

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover
    from typing_extensions import Unpack

__all__ = ["OneShotRuleOptions", "Rule", "RuleOptions", "SHARED_OPTIONS", "ThresholdSpec"]

# Windows a default rule stays quiet after firing: at most one alert per 11 windows per rule.
_DEFAULT_COOLDOWN = 10

#: The keyword options every rule takes (:class:`RuleOptions`), in the order they are checked.
SHARED_OPTIONS = ("patience", "cooldown", "level", "stop_training", "name")


class OneShotRuleOptions(TypedDict, total=False):
    """The options of a rule that fires at most once (:class:`~klmonitor.alerts.InitialKLRule`).

    Attributes:
        level: the :class:`AlertLevel` of its alerts (or ``"info"``, ``"warn"``, ``"error"``);
            ``None`` keeps the rule's default (``default_level``).
        stop_training: mark its alerts ``stop=True`` (the callback then stops training).
        name: overrides the class's default name (names must be unique in an engine);
            ``None`` keeps it.
    """

    level: AlertLevel | str | None
    stop_training: bool
    name: str | None


class RuleOptions(OneShotRuleOptions, total=False):
    """The keyword options every rule takes, validated once by :meth:`Rule.__init__`.

    Attributes:
        patience: consecutive triggered windows needed before the rule fires (``>= 1``; the
            rule's ``default_patience`` when not given).
        cooldown: windows after a firing during which the rule cannot fire again (``>= 0``;
            the rule's ``default_cooldown`` when not given).
        level, stop_training, name: as in :class:`OneShotRuleOptions`.
    """

    patience: int
    cooldown: int


@dataclass(frozen=True)
class ThresholdSpec:
    """How a rule's threshold is checked: a finite number, optionally above a bound.

    Attributes:
        arg: the argument's name in error messages (``"max_kl"`` for the KL budget).
        low: the lower bound, or ``None`` for any finite number.
        low_inclusive: ``low`` itself is allowed.
        hint: appended to the argument's name in error messages (what the number means).

    >>> ThresholdSpec(low=0.0, hint=" (nats)").check(0.5)
    0.5
    """

    arg: str = "threshold"
    low: float | None = None
    low_inclusive: bool = False
    hint: str = ""

    def check(self, value: Any) -> float:
        """``value`` as a float, or ``TypeError``/``ValueError`` naming :attr:`arg`."""
        return _check_number(value, self.arg, low=self.low, low_inclusive=self.low_inclusive, hint=self.hint)


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


class Rule(ABC):
    """Base class of alert rules: a measured value, a threshold, patience and cooldown.

    Subclasses implement :meth:`measure` (and usually :meth:`message`); :meth:`triggered`
    defaults to ``value > threshold``. A window where :meth:`measure` returns ``None`` (not
    applicable) resets the patience streak and never fires.

    Args:
        threshold: the value :meth:`triggered` compares with (a finite number; a subclass
            may bound it further with :attr:`threshold_spec`).
        patience: consecutive triggered windows needed before the rule fires (``>= 1``).
            After firing, the streak starts again from 0.
        cooldown: windows after a firing during which the rule cannot fire again (``>= 0``),
            so a lasting condition gives one alert per ``cooldown + 1`` windows, not a storm.
        level: the :class:`AlertLevel` of its alerts (or ``"info"``, ``"warn"``, ``"error"``).
        stop_training: mark its alerts ``stop=True`` (the callback then stops training).
        name: overrides the class's default name (names must be unique in an engine).

    The options are keyword-only (:class:`RuleOptions`); those not given take the class's
    defaults: :attr:`default_patience` (1), :attr:`default_cooldown` (0) and
    :attr:`default_level` (warn) here, each rule its own. A subclass with arguments of its own
    takes them and passes the options on, so they are validated in one place::

        def __init__(self, threshold=1.0, *, window=5, **options: Unpack[RuleOptions]):
            super().__init__(threshold, **options)
            self.window = window

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
    >>> TokensBelow(10, patience=0)
    Traceback (most recent call last):
    ...
    ValueError: patience must be an int >= 1 (consecutive windows before firing), got 0
    """

    name: str = "rule"
    #: Patience, cooldown and level of a rule built without them.
    default_patience: ClassVar[int] = 1
    default_cooldown: ClassVar[int] = 0
    default_level: ClassVar[AlertLevel] = AlertLevel.WARN
    #: The options of :data:`SHARED_OPTIONS` this rule takes (a one-shot rule takes no
    #: patience or cooldown: it keeps the defaults).
    shared_options: ClassVar[tuple[str, ...]] = SHARED_OPTIONS
    #: How the threshold is checked (the base: any finite number).
    threshold_spec: ClassVar[ThresholdSpec] = ThresholdSpec()

    def __init__(self, threshold: float, **options: Unpack[RuleOptions]) -> None:
        cls = type(self)
        for key in options:
            if key not in cls.shared_options:
                raise TypeError(_unexpected_option(cls, key))
        self.threshold = cls.threshold_spec.check(threshold)
        self.patience = _check_int(
            options.get("patience", cls.default_patience),
            "patience",
            low=1,
            hint=" (consecutive windows before firing)",
        )
        self.cooldown = _check_int(
            options.get("cooldown", cls.default_cooldown),
            "cooldown",
            low=0,
            hint=" (quiet windows after firing)",
        )
        level = options.get("level")
        self.level = cls.default_level if level is None else _as_level(level)
        stop_training = options.get("stop_training", False)
        if not isinstance(stop_training, bool):
            raise TypeError(f"stop_training must be True or False, got {stop_training!r}")
        self.stop_training = stop_training
        name = options.get("name")
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


def _unexpected_option(cls: type[Rule], key: str) -> str:
    """The error for a keyword argument ``cls`` does not take: the closest one, and the list."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # not self
    own = [p.name for p in params if p.kind in kinds]
    accepted = [*own, *cls.shared_options]
    where = f"{cls.__name__}()"
    if key in SHARED_OPTIONS:
        return (
            f"{where} does not take {key!r}: the rule has no {key} (see its docstring). "
            f"Its keyword arguments are {', '.join(accepted)}."
        )
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{where} got an unexpected keyword argument {key!r}.{hint} It takes {', '.join(accepted)}."
