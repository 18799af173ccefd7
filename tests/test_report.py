"""`klmonitor report`: event files in, a PNG dashboard out, one-line errors otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from klmonitor.cli import main
from klmonitor.demo import DemoResult, run_demo
from klmonitor.report import find_runs, load_run, parse_alert, report, select_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    logdir = tmp_path_factory.mktemp("report_demo")
    return run_demo(logdir=logdir, steps=40, batch_size=32, lr=4e-3, log_every_n_steps=5, progress_bar=False)


def _write_run(run_dir: Path, steps: int = 5, prefix: str = "kl/", alerts: bool = True) -> None:
    """A synthetic run, as KLMonitor's TensorBoard sink writes it."""
    w = SummaryWriter(str(run_dir))
    for i in range(1, steps + 1):
        step, kl = 10 * i, 0.01 * 2**i
        for name, mean in (("k1", kl), ("k2", kl * (1 + kl)), ("k3", kl)):
            w.add_scalar(f"{prefix}{name}/mean", mean, step)
            w.add_scalar(f"{prefix}{name}/std", 3 * kl, step)
        w.add_scalar(f"{prefix}drift_k2_k3", kl, step)
        w.add_histogram(f"{prefix}log_ratio", np.random.default_rng(i).normal(-kl, kl, 500), step)
    if alerts:
        w.add_text(f"{prefix}alerts", "**drift** (warn) at step 40: k2 and k3 disagree", 40)
        w.add_text(f"{prefix}alerts", "**kl_budget** (error) at step 50: over budget", 50)
    w.close()


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000  # three panels of lines and a heat map, not an empty canvas


def test_report_of_a_demo_run(demo_run: DemoResult, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(demo_run.logdir)]) == 0
    out = demo_run.logdir / "klmonitor_report.png"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    _check_png(out)


def test_load_run_reads_scalars_alerts_and_histograms(demo_run: DemoResult) -> None:
    data = load_run(demo_run.run_dir)
    steps, k3 = data.scalars["kl/k3/mean"]
    assert steps.tolist() == [5, 10, 15, 20, 25, 30, 35, 40]
    assert demo_run.summary is not None and k3[-1] == pytest.approx(demo_run.summary.kl, rel=1e-6)
    assert [(a.rule, a.step, a.level) for a in data.alerts] == [
        (a.rule, a.step, a.level.value) for a in demo_run.alerts
    ]
    assert data.alerts[0].text == demo_run.alerts[0].message
    assert len(data.histograms) == 8
    h = data.histograms[-1]
    assert h.edges.size == h.counts.size + 1 and h.counts.sum() > 0


def test_output_option_and_scales(tmp_path: Path) -> None:
    _write_run(tmp_path / "run")
    for scale in ("linear", "log"):
        _check_png(report(tmp_path, out=tmp_path / "out" / f"{scale}.png", scale=scale))
    with pytest.raises(ValueError, match="scale"):
        report(tmp_path, out=tmp_path / "x.png", scale="cubic")  # type: ignore[arg-type]


def test_newest_run_by_default_and_run_option(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", steps=3)
    _write_run(tmp_path / "b", steps=6)
    for f in (tmp_path / "a").iterdir():
        os.utime(f, (1.5e9, 1.5e9))  # "a" is newer than "b"
    for f in (tmp_path / "b").iterdir():
        os.utime(f, (1.4e9, 1.4e9))
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    assert select_run(tmp_path).run_dir == tmp_path / "a"
    assert select_run(tmp_path, run="b").run_dir == tmp_path / "b"
    assert select_run(tmp_path, run=tmp_path / "b").run_dir == tmp_path / "b"
    with pytest.raises(FileNotFoundError):
        select_run(tmp_path, run="zzz")
    # a newer run without kl/ scalars is skipped in favour of an older one with them
    w = SummaryWriter(str(tmp_path / "c"))
    w.add_scalar("loss", 1.0, 1)
    w.close()
    assert find_runs(tmp_path)[0] == tmp_path / "c"
    assert select_run(tmp_path).run_dir == tmp_path / "a"
    assert main(["report", str(tmp_path), "--run", "b", "-o", str(tmp_path / "b.png")]) == 0
    _check_png(tmp_path / "b.png")


def test_custom_prefix(tmp_path: Path) -> None:
    _write_run(tmp_path, prefix="policy_kl/")
    data = load_run(tmp_path, prefix="policy_kl/")
    assert [a.rule for a in data.alerts] == ["drift", "kl_budget"]
    assert main(["report", str(tmp_path), "--prefix", "policy_kl/"]) == 0
    _check_png(tmp_path / "klmonitor_report.png")


def test_parse_alert() -> None:
    a = parse_alert("**sampling_mismatch** (error) at step 7: r - 1 is off", step=9)
    assert (a.rule, a.level, a.step, a.text) == ("sampling_mismatch", "error", 7, "r - 1 is off")
    b = parse_alert("something else happened", step=9)
    assert (b.rule, b.step, b.text) == ("alert", 9, "something else happened")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "no TensorBoard event files under"),
        ("no_kl", "no kl/ scalars in the 1 run(s)"),
    ],
)
def test_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, message: str
) -> None:
    logdir = tmp_path / "logs"
    if setup != "missing":
        logdir.mkdir()
    if setup == "no_kl":
        w = SummaryWriter(str(logdir))
        w.add_scalar("train/loss", 1.0, 1)
        w.close()
    assert main(["report", str(logdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("klmonitor report: error: ") and message in err[0], err
    assert not (logdir / "klmonitor_report.png").exists()
