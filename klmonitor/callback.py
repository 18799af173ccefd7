"""KLMonitor: the PyTorch Lightning callback that wires KLStats, alerts and loggers together."""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from klmonitor import _moments as mom
from klmonitor.alerts import Alert, AlertEngine, Rule, default_rules
from klmonitor.sinks import LoggerSink, WarnOnce, make_sinks
from klmonitor.stats import KLStats, KLSummary, Level

log = logging.getLogger("klmonitor")

__all__ = ["KLMonitor"]

Extract = Callable[[Any, Any, "pl.LightningModule"], tuple[Tensor, Tensor, Tensor | None]]
_STATE_VERSION = 1


class KLMonitorInputError(ValueError):
    """Bad monitoring input under ``strict=True`` (a ``ValueError``)."""


def _host_array(t: Tensor) -> np.ndarray:
    """A CPU tensor as a float32 (or bool/integer) numpy array; bf16/fp16 go through float32."""
    if t.dtype in (torch.bfloat16, torch.float16, torch.float64):
        t = t.float()
    return t.numpy()


class KLMonitor(Callback):
    r"""Monitor KL(policy || reference) every training step; log and alert per window.

    The LightningModule's ``training_step`` returns a dict with the loss and the sampled
    tokens' log-probs under the policy and the reference (and optionally a mask):
    ``{"loss": loss, "logprobs": logp, "ref_logprobs": ref_logp, "mask": mask}``.
    Each training batch is folded into a :class:`~klmonitor.KLStats` window on the tensors'
    device with no host sync. Every ``log_every_n_steps`` optimizer steps (by
    ``trainer.global_step``) the window is reduced over all ranks, logged to every attached
    logger on rank 0, checked by the alert rules (identically on every rank), and reset. The
    window still open when training ends is flushed.

    Logged metrics (``prefix`` defaults to ``kl/``; see :meth:`KLSummary.to_dict`):
    ``{k1,k2,k3,kl_pq}/{mean,std,var,stderr,rel_std}``, ``drift_k2_k3``, ``drift_z``,
    ``r_minus_1/{mean,stderr,z}``, ``ess_fraction``, ``tokens`` (and ``sequences`` at
    sequence level), ``nonfinite``, ``clamped``, ``max_abs_log_ratio``. TensorBoard also gets
    ``band/{k1,k3}_{lower,upper}`` (mean ± std, for the custom-scalars margin charts), a
    histogram ``log_ratio`` and alerts as text under ``alerts``; W&B gets the histogram and
    ``run.alert``.

    Args:
        log_every_n_steps: optimizer steps per window; ``None`` takes the Trainer's.
        prefix: prefix of every logged name.
        level: ``"token"`` or ``"sequence"`` statistics (see :class:`~klmonitor.KLStats`).
        logprobs_key: key of the policy log-probs in ``training_step``'s output dict.
        ref_logprobs_key: key of the reference log-probs.
        mask_key: key of the optional mask (a missing mask key means every token counts).
        extract: ``callable(outputs, batch, pl_module) -> (logprobs, ref_logprobs, mask)``
            for other output structures; replaces the keys.
        rules: alert rules; ``None`` uses :func:`klmonitor.alerts.default_rules` with
            ``max_kl``; ``[]`` disables alerts.
        max_kl: a KL budget per token (or per sequence at sequence level) for the default
            rules' ``kl_budget`` rule.
        on_alert: a callable, or a list of them, called with each :class:`Alert` on rank 0.
        stop_on: names of rules whose firing stops training (``trainer.should_stop``), in
            addition to rules built with ``stop_training=True``. Decided on every rank from
            the same reduced summary.
        histogram: log a histogram of (a sample of) the window's log-ratios.
        histogram_samples: log-ratios kept per window for the histogram (a ring buffer on
            device, filled by random draws from each batch).
        progress_bar: show the KL estimate (``k3`` mean) in Lightning's progress bar.
        strict: raise on bad input instead of warning once and skipping the step.
        clamp: log-ratio clamp of :class:`~klmonitor.KLStats` (clamped tokens are counted).
        alert_history_size: alerts kept in ``alert_history`` (oldest dropped first).
        wandb_alert_wait_s: W&B's minimum seconds between two alerts with the same title.

    Example:
        >>> from klmonitor import KLMonitor
        >>> mon = KLMonitor(log_every_n_steps=10, max_kl=0.5, stop_on=("kl_budget",))
        >>> [r.name for r in mon.rules][:2]
        ['drift', 'spike']
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        prefix: str = "kl/",
        level: Level = "token",
        logprobs_key: str = "logprobs",
        ref_logprobs_key: str = "ref_logprobs",
        mask_key: str | None = "mask",
        extract: Extract | None = None,
        rules: Sequence[Rule] | None = None,
        max_kl: float | None = None,
        on_alert: Callable[[Alert], Any] | Sequence[Callable[[Alert], Any]] | None = None,
        stop_on: Sequence[str] = (),
        histogram: bool = True,
        histogram_samples: int = 4096,
        progress_bar: bool = True,
        strict: bool = False,
        clamp: float = 20.0,
        alert_history_size: int = 1000,
        wandb_alert_wait_s: float = 300.0,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        for name, key in (("logprobs_key", logprobs_key), ("ref_logprobs_key", ref_logprobs_key)):
            if not isinstance(key, str) or not key:
                raise ValueError(f"{name} must be a non-empty str, got {key!r}")
        if mask_key is not None and not isinstance(mask_key, str):
            raise ValueError(f"mask_key must be a str or None, got {mask_key!r}")
        if extract is not None and not callable(extract):
            raise TypeError(
                f"extract must be callable(outputs, batch, pl_module), got {type(extract).__name__}"
            )
        if max_kl is not None and (not isinstance(max_kl, int | float) or not max_kl > 0):
            raise ValueError(f"max_kl must be a positive number or None, got {max_kl!r}")
        if rules is not None and max_kl is not None:
            raise ValueError("pass either rules (your own list) or max_kl (for the default rules), not both")
        if on_alert is None:
            callbacks: list[Callable[[Alert], Any]] = []
        elif callable(on_alert):
            callbacks = [on_alert]
        else:
            callbacks = list(on_alert)
            bad = [c for c in callbacks if not callable(c)]
            if bad:
                raise TypeError(f"on_alert must be a callable or a list of callables, got {bad[0]!r}")
        if isinstance(stop_on, str):
            stop_on = (stop_on,)
        if histogram_samples < 1:
            raise ValueError(f"histogram_samples must be >= 1, got {histogram_samples}")
        if alert_history_size < 1:
            raise ValueError(f"alert_history_size must be >= 1, got {alert_history_size}")

        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.level: Level = level
        self.logprobs_key = logprobs_key
        self.ref_logprobs_key = ref_logprobs_key
        self.mask_key = mask_key
        self.extract = extract
        self.on_alert = callbacks
        self.histogram = histogram
        self.histogram_samples = histogram_samples
        self.progress_bar = progress_bar
        self.strict = strict
        self.wandb_alert_wait_s = wandb_alert_wait_s

        rule_list = list(default_rules(max_kl=max_kl) if rules is None else rules)
        self.engine = AlertEngine(rule_list, history_size=alert_history_size)
        names = {r.name for r in rule_list}
        unknown = [s for s in stop_on if s not in names]
        if unknown:
            raise ValueError(f"stop_on names unknown rules {unknown}; the rules are {sorted(names)}")
        self.stop_on = tuple(stop_on)
        # Validates level and clamp with KLStats' own messages.
        self.stats = KLStats(level=level, clamp=clamp)

        self.last_summary: KLSummary | None = None
        self._every = log_every_n_steps or 50
        self._sinks: list[LoggerSink] = []
        self._sinks_ready = False
        self._warn_once = WarnOnce()
        self._last_logged_step = 0
        self._batches_in_window = 0
        self._windows = 0
        self._hist: Tensor | None = None
        self._hist_pos = 0
        self._rng = random.Random(0)
        self._restored_window: list[float] | None = None

    # -- public views ----------------------------------------------------------------------
    @property
    def rules(self) -> list[Rule]:
        """The alert rules, in evaluation order."""
        return self.engine.rules

    @property
    def alert_history(self) -> list[Alert]:
        """Alerts fired so far (bounded by ``alert_history_size``), oldest first."""
        return self.engine.history

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the window length, move the stats to the module's device, find loggers."""
        self._every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        self.stats = self.stats.to(pl_module.device)
        if trainer.is_global_zero:
            self._sinks = make_sinks(trainer.loggers, self.prefix, self._warn_once, self.wandb_alert_wait_s)
        if not trainer.loggers and trainer.is_global_zero:
            log.info("klmonitor: no logger attached; summaries and alerts go to the Python log only")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put back the window a checkpoint saved half-filled (restore runs after ``setup``)."""
        if self._restored_window is not None:
            if trainer.world_size == 1:
                window = torch.tensor(self._restored_window, dtype=torch.float64, device=pl_module.device)
                self.stats._acc = window
            else:
                log.info(
                    "klmonitor: the checkpoint's partly filled window is not restored under %d "
                    "processes (it held rank 0's tokens only); the first window after resuming is "
                    "shorter. Checkpoint on logging steps for exact resumption under DDP.",
                    trainer.world_size,
                )
            self._restored_window = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Fold the batch into the window; at a window boundary, reduce, log and alert."""
        self._batches_in_window += 1
        inputs = self._inputs(outputs, batch, pl_module)
        if inputs is not None:
            logp, ref, mask = inputs
            try:
                self.stats.update(logp, ref, mask)
            except (TypeError, ValueError) as exc:
                self._problem(
                    f"update:{type(exc).__name__}",
                    f"klmonitor: this step's log-probs were rejected: {exc}. The step is not monitored.",
                    exc,
                )
            else:
                if self.histogram:
                    self._sample_histogram(logp, ref, mask)
        step = trainer.global_step
        # Windows are (0, N], (N, 2N], ... in optimizer steps; with gradient accumulation the
        # micro-batches before a boundary's optimizer step belong to the window it closes.
        if step >= (self._last_logged_step // self._every + 1) * self._every:
            self._end_window(trainer, pl_module, step, in_batch=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Flush the window still open, so the last steps are not lost."""
        if self._batches_in_window > 0:
            self._end_window(trainer, pl_module, trainer.global_step, in_batch=False)
        if trainer.is_global_zero:
            for sink in self._sinks:
                sink.finalize()

    # -- inputs ----------------------------------------------------------------------------
    def _inputs(
        self, outputs: Any, batch: Any, pl_module: pl.LightningModule
    ) -> tuple[Tensor, Tensor, Any] | None:
        if self.extract is not None:
            try:
                got = self.extract(outputs, batch, pl_module)
                logp, ref, mask = got
            except Exception as exc:
                self._problem(
                    "extract",
                    f"klmonitor: extract(outputs, batch, pl_module) failed with {type(exc).__name__}: {exc}; "
                    "it must return (logprobs, ref_logprobs, mask or None). This step is not monitored.",
                    exc,
                )
                return None
            return logp, ref, mask
        if not isinstance(outputs, dict):
            self._problem(
                "outputs-not-dict",
                f"klmonitor: training_step returned {type(outputs).__name__}, not a dict; return "
                f'{{"loss": loss, "{self.logprobs_key}": logp, "{self.ref_logprobs_key}": ref_logp}} '
                "or pass KLMonitor(extract=...). Steps like this are not monitored.",
            )
            return None
        missing = [k for k in (self.logprobs_key, self.ref_logprobs_key) if k not in outputs]
        if missing:
            self._problem(
                "missing-keys",
                f"klmonitor: training_step's output has no {missing} (keys present: {sorted(outputs)}); "
                "add them, or set KLMonitor(logprobs_key=..., ref_logprobs_key=...) or extract=. "
                "Steps like this are not monitored.",
            )
            return None
        mask = outputs.get(self.mask_key) if self.mask_key is not None else None
        return outputs[self.logprobs_key], outputs[self.ref_logprobs_key], mask

    def _problem(self, kind: str, message: str, exc: BaseException | None = None) -> None:
        if self.strict:
            raise KLMonitorInputError(message) from exc
        self._warn_once(f"input:{kind}", message + " (klmonitor warns once per kind of problem.)")

    def _sample_histogram(self, logp: Tensor, ref: Tensor, mask: Tensor | None) -> None:
        # A contiguous run of tokens at a random offset (host RNG: no device sync) goes into a
        # device ring buffer sized so the window's steps share it; masked and non-finite
        # entries are stored as NaN and dropped on the host at the logging step. A handful of
        # small ops per step: cheap next to the training step.
        n = logp.numel()
        if n == 0:
            return
        dev = logp.device
        size = self.histogram_samples
        if self._hist is None or self._hist.device != dev:
            self._hist = torch.full((size,), math.nan, dtype=torch.float32, device=dev)
            self._hist_pos = 0
        k = min(n, size, -(-size // self._every))
        start = self._rng.randrange(n - k + 1)
        lp = logp.detach().reshape(-1)[start : start + k]
        rf = ref.detach().reshape(-1)[start : start + k]
        keep = mask.detach().reshape(-1)[start : start + k] if mask is not None else None
        first = min(k, size - self._hist_pos)
        if dev.type == "cpu" and (keep is None or keep.device.type == "cpu"):
            # On the host, numpy does the same in a few microseconds: torch's per-op dispatch
            # made this sample a third of the hook's time on small CPU models.
            lr = _host_array(rf) - _host_array(lp)
            if keep is not None:
                lr[_host_array(keep) == 0] = math.nan
            hist = self._hist.numpy()
            hist[self._hist_pos : self._hist_pos + first] = lr[:first]
            hist[: k - first] = lr[first:]
        else:
            lr = rf.float() - lp.float()
            if keep is not None:
                lr = lr.masked_fill(keep.to(dev, non_blocking=True) == 0, math.nan)
            self._hist[self._hist_pos : self._hist_pos + first] = lr[:first]
            if first < k:
                self._hist[: k - first] = lr[first:]
        self._hist_pos = (self._hist_pos + k) % size

    # -- the logging step ------------------------------------------------------------------
    def _end_window(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, in_batch: bool
    ) -> None:
        with warnings.catch_warnings():
            # An empty window is legitimate here (skipped steps); we report it ourselves.
            warnings.filterwarnings("ignore", message=r".*called before the ``update``")
            summary: KLSummary = self.stats.compute()  # reduces over ranks: every rank gets here
        hist = None
        if self._hist is not None:
            values = self._hist.cpu().numpy()
            hist = values[np.isfinite(values)]
            self._hist.fill_(math.nan)
        self.stats.reset()
        self._batches_in_window = 0
        self._last_logged_step = step
        self._windows += 1
        self.last_summary = summary

        if summary.count == 0:
            self._problem(
                "empty-window",
                f"klmonitor: no valid tokens in the window ending at step {step} (every token masked, "
                "non-finite, or every step skipped); check the mask. Nothing but counts is logged.",
            )
        if summary.nonfinite and self.strict:
            raise KLMonitorInputError(
                f"klmonitor: {summary.nonfinite} tokens had a NaN or infinite log-ratio in the window "
                f"ending at step {step} (strict=True)"
            )

        alerts = self.engine.evaluate(summary, step)
        stop = any(a.stop or a.rule in self.stop_on for a in alerts)

        if trainer.is_global_zero:
            metrics = summary.to_dict(self.prefix)
            if not self._sinks_ready:
                for sink in self._sinks:
                    sink.setup([r.name for r in self.rules])
                self._sinks_ready = True
            for sink in self._sinks:
                sink.log_scalars(metrics, step)
                if hist is not None and hist.size:
                    sink.log_histogram(hist, step)
            for alert in alerts:
                self._dispatch(alert)
        # Lightning allows self.log in batch hooks only, not in on_train_end.
        if in_batch and self.progress_bar and summary.count > 0 and math.isfinite(summary.kl):
            pl_module.log(
                f"{self.prefix}k3", summary.kl, prog_bar=True, logger=False, on_step=True, on_epoch=False
            )
        if stop:
            trainer.should_stop = True
            if trainer.is_global_zero:
                log.warning(
                    "klmonitor: stopping training at step %d on alert(s) %s", step, [a.rule for a in alerts]
                )

    def _dispatch(self, alert: Alert) -> None:
        py_level = {"info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}[alert.level.value]
        log.log(py_level, "klmonitor alert [%s] step %d: %s", alert.rule, alert.step, alert.message)
        for sink in self._sinks:
            sink.log_alert(alert)
        for fn in self.on_alert:
            try:
                fn(alert)
            except Exception as exc:
                self._warn_once(
                    f"on_alert:{getattr(fn, '__name__', repr(fn))}",
                    f"klmonitor: on_alert callable {fn!r} raised {type(exc).__name__}: {exc}; "
                    "the alert was still logged. This warning is shown once.",
                )

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Alert state (rules, history), window position and the open window's moments."""
        return {
            "version": _STATE_VERSION,
            "engine": self.engine.state_dict(),
            "last_logged_step": self._last_logged_step,
            "batches_in_window": self._batches_in_window,
            "windows": self._windows,
            "window": self.stats._acc.detach().cpu().tolist(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; newer keys are read with defaults."""
        self.engine.load_state_dict(state_dict.get("engine", {}))
        self._last_logged_step = int(state_dict.get("last_logged_step", 0))
        self._batches_in_window = int(state_dict.get("batches_in_window", 0))
        self._windows = int(state_dict.get("windows", 0))
        window = state_dict.get("window")
        if isinstance(window, list) and len(window) == mom.SIZE:
            self._restored_window = [float(x) for x in window]
