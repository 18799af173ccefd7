"""KLMonitor under a real 2-process Lightning DDP run on CPU (gloo, ``ddp_spawn``).

One run of a tiny RL fine-tune (tests/toy_models.py) where each rank sees different data and
a different mask density; rank 1 also sends an entirely masked batch on some steps and a
batch with a shape mismatch (rejected, not monitored) on others; rank 0 sends NaN/-inf
tokens on some steps. A KL budget rule with ``stop_on`` stops training mid-run. Each rank
writes what it fed the monitor, its alert history, its stop step and the collectives the
monitor issued to files in ``tmp_path``; the test process then checks:

(a) the TensorBoard scalars rank 0 wrote equal float64 statistics over the union of both
    ranks' tokens, window by window;
(b) only rank 0 writes (one event file, loggers called on rank 0 only);
(c) both ranks make the same alert and stop decisions, at the same step, and they are the
    decisions of one process fed the union of the data;
(d) the monitor issues exactly one collective (an ``all_gather``) per logging step and none
    on other steps.

The process group gets a 120 s timeout, so a deadlock fails the test instead of hanging it.

Two former bugs of the spawn launchers (an unpicklable callback, and CPU windows shared
between processes after unpickling) are pinned by the regression tests at the end of this
file.
"""

from __future__ import annotations

import functools
import io
import json
import math
import pickle
import warnings
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from toy_models import ToyPolicy

from klmonitor import KLMonitor, KLStats
from klmonitor.alerts import AlertEngine, KLBudgetRule

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]

EVERY = 4
MAX_STEPS = 40
WORLD = 2
# The kl_budget threshold: the union's k3 mean is ~0.014 at step 16 and ~0.028 at 20, so it fires at 20.
MAX_KL = 0.02
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "gather",
    "scatter",
    "reduce_scatter",
    "all_to_all",
)


# --------------------------------------------------------------------------------------------
# what runs inside each spawned process
# --------------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RankPolicy(ToyPolicy):
    """ToyPolicy whose data, mask density and bad input depend on the global rank.

    Records exactly what it hands the monitor (``skipped`` marks a batch the monitor must
    reject) and saves the records to ``out_dir/inputs_rank{r}.pt`` when training ends.
    """

    def __init__(self, out_dir: str, **kw: Any) -> None:
        super().__init__(record=False, **kw)
        self.out_dir = out_dir
        self.records: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        rank = self.global_rank
        self.seed = 11 + 7 * rank  # different tokens on every rank
        self.mask_p = (0.1, 0.6)[rank]  # different mask densities
        out = super().training_step(batch, batch_idx)
        step = int(self.global_step)
        skipped = False
        if rank == 1 and step % 5 == 2:  # a batch with every token masked
            out["mask"] = torch.zeros_like(out["mask"])
        if rank == 1 and step % 7 == 3:  # bad input: the monitor rejects it and warns
            out["ref_logprobs"] = out["ref_logprobs"][:, :-1]
            skipped = True
        if rank == 1 and 2 * EVERY <= step < 3 * EVERY:  # a whole window with no update at all
            del out["ref_logprobs"]
            skipped = True
        if rank == 0 and step % 6 == 1:  # non-finite tokens: counted, kept out of the stats
            ref = out["ref_logprobs"].detach().clone()
            ref[0, 0] = float("nan")
            ref[1, 2] = float("-inf")
            out["ref_logprobs"] = ref
        self.records.append(
            {
                "step": step,
                "skipped": skipped,
                "logp": out["logprobs"].detach().clone(),
                "ref": out.get("ref_logprobs", out["logprobs"]).detach().clone(),
                "mask": out["mask"].clone(),
            }
        )
        return out

    def on_train_end(self) -> None:
        torch.save(self.records, Path(self.out_dir) / f"inputs_rank{self.global_rank}.pt")


class RecordingLogger(Logger):
    """A logger NOT decorated with ``rank_zero_only``: records every call, with its rank."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        with open(Path(self.out_dir) / f"logger_rank{_rank()}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "keys": sorted(metrics)}) + "\n")


class CountingMonitor(KLMonitor):
    """KLMonitor that counts the torch.distributed collectives issued from its batch hook.

    Every collective of ``torch.distributed`` is wrapped (in the spawned process, at
    ``setup``); calls are counted only while the flag is up, i.e. from inside
    ``on_train_batch_end`` / ``on_train_end`` of this callback, so Lightning's own
    collectives (should_stop reduction, barriers) are not counted.
    """

    def __init__(self, out_dir: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.out_dir = out_dir
        self._inside = False
        self._calls: list[str] = []
        self.per_step: list[dict[str, Any]] = []
        self.flush_calls: list[str] = []
        self._originals: dict[tuple[Any, str], Any] = {}

    def _install(self) -> None:
        import torch.distributed.distributed_c10d as c10d

        for module in (dist, c10d):
            for name in COLLECTIVES:
                original = getattr(module, name, None)
                if original is None or (module, name) in self._originals:
                    continue
                self._originals[(module, name)] = original

                def wrapper(*args: Any, __f: Any = original, __n: str = name, **kwargs: Any) -> Any:
                    if self._inside:
                        self._calls.append(__n)
                    return __f(*args, **kwargs)

                functools.update_wrapper(wrapper, original)
                setattr(module, name, wrapper)

    def _uninstall(self) -> None:
        for (module, name), original in self._originals.items():
            setattr(module, name, original)
        self._originals = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._install()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._calls = []
        self._inside = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._inside = False
        self.per_step.append({"step": int(trainer.global_step), "calls": list(self._calls)})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calls = []
        self._inside = True
        try:
            super().on_train_end(trainer, pl_module)
        finally:
            self._inside = False
        self.flush_calls = list(self._calls)
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": int(trainer.global_step),
            "should_stop": bool(trainer.should_stop),
            "alerts": [a.to_dict() for a in self.alert_history],
            "per_step": self.per_step,
            "flush_calls": self.flush_calls,
            "sinks": len(self.monitor.sinks),
            "windows": self.monitor.windows,
            "warned": sorted(self.monitor.warned),
        }
        with open(Path(self.out_dir) / f"monitor_rank{trainer.global_rank}.json", "w") as f:
            json.dump(report, f)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()
        super().teardown(trainer, pl_module, stage)


# --------------------------------------------------------------------------------------------
# the run (once per module) and the independent reference
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp")
    model = RankPolicy(str(out), lr=0.5, pull=1.0, batch=32)
    mon = CountingMonitor(
        str(out),
        log_every_n_steps=EVERY,
        rules=[KLBudgetRule(MAX_KL)],
        stop_on=("kl_budget",),
        progress_bar=True,
    )
    tb = TensorBoardLogger(str(out), name="tb", version=0)
    trainer = pl.Trainer(
        max_steps=MAX_STEPS,
        accelerator="cpu",
        devices=WORLD,
        strategy=DDPStrategy(
            start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=120)
        ),
        logger=[tb, RecordingLogger(str(out))],
        callbacks=[mon],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        log_every_n_steps=EVERY,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    reports = [json.loads((out / f"monitor_rank{r}.json").read_text()) for r in range(WORLD)]
    inputs = [torch.load(out / f"inputs_rank{r}.pt") for r in range(WORLD)]
    return {"out": out, "reports": reports, "inputs": inputs, "tb_dir": Path(tb.log_dir)}


def _union_log_ratios(inputs: list[list[dict[str, Any]]], lo: int, hi: int) -> tuple[np.ndarray, int]:
    """Finite, valid float64 log-ratios of every rank's accepted batches at steps lo <= s < hi,
    and the count of valid non-finite ones."""
    kept, nonfinite = [], 0
    for records in inputs:
        for rec in records:
            if rec["skipped"] or not lo <= rec["step"] < hi:
                continue
            lr = rec["ref"].double().numpy().ravel() - rec["logp"].double().numpy().ravel()
            mask = rec["mask"].numpy().ravel().astype(bool)
            finite = np.isfinite(lr)
            nonfinite += int((mask & ~finite).sum())
            kept.append(lr[mask & finite])
    return (np.concatenate(kept) if kept else np.zeros(0)), nonfinite


def _reference(lr: np.ndarray) -> dict[str, float]:
    k1, k2, k3 = -lr, lr * lr / 2, np.expm1(lr) - lr
    kl_pq = np.exp(lr) * lr - np.expm1(lr)
    out = {"tokens": float(lr.size)}
    for name, v in (("k1", k1), ("k2", k2), ("k3", k3), ("kl_pq", kl_pq)):
        out[f"{name}/mean"] = float(v.mean())
        out[f"{name}/std"] = float(v.std(ddof=1))
    out["drift_k2_k3"] = float((k2.mean() - k3.mean()) / k3.mean())
    return out


def _scalars(logdir: Path) -> dict[str, dict[int, float]]:
    files = sorted(logdir.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _stop_step(run: dict[str, Any]) -> int:
    return int(run["reports"][0]["global_step"])


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------
def test_run_exercised_what_it_should(ddp_run: dict[str, Any]) -> None:
    reports, inputs = ddp_run["reports"], ddp_run["inputs"]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == WORLD for r in reports)
    stop = _stop_step(ddp_run)
    assert 2 * EVERY <= stop < MAX_STEPS, "the budget should fire mid-run (retune MAX_KL)"
    # every rank saw different tokens and mask densities
    a, b = inputs[0][0], inputs[1][0]
    assert not torch.equal(a["logp"], b["logp"])
    dens = [np.mean([r["mask"].float().mean().item() for r in recs if r["mask"].any()]) for recs in inputs]
    assert dens[0] > 0.8 > 0.5 > dens[1]
    assert any(not r["mask"].any() for r in inputs[1]), "rank 1 never sent an all-masked batch"
    assert any(r["skipped"] for r in inputs[1]), "rank 1 never sent a bad batch"
    assert not any(r["skipped"] for r in inputs[0])
    # the rank with bad input warned once per kind of problem; rank 0's NaN/inf tokens are
    # counted, not warned about, and no window was empty on the union
    assert reports[1]["warned"] == ["input:missing-keys", "input:update:ValueError"]
    assert reports[0]["warned"] == []


def test_logged_statistics_equal_one_process_over_the_union(ddp_run: dict[str, Any]) -> None:
    scalars = _scalars(ddp_run["tb_dir"])
    stop = _stop_step(ddp_run)
    ends = list(range(EVERY, stop + 1, EVERY))
    # the window (hi - EVERY, hi] is logged at hi - 1, Lightning's step for its last batch
    assert sorted(scalars["kl/k3/mean"]) == [hi - 1 for hi in ends]
    saw_nonfinite = False
    for hi in ends:
        lr, nonfinite = _union_log_ratios(ddp_run["inputs"], hi - EVERY, hi)
        ref = _reference(lr)
        assert scalars["kl/tokens"][hi - 1] == ref["tokens"], hi
        assert scalars["kl/nonfinite"][hi - 1] == nonfinite, hi
        saw_nonfinite |= nonfinite > 0
        for key in ("k1/mean", "k2/mean", "k3/mean", "kl_pq/mean", "k1/std", "k2/std", "k3/std"):
            assert scalars[f"kl/{key}"][hi - 1] == pytest.approx(ref[key], rel=2e-4, abs=1e-7), (hi, key)
        assert scalars["kl/drift_k2_k3"][hi - 1] == pytest.approx(ref["drift_k2_k3"], rel=5e-3, abs=1e-6), hi
        # the union, not one rank's share (rank 1 sends nothing usable in (8, 12])
        own = [_union_log_ratios([recs], hi - EVERY, hi)[0].size for recs in ddp_run["inputs"]]
        assert sum(own) == ref["tokens"] and own[0] > 0, (hi, own)
        assert (own[1] == 0) == (hi == 3 * EVERY), (hi, own)
    assert saw_nonfinite
    assert all(math.isfinite(v) for series in scalars.values() for v in series.values())


def test_only_rank_zero_writes(ddp_run: dict[str, Any]) -> None:
    out: Path = ddp_run["out"]
    events = sorted(out.rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    assert sorted(p.name for p in (out / "tb").iterdir()) == ["version_0"]
    assert not (out / "logger_rank1.jsonl").exists(), "rank 1 called a logger"
    lines = [json.loads(x) for x in (out / "logger_rank0.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if any(k.startswith("kl/") for k in x["keys"])]
    assert steps == list(range(EVERY - 1, _stop_step(ddp_run), EVERY))
    reports = ddp_run["reports"]
    assert reports[0]["sinks"] == 2 and reports[1]["sinks"] == 0


def test_every_rank_makes_the_same_alert_and_stop_decisions(ddp_run: dict[str, Any]) -> None:
    r0, r1 = ddp_run["reports"]
    assert r0["alerts"], "the budget rule should have fired"
    assert r0["alerts"] == r1["alerts"]
    assert r0["global_step"] == r1["global_step"] == r0["alerts"][-1]["step"] + 1  # logged at the step before
    assert r0["should_stop"] and r1["should_stop"]
    assert r0["windows"] == r1["windows"] == r0["global_step"] // EVERY
    # ... and they are the decisions of one process fed the union of the data
    engine = AlertEngine([KLBudgetRule(MAX_KL)])
    for hi in range(EVERY, r0["global_step"] + 1, EVERY):
        lr, _ = _union_log_ratios(ddp_run["inputs"], hi - EVERY, hi)
        stats = KLStats(backend="torch")
        stats.update(torch.from_numpy(np.zeros_like(lr)), torch.from_numpy(lr))
        engine.evaluate(stats.compute(), hi - 1)
    expected = [a.to_dict() for a in engine.history]
    assert [(a["rule"], a["step"], a["level"]) for a in r0["alerts"]] == [
        (a["rule"], a["step"], a["level"]) for a in expected
    ]
    for got, want in zip(r0["alerts"], expected, strict=True):
        assert got["value"] == pytest.approx(want["value"], rel=1e-4)


def test_two_collectives_per_logging_step_and_none_between(ddp_run: dict[str, Any]) -> None:
    # At the defaults (top_sequences=5): one all_gather of the small parts and one all_reduce
    # of the additive ones per window (one all_gather alone with every diagnostic off: see
    # tests/test_diagnostics.py), nothing between windows.
    for report in ddp_run["reports"]:
        steps = report["per_step"]
        assert len(steps) == report["global_step"]
        for entry in steps:
            expected = ["all_gather", "all_reduce"] if entry["step"] % EVERY == 0 else []
            assert entry["calls"] == expected, (report["rank"], entry)
        # The window was closed by the stop step: nothing left to flush. The flush still joins
        # the window's collectives on every rank (a rank cannot know alone that no other rank
        # has a batch; issue 20) and returns None everywhere: no window is added.
        assert report["flush_calls"] == ["all_gather", "all_reduce"]


def _send_to_spawned_process(obj: Any) -> Any:
    """Pickle ``obj`` as the spawn launchers do (torch's ForkingPickler reductions: CPU tensors
    go to shared memory) and unpickle it, as a spawned rank would."""
    import torch.multiprocessing  # noqa: F401  (registers torch's reductions)

    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return pickle.loads(buf.getvalue())


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_unpickled_stats_do_not_share_the_window(backend: str) -> None:
    stats = KLStats(backend=backend)
    rank0, rank1 = _send_to_spawned_process(stats), _send_to_spawned_process(stats)
    rank0.update(torch.zeros(5), torch.full((5,), 0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compute before update
        assert rank1.compute().tokens == 0, "rank 1 sees rank 0's tokens"
        assert stats.compute().tokens == 0, "the launching process's object changed"
    assert rank0.compute().tokens == 5


def test_monitor_is_picklable_for_spawn_launchers() -> None:
    mon = KLMonitor(log_every_n_steps=3, max_kl=0.1)
    clone = pickle.loads(pickle.dumps(mon))
    assert clone.log_every_n_steps == 3 and [r.name for r in clone.rules] == [r.name for r in mon.rules]
    with pytest.warns(UserWarning, match="once"):
        clone.monitor.problem("kind", "klmonitor: once")
