"""Rules on per-window token counts: ``nonfinite`` (NaN/inf log-ratios, invalid mask values) and ``extreme``."""

from __future__ import annotations

from klmonitor.alerts.base import _DEFAULT_COOLDOWN, Rule, RuleOptions, ThresholdSpec, Unpack
from klmonitor.alerts.event import AlertLevel, _fmt
from klmonitor.summary import KLSummary

__all__ = ["ExtremeRule", "NonFiniteRule"]


class _TokenCountRule(Rule):
    """A rule that fires when a per-window token count exceeds ``threshold`` (default 0)."""

    default_cooldown = _DEFAULT_COOLDOWN
    threshold_spec = ThresholdSpec(low=0.0, low_inclusive=True, hint=" (a token count)")

    def __init__(self, threshold: float = 0, **options: Unpack[RuleOptions]) -> None:
        super().__init__(threshold, **options)


class NonFiniteRule(_TokenCountRule):
    """Tokens whose log-ratio was NaN or infinite, or whose mask value was not 0 or 1 (kept out).

    Args:
        threshold: fires when more than this many such tokens are in a window.
        patience (default 1), cooldown (10), level (error), stop_training, name: as in
            :class:`Rule`.

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
        patience (default 1), cooldown (10), level (warn), stop_training, name: as in
            :class:`Rule`.

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
