"""`klmonitor report`'s panels: a user metric beside the KL (--metric), kl_pq, the f-divergences,
the log-ratio crop stated, and alert labels clear of the legends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from klmonitor.cli import main
from klmonitor.report import _figure, load_run, panels, report, user_metric

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
F_NAMES = ("chi2", "hellinger", "js", "tv")


def _write(run_dir: Path, reward: bool = True, f: bool = True) -> None:
    """A run as KLMonitor's TensorBoard sink and a user's self.log write it (outliers in the histograms)."""
    w = SummaryWriter(str(run_dir))
    rng = np.random.default_rng(0)
    for i in range(1, 11):
        step, kl = 10 * i, 0.02 * i
        for name, mean in (("k1", kl), ("k2", 1.2 * kl), ("k3", kl), ("kl_pq", 1.1 * kl), ("cv", kl)):
            w.add_scalar(f"kl/{name}/mean", mean, step)
            w.add_scalar(f"kl/{name}/stderr", 0.1 * kl, step)
        w.add_scalar("kl/tokens", 1000, step)
        w.add_scalar("kl/drift_k2_k3", 0.2, step)
        if f:
            for j, name in enumerate(F_NAMES):
                w.add_scalar(f"kl/f/{name}/mean", kl * 10**j / 100, step)
                w.add_scalar(f"kl/f/{name}/stderr", kl * 10**j / 1000, step)
        if reward:
            w.add_scalar("train/reward", float(i), step)
            w.add_scalar("train/reward_std", 0.5, step)
        w.add_scalar("train/loss", 1.0 / i, step)
        core = rng.normal(-kl, 0.2, 5000)
        w.add_histogram("kl/log_ratio", np.concatenate([core, [8.0, 9.0, -7.0]]), step)
    # Alerts at the very start (under where a legend inside the panel would be) and the end.
    for step, rule in ((10, "drift"), (10, "kl_budget"), (20, "initial_kl"), (100, "spike")):
        w.add_text("kl/alerts", f"**{rule}** (warn) at step {step}: check it", step)
    w.close()


def test_every_panel_is_drawn_and_titled(tmp_path: Path) -> None:
    _write(tmp_path / "run")
    titles: dict[str, str] = {}
    notes: list[str] = []
    out = report(tmp_path, out=tmp_path / "r.png", titles=titles, notes=notes)
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert list(titles) == ["estimators", "metric", "f_divergences", "drift", "log_ratio"]
    assert titles["metric"].startswith("train/reward beside the KL")
    assert "f-divergences" in titles["f_divergences"] and "2 standard errors" in titles["f_divergences"]
    assert notes == [
        "drawn beside the KL: train/reward (auto-detected: its name has 'reward'; --metric NAME picks another)"
    ]


def test_kl_pq_f_divergences_and_the_metric_are_drawn(tmp_path: Path) -> None:
    _write(tmp_path)
    data = load_run(tmp_path)
    assert user_metric(data) == "train/reward"  # not reward_std, not loss
    fig, axes = _figure(data, 2.0, "auto", None, None, None)
    labels = [line.get_label() for line in axes["estimators"].get_lines()]
    assert "kl_pq = KL(ref ‖ policy) mean" in labels
    (pq,) = [ln for ln in axes["estimators"].get_lines() if ln.get_label().startswith("kl_pq")]
    np.testing.assert_allclose(pq.get_ydata(), 1.1 * 0.02 * np.arange(1, 11), rtol=1e-6)
    f_lines = {
        ln.get_label(): ln for ln in axes["f_divergences"].get_lines() if ln.get_label().endswith(" mean")
    }
    assert list(f_lines) == [f"{n} mean" for n in F_NAMES]
    assert axes["f_divergences"].get_yscale() == "log"  # chi2 to tv span a factor 1000
    metric_lines = axes["metric"].get_lines()
    np.testing.assert_allclose(metric_lines[0].get_ydata(), np.arange(1, 11))
    assert axes["metric"].get_ylabel() == "train/reward"


def test_the_log_ratio_crop_is_stated_with_the_shares_left_out(tmp_path: Path) -> None:
    _write(tmp_path, reward=False, f=False)
    titles: dict[str, str] = {}
    report(tmp_path, out=tmp_path / "r.png", titles=titles)
    assert panels(load_run(tmp_path)) == ["estimators", "drift", "log_ratio"]
    crop = titles["log_ratio"].split("\n")[1]
    assert crop.startswith("y cropped to the central 99.8 % of tokens")
    # The outliers at -7, 8 and 9 are outside the range shown, and the full range is named.
    assert "(all tokens: -7 to 9)" in crop
    below = float(crop.split(" % below")[0].rsplit(" ", 1)[-1])
    above = float(crop.split(" % above")[0].rsplit(" ", 1)[-1])
    assert 0.05 <= below <= 0.2 and 0.05 <= above <= 0.2  # about 0.1 % each side


def test_alert_labels_are_clear_of_the_legends_and_of_each_other(tmp_path: Path) -> None:
    _write(tmp_path)
    fig, axes = _figure(load_run(tmp_path), 2.0, "auto", None, None, None)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    legends = [lg.get_window_extent(renderer) for a in fig.axes if (lg := a.get_legend()) is not None]
    assert len(legends) >= 4
    drift = axes["drift"]
    labels = [t for t in drift.texts if t.get_text() in ("drift", "kl_budget", "initial_kl", "spike")]
    assert sorted(t.get_text() for t in labels) == ["drift", "initial_kl", "kl_budget", "spike"]
    boxes = [t.get_window_extent(renderer) for t in labels]
    panel = drift.get_window_extent(renderer)
    for text, box in zip(labels, boxes, strict=True):
        assert not any(box.overlaps(lg) for lg in legends), text.get_text()
        assert panel.x0 <= box.x0 and box.x1 <= panel.x1, text.get_text()  # inside its panel
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    # No legend sits on a panel: they are in the column right of the panels.
    for name, ax in axes.items():
        box = ax.get_window_extent(renderer)
        assert not any(box.overlaps(lg) for lg in legends), name


def test_metric_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path)
    out = tmp_path / "m.png"
    assert main(["report", str(tmp_path), "-o", str(out), "--metric", "train/loss"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {out}",
        "note: drawn beside the KL: train/loss (--metric)",
    ]
    titles: dict[str, str] = {}
    report(tmp_path, out=out, metric="train/loss", titles=titles)
    assert titles["metric"].startswith("train/loss beside the KL")
    # A name the run did not log: one line, exit 2, the closest name offered.
    assert main(["report", str(tmp_path), "-o", str(out), "--metric", "train/los"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("klmonitor report: error: --metric 'train/los' is not a scalar of the run")
    assert "did you mean 'train/loss'?" in err and len(err.strip().splitlines()) == 1


def test_a_run_without_other_scalars_has_no_metric_panel(tmp_path: Path) -> None:
    w = SummaryWriter(str(tmp_path))
    for step in (1, 2, 3):
        w.add_scalar("kl/k3/mean", 0.1 * step, step)
    w.close()
    notes: list[str] = []
    titles: dict[str, str] = {}
    report(tmp_path, out=tmp_path / "r.png", notes=notes, titles=titles)
    assert list(titles) == ["estimators", "drift"] and notes == []
