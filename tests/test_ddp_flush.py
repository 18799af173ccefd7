"""Monitor under 2 gloo CPU processes: uneven final windows and ranks whose steps disagree.

Every rank's ``flush`` joins the window's collective, also on a rank with no batch since the
last window (before the fix it returned ``None`` there and the other rank hung in
``all_gather``). Each rank's step travels in the collective: a disagreement is one warning
(``strict``: an error), never a silent merge. The process group's timeout is 20 s, so a
regression fails fast instead of hanging for 30 minutes.
"""

from __future__ import annotations

import datetime
import json
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from klmonitor import Monitor

WORLD = 2
PG_TIMEOUT_S = 20


def _batch(rank: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = 4 + rank  # 4 tokens per batch on rank 0, 5 on rank 1
    logp = -torch.linspace(0.5, 2.0, n) - 0.01 * i
    return logp, logp + 0.1 * (rank + 1)


def _scenario(name: str, rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    strict = name == "steps_differ_strict"
    mon = Monitor(log_every_n_steps=3, histogram=False, strict=strict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if name == "uneven_flush":
            # Steps 1..3 on both ranks (a window at 3), then one more batch on rank 0 only.
            for step in (1, 2, 3):
                mon.update(*_batch(rank, step))
                res = mon.step(step)
            out["window3"] = None if res is None else res.summary.tokens
            if rank == 0:
                mon.update(*_batch(rank, 4))
            res = mon.flush(4)
            out["flush"] = None if res is None else [res.step, res.summary.tokens]
        elif name == "nothing_to_flush":
            for step in (1, 2, 3):
                mon.update(*_batch(rank, step))
                mon.step(step)
            res = mon.flush(3)
            out["flush"] = None if res is None else [res.step, res.summary.tokens]
        elif name in ("steps_differ", "steps_differ_strict"):
            for i in (1, 2):
                mon.update(*_batch(rank, i))
            try:
                res = mon.flush(5 - rank)  # rank 0 at step 5, rank 1 at step 4
                out["flush"] = None if res is None else [res.step, res.summary.tokens]
            except Exception as exc:
                out["error"] = f"{type(exc).__name__}: {exc}"
            # The ranks go on in step: the next window is one collective on both.
            mon.update(*_batch(rank, 3))
            res = mon.flush(6)
            out["next"] = None if res is None else [res.step, res.summary.tokens]
    out["warnings"] = [str(w.message) for w in caught if "klmonitor" in str(w.message)]
    return out


SCENARIOS = ("uneven_flush", "nothing_to_flush", "steps_differ", "steps_differ_strict")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    results: dict[str, Any] = {}
    try:
        for name in SCENARIOS:
            try:
                results[name] = _scenario(name, rank)
            except Exception:
                results[name] = {"crash": traceback.format_exc()[-2000:]}
                break  # the process group is not usable after a timeout
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp_flush")
    ctx = mp.start_processes(
        _worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 4 * PG_TIMEOUT_S + 60
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("DDP workers did not finish in time (a rank hung in a collective)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _get(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    got = [r.get(name) for r in ranks]
    for r, g in enumerate(got):
        assert g is not None, f"rank {r} never ran {name}: {ranks[r]}"
        assert "crash" not in g, f"rank {r} crashed in {name}:\n{g['crash']}"
    return got


def test_flush_with_one_more_batch_on_one_rank_does_not_hang(ranks: list[dict[str, Any]]) -> None:
    got = _get(ranks, "uneven_flush")
    assert [g["window3"] for g in got] == [3 * 4 + 3 * 5] * 2
    # Rank 0's extra batch (4 tokens) is logged on both ranks, at the flush's step.
    assert [g["flush"] for g in got] == [[4, 4]] * 2
    assert all(g["warnings"] == [] for g in got)


def test_flush_with_no_batch_on_any_rank_is_none_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    got = _get(ranks, "nothing_to_flush")
    assert [g["flush"] for g in got] == [None, None]


def test_ranks_whose_steps_differ_are_warned_about_not_merged_silently(ranks: list[dict[str, Any]]) -> None:
    got = _get(ranks, "steps_differ")
    assert [g["flush"] for g in got] == [[5, 2 * 4 + 2 * 5]] * 2  # logged at the larger step
    assert [g["next"] for g in got] == [[6, 4 + 5]] * 2
    for g in got:
        assert len(g["warnings"]) == 1, g["warnings"]
        assert "rank 0: step 5, rank 1: step 4" in g["warnings"][0]


def test_ranks_whose_steps_differ_raise_under_strict(ranks: list[dict[str, Any]]) -> None:
    got = _get(ranks, "steps_differ_strict")
    for g in got:
        assert g["error"].startswith("KLMonitorInputError")
        assert "rank 0: step 5, rank 1: step 4" in g["error"]
        assert g["next"] == [6, 4 + 5]  # both ranks still in step after the error
