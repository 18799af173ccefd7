"""TensorBoard's Custom Scalars tab: the layout a run writes, as TensorBoard's own plugins serve it.

The layout is read back through TensorBoard's server side (the custom-scalars plugin's
``/layout`` and ``/scalars`` routes over a real event multiplexer), and the band scalars are
checked against the window statistics recomputed in float64 from the tokens fed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tb_files import chart_tags, events, layout
from torch.utils.tensorboard import SummaryWriter

from klmonitor import Monitor
from klmonitor.sinks import TensorBoardSink, tensorboard_layout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

KL_CATEGORY = "klmonitor: KL(policy ‖ reference)"
DIAGNOSTICS = "klmonitor: diagnostics"
ROLLOUT = "klmonitor: rollout engine vs trainer"
F_CATEGORY = "klmonitor: f-divergences D_f(p ‖ q), p = reference, q = policy"
CONFIG_TAG = "custom_scalars__config__"
F_PER_TOKEN = {  # independent float64 formulas of the per-token values, r = p / q = e**l
    "chi2": lambda r: (r - 1) ** 2,
    "hellinger": lambda r: (np.sqrt(r) - 1) ** 2,
    "js": lambda r: (r * np.log(r) - (1 + r) * np.log((1 + r) / 2)) / 2,
    "tv": lambda r: np.abs(r - 1) / 2,
}


def _batches(steps: int, seed: int = 0, shift: float = 0.3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        logp = -torch.rand(4, 16, generator=g, dtype=torch.float64) * 4
        ref = logp + shift * torch.randn(4, 16, generator=g, dtype=torch.float64)
        rollout = logp + 0.05 * torch.randn(4, 16, generator=g, dtype=torch.float64)
        out.append(
            {"logp": logp, "ref": ref, "mask": torch.rand(4, 16, generator=g) < 0.9, "rollout": rollout}
        )
    return out


def _run(mon: Monitor, batches: list[dict[str, torch.Tensor]], rollout_from: int | None = None) -> None:
    for step, b in enumerate(batches, start=1):
        more: dict[str, Any] = {}
        if rollout_from is not None and step >= rollout_from:
            more["rollout_logprobs"] = b["rollout"]
        mon.update(b["logp"], b["ref"], b["mask"], **more)
        mon.step(step)
    mon.close()


def _window_stats(batches: list[dict[str, torch.Tensor]], lo: int, hi: int, fn: Any) -> tuple[float, float]:
    """Mean and standard error of ``fn(r)`` over the valid tokens of batches ``lo..hi - 1`` (float64)."""
    r = np.concatenate([np.exp((b["ref"] - b["logp"])[b["mask"]].numpy()) for b in batches[lo:hi]])
    values = fn(r)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def _check_charts_draw_what_they_say(
    logdir: Path, run: str, charts: dict[str, Any], scalars: set[str]
) -> None:
    """Every chart of the served layout draws logged tags: none is empty."""
    for title, (kind, content) in charts.items():
        if kind == "margin":
            for series in content:
                assert set(series) <= scalars, (title, series)
        else:
            assert chart_tags(logdir, run, content), f"chart {title!r} draws nothing"


def test_core_run_has_named_estimator_charts_with_stderr_bands_and_no_empty_charts(tmp_path: Path) -> None:
    batches = _batches(4)
    writer = SummaryWriter(str(tmp_path / "run"))
    _run(Monitor(log_every_n_steps=2, sinks=writer, by_position=False, top_sequences=0), batches)
    writer.close()
    served = layout(tmp_path)
    # No rollout log-probs, no f-divergences, no position profile: none of their charts.
    assert sorted(served) == sorted([KL_CATEGORY, DIAGNOSTICS])
    assert not any("position" in title for title in served[DIAGNOSTICS])
    kl = served[KL_CATEGORY]
    (means_title,) = [t for t, (kind, _) in kl.items() if kind == "multiline"]
    for name in ("k1", "k2", "k3", "cv", "kl_pq"):
        assert name in means_title  # the title names every series of the chart
    # The means chart draws exactly the five means: the regexes are anchored at both ends.
    assert chart_tags(tmp_path, "run", kl[means_title][1]) == {
        f"kl/{n}/mean" for n in ("k1", "k2", "k3", "cv", "kl_pq")
    }
    margins = {content[0] for kind, content in kl.values() if kind == "margin"}
    assert margins == {
        ("kl/k3/mean", "kl/band/k3_lower", "kl/band/k3_upper"),
        ("kl/k1/mean", "kl/band/k1_lower", "kl/band/k1_upper"),
    }
    assert all("± 2 s.e." in t for t, (kind, _) in kl.items() if kind == "margin")
    acc = events(tmp_path)
    scalars = set(acc.Tags()["scalars"])
    _check_charts_draw_what_they_say(tmp_path, "run", {**kl, **served[DIAGNOSTICS]}, scalars)
    # The bands are the window mean ± 2 standard errors of the mean, recomputed from the tokens.
    for est, fn, floor in (("k3", lambda r: r - 1 - np.log(r), 0.0), ("k1", lambda r: -np.log(r), -math.inf)):
        lower = {e.step: e.value for e in acc.Scalars(f"kl/band/{est}_lower")}
        upper = {e.step: e.value for e in acc.Scalars(f"kl/band/{est}_upper")}
        assert sorted(lower) == sorted(upper) == [2, 4]
        for step in (2, 4):
            mean, se = _window_stats(batches, step - 2, step, fn)
            assert upper[step] == pytest.approx(mean + 2 * se, rel=1e-5)
            assert lower[step] == pytest.approx(max(mean - 2 * se, floor), rel=1e-5, abs=1e-7)
    assert (
        min(e.value for e in acc.Scalars("kl/band/k1_lower")) < 0 < acc.Scalars("kl/band/k3_lower")[0].value
    )


def test_k3_band_is_cut_at_zero_where_the_mean_is_within_two_standard_errors_of_it(tmp_path: Path) -> None:
    # A policy a hair from the reference: k3's window mean is far below 2 standard errors.
    writer = SummaryWriter(str(tmp_path))
    mon = Monitor(log_every_n_steps=1, sinks=writer)
    logp = torch.zeros(2, 8, dtype=torch.float64) - 1.0
    ref = logp.clone()
    ref[0, 0] += 0.02
    mon.update(logp, ref)
    result = mon.step(1)
    mon.close()
    writer.close()
    assert result is not None
    k3 = result.summary.k3
    assert k3.mean - 2 * k3.stderr < 0
    acc = events(tmp_path)
    assert acc.Scalars("kl/band/k3_lower")[0].value == 0.0
    assert acc.Scalars("kl/band/k3_upper")[0].value == pytest.approx(k3.mean + 2 * k3.stderr, rel=1e-6)


def test_rollout_position_and_f_divergence_charts_appear_when_their_numbers_do(tmp_path: Path) -> None:
    batches = _batches(6, seed=3)
    writer = SummaryWriter(str(tmp_path / "run"))
    # The position profile is on by default.
    mon = Monitor(log_every_n_steps=2, sinks=writer, f_divergences=["chi2", "hellinger", "js", "tv"])
    _run(mon, batches, rollout_from=3)  # rollout log-probs from the second window on
    writer.close()
    acc = events(tmp_path)
    # The layout is written when a category's first numbers arrive (set-up, first window, rollout),
    # not once per window; TensorBoard serves the last one written.
    assert len(acc.Tensors(CONFIG_TAG)) == 3
    served = layout(tmp_path)
    assert sorted(served) == sorted([KL_CATEGORY, DIAGNOSTICS, ROLLOUT, F_CATEGORY])
    scalars = set(acc.Tags()["scalars"])
    for charts in served.values():
        _check_charts_draw_what_they_say(tmp_path, "run", charts, scalars)
    (position,) = [c for t, c in served[DIAGNOSTICS].items() if "position" in t]
    assert chart_tags(tmp_path, "run", position[1]) == {
        t for t in scalars if t.startswith("kl/by_position/") and t.endswith("/k3")
    }
    ratio = [c for t, c in served[ROLLOUT].items() if "ratio" in t][0]
    assert chart_tags(tmp_path, "run", ratio[1]) == {f"kl/rollout/ratio/{s}" for s in ("min", "mean", "max")}
    # One margin chart per f-divergence, in the table's order, its title naming what it estimates.
    f_charts = served[F_CATEGORY]
    assert [c[1][0][0] for c in f_charts.values()] == [f"kl/f/{n}/mean" for n in F_PER_TOKEN]
    assert any("Pearson chi2" in t for t in f_charts) and any("total variation" in t for t in f_charts)
    for name, fn in F_PER_TOKEN.items():
        lower = {e.step: e.value for e in acc.Scalars(f"kl/band/f/{name}_lower")}
        upper = {e.step: e.value for e in acc.Scalars(f"kl/band/f/{name}_upper")}
        for step in (2, 4, 6):
            mean, se = _window_stats(batches, step - 2, step, fn)
            assert upper[step] == pytest.approx(mean + 2 * se, rel=1e-4), name
            assert lower[step] == pytest.approx(max(mean - 2 * se, 0.0), rel=1e-4, abs=1e-7), name


def test_the_rollout_category_is_absent_until_rollout_log_probs_arrive(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "run"))
    _run(Monitor(log_every_n_steps=2, sinks=writer), _batches(4))
    writer.close()
    assert ROLLOUT not in layout(tmp_path)
    assert "kl/rollout/k3/mean" not in events(tmp_path).Tags()["scalars"]


def test_layout_of_everything_and_a_user_f_divergence() -> None:
    full = tensorboard_layout("kl/")
    assert sorted(full) == sorted([KL_CATEGORY, DIAGNOSTICS, ROLLOUT, F_CATEGORY])
    assert len(full[F_CATEGORY]) == 4
    user = tensorboard_layout("rl/", present=["rl/k3/mean", "rl/f/alpha_half/mean", "rl/f/chi2/mean"])
    titles = list(user["klmonitor: f-divergences D_f(p ‖ q), p = reference, q = policy"])
    assert titles[0].startswith("chi2") and titles[1].startswith("alpha_half") and "user's" in titles[1]
    assert DIAGNOSTICS not in user and ROLLOUT not in user
    # The old call without arguments still gives the full layout.
    assert TensorBoardSink(None).layout() == full
