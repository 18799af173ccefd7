"""Simulated windows of LM-like token distributions, sampled exactly or with the usual mistakes.

Shared by ``tests/test_sampling.py`` and ``benchmarks/bench_false_alarms.py``. Each window has
``tokens`` sampled tokens, ``draws`` per context from ``tokens / draws`` independent contexts.
Per context the reference ``p`` over ``vocab`` tokens is Zipf-shaped (log-probability
``-a * log(rank)`` with ``a`` uniform in [0.8, 1.3], jittered by ``N(0, 0.3^2)``), as language
models' next-token distributions are. The policy ``q`` is derived from it (:func:`policy`).

Tokens are drawn from ``q`` (``sampler="exact"``) or from a distribution other than the ``q``
whose log-probs are reported: ``"topk50"`` (the 50 most likely tokens of ``q``, renormalised),
``"topp0.9"`` (nucleus sampling), ``"temp0.7"`` (``q`` at temperature 0.7, scored at 1), or
``"shift"`` (exact sampling, but each token's reference log-prob is that of the next token in
the sequence: a one-token shift). Everything is float64 until the log-probs are handed over
as float32, as a trainer would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from klmonitor import KLStats, KLSummary

FAMILIES = ("noise", "sharp", "tail", "boost")
SAMPLERS = ("exact", "topk50", "topp0.9", "temp0.7", "shift")


def reference(contexts: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """Zipf-shaped reference log-probs, ``[contexts, vocab]`` float64."""
    a = 0.8 + 0.5 * torch.rand(contexts, 1, generator=g, dtype=torch.float64)
    rank = torch.arange(1, vocab + 1, dtype=torch.float64)
    logits = -a * rank.log() + 0.3 * torch.randn(contexts, vocab, generator=g, dtype=torch.float64)
    return logits.log_softmax(-1)


def policy(lp: torch.Tensor, family: str, s: float, g: torch.Generator, depth: float = 4.0) -> torch.Tensor:
    """The policy's log-probs, derived from the reference's ``lp``.

    - ``"noise"``: ``log q = log p + s * N(0, 1)`` per token (renormalised); KL grows as ``s^2/2``.
    - ``"sharp"``: ``q ~ p^s``, a lower-entropy policy, as RL fine-tuning produces.
    - ``"tail"``: ``q = p * e^-depth`` on each token with probability ``s`` (renormalised): a
      tail of tokens the reference likes far more than the policy (``r = e^depth`` there).
    - ``"boost"``: ``s`` nats added to 3 tokens of rank 50 or more: the policy puts mass where
      the reference has almost none (``p`` tiny where ``q`` is not), as reward hacking does.
    """
    n, vocab = lp.shape
    if family == "noise":
        z = lp + s * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    elif family == "sharp":
        z = lp * s
    elif family == "tail":
        z = lp - depth * (torch.rand(n, vocab, generator=g, dtype=torch.float64) < s).double()
    elif family == "boost":
        idx = torch.randint(50, vocab, (n, 3), generator=g)
        z = lp.clone().scatter_add_(1, idx, torch.full((n, 3), s, dtype=torch.float64))
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return z.log_softmax(-1)


def sampler_logprobs(lq: torch.Tensor, sampler: str) -> torch.Tensor:
    """Log-probs of the distribution tokens are actually drawn from."""
    if sampler in ("exact", "shift"):
        return lq
    if sampler.startswith("topk"):
        kth = lq.topk(int(sampler[4:]), -1).values[:, -1:]
        return torch.where(lq >= kth, lq, -math.inf).log_softmax(-1)
    if sampler.startswith("topp"):
        top_p = float(sampler[4:])
        srt, idx = lq.sort(-1, descending=True)
        before = srt.exp().cumsum(-1) - srt.exp()  # mass strictly before each token
        kept = torch.where(before < top_p, srt, -math.inf)
        return torch.full_like(lq, -math.inf).scatter_(1, idx, kept).log_softmax(-1)
    if sampler.startswith("temp"):
        return (lq / float(sampler[4:])).log_softmax(-1)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


@dataclass
class Window:
    """One simulated window: the summary KLStats gives, and the exact values it estimates."""

    summary: KLSummary
    kl: float  # exact KL(q || p) per token, averaged over the window's contexts
    mean_r: float  # exact E[r] per token under the sampler (1 for exact sampling)
    logq: torch.Tensor  # the float32 log-probs handed to KLStats
    logp: torch.Tensor


def window(
    family: str,
    s: float,
    sampler: str = "exact",
    *,
    seed: int = 0,
    tokens: int = 32768,
    draws: int = 32,
    vocab: int = 1000,
    depth: float = 4.0,
) -> Window:
    """Simulate one window and summarise it with ``KLStats`` (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    contexts = tokens // draws
    lp = reference(contexts, vocab, g)
    lq = policy(lp, family, s, g, depth)
    ls = sampler_logprobs(lq, sampler)
    x = torch.multinomial(ls.exp(), draws, replacement=True, generator=g)
    # Draw-major order: neighbours come from different contexts, as consecutive positions do.
    logq = lq.gather(1, x).T.reshape(-1)
    logp = lp.gather(1, x).T.reshape(-1)
    if sampler == "shift":
        logp = logp.roll(-1)
        mean_r = math.nan
    else:
        ps = ls.exp()
        mean_r = float((ps * (lp - lq).exp()).sum(-1).mean())
    q = lq.exp()
    kl = float((q * (lq - lp)).sum(-1).mean())
    stats = KLStats()
    stats.update(logq.float(), logp.float())
    return Window(stats.compute(), kl, mean_r, logq.float(), logp.float())
