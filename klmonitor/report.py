"""``klmonitor report``: a PNG dashboard of a run, from TensorBoard, CSV or W&B logs.

The run is read back with each tracker's own reader (see :mod:`klmonitor._readers`:
TensorBoard's ``EventAccumulator``, the ``metrics.csv`` of Lightning's ``CSVLogger``, and
``wandb leet inspect --json`` for W&B run files); the figure is drawn with matplotlib's Agg
backend (no display needed). It shows the k1/k2/k3 window means with ±2 standard-error
bands against the trainer step, the k2-k3 drift signal with its alert threshold and the
alerts the monitor fired, and, when the run logged them, a user metric (a reward) beside the
KL, the f-divergences, the distribution of the log-ratio over time, the KL by token position (a
step × position heat map) and the rollout-vs-trainer mismatch (KL(rollout ‖ trainer) and the
importance ratio's range). Legends sit in a column right of the panels, so no legend covers a
curve or an alert's label.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from klmonitor import summary as _summary
from klmonitor import table
from klmonitor._readers import (
    FORMATS,
    AlertMark,
    Format,
    Histogram,
    RunData,
    RunRef,
    find_runs,
    load_run,
    parse_alert,
    parse_wandb_alert,
)
from klmonitor.alerts import DEFAULT_DRIFT_THRESHOLD

__all__ = [
    "FORMATS",
    "AlertMark",
    "Histogram",
    "RunData",
    "RunRef",
    "find_runs",
    "load_run",
    "panels",
    "f_divergences",
    "user_metric",
    "parse_alert",
    "parse_wandb_alert",
    "position_profile",
    "render",
    "report",
    "select_run",
    "unplottable",
]

Scale = Literal["auto", "linear", "log"]
REPORT_NAME = "klmonitor_report.png"
BAND_SE = _summary.BAND_SE
"""Half-width of the bands around the window means, in standard errors (about a 95% interval)."""
RATIO_RANGE = (0.5, 2.0)
"""The importance-ratio range drawn as dashed lines in the rollout panel."""
_LEVEL_COLORS = {"info": "tab:blue", "warn": "tab:orange", "error": "tab:red"}
_EST_COLORS = {"k1": "tab:blue", "k2": "tab:orange", "k3": "tab:green", "kl_pq": "tab:red", "cv": "black"}
_EST_LABELS = {"kl_pq": "kl_pq = KL(ref ‖ policy)", "cv": "cv (headline)"}
_F_COLORS = ("tab:purple", "tab:cyan", "tab:pink", "tab:olive", "tab:gray", "darkgoldenrod")
_METRIC_COLOR = "tab:brown"
CROP = 0.998
"""The share of all logged tokens the log-ratio panel's y range holds (the rest is named on it)."""
_METRIC_WORDS = ("reward",)
"""Other scalars whose name contains one of these are drawn beside the KL (``--metric`` picks another)."""
_FORMAT_LABEL = {"tensorboard": "TensorBoard", "csv": "CSV", "wandb": "W&B"}
_LEADING_INT = re.compile(r"^\s*(\d+)")
FIG_WIDTH = 14.0
"""The report's width in inches (1540 pixels at its 110 dpi): the panels and their legend column."""
PLOT_LIMIT = 1e100
"""Values beyond this magnitude (and inf, NaN) are read but not drawn: no KL, spread or count a
monitor logs comes near it (float32 scalars end at 3.4e38), and matplotlib's axis arithmetic
overflows on values near float64's end (1e308)."""


def unplottable(data: RunData) -> dict[str, int]:
    """``{tag: how many of its values are not drawn}``: inf, NaN, or beyond :data:`PLOT_LIMIT`.

    >>> d = RunData(Path("run"), "kl/", scalars={"kl/k3/mean": (np.arange(3), np.array([0.5, np.inf, 1e308]))})
    >>> unplottable(d)
    {'kl/k3/mean': 2}
    """
    out = {}
    for tag, (_, values) in sorted(data.scalars.items()):
        bad = int((~(np.abs(values) <= PLOT_LIMIT)).sum())
        if bad:
            out[tag] = bad
    return out


def _drawable(data: RunData) -> RunData:
    """``data`` with the values :func:`unplottable` counts set to NaN (matplotlib leaves gaps)."""
    scalars = {
        tag: (steps, np.where(np.abs(values) <= PLOT_LIMIT, values, np.nan))
        for tag, (steps, values) in data.scalars.items()
    }
    others = {
        tag: (steps, np.where(np.abs(values) <= PLOT_LIMIT, values, np.nan))
        for tag, (steps, values) in data.others.items()
    }
    return replace(data, scalars=scalars, others=others)


def user_metric(data: RunData, metric: str | None = None) -> str | None:
    """The run's scalar drawn beside the KL: ``metric``, or a reward-like one the run logged.

    Without ``metric``, the other scalars (not under the monitor's prefix) whose name contains
    ``reward`` are candidates; a plain ``reward`` (or ``.../reward``) wins, then the shortest
    name not naming a spread (``std``, ``var``). ``None`` when there is none.

    Raises:
        ValueError: ``metric`` was not logged in this run (the message names the closest).

    >>> d = RunData(Path("run"), "kl/", others={n: (np.arange(2), np.ones(2)) for n in ("train/reward_std", "train/reward", "loss")})
    >>> user_metric(d), user_metric(d, "loss")
    ('train/reward', 'loss')
    """
    if metric is not None:
        if metric in data.others or metric in data.scalars:
            return metric
        names = sorted(data.others)
        close = difflib.get_close_matches(metric, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listed = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "none"
        raise ValueError(
            f"--metric {metric!r} is not a scalar of the run {data.run_dir} (its scalars besides "
            f"{data.prefix}*: {listed}){hint}"
        )
    candidates = [n for n in data.others if any(w in n.lower() for w in _METRIC_WORDS)]
    if not candidates:
        return None

    def rank(name: str) -> tuple[int, int, int, str]:
        leaf = name.lower().rsplit("/", 1)[-1]
        spread = any(w in leaf for w in ("std", "var", "min", "max"))
        return (leaf not in ("reward", "rewards"), spread, len(name), name)

    return min(candidates, key=rank)


def f_divergences(data: RunData) -> list[str]:
    """The f-divergences logged (``f/<name>/mean``): the table's in its order, then a user's by name.

    >>> d = RunData(Path("run"), "kl/", scalars={f"kl/f/{n}/mean": (np.arange(1), np.ones(1)) for n in ("tv", "mine", "chi2")})
    >>> f_divergences(d)
    ['chi2', 'tv', 'mine']
    """
    pattern = re.compile(rf"^{re.escape(data.prefix)}f/(?P<name>[^/]+)/mean$")
    found = {m["name"] for tag in data.scalars if (m := pattern.match(tag))}
    return [n for n in table.F_NAMES if n in found] + sorted(found - set(table.F_NAMES))


def panels(data: RunData, metric: str | None = None) -> list[str]:
    """The panels :func:`render` draws for ``data``, top to bottom.

    ``estimators`` and ``drift`` always; ``metric`` when :func:`user_metric` finds one (a
    reward, or ``metric``); ``f_divergences`` when ``f/<name>/mean`` scalars were logged;
    ``log_ratio`` when histograms were; ``by_position`` when ``by_position/<bucket>/k3``
    scalars were; ``rollout_kl`` and ``rollout_ratio`` when ``rollout/k3/mean`` and
    ``rollout/ratio/*`` were.

    >>> panels(RunData(Path("run"), "kl/"))
    ['estimators', 'drift']
    """
    out = ["estimators"]
    if user_metric(data, metric) is not None:
        out.append("metric")
    if f_divergences(data):
        out.append("f_divergences")
    out.append("drift")
    if data.histograms:
        out.append("log_ratio")
    if position_profile(data) is not None:
        out.append("by_position")
    if data.series("rollout/k3/mean") is not None:
        out.append("rollout_kl")
    if any(data.series(f"rollout/ratio/{s}") is not None for s in ("mean", "min", "max")):
        out.append("rollout_ratio")
    return out


def _bucket_key(label: str) -> tuple[int, str]:
    m = _LEADING_INT.match(label)
    return (int(m[1]) if m else 1 << 62, label)


def position_profile(data: RunData) -> tuple[np.ndarray, list[str], np.ndarray] | None:
    """The mean k3 by position bucket and step, from the ``by_position/<bucket>/k3`` scalars.

    Returns:
        ``(steps, buckets, grid)``: the steps (sorted), the bucket labels ordered by their
        first position (``"0-1"``, ``"2-3"``, ``"4-7"``, ...), and ``grid[bucket, step]``
        (NaN where a bucket was not logged at a step); ``None`` when nothing was logged.

    >>> import numpy as np
    >>> d = RunData(Path("run"), "kl/")
    >>> d.scalars["kl/by_position/2-3/k3"] = (np.array([10]), np.array([0.5]))
    >>> d.scalars["kl/by_position/0-1/k3"] = (np.array([10, 20]), np.array([0.25, 0.75]))
    >>> steps, buckets, grid = position_profile(d)
    >>> steps.tolist(), buckets, grid.tolist()
    ([10, 20], ['0-1', '2-3'], [[0.25, 0.75], [0.5, nan]])
    """
    pattern = re.compile(rf"^{re.escape(data.prefix)}by_position/(?P<bucket>[^/]+)/k3$")
    found = {m["bucket"]: got for tag, got in data.scalars.items() if (m := pattern.match(tag))}
    if not found:
        return None
    buckets = sorted(found, key=_bucket_key)
    steps = np.unique(np.concatenate([found[b][0] for b in buckets]))
    grid = np.full((len(buckets), steps.size), np.nan)
    for i, b in enumerate(buckets):
        s, v = found[b]
        grid[i, np.searchsorted(steps, s)] = v
    return steps, buckets, grid


def _use_log(means: list[np.ndarray], scale: Scale) -> bool:
    if scale != "auto":
        return scale == "log"
    # k2 and k3 are never negative; k1 can be, and is simply not drawn where it is on a log axis.
    values = np.concatenate(means) if means else np.array([])
    values = values[np.isfinite(values) & (values > 0)]
    if values.size < 2:
        return False
    return bool(values.max() / values.min() >= 30)


def _stderr(data: RunData, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, standard error of the window mean)``: logged, or ``std / sqrt(n)``."""
    se = data.series(f"{name}/stderr")
    if se is not None:
        return se
    std = data.series(f"{name}/std")
    n = data.series("sequences") or data.series("tokens")
    if std is None or n is None:
        return None
    common, i_s, i_n = np.intersect1d(std[0], n[0], return_indices=True)
    return common, std[1][i_s] / np.sqrt(np.maximum(n[1][i_n], 1.0))


def _band(
    ax: Any,
    mean: tuple[np.ndarray, np.ndarray],
    se: tuple[np.ndarray, np.ndarray] | None,
    color: str,
    floor: float | None,
    label: str,
) -> float:
    """Fill mean ± BAND_SE standard errors; returns the band's top (``-inf`` if none)."""
    if se is None:
        return -math.inf
    common, i_m, i_s = np.intersect1d(mean[0], se[0], return_indices=True)
    half = BAND_SE * se[1][i_s]
    lower, upper = mean[1][i_m] - half, mean[1][i_m] + half
    ok = np.isfinite(lower) & np.isfinite(upper)
    if not ok.any():
        return -math.inf
    if floor is not None:
        # Only a mean within 2 standard errors of 0 reaches the floor: "indistinguishable from 0".
        lower = np.maximum(lower, floor)
    ax.fill_between(common, lower, upper, where=ok, color=color, alpha=0.18, lw=0, label=label)
    return float(np.nanmax(upper[ok]))


def _plot_estimators(ax: Any, data: RunData, scale: Scale, unit: str) -> None:
    # cv, the headline (honest error bars), when the run logged it (older logs have none).
    series = {n: data.series(f"{n}/mean") for n in ("k1", "k2", "k3", "kl_pq", "cv")}
    nonneg = [got[1] for n, got in series.items() if got is not None and n in ("k2", "k3", "kl_pq")]
    log = _use_log(nonneg, scale)
    # The log axis' floor comes from k2/k3 (never negative); k1 or cv near 0 would stretch it for nothing.
    positive = np.concatenate([m[np.isfinite(m) & (m > 0)] for m in nonneg] or [np.ones(1)])
    if positive.size == 0:
        positive = np.ones(1)
    floor = float(positive.min()) / 3
    top = -math.inf
    for name, got in series.items():
        if got is None:
            continue
        steps, mean = got
        color = _EST_COLORS[name]
        label = f"{name} ± {BAND_SE:g} s.e."
        top = max(top, _band(ax, got, _stderr(data, name), color, floor if log else None, label))
        shown = np.where(mean > 0, mean, np.nan) if log else mean  # k1, cv < 0: no place on a log axis
        style = {"ls": "--", "lw": 1.4} if name == "kl_pq" else {"lw": 1.8}  # another divergence
        ax.plot(
            steps,
            shown,
            color=color,
            marker="o",
            ms=2.5,
            label=f"{_EST_LABELS.get(name, name)} mean",
            **style,
        )
    _alert_lines(ax, data.alerts)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(floor, max(top, float(positive.max())) * 1.5)
    ax.set_title(
        f"KL(policy ‖ reference) estimates: window mean ± {BAND_SE:g} standard errors of the mean",
        fontsize=10.5,
    )
    ax.set_ylabel(f"KL (nats {unit}){', log scale' if log else ''}")
    ax.grid(True, which="major", alpha=0.3)


def _alert_lines(ax: Any, alerts: list[AlertMark]) -> None:
    for a in alerts:
        ax.axvline(a.step, color=_LEVEL_COLORS.get(a.level, "tab:red"), lw=0.9, ls=":", alpha=0.8, zorder=1)


def _alert_markers(
    ax: Any, alerts: list[AlertMark], on_curve: str, curve: tuple[np.ndarray, np.ndarray] | None
) -> None:
    """Triangles for ``alerts``: those of rule ``on_curve`` on ``curve``, the others on the top edge.

    The first alert of each (rule, level) is labelled with its rule: to the right of its marker in
    the left part of the panel, to the left near the right edge (a label never leaves the panel;
    the legends are outside it), one row lower than a nearby top-edge label so none overlap.
    """
    seen: set[tuple[str, str]] = set()
    logged = set(curve[0].tolist()) if curve is not None else set()
    lo, hi = ax.get_xlim()
    span = max(hi - lo, 1e-12)
    placed: list[tuple[float, int]] = []  # (x fraction, row) of the labels on the top edge
    for a in alerts:
        if a.rule == on_curve and curve is not None and a.step in logged:
            y, transform, dy = float(curve[1][int(np.searchsorted(curve[0], a.step))]), ax.transData, 6
        else:
            y, transform, dy = 0.96, ax.get_xaxis_transform(), -3
        key = (a.rule, a.level)
        color = _LEVEL_COLORS.get(a.level, "tab:red")
        style = {
            "marker": "v",
            "ms": 9,
            "color": color,
            "mec": "black",
            "mew": 0.6,
            "ls": "none",
            "zorder": 5,
        }
        label = f"alert: {a.rule} ({a.level})" if key not in seen else None
        ax.plot([a.step], [y], transform=transform, clip_on=False, label=label, **style)
        if key not in seen:
            x = (a.step - lo) / span
            right = x > 0.75
            if transform is not ax.transData:
                busy = {row for px, row in placed if abs(px - x) < 0.15}
                row = min(set(range(len(placed) + 1)) - busy)
                placed.append((x, row))
                dy -= 11 * row
            ax.annotate(
                a.rule, (a.step, y), xycoords=transform, xytext=(-6 if right else 6, dy), textcoords="offset points",
                fontsize=8, color=color, ha="right" if right else "left", va="top" if dy < 0 else "bottom",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
            )  # fmt: skip
        seen.add(key)


def _plot_drift(ax: Any, data: RunData, threshold: float) -> None:
    got = data.series("drift_k2_k3")
    if got is not None:
        steps, drift = got
        ax.plot(steps, drift, color="tab:purple", lw=1.8, marker="o", ms=2.5, label="drift (k2 − k3) / k3")
    ax.axhline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.axhline(0, color="grey", lw=0.6)
    _alert_lines(ax, data.alerts)
    _alert_markers(ax, data.alerts, "drift", got)
    title = "Drift: relative k2 − k3 gap (the policy has left the quadratic region above the threshold)"
    if not data.alerts_recorded:
        title += f"; {_FORMAT_LABEL[data.format]} logs hold no alerts"
    ax.set_title(title, fontsize=10.5)
    ax.set_ylabel("relative gap (unitless)")
    ax.grid(True, alpha=0.3)


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each step, half-way to its neighbours, for a step × y heat map."""
    steps = steps.astype(np.float64)
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def _regrid(h: Histogram, grid: np.ndarray) -> np.ndarray:
    """Counts of ``h`` on the bins ``grid``, each bucket's count spread evenly over its width."""
    cum = np.concatenate([[0.0], np.cumsum(h.counts)])
    if h.hi == h.lo:  # every value equal: one spike
        cdf = np.where(grid >= h.lo, cum[-1], 0.0)
    else:
        cdf = np.interp(grid, h.edges, cum, left=0.0, right=cum[-1])
    return np.diff(cdf)


def _pct(share: float) -> str:
    """A share of tokens as a percentage with the digits that matter (``0.1 %``, ``< 0.01 %``)."""
    if share <= 0:
        return "0 %"
    if share < 1e-4:
        return "< 0.01 %"
    return f"{100 * share:.2g} %"


_SMOOTH = np.array([1.0, 2.0, 1.0]) / 4.0
_GAP_FILL = 4


def _plot_histograms(fig: Any, ax: Any, cax: Any, data: RunData) -> None:
    hists = data.histograms
    # The y range holds 99.8% of all tokens logged, so that a few outliers do not flatten it.
    lo_all = min(h.lo for h in hists)
    hi_all = max(h.hi for h in hists)
    fine = np.linspace(lo_all, hi_all, 2001) if hi_all > lo_all else np.array([lo_all - 0.5, hi_all + 0.5])
    total = sum((_regrid(h, fine) / max(h.counts.sum(), 1.0) for h in hists), np.zeros(fine.size - 1))
    cdf = np.cumsum(total) / max(total.sum(), 1e-12)
    tail = (1 - CROP) / 2
    lo = float(fine[int(np.searchsorted(cdf, tail))])
    hi = float(fine[min(int(np.searchsorted(cdf, 1 - tail)) + 1, fine.size - 1)])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    # What the crop leaves out, said on the panel: the share of tokens below and above the range.
    below = float(np.interp(lo, fine[1:], cdf, left=0.0))
    above = float(1.0 - np.interp(hi, fine[1:], cdf, left=0.0))
    crop = ""
    if lo > lo_all or hi < hi_all:
        crop = (
            f"\ny cropped to the central {100 * CROP:g} % of tokens: {_pct(below)} below {lo:.3g}, "
            f"{_pct(above)} above {hi:.3g} (all tokens: {lo_all:.3g} to {hi_all:.3g})"
        )
    # Bins sized to the sample: with n tokens per window, about 2 sqrt(n) bins (20 to 100).
    n_median = float(np.median([h.counts.sum() for h in hists]))
    n_bins = int(np.clip(2 * math.sqrt(n_median), 20, 100))
    edges_y = np.linspace(lo, hi, n_bins + 1)
    # The colour floor is a quarter of one token per bin: every occupied bin gets a colour.
    floor = 0.25 / max(n_median, 1.0)
    grid = np.zeros((n_bins, len(hists)))
    for j, h in enumerate(hists):
        col = _regrid(h, edges_y) / max(h.counts.sum(), 1.0)
        # A sparse tail leaves empty bins between occupied ones, which a log colour scale
        # would draw as white stripes. A [1, 2, 1] kernel spreads each bin's tokens over its
        # neighbours (mass kept), and a gap of at most _GAP_FILL bins left between occupied
        # bins gets the colour floor ("under a quarter of a token"). A wider gap is a real one
        # (e.g. between two modes) and stays blank.
        col = np.convolve(col, _SMOOTH, mode="same")
        occupied = np.flatnonzero(col > 0)
        for a, b in zip(occupied[:-1], occupied[1:], strict=True):
            if 1 < b - a <= _GAP_FILL + 1:
                col[a + 1 : b] = floor
        grid[:, j] = np.where(col > 0, np.maximum(col, floor), 0.0)
    from matplotlib.colors import LogNorm

    shown = grid[grid > 0]
    vmax = float(shown.max()) if shown.size else 1.0
    norm = LogNorm(vmin=min(floor, vmax / 10), vmax=vmax, clip=True)
    mesh = ax.pcolormesh(
        _step_edges(np.array([h.step for h in hists])), edges_y, np.where(grid > 0, grid, np.nan),
        cmap="viridis", norm=norm,
    )  # fmt: skip
    fig.colorbar(mesh, cax=cax, label="fraction of tokens per bin")
    ax.axhline(0, color="grey", lw=0.6, alpha=0.7)
    _alert_lines(ax, data.alerts)
    ax.set_title(
        "Distribution of the per-token log-ratio log p_ref − log p_policy (a sample of each window)" + crop,
        fontsize=10.5,
    )
    ax.set_ylabel("log-ratio (nats)")


def _plot_position(fig: Any, ax: Any, cax: Any, data: RunData, unit: str) -> None:
    got = position_profile(data)
    assert got is not None
    steps, buckets, grid = got
    from matplotlib.colors import LogNorm, Normalize

    finite = grid[np.isfinite(grid)]
    positive = finite[finite > 0]
    log = positive.size >= 2 and finite.min() > 0 and positive.max() / positive.min() >= 30
    norm: Any
    if log:
        norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
    else:
        norm = Normalize(vmin=min(0.0, float(finite.min())) if finite.size else 0.0)
    edges_y = np.arange(len(buckets) + 1) - 0.5
    mesh = ax.pcolormesh(_step_edges(steps), edges_y, grid, cmap="magma", norm=norm)
    fig.colorbar(mesh, cax=cax, label=f"mean k3 (nats {unit})")
    # At most ~12 labels, so that many buckets stay readable.
    every = max(1, math.ceil(len(buckets) / 12))
    ax.set_yticks(range(0, len(buckets), every), [buckets[i] for i in range(0, len(buckets), every)])
    _alert_lines(ax, data.alerts)
    ax.set_title("Where the KL comes from: mean k3 by token position within the sequence", fontsize=10.5)
    ax.set_ylabel("token position")


def _plot_rollout_kl(ax: Any, data: RunData) -> None:
    got = data.series("rollout/k3/mean")
    assert got is not None
    _band(ax, got, _stderr(data, "rollout/k3"), "tab:red", None, f"± {BAND_SE:g} s.e.")
    ax.plot(got[0], got[1], color="tab:red", lw=1.8, marker="o", ms=2.5, label="k3 mean")
    ax.axhline(0, color="grey", lw=0.6)
    _alert_lines(ax, data.alerts)
    _alert_markers(ax, [a for a in data.alerts if a.rule == "rollout_mismatch"], "rollout_mismatch", got)
    ax.set_title(
        "Rollout vs trainer: KL(rollout engine ‖ trainer policy) on the sampled tokens", fontsize=10.5
    )
    ax.set_ylabel("KL (nats per token)")
    ax.grid(True, alpha=0.3)


def _plot_rollout_ratio(ax: Any, data: RunData) -> None:
    mean, lo, hi = (data.series(f"rollout/ratio/{s}") for s in ("mean", "min", "max"))
    if lo is not None and hi is not None:
        common, i_lo, i_hi = np.intersect1d(lo[0], hi[0], return_indices=True)
        ax.fill_between(
            common, lo[1][i_lo], hi[1][i_hi], color="tab:cyan", alpha=0.3, lw=0, label="min – max"
        )
    for got in (lo, hi):
        if got is not None:
            ax.plot(got[0], got[1], color="tab:cyan", lw=1.0, ls=":")
    if mean is not None:
        ax.plot(mean[0], mean[1], color="tab:blue", lw=1.8, marker="o", ms=2.5, label="mean")
    values = np.concatenate([g[1] for g in (mean, lo, hi) if g is not None])
    if values.size and np.all(values[np.isfinite(values)] > 0):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log", base=2)  # ticks at ... 0.25, 0.5, 1, 2, 4 ...
        ax.yaxis.set_major_locator(LogLocator(base=2))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # not 2⁻¹
        ax.yaxis.set_minor_formatter(NullFormatter())
    for bound in RATIO_RANGE:
        ax.axhline(bound, color="black", ls="--", lw=0.9)
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.annotate(
        f"[{RATIO_RANGE[0]:g}, {RATIO_RANGE[1]:g}]", (1.0, RATIO_RANGE[1]), xycoords=("axes fraction", "data"),
        xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8,
    )  # fmt: skip
    _alert_lines(ax, data.alerts)
    ax.set_title("Importance ratio π_trainer / π_rollout per token: window mean and range", fontsize=10.5)
    ax.set_ylabel("ratio")
    ax.grid(True, alpha=0.3)


def _headline(data: RunData) -> tuple[str, tuple[np.ndarray, np.ndarray] | None]:
    """The headline estimator's name and series: ``cv`` (older logs have none: ``k3``)."""
    name = "cv" if data.series("cv/mean") is not None else "k3"
    return name, data.series(f"{name}/mean")


def _metric_series(data: RunData, metric: str) -> tuple[np.ndarray, np.ndarray]:
    return data.others[metric] if metric in data.others else data.scalars[metric]


def _plot_metric(ax: Any, data: RunData, metric: str, unit: str) -> Any:
    """The user's metric (left axis) and the headline KL (right axis) against the step; returns the twin."""
    steps, values = _metric_series(data, metric)
    ax.plot(steps, values, color=_METRIC_COLOR, lw=1.6, label=metric)
    ax.set_ylabel(metric, color=_METRIC_COLOR)
    ax.tick_params(axis="y", colors=_METRIC_COLOR)
    twin = ax.twinx()
    name, head = _headline(data)
    if head is not None:
        twin.plot(
            head[0], head[1], color="black", lw=1.4, ls="--", marker="o", ms=2.5, label=f"KL ({name} mean)"
        )
    twin.set_ylabel(f"KL ({name}, nats {unit})")
    _alert_lines(ax, data.alerts)
    ax.set_title(f"{metric} beside the KL: what the policy gained for the divergence it spent", fontsize=10.5)
    ax.grid(True, alpha=0.3)
    return twin


def _plot_f(ax: Any, data: RunData, scale: Scale) -> None:
    names = f_divergences(data)
    means = [got[1] for n in names if (got := data.series(f"f/{n}/mean")) is not None]
    log = _use_log(means, scale)
    positive = np.concatenate([m[np.isfinite(m) & (m > 0)] for m in means] or [np.ones(1)])
    floor = float(positive.min()) / 3 if positive.size else 1e-12
    top = -math.inf
    for i, name in enumerate(names):
        got = data.series(f"f/{name}/mean")
        assert got is not None
        color = _F_COLORS[i % len(_F_COLORS)]
        top = max(
            top,
            _band(
                ax,
                got,
                _stderr(data, f"f/{name}"),
                color,
                floor if log else 0.0,
                f"{name} ± {BAND_SE:g} s.e.",
            ),
        )
        shown = np.where(got[1] > 0, got[1], np.nan) if log else got[1]
        ax.plot(got[0], shown, color=color, lw=1.8, marker="o", ms=2.5, label=f"{name} mean")
    _alert_lines(ax, data.alerts)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(floor, max(top, float(positive.max())) * 1.5)
    ax.set_title(
        f"f-divergences D_f(reference ‖ policy): window mean ± {BAND_SE:g} standard errors of the mean",
        fontsize=10.5,
    )
    ax.set_ylabel(f"divergence{', log scale' if log else ''}")
    ax.grid(True, which="major", alpha=0.3)


_HEIGHTS = {
    "estimators": 1.3,
    "metric": 0.9,
    "f_divergences": 1.0,
    "drift": 1.0,
    "log_ratio": 1.0,
    "by_position": 1.0,
    "rollout_kl": 0.8,
    "rollout_ratio": 0.8,
}


def _facts(data: RunData, unit: str, metric: str | None) -> list[str]:
    facts = [f"{_FORMAT_LABEL[data.format]} log"]
    # The headline is cv (honest error bars at any KL); logs written before it existed have k3.
    name, head = _headline(data)
    drift = data.series("drift_k2_k3")
    if head is not None and head[0].size:
        se = data.series(f"{name}/stderr")
        spread = (
            f" ± {BAND_SE * se[1][-1]:.2g}"
            if se is not None and se[0].size and se[0][-1] == head[0][-1]
            else ""
        )
        facts.append(f"last step {int(head[0][-1])}: KL ({name}) = {head[1][-1]:.3g}{spread} nats {unit}")
    if drift is not None and drift[0].size:
        facts.append(f"drift {drift[1][-1]:.3g}")
    if metric is not None:
        steps, values = _metric_series(data, metric)
        if steps.size:
            facts.append(f"{metric} {values[-1]:.3g}")
    rollout = data.series("rollout/k3/mean")
    if rollout is not None and rollout[0].size:
        facts.append(f"rollout KL {rollout[1][-1]:.3g}")
    if data.alerts_recorded:
        rules = sorted({a.rule for a in data.alerts})
        facts.append(f"{len(data.alerts)} alert(s){': ' + ', '.join(rules) if rules else ''}")
    else:
        facts.append(f"alerts: not recorded in {_FORMAT_LABEL[data.format]} logs")
    return facts


def _figure(
    data: RunData,
    drift_threshold: float,
    scale: Scale,
    title: str | None,
    metric: str | None,
    titles: dict[str, str] | None,
) -> tuple[Any, dict[str, Any]]:
    """The report's matplotlib ``Figure`` and its panels' axes by name (see :func:`render`)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is in the [plot] extra
        raise ValueError("klmonitor report needs matplotlib: pip install 'klmonitor[plot]'") from exc
    if not data.scalars:
        raise ValueError(f"no {data.prefix} scalars in {data.run_dir}")
    if scale not in ("auto", "linear", "log"):
        raise ValueError(f"scale must be 'auto', 'linear' or 'log', got {scale!r}")
    dropped = unplottable(data)
    data = _drawable(data)
    metric = user_metric(data, metric)
    unit = "per sequence" if data.series("sequences") is not None else "per token"
    names = panels(data, metric)
    heights = [_HEIGHTS[n] for n in names]
    fig = Figure(figsize=(FIG_WIDTH, 0.9 + 3.0 * sum(heights)), layout="constrained")
    # A narrow second column holds the heat maps' colour bars, so every panel is equally wide
    # and a step lines up across all of them; the third holds the legends, off the curves and
    # the alert labels.
    gs = fig.add_gridspec(len(names), 3, width_ratios=[1, 0.017, 0.19], height_ratios=heights)
    axes: dict[str, Any] = {}
    first: Any = None
    for i, name in enumerate(names):
        axes[name] = first = fig.add_subplot(gs[i, 0], sharex=first)
    # Every panel's x range before any marker is placed: labels are placed by where they fall.
    steps = [s for s, _ in (*data.scalars.values(), *data.others.values()) if s.size] + [
        np.array([h.step for h in data.histograms])
    ]
    steps = [s for s in steps if s.size]
    if steps:
        x0 = float(min(s.min() for s in steps))
        x1 = float(max(s.max() for s in steps))
        pad = max((x1 - x0) * 0.02, 0.5)
        first.set_xlim(x0 - pad, x1 + pad)
    _plot_estimators(axes["estimators"], data, scale, unit)
    twins: dict[str, Any] = {}
    if "metric" in axes:
        assert metric is not None
        twins["metric"] = _plot_metric(axes["metric"], data, metric, unit)
    if "f_divergences" in axes:
        _plot_f(axes["f_divergences"], data, scale)
    _plot_drift(axes["drift"], data, drift_threshold)
    if "log_ratio" in axes:
        _plot_histograms(fig, axes["log_ratio"], fig.add_subplot(gs[names.index("log_ratio"), 1]), data)
    if "by_position" in axes:
        _plot_position(
            fig, axes["by_position"], fig.add_subplot(gs[names.index("by_position"), 1]), data, unit
        )
    if "rollout_kl" in axes:
        _plot_rollout_kl(axes["rollout_kl"], data)
    if "rollout_ratio" in axes:
        _plot_rollout_ratio(axes["rollout_ratio"], data)
    for i, name in enumerate(names):
        handles, labels = axes[name].get_legend_handles_labels()
        if name in twins:
            more = twins[name].get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        if handles:
            lax = fig.add_subplot(gs[i, 2])
            lax.axis("off")
            lax.legend(handles, labels, loc="upper left", fontsize=8, frameon=False, borderaxespad=0.0)
        if titles is not None:
            titles[name] = axes[name].get_title()
    for name in names[:-1]:
        axes[name].tick_params(labelbottom=False)
    axes[names[-1]].set_xlabel("trainer step (global_step)")
    head = title or f"klmonitor report: {data.run_dir}"
    facts = _facts(data, unit, metric)
    if dropped:
        facts.append(f"{sum(dropped.values())} value(s) not drawn (inf, NaN or beyond {PLOT_LIMIT:g})")
    fig.suptitle(f"{head}\n{'; '.join(facts)}", fontsize=11)
    return fig, axes


def render(
    data: RunData,
    out: str | os.PathLike[str],
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    scale: Scale = "auto",
    title: str | None = None,
    metric: str | None = None,
    titles: dict[str, str] | None = None,
) -> Path:
    """Draw the dashboard of ``data`` and save it to ``out`` (format from its extension).

    Args:
        data: what :func:`load_run` read.
        out: the image file to write (PNG by default; ``.svg`` and ``.pdf`` work too).
        drift_threshold: the drift rule's threshold, drawn as a dashed line.
        scale: y scale of the estimator panel: ``"auto"`` (log when all means are positive
            and span more than a factor 30), ``"linear"`` or ``"log"``.
        title: the figure title (default: the run directory).
        metric: the scalar drawn beside the KL (default: a reward the run logged, see
            :func:`user_metric`).
        titles: a dict the report fills with ``{panel: its title}`` (see :func:`panels`).

    Returns:
        The path written.

    Raises:
        ValueError: ``data`` holds no ``prefix`` scalars, ``metric`` was not logged, or
            matplotlib is missing.
    """
    fig, _ = _figure(data, drift_threshold, scale, title, metric, titles)
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as exc:  # a directory, a read-only place, an unknown extension
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot write the report to {path}: {why}") from None
    return path


def select_run(
    logdir: str | os.PathLike[str],
    run: str | os.PathLike[str] | None = None,
    prefix: str = "kl/",
    format: Format | Literal["auto"] = "auto",
) -> RunData:
    """Load the run a report is drawn from: ``run``, or the newest with ``prefix`` scalars.

    Args:
        logdir: a log directory (searched recursively for TensorBoard event files, CSVLogger
            ``metrics.csv`` files and W&B ``run-*.wandb`` files).
        run: a run directory or file, relative to ``logdir`` or absolute.
        prefix: the monitor's metric prefix.
        format: ``"auto"`` or the one format to read.

    Raises:
        FileNotFoundError: ``logdir`` (or ``run``) does not exist.
        ValueError: no run of that format, or none with ``prefix`` scalars.
    """
    where = Path(logdir) if run is None else Path(run) if Path(run).is_absolute() else Path(logdir) / run
    candidates = find_runs(where, format)
    for ref in candidates:
        data = load_run(ref, prefix)
        if data.scalars:
            return data
    raise ValueError(
        f"no {prefix} scalars in the {len(candidates)} run(s) under {where}; were they logged by "
        "klmonitor.KLMonitor (with this prefix) to a TensorBoardLogger, CSVLogger or WandbLogger?"
    )


def report(
    logdir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    run: str | os.PathLike[str] | None = None,
    prefix: str = "kl/",
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    scale: Scale = "auto",
    format: Format | Literal["auto"] = "auto",
    notes: list[str] | None = None,
    metric: str | None = None,
    titles: dict[str, str] | None = None,
) -> Path:
    """Render the dashboard of a run logged under ``logdir``; the ``klmonitor report`` command.

    Args:
        logdir: a log directory: TensorBoard, CSVLogger or W&B (searched recursively).
        out: the image to write; default ``logdir/klmonitor_report.png``.
        run: a run directory or file, relative to ``logdir`` or absolute; default the
            newest run that has ``prefix`` scalars.
        prefix: the monitor's metric prefix.
        drift_threshold: the drift rule's threshold, drawn as a dashed line.
        scale: y scale of the estimator panel (``"auto"``, ``"linear"``, ``"log"``).
        format: ``"auto"`` (detected from the files) or ``"tensorboard"``, ``"csv"``,
            ``"wandb"``.
        notes: a list the report appends remarks to, one line each (values it did not draw,
            the scalar drawn beside the KL).
        metric: the run's scalar drawn beside the KL (``--metric``); default: a reward-like
            scalar the run logged (:func:`user_metric`), if any.
        titles: a dict the report fills with ``{panel: its title}`` (see :func:`panels`).

    Returns:
        The path written.

    Raises:
        FileNotFoundError: ``logdir`` (or ``run``) does not exist.
        ValueError: no run of that format, or none with ``prefix`` scalars; a log file that
            cannot be read, is garbled or corrupt; an image that cannot be written; a
            ``metric`` the run did not log. The message names the file (or the metric).
    """
    root = Path(logdir)
    data = select_run(root, run=run, prefix=prefix, format=format)
    chosen = user_metric(data, metric)
    if notes is not None:
        if chosen is not None:
            words = "/".join(_METRIC_WORDS)
            how = (
                "--metric"
                if metric is not None
                else f"auto-detected: its name has '{words}'; --metric NAME picks another"
            )
            notes.append(f"drawn beside the KL: {chosen} ({how})")
        elif data.others:
            notes.append(
                "no reward-like scalar to draw beside the KL; --metric NAME picks one of: "
                + ", ".join(sorted(data.others)[:12])
            )
    dropped = unplottable(data)
    if dropped and notes is not None:
        notes.append(
            f"not drawn (inf, NaN or beyond {PLOT_LIMIT:g}), read from {data.run_dir}: "
            + ", ".join(f"{tag} ({n})" for tag, n in dropped.items())
        )
    if out is None:
        out = (root if root.is_dir() else root.parent) / REPORT_NAME
    return render(data, out, drift_threshold=drift_threshold, scale=scale, metric=chosen, titles=titles)
