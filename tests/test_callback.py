"""KLMonitor under real Lightning Trainers with real logger files read back."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from tb_files import events
from torch.utils._python_dispatch import TorchDispatchMode
from toy_models import ToyPolicy, make_trainer, window_reference

from klmonitor import KLMonitor
from klmonitor.alerts import DriftRule, KLBudgetRule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning.*")


def _scalars(acc: Any, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tensorboard_values_match_independent_computation(tmp_path: Path) -> None:
    model = ToyPolicy(lr=0.5)
    mon = KLMonitor(log_every_n_steps=5)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 20, loggers=[tb], callbacks=[mon]).fit(model)
    acc = events(Path(tb.log_dir))
    tags = set(acc.Tags()["scalars"])
    for name in (
        "kl/k1/mean",
        "kl/k1/std",
        "kl/k2/mean",
        "kl/k3/mean",
        "kl/k3/std",
        "kl/drift_k2_k3",
        "kl/tokens",
    ):
        assert name in tags, name
    k3 = _scalars(acc, "kl/k3/mean")
    # the window of optimizer steps (hi - 5, hi] is logged at hi - 1, Lightning's step for its last batch
    assert sorted(k3) == [4, 9, 14, 19]
    for hi in (5, 10, 15, 20):
        ref = window_reference(model.seen, hi - 5, hi)
        assert _scalars(acc, "kl/tokens")[hi - 1] == ref["tokens"]
        for key in ("k1/mean", "k2/mean", "k3/mean", "k1/std", "k3/std"):
            got = _scalars(acc, f"kl/{key}")[hi - 1]
            assert got == pytest.approx(ref[key], rel=2e-4, abs=1e-7), (hi, key)
        assert _scalars(acc, "kl/drift_k2_k3")[hi - 1] == pytest.approx(
            ref["drift_k2_k3"], rel=5e-3, abs=1e-6
        )
    # the histogram and the margin-chart bands
    assert "kl/log_ratio" in acc.Tags()["histograms"]
    assert "kl/band/k3_upper" in tags
    assert mon.last_summary is not None and mon.last_summary.tokens == ref["tokens"]


def test_csv_logger_and_every_logger_gets_metrics(tmp_path: Path) -> None:
    model = ToyPolicy(lr=0.2)
    mon = KLMonitor(log_every_n_steps=4)
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 12, loggers=[csv_logger, tb], callbacks=[mon]).fit(model)
    rows = list(csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv")))
    steps = sorted({int(r["step"]) for r in rows if r.get("kl/k3/mean")})
    assert steps == [3, 7, 11]
    assert sorted(_scalars(events(Path(tb.log_dir)), "kl/k3/mean")) == [3, 7, 11]


def test_window_flushed_at_train_end(tmp_path: Path) -> None:
    model = ToyPolicy()
    mon = KLMonitor(log_every_n_steps=5)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 13, loggers=[tb], callbacks=[mon]).fit(model)
    tokens = _scalars(events(Path(tb.log_dir)), "kl/tokens")
    assert sorted(tokens) == [4, 9, 12]  # the rest flushed at its last batch's step
    assert tokens[12] == window_reference(model.seen, 10, 13)["tokens"]
    assert sum(tokens.values()) == window_reference(model.seen, 0, 13)["tokens"]


def test_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    model = ToyPolicy(lr=2.0, pull=3.0)
    mon = KLMonitor(log_every_n_steps=5, max_kl=1e-6)  # the budget fires: alert goes through run.alert
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="klmonitor-test")
    try:
        make_trainer(tmp_path, 10, loggers=[logger], callbacks=[mon]).fit(model)
        summary = logger.experiment.summary
        ref = window_reference(model.seen, 5, 10)
        assert summary["kl/k3/mean"] == pytest.approx(ref["k3/mean"], rel=2e-4)
        assert summary["trainer/global_step"] == 9  # Lightning's step of the 10th batch's self.log
        assert any(a.rule == "kl_budget" for a in mon.alert_history)
    finally:
        wandb.finish()


class _DispatchRecorder(TorchDispatchMode):
    SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.masked_select")

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        if name in self.SYNC_OPS:
            self.syncs.append(name)
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.syncs.append(name + "[bool]")
        return func(*args, **(kwargs or {}))


class _SyncCountingMonitor(KLMonitor):
    """Records host-sync ops inside the callback on steps that are not logging steps."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.quiet_steps = 0
        self.syncs: list[str] = []

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.monitor.log_every_n_steps == 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        rec = _DispatchRecorder()
        with rec:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.quiet_steps += 1
        self.syncs.extend(rec.syncs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_host_sync_between_logging_steps(tmp_path: Path, dtype: torch.dtype) -> None:
    # float64 goes through the pure-torch path (the one used on GPUs); float32 on CPU through
    # the fused kernel. Both must be free of sync-forcing ops.
    class Model(ToyPolicy):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            out["logprobs"] = out["logprobs"].to(dtype)
            out["ref_logprobs"] = out["ref_logprobs"].to(dtype)
            return out

    mon = _SyncCountingMonitor(log_every_n_steps=5, histogram=True)
    make_trainer(tmp_path, 12, callbacks=[mon]).fit(Model())
    assert mon.quiet_steps >= 9
    assert mon.syncs == []


def test_alerts_quiet_when_policy_equals_reference(tmp_path: Path) -> None:
    model = ToyPolicy(lr=0.0)
    mon = KLMonitor(log_every_n_steps=2)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 20, loggers=[tb], callbacks=[mon]).fit(model)
    assert mon.alert_history == []
    k3 = _scalars(events(Path(tb.log_dir)), "kl/k3/mean")
    assert all(v == 0.0 for v in k3.values())
    drift = _scalars(events(Path(tb.log_dir)), "kl/drift_k2_k3")
    assert all(v == 0.0 for v in drift.values())


def test_drift_alert_fires_under_real_drift_and_reaches_tensorboard(tmp_path: Path) -> None:
    model = ToyPolicy(lr=3.0, pull=4.0, batch=64)
    seen: list[Any] = []
    # The drift rule at 0.1 (its default, 1.0, is for healthy runs that reach KL ~1 per token).
    mon = KLMonitor(log_every_n_steps=5, on_alert=seen.append, rules=[DriftRule(threshold=0.1)])
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 60, loggers=[tb], callbacks=[mon]).fit(model)
    rules = {a.rule for a in mon.alert_history}
    assert "drift" in rules, [(a.rule, a.step, a.value) for a in mon.alert_history]
    assert seen == mon.alert_history
    drift_alert = next(a for a in mon.alert_history if a.rule == "drift")
    assert drift_alert.step % 5 == 4 and drift_alert.message  # logged at 4, 9, ... (Lightning's grid)
    acc = events(Path(tb.log_dir))
    tag = next(t for t in acc.Tags()["tensors"] if t.startswith("kl/alerts"))
    texts = [t.tensor_proto.string_val[0] for t in acc.Tensors(tag)]
    assert any(b"**drift**" in t for t in texts), texts


def test_stop_on_rule_stops_training(tmp_path: Path) -> None:
    model = ToyPolicy(lr=3.0, pull=4.0)
    mon = KLMonitor(log_every_n_steps=2, rules=[KLBudgetRule(1e-3)], stop_on=("kl_budget",))
    trainer = make_trainer(tmp_path, 200, callbacks=[mon])
    trainer.fit(model)
    assert trainer.global_step < 200
    assert mon.alert_history and mon.alert_history[0].rule == "kl_budget"


@pytest.mark.parametrize("bad", ["missing", "shape", "int"])
def test_bad_input_warns_once_and_training_continues(tmp_path: Path, bad: str) -> None:
    model = ToyPolicy(bad=bad)
    mon = KLMonitor(log_every_n_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, 9, callbacks=[mon])
        trainer.fit(model)
    assert trainer.global_step == 9
    ours = [w for w in caught if "klmonitor" in str(w.message)]
    kinds = {str(w.message).split(":")[1][:30] for w in ours}
    # one warning for the bad input (and one for the resulting empty windows), not one per step
    assert 1 <= len(ours) <= 2, [str(w.message) for w in ours]
    assert len(kinds) == len(ours)


@pytest.mark.parametrize("bad", ["missing", "shape", "int"])
def test_strict_raises_on_bad_input(tmp_path: Path, bad: str) -> None:
    mon = KLMonitor(log_every_n_steps=3, strict=True)
    with pytest.raises((ValueError, TypeError), match="klmonitor"):
        make_trainer(tmp_path, 3, callbacks=[mon]).fit(ToyPolicy(bad=bad))


def test_nonfinite_tokens_counted_and_alerted(tmp_path: Path) -> None:
    model = ToyPolicy(bad="nan")
    mon = KLMonitor(log_every_n_steps=3)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 6, loggers=[tb], callbacks=[mon]).fit(model)
    acc = events(Path(tb.log_dir))
    assert _scalars(acc, "kl/nonfinite") == {2: 6.0, 5: 6.0}  # 2 bad tokens per step
    assert all(math.isfinite(v) for v in _scalars(acc, "kl/k3/mean").values())
    assert "nonfinite" in {a.rule for a in mon.alert_history}


def test_strict_raises_on_nonfinite(tmp_path: Path) -> None:
    mon = KLMonitor(log_every_n_steps=3, strict=True)
    with pytest.raises(ValueError, match="NaN or infinite"):
        make_trainer(tmp_path, 3, callbacks=[mon]).fit(ToyPolicy(bad="nan"))


def test_loss_only_output_warns(tmp_path: Path) -> None:
    # Lightning wraps a bare loss tensor into {"loss": loss}: the keys are missing
    mon = KLMonitor(log_every_n_steps=2)
    with pytest.warns(UserWarning, match="has no"):
        make_trainer(tmp_path, 4, callbacks=[mon]).fit(ToyPolicy(output="tensor"))


class _BrokenLogger(Logger):
    @property
    def name(self) -> str:
        return "broken"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Any, step: Any = None) -> None:
        raise RuntimeError("tracker down")


def test_failing_logger_warns_once_others_keep_working(tmp_path: Path) -> None:
    mon = KLMonitor(log_every_n_steps=2)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, 8, loggers=[_BrokenLogger(), tb], callbacks=[mon]).fit(ToyPolicy())
    ours = [w for w in caught if "tracker down" in str(w.message)]
    assert len(ours) == 1
    assert sorted(_scalars(events(Path(tb.log_dir)), "kl/k3/mean")) == [1, 3, 5, 7]


def test_failing_on_alert_callable_does_not_stop_training(tmp_path: Path) -> None:
    def boom(alert: Any) -> None:
        raise RuntimeError("pager down")

    mon = KLMonitor(log_every_n_steps=2, rules=[KLBudgetRule(1e-9)], on_alert=boom)
    with pytest.warns(UserWarning, match="pager down"):
        trainer = make_trainer(tmp_path, 6, callbacks=[mon])
        trainer.fit(ToyPolicy(lr=1.0))
    assert trainer.global_step == 6 and len(mon.alert_history) >= 1


def test_gradient_accumulation_windows_follow_optimizer_steps(tmp_path: Path) -> None:
    model = ToyPolicy()
    mon = KLMonitor(log_every_n_steps=2)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 6, loggers=[tb], callbacks=[mon], accumulate_grad_batches=3).fit(model)
    tokens = _scalars(events(Path(tb.log_dir)), "kl/tokens")
    assert sorted(tokens) == [1, 3, 5]
    assert len(model.seen) == 18  # 3 micro-batches per optimizer step, all monitored
    for hi in (2, 4, 6):
        assert tokens[hi - 1] == window_reference(model.seen, hi - 2, hi)["tokens"]


def test_manual_optimization(tmp_path: Path) -> None:
    model = ToyPolicy(manual=True)
    mon = KLMonitor(log_every_n_steps=3)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 9, loggers=[tb], callbacks=[mon]).fit(model)
    k3 = _scalars(events(Path(tb.log_dir)), "kl/k3/mean")
    assert sorted(k3) == [2, 5, 8]
    assert k3[8] == pytest.approx(window_reference(model.seen, 6, 9)["k3/mean"], rel=2e-4)


def test_extract_callable(tmp_path: Path) -> None:
    def extract(outputs: Any, batch: Any, module: Any) -> Any:
        return outputs["lp"], outputs["rlp"], None

    class Model(ToyPolicy):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            return {"loss": out["loss"], "lp": out["logprobs"], "rlp": out["ref_logprobs"]}

    mon = KLMonitor(log_every_n_steps=2, extract=extract)
    make_trainer(tmp_path, 4, callbacks=[mon]).fit(Model(mask_p=0.0))
    assert mon.last_summary is not None and mon.last_summary.tokens == 2 * 16 * 10


def _run_resumable(tmp_path: Path, steps: int, ckpt: str | None, save_at: int | None) -> tuple[Any, Path]:
    model = ToyPolicy(lr=2.0, pull=3.0, batch=32)
    mon = KLMonitor(log_every_n_steps=4, max_kl=0.05)
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    callbacks: list[Any] = [mon]
    if save_at is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=save_at, save_top_k=-1)
        )
    trainer = make_trainer(
        tmp_path, steps, loggers=[tb], callbacks=callbacks, enable_checkpointing=save_at is not None
    )
    trainer.fit(model, ckpt_path=ckpt)
    return mon, Path(tb.log_dir)


def test_resume_from_checkpoint_alerts_and_logs_like_uninterrupted(tmp_path: Path) -> None:
    full, full_dir = _run_resumable(tmp_path / "full", 40, None, None)
    # interrupted at step 18 (mid-window: windows end at 4, 8, ...), resumed to 40
    _, _ = _run_resumable(tmp_path / "part", 18, None, 18)
    ckpts = sorted((tmp_path / "part" / "ckpt").glob("*.ckpt"))
    assert ckpts
    resumed, resumed_dir = _run_resumable(tmp_path / "part", 40, str(ckpts[-1]), None)
    assert [a.to_dict() for a in resumed.alert_history] == [a.to_dict() for a in full.alert_history]
    assert full.alert_history, "the run should drift enough to alert"
    a, b = _scalars(events(full_dir), "kl/k3/mean"), _scalars(events(resumed_dir), "kl/k3/mean")
    for step in range(19, 40, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-9), step


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps"):
        KLMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match="level"):
        KLMonitor(level="word")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clamp"):
        KLMonitor(clamp=-1)
    with pytest.raises(ValueError, match="stop_on"):
        KLMonitor(stop_on=("no_such_rule",))
    with pytest.raises(ValueError, match="max_kl"):
        KLMonitor(max_kl=0)
    with pytest.raises(TypeError, match="extract"):
        KLMonitor(extract=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_alert"):
        KLMonitor(on_alert=[print, 3])  # type: ignore[list-item]
