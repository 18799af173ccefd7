"""The ``update_size`` rule: one window's optimizer steps moved the policy too far (PPO's target KL)."""

from __future__ import annotations

import math

from klmonitor._validate import check_number as _check_number
from klmonitor.alerts.base import _DEFAULT_COOLDOWN, Rule, RuleOptions, ThresholdSpec, Unpack
from klmonitor.alerts.event import _fmt
from klmonitor.summary import KLSummary

__all__ = ["UpdateSizeRule"]


class UpdateSizeRule(Rule):
    """The policy update is too large: KL(behaviour || current) per token above ``max_update_kl``.

    Judges ``summary.policy_update`` (``Monitor.update(behaviour_logprobs=...)``: the log-probs
    of the policy that sampled the batch, e.g. PPO's or GRPO's old policy): its k3 mean
    estimates how far the optimizer steps since sampling have moved the policy, PPO's
    ``approx_kl``. The rule is PPO's target-KL check (stop the epoch when ``approx_kl`` passes
    about 1.5x the target) with its error bar: it fires when the mean is above the threshold
    and more than ``min_z`` standard errors above it, so a window that only brushes the
    threshold by noise stays quiet. Silent in windows without behaviour log-probs.

    Args:
        max_update_kl: the largest update KL tolerated, nats per token (PPO's ``1.5 *
            target_kl``; e.g. 0.02 to 0.05); the rule's ``threshold``.
        min_z: the excess must also be more than this many standard errors (default 2; 0:
            the mean alone decides, as PPO does).
        patience (default 1), cooldown (10), level (warn), stop_training, name: as in
            :class:`Rule`. ``stop_training=True`` (or ``Monitor(stop_on=["update_size"])``) makes
            it PPO's early stop.

    >>> import torch; from klmonitor import Monitor
    >>> mon = Monitor(log_every_n_steps=1, rules=[UpdateSizeRule(0.01)])
    >>> old = torch.zeros(400); new = 0.3 * torch.randn(400, generator=torch.Generator().manual_seed(0))
    >>> mon.update(new, new, behaviour_logprobs=old)
    >>> [a.rule for a in mon.step(1).alerts]
    ['update_size']
    """

    name = "update_size"
    default_cooldown = _DEFAULT_COOLDOWN
    threshold_spec = ThresholdSpec("max_update_kl", low=0.0, hint=" (nats per token, e.g. 0.03)")

    def __init__(self, max_update_kl: float, *, min_z: float = 2.0, **options: Unpack[RuleOptions]) -> None:
        super().__init__(max_update_kl, **options)
        self.min_z = _check_number(min_z, "min_z", low=0.0, low_inclusive=True)

    def measure(self, summary: KLSummary) -> float | None:
        """The k3 mean of the update KL; ``None`` without behaviour log-probs in the window."""
        up = summary.policy_update
        if up is None or math.isnan(up.k3.mean):
            return None
        return up.k3.mean

    def triggered(self, value: float, summary: KLSummary) -> bool:
        """Above the threshold by more than ``min_z`` standard errors."""
        up = summary.policy_update
        assert up is not None
        stderr = up.k3.stderr if math.isfinite(up.k3.stderr) else 0.0
        return value > self.threshold and value - self.threshold > self.min_z * stderr

    def message(self, value: float, summary: KLSummary) -> str:
        """Say how large the update was and what to change."""
        up = summary.policy_update
        assert up is not None
        return (
            f"the policy update moved the policy {_fmt(value)} nats per token from the behaviour policy "
            f"that sampled the batch (KL(behaviour || current), k3 mean ± {_fmt(up.k3.stderr)} over "
            f"{up.tokens} tokens), above max_update_kl = {_fmt(self.threshold)} "
            f"({value / self.threshold:.2g}x): the optimizer steps per batch are too large. Lower the "
            "learning rate, take fewer passes over each batch (num_iterations, ppo_epochs), or "
            "tighten the ratio clip; stop_training=True makes this PPO's target-KL early stop."
        )
