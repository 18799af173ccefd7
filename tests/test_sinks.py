"""Sinks: what each kind of target receives, read back from the trackers' own files."""

from __future__ import annotations

import csv
import itertools
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tb_files import events, texts
from torch.utils.tensorboard import SummaryWriter

from klmonitor import Monitor
from klmonitor.alerts import Alert, KLBudgetRule, parse_alert_text
from klmonitor.sinks import (
    CallableSink,
    LoggerSink,
    TensorBoardSink,
    WandbSink,
    as_sink,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
README = Path(__file__).resolve().parents[1] / "README.md"


def _feed(mon: Monitor, steps: int, seed: int = 0, shift: float = 0.3, extras: bool = False) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    results = []
    for step in range(1, steps + 1):
        logp = -torch.rand(4, 16, generator=g) * 4
        ref = logp + shift * torch.randn(4, 16, generator=g)
        more: dict[str, Any] = {}
        if extras:
            more["rollout_logprobs"] = logp + 0.05 * torch.randn(4, 16, generator=g)
            more["token_ids"] = torch.randint(0, 50, (4, 16), generator=g)
            more["behaviour_logprobs"] = logp - 0.02 * torch.rand(4, 16, generator=g)
        mon.update(logp, ref, torch.rand(4, 16, generator=g) < 0.9, **more)
        res = mon.step(step)
        if res is not None:
            results.append(res)
    mon.close()
    return results


def test_summary_writer_gets_scalars_bands_layout_histogram_and_alert_text(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    mon = Monitor(log_every_n_steps=2, sinks=writer, max_kl=1e-6)
    results = _feed(mon, 4)
    writer.close()
    acc = events(tmp_path)
    k3 = {e.step: e.value for e in acc.Scalars("kl/k3/mean")}
    assert k3 == pytest.approx({r.step: r.metrics["kl/k3/mean"] for r in results}, rel=1e-6)
    upper = {e.step: e.value for e in acc.Scalars("kl/band/k3_upper")}
    k3_0 = results[0].summary.k3
    assert upper[2] == pytest.approx(k3_0.mean + 2 * k3_0.stderr, rel=1e-6)  # ± 2 standard errors
    assert acc.Tags()["histograms"] == ["kl/log_ratio"]
    assert acc.PluginTagToContent("custom_scalars")
    parsed = [parse_alert_text(t) for t in texts(acc, "kl/alerts")]
    assert [(p[0], p[2]) for p in parsed if p] == [(a.rule, a.step) for a in mon.alert_history]


def test_wandb_run_offline_gets_scalars_against_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="klmonitor-test", dir=str(tmp_path))
    try:
        mon = Monitor(log_every_n_steps=2, sinks=run, max_kl=1e-6)
        assert isinstance(mon.sinks[0], WandbSink)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = _feed(mon, 4)
        assert not [w for w in caught if "klmonitor" in str(w.message)], [str(w.message) for w in caught]
        assert run.summary["kl/k3/mean"] == pytest.approx(results[-1].metrics["kl/k3/mean"])
        assert run.summary["trainer/global_step"] == 4
    finally:
        run.finish()
    assert list(tmp_path.rglob("run-*.wandb")), "no offline run file"


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning", "lightning.fabric"])
def test_csv_logger_of_each_package(tmp_path: Path, package: str) -> None:
    loggers = __import__(f"{package}.loggers", fromlist=["CSVLogger"])
    logger = loggers.CSVLogger(str(tmp_path), name="csv")
    mon = Monitor(log_every_n_steps=3, sinks=[logger])
    assert isinstance(mon.sinks[0], LoggerSink) and mon.sinks[0].kind == "logger"
    results = _feed(mon, 6)
    logger.save()
    rows = list(csv.DictReader(open(next(Path(tmp_path).rglob("metrics.csv")))))
    got = {int(r["step"]): float(r["kl/k3/mean"]) for r in rows if r.get("kl/k3/mean")}
    assert got == pytest.approx({r.step: r.metrics["kl/k3/mean"] for r in results}, rel=1e-6)


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning", "lightning.fabric"])
def test_tensorboard_logger_of_each_package_is_recognised(tmp_path: Path, package: str) -> None:
    loggers = __import__(f"{package}.loggers", fromlist=["TensorBoardLogger"])
    logger = loggers.TensorBoardLogger(str(tmp_path), name="tb")
    mon = Monitor(log_every_n_steps=2, sinks=[logger])
    assert isinstance(mon.sinks[0], TensorBoardSink)
    _feed(mon, 2)
    logger.finalize("success")
    acc = events(tmp_path)
    assert "kl/k3/mean" in acc.Tags()["scalars"] and acc.Tags()["histograms"] == ["kl/log_ratio"]
    assert acc.PluginTagToContent("custom_scalars")


def test_callable_and_failing_sinks(tmp_path: Path) -> None:
    got: list[tuple[int, dict[str, float]]] = []

    def broken(metrics: dict[str, float], step: int) -> None:
        raise OSError("disk full")

    mon = Monitor(log_every_n_steps=1, sinks=[broken, lambda m, s: got.append((s, m))])
    assert [type(s) for s in mon.sinks] == [CallableSink, CallableSink]
    with pytest.warns(UserWarning, match="disk full") as caught:
        _feed(mon, 3)
    assert len([w for w in caught if "disk full" in str(w.message)]) == 1
    assert [s for s, _ in got] == [1, 2, 3]


def test_unknown_target_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="SummaryWriters, W&B runs"):
        as_sink(object())


def _readme_metric_patterns() -> set[str]:
    """The README table's names as regular expressions (``<est>``, ``<bucket>``, ``{a,b}`` expanded)."""
    text = README.read_text()
    table = text.split("### What is logged", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    patterns: set[str] = set()
    for line in table.splitlines()[2:]:
        cell = line.split("|")[1]
        base = ""
        for item in re.findall(r"`([^`]+)`", cell):
            name = base.rsplit("/", 1)[0] + item if item.startswith("/") else item
            base = name
            parts = re.split(r"(\{[^}]*\}|<est>|<bucket>)", name)
            options = [
                [re.escape(o) for o in p[1:-1].split(",")]
                if p.startswith("{")
                else ["(k1|k2|k3|kl_pq)"]
                if p == "<est>"
                else [r"[0-9]+(-[0-9]+|\+)"]
                if p == "<bucket>"
                else [re.escape(p)]
                for p in parts
            ]
            patterns |= {"".join(c) for c in itertools.product(*options)}
    return patterns


def test_readme_table_lists_exactly_what_is_logged(tmp_path: Path) -> None:
    logged: set[str] = set()
    for level in ("token", "sequence"):
        writer = SummaryWriter(str(tmp_path / level))
        mon = Monitor(
            log_every_n_steps=2,
            sinks=writer,
            level=level,
            rules=[KLBudgetRule(1e-6)],
            by_position=True,
            top_sequences=2,
            top_tokens=2,
            vocab_size=50,
            f_divergences=["chi2", "hellinger", "js", "tv"],
        )
        _feed(mon, 2, extras=True)
        writer.close()
        tags = events(tmp_path / level).Tags()
        logged |= set(tags["scalars"]) | set(tags["histograms"])
        logged |= {
            t.removesuffix("/text_summary") for t in tags["tensors"] if t != "custom_scalars__config__"
        }
    patterns = _readme_metric_patterns()
    unlisted = sorted(n for n in logged if not any(re.fullmatch(p, n) for p in patterns))
    never = sorted(p for p in patterns if not any(re.fullmatch(p, n) for n in logged))
    assert unlisted == [] and never == []


def test_sink_alert_text_round_trips() -> None:
    alert = Alert("drift", 12, "warn", 0.3, 0.1, "k2 and k3 disagree: check the learning rate")
    assert parse_alert_text(alert.text()) == ("drift", "warn", 12, alert.message)
    assert np.isfinite(alert.value)
