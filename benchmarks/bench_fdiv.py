"""What the f-divergence family adds to ``KLStats.update`` (CPU, float32 log-probs).

A ``[B, T]`` batch of masked float32 log-probs (1M tokens by default). Rows, measured
interleaved round by round in one run (medians):

* ``floor``: one read of the inputs (``logp.sum() + ref.sum()``), the memory floor;
* ``base``: ``KLStats.update`` with no f-divergence (the fused CPU kernel where built);
* one row per built-in alone (``f_divergences=[name]``), and all four together;
* ``naive chi2``: what a user would write for one divergence in eager torch, float32
  (``((ref - logp).exp() - 1) ** 2``, masked mean and variance), for scale.

The ``extra vs base`` column is what each adds as a fraction of the base update; the last
columns check the numbers: the largest relative gap of each mean to a float64 numpy reference.

    python benchmarks/bench_fdiv.py                   # ~30 s on 2 cores
    python benchmarks/bench_fdiv.py --rows 64 --cols 64 --rounds 2 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from klmonitor import KLStats, table

NAMES = table.F_NAMES


def _timer(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _reference(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Float64 numpy means of each built-in's per-token value over the masked tokens."""
    l = (ref.double() - logp.double()).numpy()[mask.numpy()]
    r = np.exp(l)
    return {
        "chi2": float(np.mean(np.expm1(l) ** 2)),
        "hellinger": float(np.mean(np.expm1(l / 2) ** 2)),
        "js": float(np.mean(0.5 * (r * l - (1 + r) * np.log1p(r) + (1 + r) * np.log(2)))),
        "tv": float(np.mean(np.abs(np.expm1(l)) / 2)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    logp = -torch.rand(shape, generator=g) * 5
    ref = logp + 0.1 * torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.9

    configs: dict[str, list[str]] = {"base": [], **{n: [n] for n in NAMES}, "all four": list(NAMES)}
    stats = {name: KLStats(f_divergences=fs or None) for name, fs in configs.items()}

    def naive() -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.expm1(ref - logp).pow(2)[mask]
        return v.mean(), v.var()

    runs: dict[str, Callable[[], object]] = {
        "floor": lambda: logp.sum() + ref.sum(),
        **{name: (lambda s=s: s.update(logp, ref, mask)) for name, s in stats.items()},
        "naive chi2": naive,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(_timer(fn, args.repeat))
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["base"]

    expected = _reference(logp, ref, mask)
    check = KLStats(f_divergences=list(NAMES))
    check.update(logp, ref, mask)
    got = check.compute().f
    rel = {n: abs(got[n].mean - expected[n]) / expected[n] for n in NAMES}

    rows = [
        {
            "config": name,
            "ms": 1e3 * t,
            "extra_vs_base": (t - base) / base if name in configs else None,
            "over_floor": t / med["floor"],
        }
        for name, t in med.items()
    ]
    result = {
        "tokens": args.rows * args.cols,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "mean_rel_error_vs_float64": rel,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.rows} x {args.cols} = {args.rows * args.cols:,} tokens, float32, CPU, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'config':<12} {'ms':>9} {'extra vs base':>14} {'x floor':>9}")
    for r in rows:
        extra = "" if r["extra_vs_base"] is None else f"{100 * r['extra_vs_base']:>13.0f}%"
        print(f"{r['config']:<12} {r['ms']:>9.2f} {extra:>14} {r['over_floor']:>9.1f}")
    print("largest relative gap of each mean to float64 numpy:", {n: f"{v:.1e}" for n, v in rel.items()})


if __name__ == "__main__":
    main()
