"""KLStats keeps torchmetrics' contract for a Metric, as torchmetrics' own test harness checks it.

Each check reproduces a fault the harness found (issue 25):

* the state is the metric's own: ``load_state_dict`` copies, so two metrics loaded from one
  dict do not share a window and the dict is not written through;
* the float64 state survives every cast torchmetrics and Lightning apply (``to(dtype)``,
  ``half()``, ``set_dtype``, ``Trainer(precision="bf16-true")`` and ``"16-true"``), on every
  CPU backend, and the fused kernel's argument checks hold under ``python -O``;
* ``MetricCollection``'s compute groups never merge KLStats whose settings change the numbers;
* ``torch.jit.script`` accepts KLStats (and a module holding one);
* pickle, deepcopy, clone and ``forward`` versus update/compute give the reference numbers;
* under 2-process gloo DDP all of the above hold together.

Every value is compared with the independent float64 reference of ``kl_reference``.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import pickle
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kl_reference import assert_moments_close, moments, sequence_moments
from torchmetrics import MetricCollection

from klmonitor import KLStats, KLSummary, _native
from klmonitor import _layout as layout

ROOT = Path(__file__).resolve().parents[1]

BACKENDS = ["auto", "torch", "compile"]
needs_native = pytest.mark.skipif(not _native.available(), reason="native kernel unavailable")


def _batch(seed: int, rows: int = 4, cols: int = 32, spread: float = 1.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, cols, generator=g) * 6
    ref = logp + spread * torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) < 0.8
    return logp, ref, mask


def _window(batches: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat([b[k].reshape(-1) for b in batches]) for k in range(3))


def _reference(batches: list[tuple[torch.Tensor, ...]], **settings: Any) -> np.ndarray:
    return moments(*_window(batches), **settings)


def _vector(stats: KLStats) -> np.ndarray:
    return stats.summary_vector().detach().cpu().numpy()


# -- the state is the metric's own -------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_loaded_from_one_state_dict_do_not_share_a_window(backend: str) -> None:
    first = _batch(1)
    src = KLStats(backend=backend)
    src.persistent(True)
    src.update(*first)
    saved = src.state_dict()
    tokens = saved["_acc"][layout.TOKENS].item()
    a, b = KLStats(backend=backend), KLStats(backend=backend)
    a.load_state_dict(saved)
    b.load_state_dict(saved)
    assert a._acc is not b._acc and a._acc is not saved["_acc"]

    second = _batch(2)
    a.update(*second)
    assert saved["_acc"][layout.TOKENS].item() == tokens  # the caller's dict is not written
    assert_moments_close(_vector(b), _reference([first]))  # b never saw the second batch
    assert_moments_close(_vector(a), _reference([first, second]))


def test_load_state_dict_rejects_a_vector_of_another_size() -> None:
    stats = KLStats()
    with pytest.raises(RuntimeError, match="shape"):
        stats.load_state_dict({"_acc": torch.zeros(4, dtype=torch.float64)})
    stats.update(*_batch(3))  # the state is unchanged and usable
    assert_moments_close(_vector(stats), _reference([_batch(3)]))


def test_summary_vector_is_a_copy() -> None:
    stats = KLStats()
    stats.update(*_batch(4))
    held = stats.summary_vector()
    before = held.clone()
    stats.update(*_batch(5))
    assert torch.equal(held, before)


# -- the float64 state survives every cast ------------------------------------------------------
CASTS = {
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "to(float16)": lambda m: m.to(torch.float16),
    "to(float32)": lambda m: m.to(torch.float32),
    "half()": lambda m: m.half(),
    "bfloat16()": lambda m: m.bfloat16(),
    "set_dtype(float16)": lambda m: m.set_dtype(torch.float16),
    "set_dtype(bfloat16)": lambda m: m.set_dtype(torch.bfloat16),
    "parent.to(bfloat16)": lambda m: torch.nn.ModuleDict({"kl": m}).to(torch.bfloat16)["kl"],
}


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_stays_float64_through_dtype_casts(backend: str, cast: str) -> None:
    if backend == "auto" and not _native.available():
        pytest.skip("native kernel unavailable")
    first, second = _batch(6), _batch(7, spread=4.0)
    stats = KLStats(backend=backend)
    stats.update(*first)
    stats = CASTS[cast](stats)
    assert stats._acc.dtype == torch.float64 and stats._defaults["_acc"].dtype == torch.float64
    stats.update(*second)
    assert_moments_close(_vector(stats), _reference([first, second]))
    # Inputs of the cast dtype, and a window after reset (reset restores the default state).
    stats.reset()
    low = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in second)
    stats.update(*low)
    assert stats._acc.dtype == torch.float64
    assert_moments_close(_vector(stats), _reference([low]))


def test_state_set_from_outside_is_restored_to_float64_with_one_warning() -> None:
    stats = KLStats()
    first = _batch(8)
    stats.update(*first)
    stats._acc = stats._acc.to(torch.float32)
    with pytest.warns(UserWarning, match="float64"):
        stats.update(*_batch(9))
    assert stats._acc.dtype == torch.float64
    assert_moments_close(_vector(stats), _reference([first, _batch(9)]))
    stats._acc = torch.zeros(3)
    with pytest.raises(ValueError, match="float64 vector"):
        stats.update(*_batch(9))


_UNDER_O = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from klmonitor import KLStats, _native
    assert False, "asserts must be off"  # -O drops this line
    out = {}
    stats = KLStats(backend="auto").set_dtype(torch.float16)
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(8, 16, generator=g) * 6
    ref = logp + torch.randn(8, 16, generator=g)
    stats.update(logp, ref)
    stats.update(logp, ref)
    out["vector"] = stats.summary_vector().tolist()
    good = (logp.reshape(-1).contiguous(), ref.reshape(-1).contiguous())
    bad = {
        "acc float32": (*good, None, np.zeros(17, np.float32)),
        "acc too short": (*good, None, np.zeros(4)),
        "acc read-only": (*good, None, np.zeros(17)),
        "ref too short": (good[0], good[1][:5], None, np.zeros(17)),
        "mask too short": (*good, torch.ones(3, dtype=torch.bool), np.zeros(17)),
        "mask float": (*good, torch.ones(128), np.zeros(17)),
        "mixed dtypes": (good[0], good[1].double(), None, np.zeros(17)),
        "not contiguous": (good[0][::2], good[1][::2], None, np.zeros(17)),
    }
    bad["acc read-only"][3].setflags(write=False)
    raised = {}
    for name, (lp, rp, mk, acc) in bad.items():
        try:
            _native.fold(lp, rp, mk, float("inf"), 20.0, acc)
            raised[name] = None
        except (ValueError, TypeError) as err:
            raised[name] = type(err).__name__
    for clamp, thr in ((0.0, 20.0), (float("nan"), 20.0), (float("inf"), -1.0)):
        try:
            _native.fold(*good, None, clamp, thr, np.zeros(17))
            raised[f"limits {clamp} {thr}"] = None
        except ValueError as err:
            raised[f"limits {clamp} {thr}"] = type(err).__name__
    out["raised"] = raised
    print(json.dumps(out))
    """
)


@needs_native
def test_native_checks_hold_under_python_O(tmp_path: Path) -> None:
    script = tmp_path / "under_o.py"
    script.write_text(_UNDER_O)
    proc = subprocess.run(
        [sys.executable, "-O", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(8, 16, generator=g) * 6
    ref = logp + torch.randn(8, 16, generator=g)
    assert_moments_close(
        np.array(out["vector"]), moments(torch.cat([logp, logp]), torch.cat([ref, ref]), None)
    )
    assert all(out["raised"].values()), out["raised"]


# -- compute groups -----------------------------------------------------------------------------
def test_metric_collection_keeps_settings_that_change_the_numbers_apart() -> None:
    # First batch: |l| < 1 everywhere, so every token-level state is equal after it (the clamp
    # and the extreme threshold bind nothing yet). Second batch: log-ratios up to +-15.
    calm = _batch(10, spread=0.05)
    wild = _batch(11, spread=6.0)
    wild[1][0, :4] = wild[0][0, :4] + torch.tensor([15.0, -12.0, 9.0, -7.5])
    wild[2][0, :4] = True
    settings: dict[str, dict[str, Any]] = {
        "exact": {},
        "exact_torch": {"backend": "torch"},  # the same numbers: may share a group
        "clamped": {"clamp": 5.0},
        "clamped_more": {"clamp": 2.0},
        "extreme": {"extreme": 3.0},
        "sequence": {"level": "sequence"},
    }
    collection = MetricCollection({name: KLStats(**kw) for name, kw in settings.items()})
    collection.update(*calm)
    groups = [sorted(g) for g in collection.compute_groups.values()]
    assert ["exact", "exact_torch"] in groups  # compute groups are on and do merge equal settings
    assert len(groups) == len(settings) - 1
    collection.update(*wild)
    results = collection.compute()
    for name, kw in settings.items():
        summary = results[name]
        assert isinstance(summary, KLSummary)
        limits = {k: v for k, v in kw.items() if k in ("clamp", "extreme")}
        if kw.get("level") == "sequence":
            want = sequence_moments(
                torch.cat([calm[0], wild[0]]), torch.cat([calm[1], wild[1]]), torch.cat([calm[2], wild[2]])
            )
        else:
            want = _reference([calm, wild], **limits)
        got = collection[name].summary_vector().numpy()
        assert_moments_close(got, want)
        assert summary.extreme == int(want[layout.EXTREME]), name
        assert summary.k3.mean == pytest.approx(want[1 + 2], rel=1e-5), name


def test_merge_state_merges_equal_settings_and_refuses_others() -> None:
    first, second = _batch(15), _batch(16, spread=5.0)
    a, b = KLStats(), KLStats(backend="torch")
    a.update(*first)
    b.update(*second)
    a.merge_state(b)
    assert_moments_close(_vector(a), _reference([first, second]))
    c = KLStats()
    c.merge_state({"_acc": b.summary_vector()})  # a bare state dict of the moments vector
    assert_moments_close(_vector(c), _reference([second]))
    for other in (KLStats(clamp=3.0), KLStats(extreme=4.0), KLStats(level="sequence")):
        other.update(*second)
        with pytest.raises(ValueError, match="differ"):
            a.merge_state(other)
        with pytest.raises(ValueError, match="differ"):
            a.merge_state(other.metric_state)
    assert_moments_close(_vector(a), _reference([first, second]))  # unchanged by the refusals


# -- scripting, copies, forward -----------------------------------------------------------------
def test_torch_jit_script_accepts_klstats_and_a_module_holding_one() -> None:
    scripted = torch.jit.script(KLStats(clamp=5.0))
    assert isinstance(scripted, torch.jit.ScriptModule)

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)
            self.kl = KLStats()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    holder = Holder()
    x = torch.randn(4, 3)
    assert torch.equal(torch.jit.script(holder)(x), holder(x))


COPIES = {
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "deepcopy": copy.deepcopy,
    "clone": lambda m: m.clone(),
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_copies_of_a_cast_or_loaded_metric_are_independent_and_correct(backend: str, how: str) -> None:
    first, second, third = _batch(12), _batch(13), _batch(14)
    src = KLStats(backend=backend)
    src.persistent(True)
    src.update(*first)
    loaded = KLStats(backend=backend)
    loaded.load_state_dict(src.state_dict())
    loaded = loaded.to(torch.bfloat16)
    twin = COPIES[how](loaded)
    loaded.update(*second)
    twin.update(*third)
    assert_moments_close(_vector(loaded), _reference([first, second]))
    assert_moments_close(_vector(twin), _reference([first, third]))
    assert_moments_close(_vector(src), _reference([first]))


def test_a_klstats_pickled_before_the_settings_state_unpickles_into_its_own_group() -> None:
    old = KLStats(clamp=2.0)
    old.update(*_batch(17, spread=0.05))
    state = old.__getstate__()
    # What an older klmonitor pickled: no settings-named state, no warning flag.
    name = next(k for k in state["_defaults"] if k.startswith("_config_"))
    for table in ("_defaults", "_reductions", "_persistent"):
        state[table] = {k: v for k, v in state[table].items() if k != name}
    del state[name], state["_warned_state_cast"]
    restored = KLStats.__new__(KLStats)
    restored.__setstate__(state)
    plain = KLStats()
    plain.update(*_batch(17, spread=0.05))
    collection = MetricCollection({"restored": restored, "plain": plain})
    collection.update(*_batch(18, spread=0.05))
    assert len(collection.compute_groups) == 2
    wild = _batch(19, spread=5.0)
    collection.update(*wild)
    batches = [_batch(17, spread=0.05), _batch(18, spread=0.05), wild]
    assert_moments_close(collection["restored"].summary_vector().numpy(), _reference(batches, clamp=2.0))
    restored._acc = restored._acc.half()
    with pytest.warns(UserWarning, match="float64"):
        restored.update(*wild)


@pytest.mark.parametrize("setup", ["fresh", "cast", "loaded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_equals_update_and_compute(backend: str, setup: str) -> None:
    batches = [_batch(20 + k, spread=1.0 + k) for k in range(3)]
    stats = KLStats(backend=backend)
    if setup == "cast":
        stats = stats.to(torch.float16)
    elif setup == "loaded":
        empty = KLStats()
        empty.persistent(True)
        state = empty.state_dict()
        stats.load_state_dict(state)
        KLStats().load_state_dict(state)  # a second metric loaded from the same dict
    for k, batch in enumerate(batches):
        out = stats(*batch)
        assert isinstance(out, KLSummary)  # forward returns the batch's summary, not a tensor
        alone = KLStats(backend=backend)
        alone.update(*batch)
        if backend == "compile":  # compiled graphs may sum in another order: the last bits differ
            got, want = out.to_dict(), alone.compute().to_dict()
            assert got.keys() == want.keys()
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
        else:
            assert out == alone.compute()
        assert_moments_close(_vector(stats), _reference(batches[: k + 1]))
    assert stats.compute().tokens == int(_reference(batches)[layout.TOKENS])


# -- Lightning: precision="bf16-true" / "16-true" with a KLStats attribute ----------------------
VOCAB, ROWS, COLS, STEPS = 11, 4, 12, 6


def _recorder(pl: Any) -> Any:
    class Recorder(pl.loggers.Logger):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "recorder"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.rows.append((int(step or 0), dict(metrics)))

    return Recorder()


def _policy(pl: Any, backend: str) -> Any:
    class Policy(pl.LightningModule):
        """A tiny token model trained by SGD; a frozen copy of its first head is the reference."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(VOCAB, 8)
            self.head = torch.nn.Linear(8, VOCAB)
            self.ref_head = copy.deepcopy(self.head).requires_grad_(False)
            self.kl_stats = KLStats(backend=backend)
            self.window: list[tuple[torch.Tensor, ...]] = []
            self.closed: list[tuple[KLSummary, list[tuple[torch.Tensor, ...]]]] = []

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            (tokens,) = batch
            h = self.emb(tokens)
            logp = self.head(h).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
            ref = self.ref_head(h).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
            mask = tokens % 4 != 0
            self.kl_stats.update(logp.detach(), ref.detach(), mask)
            self.window.append((logp.detach().clone(), ref.detach().clone(), mask))
            return -(logp * mask).sum() / mask.sum()

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx % 2 == 1:
                summary = self.kl_stats.compute()
                self.log("kl_k3", summary.k3.mean)
                self.log("kl_tokens", float(summary.tokens))
                self.closed.append((summary, self.window))
                self.window = []
                self.kl_stats.reset()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=2.0)

    return Policy()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("package", "precision", "backend"),
    [
        ("lightning", "bf16-true", "auto"),
        ("lightning", "bf16-true", "torch"),
        ("lightning", "16-true", "auto"),
        ("pytorch_lightning", "bf16-true", "auto"),
    ],
)
def test_trainer_true_half_precision_trains_and_logs_the_reference_values(
    tmp_path: Path, package: str, precision: str, backend: str
) -> None:
    pl = importlib.import_module("lightning.pytorch" if package == "lightning" else "pytorch_lightning")
    data = torch.utils.data.TensorDataset(
        torch.randint(0, VOCAB, (ROWS * STEPS, COLS), generator=torch.Generator().manual_seed(3))
    )
    recorder = _recorder(pl)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=recorder,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    with trainer.init_module():  # modules built under the half-precision default dtype
        model = _policy(pl, backend)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=ROWS))
    want_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16
    assert model.head.weight.dtype == want_dtype  # the cast happened
    assert model.kl_stats._acc.dtype == torch.float64
    assert len(model.closed) == STEPS // 2
    # The logger's row at the step where each window closed (Lightning repeats a value logged
    # in on_train_batch_end at the next step).
    by_step = {step: m for step, m in recorder.rows}
    logged = [by_step[batch_idx] for batch_idx in range(1, STEPS, 2)]
    kl_seen = 0.0
    for (summary, window), row in zip(model.closed, logged, strict=True):
        assert all(t[0].dtype == want_dtype for t in window)  # the policy ran in half precision
        want = _reference(window)
        assert summary.tokens == int(want[layout.TOKENS])
        assert summary.k3.mean == pytest.approx(want[3], rel=1e-6)
        assert row["kl_tokens"] == summary.tokens
        assert row["kl_k3"] == pytest.approx(want[3], rel=1e-6)  # logged as float32
        kl_seen = max(kl_seen, summary.k3.mean)
    assert kl_seen > 0  # training moved the policy away from the reference


# -- 2-process gloo DDP -------------------------------------------------------------------------
WORLD = 2
DDP_CLAMP = 4.0


def _ddp_batches(rank: int) -> list[tuple[torch.Tensor, ...]]:
    calm = _batch(100 + rank, rows=3, cols=20, spread=0.05)
    wild = _batch(200 + rank, rows=5, cols=16, spread=5.0)
    wild[1][0, :2] = wild[0][0, :2] + torch.tensor([13.0, -9.0])
    wild[2][0, :2] = True
    return [calm, wild]


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        empty = KLStats()
        empty.persistent(True)
        saved = empty.state_dict()
        exact, idle = KLStats(), KLStats()
        exact.load_state_dict(saved)
        idle.load_state_dict(saved)  # never updated: must stay empty
        collection = MetricCollection(
            {"exact": exact, "clamped": KLStats(clamp=DDP_CLAMP), "torch": KLStats(backend="torch")}
        )
        collection = collection.to(torch.bfloat16)
        for batch in _ddp_batches(rank):
            collection.update(*batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = collection.compute()
            idle_tokens = idle.compute().tokens
        out = {name: collection[name].summary_vector().tolist() for name in results}  # local windows
        out["synced"] = {name: [s.tokens, s.extreme, s.k3.mean] for name, s in results.items()}
        out["idle_tokens"] = idle_tokens
        out["dtypes"] = [str(collection[name]._acc.dtype) for name in results]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_cast_loaded_and_grouped_metrics_equal_one_process_over_the_union(
    tmp_path: Path,
) -> None:
    ctx = mp.start_processes(
        _ddp_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 180 s")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    union = [b for r in range(WORLD) for b in _ddp_batches(r)]
    for name, limits in (("exact", {}), ("clamped", {"clamp": DDP_CLAMP}), ("torch", {})):
        want = _reference(union, **limits)
        for rank, out in enumerate(ranks):
            assert_moments_close(np.array(out[name]), _reference(_ddp_batches(rank), **limits))
            tokens, extreme, k3 = out["synced"][name]
            assert tokens == int(want[layout.TOKENS]) and extreme == int(want[layout.EXTREME]), name
            assert k3 == pytest.approx(want[3], rel=1e-6), name
    assert all(out["idle_tokens"] == 0 for out in ranks)
    assert all(d == "torch.float64" for out in ranks for d in out["dtypes"])
    assert math.isfinite(ranks[0]["synced"]["exact"][2])
