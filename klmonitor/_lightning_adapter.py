"""The Lightning adapter's logic, shared by both packages (no framework imported here).

:class:`klmonitor.lightning.KLMonitor` and :class:`klmonitor.pytorch_lightning.KLMonitor` are
this class mixed into each package's ``Callback``: Lightning's events become
:class:`~klmonitor.Monitor` calls (batch end -> ``update`` and ``step``, end of training ->
``flush``; checkpoints -> ``state_dict``). ``trainer`` and ``pl_module`` are used through
their public attributes only, which both packages share.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from klmonitor._args import check_keywords, monitor_kwargs
from klmonitor._validate import check_bool, check_int, check_str
from klmonitor.alerts import Alert, Rule
from klmonitor.fdiv import FDivergence
from klmonitor.monitor import Monitor, WindowResult
from klmonitor.summary import KLSummary, Level

__all__ = ["Extract", "LightningAdapter"]

#: ``extract(outputs, batch, pl_module) -> (logprobs, ref_logprobs, mask or None)``; the tuple may
#: go on with ``rollout_logprobs``, ``token_ids`` and ``behaviour_logprobs``, or be a dict with the
#: keys of Monitor.update.
Extract = Callable[[Any, Any, Any], Any]
_UPDATE_ARGS = ("logprobs", "ref_logprobs", "mask", "rollout_logprobs", "token_ids", "behaviour_logprobs")
#: Monitor arguments the Trainer provides (its step count and loggers, its rank): not taken.
_TRAINERS_ARGS = ("log_every_n_steps", "sinks", "rank")


class LightningAdapter:
    r"""Monitor KL(policy || reference) every training step; log and alert per window.

    The LightningModule's ``training_step`` returns a dict with the loss and the sampled
    tokens' log-probs under the policy and the reference (and optionally a mask):
    ``{"loss": loss, "logprobs": logp, "ref_logprobs": ref_logp, "mask": mask}``. Each
    training batch is folded into the window of a :class:`~klmonitor.Monitor` (``.monitor``)
    on the tensors' device with no host sync. Every ``log_every_n_steps`` optimizer steps
    (by ``trainer.global_step``) the window is reduced over all ranks, logged to every logger
    of the Trainer on rank 0, checked by the alert rules (identically on every rank), and
    reset. The window still open when training ends is flushed.

    A window is logged at the step Lightning writes its last batch's ``self.log`` values with
    (the step before that batch's optimizer step: with ``log_every_n_steps=50``, at 49, 99,
    ...), so kl/* sit beside the user's metrics in every logger (TensorBoard, CSV, W&B's
    ``trainer/global_step``); :class:`~klmonitor.alerts.Alert`'s ``step`` is that step too.
    The window flushed at the end is logged at its last batch's step.

    Logged metrics (``prefix`` defaults to ``kl/``; see :meth:`KLSummary.to_dict`):
    ``{k1,k2,k3,kl_pq}/{mean,std,var,stderr,rel_std}``, ``drift_k2_k3``, ``drift_z``,
    ``r_minus_1/{mean,stderr,z}``, ``ess_fraction``, ``tokens`` (and ``sequences`` at
    sequence level), ``nonfinite``, ``extreme``, ``max_abs_log_ratio``, ``entropy/{mean,std,
    stderr}``, ``initial/...`` (the first window), and for ``[B, T]`` inputs
    ``by_position/<bucket>/{k3,tokens}`` (``by_position``, on by default). TensorBoard also gets
    ``band/{k1,k3}_{lower,upper}``, a custom-scalars layout, a histogram ``log_ratio``, alerts
    as text under ``alerts`` and, per window, the tables ``by_position`` and ``top_sequences``
    (``top_sequences=5`` by default) as text; W&B gets the histogram, the tables and
    ``run.alert``.

    Args:
        log_every_n_steps: optimizer steps per window; None takes the Trainer's.
        prefix: prefix of every logged name; several monitors in one Trainer need distinct ones.
        level: "token" or "sequence" statistics (see klmonitor.KLStats).
        logprobs_key: key of the policy log-probs in training_step's output dict.
        ref_logprobs_key: key of the reference log-probs.
        mask_key: key of the optional mask (a missing mask key means every token counts).
        rollout_logprobs_key: key of the optional log-probs of the rollout engine that sampled
            the tokens (adds KL(rollout || trainer) under kl/rollout/).
        token_ids_key: key of the optional sampled token ids (for top_sequences text and
            top_tokens).
        behaviour_logprobs_key: key of the optional log-probs of the policy that sampled the
            tokens, as computed at sampling time (PPO's old log-probs; adds the policy update's
            size KL(behaviour || current) under kl/update/).
        extract: callable(outputs, batch, pl_module) -> (logprobs, ref_logprobs, mask)
            (optionally followed by rollout_logprobs, token_ids, behaviour_logprobs; or a dict
            with those keys)
            for other output structures; replaces the keys.
        rules: alert rules; None uses klmonitor.alerts.default_rules with max_kl; [] disables
            alerts.
        max_kl: a KL budget per token (or per sequence at sequence level) for the default
            rules' kl_budget rule.
        max_update_kl: a limit on the policy update's KL(behaviour || current) per token (PPO's
            target KL) for the default rules' update_size rule.
        on_alert: a callable, or a list of them, called with each Alert on rank 0.
        stop_on: names of rules whose firing stops training (trainer.should_stop), in addition
            to rules built with stop_training=True; decided on every rank alike.
        histogram: log a histogram of (a sample of) the window's log-ratios.
        histogram_samples: log-ratios kept per window for the histogram.
        progress_bar: show the headline KL estimate (cv, see KLSummary.kl) in Lightning's
            progress bar, as <prefix>cv.
        strict: raise on bad input instead of warning once and skipping the step.
        clamp: None (default): exact values, no clamp; a number clamps log-ratios to
            [-clamp, clamp] as peers do (biased; see klmonitor.KLStats).
        extreme: tokens with |log-ratio| above this many nats (default 20) are counted in
            kl/extreme and fire the extreme rule; their values still count exactly.
        backend: how the statistics are computed: "auto" (the native C kernel on CPU, the fused
            Triton kernel on CUDA), "torch", "native", "triton" or "compile" (see
            klmonitor.KLStats).
        alert_history_size: alerts kept in alert_history (oldest dropped first).
        wandb_alert_wait_s: W&B's minimum seconds between two alerts with the same title.
        by_position: keep the mean k3 per position bucket ([B, T] inputs), logged as
            kl/by_position/<bucket>/k3 (and .../tokens) and a table kl/by_position. On by
            default; False turns it off.
        position_buckets: buckets of token positions: 0-1, 2-3, 4-7, ..., the last open-ended.
        position_rows: rows of each batch the position profile reads (an evenly strided
            sample); None reads every row (exact).
        top_sequences: keep the window's K sequences with the largest summed k3 ([B, T]
            inputs), logged as a table kl/top_sequences (TensorBoard text, a W&B table). 5 by
            default; 0 turns it off.
        top_sequences_max_len: token ids and per-token k3 kept per top sequence.
        top_tokens: keep the K vocabulary entries contributing the most summed k3 (0: off;
            needs token ids and vocab_size).
        vocab_size: the size of the id table of top_tokens (len(tokenizer)).
        decode: callable(token_ids: list[int]) -> str (e.g. a tokenizer's decode) to show the
            top sequences and tokens as text. Lightning knows no tokenizer: pass
            decode=tokenizer.decode (and the token ids under token_ids_key) for text; without
            it the tables hold the numbers only.
        f_divergences: f-divergences to estimate beside the KL: "chi2", "hellinger", "js",
            "tv" or klmonitor.FDivergence entries; logged as kl/f/NAME/mean, std, stderr. Off
            by default.
        entropy: estimate the policy's entropy from the sampled tokens (kl/entropy/mean, std,
            stderr; the entropy_collapse rule).

    The Monitor's other arguments are the Trainer's: sinks (its loggers) and rank.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Check the keywords first, so a misspelled one names the public class and the fix."""
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):  # a subclass's **kw
            accepted = [n for n in params if n != "self"]
            check_keywords(f"{cls.__module__}.{cls.__qualname__}", kwargs, accepted)
        return super().__new__(cls)

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        prefix: str = "kl/",
        level: Level = "token",
        logprobs_key: str = "logprobs",
        ref_logprobs_key: str = "ref_logprobs",
        mask_key: str | None = "mask",
        rollout_logprobs_key: str | None = "rollout_logprobs",
        token_ids_key: str | None = "token_ids",
        behaviour_logprobs_key: str | None = "behaviour_logprobs",
        extract: Extract | None = None,
        rules: Sequence[Rule] | None = None,
        max_kl: float | None = None,
        max_update_kl: float | None = None,
        on_alert: Callable[[Alert], Any] | Sequence[Callable[[Alert], Any]] | None = None,
        stop_on: Sequence[str] = (),
        histogram: bool = True,
        histogram_samples: int = 4096,
        progress_bar: bool = True,
        strict: bool = False,
        clamp: float | None = None,
        extreme: float = 20.0,
        backend: Literal["auto", "torch", "native", "triton", "compile"] = "auto",
        alert_history_size: int = 1000,
        wandb_alert_wait_s: float = 300.0,
        by_position: bool = True,
        position_buckets: int = 12,
        position_rows: int | None = 16,
        top_sequences: int = 5,
        top_sequences_max_len: int = 256,
        top_tokens: int = 0,
        vocab_size: int | None = None,
        decode: Callable[[list[int]], str] | None = None,
        f_divergences: Sequence[str | FDivergence] | None = None,
        entropy: bool = True,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None:
            check_int(log_every_n_steps, "log_every_n_steps", low=1, hint=" or None (the Trainer's)")
        self.log_every_n_steps = log_every_n_steps
        self.logprobs_key = check_str(logprobs_key, "logprobs_key")
        self.ref_logprobs_key = check_str(ref_logprobs_key, "ref_logprobs_key")
        self.mask_key = None if mask_key is None else check_str(mask_key, "mask_key")
        self.rollout_logprobs_key = (
            None if rollout_logprobs_key is None else check_str(rollout_logprobs_key, "rollout_logprobs_key")
        )
        self.token_ids_key = None if token_ids_key is None else check_str(token_ids_key, "token_ids_key")
        self.behaviour_logprobs_key = (
            None
            if behaviour_logprobs_key is None
            else check_str(behaviour_logprobs_key, "behaviour_logprobs_key")
        )
        if extract is not None and not callable(extract):
            raise TypeError(
                f"extract must be callable(outputs, batch, pl_module), got {type(extract).__name__}"
            )
        self.extract = extract
        self.progress_bar = check_bool(progress_bar, "progress_bar")
        # The step Lightning's loggers number the current batch's self.log values with, read as
        # trainer.global_step when the batch starts (before its optimizer step), and that of the
        # last batch seen (for the window flushed at the end).
        self._batch_step: int | None = None
        self._log_step: int | None = None
        # Every Monitor argument this signature has, by name (klmonitor._args keeps them in step).
        given = monitor_kwargs(locals(), skip=_TRAINERS_ARGS)
        self.monitor = Monitor(log_every_n_steps=log_every_n_steps or 50, **given)

    # -- views of the monitor --------------------------------------------------------------
    @property
    def prefix(self) -> str:
        """Prefix of every logged name."""
        return self.monitor.prefix

    @property
    def rules(self) -> list[Rule]:
        """The alert rules, in evaluation order."""
        return self.monitor.rules

    @property
    def alert_history(self) -> list[Alert]:
        """Alerts fired so far (bounded by ``alert_history_size``), oldest first."""
        return self.monitor.alert_history

    @property
    def last_summary(self) -> KLSummary | None:
        """The summary of the last window ended."""
        return self.monitor.last_summary

    @property
    def state_key(self) -> str:
        """Checkpoint key: the class and the prefix, so several monitors in one Trainer coexist."""
        return f"{type(self).__qualname__}{{'prefix': {self.prefix!r}}}"

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """For ``fit``: fresh windows, the window length, the device, and the Trainer's loggers as sinks."""
        if stage != "fit":
            return
        mon = self.monitor
        mon.log_every_n_steps = self.log_every_n_steps or max(
            1, int(getattr(trainer, "log_every_n_steps", 50))
        )
        mon.rank = int(trainer.global_rank)
        mon.reset_window()
        mon.to(pl_module.device)
        mon.set_sinks(list(trainer.loggers) if trainer.is_global_zero else [])
        self._batch_step = self._log_step = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Note the step this batch's ``self.log`` values are written at (before its optimizer step).

        Lightning numbers a training batch's logs by the optimizer steps before it: with
        ``log_every_n_steps=50`` it writes at 49, 99, ..., while ``trainer.global_step`` in
        ``on_train_batch_end`` already counts this batch's optimizer step. (With several
        optimizers stepped by hand in one batch the two numberings differ; kl/* then follow
        ``global_step`` at the batch's start.)
        """
        self._batch_step = int(trainer.global_step)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Fold the batch into the window; at a window boundary, reduce, log and alert."""
        inputs = self._inputs(outputs, batch, pl_module)
        if inputs is None:
            self.monitor.skipped_batch()
        else:
            self.monitor.update(**inputs)
        self._log_step = (
            self._batch_step if self._batch_step is not None else max(0, int(trainer.global_step) - 1)
        )
        res = self.monitor.step(int(trainer.global_step), log_step=self._log_step)
        if res is not None:
            self._after_window(trainer, pl_module, res, in_batch=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Flush the window still open (at its last batch's step), so the last steps are not lost."""
        log_step = self._log_step if self._log_step is not None else max(0, int(trainer.global_step) - 1)
        res = self.monitor.flush(int(trainer.global_step), log_step=log_step)
        if res is not None:
            self._after_window(trainer, pl_module, res, in_batch=False)
        self.monitor.close()

    def _after_window(self, trainer: Any, pl_module: Any, res: WindowResult, in_batch: bool) -> None:
        kl = res.summary.kl
        # Lightning allows self.log in batch hooks only, not in on_train_end.
        if in_batch and self.progress_bar and res.summary.count > 0 and math.isfinite(kl):
            pl_module.log(f"{self.prefix}cv", kl, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if res.stop:
            trainer.should_stop = True

    # -- inputs ----------------------------------------------------------------------------
    def _inputs(self, outputs: Any, batch: Any, pl_module: Any) -> dict[str, Any] | None:
        if self.extract is not None:
            try:
                got = self.extract(outputs, batch, pl_module)
                if isinstance(got, dict):
                    unknown = set(got) - set(_UPDATE_ARGS)
                    if unknown or "logprobs" not in got or "ref_logprobs" not in got:
                        raise ValueError(
                            f"a dict needs logprobs and ref_logprobs among {_UPDATE_ARGS}, got {sorted(got)}"
                        )
                    return dict(got)
                if not isinstance(got, tuple | list) or not 3 <= len(got) <= len(_UPDATE_ARGS):
                    raise ValueError(f"expected a tuple of 3 to 6 items or a dict, got {type(got).__name__}")
                return dict(zip(_UPDATE_ARGS, got, strict=False))
            except Exception as exc:
                self.monitor.problem(
                    "extract",
                    f"klmonitor: extract(outputs, batch, pl_module) failed with {type(exc).__name__}: {exc}; "
                    "it must return (logprobs, ref_logprobs, mask or None[, rollout_logprobs[, token_ids"
                    "[, behaviour_logprobs]]]) "
                    "or a dict with those keys. This step is not monitored.",
                    exc,
                )
                return None
        if not isinstance(outputs, dict):
            self.monitor.problem(
                "outputs-not-dict",
                f"klmonitor: training_step returned {type(outputs).__name__}, not a dict; return "
                f'{{"loss": loss, "{self.logprobs_key}": logp, "{self.ref_logprobs_key}": ref_logp}} '
                "or pass KLMonitor(extract=...). Steps like this are not monitored.",
            )
            return None
        missing = [k for k in (self.logprobs_key, self.ref_logprobs_key) if k not in outputs]
        if missing:
            self.monitor.problem(
                "missing-keys",
                f"klmonitor: training_step's output has no {missing} (keys present: {sorted(outputs)}); "
                "add them, or set KLMonitor(logprobs_key=..., ref_logprobs_key=...) or extract=. "
                "Steps like this are not monitored.",
            )
            return None
        inputs = {"logprobs": outputs[self.logprobs_key], "ref_logprobs": outputs[self.ref_logprobs_key]}
        for arg, key in (
            ("mask", self.mask_key),
            ("rollout_logprobs", self.rollout_logprobs_key),
            ("token_ids", self.token_ids_key),
            ("behaviour_logprobs", self.behaviour_logprobs_key),
        ):
            if key is not None:
                inputs[arg] = outputs.get(key)
        return inputs

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The monitor's :meth:`~klmonitor.Monitor.state_dict` (alert state, window position, open window)."""
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (checked: a bad state warns and starts fresh)."""
        self.monitor.load_state_dict(state_dict)
