"""Rules on where the samples came from: ``sampling_mismatch`` (the mean of r) and ``rollout_mismatch``."""

from __future__ import annotations

import math

from klmonitor._validate import check_int as _check_int
from klmonitor._validate import check_number as _check_number
from klmonitor.alerts.base import _DEFAULT_COOLDOWN, Rule, RuleOptions, ThresholdSpec, Unpack
from klmonitor.alerts.event import _fmt
from klmonitor.summary import KLSummary

__all__ = ["RolloutMismatchRule", "SamplingMismatchRule"]

# SamplingMismatchRule's defaults, also used by DriftRule to tell a sampling gap from drift.
_SM_THRESHOLD = 5.0
_SM_MIN_SAMPLES = 100
_SM_TAIL_FACTOR = 10.0
_SM_MAX_MEAN_RATIO = 20.0
_SM_MIN_ABS_MEAN = 1e-3


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
        patience (default 3), cooldown (10), level (warn), stop_training, name: as in
            :class:`Rule`.

    >>> import torch; from klmonitor import KLStats
    >>> s = KLStats(); s.update(torch.zeros(200), torch.linspace(-0.1, 0.1, 200))
    >>> SamplingMismatchRule(patience=1).evaluate(s.compute(), step=0) is None
    True
    """

    name = "sampling_mismatch"
    default_patience = 3
    default_cooldown = _DEFAULT_COOLDOWN
    threshold_spec = ThresholdSpec(low=0.0, hint=" (standard errors, e.g. 5)")

    def __init__(
        self,
        threshold: float = _SM_THRESHOLD,
        *,
        min_samples: int = _SM_MIN_SAMPLES,
        tail_factor: float = _SM_TAIL_FACTOR,
        max_mean_ratio: float = _SM_MAX_MEAN_RATIO,
        min_abs_mean: float = _SM_MIN_ABS_MEAN,
        **options: Unpack[RuleOptions],
    ) -> None:
        super().__init__(threshold, **options)
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
        patience (default 2), cooldown (10), level (warn), stop_training, name: as in
            :class:`Rule`.
    """

    name = "rollout_mismatch"
    default_patience = 2
    default_cooldown = _DEFAULT_COOLDOWN
    threshold_spec = ThresholdSpec(low=0.0, hint=" (per-token KL(rollout || trainer) in nats)")

    def __init__(
        self, threshold: float = 0.01, *, min_z: float = 3.0, **options: Unpack[RuleOptions]
    ) -> None:
        super().__init__(threshold, **options)
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
