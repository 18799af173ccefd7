"""KLStats under torch.distributed: 2 CPU processes (gloo) equal one process over the union.

Each rank feeds different data (different sizes, mask densities, non-finite and extreme
tokens); in some scenarios one rank's window is entirely masked or it never calls ``update``.
``compute()`` on every rank must give the same summary, equal (to float64 rounding) to a single
``KLStats`` fed every rank's batches; then ``reset`` and a second window must work the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from klmonitor import KLStats

WORLD = 2
WINDOWS = 2

# name -> (level, backend, dtype, rank-1 behaviour)
SCENARIOS: dict[str, tuple[str, str, torch.dtype, str]] = {
    "token_native": ("token", "auto", torch.float32, "normal"),
    "token_torch_bf16": ("token", "torch", torch.bfloat16, "normal"),
    "token_float64": ("token", "auto", torch.float64, "normal"),
    "token_rank1_all_masked": ("token", "auto", torch.float32, "all_masked"),
    "token_rank1_no_update": ("token", "auto", torch.float32, "no_update"),
    "sequence": ("sequence", "auto", torch.float32, "normal"),
    "sequence_rank1_all_masked": ("sequence", "auto", torch.float32, "all_masked"),
    "sequence_rank1_no_update": ("sequence", "auto", torch.float32, "no_update"),
}


def _batches(scenario: str, rank: int, window: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The deterministic [B, T] batches ``rank`` feeds in ``window`` of ``scenario``."""
    level, _, dtype, rank1 = SCENARIOS[scenario]
    if rank == 1 and rank1 == "no_update":
        return []
    seed = 1000 * list(SCENARIOS).index(scenario) + 10 * window + rank
    g = torch.Generator().manual_seed(seed)
    # Different shapes and mask densities per rank; a different number of updates too.
    shapes = [(8, 50), (3, 17), (6, 64)] if rank == 0 else [(5, 33), (7, 9)]
    density = 0.9 if rank == 0 else 0.35
    out = []
    for rows, cols in shapes:
        logp = -torch.rand(rows, cols, generator=g) * 10
        ref = logp + (0.2 + 0.3 * window) * torch.randn(rows, cols, generator=g)
        mask = torch.rand(rows, cols, generator=g) < density
        ref[0, 0] = float("nan")  # non-finite, counted where valid
        mask[0, 0] = True
        ref[-1, -1] = logp[-1, -1] + 25.0  # extreme
        mask[-1, -1] = True
        if level == "sequence":
            mask[1] = False  # a row that is no sample
        if rank == 1 and rank1 == "all_masked":
            mask[:] = False
        out.append((logp.to(dtype), ref.to(dtype), mask))
    return out


def _flat(summary) -> dict:
    out = {}
    for key, value in dataclasses.asdict(summary).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, list[dict]] = {}
        for scenario, (level, backend, _, _) in SCENARIOS.items():
            stats = KLStats(level=level, backend=backend)
            windows = []
            for window in range(WINDOWS):
                for logp, ref, mask in _batches(scenario, rank, window):
                    stats.update(logp, ref, mask)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "compute before update" on an idle rank
                    summary = stats.compute()
                # Local state is restored after the synced compute: the window still holds
                # only this rank's tokens.
                local_tokens = int(stats.summary_vector()[13].item())
                windows.append({"summary": _flat(summary), "local_tokens": local_tokens})
                stats.reset()
            results[scenario] = windows
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(
        _worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 180 s (deadlock in compute?)")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _single_process(scenario: str, window: int) -> dict:
    level, backend, _, _ = SCENARIOS[scenario]
    stats = KLStats(level=level, backend=backend)
    for rank in range(WORLD):
        for logp, ref, mask in _batches(scenario, rank, window):
            stats.update(logp, ref, mask)
    return _flat(stats.compute())


def _assert_same(got: dict, expected: dict, rel: float = 1e-9) -> None:
    assert got.keys() == expected.keys()
    for key, e in expected.items():
        g = got[key]
        if isinstance(e, float) and isinstance(g, float):
            if math.isnan(e):
                assert math.isnan(g), key
            else:
                assert g == pytest.approx(e, rel=rel, abs=1e-15), key
        else:
            assert g == e, key


@pytest.mark.parametrize("window", range(WINDOWS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_rank_equals_single_process_over_union(
    ddp_results: list[dict], scenario: str, window: int
) -> None:
    expected = _single_process(scenario, window)
    for rank in range(WORLD):
        _assert_same(ddp_results[rank][scenario][window]["summary"], expected)
    assert expected["tokens"] > 0 and expected["nonfinite"] > 0 and expected["extreme"] > 0


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ranks_agree_bit_for_bit(ddp_results: list[dict], scenario: str) -> None:
    # Every rank makes the same alert decisions only if it sees the very same numbers.
    for window in range(WINDOWS):
        first = json.dumps(ddp_results[0][scenario][window]["summary"])
        assert all(json.dumps(r[scenario][window]["summary"]) == first for r in ddp_results[1:])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_compute_leaves_local_state(ddp_results: list[dict], scenario: str) -> None:
    for rank in range(WORLD):
        for window in range(WINDOWS):
            local = 0
            for logp, ref, mask in _batches(scenario, rank, window):
                lr = ref.float() - logp.float()
                local += int((mask & torch.isfinite(lr)).sum())
            assert ddp_results[rank][scenario][window]["local_tokens"] == local


def test_idle_and_masked_ranks_contribute_nothing(ddp_results: list[dict]) -> None:
    for level in ("token", "sequence"):
        prefix = "token" if level == "token" else "sequence"
        masked = ddp_results[0][f"{prefix}_rank1_all_masked"][0]["summary"]
        idle = ddp_results[0][f"{prefix}_rank1_no_update"][0]["summary"]
        # Same rank-0 data structure, different seeds: both equal rank 0 alone.
        for scenario, s in ((f"{prefix}_rank1_all_masked", masked), (f"{prefix}_rank1_no_update", idle)):
            level_, backend, _, _ = SCENARIOS[scenario]
            alone = KLStats(level=level_, backend=backend)
            for b in _batches(scenario, 0, 0):
                alone.update(*b)
            expected = _flat(alone.compute())
            _assert_same(s, expected)
