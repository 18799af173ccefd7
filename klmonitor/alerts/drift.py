"""The ``drift`` rule: k2 and k3 separate, the policy has left the quadratic region of KL."""

from __future__ import annotations

import math

from klmonitor._validate import check_number as _check_number
from klmonitor.alerts.base import _DEFAULT_COOLDOWN, Rule, RuleOptions, ThresholdSpec, Unpack
from klmonitor.alerts.event import _fmt
from klmonitor.alerts.sampling import SamplingMismatchRule
from klmonitor.summary import KLSummary

__all__ = ["DEFAULT_DRIFT_THRESHOLD", "DriftRule"]

#: The ``drift`` rule's default threshold on ``(mean k2 - mean k3) / mean k3`` (also drawn by
#: ``klmonitor report``): k2 three times k3. Healthy runs of ``benchmarks/bench_alerts.py``
#: reach gaps of 0.3-1.5 at per-token KLs of 0.3-1.5 (0.1 fired on every one of them).
DEFAULT_DRIFT_THRESHOLD = 2.0


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
        patience (default 2), cooldown (10), level (warn), stop_training, name: as in
            :class:`Rule`.

    >>> import torch; from klmonitor import KLStats
    >>> s = KLStats(); s.update(torch.zeros(4), torch.tensor([0.01, -0.01, 0.02, -0.02]))
    >>> DriftRule().evaluate(s.compute(), step=1) is None
    True
    """

    name = "drift"
    default_patience = 2
    default_cooldown = _DEFAULT_COOLDOWN
    threshold_spec = ThresholdSpec(low=0.0, hint=" (the relative k2-k3 gap, e.g. 2.0)")

    def __init__(
        self,
        threshold: float = DEFAULT_DRIFT_THRESHOLD,
        *,
        min_z: float = 3.0,
        **options: Unpack[RuleOptions],
    ) -> None:
        super().__init__(threshold, **options)
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
        # The default sampling check's verdict (side() keeps no state).
        side = SamplingMismatchRule().side(summary)
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
