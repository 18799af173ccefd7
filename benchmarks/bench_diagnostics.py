"""What each diagnostic adds to ``Monitor.update`` at 1M tokens (issue 23: by_position and
top_sequences at most +25 %, top_tokens at most +100 %).

``[B, T]`` batches of masked float32 log-probs (1M tokens by default) with token ids and
rollout log-probs; ``--batches`` distinct ones (4) are fed in turn, so no batch is still in
the cache from its last use and every batch brings new rows to the top-sequences table. The
base is ``Monitor.update`` with every diagnostic off; each row adds one (by_position,
top_sequences, top_tokens, entropy, rollout) and reports the extra time as a fraction of the
base, all measured in one run, interleaved round by round (median of rounds). Every monitor
is past its first optimizer step (``reset_window(1)``), as in training: the ``initial_kl``
check, which reads the batches fed before that step, is not timed. A new window starts every
``--window`` updates (default 1, the costly case: each update is its window's first, so the
top-sequences table takes k new rows, and their per-token k3 is computed, every time); the
reset itself is not timed.

    python benchmarks/bench_diagnostics.py                 # ~1 min on 2 cores
    python benchmarks/bench_diagnostics.py --rows 256 --cols 256 --rounds 5 --window 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from klmonitor import Monitor

OFF: dict[str, Any] = {"by_position": False, "top_sequences": 0, "top_tokens": 0, "entropy": False}
#: Not a monitor: reading the batch's int64 token ids once (torch's sum), the least any
#: per-token-id table costs on top of the update.
IDS_READ = "token ids read once"
CONFIGS: dict[str, dict[str, Any]] = {
    "base (all off)": OFF,
    "by_position (16 rows)": {**OFF, "by_position": True},
    "by_position (all rows)": {**OFF, "by_position": True, "position_rows": None},
    "top_sequences=5": {**OFF, "top_sequences": 5},
    "top_tokens=5": {**OFF, "top_tokens": 5, "vocab_size": 50_257},
    "entropy (the default)": {**OFF, "entropy": True},
    "rollout": OFF,
    "all": {"by_position": True, "top_sequences": 5, "top_tokens": 5, "vocab_size": 50_257, "entropy": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=8, help="updates per config per round")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches fed in turn")
    parser.add_argument("--window", type=int, default=1, help="updates per window (a reset between)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    batches = []
    for _ in range(args.batches):
        logp = -torch.rand(shape, generator=g) * 5
        batches.append(
            {
                "logp": logp,
                "ref": logp + 0.05 * torch.randn(shape, generator=g),
                "mask": torch.rand(shape, generator=g) < 0.9,
                "ids": torch.randint(0, 50_257, shape, generator=g),
                "rollout": logp + 0.01 * torch.randn(shape, generator=g),
            }
        )

    monitors = {
        name: Monitor(log_every_n_steps=10**9, histogram=False, rules=[], **kw)
        for name, kw in CONFIGS.items()
    }
    names = [*CONFIGS, IDS_READ]
    fed = dict.fromkeys(names, 0)

    def update(name: str) -> float:
        """One update of ``name``'s monitor on its next batch; its seconds (the reset not timed)."""
        if name == IDS_READ:  # top_tokens' floor: the ids read once, nothing else
            b = batches[fed[name] % len(batches)]
            fed[name] += 1
            t0 = time.perf_counter()
            b["ids"].sum()
            return time.perf_counter() - t0
        mon = monitors[name]
        if fed[name] % args.window == 0:
            mon.reset_window(1)  # past the first optimizer step: no initial_kl check
        b = batches[fed[name] % len(batches)]
        fed[name] += 1
        extra: dict[str, Any] = {"token_ids": b["ids"]}
        if name in ("rollout", "all"):
            extra["rollout_logprobs"] = b["rollout"]
        t0 = time.perf_counter()
        mon.update(b["logp"], b["ref"], b["mask"], **extra)
        return time.perf_counter() - t0

    for name in names:  # warm-up (first-use allocations, kernel load, caches)
        for _ in range(len(batches)):
            update(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            times[name].append(sum(update(name) for _ in range(args.repeat)) / args.repeat)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["base (all off)"]
    rows = [
        {"config": name, "ms": 1e3 * t, "extra_vs_base": (t - base) / base}
        for name, t in med.items()
        if name != IDS_READ
    ]
    # The floor's own time, as the share of the base it would add (it is not an update).
    rows.append({"config": IDS_READ, "ms": 1e3 * med[IDS_READ], "extra_vs_base": med[IDS_READ] / base})
    if args.json:
        print(
            json.dumps(
                {
                    "tokens": args.rows * args.cols,
                    "threads": torch.get_num_threads(),
                    "window": args.window,
                    "rows": rows,
                }
            )
        )
        return
    print(
        f"{args.rows} x {args.cols} = {args.rows * args.cols:,} tokens, float32, CPU, {torch.get_num_threads()} threads, "
        f"{args.batches} batches in turn, a window every {args.window} update(s)"
    )
    print(f"{'config':<24} {'update ms':>10} {'extra vs base':>14}")
    for r in rows:
        print(f"{r['config']:<24} {r['ms']:>10.2f} {100 * r['extra_vs_base']:>13.1f}%")


if __name__ == "__main__":
    main()
