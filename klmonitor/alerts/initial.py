"""The ``initial_kl`` rule: the untrained policy must match the reference token by token."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from klmonitor._validate import check_int as _check_int
from klmonitor._validate import check_number as _check_number
from klmonitor.alerts.base import OneShotRuleOptions, Rule, ThresholdSpec, Unpack
from klmonitor.alerts.event import _fmt
from klmonitor.summary import KLSummary

__all__ = ["InitialKLRule"]


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
    # Fires at most once: patience 1 and cooldown 0, not options.
    shared_options = ("level", "stop_training", "name")
    threshold_spec = ThresholdSpec(low=0.0, hint=" (a per-token KL in nats, e.g. 2.5e-4)")

    def __init__(
        self,
        threshold: float = 2.5e-4,
        *,
        min_share: float = 0.01,
        min_tokens: int = 16,
        **options: Unpack[OneShotRuleOptions],
    ) -> None:
        super().__init__(threshold, **options)
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
