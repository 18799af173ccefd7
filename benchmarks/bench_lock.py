"""What the Monitor's lock costs per ``update`` (issue 20: a rollout thread and the trainer's).

``Monitor.update`` runs under an ``RLock`` so a rollout thread may call it while the trainer's
thread calls ``step``. This times ``update`` with the lock (the public method) and without it
(the same method unwrapped, ``Monitor.update.__wrapped__``) on the same monitor and batch,
interleaved call by call, and reports the medians and their difference, for a small (2048
tokens) and a large (1M tokens) batch. Single-threaded: the uncontended cost every user pays.

    python benchmarks/bench_lock.py                  # ~20 s on 2 cores
    python benchmarks/bench_lock.py --rounds 200 --sizes 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from klmonitor import Monitor


def measure(tokens: int, rounds: int) -> dict[str, float]:
    """Median seconds per update with and without the lock, ``rounds`` interleaved pairs."""
    g = torch.Generator().manual_seed(0)
    cols = min(tokens, 1024)
    shape = (tokens // cols, cols)
    logp = -torch.rand(shape, generator=g) * 4
    ref = logp + 0.05 * torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.8
    mon = Monitor(log_every_n_steps=10**9)
    locked = mon.update
    unlocked = Monitor.update.__wrapped__  # type: ignore[attr-defined]
    for _ in range(3):  # warm-up
        locked(logp, ref, mask)
        unlocked(mon, logp, ref, mask)
    with_lock, without = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        locked(logp, ref, mask)
        t1 = time.perf_counter()
        unlocked(mon, logp, ref, mask)
        t2 = time.perf_counter()
        with_lock.append(t1 - t0)
        without.append(t2 - t1)
    a, b = statistics.median(with_lock), statistics.median(without)
    return {
        "tokens": shape[0] * shape[1],
        "with_lock_us": a * 1e6,
        "without_us": b * 1e6,
        "lock_us": (a - b) * 1e6,
    }


def main() -> None:
    """Print a table (or JSON) of the lock's cost per update."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2048,1048576", help="tokens per update, comma-separated")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved pairs (default: 2000 small, 30 large)")
    ap.add_argument("--json", action="store_true", help="JSON on stdout")
    args = ap.parse_args()
    rows = []
    for n in (int(float(s)) for s in args.sizes.split(",")):
        rounds = args.rounds or (2000 if n <= 100_000 else 30)
        rows.append({**measure(n, rounds), "rounds": rounds})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'tokens':>9} {'rounds':>6} {'with lock µs':>13} {'without µs':>11} {'lock µs':>8}")
    for r in rows:
        print(
            f"{r['tokens']:>9} {r['rounds']:>6} {r['with_lock_us']:>13.1f} {r['without_us']:>11.1f} "
            f"{r['lock_us']:>8.2f}"
        )


if __name__ == "__main__":
    main()
