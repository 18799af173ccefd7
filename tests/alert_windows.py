"""Real windows for the alert tests: KLSummary objects computed by KLStats from sampled categoricals.

Shared by the ``tests/test_alerts_*.py`` modules (one per module of :mod:`klmonitor.alerts`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from klmonitor import KLStats, KLSummary
from klmonitor.alerts import Alert, AlertEngine, DriftRule, InitialKLRule, Rule, default_rules

# -- data: real windows from categorical policies ------------------------------------------


@functools.cache
def window(
    n: int = 2000,
    *,
    vocab: int = 32,
    sig: float = 2.0,
    mode: str = "noise",
    s: float = 0.0,
    seed: int = 0,
    sampler: str = "policy",
    level: str = "token",
    seq_len: int = 8,
) -> KLSummary:
    """One window of ``n`` tokens, each from its own context (as pooled LM tokens are).

    Per context the reference has logits ``z_p ~ N(0, sig^2)`` over ``vocab`` tokens and the
    policy ``z_p + s * N(0, 1)`` (``mode="noise"``) or ``s * z_p`` (``"sharp"``: a lower
    entropy policy, as RL fine-tuning produces). Tokens are drawn from the policy
    (``sampler="policy"``) or, for a mismatch, from the reference (``"reference"``) or the
    policy at temperature T (``"temperature:T"``), while the log-probs given are always the
    policy's at temperature 1 and the reference's, in float32.
    """
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn(n, vocab, generator=g, dtype=torch.float64) * sig
    if mode == "noise":
        zq = zp + s * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    elif mode == "sharp":
        zq = zp * s
    else:
        raise AssertionError(mode)
    lq, lp = zq.log_softmax(-1), zp.log_softmax(-1)
    if sampler == "policy":
        src = lq
    elif sampler == "reference":
        src = lp
    elif sampler.startswith("temperature:"):
        src = (zq / float(sampler.split(":")[1])).log_softmax(-1)
    else:
        raise AssertionError(sampler)
    x = torch.multinomial(src.exp(), 1, generator=g)
    logq = lq.gather(-1, x).squeeze(-1).float()
    logp = lp.gather(-1, x).squeeze(-1).float()
    stats = KLStats(level=level)  # type: ignore[arg-type]
    if level == "sequence":
        stats.update(logq.reshape(-1, seq_len), logp.reshape(-1, seq_len))
    else:
        stats.update(logq, logp)
    return stats.compute()


def from_logprobs(logq: torch.Tensor, logp: torch.Tensor, **kwargs: Any) -> KLSummary:
    stats = KLStats(**kwargs)
    stats.update(logq, logp)
    return stats.compute()


@functools.cache
def identical(n: int = 2000, seed: int = 0, rounding_noise: bool = False) -> KLSummary:
    """Policy == reference: KL exactly 0, or float32 rounding noise only (KL ~1e-14)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(n, 32, generator=g, dtype=torch.float64).log_softmax(-1)[:, 0]
    logq = logp + 1e-7 * torch.randn(n, generator=g, dtype=torch.float64) if rounding_noise else logp
    return from_logprobs(logq.float(), logp.float())


def empty_window() -> KLSummary:
    return from_logprobs(torch.zeros(0), torch.zeros(0))


LOW = functools.partial(window, 2000, s=0.1)  # per-token KL ~0.004
HIGH = functools.partial(window, 2000, s=1.0)  # per-token KL ~0.4


def names(alerts: list[Alert]) -> list[str]:
    return [a.rule for a in alerts]


def past_start(rules: list[Rule]) -> list[Rule]:
    """``rules`` as in a run past its first window: the one-off ``initial_kl`` check is done."""
    for rule in rules:
        if isinstance(rule, InitialKLRule):
            rule.restore_missing()
    return rules


def run(engine: AlertEngine, summaries: list[KLSummary], start: int = 0) -> list[list[Alert]]:
    return [engine.evaluate(s, step) for step, s in enumerate(summaries, start)]


def fired_at(rule: Rule, summaries: list[KLSummary]) -> list[int]:
    return [i for i, s in enumerate(summaries) if rule.evaluate(s, i) is not None]


def mixed_sequence() -> list[KLSummary]:
    """Quiet, drifted, spiking, broken and mismatched windows, in an order that exercises
    patience, cooldown and the spike history."""
    low = [window(s=0.1, seed=i) for i in range(7)]
    nan = from_logprobs(torch.tensor([-1.0] * 50 + [math.nan]), torch.full((51,), -1.0))
    mism = [window(4000, s=0.3, seed=i, sampler="reference") for i in range(4)]
    drift = [window(4000, s=1.5, seed=i) for i in range(5)]
    return low + [HIGH(), nan] + mism + low[:3] + drift + [empty_window()] + drift[:3] + low[:4]


def engine_factory() -> AlertEngine:
    rules = default_rules(max_kl=0.3)
    for rule in rules:
        rule.cooldown = 2  # more firings in a short sequence
        if isinstance(rule, DriftRule):
            rule.threshold = 0.1  # the drifted windows (KL ~0.8) are below the default
    return AlertEngine(rules, history_size=50)
