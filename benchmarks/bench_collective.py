"""Bytes one rank sends and receives per window when ``Monitor`` reduces a window (issue 26).

Real gloo runs on CPU with 2 and 4 processes. In each process ``torch.distributed.all_gather``
and ``all_reduce`` are wrapped to record every collective ``Monitor.step`` issues at a logging
step, with its per-rank tensor size; the bytes follow from the collectives' semantics:

- ``all_gather`` of ``n`` bytes per rank: every rank's result holds ``W * n`` bytes, ``(W - 1) * n``
  of them from the other ranks (also what a ring all_gather moves in and out of each rank);
- ``all_reduce`` of ``m`` bytes: every rank's result holds ``m`` bytes, whatever ``W``; a ring
  all_reduce (NCCL's, gloo's) moves ``2 (W - 1) / W * m`` bytes in and out of each rank.

"after" is ``Monitor`` as it is (one small all_gather, plus one all_reduce of the additive
diagnostics with ``top_tokens`` or ``top_sequences``); "before" replays, in the same processes,
the collective ``Monitor`` issued before issue 26: one all_gather of the header, both moments
vectors and every diagnostic's whole vector. The per-rank sizes measured at 2 and 4 ranks are
the same (they do not depend on ``W``); the figures at 8, 128 and 1024 ranks follow from them
by the formulas above.

    python benchmarks/bench_collective.py               # 2 and 4 ranks, vocabulary 150,000 (~1 min on 2 cores)
    python benchmarks/bench_collective.py --json        # the same as JSON on stdout
    python benchmarks/bench_collective.py --vocab 1000 --worlds 2   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from klmonitor import Monitor

SCALES = (8, 128, 1024)


#: Every diagnostic off (by_position and top_sequences are on by default): each row adds its own.
OFF: dict[str, Any] = {"by_position": False, "top_sequences": 0}


def configs(vocab: int) -> dict[str, dict[str, Any]]:
    return {
        "core statistics": OFF,
        "by_position": {**OFF, "by_position": True},
        "top_sequences=5": {**OFF, "top_sequences": 5},
        f"top_tokens=10 (vocab {vocab:,})": {**OFF, "top_tokens": 10, "vocab_size": vocab},
        "all diagnostics": {"by_position": True, "top_sequences": 5, "top_tokens": 10, "vocab_size": vocab},
    }


def _batch(g: torch.Generator, vocab: int) -> dict[str, torch.Tensor]:
    logp = -torch.rand(8, 64, generator=g) * 3 - 0.1
    return {
        "logprobs": logp,
        "ref_logprobs": logp + 0.05 * torch.randn(8, 64, generator=g),
        "mask": torch.rand(8, 64, generator=g) < 0.9,
        "token_ids": torch.randint(0, vocab, (8, 64), generator=g),
        "rollout_logprobs": logp + 0.01 * torch.randn(8, 64, generator=g),
    }


def _worker(rank: int, world: int, init: str, out: str, vocab: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    gather, reduce = dist.all_gather, dist.all_reduce
    log: list[list[Any]] = []

    def counting_gather(outs: list[torch.Tensor], t: torch.Tensor, *a: Any, **k: Any) -> Any:
        log.append(["all_gather", t.numel() * t.element_size()])
        return gather(outs, t, *a, **k)

    def counting_reduce(t: torch.Tensor, *a: Any, **k: Any) -> Any:
        log.append(["all_reduce", t.numel() * t.element_size()])
        return reduce(t, *a, **k)

    dist.all_gather, dist.all_reduce = counting_gather, counting_reduce  # type: ignore[assignment]
    results: dict[str, Any] = {}
    try:
        for name, kw in configs(vocab).items():
            g = torch.Generator().manual_seed(rank)
            mon = Monitor(log_every_n_steps=2, rules=[], **kw)
            for step in (1, 2):
                mon.update(**_batch(g, vocab))
                log.clear()
                res = mon.step(step)
            assert res is not None
            after = list(log)
            # The collective before issue 26, replayed on the same monitor's window.
            mon.update(**_batch(g, vocab))
            dev = mon.stats.summary_vector().device
            header = torch.zeros(2, dtype=torch.float64, device=dev)
            parts = [header] + [mon.window[n].vector(dev) for n in mon.window.names()]
            flat = torch.cat([v.reshape(-1) for v in parts])
            log.clear()
            dist.all_gather([torch.empty_like(flat) for _ in range(world)], flat)
            results[name] = {"after": after, "before": list(log)}
    finally:
        dist.all_gather, dist.all_reduce = gather, reduce  # type: ignore[assignment]
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def per_rank(calls: list[list[Any]], world: int) -> dict[str, float]:
    """Bytes per rank per window: the result buffers, and in/out on the wire (ring algorithms)."""
    result = wire = 0.0
    for kind, n in calls:
        if kind == "all_gather":
            result += world * n
            wire += (world - 1) * n
        else:
            result += n
            wire += 2 * (world - 1) / world * n
    return {"result_bytes": result, "wire_bytes": wire}


def sizes(calls: list[list[Any]]) -> dict[str, int]:
    """Per-rank gathered bytes ``g`` and all_reduced bytes ``s`` of one window."""
    g = sum(n for kind, n in calls if kind == "all_gather")
    s = sum(n for kind, n in calls if kind == "all_reduce")
    return {"gathered": g, "summed": s, "collectives": len(calls)}


def run(world: int, vocab: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker,
            args=(world, str(Path(tmp, "init")), tmp, vocab),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        del ctx
        got = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    for r in got[1:]:
        assert r == got[0], "ranks issued different collectives"
    return got[0]


def _fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4", help="process counts to run (gloo, CPU)")
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--json", action="store_true", help="JSON on stdout")
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    out: dict[str, Any] = {"vocab": args.vocab, "measured": {}, "formula": {}, "scaled": {}}
    for w in worlds:
        print(f"running {w} gloo processes ...", file=sys.stderr)
        got = run(w, args.vocab)
        out["measured"][str(w)] = {
            name: {
                mode: {**sizes(calls), **per_rank(calls, w), "calls": [c[0] for c in calls]}
                for mode, calls in entry.items()
            }
            for name, entry in got.items()
        }
    first = out["measured"][str(worlds[0])]
    for name, entry in first.items():
        out["formula"][name] = {mode: sizes(e_calls) for mode, e_calls in _calls(entry).items()}
        out["scaled"][name] = {
            str(w): {mode: per_rank(e_calls, w) for mode, e_calls in _calls(entry).items()} for w in SCALES
        }
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"Bytes per rank per window (vocabulary {args.vocab:,}); g: all_gathered per rank, s: all_reduced.")
    print("received = result buffer (W*g + s); wire = ring in/out ((W-1)*g + 2(W-1)/W*s)\n")
    head = f"{'config':<34} {'mode':<7} {'calls':<22} {'g':>9} {'s':>11}"
    head += "".join(f" {'W=' + w + ' recv':>13}" for w in map(str, worlds))
    head += "".join(f" {'W=' + str(w) + ' recv':>13} {'W=' + str(w) + ' wire':>13}" for w in SCALES)
    print(head)
    for name in first:
        for mode in ("before", "after"):
            f = out["formula"][name][mode]
            calls = "+".join(first[name][mode]["calls"])
            row = f"{name:<34} {mode:<7} {calls:<22} {f['gathered']:>9,} {f['summed']:>11,}"
            row += "".join(
                f" {_fmt(out['measured'][str(w)][name][mode]['result_bytes']):>13}" for w in worlds
            )
            for w in SCALES:
                s = out["scaled"][name][str(w)][mode]
                row += f" {_fmt(s['result_bytes']):>13} {_fmt(s['wire_bytes']):>13}"
            print(row)
    return 0


def _calls(entry: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """The (kind, bytes) calls of each mode, rebuilt from a measured entry."""
    out = {}
    for mode, e in entry.items():
        calls: list[list[Any]] = []
        if e["gathered"]:
            calls.append(["all_gather", e["gathered"]])
        if e["summed"]:
            calls.append(["all_reduce", e["summed"]])
        out[mode] = calls
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
