"""Where a window's numbers and alerts go: TensorBoard, W&B, any Lightning/Fabric logger, a callable.

:func:`as_sink` turns what the user has into a :class:`Sink`:

==========================================================  ==========================================
target                                                      what it gets
==========================================================  ==========================================
``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX)  scalars, ±2 s.e. bands, custom-scalars layout,
                                                            log-ratio histogram, alerts as text
a ``TensorBoardLogger`` of ``lightning``,                   the same, through the logger
``pytorch_lightning`` or ``lightning.fabric``
a W&B run (``wandb.init()``) or a ``WandbLogger``           scalars against ``trainer/global_step``
                                                            (``define_metric``), histogram, ``run.alert``
any other logger with ``log_metrics(metrics, step)``        scalars (CSV, MLflow, Neptune, ...)
(CSV, MLflow, ...)
a callable ``fn(metrics: dict[str, float], step: int)``     scalars
==========================================================  ==========================================

Every call is guarded: a failing tracker (W&B offline or disabled, an alert API error, a
logger that raises) warns once per kind of failure and the other sinks keep working. No
framework is imported here: loggers are recognised by their class names and methods.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from klmonitor import table
from klmonitor.alerts import Alert
from klmonitor.summary import BAND_ESTIMATORS, BAND_SE, band_names, metric_name, stderr_bands

log = logging.getLogger("klmonitor")

__all__ = [
    "CallableSink",
    "LoggerSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "WarnOnce",
    "as_sink",
    "band_estimators",
    "make_sinks",
    "tensorboard_layout",
]

WarnFn = Callable[[str, str], None]
#: The step key W&B plots klmonitor's metrics against (as Lightning's WandbLogger logs it).
WANDB_STEP_KEY = "trainer/global_step"
#: W&B alerts are titled ``klmonitor: <rule>`` and their text starts ``Step <step>: ``
#: (``klmonitor report`` reads them back with these).
WANDB_ALERT_TITLE = "klmonitor: "
WANDB_ALERT_TEXT = "Step {step}: {message}"


def _class_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _has_methods(obj: Any, *names: str) -> bool:
    return all(callable(getattr(obj, n, None)) for n in names)


def _is_logger(obj: Any) -> bool:
    """A Lightning/Fabric-style logger: ``log_metrics`` and (usually) an ``experiment``."""
    return _has_methods(obj, "log_metrics")


class Sink:
    """Base class: one destination of a window's scalars, histogram and alerts.

    Subclasses override what their tracker can show; the base class ignores histograms and
    alerts. Build sinks with :func:`as_sink` (or subclass this for your own destination).

    Args:
        target: the object written to (a writer, a run, a logger, a callable).
        prefix: the metric prefix (``kl/``), for the names a sink adds itself.
        warn_once: ``warn_once(kind, message)``; failures are reported through it.
    """

    kind = "sink"

    def __init__(self, target: Any, prefix: str = "kl/", warn_once: WarnFn | None = None) -> None:
        self.target = target
        self.prefix = prefix
        self._warn_once: WarnFn = warn_once if warn_once is not None else WarnOnce()
        self.name = getattr(target, "__name__", None) or type(target).__name__

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # a tracker must never take training down
            self._warn_once(
                f"sink:{self.name}:{what}",
                f"klmonitor: {self.name} failed to {what} ({type(exc).__name__}: {exc}); "
                "the other sinks keep receiving everything. This warning is shown once.",
            )

    def setup(self, rule_names: Sequence[str]) -> None:
        """Once before the first write to this target: dashboards, metric definitions."""

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Write the window's scalars at ``step``."""

    def log_histogram(self, values: np.ndarray, step: int) -> None:
        """Write a histogram of log-ratio samples (when the tracker can)."""

    def log_alert(self, alert: Alert) -> None:
        """Record an alert (when the tracker can)."""

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """Record a small table (``name`` without the prefix), when the tracker can show one."""

    def finalize(self) -> None:
        """Flush at the end of training (the target stays open: it is the user's)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class CallableSink(Sink):
    """Scalars to ``fn(metrics, step)``."""

    kind = "callable"

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:  # noqa: D102
        self._guard("take the metrics", lambda: self.target(dict(metrics), step))


class LoggerSink(Sink):
    """Scalars to any logger through its public ``log_metrics(metrics, step=step)``."""

    kind = "logger"

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:  # noqa: D102
        self._guard("log metrics", lambda: self.target.log_metrics(dict(metrics), step=step))

    def finalize(self) -> None:  # noqa: D102
        def flush() -> None:
            # Inside the guard: a dead tracker's `experiment` property may raise anything.
            # Loggers without an experiment object (custom ones) have nothing to flush.
            if not hasattr(type(self.target), "experiment"):
                return
            fn = getattr(self.target.experiment, "flush", None)
            if callable(fn):
                fn()

        self._guard("flush", flush)


class TensorBoardSink(LoggerSink):
    """TensorBoard: scalars, ±2 s.e. bands, a custom-scalars layout, a log-ratio histogram, alert text.

    ``target`` is a ``SummaryWriter`` or a ``TensorBoardLogger`` (either Lightning package or
    Fabric); a logger's scalars go through its ``log_metrics``, the extras through its writer.
    """

    kind = "tensorboard"

    def _writer(self) -> Any:
        return self.target.experiment if _is_logger(self.target) else self.target

    def __init__(self, target: Any, prefix: str = "kl/", warn_once: WarnFn | None = None) -> None:
        super().__init__(target, prefix, warn_once)
        self._seen: set[str] = set()
        self._charts: frozenset[str] = frozenset()

    def layout(self, present: Collection[str] | None = None) -> dict[str, Any]:
        """The custom-scalars layout (tab *Custom Scalars*): see :func:`tensorboard_layout`."""
        return tensorboard_layout(self.prefix, present)

    def _write_layout(self, present: Collection[str]) -> None:
        layout = self.layout(present)
        charts = frozenset(title for charts in layout.values() for title in charts)
        if charts == self._charts:
            return
        self._charts = charts
        self._guard("write the custom-scalars layout", lambda: self._writer().add_custom_scalars(layout))

    def setup(self, rule_names: Sequence[str]) -> None:  # noqa: D102
        # A new target (or a second fit): the layout is written afresh, the core charts first.
        self._seen, self._charts = set(), frozenset()
        self._write_layout(self._seen)

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:  # noqa: D102
        self._seen.update(metrics)
        self._write_layout(self._seen)  # again when a category's first numbers arrive
        scalars = {
            **metrics,
            **stderr_bands(dict(metrics), self.prefix, band_estimators(metrics, self.prefix)),
        }
        if _is_logger(self.target):
            super().log_scalars(scalars, step)
            return

        def write() -> None:
            writer = self._writer()
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)

        self._guard("log metrics", write)

    def log_histogram(self, values: np.ndarray, step: int) -> None:  # noqa: D102
        if values.size:
            tag = metric_name(self.prefix, "log_ratio")
            self._guard("log a histogram", lambda: self._writer().add_histogram(tag, values, step))

    def log_alert(self, alert: Alert) -> None:  # noqa: D102
        tag = metric_name(self.prefix, "alerts")
        self._guard("log an alert", lambda: self._writer().add_text(tag, alert.text(), alert.step))

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:  # noqa: D102
        text = markdown_table(columns, rows)
        tag = metric_name(self.prefix, name)
        self._guard(f"log the {name} table", lambda: self._writer().add_text(tag, text, step))

    def finalize(self) -> None:  # noqa: D102
        if _is_logger(self.target):
            super().finalize()
        else:
            self._guard("flush", lambda: self.target.flush())


class WandbSink(LoggerSink):
    """Weights & Biases: scalars against ``trainer/global_step``, a histogram, ``run.alert``.

    ``target`` is a run (what ``wandb.init`` returns) or a ``WandbLogger``.

    Args:
        alert_wait_s: W&B's minimum seconds between two alerts with the same title.
    """

    kind = "wandb"

    def __init__(
        self, target: Any, prefix: str = "kl/", warn_once: WarnFn | None = None, alert_wait_s: float = 300.0
    ) -> None:
        super().__init__(target, prefix, warn_once)
        self.alert_wait_s = alert_wait_s

    def _run(self) -> Any:
        return self.target.experiment if _is_logger(self.target) else self.target

    def setup(self, rule_names: Sequence[str]) -> None:  # noqa: D102
        def define() -> None:
            run = self._run()
            run.define_metric(WANDB_STEP_KEY)
            run.define_metric(metric_name(self.prefix, "*"), step_metric=WANDB_STEP_KEY)

        self._guard("define metrics", define)

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:  # noqa: D102
        if _is_logger(self.target):  # WandbLogger adds trainer/global_step itself
            super().log_scalars(metrics, step)
        else:
            self._guard("log metrics", lambda: self._run().log({**metrics, WANDB_STEP_KEY: step}))

    def log_histogram(self, values: np.ndarray, step: int) -> None:  # noqa: D102
        if not values.size:
            return

        def write() -> None:
            import wandb

            hist = wandb.Histogram(np_histogram=np.histogram(values, bins=64))
            self._run().log({metric_name(self.prefix, "log_ratio"): hist, WANDB_STEP_KEY: step})

        self._guard("log a histogram", write)

    def log_alert(self, alert: Alert) -> None:  # noqa: D102
        def send() -> None:
            self._run().alert(
                title=f"{WANDB_ALERT_TITLE}{alert.rule}"[:63],
                text=WANDB_ALERT_TEXT.format(step=alert.step, message=alert.message),
                level=alert.level.value.upper(),
                wait_duration=self.alert_wait_s,
            )

        self._guard("send a W&B alert", send)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:  # noqa: D102
        def write() -> None:
            import wandb

            table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            self._run().log({metric_name(self.prefix, name): table, WANDB_STEP_KEY: step})

        self._guard(f"log the {name} table", write)

    def finalize(self) -> None:  # noqa: D102
        if _is_logger(self.target):
            super().finalize()
        # A run the user passed stays open and unflushed: wandb flushes it on finish().


def band_estimators(metrics: Collection[str], prefix: str = "kl/") -> tuple[str, ...]:
    """The estimators that get bands: ``k1``, ``k3`` and each f-divergence in ``metrics`` (``f/<name>``).

    >>> band_estimators(["kl/k3/mean", "kl/f/chi2/mean", "kl/f/tv/stderr"])
    ('k1', 'k3', 'f/chi2')
    """
    return (*BAND_ESTIMATORS, *(f"f/{name}" for name in _f_names(metrics, prefix)))


def _f_names(metrics: Collection[str], prefix: str) -> list[str]:
    """The f-divergences whose means are in ``metrics``: the table's order, then a user's by name."""
    pattern = re.compile(rf"^{re.escape(prefix)}f/(?P<name>[^/]+)/mean$")
    found = {m["name"] for tag in metrics if (m := pattern.match(tag))}
    return [n for n in table.F_NAMES if n in found] + sorted(found - set(table.F_NAMES))


def _exact(tag: str) -> str:
    """A multiline chart's tag regex that matches ``tag`` alone (TensorBoard anchors only the start)."""
    return re.escape(tag) + "$"


def tensorboard_layout(prefix: str = "kl/", present: Collection[str] | None = None) -> dict[str, Any]:
    """The custom-scalars layout (``SummaryWriter.add_custom_scalars``) for the metrics ``present``.

    TensorBoard colours a chart's series by run and tells the tags of one run apart by marker,
    naming each ``tag (run)``; so every chart here holds few series, the KL estimators'
    bands get a margin chart each, and every title says what its series are. The bands are
    ``kl/band/<est>_{lower,upper}``: mean ± :data:`~klmonitor.summary.BAND_SE` standard errors
    of the mean (:func:`~klmonitor.summary.stderr_bands`), as in ``klmonitor report``.

    Args:
        prefix: the metric prefix.
        present: the metric names logged so far. A category's charts are included only when
            their numbers are there (diagnostics, the position profile, the rollout engine, the
            f-divergences); the KL estimators always. ``None``: every chart, the f-divergences
            of the table.

    Returns:
        ``{category: {chart title: ["Multiline", [tag regex, ...]] or ["Margin", [mean, lower, upper]]}}``.

    >>> sorted(tensorboard_layout("kl/", present=["kl/k3/mean", "kl/f/chi2/mean"]))
    ['klmonitor: KL(policy ‖ reference)', 'klmonitor: f-divergences D_f(p ‖ q), p = reference, q = policy']
    >>> tensorboard_layout("kl/", present=[])["klmonitor: KL(policy ‖ reference)"]["k3 mean ± 2 s.e. (unbiased, never negative)"]
    ['Margin', ['kl/k3/mean', 'kl/band/k3_lower', 'kl/band/k3_upper']]
    """

    def m(name: str) -> str:
        return metric_name(prefix, name)

    def shown(*names: str) -> bool:
        return present is None or any(m(n) in present for n in names)

    se = f"{BAND_SE:g} s.e."
    kl: dict[str, Any] = {
        "window means: k1, k2, k3, cv (headline) estimate KL(policy ‖ ref); kl_pq is KL(ref ‖ policy)": [
            "Multiline",
            [_exact(m(f"{n}/mean")) for n in ("k1", "k2", "k3", "cv", "kl_pq")],
        ],
    }
    for est, what in (("k3", "unbiased, never negative"), ("k1", "unbiased, any sign")):
        lower, upper = band_names(prefix, est)
        kl[f"{est} mean ± {se} ({what})"] = ["Margin", [m(f"{est}/mean"), lower, upper]]
    layout: dict[str, Any] = {"klmonitor: KL(policy ‖ reference)": kl}

    diagnostics: dict[str, Any] = {}
    if shown("drift_k2_k3"):
        diagnostics["drift: (k2 − k3) / k3, the policy leaving the quadratic region"] = [
            "Multiline",
            [_exact(m("drift_k2_k3"))],
        ]
    if shown("r_minus_1/z"):
        diagnostics["sampling check: mean of r − 1 in standard errors (0 when sampled from the policy)"] = [
            "Multiline",
            [_exact(m("r_minus_1/z"))],
        ]
    if shown("nonfinite", "extreme"):
        diagnostics["bad tokens per window: nonfinite, extreme"] = [
            "Multiline",
            [_exact(m("nonfinite")), _exact(m("extreme"))],
        ]
    if shown("ess_fraction"):
        diagnostics["importance-sampling ESS fraction (1: reference and policy agree)"] = [
            "Multiline",
            [_exact(m("ess_fraction"))],
        ]
    by_position = re.escape(m("by_position/")) + r"[^/]+/k3$"
    if present is None or any(re.match(by_position, t) for t in present):
        diagnostics["k3 by position in the sequence (one series per bucket of token indices)"] = [
            "Multiline",
            [by_position],
        ]
    if diagnostics:
        layout["klmonitor: diagnostics"] = diagnostics

    if shown("rollout/k3/mean", "rollout/ratio/mean"):
        layout["klmonitor: rollout engine vs trainer"] = {
            "KL(rollout ‖ trainer): k3 and k1 window means": [
                "Multiline",
                [_exact(m("rollout/k3/mean")), _exact(m("rollout/k1/mean"))],
            ],
            "ratio π_trainer / π_rollout per token: window min, mean, max": [
                "Multiline",
                [_exact(m(f"rollout/ratio/{s}")) for s in ("min", "mean", "max")],
            ],
        }

    f_names = list(table.F_NAMES) if present is None else _f_names(present, prefix)
    if f_names:
        f_charts: dict[str, Any] = {}
        for name in f_names:
            try:
                what = table.entry(name).estimates
            except KeyError:
                what = "a user's FDivergence"
            lower, upper = band_names(prefix, f"f/{name}")
            f_charts[f"{name} mean ± {se}: {what}"] = ["Margin", [m(f"f/{name}/mean"), lower, upper]]
        layout["klmonitor: f-divergences D_f(p ‖ q), p = reference, q = policy"] = f_charts
    return layout


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (TensorBoard's text tab renders it); ``|`` in cells is escaped.

    >>> print(markdown_table(["id", "kl"], [[3, 0.5]]))
    | id | kl |
    |---|---|
    | 3 | 0.5 |
    """

    def cell(x: Any) -> str:
        text = f"{x:.4g}" if isinstance(x, float) else str(x)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _is_summary_writer(obj: Any) -> bool:
    return _has_methods(obj, "add_scalar", "add_histogram", "add_text", "add_custom_scalars")


def _is_wandb_run(obj: Any) -> bool:
    return type(obj).__module__.startswith("wandb") and _has_methods(obj, "log", "define_metric", "alert")


def as_sink(
    target: Any, prefix: str = "kl/", warn_once: WarnFn | None = None, alert_wait_s: float = 300.0
) -> Sink:
    """The :class:`Sink` for ``target`` (see the module's table); a :class:`Sink` is returned as is.

    Raises:
        TypeError: ``target`` is none of the accepted kinds.

    >>> seen = []
    >>> sink = as_sink(lambda metrics, step: seen.append((step, metrics)))
    >>> sink.log_scalars({"kl/k3/mean": 0.1}, step=5); seen
    [(5, {'kl/k3/mean': 0.1})]
    """
    if isinstance(target, Sink):
        return target
    names = _class_names(target)
    if "TensorBoardLogger" in names or (not _is_logger(target) and _is_summary_writer(target)):
        return TensorBoardSink(target, prefix, warn_once)
    if "WandbLogger" in names or _is_wandb_run(target):
        return WandbSink(target, prefix, warn_once, alert_wait_s)
    if _is_logger(target):
        return LoggerSink(target, prefix, warn_once)
    if callable(target):
        return CallableSink(target, prefix, warn_once)
    raise TypeError(
        f"sinks must hold SummaryWriters, W&B runs, Lightning/Fabric loggers (anything with "
        f"log_metrics), callables fn(metrics, step) or klmonitor.sinks.Sink objects; got "
        f"{type(target).__name__} {target!r}"
    )


def make_sinks(
    targets: Any, prefix: str = "kl/", warn_once: WarnFn | None = None, alert_wait_s: float = 300.0
) -> list[Sink]:
    """:func:`as_sink` of each target; ``None`` is no sink, a single target is a list of one."""
    if targets is None:
        return []
    if isinstance(targets, str | bytes) or not isinstance(targets, Sequence):
        targets = [targets]
    return [as_sink(t, prefix, warn_once, alert_wait_s) for t in targets]


class WarnOnce:
    """``warn_once(kind, message)``: a ``UserWarning`` the first time each ``kind`` is seen.

    A class rather than a closure so the monitor holding it can be pickled (spawn launchers).
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, kind: str, message: str) -> None:
        """Warn with ``message`` unless a warning of this ``kind`` was already given."""
        if kind in self.seen:
            return
        self.seen.add(kind)
        warnings.warn(message, UserWarning, stacklevel=3)
