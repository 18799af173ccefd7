"""`klmonitor demo`: a real (short) run, its TensorBoard files, its summary and its alerts."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from klmonitor.cli import main
from klmonitor.demo import EOS, DemoResult, TinyPolicy, format_result, run_demo

# The demo's ingredients with fewer, bigger steps (about a second of training): the
# policy passes the default KL budget (0.1 nats per token) within 40 steps.
FAST = {"steps": 40, "batch_size": 32, "lr": 4e-3, "log_every_n_steps": 5, "progress_bar": False}


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    return run_demo(logdir=tmp_path_factory.mktemp("demo"), **FAST)


def _events(run_dir: Path) -> EventAccumulator:
    assert list(run_dir.glob("events.out.tfevents.*")), f"no event files in {run_dir}"
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_sampled_sequences_have_real_masks() -> None:
    pol = TinyPolicy()
    tokens, mask = pol.sample(256, max_len=16, generator=torch.Generator().manual_seed(0))
    lengths = mask.sum(1)
    assert lengths.min() >= 1 and lengths.max() == 16 and len(set(lengths.tolist())) > 5
    for row, m in zip(tokens, mask, strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # valid prefix, then padding
        assert (row[: n - 1] != EOS).all()  # no end token before the last valid position
        assert (row[n:] == EOS).all()
    # The log-probs the trainer computes are those the sampler drew from: k3 - k1 = r - 1
    # has mean 0, so a policy compared with itself has KL exactly 0.
    logp = pol.token_logprobs(tokens)
    assert logp.shape == tokens.shape and (logp <= 0).all()


def test_fast_demo_drifts_and_fires_the_kl_budget_alert(fast_run: DemoResult) -> None:
    assert fast_run.steps == 40
    assert "kl_budget" in fast_run.fired
    assert "initial_kl" not in fast_run.fired  # it starts as an exact copy, whatever comes after
    assert "sampling_mismatch" not in fast_run.fired  # the log-probs really are the sampler's
    assert "nonfinite" not in fast_run.fired
    first_step, first = fast_run.history[0]
    assert first_step == 4 and first.kl < 0.01  # starts as a copy of the reference
    # the history's steps are those in TensorBoard (Lightning's grid: 4, 9, ..., 39)
    assert [step for step, _ in fast_run.history] == list(range(4, 40, 5))
    assert fast_run.summary is not None and fast_run.summary.kl > 0.1
    assert fast_run.summary.drift > 0.1  # the gap opens, below the drift rule's threshold
    assert fast_run.rewards[-1] > fast_run.rewards[0]


def test_fast_demo_writes_tensorboard_scalars_text_and_histogram(fast_run: DemoResult) -> None:
    run_dir = fast_run.run_dir
    assert run_dir.is_relative_to(fast_run.logdir) and run_dir.name == "version_0"
    acc = _events(run_dir)
    tags = acc.Tags()
    for name in (
        "kl/k1/mean",
        "kl/k1/std",
        "kl/k2/mean",
        "kl/k3/mean",
        "kl/k3/std",
        "kl/drift_k2_k3",
        "kl/tokens",
    ):
        assert name in tags["scalars"], name
    # at the steps Lightning writes the demo's own self.log("reward") with (its log grid)
    assert [e.step for e in acc.Scalars("kl/k3/mean")] == [4, 9, 14, 19, 24, 29, 34, 39]
    assert [e.step for e in acc.Scalars("reward")] == [4, 9, 14, 19, 24, 29, 34, 39]
    assert "kl/log_ratio" in tags["histograms"]
    alert_tags = [t for t in tags["tensors"] if t.startswith("kl/alerts")]
    assert alert_tags, tags["tensors"]
    assert {e.step for t in alert_tags for e in acc.Tensors(t)} == {a.step for a in fast_run.alerts}


def test_summary_text(fast_run: DemoResult) -> None:
    text = format_result(fast_run)
    assert str(fast_run) == text
    assert "klmonitor demo: 40 steps, kl_coef 0.1, seed 0" in text
    for est in ("k1", "k2", "k3", "cv", "drift"):
        assert f"\n  {est} " in text
    first = next(a for a in fast_run.alerts if a.rule == "kl_budget")
    assert f"step {first.step:>5}  kl_budget" in text
    assert f"tensorboard --logdir {fast_run.logdir}" in text
    assert f"klmonitor report {fast_run.logdir}" in text


def test_same_seed_same_run(fast_run: DemoResult, tmp_path: Path) -> None:
    again = run_demo(logdir=tmp_path, **FAST)
    assert [(a.rule, a.step) for a in again.alerts] == [(a.rule, a.step) for a in fast_run.alerts]
    assert again.summary is not None and fast_run.summary is not None
    assert again.summary.kl == pytest.approx(fast_run.summary.kl, rel=1e-3)


def test_cli_demo_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--steps", "20", "--batch-size", "16", "--log-every-n-steps", "5", "--lr", "4e-3"]
    assert (
        main([*argv, "--logdir", str(tmp_path), "--no-progress-bar", "--kl-coef", "0.2", "--seed", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert "klmonitor demo: 20 steps, kl_coef 0.2, seed 1" in out
    assert "final window" in out and "alerts fired" in out
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_csv_logger(tmp_path: Path) -> None:
    result = run_demo(
        logdir=tmp_path, logger="csv", steps=10, batch_size=8, log_every_n_steps=5, progress_bar=False
    )
    with open(result.run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("kl/k3/mean")]
    assert [int(r["step"]) for r in rows] == [4, 9]
    assert "metrics.csv" in str(result)


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run_demo(steps=0, logdir=tmp_path)
    with pytest.raises(ValueError, match="logger must be one of"):
        run_demo(logger="mlflow", logdir=tmp_path)
    assert main(["demo", "--kl-coef", "-1", "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["klmonitor demo: error: kl_coef must be a finite number >= 0, got -1.0"]


def test_wandb_logger_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run_demo(
        logdir=tmp_path, logger="wandb", steps=10, batch_size=8, log_every_n_steps=5, progress_bar=False
    )
    assert result.run_dir.is_dir() and result.run_dir.name.startswith("offline-run-")
    assert list(result.run_dir.glob("*.wandb"))
    assert "wandb sync" in str(result)
