"""Where the KL comes from and the rollout engine, against planted cases and independent numbers.

Planted: a high-KL sequence comes out first with its step and row; a high-KL token id tops
``top_tokens``; KL concentrated at early positions shows in the first buckets with the exact
means; rollout log-probs perturbed by a known amount give KL(rollout || trainer) within 4
standard errors of the exact value and fire ``rollout_mismatch``, identical ones give 0 and no
alert. Then: 2 gloo processes equal one process over the union; no host sync between
logging steps; a resumed window equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tb_files import events, texts
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.tensorboard import SummaryWriter

from klmonitor import Monitor
from klmonitor._layout import SIZE
from klmonitor.diagnostics import bucket_labels

VOCAB = 40


def _batch(g: torch.Generator, b: int = 6, t: int = 20, scale: float = 0.05) -> dict[str, torch.Tensor]:
    logp = -torch.rand(b, t, generator=g) * 3 - 0.1
    return {
        "logprobs": logp,
        "ref_logprobs": logp + scale * torch.randn(b, t, generator=g),
        "mask": torch.rand(b, t, generator=g) < 0.85,
        "token_ids": torch.randint(0, VOCAB, (b, t), generator=g),
    }


def _k3(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Per-token k3 in float64 numpy, 0 where masked (independent of klmonitor)."""
    lr = (batch["ref_logprobs"].double() - batch["logprobs"].double()).numpy()
    return np.where(batch["mask"].numpy(), np.expm1(lr) - lr, 0.0)


def _mon(**kw: Any) -> Monitor:
    kw.setdefault("log_every_n_steps", 3)
    return Monitor(by_position=True, top_sequences=3, top_tokens=4, vocab_size=VOCAB, **kw)


def test_planted_sequence_comes_out_first_with_its_step_and_row() -> None:
    g = torch.Generator().manual_seed(0)
    mon = _mon(decode=lambda ids: "".join(chr(97 + i % 26) for i in ids))
    fed = []
    for step in range(3):  # optimizer steps done when the batch is fed: 0, 1, 2 (global_step)
        b = _batch(g)
        if step == 1:
            b["ref_logprobs"][4, :5] = b["logprobs"][4, :5] - 2.0  # row 4: five tokens at l = -2
            b["mask"][4, :5] = True
        fed.append((step, b))
        mon.update(**b)
        mon.step(step + 1)  # after the optimizer step
    res = mon.last_summary
    assert res is not None
    top = res.top_sequences
    assert (top[0].step, top[0].row, top[0].rank) == (1, 4, 0)
    # Every sequence's summed k3, recomputed: the three largest, in order.
    sums = sorted(
        ((_k3(b)[r].sum(), s, r) for s, b in fed for r in range(b["logprobs"].shape[0])), reverse=True
    )[:3]
    assert [(t.step, t.row) for t in top] == [(s, r) for _, s, r in sums]
    assert [t.kl_sum for t in top] == pytest.approx([v for v, _, _ in sums], rel=1e-5)
    planted = fed[1][1]
    assert top[0].tokens == int(planted["mask"][4].sum())
    # The masked tokens' ids are kept as -1 (padding: not shown in the text).
    assert top[0].token_ids == planted["token_ids"][4].masked_fill(~planted["mask"][4], -1).tolist()
    assert top[0].token_kl == pytest.approx(_k3(planted)[4].tolist(), rel=1e-5, abs=1e-9)
    assert top[0].text is not None and top[0].text.count("**") == 6  # the three highest-KL tokens


def test_planted_token_id_tops_top_tokens_with_exact_sums() -> None:
    g = torch.Generator().manual_seed(1)
    mon = _mon(decode=lambda ids: f"<{ids[0]}>")
    batches = []
    for step in range(1, 4):
        b = _batch(g)
        hot = b["token_ids"] == 7
        b["ref_logprobs"] = torch.where(hot, b["logprobs"] - 1.0, b["ref_logprobs"])
        batches.append(b)
        mon.update(**b)
        mon.step(step)
    s = mon.last_summary
    assert s is not None
    sums = np.zeros(VOCAB)
    counts = np.zeros(VOCAB)
    for b in batches:
        ids, m = b["token_ids"].numpy(), b["mask"].numpy()
        np.add.at(sums, ids[m], _k3(b)[m])
        np.add.at(counts, ids[m], 1)
    order = np.argsort(-sums)[:4]
    assert [t.token_id for t in s.top_tokens] == order.tolist() and s.top_tokens[0].token_id == 7
    assert [t.kl_sum for t in s.top_tokens] == pytest.approx(sums[order].tolist(), rel=1e-6)
    assert [t.count for t in s.top_tokens] == counts[order].astype(int).tolist()
    assert s.top_tokens[0].text == "<7>"


def test_early_positions_show_in_the_first_buckets_with_exact_means() -> None:
    g = torch.Generator().manual_seed(2)
    mon = Monitor(log_every_n_steps=2, by_position=True, position_buckets=4)  # 0-1, 2-3, 4-7, 8+
    fed = []
    for step in (1, 2):
        b = _batch(g, b=8, t=13, scale=0.01)
        b["ref_logprobs"][:, :2] = b["logprobs"][:, :2] - 1.5  # positions 0 and 1: high KL
        fed.append(b)
        mon.update(b["logprobs"], b["ref_logprobs"], b["mask"])
        res = mon.step(step)
    assert res is not None and res.summary.by_position is not None
    got = {p.label: p for p in res.summary.by_position}
    k3 = np.concatenate([_k3(b) for b in fed])
    mask = np.concatenate([b["mask"].numpy() for b in fed])
    for label, lo, hi in bucket_labels(4):
        cols = slice(lo, None if hi is None else hi + 1)
        assert got[label].tokens == mask[:, cols].sum()
        assert got[label].k3_mean == pytest.approx(k3[:, cols].sum() / mask[:, cols].sum(), rel=1e-5)
    assert got["0-1"].k3_mean > 20 * got["8+"].k3_mean
    assert res.metrics["kl/by_position/0-1/k3"] == pytest.approx(got["0-1"].k3_mean)


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_rollout_kl_is_exact_within_four_standard_errors_and_alerts(shift: float) -> None:
    # Trainer policy: a categorical over 30 tokens per position; the rollout engine samples
    # from a perturbed copy (logits + shift * noise) and reports its own log-probs.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(30, generator=g)
    rollout_logits = logits + shift * torch.randn(30, generator=g)
    lq, lr_ = rollout_logits.log_softmax(-1), logits.log_softmax(-1)
    exact = float((lq.exp() * (lq - lr_)).sum())  # KL(rollout || trainer)
    mon = Monitor(log_every_n_steps=1)
    alerts = []
    for step in range(1, 4):
        tokens = torch.multinomial(lq.exp(), 64 * 64, replacement=True, generator=g).reshape(64, 64)
        trainer = lr_[tokens]
        res = mon.update(trainer, trainer, rollout_logprobs=lq[tokens]) or mon.step(step)
        assert res is not None and res.summary.rollout is not None
        alerts += res.alerts
        r = res.summary.rollout
        assert abs(r.kl.k3.mean - exact) < 4 * r.kl.k3.stderr + 1e-12
        ratio = (lr_[tokens] - lq[tokens]).double().exp()
        assert r.ratio_min == pytest.approx(float(ratio.min()), rel=1e-5)
        assert r.ratio_max == pytest.approx(float(ratio.max()), rel=1e-5)
        assert r.ratio_outside == pytest.approx(float(((ratio < 0.5) | (ratio > 2)).double().mean()))
        assert res.metrics["kl/rollout/k3/mean"] == pytest.approx(r.kl.k3.mean)
    if shift == 0.0:
        assert exact == 0.0 and r.kl.k3.mean == 0.0 and alerts == []
    else:
        assert exact > 0.01 and [a.rule for a in alerts] == ["rollout_mismatch"]
        assert "rollout engine" in alerts[0].message


def test_tables_reach_tensorboard(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    mon = _mon(sinks=writer, decode=lambda ids: f"[{ids[0]}]")
    g = torch.Generator().manual_seed(4)
    for step in (1, 2, 3):
        mon.update(**_batch(g), rollout_logprobs=None)
        mon.step(step)
    writer.close()
    acc = events(tmp_path)
    seq = texts(acc, "kl/top_sequences")
    tok = texts(acc, "kl/top_tokens")
    pos = texts(acc, "kl/by_position")
    assert len(seq) == len(tok) == len(pos) == 1
    assert seq[0].count("\n") == 1 + 3 and "**" in seq[0]  # header, rule, three rows
    assert "kl/by_position/0-1/k3" in acc.Tags()["scalars"]


class _Syncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        if name in ("aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.masked_select"):
            self.seen.append(name)
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):
            if any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 else [])
            ):
                self.seen.append(name + "[bool]")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_host_sync_between_logging_steps(dtype: torch.dtype) -> None:
    mon = _mon(log_every_n_steps=4)
    g = torch.Generator().manual_seed(5)
    rec = _Syncs()
    for step in range(1, 4):
        b = _batch(g)
        roll = (b["logprobs"] + 0.01).to(dtype)
        with rec:
            mon.update(b["logprobs"].to(dtype), b["ref_logprobs"].to(dtype), b["mask"], roll, b["token_ids"])
            assert mon.step(step) is None
    assert rec.seen == []


def test_resume_mid_window_keeps_the_diagnostics() -> None:
    g = torch.Generator().manual_seed(6)
    batches = [_batch(g) for _ in range(3)]
    whole, first, second = _mon(), _mon(), _mon()
    for step, b in enumerate(batches, 1):
        whole.update(**b, rollout_logprobs=b["logprobs"] + 0.02)
        whole.step(step)
    for step, b in enumerate(batches[:2], 1):
        first.update(**b, rollout_logprobs=b["logprobs"] + 0.02)
        first.step(step)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    second.update(**batches[2], rollout_logprobs=batches[2]["logprobs"] + 0.02)
    second.step(3)
    a, b = whole.last_summary, second.last_summary
    assert a is not None and b is not None
    assert a.to_dict() == pytest.approx(b.to_dict(), rel=1e-12)
    assert a.top_sequences == b.top_sequences and a.top_tokens == b.top_tokens


# ---- 2 processes (gloo) equal one process over the union --------------------------------------
WORLD = 2


def _rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    out = [_batch(g, b=5 + rank, t=17 + 3 * rank, scale=0.1 + 0.2 * rank) for _ in range(2 + rank)]
    for b in out:
        b["rollout_logprobs"] = b["logprobs"] + 0.05 * torch.randn(b["logprobs"].shape, generator=g)
    if rank == 0:  # one high-KL row, so the top sequences of the union come from both ranks
        out[0]["ref_logprobs"][2] -= 1.0
    return out


def _describe(mon: Monitor) -> dict[str, Any]:
    s = mon.last_summary
    assert s is not None
    return {
        "metrics": s.to_dict(),
        "sequences": sorted(
            (round(t.kl_sum, 9), t.tokens, tuple(t.token_ids or ())) for t in s.top_sequences
        ),
        "ranks": sorted(t.rank for t in s.top_sequences),
        "tokens": [(t.token_id, t.count, round(t.kl_sum, 9)) for t in s.top_tokens],
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    calls: dict[str, list[Any]] = {"between": [], "logging": [], "core": [], "default": [], "off": []}
    gather, reduce = dist.all_gather, dist.all_reduce
    phase = ["between"]

    def counting_gather(out: list[torch.Tensor], t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls[phase[0]].append(["all_gather", len(out), t.numel() * t.element_size()])
        return gather(out, t, *args, **kwargs)

    def counting_reduce(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls[phase[0]].append(
            ["all_reduce", str(kwargs.get("op", args[0] if args else None)), t.numel() * 8]
        )
        assert t.dtype == torch.float64
        return reduce(t, *args, **kwargs)

    dist.all_gather = counting_gather  # type: ignore[assignment]
    dist.all_reduce = counting_reduce  # type: ignore[assignment]
    try:
        mon = _mon(log_every_n_steps=5)
        for b in _rank_batches(rank):
            mon.update(**b)
        for step in range(1, 5):
            assert mon.step(step) is None
        phase[0] = "logging"
        assert mon.step(5) is not None
        # "core": without top_tokens and top_sequences the additive parts are a few numbers,
        # which travel whole in the one all_gather. "default" (by_position, top_sequences=5):
        # the gather and the reduce. "off": the core statistics alone, in the one gather.
        configs = {
            "core": {"by_position": True, "top_sequences": 0},
            "default": {},
            "off": {"by_position": False, "top_sequences": 0},
        }
        for name, kwargs in configs.items():
            one = Monitor(log_every_n_steps=1, **kwargs)
            one.update(**_rank_batches(rank)[0])
            phase[0] = name
            assert one.step(1) is not None
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({**_describe(mon), "calls": calls}))
    finally:
        dist.all_gather, dist.all_reduce = gather, reduce  # type: ignore[assignment]
        dist.destroy_process_group()


def test_two_processes_equal_one_process_over_the_union(tmp_path: Path) -> None:
    ctx = mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 180 s")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    single = _mon(log_every_n_steps=5)
    for rank in range(WORLD):
        for b in _rank_batches(rank):
            single.update(**b)
    single.step(5)
    want = _describe(single)
    # Per window: one all_gather of the small rest (header 2, two moments vectors, ratio min and
    # max, the top sequences' k scores) and one all_reduce (sum) of the additive parts, sized
    # from the configuration alone: top_tokens 2 * vocab + 1, positions 2 * 12 buckets, the
    # ratio count 1, the initial check 4, top sequences k rows of 6 + 2 * max_len.
    small = 8 * (2 + 3 * SIZE + 2 + 3 + 3)  # + the policy-update moments and the entropy (3)
    additive = 8 * ((2 * VOCAB + 1) + 2 * 12 + 1 + 4 + 3 * (6 + 2 * 256))
    want_calls = {
        "between": [],
        "logging": [["all_gather", WORLD, small], ["all_reduce", "RedOpType.SUM", additive]],
        "core": [["all_gather", WORLD, 8 * (2 + 3 * SIZE + 3 + 2 * 12 + 4 + 3)]],
        # The defaults: the gather's small rest holds the 5 top sequences' scores; the reduce
        # the 12 position buckets, the ratio count, the initial check and 5 rows of 6 + 2 * 256.
        "default": [
            ["all_gather", WORLD, 8 * (2 + 3 * SIZE + 2 + 3 + 5)],
            ["all_reduce", "RedOpType.SUM", 8 * (2 * 12 + 1 + 4 + 5 * (6 + 2 * 256))],
        ],
        "off": [["all_gather", WORLD, 8 * (2 + 3 * SIZE + 3 + 4 + 3)]],
    }
    for r in got:
        assert r["calls"] == want_calls
        assert r["metrics"].keys() == want["metrics"].keys()
        for key, value in want["metrics"].items():
            assert r["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert [tuple(x[:2]) for x in r["sequences"]] == [tuple(x[:2]) for x in want["sequences"]]
        assert [tuple(x[2]) for x in r["sequences"]] == [tuple(x[2]) for x in want["sequences"]]
        assert r["tokens"] == [list(t) for t in want["tokens"]]
    assert got[0] == got[1]
    assert set(got[0]["ranks"]) == {0, 1}  # the union's top sequences come from both ranks
    assert math.isfinite(got[0]["metrics"]["kl/rollout/k3/mean"])


def test_four_ranks_merged_as_the_collectives_do_equal_one_accumulator_over_the_union() -> None:
    """Each accumulator's gathered/summed/join merge of 4 ranks' windows is the union's window.

    The merge is that of ``Monitor._reduce`` (gathered rows, each rank's summed share, a sum,
    join), run in one process; the union's window is one accumulator fed every rank's batches,
    and top tokens are checked against numpy sums.
    """
    from klmonitor.diagnostics import InitialCheck, PositionProfile, RatioRange, TopSequences, TopTokens

    g = torch.Generator().manual_seed(11)
    ranks = [
        [_batch(g, b=4 + r, t=15 + 2 * r, scale=0.1 + 0.1 * r) for _ in range(1 + r % 2)] for r in range(4)
    ]
    ranks[2][0]["ref_logprobs"][1] -= 2.0  # the top sequence comes from rank 2
    ranks[3][0]["ref_logprobs"][0] -= 1.0  # the next from rank 3

    def make() -> list[Any]:
        return [
            InitialCheck(),
            RatioRange(),
            PositionProfile(6),
            TopSequences(k=4, max_len=8),
            TopTokens(VOCAB, k=5),
        ]

    def feed(parts: list[Any], b: dict[str, torch.Tensor], rank: int) -> None:
        k3 = torch.from_numpy(_k3(b))
        lr = b["ref_logprobs"] - b["logprobs"]
        parts[0].update(b["logprobs"], b["ref_logprobs"], b["mask"])
        parts[1].update(lr, b["mask"])
        parts[2].update(k3, b["mask"])
        parts[3].update(k3, b["mask"], b["token_ids"], step=1, rank=rank)
        parts[4].update(k3, b["mask"], b["token_ids"])

    per_rank = [make() for _ in ranks]
    union = make()
    for r, batches in enumerate(ranks):
        for b in batches:
            feed(per_rank[r], b, r)
            feed(union, b, r)
    dev = torch.device("cpu")
    for i, acc in enumerate(union):
        rows = torch.stack([p[i].vector(dev) for p in per_rank])
        merged, want = acc.merge_rows(rows), acc.vector(dev)
        assert acc.gathered_size + acc.summed_size >= acc.size > 0
        assert merged.shape == want.shape
        assert torch.allclose(merged, want, rtol=1e-12, atol=1e-12), type(acc).__name__
    # Exact where the numbers are counts, ranges or copies.
    ratio = union[1].merge_rows(torch.stack([p[1].vector(dev) for p in per_rank]))
    assert ratio.tolist() == union[1].vector(dev).tolist()
    seqs = union[3].merge_rows(torch.stack([p[3].vector(dev) for p in per_rank]))
    assert seqs.tolist() == union[3].vector(dev).tolist()
    assert [s.rank for s in union[3].read(seqs.tolist(), None)][:2] == [2, 3]
    toks = union[4].merge_rows(torch.stack([p[4].vector(dev) for p in per_rank]))
    ids = np.concatenate([b["token_ids"].numpy().ravel() for bs in ranks for b in bs])
    k3 = np.concatenate([_k3(b).ravel() for bs in ranks for b in bs])
    use = np.concatenate([b["mask"].numpy().ravel() for bs in ranks for b in bs])
    counts = np.bincount(ids[use], minlength=VOCAB)
    sums = np.bincount(ids[use], weights=k3[use], minlength=VOCAB)
    assert toks[VOCAB:-1].tolist() == counts.astype(float).tolist()
    np.testing.assert_allclose(toks[:VOCAB].numpy(), sums, rtol=1e-12, atol=1e-15)
