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

Two floor rows (not monitors; ``--no-floor`` leaves them out) bound what any exact per-id
table can cost: ``benchmarks/scatter_floor.c``, built here with the kernel's flags, reads the
inputs the fused kernel reads (log-probs, mask, ids) in its blocks of 512 with the least
per-token work, once without and once with the scatter of each token's value and weight into
its thread's (sum, count) float64 table of the vocabulary. Their difference, reported as a
share of the base, is the scatter's own cost inside a pass over the batch: top_tokens cannot
cost less than it plus the ids read.

    python benchmarks/bench_diagnostics.py                 # ~1 min on 2 cores
    python benchmarks/bench_diagnostics.py --rows 256 --cols 256 --rounds 5 --window 8
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from klmonitor import Monitor

OFF: dict[str, Any] = {"by_position": False, "top_sequences": 0, "top_tokens": 0, "entropy": False}
#: Not a monitor: reading the batch's int64 token ids once (torch's sum), the least any
#: per-token-id table costs on top of the update.
IDS_READ = "token ids read once"
#: Not monitors: benchmarks/scatter_floor.c without, then with, the scatter into the tables.
FLOOR_READ = "floor: inputs read, no table"
FLOOR_SCATTER = "floor: + scatter (sum, count)"
VOCAB = 50_257
CONFIGS: dict[str, dict[str, Any]] = {
    "base (all off)": OFF,
    "by_position (16 rows)": {**OFF, "by_position": True},
    "by_position (all rows)": {**OFF, "by_position": True, "position_rows": None},
    "top_sequences=5": {**OFF, "top_sequences": 5},
    "top_tokens=5": {**OFF, "top_tokens": 5, "vocab_size": VOCAB},
    "entropy (the default)": {**OFF, "entropy": True},
    "rollout": OFF,
    "the defaults": {},  # by_position, top_sequences=5, the entropy: Monitor's own defaults
    "all": {"by_position": True, "top_sequences": 5, "top_tokens": 5, "vocab_size": VOCAB, "entropy": True},
}


def build_floor() -> tuple[ctypes.CDLL | None, str]:
    """benchmarks/scatter_floor.c built with the kernel's flags (setup.py), or None; and a note."""
    source = Path(__file__).with_name("scatter_floor.c")
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()[0]
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc})"
    try:  # the kernel's flags, read from setup.py (importing it would run setup())
        tree = ast.parse(Path(__file__).resolve().parents[1].joinpath("setup.py").read_text())
        flags = next(
            ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "FLAGS" for t in node.targets)
        )
    except (OSError, SyntaxError, StopIteration, ValueError) as exc:
        return None, f"setup.py's FLAGS not readable ({exc!r})"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    arch = ["-march=x86-64", "-mtune=generic"] if x86 else []  # the baseline, as setup.py builds
    out = Path(tempfile.mkdtemp(prefix="klm_floor_")) / "scatter_floor.so"
    for openmp in (["-fopenmp"], []):  # as setup.py: with OpenMP where the compiler has it
        cmd = [cc, *flags, *arch, *openmp, "-shared", "-fPIC", str(source), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            break
    else:
        return None, f"building {source.name} failed: {done.stderr.strip()[:200]}"
    lib = ctypes.CDLL(str(out))
    lib.klm_floor.restype = ctypes.c_double
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.klm_floor.argtypes = [p, p, p, p, i64, i64, p, c_int, c_int]
    return lib, "" if openmp else "built without OpenMP: the floor runs on one thread"


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
    parser.add_argument("--no-floor", action="store_true", help="leave out the scatter floor rows")
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
                "ids": torch.randint(0, VOCAB, shape, generator=g),
                "rollout": logp + 0.01 * torch.randn(shape, generator=g),
            }
        )

    monitors = {
        name: Monitor(log_every_n_steps=10**9, histogram=False, rules=[], **kw)
        for name, kw in CONFIGS.items()
    }
    names = [*CONFIGS, IDS_READ]
    floor, why = (None, "--no-floor") if args.no_floor else build_floor()
    if floor is not None:
        names += [FLOOR_READ, FLOOR_SCATTER]
        threads = torch.get_num_threads()
        floor_tables = torch.zeros(threads * 2 * VOCAB, dtype=torch.float64)
    elif not args.json:
        print(f"(no floor rows: {why})")
    if floor is not None and why and not args.json:
        print(f"(floor: {why})")
    fed = dict.fromkeys(names, 0)

    def update(name: str) -> float:
        """One update of ``name``'s monitor on its next batch; its seconds (the reset not timed)."""
        if name == IDS_READ:  # top_tokens' floor: the ids read once, nothing else
            b = batches[fed[name] % len(batches)]
            fed[name] += 1
            t0 = time.perf_counter()
            b["ids"].sum()
            return time.perf_counter() - t0
        if name in (FLOOR_READ, FLOOR_SCATTER):  # benchmarks/scatter_floor.c (see the docstring)
            b = batches[fed[name] % len(batches)]
            fed[name] += 1
            lp, rp, mk, ids = b["logp"], b["ref"], b["mask"], b["ids"]
            t0 = time.perf_counter()
            floor.klm_floor(  # type: ignore[union-attr]
                lp.data_ptr(), rp.data_ptr(), mk.data_ptr(), ids.data_ptr(), lp.numel(), VOCAB,
                floor_tables.data_ptr(), threads, int(name == FLOOR_SCATTER),
            )  # fmt: skip
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
    rows: list[dict[str, Any]] = [
        {"config": name, "ms": 1e3 * t, "extra_vs_base": (t - base) / base}
        for name, t in med.items()
        if name not in (IDS_READ, FLOOR_READ, FLOOR_SCATTER)
    ]
    # The floor's own time, as the share of the base it would add (it is not an update).
    rows.append({"config": IDS_READ, "ms": 1e3 * med[IDS_READ], "extra_vs_base": med[IDS_READ] / base})
    if floor is not None:  # the floor loop's own time, and the scatter's share of the base
        rows.append({"config": FLOOR_READ, "ms": 1e3 * med[FLOOR_READ], "extra_vs_base": None})
        scatter = med[FLOOR_SCATTER] - med[FLOOR_READ]
        rows.append(
            {"config": FLOOR_SCATTER, "ms": 1e3 * med[FLOOR_SCATTER], "extra_vs_base": scatter / base}
        )
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
    print(f"{'config':<30} {'update ms':>10} {'extra vs base':>14}")
    for r in rows:
        share = r["extra_vs_base"]
        extra = "" if share is None else f"{100 * share:>13.1f}%"
        print(f"{r['config']:<30} {r['ms']:>10.2f} {extra:>14}")


if __name__ == "__main__":
    main()
