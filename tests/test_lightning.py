"""The Lightning adapters: ``klmonitor.lightning`` and ``klmonitor.pytorch_lightning``, in real runs.

Every test runs under both packages: a real Trainer with each package's TensorBoardLogger
(event files read back with TensorBoard's EventAccumulator), each package's LightningCLI
(command line and YAML), a monitor reused for a second ``fit``, and two monitors in one Trainer.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from tb_files import events, texts
from toy_models import ToyPolicy, lightning_toy_policy, make_trainer, window_reference

from klmonitor.alerts import Alert, parse_alert_text

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

PACKAGES = ["lightning", "pytorch_lightning"]


def _pl(package: str) -> Any:
    return importlib.import_module("lightning.pytorch" if package == "lightning" else "pytorch_lightning")


def _monitor_cls(package: str) -> Any:
    return importlib.import_module(f"klmonitor.{package}").KLMonitor


def _model(package: str, **kw: Any) -> Any:
    return (lightning_toy_policy() if package == "lightning" else ToyPolicy)(**kw)


@pytest.mark.parametrize("package", PACKAGES)
def test_is_a_callback_of_its_own_package_and_imports_only_it(package: str) -> None:
    pl = _pl(package)
    mon = _monitor_cls(package)(max_kl=0.1)
    assert isinstance(mon, pl.Callback)
    other = _pl("pytorch_lightning" if package == "lightning" else "lightning")
    assert not isinstance(mon, other.Callback)


@pytest.mark.parametrize("package", PACKAGES)
def test_trainer_run_logs_everything_to_tensorboard(tmp_path: Path, package: str) -> None:
    pl = _pl(package)
    model = _model(package, lr=0.5)
    mon = _monitor_cls(package)(log_every_n_steps=5, max_kl=1e-6)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    make_trainer(tmp_path, 12, loggers=[logger], callbacks=[mon], package=package).fit(model)

    acc = events(tmp_path)
    k3 = {e.step: e.value for e in acc.Scalars("kl/k3/mean")}
    assert sorted(k3) == [4, 9, 11]  # two windows and the flushed rest, at their last batch's step
    for lo, hi in ((0, 5), (5, 10), (10, 12)):
        want = window_reference(model.seen, lo, hi)
        assert k3[hi - 1] == pytest.approx(want["k3/mean"], rel=1e-5)
        assert acc.Scalars("kl/k1/std")[[5, 10, 12].index(hi)].value == pytest.approx(
            want["k1/std"], rel=1e-5
        )
    assert "kl/band/k3_upper" in acc.Tags()["scalars"]
    assert acc.Tags()["histograms"] == ["kl/log_ratio"]
    assert acc.PluginTagToContent("custom_scalars"), "no custom-scalars layout"
    alerts = [parse_alert_text(text) for text in texts(acc, "kl/alerts")]
    assert alerts and all(a is not None and a[0] == "kl_budget" for a in alerts)
    assert [a.rule for a in mon.alert_history] == ["kl_budget"] * len(mon.alert_history)


def _csv_steps(path: Path, column: str) -> list[int]:
    with open(path) as f:
        return sorted({int(r["step"]) for r in csv.DictReader(f) if r.get(column)})


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_kl_lands_on_lightnings_own_step_grid_beside_self_log(
    tmp_path: Path, package: str, accumulate: int
) -> None:
    # The user's self.log("reward") in training_step is written by Lightning at the step
    # before the batch's optimizer step (log_every_n_steps=5: 4, 9, 14); each window's kl/*
    # must land on those very steps, in TensorBoard and in the CSV file of the same run.
    pl = _pl(package)
    model = _model(package, lr=0.5, log_reward=True)
    mon = _monitor_cls(package)(max_kl=1e-6)  # the Trainer's log_every_n_steps (5)
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    make_trainer(
        tmp_path,
        15,
        loggers=[tb, csv_logger],
        callbacks=[mon],
        package=package,
        accumulate_grad_batches=accumulate,
    ).fit(model)

    acc = events(tb.log_dir)
    reward_steps = sorted(e.step for e in acc.Scalars("reward"))
    assert reward_steps == [4, 9, 14]
    k3 = {e.step: e.value for e in acc.Scalars("kl/k3/mean")}
    assert sorted(k3) == reward_steps
    for name in ("kl/tokens", "kl/k1/mean", "kl/band/k3_upper"):
        assert sorted(e.step for e in acc.Scalars(name)) == reward_steps, name
    assert sorted(e.step for e in acc.Histograms("kl/log_ratio")) == reward_steps
    # the window logged at step 4 holds the optimizer steps 0..4 (the batches before step 5)
    for logged, (lo, hi) in zip(reward_steps, ((0, 5), (5, 10), (10, 15)), strict=True):
        assert k3[logged] == pytest.approx(window_reference(model.seen, lo, hi)["k3/mean"], rel=1e-5)
    # alerts are stamped (and written) with the step their window is logged at
    assert [a.step for a in mon.alert_history] == [4]  # kl_budget, then its cooldown
    assert [parse_alert_text(t)[2] for t in texts(acc, "kl/alerts")] == [4]  # type: ignore[index]

    metrics = Path(csv_logger.log_dir) / "metrics.csv"
    assert _csv_steps(metrics, "reward") == reward_steps
    assert _csv_steps(metrics, "kl/k3/mean") == reward_steps


@pytest.mark.parametrize("package", PACKAGES)
def test_flushed_window_lands_at_its_last_batchs_step(tmp_path: Path, package: str) -> None:
    # 12 steps with windows of 5: windows at 4 and 9 as Lightning's grid; the rest (steps
    # 10..11's batches) is flushed at the step Lightning numbers the last batch with (11),
    # the global_step its training_step saw.
    pl = _pl(package)
    model = _model(package, log_reward=True)
    mon = _monitor_cls(package)(log_every_n_steps=5)
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, 12, loggers=[tb], callbacks=[mon], package=package).fit(model)
    tokens = {e.step: e.value for e in events(tb.log_dir).Scalars("kl/tokens")}
    assert sorted(tokens) == [4, 9, model.seen[-1]["step"]] == [4, 9, 11]
    assert tokens[11] == window_reference(model.seen, 10, 12)["tokens"]
    assert mon.last_summary is not None and mon.monitor.windows == 3


@pytest.mark.parametrize("package", PACKAGES)
def test_a_soft_mask_is_named_once(tmp_path: Path, package: str) -> None:
    # training_step returns a float mask with 0.5 for some tokens (a soft mask): one warning
    # names the mask and its count at the first window's end, none for the later windows.
    base = lightning_toy_policy() if package == "lightning" else ToyPolicy

    class SoftMask(base):  # type: ignore[misc, valid-type]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            soft = out["mask"].float()
            soft[:, 0] = 0.5
            out["mask"] = soft
            return out

    mon = _monitor_cls(package)(log_every_n_steps=2)
    with pytest.warns(UserWarning) as caught:
        make_trainer(tmp_path, 6, callbacks=[mon], package=package).fit(SoftMask(batch=8))
    named = [str(w.message) for w in caught if "the mask held" in str(w.message)]
    assert len(named) == 1 and "the mask held 16 values other than 0 and 1" in named[0], named
    assert mon.last_summary is not None and mon.last_summary.nonfinite == 16  # 8 rows x 2 steps


@pytest.mark.parametrize("package", PACKAGES)
def test_takes_every_monitor_argument_with_the_monitors_defaults(package: str) -> None:
    # One definition: the Monitor's own signature. Every argument but those the Trainer
    # provides (sinks: its loggers; rank) is accepted, with the same default
    # (log_every_n_steps: None takes the Trainer's), and reaches the monitor.
    from klmonitor._args import MONITOR_ARGS

    cls = _monitor_cls(package)
    params = inspect.signature(cls.__init__).parameters
    missing = sorted(set(MONITOR_ARGS) - {"sinks", "rank"} - set(params))
    assert missing == []
    differ = {
        n: (params[n].default, d) for n, d in MONITOR_ARGS.items() if n in params and params[n].default != d
    }
    assert differ == {"log_every_n_steps": (None, 50)}
    mon = cls(position_rows=4, backend="torch", by_position=True, top_tokens=2, vocab_size=9)
    assert mon.monitor.position_rows == 4 and mon.monitor.stats.backend == "torch"
    assert mon.monitor.tokens is not None and mon.monitor.tokens.vocab_size == 9


@pytest.mark.parametrize("package", PACKAGES)
def test_a_misspelled_keyword_names_the_public_class_and_the_fix(package: str) -> None:
    cls = _monitor_cls(package)
    with pytest.raises(TypeError, match=rf"^klmonitor\.{package}\.KLMonitor\(\) got an unexpected keyword "
                       r"argument 'max_kll'; did you mean 'max_kl'\?$"):  # fmt: skip
        cls(max_kll=0.1)
    with pytest.raises(TypeError, match=r"'position_row'; did you mean 'position_rows'\?"):
        cls(position_row=4)
    with pytest.raises(TypeError, match=r"'zzz'; it takes log_every_n_steps, prefix, "):
        cls(zzz=1)


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_cli_help_describes_every_argument_in_plain_text(
    package: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_mod = importlib.import_module(
        f"{'lightning.pytorch' if package == 'lightning' else 'pytorch_lightning'}.cli"
    )
    model_cls = lightning_toy_policy() if package == "lightning" else ToyPolicy
    with pytest.raises(SystemExit):
        cli_mod.LightningCLI(
            model_cls, args=["fit", "--trainer.callbacks.help", f"klmonitor.{package}.KLMonitor"]
        )
    out = capsys.readouterr().out
    assert ":class:" not in out and "``" not in out and ":func:" not in out and ":attr:" not in out
    # each option's block: the text between its "--trainer.callbacks.NAME" line and the next option
    blocks = re.split(r"\n  --trainer\.callbacks\.", out.split("Help for --trainer.callbacks.help")[1])[1:]
    described = {}
    for block in blocks:
        name, _, rest = block.partition(" ")
        text = rest.split("(type:")[0]
        described[name] = " ".join(text.split()[1:]) if name.isidentifier() else ""
    for name in inspect.signature(_monitor_cls(package).__init__).parameters:
        if name != "self":
            assert len(described.get(name, "")) > 10, (name, described.get(name))


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_cli_accepts_the_callback_from_the_command_line_and_yaml(
    tmp_path: Path, package: str
) -> None:
    cli_mod = importlib.import_module(
        f"{'lightning.pytorch' if package == 'lightning' else 'pytorch_lightning'}.cli"
    )
    model_cls = lightning_toy_policy() if package == "lightning" else ToyPolicy
    common = [
        "--trainer.max_steps=6",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    path = f"klmonitor.{package}.KLMonitor"
    cli = cli_mod.LightningCLI(
        model_cls,
        args=[
            "fit",
            *common,
            f"--trainer.callbacks+={path}",
            "--trainer.callbacks.max_kl=0.1",
            "--trainer.callbacks.log_every_n_steps=2",
        ],
        save_config_kwargs={"overwrite": True},
    )
    mons = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "KLMonitor"]
    assert len(mons) == 1 and type(mons[0]).__module__ == f"klmonitor.{package}"
    assert mons[0].rules[-1].name == "kl_budget" and mons[0].rules[-1].threshold == 0.1
    assert mons[0].monitor.windows == 3 and mons[0].last_summary.tokens > 0

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n"
        f"    - class_path: {path}\n      init_args:\n        max_kl: 0.2\n        prefix: policy_kl/\n"
        "        stop_on: [kl_budget]\n        log_every_n_steps: 3\n"
    )
    cli = cli_mod.LightningCLI(
        model_cls, args=["fit", f"--config={config}", *common], save_config_kwargs={"overwrite": True}
    )
    (mon,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "KLMonitor"]
    assert mon.prefix == "policy_kl/" and mon.monitor.stop_on == ("kl_budget",)
    assert mon.monitor.log_every_n_steps == 3 and mon.monitor.windows == 2


@pytest.mark.parametrize("package", PACKAGES)
def test_reused_for_a_second_fit_starts_fresh_and_writes_the_layout_again(
    tmp_path: Path, package: str
) -> None:
    pl = _pl(package)
    mon = _monitor_cls(package)(log_every_n_steps=4)
    first = _model(package, seed=1)
    make_trainer(
        tmp_path,
        10,
        loggers=[pl.loggers.TensorBoardLogger(str(tmp_path / "a"))],
        callbacks=[mon],
        package=package,
    ).fit(first)
    second = _model(package, seed=2)
    make_trainer(
        tmp_path,
        6,
        loggers=[pl.loggers.TensorBoardLogger(str(tmp_path / "b"))],
        callbacks=[mon],
        package=package,
    ).fit(second)
    acc = events(tmp_path / "b")
    k3 = {e.step: e.value for e in acc.Scalars("kl/k3/mean")}
    assert sorted(k3) == [3, 5]
    # The second run's first window holds its own steps 0..3 only (none of the first run's).
    assert k3[3] == pytest.approx(window_reference(second.seen, 0, 4)["k3/mean"], rel=1e-5)
    assert k3[5] == pytest.approx(window_reference(second.seen, 4, 6)["k3/mean"], rel=1e-5)
    assert acc.PluginTagToContent("custom_scalars")


@pytest.mark.parametrize("package", PACKAGES)
def test_two_monitors_in_one_trainer_with_checkpoints(tmp_path: Path, package: str) -> None:
    pl = _pl(package)
    cls = _monitor_cls(package)
    tok, seq = cls(log_every_n_steps=3), cls(log_every_n_steps=3, prefix="kl_seq/", level="sequence")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1)
    model = _model(package)
    trainer = make_trainer(
        tmp_path,
        6,
        loggers=[pl.loggers.TensorBoardLogger(str(tmp_path))],
        callbacks=[tok, seq, ckpt],
        enable_checkpointing=True,
        package=package,
    )
    trainer.fit(model)
    scalars = events(tmp_path).Tags()["scalars"]
    assert "kl/k3/mean" in scalars and "kl_seq/k3/mean" in scalars and "kl_seq/sequences" in scalars
    assert tok.last_summary is not None and seq.last_summary is not None
    assert seq.last_summary.level == "sequence" and tok.last_summary.level == "token"
    saved = torch.load(sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1], weights_only=False)["callbacks"]
    assert {tok.state_key, seq.state_key} <= set(saved) and tok.state_key != seq.state_key

    # The same prefix twice would write the same names: Lightning refuses the duplicate state key.
    same = [cls(log_every_n_steps=3), cls(log_every_n_steps=3)]
    with pytest.raises(RuntimeError, match="state_key"):
        make_trainer(tmp_path, 2, callbacks=same, package=package).fit(_model(package))


@pytest.mark.parametrize("package", PACKAGES)
def test_alert_reaches_on_alert_and_stops_training(tmp_path: Path, package: str) -> None:
    got: list[Alert] = []
    mon = _monitor_cls(package)(log_every_n_steps=2, max_kl=1e-6, stop_on=("kl_budget",), on_alert=got.append)
    trainer = make_trainer(tmp_path, 50, callbacks=[mon], package=package)
    trainer.fit(_model(package, lr=0.5))
    assert trainer.global_step == 2 and [a.rule for a in got] == ["kl_budget"]
    assert math.isfinite(got[0].value) and got[0].value > 1e-6


@pytest.mark.parametrize("package", PACKAGES)
def test_rollout_log_probs_and_token_ids_through_the_callback(tmp_path: Path, package: str) -> None:
    # training_step returns the rollout engine's log-probs and the token ids: the rollout check
    # and the diagnostics come out of the same window as the main statistics.
    base = lightning_toy_policy() if package == "lightning" else ToyPolicy

    class WithRollout(base):  # type: ignore[misc, valid-type]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            g = torch.Generator().manual_seed(int(self.global_step))
            out["rollout_logprobs"] = out["logprobs"].detach() + 0.3 * torch.randn(
                out["logprobs"].shape, generator=g
            )
            out["token_ids"] = torch.randint(0, 12, out["logprobs"].shape, generator=g)
            return out

    pl = _pl(package)
    mon = _monitor_cls(package)(
        log_every_n_steps=3, by_position=True, top_sequences=2, top_tokens=3, vocab_size=12, decode=str
    )
    model = WithRollout()
    make_trainer(
        tmp_path, 3, loggers=[pl.loggers.TensorBoardLogger(str(tmp_path))], callbacks=[mon], package=package
    ).fit(model)
    s = mon.last_summary
    assert s is not None and s.rollout is not None and s.by_position and len(s.top_sequences) == 2
    assert s.rollout.kl.tokens == window_reference(model.seen, 0, 3)["tokens"]
    assert s.rollout.kl.k3.mean > 0.01 and s.top_tokens and s.top_sequences[0].text is not None
    tags = events(tmp_path).Tags()
    assert "kl/rollout/k3/mean" in tags["scalars"] and "kl/by_position/0-1/k3" in tags["scalars"]
    assert {"kl/top_sequences/text_summary", "kl/top_tokens/text_summary"} <= set(tags["tensors"])


@pytest.mark.parametrize("package", PACKAGES)
def test_extreme_tokens_are_counted_alerted_and_kept_exact(tmp_path: Path, package: str) -> None:
    # One valid token per step at l = -30 (the policy emits it e^30 times more readily than the
    # reference): kl/extreme counts it, the extreme rule fires, and k3 keeps its full value (no
    # clamp by default) while clamp=20 (peers' behaviour) cuts it.
    base = lightning_toy_policy() if package == "lightning" else ToyPolicy

    class WithExtreme(base):  # type: ignore[misc, valid-type]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            first = int(torch.nonzero(out["mask"].reshape(-1))[0])
            ref = out["ref_logprobs"].detach().contiguous().clone()
            ref.view(-1)[first] = out["logprobs"].detach().reshape(-1)[first] - 30.0
            out["ref_logprobs"] = ref
            return out

    pl = _pl(package)
    runs = {}
    for name, kwargs in (("exact", {}), ("clamped", {"clamp": 20.0})):
        mon = _monitor_cls(package)(log_every_n_steps=3, extreme=25.0, **kwargs)
        make_trainer(
            tmp_path / name, 3, loggers=[pl.loggers.TensorBoardLogger(str(tmp_path / name))], callbacks=[mon],
            package=package,
        ).fit(WithExtreme())  # fmt: skip
        runs[name] = mon
    exact, clamped = runs["exact"].last_summary, runs["clamped"].last_summary
    assert exact is not None and clamped is not None
    assert exact.extreme == 3 and clamped.extreme == 3  # a clamp below extreme= counts what it clamps
    assert exact.max_abs_log_ratio == pytest.approx(30.0, abs=0.5)
    # each step's l = -30 token adds 29 to the k3 sum without a clamp, 19 with clamp=20
    gap = (exact.k3.mean - clamped.k3.mean) * exact.tokens
    assert gap == pytest.approx(3 * ((math.exp(-30) + 29) - (math.exp(-20) + 19)), rel=1e-3)
    assert [a.rule for a in runs["exact"].alert_history].count("extreme") == 1
    tags = events(tmp_path / "exact").Tags()["scalars"]
    assert "kl/extreme" in tags and "kl/clamped" not in tags


@pytest.mark.parametrize("package", PACKAGES)
def test_initial_kl_judges_the_untrained_policy_only(tmp_path: Path, package: str) -> None:
    # A fast learner (lr 0.5) moves far inside the first window of 5 steps, with gradient
    # accumulation: the batches before the first optimizer step are an exact copy, so
    # initial_kl stays quiet (the old rule fired here, judging the whole first window).
    mon = _monitor_cls(package)(log_every_n_steps=5)
    model = _model(package, lr=0.5)
    make_trainer(tmp_path, 10, callbacks=[mon], package=package, accumulate_grad_batches=2).fit(model)
    assert mon.last_summary is not None and mon.monitor.windows == 2
    assert all(a.rule != "initial_kl" for a in mon.alert_history)
    first = [r for r in mon.rules if r.name == "initial_kl"][0]
    assert first.checked

    # The wrong reference checkpoint: the reference's logits differ from the policy's at the start.
    base = lightning_toy_policy() if package == "lightning" else ToyPolicy

    class WrongReference(base):  # type: ignore[misc, valid-type]
        def on_fit_start(self) -> None:
            g = torch.Generator().manual_seed(7)
            self.ref_logits.add_(0.2 * torch.randn(self.ref_logits.shape, generator=g))

    mon = _monitor_cls(package)(log_every_n_steps=5)
    make_trainer(tmp_path / "wrong", 10, callbacks=[mon], package=package, accumulate_grad_batches=2).fit(
        WrongReference(lr=0.5)
    )
    fired = [a for a in mon.alert_history if a.rule == "initial_kl"]
    assert len(fired) == 1 and fired[0].step == 4, mon.alert_history
    assert "differ by more than float rounding" in fired[0].message
