"""Rules on the KL's size: ``kl_budget`` (above the user's maximum) and ``spike`` (a jump above its recent mean)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from klmonitor._validate import check_int as _check_int
from klmonitor._validate import check_number as _check_number
from klmonitor.alerts.base import _DEFAULT_COOLDOWN, Rule, RuleOptions, ThresholdSpec, Unpack
from klmonitor.alerts.event import AlertLevel, _fmt
from klmonitor.summary import ESTIMATORS, KLSummary

__all__ = ["KLBudgetRule", "SpikeRule"]

# Estimator names accepted by KLBudgetRule (those KLSummary.estimator knows).
_BUDGET_ESTIMATORS = ESTIMATORS


class KLBudgetRule(Rule):
    """The KL estimate exceeds the user's budget ``max_kl``.

    Args:
        max_kl: the largest KL tolerated, in nats, on the summary's scale (per token at
            token level, per sequence at sequence level); the rule's ``threshold``.
        estimator: whose mean is compared: ``"k3"`` (default: unbiased, never negative),
            ``"k1"``, ``"k2"`` or ``"kl_pq"`` (the reverse KL).
        patience (default 1), cooldown (10), level (error), stop_training, name: as in
            :class:`Rule`.

    >>> import torch; from klmonitor import KLStats
    >>> s = KLStats(); s.update(torch.zeros(4), torch.tensor([1.0, -1.0, 2.0, -2.0]))
    >>> KLBudgetRule(max_kl=0.5).evaluate(s.compute(), step=3).level.value
    'error'
    """

    name = "kl_budget"
    default_cooldown = _DEFAULT_COOLDOWN
    default_level = AlertLevel.ERROR
    threshold_spec = ThresholdSpec("max_kl", low=0.0, hint=" (the KL budget in nats)")

    def __init__(self, max_kl: float, *, estimator: str = "k3", **options: Unpack[RuleOptions]) -> None:
        super().__init__(max_kl, **options)
        if estimator not in _BUDGET_ESTIMATORS:
            raise ValueError(f"estimator must be one of {_BUDGET_ESTIMATORS}, got {estimator!r}")
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
        patience (default 1), cooldown (10), level (warn), stop_training, name: as in
            :class:`Rule`.

    >>> import torch; from klmonitor import KLStats
    >>> rule, s = SpikeRule(min_history=3), KLStats()
    >>> for shift in (0.1, 0.1, 0.1, 3.0):
    ...     s.reset(); s.update(torch.zeros(4), torch.tensor([shift, -shift, shift, -shift]))
    ...     alert = rule.evaluate(s.compute(), step=1)
    >>> alert.rule, alert.value > rule.threshold
    ('spike', True)
    """

    name = "spike"
    default_cooldown = _DEFAULT_COOLDOWN
    threshold_spec = ThresholdSpec(low=0.0, hint=" (standard deviations, e.g. 6)")

    def __init__(
        self,
        threshold: float = 6.0,
        *,
        window: int = 20,
        min_history: int = 5,
        rel_floor: float = 0.1,
        abs_floor: float = 1e-3,
        **options: Unpack[RuleOptions],
    ) -> None:
        super().__init__(threshold, **options)
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
