"""The :class:`AlertEngine` (a list of rules, evaluated in order, with a bounded history) and :func:`default_rules`."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from klmonitor._validate import check_int as _check_int
from klmonitor.alerts.base import Rule
from klmonitor.alerts.budget import KLBudgetRule, SpikeRule
from klmonitor.alerts.drift import DriftRule
from klmonitor.alerts.event import Alert
from klmonitor.alerts.initial import InitialKLRule
from klmonitor.alerts.sampling import RolloutMismatchRule, SamplingMismatchRule
from klmonitor.alerts.tokens import ExtremeRule, NonFiniteRule
from klmonitor.alerts.trend import EntropyCollapseRule, KLAccelerationRule
from klmonitor.alerts.update import UpdateSizeRule
from klmonitor.summary import KLSummary

__all__ = ["AlertEngine", "default_rules"]

_STATE_VERSION = 1


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


def default_rules(max_kl: float | None = None, max_update_kl: float | None = None) -> list[Rule]:
    """The default rules: drift, spike, nonfinite, extreme, sampling_mismatch, initial_kl, rollout_mismatch, entropy_collapse, kl_acceleration.

    Args:
        max_kl: when given, adds a :class:`KLBudgetRule` with this budget on the k3 mean.
        max_update_kl: when given, adds an :class:`UpdateSizeRule` with this limit on the
            policy update's KL (needs behaviour log-probs).

    >>> [r.name for r in default_rules(max_kl=0.1)]
    ['drift', 'spike', 'nonfinite', 'extreme', 'sampling_mismatch', 'initial_kl', 'rollout_mismatch', 'entropy_collapse', 'kl_acceleration', 'kl_budget']
    """
    rules: list[Rule] = [
        DriftRule(),
        SpikeRule(),
        NonFiniteRule(),
        ExtremeRule(),
        SamplingMismatchRule(),
        InitialKLRule(),
        RolloutMismatchRule(),
        EntropyCollapseRule(),
        KLAccelerationRule(),
    ]
    if max_kl is not None:
        rules.append(KLBudgetRule(max_kl))
    if max_update_kl is not None:
        rules.append(UpdateSizeRule(max_update_kl))
    return rules
