"""KLMonitorCallback in a real transformers.Trainer on CPU: TensorBoard numbers, alerts, stop, resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tensorboard")

from hf_toys import read_tensorboard, reference_window, tiny_model, tiny_training_args  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from klmonitor import Monitor  # noqa: E402
from klmonitor.alerts import KLBudgetRule  # noqa: E402
from klmonitor.transformers import KLMonitorCallback, attach  # noqa: E402

Record = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


def _dataset(n: int = 64, length: int = 10, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 16, (length,), generator=g)
        keep = int(torch.randint(4, length + 1, (1,), generator=g))
        att = (torch.arange(length) < keep).long()
        rows.append({"input_ids": ids.masked_fill(att == 0, 0), "attention_mask": att})
    return rows


class KLTrainer(Trainer):
    """Maximum likelihood on the data, monitored against a frozen copy of the initial model."""

    def __init__(
        self,
        *args: Any,
        kl: KLMonitorCallback | None,
        ref: torch.nn.Module,
        records: list[Record],
        attach_kwargs: dict[str, Any] | None = None,
        **kw: Any,
    ):
        super().__init__(*args, callbacks=[kl] if kl is not None else None, **kw)
        # kl=None: klmonitor.transformers.attach(trainer, **attach_kwargs), the Trainer's own log.
        self.kl = kl if kl is not None else attach(self, **(attach_kwargs or {}))
        self.ref, self.records = ref, records

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        ids, att = inputs["input_ids"], inputs["attention_mask"]
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        with torch.no_grad():
            ref_logits = self.ref(input_ids=ids, attention_mask=att).logits[:, :-1]
            ref_logp = ref_logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = att[:, 1:]
        if not model.training:  # evaluation calls compute_loss too
            return -(logp * mask).sum() / mask.sum()
        self.kl.monitor.update(logp, ref_logp, mask)
        # The micro-batch belongs to the optimizer step about to happen.
        self.records.append(
            (self.state.global_step + 1, logp.detach().clone(), ref_logp.clone(), mask.clone())
        )
        return -(logp * mask).sum() / mask.sum()


def _train(
    out: Path,
    kl: KLMonitorCallback | None,
    records: list[Record],
    max_steps: int,
    resume: Path | None = None,
    rows: int = 64,
    attach_kwargs: dict[str, Any] | None = None,
    eval_rows: int = 0,
    **args: Any,
) -> KLTrainer:
    model = tiny_model()
    ref = copy.deepcopy(model).eval()
    targs = tiny_training_args(out, max_steps, 3e-2, **args)
    trainer = KLTrainer(
        model=model,
        args=targs,
        train_dataset=_dataset(rows),
        eval_dataset=_dataset(eval_rows, seed=1) if eval_rows else None,
        kl=kl,
        ref=ref,
        records=records,
        attach_kwargs=attach_kwargs,
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


def _budget(cooldown: int = 0, **kw: Any) -> KLBudgetRule:
    return KLBudgetRule(1e-9, cooldown=cooldown, **kw)


def test_scalars_reach_the_trainers_tensorboard_run_at_its_logging_steps(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    records: list[Record] = []
    kl = KLMonitorCallback(rules=[_budget()])
    _train(tmp_path / "out", kl, records, max_steps=7, gradient_accumulation_steps=2)
    scalars, texts = read_tensorboard(tmp_path / "tb")
    # One TensorBoard run holds the Trainer's loss and klmonitor's numbers, at the same steps.
    assert scalars["train/loss"][0] == [2, 4, 6]
    assert scalars["kl/k3/mean"][0] == [2, 4, 6, 7], "windows (0,2], (2,4], (4,6] and the flushed (6,7]"
    assert len(records) == 14  # 7 steps x 2 micro-batches
    for i, (lo, hi) in enumerate([(0, 2), (2, 4), (4, 6), (6, 7)]):
        want = reference_window(records, lo, hi)
        for tag, value in want.items():
            got = scalars[tag][1][i]
            assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (tag, hi, got, value)
    assert want["kl/k3/mean"] > 1e-3, "the policy moved away from the reference"
    # The budget rule fired on every window; each alert is a text entry at its step.
    assert [s for s, _ in texts] == [2, 4, 6, 7]
    assert all("kl_budget" in t and "(error)" in t for _, t in texts), texts
    assert [a.step for a in kl.monitor.alert_history] == [2, 4, 6, 7]


def test_default_tensorboard_dir_is_a_run_next_to_the_trainers(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    records: list[Record] = []
    kl = KLMonitorCallback(histogram=False)
    _train(tmp_path / "out", kl, records, max_steps=2)
    scalars, _ = read_tensorboard(tmp_path / "out" / "runs" / "klmonitor")
    assert scalars["kl/k1/mean"][0] == [2]
    assert scalars["kl/k1/mean"][1][0] == pytest.approx(
        reference_window(records, 0, 2)["kl/k1/mean"], rel=1e-5
    )


def test_stop_rule_stops_the_trainer(tmp_path: Path) -> None:
    records: list[Record] = []
    kl = KLMonitorCallback(rules=[_budget(stop_training=True)], log_every_n_steps=3)
    trainer = _train(tmp_path / "out", kl, records, max_steps=20, report_to=[])
    assert trainer.state.global_step == 3, (
        "the budget rule fired on the first window (step 3) and stopped training"
    )
    assert kl.last_result is not None and kl.last_result.stop
    assert max(step for step, *_ in records) == 3


def test_stop_on_names_a_rule(tmp_path: Path) -> None:
    kl = KLMonitorCallback(max_kl=1e-9, stop_on=["kl_budget"], sinks=lambda metrics, step: None)
    trainer = _train(tmp_path / "out", kl, [], max_steps=20, report_to=[])
    assert trainer.state.global_step == 2


def test_resume_from_a_trainer_checkpoint_keeps_the_alert_state(tmp_path: Path, monkeypatch: Any) -> None:
    # cooldown=2: after firing at step 2 the rule is quiet at 4 and 6 and fires again at 8.
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb1"))
    full = KLMonitorCallback(rules=[_budget(cooldown=2)])
    _train(tmp_path / "out", full, [], max_steps=8, save_strategy="steps", save_steps=4)
    assert [a.step for a in full.monitor.alert_history] == [2, 8]
    ckpt = tmp_path / "out" / "checkpoint-4"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["klmonitor:kl/"]
    assert saved["last_logged_step"] == 4 and [a["step"] for a in saved["engine"]["history"]] == [2]

    # A fresh callback resumed from step 4: the history and the cooldown come back from the
    # checkpoint, so the rule stays quiet at 6 (a fresh rule would fire there) and fires at 8.
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb2"))
    resumed = KLMonitorCallback(monitor=Monitor(rules=[_budget(cooldown=2)]))
    records: list[Record] = []
    _train(tmp_path / "out2", resumed, records, max_steps=8, resume=ckpt)
    assert [a.step for a in resumed.monitor.alert_history] == [2, 8]
    scalars, texts = read_tensorboard(tmp_path / "tb2")
    assert scalars["kl/k3/mean"][0] == [6, 8]
    assert [s for s, _ in texts] == [8]
    assert min(step for step, *_ in records) == 5
    assert scalars["kl/k3/mean"][1][1] == pytest.approx(
        reference_window(records, 6, 8)["kl/k3/mean"], rel=1e-5
    )

    # Without the callback's entry (a checkpoint of a run without klmonitor): one warning, fresh state.
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["klmonitor:kl/"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    fresh = KLMonitorCallback(rules=[_budget(cooldown=2)])
    with pytest.warns(UserWarning, match="has no 'klmonitor:kl/' entry"):
        _train(tmp_path / "out3", fresh, [], max_steps=6, resume=ckpt, report_to=[])
    assert [a.step for a in fresh.monitor.alert_history] == [6]


def test_epoch_checkpoints_carry_the_state(tmp_path: Path) -> None:
    kl = KLMonitorCallback(rules=[_budget(cooldown=5)], log_every_n_steps=1)
    # 8 rows, 4 per step: 2 steps per epoch, a checkpoint at the end of each epoch.
    _train(
        tmp_path / "out",
        kl,
        [],
        max_steps=-1,
        num_train_epochs=2,
        save_strategy="epoch",
        rows=8,
        report_to=[],
    )
    for step, windows in ((2, 2), (4, 4)):
        state = json.loads((tmp_path / "out" / f"checkpoint-{step}" / "trainer_state.json").read_text())
        saved = state["stateful_callbacks"]["klmonitor:kl/"]
        assert (saved["last_logged_step"], saved["windows"]) == (step, windows)
        assert [a["step"] for a in saved["engine"]["history"]] == [2]  # step 1: policy == reference


def test_user_sinks_are_kept_and_arguments_checked() -> None:
    seen: list[int] = []
    cb = KLMonitorCallback(sinks=lambda metrics, step: seen.append(step))
    assert len(cb.monitor.sinks) == 1
    with pytest.raises(TypeError, match="monitor must be a klmonitor.Monitor"):
        KLMonitorCallback(monitor="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        KLMonitorCallback(monitor=Monitor(), max_kl=0.1)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        KLMonitorCallback(log_every_n_steps=0)


def test_no_trainer_logger_no_crash_and_window_matches_reference(tmp_path: Path) -> None:
    seen: dict[int, dict[str, float]] = {}
    records: list[Record] = []
    kl = KLMonitorCallback(
        sinks=lambda metrics, step: seen.__setitem__(step, dict(metrics)), log_every_n_steps=4
    )
    _train(tmp_path / "out", kl, records, max_steps=5, report_to=[])
    assert sorted(seen) == [4, 5]
    ref = reference_window(records, 0, 4)
    assert seen[4]["kl/k3/mean"] == pytest.approx(ref["kl/k3/mean"], rel=1e-6)
    assert np.isclose(seen[4]["kl/tokens"], ref["kl/tokens"])


def test_two_processes_reduce_alert_and_stop_alike(tmp_path: Path) -> None:
    # torchrun, 2 CPU processes (gloo): each rank feeds its own micro-batches; the window is
    # reduced over both, written by rank 0 only, and the stop rule stops both at step 3.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    root = Path(__file__).resolve().parent
    env.update(
        WANDB_MODE="offline",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(root.parent), str(root), env.get("PYTHONPATH", "")]),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(root / "hf_ddp_worker.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == 3
    assert r0["alerts"] == r1["alerts"] and ["kl_budget", 3] in r0["alerts"]  # initial_kl may speak too
    assert sorted(r0["seen"]) == [3] and r1["seen"] == {}
    want = reference_window(r0["records"] + r1["records"], 0, 3)
    for tag in ("kl/k3/mean", "kl/k1/mean", "kl/k3/std", "kl/tokens"):
        assert r0["seen"][3][tag] == pytest.approx(want[tag], rel=1e-5), tag
    assert want["kl/tokens"] > reference_window(r0["records"], 0, 3)["kl/tokens"], "both ranks' tokens count"


def test_clamp_and_extreme_reach_the_monitor() -> None:
    kl = KLMonitorCallback(extreme=5.0)
    assert kl.monitor.stats.extreme == 5.0 and kl.monitor.stats.clamp is None
    assert KLMonitorCallback(clamp=10.0).monitor.stats.clamp == 10.0
    with pytest.raises(ValueError, match="extreme"):
        KLMonitorCallback(extreme=0)


def test_a_misspelled_keyword_names_the_callback_and_the_fix() -> None:
    with pytest.raises(
        TypeError,
        match=r"^klmonitor\.transformers\.KLMonitorCallback\(\) got an unexpected keyword argument "
        r"'max_kll'; did you mean 'max_kl'\?$",
    ):
        KLMonitorCallback(max_kll=0.1)
    with pytest.raises(TypeError, match=r"'loging_dir'; did you mean 'logging_dir'\?"):
        KLMonitorCallback(loging_dir="x")
    # every Monitor argument is taken (position_rows and backend included)
    cb = KLMonitorCallback(position_rows=4, backend="torch", by_position=True, max_kl=0.1)
    assert cb.monitor.position_rows == 4 and cb.monitor.stats.backend == "torch"


# -- attach(trainer): kl/* in the Trainer's own log -------------------------------------------


def _event_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*")})


def _check_against_reference(
    got: tuple[list[int], list[float]], records: list[Record], bounds: list[int], tag: str
) -> None:
    assert got[0] == bounds[1:], (tag, got[0])
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        want = reference_window(records, lo, hi)[tag]
        assert got[1][i] == pytest.approx(want, rel=1e-5, abs=1e-7), (tag, hi, got[1][i], want)


def test_attach_logs_kl_in_the_trainers_own_run_and_log_history(tmp_path: Path, monkeypatch: Any) -> None:
    # No TENSORBOARD_LOGGING_DIR: the Trainer's TensorBoardCallback picks its run directory
    # (<output_dir>/runs/<date>_<host>), and kl/* land in that run, not in one of their own.
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    records: list[Record] = []
    trainer = _train(
        tmp_path / "out",
        None,
        records,
        max_steps=7,
        gradient_accumulation_steps=2,
        attach_kwargs={"rules": [_budget()]},
    )
    assert trainer.kl.attached and trainer.callback_handler.callbacks[0] is trainer.kl
    runs = _event_dirs(tmp_path / "out")
    assert len(runs) == 1 and runs[0].parent.name == "runs" and runs[0].name != "klmonitor", runs
    scalars, texts = read_tensorboard(runs[0], alerts="train/kl/alerts")
    assert scalars["train/loss"][0] == [2, 4, 6]
    # Windows (0,2], (2,4], (4,6] at the loss's logging steps; (6,7] in the summary logged at the end.
    bounds = [0, 2, 4, 6, 7]
    for tag in ("kl/k1/mean", "kl/k2/mean", "kl/k3/mean", "kl/k3/std", "kl/k1/std", "kl/tokens"):
        _check_against_reference(scalars["train/" + tag], records, bounds, tag)
    assert reference_window(records, 4, 6)["kl/k3/mean"] > 1e-3, "the policy moved away from the reference"
    # What a log cannot carry goes to the Trainer's writer under the same names: bands, alerts.
    lower, upper = scalars["train/kl/band/k3_lower"], scalars["train/kl/band/k3_upper"]
    assert lower[0] == upper[0] == [2, 4, 6, 7]
    k3 = scalars["train/kl/k3/mean"][1]
    assert all(lo < m < hi for lo, m, hi in zip(lower[1], k3, upper[1], strict=True))
    assert [s for s, _ in texts] == [2, 4, 6, 7] and all("kl_budget" in t for _, t in texts), texts

    # state.log_history: the same numbers in the Trainer's own entries (the loss's, and the summary's).
    history = trainer.state.log_history
    with_kl = [e for e in history if "kl/k3/mean" in e]
    assert [e["step"] for e in with_kl] == [2, 4, 6, 7]
    assert all("loss" in e for e in with_kl[:3]) and "train_loss" in with_kl[3]
    for entry, value in zip(with_kl, k3, strict=True):
        assert entry["kl/k3/mean"] == pytest.approx(value, rel=1e-6)
    assert len(history) == 4, "no entries of its own: kl/* joined the Trainer's"


def test_attach_wandb_offline_gets_kl_with_the_loss(tmp_path: Path, monkeypatch: Any) -> None:
    pytest.importorskip("wandb")
    from klmonitor._readers import wandb_records

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    # wandb keeps its settings (WANDB_DIR among them) in a process-wide singleton made by the
    # first run of the process: another test's run would send this one elsewhere.
    wandb.teardown()
    records: list[Record] = []
    _train(tmp_path / "out", None, records, max_steps=4, report_to=["wandb"], attach_kwargs={})

    wandb.finish()
    (run_file,) = list(tmp_path.rglob("run-*.wandb"))
    rows: dict[int, dict[str, Any]] = {}
    for rec in wandb_records(run_file):
        if rec.get("type") == "history":
            item = rec["history"]["item"]
            if "train/global_step" in item:
                rows.setdefault(int(item["train/global_step"]), {}).update(item)
    # The Trainer's WandbCallback wrote kl/* in the rows that hold the loss, named as it names it.
    assert sorted(s for s, r in rows.items() if "train/loss" in r) == [2, 4]
    assert sorted(s for s, r in rows.items() if "train/kl/k3/mean" in r) == [2, 4]
    for step in (2, 4):
        want = reference_window(records, step - 2, step)
        assert rows[step]["train/kl/k3/mean"] == pytest.approx(want["kl/k3/mean"], rel=1e-5)
        assert rows[step]["train/kl/tokens"] == want["kl/tokens"]


def test_attach_leaves_evaluation_logs_alone_and_stops_training(tmp_path: Path) -> None:
    records: list[Record] = []
    trainer = _train(
        tmp_path / "out",
        None,
        records,
        max_steps=20,
        report_to=[],
        logging_steps=3,
        eval_strategy="steps",
        eval_steps=2,
        eval_rows=4,
        attach_kwargs={"rules": [_budget(stop_training=True)]},
    )
    # The first window ends at the first training log (step 3), whose budget alert stops training.
    assert trainer.state.global_step == 3
    evals = [e for e in trainer.state.log_history if "eval_runtime" in e]
    assert [e["step"] for e in evals] == [2], "evaluation ran at step 2"
    assert not any(k.startswith("kl/") for e in evals for k in e), "evaluation logs get no kl/*"
    assert [e["step"] for e in trainer.state.log_history if "kl/k3/mean" in e] == [3]
    assert [a.step for a in trainer.kl.monitor.alert_history] == [3]
    assert trainer.kl.last_result is not None and trainer.kl.last_result.stop


def test_attach_per_epoch_logging_and_first_step(tmp_path: Path) -> None:
    # 8 rows, 4 per step: 2 steps per epoch, logged once per epoch: windows are epochs.
    records: list[Record] = []
    trainer = _train(
        tmp_path / "out",
        None,
        records,
        max_steps=-1,
        num_train_epochs=3,
        rows=8,
        report_to=[],
        logging_strategy="epoch",
        attach_kwargs={},
    )
    logged = [e for e in trainer.state.log_history if "kl/k3/mean" in e]
    assert [e["step"] for e in logged] == [2, 4, 6]
    for entry, (lo, hi) in zip(logged, [(0, 2), (2, 4), (4, 6)], strict=True):
        assert entry["kl/k3/mean"] == pytest.approx(reference_window(records, lo, hi)["kl/k3/mean"], rel=1e-5)
    # logging_first_step: the Trainer logs step 1 too, and the first window is (0, 1].
    records = []
    trainer = _train(
        tmp_path / "out2", None, records, max_steps=4, report_to=[], logging_first_step=True, attach_kwargs={}
    )
    assert [e["step"] for e in trainer.state.log_history if "kl/tokens" in e] == [1, 2, 4]


def test_attach_resume_keeps_the_alert_state(tmp_path: Path) -> None:
    full = _train(
        tmp_path / "out",
        None,
        [],
        max_steps=8,
        report_to=[],
        save_strategy="steps",
        save_steps=4,
        attach_kwargs={"rules": [_budget(cooldown=2)]},
    )
    assert [a.step for a in full.kl.monitor.alert_history] == [2, 8]
    ckpt = tmp_path / "out" / "checkpoint-4"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["klmonitor:kl/"]
    # Stored after the window of step 4 ended in the log, before the checkpoint was written.
    assert saved["windows"] == 2 and saved["batches_in_window"] == 0
    records: list[Record] = []
    resumed = _train(
        tmp_path / "out2",
        None,
        records,
        max_steps=8,
        resume=ckpt,
        report_to=[],
        attach_kwargs={"rules": [_budget(cooldown=2)]},
    )
    assert [a.step for a in resumed.kl.monitor.alert_history] == [2, 8]
    logged = [e for e in resumed.state.log_history if "kl/k3/mean" in e and e["step"] > 4]
    assert [e["step"] for e in logged] == [6, 8]
    assert logged[0]["kl/k3/mean"] == pytest.approx(reference_window(records, 4, 6)["kl/k3/mean"], rel=1e-5)


def test_attach_arguments_are_checked(tmp_path: Path) -> None:
    model = tiny_model()
    trainer = KLTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True),
        train_dataset=_dataset(8),
        kl=None,
        ref=copy.deepcopy(model),
        records=[],
    )
    with pytest.raises(ValueError, match=r"logging_steps"):
        attach(trainer, prefix="kl2/", log_every_n_steps=5)
    with pytest.raises(ValueError, match=r"logging_dir"):
        attach(trainer, prefix="kl2/", logging_dir="x")
    with pytest.raises(ValueError, match=r"already has a KLMonitorCallback with prefix 'kl/'"):
        attach(trainer)
    with pytest.raises(TypeError, match=r"attach\(\) takes a transformers.Trainer"):
        attach(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"did you mean 'max_kl'"):
        attach(trainer, prefix="kl2/", max_kll=0.1)
    second = attach(trainer, prefix="kl2/", max_kl=0.1)
    assert second.attached and second.monitor.prefix == "kl2/"
    assert not KLMonitorCallback().attached
