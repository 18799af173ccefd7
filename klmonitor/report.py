"""``klmonitor report``: a PNG dashboard of a run from its TensorBoard event files.

The event files are read with TensorBoard's own ``EventAccumulator``; the figure is drawn
with matplotlib's Agg backend (no display needed). It shows the k1/k2/k3 means with
mean ± std bands against the trainer step, the k2-k3 drift signal with its alert threshold
and the alerts the monitor fired, and, when the run logged it, the distribution of the
log-ratio over time.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["AlertMark", "RunData", "find_runs", "load_run", "parse_alert", "render", "report", "select_run"]

Scale = Literal["auto", "linear", "log"]
DEFAULT_DRIFT_THRESHOLD = 0.1
"""The ``drift`` rule's default threshold on ``(mean k2 - mean k3) / mean k3``."""
REPORT_NAME = "klmonitor_report.png"
_EVENTS = "events.out.tfevents.*"
_ALERT_RE = re.compile(r"\*\*(?P<rule>[^*]+)\*\*\s*\((?P<level>\w+)\)\s*at step\s*(?P<step>-?\d+)")
_LEVEL_COLORS = {"info": "tab:blue", "warn": "tab:orange", "error": "tab:red"}
_EST_COLORS = {"k1": "tab:blue", "k2": "tab:orange", "k3": "tab:green"}


@dataclass
class AlertMark:
    """An alert read back from a run's ``alerts`` text entries."""

    step: int
    rule: str
    level: str
    text: str


@dataclass
class Histogram:
    """One logged log-ratio histogram: bucket edges (``len(counts) + 1``) and counts."""

    step: int
    edges: np.ndarray
    counts: np.ndarray
    lo: float
    hi: float


@dataclass
class RunData:
    """What :func:`load_run` read from one run directory.

    Attributes:
        run_dir: the directory holding the event files.
        prefix: the metric prefix (``kl/`` by default).
        scalars: ``{tag: (steps, values)}`` of the tags under ``prefix``, sorted by step
            (for a step logged twice, e.g. after a resume, the last value is kept).
        alerts: the alerts, by step.
        histograms: the log-ratio histograms, by step.
    """

    run_dir: Path
    prefix: str
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    alerts: list[AlertMark] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(steps, values)`` of ``prefix + name``, or ``None`` when not logged."""
        return self.scalars.get(self.prefix + name)


def parse_alert(text: str, step: int) -> AlertMark:
    """Read an alert back from its TensorBoard text (``**rule** (level) at step N: message``).

    Text in another shape is kept as an alert of rule ``"alert"`` at the entry's step.

    >>> parse_alert("**drift** (warn) at step 120: k2 and k3 disagree", step=120)
    AlertMark(step=120, rule='drift', level='warn', text='k2 and k3 disagree')
    """
    m = _ALERT_RE.search(text)
    if m is None:
        return AlertMark(step, "alert", "warn", text.strip())
    message = text[m.end() :].lstrip(": ").strip()
    return AlertMark(int(m["step"]), m["rule"].strip(), m["level"].lower(), message)


def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Directories under ``logdir`` (itself included) that hold event files, newest first.

    A run's age is the modification time of its newest event file.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
        ValueError: no event files under it.
    """
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; pass the --logdir of a run logged to TensorBoard")
    if root.is_file():
        files = [root] if root.match(_EVENTS) else []
    else:
        files = [f for f in root.rglob(_EVENTS) if f.is_file()]
    if not files:
        raise ValueError(
            f"no TensorBoard event files under {root}; log with a TensorBoardLogger "
            f"(e.g. `klmonitor demo --logdir {root}`) and point the report at that directory"
        )
    newest: dict[Path, float] = {}
    for f in files:
        newest[f.parent] = max(newest.get(f.parent, -math.inf), f.stat().st_mtime)
    return sorted(newest, key=lambda d: (newest[d], str(d)), reverse=True)


def _decode_text(proto: Any) -> list[str]:
    from tensorboard.util import tensor_util

    arr = np.asarray(tensor_util.make_ndarray(proto)).reshape(-1)
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr]


def _histogram(step: int, value: Any) -> Histogram | None:
    limits = np.asarray(value.bucket_limit, dtype=np.float64)
    counts = np.asarray(value.bucket, dtype=np.float64)
    if counts.size == 0 or counts.sum() <= 0 or not (math.isfinite(value.min) and math.isfinite(value.max)):
        return None
    lo, hi = float(value.min), float(value.max)
    # Bucket i spans (limit[i-1], limit[i]]; the outer buckets are cut at the data's min and max.
    edges = np.concatenate([[lo], np.clip(limits, lo, hi)])
    return Histogram(step, edges, counts, lo, hi)


def load_run(run_dir: str | os.PathLike[str], prefix: str = "kl/") -> RunData:
    """Read a run's ``prefix`` scalars, alert texts and log-ratio histograms.

    Args:
        run_dir: a directory holding event files (not searched recursively).
        prefix: the monitor's metric prefix.

    Returns:
        The :class:`RunData` (its ``scalars`` may be empty).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    data = RunData(Path(run_dir), prefix)
    for tag in tags.get("scalars", []):
        if not tag.startswith(prefix):
            continue
        by_step = {int(e.step): float(e.value) for e in acc.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        data.scalars[tag] = (steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64))
    alert_tag = f"{prefix}alerts"
    for tag in tags.get("tensors", []):
        # TensorBoard's text plugin may suffix the tag (e.g. "kl/alerts/text_summary").
        if tag == alert_tag or tag.startswith(alert_tag + "/"):
            for ev in acc.Tensors(tag):
                for text in _decode_text(ev.tensor_proto):
                    data.alerts.append(parse_alert(text, int(ev.step)))
    data.alerts.sort(key=lambda a: a.step)
    hist_tag = f"{prefix}log_ratio"
    if hist_tag in tags.get("histograms", []):
        by_step_h: dict[int, Histogram] = {}
        for hev in acc.Histograms(hist_tag):
            h = _histogram(int(hev.step), hev.histogram_value)
            if h is not None:
                by_step_h[h.step] = h
        data.histograms = [by_step_h[s] for s in sorted(by_step_h)]
    return data


def _use_log(means: list[np.ndarray], scale: Scale) -> bool:
    if scale != "auto":
        return scale == "log"
    # k2 and k3 are never negative; k1 can be, and is simply not drawn where it is on a log axis.
    values = np.concatenate(means) if means else np.array([])
    values = values[np.isfinite(values) & (values > 0)]
    if values.size < 2:
        return False
    return bool(values.max() / values.min() >= 30)


def _alert_lines(ax: Any, alerts: list[AlertMark]) -> None:
    for a in alerts:
        ax.axvline(a.step, color=_LEVEL_COLORS.get(a.level, "tab:red"), lw=0.9, ls=":", alpha=0.8, zorder=1)


def _plot_estimators(ax: Any, data: RunData, scale: Scale, unit: str) -> None:
    series = {n: data.series(f"{n}/mean") for n in ("k1", "k2", "k3")}
    log = _use_log([got[1] for n, got in series.items() if got is not None and n != "k1"], scale)
    # The log axis' floor comes from k2/k3 (never negative); k1 near 0 would stretch it for nothing.
    nonneg = [got[1] for n, got in series.items() if got is not None and n != "k1"]
    positive = np.concatenate([m[m > 0] for m in nonneg] or [np.ones(1)])
    floor = float(positive.min()) / 3 if positive.size else 1e-6
    top = -math.inf
    for name, got in series.items():
        if got is None:
            continue
        steps, mean = got
        color = _EST_COLORS[name]
        std = data.series(f"{name}/std")
        if std is not None:
            common, i_m, i_s = np.intersect1d(steps, std[0], return_indices=True)
            lower = mean[i_m] - std[1][i_s]
            upper = mean[i_m] + std[1][i_s]
            top = max(top, float(np.nanmax(upper)) if upper.size else top)
            if log:
                lower = np.maximum(lower, floor)
            ax.fill_between(common, lower, upper, color=color, alpha=0.1, lw=0, label=f"{name} mean ± std")
            ax.plot(common, upper, color=color, lw=0.6, alpha=0.5)
        shown = np.where(mean > 0, mean, np.nan) if log else mean  # k1 < 0 has no place on a log axis
        ax.plot(steps, shown, color=color, lw=1.8, marker="o", ms=2.5, label=f"{name} mean")
    _alert_lines(ax, data.alerts)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(floor, max(top, float(positive.max())) * 1.5)
    ax.set_title("KL(policy ‖ reference) estimates: window mean, and mean ± std of the per-sample values")
    ax.set_ylabel(f"KL (nats {unit}){', log scale' if log else ''}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", ncol=3, fontsize=8, framealpha=0.85)


def _plot_drift(ax: Any, data: RunData, threshold: float) -> None:
    got = data.series("drift_k2_k3")
    if got is not None:
        steps, drift = got
        ax.plot(steps, drift, color="tab:purple", lw=1.8, marker="o", ms=2.5, label="drift (k2 − k3) / k3")
    ax.axhline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.axhline(0, color="grey", lw=0.6)
    _alert_lines(ax, data.alerts)
    seen: set[tuple[str, str]] = set()
    logged = set(got[0].tolist()) if got is not None else set()
    for a in data.alerts:
        # A drift alert sits on the drift curve; other rules' alerts along the top edge.
        if a.rule == "drift" and got is not None and a.step in logged:
            y, transform, dy = float(got[1][int(np.searchsorted(got[0], a.step))]), ax.transData, 6
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
            ax.annotate(
                a.rule, (a.step, y), xycoords=transform, xytext=(5, dy), textcoords="offset points", fontsize=8,
                color=color,
            )  # fmt: skip
        seen.add(key)
    ax.set_title("Drift: relative k2 − k3 gap (the policy has left the quadratic region above the threshold)")
    ax.set_ylabel("relative gap (unitless)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.85)


def _regrid(h: Histogram, grid: np.ndarray) -> np.ndarray:
    """Counts of ``h`` on the bins ``grid``, each bucket's count spread evenly over its width."""
    cum = np.concatenate([[0.0], np.cumsum(h.counts)])
    if h.hi == h.lo:  # every value equal: one spike
        cdf = np.where(grid >= h.lo, cum[-1], 0.0)
    else:
        cdf = np.interp(grid, h.edges, cum, left=0.0, right=cum[-1])
    return np.diff(cdf)


def _plot_histograms(fig: Any, ax: Any, data: RunData) -> None:
    hists = data.histograms
    # The y range holds 99.8% of all tokens logged, so that a few outliers do not flatten it.
    lo_all = min(h.lo for h in hists)
    hi_all = max(h.hi for h in hists)
    fine = np.linspace(lo_all, hi_all, 2001) if hi_all > lo_all else np.array([lo_all - 0.5, hi_all + 0.5])
    total = sum((_regrid(h, fine) / max(h.counts.sum(), 1.0) for h in hists), np.zeros(fine.size - 1))
    cdf = np.cumsum(total) / max(total.sum(), 1e-12)
    lo = float(fine[int(np.searchsorted(cdf, 0.001))])
    hi = float(fine[min(int(np.searchsorted(cdf, 0.999)) + 1, fine.size - 1)])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges_y = np.linspace(lo, hi, 101)
    steps = np.array([h.step for h in hists], dtype=np.float64)
    if steps.size == 1:
        edges_x = np.array([steps[0] - 0.5, steps[0] + 0.5])
    else:
        mid = (steps[1:] + steps[:-1]) / 2
        edges_x = np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])
    grid = np.zeros((edges_y.size - 1, steps.size))
    for j, h in enumerate(hists):
        grid[:, j] = _regrid(h, edges_y) / max(h.counts.sum(), 1.0)
    from matplotlib.colors import LogNorm

    shown = grid[grid > 1e-5]
    norm = LogNorm(vmin=max(float(shown.min()), 1e-4), vmax=float(shown.max())) if shown.size else None
    mesh = ax.pcolormesh(edges_x, edges_y, np.where(grid > 1e-5, grid, np.nan), cmap="viridis", norm=norm)
    fig.colorbar(mesh, ax=ax, label="fraction of tokens per bin", pad=0.01)
    ax.axhline(0, color="grey", lw=0.6, alpha=0.7)
    _alert_lines(ax, data.alerts)
    ax.set_title("Distribution of the per-token log-ratio log p_ref − log p_policy (a sample of each window)")
    ax.set_ylabel("log-ratio (nats)")


def render(
    data: RunData,
    out: str | os.PathLike[str],
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    scale: Scale = "auto",
    title: str | None = None,
) -> Path:
    """Draw the dashboard of ``data`` and save it to ``out`` (format from its extension).

    Args:
        data: what :func:`load_run` read.
        out: the image file to write (PNG by default; ``.svg`` and ``.pdf`` work too).
        drift_threshold: the drift rule's threshold, drawn as a dashed line.
        scale: y scale of the estimator panel: ``"auto"`` (log when all means are positive
            and span more than a factor 30), ``"linear"`` or ``"log"``.
        title: the figure title (default: the run directory).

    Returns:
        The path written.

    Raises:
        ValueError: ``data`` holds no ``prefix`` scalars, or matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is in the [plot] extra
        raise ValueError("klmonitor report needs matplotlib: pip install 'klmonitor[plot]'") from exc
    if not data.scalars:
        raise ValueError(f"no {data.prefix} scalars in {data.run_dir}")
    if scale not in ("auto", "linear", "log"):
        raise ValueError(f"scale must be 'auto', 'linear' or 'log', got {scale!r}")
    unit = "per sequence" if data.series("sequences") is not None else "per token"
    rows = 3 if data.histograms else 2
    fig = Figure(figsize=(12, 3.6 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, height_ratios=[1.3, 1.0] + ([1.0] if rows == 3 else []))
    _plot_estimators(axes[0], data, scale, unit)
    _plot_drift(axes[1], data, drift_threshold)
    if rows == 3:
        _plot_histograms(fig, axes[2], data)
    axes[-1].set_xlabel("trainer step (global_step)")

    head = title or f"klmonitor report: {data.run_dir}"
    k3, drift = data.series("k3/mean"), data.series("drift_k2_k3")
    facts = []
    if k3 is not None and k3[0].size:
        std = data.series("k3/std")
        spread = f" ± {std[1][-1]:.3g}" if std is not None and std[0].size and std[0][-1] == k3[0][-1] else ""
        facts.append(f"last step {int(k3[0][-1])}: k3 = {k3[1][-1]:.3g}{spread} nats {unit}")
    if drift is not None and drift[0].size:
        facts.append(f"drift {drift[1][-1]:.3g}")
    rules = sorted({a.rule for a in data.alerts})
    facts.append(f"{len(data.alerts)} alert(s){': ' + ', '.join(rules) if rules else ''}")
    fig.suptitle(f"{head}\n{'; '.join(facts)}", fontsize=11)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def select_run(
    logdir: str | os.PathLike[str], run: str | os.PathLike[str] | None = None, prefix: str = "kl/"
) -> RunData:
    """Load the run a report is drawn from: ``run``, or the newest with ``prefix`` scalars.

    Args:
        logdir: a TensorBoard log directory (searched recursively for event files).
        run: a run directory, relative to ``logdir`` or absolute.
        prefix: the monitor's metric prefix.

    Raises:
        FileNotFoundError: ``logdir`` (or ``run``) does not exist.
        ValueError: no event files, or no run with ``prefix`` scalars.
    """
    where = Path(logdir) if run is None else Path(run) if Path(run).is_absolute() else Path(logdir) / run
    candidates = find_runs(where)
    for run_dir in candidates:
        data = load_run(run_dir, prefix)
        if data.scalars:
            return data
    raise ValueError(
        f"no {prefix} scalars in the {len(candidates)} run(s) with event files under {where}; "
        "were they logged by klmonitor.KLMonitor (with this prefix) to a TensorBoardLogger?"
    )


def report(
    logdir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    run: str | os.PathLike[str] | None = None,
    prefix: str = "kl/",
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    scale: Scale = "auto",
) -> Path:
    """Render the dashboard of a run logged under ``logdir``; the ``klmonitor report`` command.

    Args:
        logdir: a TensorBoard log directory (searched recursively for event files).
        out: the image to write; default ``logdir/klmonitor_report.png``.
        run: a run directory, relative to ``logdir`` or absolute; default the newest run
            that has ``prefix`` scalars.
        prefix: the monitor's metric prefix.
        drift_threshold: the drift rule's threshold, drawn as a dashed line.
        scale: y scale of the estimator panel (``"auto"``, ``"linear"``, ``"log"``).

    Returns:
        The path written.

    Raises:
        FileNotFoundError: ``logdir`` (or ``run``) does not exist.
        ValueError: no event files, or no run with ``prefix`` scalars.
    """
    root = Path(logdir)
    data = select_run(root, run=run, prefix=prefix)
    if out is None:
        out = (root if root.is_dir() else root.parent) / REPORT_NAME
    return render(data, out, drift_threshold=drift_threshold, scale=scale)
