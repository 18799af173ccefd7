"""False-alarm rate and detection delay of the ``sampling_mismatch`` rule, by simulation.

Windows of LM-like categorical distributions (``tests/sampling_sim.py``: a Zipf-shaped
reference over a 1000-token vocabulary per context, the policy derived from it) go through
``KLStats`` and ``SamplingMismatchRule`` with its defaults (``|z| > 6``, 3 windows in a row).

- **False alarms**: tokens sampled exactly from the policy, for policies from per-token KL
  ~2e-6 to ~4 nats (logit noise, sharpening, a tail of tokens with ``q = p e^-4``, mass moved
  onto tokens the reference finds unlikely). Each window is independent (its own seed); the
  table gives the windows in which the rule's test held (``triggered``), the alerts fired
  when the windows are fed in sequence, and the largest ``|z|`` seen.
- **Detection delay**: tokens sampled with top-k 50, top-p 0.9 or temperature 0.7 while the
  log-probs are the policy's at temperature 1, or with the reference log-probs shifted by one
  token; windows are fed to a fresh rule until it fires (3 is the least, with patience 3).
- **Out of reach** (reported, not a false alarm of the test): ``q = p e^-8`` on a few percent
  of the reference's mass, a tail a 32K window samples about once in three windows, and a
  policy sharpened to ``q ~ p^5``, whose reference mass sits on tokens with ``r`` up to ~1e12.

Run ``python benchmarks/bench_false_alarms.py`` (about 10 minutes on 2 cores: 200 windows per
exact-sampling case), ``--quick`` (20 windows per case, about a minute) or ``--windows N``;
``--json`` prints the results as JSON. Figures are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parents[1]
# This checkout's klmonitor (not an installed one) and the simulator shared with the tests.
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]

from sampling_sim import window  # noqa: E402

from klmonitor.alerts import SamplingMismatchRule  # noqa: E402

# (family, s): per-token KL from ~2e-6 to ~4 nats with a 1000-token Zipf reference.
EXACT = [
    ("noise", 0.002),  # KL ~2e-6
    ("noise", 0.03),  # KL ~4e-4
    ("noise", 0.3),  # KL ~0.04
    ("noise", 1.0),  # KL ~0.46
    ("noise", 2.0),  # KL ~1.7
    ("noise", 2.5),  # KL ~2.5
    ("sharp", 1.2),  # KL ~0.08
    ("sharp", 2.0),  # KL ~0.87
    ("sharp", 3.0),  # KL ~1.4
    ("tail", 0.1),  # q = p e^-4 on 10 % of the tokens: KL ~0.1
    ("tail", 0.3),  # ... on 30 %: KL ~0.33
    ("boost", 6.0),  # p tiny where q is not: KL ~1.4
    ("boost", 8.0),  # KL ~4.4
]
OUT_OF_REACH = [("tail8", 0.03), ("sharp", 4.0), ("sharp", 5.0)]
MISMATCH_POLICIES = [
    ("noise", 0.3),
    ("noise", 1.0),
    ("noise", 2.0),
    ("sharp", 1.2),
    ("sharp", 2.0),
    ("tail", 0.1),
    ("boost", 6.0),
]
SAMPLERS = ["topk50", "topp0.9", "temp0.7", "shift"]


def _window(family: str, s: float, sampler: str, seed: int, tokens: int) -> Any:
    depth = 4.0
    if family == "tail8":
        family, depth = "tail", 8.0
    return window(family, s, sampler, seed=seed, tokens=tokens, depth=depth)


def false_alarms(family: str, s: float, windows: int, tokens: int) -> dict[str, Any]:
    rule = SamplingMismatchRule()
    triggered = alerts = 0
    zs, kls = [], []
    for seed in range(windows):
        w = _window(family, s, "exact", 10_000 + seed, tokens)
        zs.append(w.summary.r_minus_1.z)
        kls.append(w.kl)
        triggered += rule.side(w.summary) != 0
        alerts += rule.evaluate(w.summary, seed) is not None
    return {
        "family": family,
        "s": s,
        "kl": sum(kls) / len(kls),
        "windows": windows,
        "triggered": triggered,
        # 95 % upper bound on the per-window rate (exact for 0 events: 1 - 0.05**(1/n))
        "triggered_rate_upper95": _upper95(triggered, windows),
        "alerts": alerts,
        "min_z": min(zs),
        "max_z": max(zs),
    }


def _upper95(k: int, n: int) -> float:
    if k == 0:
        return 1 - 0.05 ** (1 / n)
    # Wilson score upper bound
    p, z = k / n, 1.96
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + half) / (1 + z * z / n))


def delay(
    family: str, s: float, sampler: str, seeds: int, tokens: int, max_windows: int = 12
) -> dict[str, Any]:
    delays = []
    kl = math.nan
    for seed in range(seeds):
        rule = SamplingMismatchRule()
        got = None
        for i in range(max_windows):
            w = _window(family, s, sampler, 1000 * seed + i, tokens)
            kl = w.kl
            if rule.evaluate(w.summary, i) is not None:
                got = i + 1
                break
        delays.append(got)
    fired = [d for d in delays if d is not None]
    return {
        "family": family,
        "s": s,
        "sampler": sampler,
        "kl": kl,
        "seeds": seeds,
        "fired": len(fired),
        "max_delay": max(fired) if len(fired) == seeds else None,
        "delays": delays,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=200, help="windows per exact-sampling case")
    parser.add_argument("--seeds", type=int, default=5, help="runs per mismatch case")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per window")
    parser.add_argument(
        "--max-windows", type=int, default=12, help="windows per mismatch run before giving up"
    )
    parser.add_argument("--quick", action="store_true", help="20 windows and 2 seeds per case")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout (tables on stderr)")
    args = parser.parse_args(argv)
    if args.quick:
        args.windows, args.seeds = 20, 2
    torch.set_num_threads(1)
    out = sys.stderr if args.json else sys.stdout
    start = time.perf_counter()
    results: dict[str, Any] = {"tokens": args.tokens, "exact": [], "out_of_reach": [], "mismatch": []}

    print(f"exact sampling: {args.windows} windows of {args.tokens} tokens per case", file=out)
    print(
        f"{'policy':>12} {'KL':>8} {'triggered':>10} {'rate<=(95%)':>11} {'alerts':>6} {'z range':>16}",
        file=out,
    )
    for key, cases in (("exact", EXACT), ("out_of_reach", OUT_OF_REACH)):
        if key == "out_of_reach":
            print("out of reach (tails a window rarely samples):", file=out)
        for family, s in cases:
            r = false_alarms(family, s, args.windows, args.tokens)
            results[key].append(r)
            print(
                f"{family + str(s):>12} {r['kl']:8.3g} {r['triggered']:>6}/{r['windows']:<3} "
                f"{r['triggered_rate_upper95']:11.2g} {r['alerts']:>6} "
                f"{r['min_z']:7.1f}..{r['max_z']:<7.1f}",
                file=out,
            )

    print(
        f"mismatched sampling: windows until the alert ({args.seeds} runs each, at most {args.max_windows})",
        file=out,
    )
    print(f"{'policy':>12} {'KL':>8} " + " ".join(f"{m:>10}" for m in SAMPLERS), file=out)
    for family, s in MISMATCH_POLICIES:
        cells = []
        kl = math.nan
        for sampler in SAMPLERS:
            r = delay(family, s, sampler, args.seeds, args.tokens, args.max_windows)
            results["mismatch"].append(r)
            kl = r["kl"]
            cells.append(
                f"{r['max_delay']:>10}"
                if r["max_delay"]
                else f"{str(r['fired']) + '/' + str(r['seeds']):>10}"
            )
        print(f"{family + str(s):>12} {kl:8.3g} " + " ".join(cells), file=out)
    results["seconds"] = time.perf_counter() - start
    print(f"({results['seconds']:.0f} s)", file=out)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
