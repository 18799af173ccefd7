"""Where numbers and alerts go: any Lightning logger, plus TensorBoard and W&B extras.

A sink wraps one Lightning logger. Every call is guarded: a failing tracker (W&B offline or
disabled, an alert API error, a logger whose ``log_metrics`` raises) warns once per kind of
failure and the other sinks keep working. Sinks run on global rank 0 only (the callback's
job); they never touch tensors on a device.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from klmonitor.alerts import Alert

log = logging.getLogger("klmonitor")

__all__ = ["LoggerSink", "TensorBoardSink", "WandbSink", "WarnOnce", "make_sinks"]


class LoggerSink:
    """Scalars to any Lightning logger through its public ``log_metrics``."""

    kind = "logger"

    def __init__(self, logger: Any, prefix: str, warn_once: Callable[[str, str], None]) -> None:
        self.logger = logger
        self.prefix = prefix
        self._warn_once = warn_once
        self.name = type(logger).__name__

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # a tracker must never take training down
            self._warn_once(
                f"sink:{self.name}:{what}",
                f"klmonitor: {self.name} failed to {what} ({type(exc).__name__}: {exc}); "
                "the other loggers keep receiving everything. This warning is shown once.",
            )

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Write the window's scalars at ``step``."""
        self._guard("log metrics", lambda: self.logger.log_metrics(dict(metrics), step=step))

    def log_histogram(self, values: np.ndarray, step: int) -> None:
        """Write a histogram of log-ratio samples (not every logger can)."""

    def log_alert(self, alert: Alert) -> None:
        """Record an alert (not every logger can)."""

    def setup(self, rules_meta: Sequence[str]) -> None:
        """Once, before the first write: dashboards, metric definitions."""

    def finalize(self) -> None:
        """Flush at the end of training."""

        def flush() -> None:
            # Inside the guard: a dead tracker's `experiment` property may raise anything.
            # Loggers without an experiment object (custom ones) have nothing to flush.
            if not hasattr(type(self.logger), "experiment"):
                return
            fn = getattr(self.logger.experiment, "flush", None)
            if callable(fn):
                fn()

        self._guard("flush", flush)


class TensorBoardSink(LoggerSink):
    """TensorBoard: scalars, a custom-scalars layout, a log-ratio histogram, alerts as text."""

    kind = "tensorboard"

    def setup(self, rules_meta: Sequence[str]) -> None:  # noqa: D102
        p = self.prefix
        layout = {
            "klmonitor": {
                "KL estimators (mean)": [
                    "Multiline",
                    [f"{p}k1/mean", f"{p}k2/mean", f"{p}k3/mean", f"{p}kl_pq/mean"],
                ],
                "k3 mean ± std": ["Margin", [f"{p}k3/mean", f"{p}band/k3_lower", f"{p}band/k3_upper"]],
                "k1 mean ± std": ["Margin", [f"{p}k1/mean", f"{p}band/k1_lower", f"{p}band/k1_upper"]],
                "k2 vs k3 drift": ["Multiline", [f"{p}drift_k2_k3"]],
                "sampling check: r - 1 in standard errors": ["Multiline", [f"{p}r_minus_1/z"]],
                "bad tokens": ["Multiline", [f"{p}nonfinite", f"{p}clamped"]],
            }
        }
        self._guard(
            "write the custom-scalars layout", lambda: self.logger.experiment.add_custom_scalars(layout)
        )

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:  # noqa: D102
        super().log_scalars(metrics, step)
        p = self.prefix
        bands: dict[str, float] = {}
        for est in ("k1", "k3"):
            mean, std = metrics.get(f"{p}{est}/mean"), metrics.get(f"{p}{est}/std")
            if mean is not None and std is not None:
                bands[f"{p}band/{est}_lower"] = mean - std
                bands[f"{p}band/{est}_upper"] = mean + std
        if bands:

            def write() -> None:
                for tag, value in bands.items():
                    self.logger.experiment.add_scalar(tag, value, step)

            self._guard("log the std bands", write)

    def log_histogram(self, values: np.ndarray, step: int) -> None:  # noqa: D102
        if values.size:
            self._guard(
                "log a histogram",
                lambda: self.logger.experiment.add_histogram(f"{self.prefix}log_ratio", values, step),
            )

    def log_alert(self, alert: Alert) -> None:  # noqa: D102
        text = f"**{alert.rule}** ({alert.level.value}) at step {alert.step}: {alert.message}"
        self._guard(
            "log an alert", lambda: self.logger.experiment.add_text(f"{self.prefix}alerts", text, alert.step)
        )


class WandbSink(LoggerSink):
    """Weights & Biases: scalars against the trainer step, a histogram, ``run.alert``."""

    kind = "wandb"

    def __init__(
        self,
        logger: Any,
        prefix: str,
        warn_once: Callable[[str, str], None],
        alert_wait_s: float = 300.0,
    ) -> None:
        super().__init__(logger, prefix, warn_once)
        self.alert_wait_s = alert_wait_s

    def setup(self, rules_meta: Sequence[str]) -> None:  # noqa: D102
        def define() -> None:
            run = self.logger.experiment
            run.define_metric("trainer/global_step")
            run.define_metric(f"{self.prefix}*", step_metric="trainer/global_step")

        self._guard("define metrics", define)

    def log_histogram(self, values: np.ndarray, step: int) -> None:  # noqa: D102
        if not values.size:
            return

        def write() -> None:
            import wandb

            self.logger.experiment.log(
                {
                    f"{self.prefix}log_ratio": wandb.Histogram(np_histogram=np.histogram(values, bins=64)),
                    "trainer/global_step": step,
                }
            )

        self._guard("log a histogram", write)

    def log_alert(self, alert: Alert) -> None:  # noqa: D102
        def send() -> None:
            self.logger.experiment.alert(
                title=f"klmonitor: {alert.rule}"[:63],
                text=f"Step {alert.step}: {alert.message}",
                level=alert.level.value.upper(),
                wait_duration=self.alert_wait_s,
            )

        self._guard("send a W&B alert", send)


def make_sinks(
    loggers: Sequence[Any], prefix: str, warn_once: Callable[[str, str], None], alert_wait_s: float = 300.0
) -> list[LoggerSink]:
    """One sink per attached Lightning logger, with the extras its tracker supports."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    sinks: list[LoggerSink] = []
    for lg in loggers:
        if isinstance(lg, TensorBoardLogger):
            sinks.append(TensorBoardSink(lg, prefix, warn_once))
        elif isinstance(lg, WandbLogger):
            sinks.append(WandbSink(lg, prefix, warn_once, alert_wait_s))
        else:
            sinks.append(LoggerSink(lg, prefix, warn_once))
    return sinks


class WarnOnce:
    """``warn_once(kind, message)``: a ``UserWarning`` the first time each ``kind`` is seen.

    A class rather than a closure so the callback holding it can be pickled (spawn launchers).
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, kind: str, message: str) -> None:
        """Warn with ``message`` unless a warning of this ``kind`` was already given."""
        if kind in self.seen:
            return
        self.seen.add(kind)
        warnings.warn(message, UserWarning, stacklevel=3)
