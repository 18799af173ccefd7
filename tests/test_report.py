"""`klmonitor report`: TensorBoard, CSV and W&B logs in, a PNG dashboard out, one-line errors otherwise."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter
from toy_models import ToyPolicy, make_trainer, window_reference

from klmonitor import KLMonitor
from klmonitor.alerts import Alert
from klmonitor.cli import main
from klmonitor.demo import DemoResult, run_demo
from klmonitor.report import (
    RunData,
    find_runs,
    load_run,
    panels,
    parse_alert,
    parse_wandb_alert,
    position_profile,
    render,
    report,
    select_run,
    unplottable,
    user_metric,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BUCKETS = ("0-1", "2-3", "4-7", "8-15", "16-31")  # "16-31" sorts before "2-3" as text: order by number


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    logdir = tmp_path_factory.mktemp("report_demo")
    return run_demo(logdir=logdir, steps=40, batch_size=32, lr=4e-3, log_every_n_steps=5, progress_bar=False)


class _Recorder(Logger):
    """A Lightning logger that keeps every ``log_metrics`` call: what was logged, exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Any, step: Any = None) -> None:
        self.rows.append((int(step), {k: float(v) for k, v in metrics.items()}))

    def logged(self, tag: str) -> dict[int, float]:
        return {step: m[tag] for step, m in self.rows if tag in m}


@dataclass
class Logged:
    """One real training run logged to TensorBoard, CSV and W&B (offline) at once."""

    root: Path
    dirs: dict[str, Path]
    recorder: _Recorder
    seen: list[dict[str, Any]]
    alerts: list[Alert]
    position: dict[int, dict[str, float]]
    rollout: dict[int, dict[str, float]]


def _position_and_rollout(step: int) -> dict[str, float]:
    """Metrics under the names the position profile and the rollout mismatch are logged with."""
    out = {f"kl/by_position/{b}/k3": 0.01 * (i + 1) * step for i, b in enumerate(BUCKETS)}
    out["kl/rollout/k3/mean"] = 1e-3 * step
    out["kl/rollout/k3/stderr"] = 1e-4 * step
    out["kl/rollout/ratio/mean"] = 1.0 + 1e-3 * step
    out["kl/rollout/ratio/min"] = 1.0 / (1.0 + 0.1 * step)
    out["kl/rollout/ratio/max"] = 1.0 + 0.1 * step
    return out


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    root = tmp_path_factory.mktemp("three_loggers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(root))
        model = ToyPolicy(lr=2.0, pull=3.0)
        # The KL budget fires: alerts to read back. The position profile is planted below
        # instead (sparse: every other window), so the monitor's own is off.
        mon = KLMonitor(log_every_n_steps=5, max_kl=1e-3, by_position=False)
        tb = TensorBoardLogger(str(root), name="tb")
        csv_logger = CSVLogger(str(root), name="csv")
        wb = WandbLogger(offline=True, save_dir=str(root), project="klmonitor-test")
        recorder = _Recorder()
        loggers = [tb, csv_logger, wb, recorder]
        try:
            make_trainer(root, 20, loggers=loggers, callbacks=[mon]).fit(model)
            # The position profile and the rollout mismatch, logged through the same real
            # loggers (sparse: only every other window) under the names the monitor uses.
            extra = {step: _position_and_rollout(step) for step in (5, 15)}
            for step, metrics in extra.items():
                for lg in loggers:
                    lg.log_metrics(metrics, step=step)
            for lg in loggers:
                lg.save()
            wb_dir = Path(wb.experiment.dir).parent
        finally:
            wandb.finish()
        yield Logged(
            root,
            {"tensorboard": Path(tb.log_dir), "csv": Path(csv_logger.log_dir), "wandb": wb_dir},
            recorder,
            model.seen,
            list(mon.alert_history),
            {s: {k: v for k, v in m.items() if "by_position" in k} for s, m in extra.items()},
            {s: {k: v for k, v in m.items() if "rollout" in k} for s, m in extra.items()},
        )


def _check_png(path: Path, min_panels: int = 2) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1540  # 14 inches at 110 dpi: the panels and their legend column
    assert 300 * min_panels < height < 4000, height  # about 3 inches (330 px) a panel
    assert len(data) > 20_000 * min_panels / 2  # lines and heat maps, not an empty canvas
    return width, height


def test_report_of_a_demo_run(demo_run: DemoResult, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(demo_run.logdir)]) == 0
    out = demo_run.logdir / "klmonitor_report.png"
    assert capsys.readouterr().out.strip().splitlines() == [
        f"wrote {out}",
        "note: drawn beside the KL: reward (auto-detected: its name has 'reward'; --metric NAME picks another)",
    ]
    _check_png(out, min_panels=4)


def test_load_run_reads_scalars_alerts_and_histograms(demo_run: DemoResult) -> None:
    data = load_run(demo_run.run_dir)
    assert data.format == "tensorboard" and data.alerts_recorded
    steps, k3 = data.scalars["kl/k3/mean"]
    assert steps.tolist() == [4, 9, 14, 19, 24, 29, 34, 39]  # Lightning's grid
    assert demo_run.summary is not None and k3[-1] == pytest.approx(demo_run.summary.k3.mean, rel=1e-6)
    assert [(a.rule, a.step, a.level) for a in data.alerts] == [
        (a.rule, a.step, a.level.value) for a in demo_run.alerts
    ]
    assert data.alerts[0].text == demo_run.alerts[0].message
    assert len(data.histograms) == 8
    h = data.histograms[-1]
    assert h.edges.size == h.counts.size + 1 and h.counts.sum() > 0
    assert panels(data) == [
        "estimators",
        "metric",
        "drift",
        "log_ratio",
        "by_position",
    ]  # the demo logs its reward and turns by_position on
    assert user_metric(data) == "reward" and "reward" in data.others and "reward" not in data.scalars


@pytest.mark.parametrize("fmt", ["tensorboard", "csv", "wandb"])
def test_every_format_reads_back_what_was_logged(logged: Logged, fmt: str) -> None:
    data = load_run(logged.dirs[fmt])
    assert data.format == fmt
    for name in ("k1/mean", "k2/mean", "k3/mean", "k1/std", "k3/std", "k3/stderr", "drift_k2_k3", "tokens"):
        want = logged.recorder.logged(f"kl/{name}")
        steps, values = data.scalars[f"kl/{name}"]
        assert steps.tolist() == sorted(want) == [4, 9, 14, 19], name
        got = dict(zip(steps.tolist(), values.tolist(), strict=True))
        if fmt == "tensorboard":  # event files hold float32
            assert got == {s: pytest.approx(v, rel=1e-6, abs=1e-30) for s, v in want.items()}, name
        else:  # CSV text and W&B JSON round-trip a float64 exactly
            assert got == want, name
    # ... and what was logged is the window's statistics, recomputed in float64 from the tokens.
    k3 = dict(zip(*[a.tolist() for a in data.scalars["kl/k3/mean"]], strict=True))
    tokens = dict(zip(*[a.tolist() for a in data.scalars["kl/tokens"]], strict=True))
    for hi in (5, 10, 15, 20):  # the window (hi - 5, hi] is logged at hi - 1
        ref = window_reference(logged.seen, hi - 5, hi)
        assert k3[hi - 1] == pytest.approx(ref["k3/mean"], rel=2e-4) and tokens[hi - 1] == ref["tokens"]
    profile = position_profile(data)
    assert profile is not None
    steps, buckets, grid = profile
    assert steps.tolist() == [5, 15] and buckets == list(BUCKETS)
    want_grid = [[logged.position[s][f"kl/by_position/{b}/k3"] for s in (5, 15)] for b in BUCKETS]
    np.testing.assert_allclose(grid, want_grid, rtol=1e-6 if fmt == "tensorboard" else 0)
    for tag in logged.rollout[5]:
        np.testing.assert_allclose(
            data.scalars[tag][1],
            [logged.rollout[s][tag] for s in (5, 15)],
            rtol=1e-6 if fmt == "tensorboard" else 0,
        )


@pytest.mark.parametrize("fmt", ["tensorboard", "wandb"])
def test_alerts_and_histograms_read_back(logged: Logged, fmt: str) -> None:
    data = load_run(logged.dirs[fmt])
    assert logged.alerts and data.alerts_recorded
    assert [(a.step, a.rule, a.level, a.text) for a in data.alerts] == [
        (a.step, a.rule, a.level.value, a.message) for a in logged.alerts
    ]
    # One histogram per window, of every token of it (fewer than histogram_samples here).
    tokens = logged.recorder.logged("kl/tokens")
    assert [h.step for h in data.histograms] == sorted(tokens)
    for h in data.histograms:
        assert h.counts.sum() == tokens[h.step]
        assert h.edges.size == h.counts.size + 1 and h.lo <= h.hi


def test_csv_holds_no_alerts_or_histograms_and_the_figure_says_so(logged: Logged) -> None:
    data = load_run(logged.dirs["csv"])
    assert not data.alerts and not data.histograms and not data.alerts_recorded
    assert panels(data) == ["estimators", "drift", "by_position", "rollout_kl", "rollout_ratio"]


@pytest.mark.parametrize("fmt", ["tensorboard", "csv", "wandb"])
def test_report_of_each_format_renders_every_panel(logged: Logged, fmt: str, tmp_path: Path) -> None:
    out = tmp_path / f"{fmt}.png"
    assert main(["report", str(logged.root), "--format", fmt, "-o", str(out)]) == 0
    data = load_run(logged.dirs[fmt])
    want = ["estimators", "drift"] + (["log_ratio"] if fmt != "csv" else [])
    assert panels(data) == [*want, "by_position", "rollout_kl", "rollout_ratio"]
    _check_png(out, min_panels=len(panels(data)))


def test_format_is_detected_and_the_newest_run_wins(logged: Logged, tmp_path: Path) -> None:
    runs = find_runs(logged.root)
    assert {r.format for r in runs} == {"tensorboard", "csv", "wandb"}
    assert [r.mtime for r in runs] == sorted((r.mtime for r in runs), reverse=True)
    assert select_run(logged.root).format == runs[0].format
    for fmt, where in logged.dirs.items():
        assert select_run(logged.root, run=where).format == fmt  # a run directory: its own format
        assert select_run(where).format == fmt
    wandb_file = next(logged.dirs["wandb"].glob("run-*.wandb"))
    assert select_run(logged.root, run=wandb_file).format == "wandb"  # or the run file itself
    assert select_run(logged.root, run=logged.dirs["csv"] / "metrics.csv").format == "csv"


def test_render_without_optional_panels_and_scales(tmp_path: Path) -> None:
    _write_run(tmp_path / "run")
    for scale in ("linear", "log"):
        _check_png(report(tmp_path, out=tmp_path / "out" / f"{scale}.png", scale=scale), min_panels=3)
    with pytest.raises(ValueError, match="scale"):
        report(tmp_path, out=tmp_path / "x.png", scale="cubic")  # type: ignore[arg-type]


def _write_run(run_dir: Path, steps: int = 5, prefix: str = "kl/", alerts: bool = True) -> None:
    """A synthetic run, as KLMonitor's TensorBoard sink writes it."""
    w = SummaryWriter(str(run_dir))
    for i in range(1, steps + 1):
        step, kl = 10 * i, 0.01 * 2**i
        for name, mean in (("k1", kl), ("k2", kl * (1 + kl)), ("k3", kl)):
            w.add_scalar(f"{prefix}{name}/mean", mean, step)
            w.add_scalar(f"{prefix}{name}/std", 3 * kl, step)
        w.add_scalar(f"{prefix}tokens", 1000, step)
        w.add_scalar(f"{prefix}drift_k2_k3", kl, step)
        w.add_histogram(f"{prefix}log_ratio", np.random.default_rng(i).normal(-kl, kl, 500), step)
    if alerts:
        w.add_text(f"{prefix}alerts", "**drift** (warn) at step 40: k2 and k3 disagree", 40)
        w.add_text(f"{prefix}alerts", "**kl_budget** (error) at step 50: over budget", 50)
    w.close()


def test_bands_are_standard_errors_not_std(tmp_path: Path) -> None:
    """mean ± 2 std of k3 would reach below 0 (the floor of a log axis); mean ± 2 stderr does not."""
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    from klmonitor.report import _plot_estimators

    _write_run(tmp_path)
    data = load_run(tmp_path)
    fig = Figure()
    ax = fig.add_subplot()
    _plot_estimators(ax, data, "log", "per token")
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 3
    steps, k3 = data.scalars["kl/k3/mean"]
    for band in bands:
        ys = np.asarray(band.get_paths()[0].vertices)[:, 1]
        assert ys.min() > 0.9 * k3.min() * (1 - 2 * 3 / math.sqrt(1000))  # never down to the floor
    assert ax.get_ylim()[0] == pytest.approx(k3.min() / 3)


def test_log_ratio_panel_has_no_stripes(tmp_path: Path) -> None:
    """A sparse tail leaves empty bins between occupied ones: none may show as a blank row."""
    from matplotlib.figure import Figure

    from klmonitor.report import _plot_histograms

    w = SummaryWriter(str(tmp_path))
    rng = np.random.default_rng(0)
    for step in (10, 20, 30):
        core = rng.normal(0.0, 0.1, 3000)
        tail = np.linspace(-1.5, -0.35, 12)  # a token every ~2 bins: empty bins between them
        far = rng.normal(3.0, 0.05, 300)  # a separate mode: the gap to it is real
        w.add_histogram("kl/log_ratio", np.concatenate([core, tail, far]), step)
    w.close()
    data = load_run(tmp_path)
    fig = Figure()
    ax, cax = fig.subplots(1, 2)
    _plot_histograms(fig, ax, cax, data)
    mesh = ax.collections[0]
    cells = np.ma.getmaskarray(mesh.get_array()).reshape(-1, 3)
    edges = np.unique(mesh.get_coordinates()[:, 0, 1])
    centers = (edges[1:] + edges[:-1]) / 2
    tail_rows = (centers > -1.45) & (centers < 0.0)
    assert not cells[tail_rows].any()  # every bin from the tail to the core is coloured
    gap_rows = (centers > 0.6) & (centers < 2.4)
    assert gap_rows.any() and cells[gap_rows].all()  # the real gap to the far mode stays blank


def test_position_profile_and_rollout_panels_from_synthetic_logs(tmp_path: Path) -> None:
    w = SummaryWriter(str(tmp_path / "tb"))
    for step in (10, 20, 30):
        for name, value in _position_and_rollout(step).items():
            w.add_scalar(name, value, step)
        w.add_scalar("kl/k3/mean", 0.01 * step, step)
    w.add_scalar("kl/by_position/32+/k3", 9.0, 30)  # one bucket logged at one step only
    w.add_text("kl/alerts", "**rollout_mismatch** (error) at step 20: the engines disagree", 20)
    w.close()
    data = load_run(tmp_path / "tb")
    assert panels(data) == ["estimators", "drift", "by_position", "rollout_kl", "rollout_ratio"]
    profile = position_profile(data)
    assert profile is not None
    steps, buckets, grid = profile
    assert steps.tolist() == [10, 20, 30] and buckets == [*BUCKETS, "32+"]
    want = [[_position_and_rollout(s)[f"kl/by_position/{b}/k3"] for s in (10, 20, 30)] for b in BUCKETS]
    np.testing.assert_allclose(grid[:-1], want, rtol=1e-6)
    assert np.isnan(grid[-1, :2]).all() and grid[-1, 2] == 9.0
    assert [(a.rule, a.step, a.level) for a in data.alerts] == [("rollout_mismatch", 20, "error")]
    out = render(data, tmp_path / "r.png")
    _check_png(out, min_panels=5)
    # Without them, the figure has only the panels that were logged (and is shorter).
    bare = RunData(data.run_dir, "kl/", scalars={"kl/k3/mean": data.scalars["kl/k3/mean"]})
    assert panels(bare) == ["estimators", "drift"]
    _, short = _check_png(render(bare, tmp_path / "bare.png"))
    assert short < _check_png(out)[1]


def test_csv_sparse_rows_and_repeated_steps(tmp_path: Path) -> None:
    lg = CSVLogger(str(tmp_path), name="csv")
    lg.log_metrics({"kl/k3/mean": 0.5, "kl/tokens": 10.0}, step=5)
    lg.log_metrics({"reward": 1.0}, step=6)  # a row with none of the monitor's columns
    lg.log_metrics({"kl/k3/mean": 0.25}, step=10)  # a sparse row: no tokens
    lg.log_metrics({"kl/k3/mean": 0.125, "kl/k3/std": 2.0}, step=10)  # logged again (a resume): last wins
    lg.save()
    data = load_run(Path(lg.log_dir))
    assert sorted(data.scalars) == ["kl/k3/mean", "kl/k3/std", "kl/tokens"]
    assert [a.tolist() for a in data.scalars["kl/k3/mean"]] == [[5, 10], [0.5, 0.125]]
    assert [a.tolist() for a in data.scalars["kl/tokens"]] == [[5], [10.0]]
    assert [a.tolist() for a in data.scalars["kl/k3/std"]] == [[10], [2.0]]
    bad = tmp_path / "other" / "metrics.csv"
    bad.parent.mkdir()
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no 'step' column"):
        load_run(bad.parent)


def test_newest_run_by_default_and_run_option(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", steps=3)
    _write_run(tmp_path / "b", steps=6)
    for f in (tmp_path / "a").iterdir():
        os.utime(f, (1.5e9, 1.5e9))  # "a" is newer than "b"
    for f in (tmp_path / "b").iterdir():
        os.utime(f, (1.4e9, 1.4e9))
    assert [(r.path, r.format) for r in find_runs(tmp_path)] == [
        (tmp_path / "a", "tensorboard"),
        (tmp_path / "b", "tensorboard"),
    ]
    assert select_run(tmp_path).run_dir == tmp_path / "a"
    assert select_run(tmp_path, run="b").run_dir == tmp_path / "b"
    assert select_run(tmp_path, run=tmp_path / "b").run_dir == tmp_path / "b"
    with pytest.raises(FileNotFoundError):
        select_run(tmp_path, run="zzz")
    # a newer run without kl/ scalars is skipped in favour of an older one with them
    w = SummaryWriter(str(tmp_path / "c"))
    w.add_scalar("loss", 1.0, 1)
    w.close()
    assert find_runs(tmp_path)[0].path == tmp_path / "c"
    assert select_run(tmp_path).run_dir == tmp_path / "a"
    assert main(["report", str(tmp_path), "--run", "b", "-o", str(tmp_path / "b.png")]) == 0
    _check_png(tmp_path / "b.png", min_panels=3)
    # a newer CSV log next to them wins under "auto", not under --format tensorboard
    lg = CSVLogger(str(tmp_path), name="csv")
    lg.log_metrics({"kl/k3/mean": 0.5}, step=5)
    lg.save()
    assert select_run(tmp_path).format == "csv"
    assert select_run(tmp_path, format="tensorboard").run_dir == tmp_path / "a"
    # one directory with two formats (TensorBoardLogger and CSVLogger share lightning_logs/version_N
    # by default): listed once per format, and the richer one is read
    lg2 = CSVLogger(str(tmp_path), name="both", version="")
    lg2.log_metrics({"kl/k3/mean": 0.5}, step=5)
    lg2.save()
    _write_run(tmp_path / "both")
    assert {r.format for r in find_runs(tmp_path / "both")} == {"tensorboard", "csv"}
    assert load_run(tmp_path / "both").format == "tensorboard"
    assert load_run(tmp_path / "both", format="csv").format == "csv"


def test_custom_prefix(tmp_path: Path) -> None:
    _write_run(tmp_path, prefix="policy_kl/")
    data = load_run(tmp_path, prefix="policy_kl/")
    assert [a.rule for a in data.alerts] == ["drift", "kl_budget"]
    assert main(["report", str(tmp_path), "--prefix", "policy_kl/"]) == 0
    _check_png(tmp_path / "klmonitor_report.png", min_panels=3)


def test_parse_alert() -> None:
    a = parse_alert("**sampling_mismatch** (error) at step 7: r - 1 is off", step=9)
    assert (a.rule, a.level, a.step, a.text) == ("sampling_mismatch", "error", 7, "r - 1 is off")
    b = parse_alert("something else happened", step=9)
    assert (b.rule, b.step, b.text) == ("alert", 9, "something else happened")


def test_parse_wandb_alert() -> None:
    a = parse_wandb_alert("klmonitor: kl_budget", "Step 12: over budget", "ERROR", step=10)
    assert (a.rule, a.level, a.step, a.text) == ("kl_budget", "error", 12, "over budget")
    b = parse_wandb_alert("loss exploded", "the loss is NaN", "WARN", step=10)
    assert (b.rule, b.level, b.step, b.text) == ("loss exploded", "warn", 10, "the loss is NaN")


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("missing", [], "does not exist"),
        ("empty", [], "no TensorBoard event files (events.out.tfevents.*) or CSV logs"),
        ("no_kl", [], "no kl/ scalars in the 1 run(s)"),
        ("no_kl", ["--format", "wandb"], "no W&B run files (wandb/*run-*/run-*.wandb) under"),
        ("bad_wandb", [], "could not read the W&B run file"),
        ("bad_csv", [], "no 'step' column"),
    ],
)
def test_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, args: list[str], message: str
) -> None:
    logdir = tmp_path / "logs"
    if setup != "missing":
        logdir.mkdir()
    if setup == "no_kl":
        w = SummaryWriter(str(logdir))
        w.add_scalar("train/loss", 1.0, 1)
        w.close()
    if setup == "bad_wandb":
        (logdir / "wandb" / "offline-run-x").mkdir(parents=True)
        (logdir / "wandb" / "offline-run-x" / "run-x.wandb").write_bytes(b"not a transaction log")
    if setup == "bad_csv":
        (logdir / "metrics.csv").write_text("loss\n1.0\n")
    assert main(["report", str(logdir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("klmonitor report: error: ") and message in err[0], err
    assert not (logdir / "klmonitor_report.png").exists()


# --------------------------------------------------------------------------------------------
# Unreadable, garbled and extreme inputs (issue 20): one line naming the file, exit 2, never a
# traceback; extreme but valid values are drawn where finite, and the report says what it left out.
# --------------------------------------------------------------------------------------------
def _csv_run(logdir: Path, rows: list[str]) -> Path:
    logdir.mkdir(parents=True, exist_ok=True)
    f = logdir / "metrics.csv"
    f.write_text("step,kl/k3/mean,kl/k3/std,kl/tokens\n" + "".join(r + "\n" for r in rows))
    return f


def _tb_run(logdir: Path) -> Path:
    w = SummaryWriter(str(logdir))
    for i in range(1, 6):
        w.add_scalar("kl/k3/mean", 0.1 * i, 10 * i)
        w.add_scalar("kl/k2/mean", 0.1 * i, 10 * i)
    w.close()
    (f,) = logdir.glob("events.out.tfevents.*")
    return f


def _corrupt_tb(logdir: Path, how: str) -> Path:
    f = _tb_run(logdir)
    data = bytearray(f.read_bytes())
    if how == "flipped":
        data[len(data) // 2] ^= 0xFF  # inside a record: its checksum no longer matches
    elif how == "garbage":
        data = bytearray(b"\x13\x37" * 300)
    f.write_bytes(bytes(data))
    return f


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("csv_step_inf", "line 3: step 'inf' is not a whole number"),
        ("csv_step_1e20", "line 2: step '1e20' is not a whole number"),
        ("csv_step_nan", "line 2: step 'nan' is not a whole number"),
        ("csv_invalid_bytes", "is not UTF-8 text"),
        ("csv_nul_bytes", "line 2: kl/k3/mean is '0\\x00.5', not a number"),
        ("csv_text_value", "line 3: kl/k3/mean is 'abc', not a number"),
        ("csv_unreadable", "cannot read"),
        ("csv_is_directory", "no TensorBoard event files"),
        ("csv_is_fifo", "no CSV logs"),
        ("tb_flipped", "is corrupt"),
        ("tb_garbage", "is corrupt"),
        ("out_is_directory", "cannot write the report to"),
        ("out_under_a_file", "cannot write the report to"),
        ("out_bad_extension", "cannot write the report to"),
    ],
)
def test_garbled_and_unreadable_inputs_are_one_line_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    message: str,
) -> None:
    logdir = tmp_path / "logs"
    args: list[str] = []
    named: Path = logdir / "metrics.csv"
    if setup == "csv_step_inf":
        _csv_run(logdir, ["10,0.5,1.0,100", "inf,0.25,1.0,100"])
    elif setup == "csv_step_1e20":
        _csv_run(logdir, ["1e20,0.5,1.0,100"])
    elif setup == "csv_step_nan":
        _csv_run(logdir, ["nan,0.5,1.0,100"])
    elif setup == "csv_invalid_bytes":
        _csv_run(logdir, ["10,0.5,1.0,100"]).write_bytes(b"step,kl/k3/mean\n10,\xff\xfe0.5\n")
    elif setup == "csv_nul_bytes":
        _csv_run(logdir, ["10,0.5,1.0,100"]).write_bytes(b"step,kl/k3/mean\n10,0\x00.5\n")
    elif setup == "csv_text_value":
        _csv_run(logdir, ["10,0.5,1.0,100", "20,abc,1.0,100"])
    elif setup == "csv_unreadable":
        _csv_run(logdir, ["10,0.5,1.0,100"])
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # chmod 000 does not stop root
            real_open = open

            def denied(file: Any, *a: Any, **kw: Any) -> Any:
                if Path(str(file)) == named:
                    raise PermissionError(13, "Permission denied", str(file))
                return real_open(file, *a, **kw)

            monkeypatch.setattr("builtins.open", denied)
        else:
            os.chmod(named, 0)
    elif setup == "csv_is_directory":
        (logdir / "metrics.csv").mkdir(parents=True)
        args = ["--run", "metrics.csv"]
    elif setup == "csv_is_fifo":
        logdir.mkdir()
        os.mkfifo(named)  # opening it would wait for a writer forever
        args = ["--run", "metrics.csv", "--format", "csv"]
    elif setup.startswith("tb_"):
        named = _corrupt_tb(logdir, setup[3:])
    else:
        _tb_run(logdir)
        named = tmp_path / "out.png"
        if setup == "out_is_directory":
            named.mkdir()
        elif setup == "out_under_a_file":
            named.write_text("a file")
            named = named / "report.png"
        else:
            named = tmp_path / "report.xyz"
        args = ["-o", str(named)]
    code = main(["report", str(logdir), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("klmonitor report: error: "), err
    assert message in err[0] and str(named) in err[0], err[0]
    assert "Traceback" not in err[0]


def test_a_cut_short_event_file_is_read_up_to_its_last_whole_record(tmp_path: Path) -> None:
    # A run still being written (or killed mid-write) ends in a partial record: not corrupt.
    f = _tb_run(tmp_path / "run")
    f.write_bytes(f.read_bytes()[:-7])
    data = load_run(tmp_path / "run")
    k3, k2 = data.series("k3/mean"), data.series("k2/mean")
    assert k3 is not None and k2 is not None
    assert k3[0].tolist() == [10, 20, 30, 40, 50] and k2[0].tolist() == [10, 20, 30, 40]  # k2 at 50: cut


def test_extreme_values_are_drawn_where_finite_and_the_rest_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logdir = tmp_path / "logs"
    _csv_run(
        logdir,
        [
            "10,0.5,1.0,100",
            "20,1e308,1e308,100",
            "30,inf,1.0,100",
            "40,nan,-inf,100",
            "50,0.25,1e300,100",
            "60,0.125,1.0,100",
        ],
    )
    assert main(["report", str(logdir)]) == 0
    out = capsys.readouterr()
    png = logdir / "klmonitor_report.png"
    _check_png(png)
    data = load_run(logdir)
    assert data.scalars["kl/k3/mean"][1][1] == 1e308  # read as logged; only the figure leaves it out
    assert unplottable(data) == {"kl/k3/mean": 3, "kl/k3/std": 3}
    assert "not drawn" in out.out and "kl/k3/mean (3)" in out.out
    assert "Traceback" not in out.err
    # Through TensorBoard as well: float32 scalars of inf and 3e38.
    w = SummaryWriter(str(tmp_path / "tb"))
    for step, value in ((1, 0.5), (2, float("inf")), (3, 3e38), (4, float("nan")), (5, 0.25)):
        w.add_scalar("kl/k3/mean", value, step)
        w.add_scalar("kl/drift_k2_k3", value, step)
    w.close()
    assert main(["report", str(tmp_path / "tb")]) == 0
    assert "not drawn" in capsys.readouterr().out
