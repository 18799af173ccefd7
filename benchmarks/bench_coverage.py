"""Coverage of the exact KL by the ±2 standard-error intervals of k1, k3 and cv, by simulation.

Each window draws ``contexts`` reference distributions ``p`` over ``vocab`` tokens (Zipf-shaped,
``tests/sampling_sim.py``) and a policy ``q`` per context (below), samples ``draws`` tokens per
context exactly from ``q`` in float64, and hands the tokens' log-probs to ``KLStats`` as float32,
as a trainer would. The exact per-token KL of the window is the mean over its contexts of
KL(q_c || p_c), in float64. A window *covers* with an estimator when
``|mean - KL| <= 2 stderr``; coverage is the fraction of windows (seeds) that cover.

Regimes (the parameter of each is calibrated by bisection to hit the target KL on a fixed
draw of contexts; the exact KL of every window is its own):

- ``noise``: ``log q = log p + sigma N(0, 1)`` per token, renormalised (smooth), KL 1e-4 .. 5.
- ``sharp``: ``q ~ p^s``, as RL fine-tuning sharpens a policy; ``r = p / q`` is heavy-tailed
  (the reference's mass on tokens the policy has given up).
- ``boost``: ``s`` nats on 3 tokens of reference rank 50 or more per context (the policy puts
  mass where the reference has little, as reward hacking does; sampled often).
- ``qtail``: a tail of KL(q || p) the window rarely samples: ``q`` puts mass ``eps`` on 4
  tokens per context where ``log p ~ -35`` (``|log r| ~ 24``, above the ``extreme``
  threshold of 20), the rest is ``p`` with logit noise calibrated so that about half the KL
  sits in the tail. ``eps * tokens`` is the number of tail tokens a window expects.
- ``ptail``: the reference's mass on tokens the policy rarely samples: ``q = p e^-depth`` on
  each token with probability 0.1 (sampling_sim's ``tail``); half of E[k3] rides on tokens
  with ``r = e^depth``.

Per regime the table gives the exact KL (mean over windows), each estimator's coverage and
its mean ``stderr / KL``, cv's median ``lambda``, the median ESS fraction, and the share of
windows with an ``extreme`` token (and their mean count). The JSON has more: bias and the
spread of the errors against the mean stderr.

Run ``python benchmarks/bench_coverage.py`` (200 seeds per regime, 64 x 512 tokens over a
32K vocabulary; 11 minutes on the shared 2-core VM at a load average of 7, less when idle),
``--quick`` (50 seeds, 2.5 minutes there) or ``--seeds N``; ``--only`` picks regimes by name;
``--json`` prints the results as JSON on stdout (the table on stderr).
Figures are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parents[1]
# This checkout's klmonitor, not an installed one.
sys.path[:0] = [str(_ROOT)]

from klmonitor import KLStats, KLSummary  # noqa: E402

ESTIMATORS = ("k1", "k3", "cv")
#: log p of the qtail regime's tail tokens, and how many there are per context.
QTAIL_LOGP = -35.0
QTAIL_TOKENS = 4


@dataclass(frozen=True)
class Regime:
    """One row of the table: a policy family, its calibration target and fixed settings."""

    name: str
    family: str  # noise, sharp, boost, qtail, ptail
    target: float | None  # per-token KL the parameter is calibrated to (None: fixed parameter)
    eps: float = 0.0  # qtail: the tail's mass under q
    s: float = 0.0  # ptail: share of tokens in the tail
    depth: float = 0.0  # ptail: log r on the tail


def regimes() -> list[Regime]:
    out = [Regime(f"noise KL {t:g}", "noise", t) for t in (1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 5.0)]
    out += [Regime(f"sharp KL {t:g}", "sharp", t) for t in (0.1, 1.0, 2.0)]
    out += [Regime(f"boost KL {t:g}", "boost", t) for t in (1.0, 5.0)]
    # qtail: eps * 32768 tokens = 3.3 and 0.33 tail tokens per window; half the KL in the tail.
    out += [
        Regime("qtail 3/window", "qtail", None, eps=1e-4),
        Regime("qtail 0.3/window", "qtail", None, eps=1e-5),
        Regime("ptail depth 4", "ptail", None, s=0.1, depth=4.0),
        Regime("ptail depth 8", "ptail", None, s=0.1, depth=8.0),
    ]
    return out


@dataclass
class Draw:
    """The randomness of one window: the reference and the standard normals / uniforms a policy uses."""

    lp: torch.Tensor  # Zipf-shaped reference log-probs, float64 [contexts, vocab]
    z: torch.Tensor  # N(0, 1) per token (logit noise)
    u: torch.Tensor  # U(0, 1) per token (which tokens form a tail)


def draw(contexts: int, vocab: int, g: torch.Generator, family: str) -> Draw:
    """A reference as ``sampling_sim.reference`` builds it, and the policies' randomness.

    The normals and uniforms are drawn in float32 (three times faster) and widened: they only
    pick the distributions, which are then exact float64 distributions.
    """
    a = 0.8 + 0.5 * torch.rand(contexts, 1, generator=g, dtype=torch.float64)
    rank = torch.arange(1, vocab + 1, dtype=torch.float64)
    jitter = torch.randn(contexts, vocab, generator=g).double()
    lp = (-a * rank.log() + 0.3 * jitter).log_softmax(-1)
    # Only what the family uses (each costs about as much as the reference).
    none = torch.empty(0, dtype=torch.float64)
    z = torch.randn(contexts, vocab, generator=g).double() if family in ("noise", "qtail") else none
    u = torch.rand(contexts, vocab, generator=g).double() if family in ("boost", "ptail", "qtail") else none
    return Draw(lp, z, u)


def build(regime: Regime, param: float, d: Draw) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q), float64 ``[contexts, vocab]``, of ``regime`` with parameter ``param``.

    qtail lowers the reference on its tail tokens, so it returns its own ``log p``.
    """
    lp = d.lp
    if regime.family == "noise":
        return lp, (lp + param * d.z).log_softmax(-1)
    if regime.family == "sharp":
        return lp, (param * lp).log_softmax(-1)
    if regime.family == "boost":
        # 3 tokens of rank >= 50 per context (the 3 largest uniforms there), param nats each.
        idx = d.u[:, 50:].topk(3, -1).indices + 50
        return lp, lp.scatter_add(1, idx, torch.full(idx.shape, param, dtype=lp.dtype)).log_softmax(-1)
    if regime.family == "ptail":
        return lp, (lp - regime.depth * (d.u < regime.s).double()).log_softmax(-1)
    if regime.family == "qtail":
        # QTAIL_TOKENS distinct tokens of rank >= 1000 per context, made tiny under p.
        idx = d.u[:, 1000:].topk(QTAIL_TOKENS, -1).indices + 1000
        tail = torch.zeros(lp.shape, dtype=torch.bool).scatter_(1, idx, True)
        lp = torch.where(tail, QTAIL_LOGP, lp).log_softmax(-1)
        smooth = (lp + param * d.z).log_softmax(-1)
        on_tail = torch.where(tail, math.log(regime.eps / QTAIL_TOKENS), -math.inf)
        return lp, torch.logaddexp(smooth + math.log1p(-regime.eps), on_tail)
    raise ValueError(f"unknown family {regime.family!r}")


def exact_kl(lp: torch.Tensor, lq: torch.Tensor) -> float:
    """Mean over contexts of KL(q_c || p_c), float64 (every ``lq`` here is finite)."""
    return float((lq.exp() * (lq - lp)).sum(-1).mean())


def calibrate(regime: Regime, contexts: int, vocab: int, seed: int = 12345) -> tuple[float, float]:
    """(parameter, KL at it on a fixed draw). Geometric bisection; the KL grows with it."""
    d = draw(contexts, vocab, torch.Generator().manual_seed(seed), regime.family)
    if regime.family == "ptail":
        return math.nan, exact_kl(*build(regime, math.nan, d))
    target = regime.target
    if regime.family == "qtail":
        # Half the KL in the tail: the tail's contribution without noise, doubled.
        target = 2 * exact_kl(*build(regime, 0.0, d))
    assert target is not None
    lo, hi = {"noise": (1e-4, 30.0), "qtail": (1e-5, 5.0), "sharp": (1.0, 60.0), "boost": (1e-2, 60.0)}[
        regime.family
    ]
    for _ in range(36):
        mid = math.sqrt(lo * hi)
        if exact_kl(*build(regime, mid, d)) < target:
            lo = mid
        else:
            hi = mid
    param = math.sqrt(lo * hi)
    return param, exact_kl(*build(regime, param, d))


def window(
    regime: Regime, param: float, seed: int, contexts: int, draws: int, vocab: int
) -> tuple[KLSummary, float, float]:
    """(summary, exact KL, exact share of the KL on qtail's tail tokens) of one window."""
    g = torch.Generator().manual_seed(seed)
    lp, lq = build(regime, param, draw(contexts, vocab, g, regime.family))
    q = lq.exp()
    x = torch.multinomial(q, draws, replacement=True, generator=g)
    # Draw-major order: neighbours come from different contexts.
    logq = lq.gather(1, x).T.reshape(-1)
    logp = lp.gather(1, x).T.reshape(-1)
    stats = KLStats()
    stats.update(logq.float(), logp.float())
    per_token = q * (lq - lp)
    kl = float(per_token.sum(-1).mean())
    share = math.nan
    if regime.family == "qtail":
        share = float(torch.where(lp < QTAIL_LOGP + 5, per_token, 0.0).sum(-1).mean()) / kl
    return stats.compute(), kl, share


def run_regime(
    regime: Regime, seeds: int, contexts: int, draws: int, vocab: int, seed0: int = 0
) -> dict[str, Any]:
    param, kl_calib = calibrate(regime, contexts, vocab)
    kls: list[float] = []
    shares: list[float] = []
    errs: dict[str, list[float]] = {e: [] for e in ESTIMATORS}
    ses: dict[str, list[float]] = {e: [] for e in ESTIMATORS}
    lam, ess, extreme, rz, max_abs = [], [], [], [], []
    for i in range(seeds):
        s, kl, share = window(regime, param, seed0 + 1000 * i + 7, contexts, draws, vocab)
        kls.append(kl)
        shares.append(share)
        for e in ESTIMATORS:
            st = s.estimator(e)
            errs[e].append(st.mean - kl)
            ses[e].append(st.stderr)
        lam.append(s.cv_lambda)
        ess.append(s.ess)
        extreme.append(s.extreme)
        rz.append(s.r_minus_1.z)
        max_abs.append(s.max_abs_log_ratio)
    kl_mean = statistics.fmean(kls)
    row: dict[str, Any] = {
        "regime": regime.name,
        "family": regime.family,
        "param": param,
        "kl_calibration": kl_calib,
        "kl": kl_mean,
        "kl_min": min(kls),
        "kl_max": max(kls),
        "seeds": seeds,
        "tokens": contexts * draws,
        "contexts": contexts,
        "vocab": vocab,
    }
    if regime.family == "qtail":
        row["tail_share"] = statistics.fmean(shares)
        row["tail_tokens_expected"] = regime.eps * contexts * draws
    for e in ESTIMATORS:
        cover = sum(abs(d) <= 2 * se for d, se in zip(errs[e], ses[e], strict=True)) / seeds
        rel_se = statistics.fmean(se / kl for se, kl in zip(ses[e], kls, strict=True))
        rms_err = math.sqrt(statistics.fmean(d * d for d in errs[e]))
        row[e] = {
            "coverage": cover,
            "stderr_over_kl": rel_se,
            # Mean error over the mean KL; the spread of the errors over the typical stderr
            # (1 when the stderr is honest; coverage also depends on the errors' shape).
            "bias_over_kl": statistics.fmean(errs[e]) / kl_mean,
            "rms_error_over_rms_stderr": rms_err / math.sqrt(statistics.fmean(se * se for se in ses[e])),
        }
    row["cv_lambda_median"] = statistics.median(lam)
    row["cv_lambda_range"] = [min(lam), max(lam)]
    finite_ess = [v for v in ess if math.isfinite(v)]
    row["ess_median"] = statistics.median(finite_ess) if finite_ess else math.nan
    row["ess_min"] = min(finite_ess) if finite_ess else math.nan
    row["extreme_windows"] = sum(v > 0 for v in extreme) / seeds
    row["extreme_mean"] = statistics.fmean(extreme)
    row["r_minus_1_z_median"] = statistics.median(rz)
    row["r_minus_1_abs_z_gt_6"] = sum(abs(z) > 6 for z in rz) / seeds
    row["max_abs_log_ratio_median"] = statistics.median(max_abs)
    return row


def _header() -> str:
    cov = " ".join(f"{'cov ' + e:>7}" for e in ESTIMATORS)
    se = " ".join(f"{'se/KL ' + e:>9}" for e in ESTIMATORS)
    return f"{'regime':>17} {'KL':>9} {cov}  {se} {'lambda':>7} {'ESS':>6} {'extreme':>12}"


def _line(r: dict[str, Any]) -> str:
    cov = " ".join(f"{r[e]['coverage']:7.3f}" for e in ESTIMATORS)
    se = " ".join(f"{r[e]['stderr_over_kl']:9.3g}" for e in ESTIMATORS)
    ext = f"{r['extreme_windows']:.2f} ({r['extreme_mean']:.1f})"
    line = (
        f"{r['regime']:>17} {r['kl']:9.3g} {cov}  {se} {r['cv_lambda_median']:7.3f} "
        f"{r['ess_median']:6.3f} {ext:>12}"
    )
    if "tail_share" in r:
        line += f"  tail: {r['tail_share']:.2f} of the KL, {r['tail_tokens_expected']:.2g} tokens/window"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="windows (seeds) per regime")
    parser.add_argument("--contexts", type=int, default=64, help="contexts per window")
    parser.add_argument("--draws", type=int, default=512, help="tokens sampled per context")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--only", default="", help="comma-separated regime-name substrings to run")
    parser.add_argument("--quick", action="store_true", help="50 seeds per regime")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout (table on stderr)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 50
    torch.set_num_threads(1)
    out = sys.stderr if args.json else sys.stdout
    start = time.perf_counter()
    todo = regimes()
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        todo = [r for r in todo if any(k in r.name for k in keys)]
    results: dict[str, Any] = {
        "seeds": args.seeds,
        "contexts": args.contexts,
        "draws": args.draws,
        "tokens": args.contexts * args.draws,
        "vocab": args.vocab,
        "regimes": [],
    }
    print(
        f"±2 stderr coverage of the exact KL: {args.seeds} windows of {args.contexts} contexts x "
        f"{args.draws} tokens, vocabulary {args.vocab}; se/KL = mean stderr / KL; lambda = cv's "
        "median; ESS = median ESS fraction; extreme = share of windows with one (mean count)",
        file=out,
    )
    print(_header(), file=out)
    for regime in todo:
        row = run_regime(regime, args.seeds, args.contexts, args.draws, args.vocab)
        results["regimes"].append(row)
        print(_line(row), file=out, flush=True)
    results["seconds"] = time.perf_counter() - start
    print(f"({results['seconds']:.0f} s)", file=out)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
