"""The Hugging Face ``transformers.Trainer`` adapter: :class:`KLMonitorCallback`.

A ``TrainerCallback`` over a :class:`~klmonitor.Monitor`. The Trainer does not hand a
callback the model's outputs, so the log-probs come from where the loss is computed: call
``callback.monitor.update(logprobs, ref_logprobs, mask)`` in your ``compute_loss`` (TRL's
``GRPOTrainer`` is covered by :mod:`klmonitor.trl`). The callback does the rest:

* ``on_train_begin``: fresh windows (or the checkpoint's state when resuming), the window
  length (the Trainer's ``logging_steps`` unless given), the device, and the sinks: the
  trackers of ``args.report_to`` that klmonitor can write to (TensorBoard, W&B);
* ``on_step_end`` (after each optimizer step): ``monitor.step(state.global_step)``; a stop
  rule sets ``control.should_training_stop``; before a checkpoint, the monitor's state goes
  into ``state.stateful_callbacks`` (saved in the checkpoint's ``trainer_state.json``);
* ``on_train_end``: the window still open is flushed and the sinks flushed.

Usage::

    from klmonitor.transformers import KLMonitorCallback

    kl = KLMonitorCallback(max_kl=0.1)

    class MyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logp, ref_logp, mask = ...  # the sampled tokens' log-probs, [B, T]
            if model.training:  # the Trainer's evaluation calls compute_loss too
                kl.monitor.update(logp, ref_logp, mask)  # on device, no host sync
            return loss

    MyTrainer(model, args, train_dataset=data, callbacks=[kl]).train()

See ``examples/hf_trainer.py`` for a complete script.
"""

from __future__ import annotations

import logging
import os
from typing import Any, cast

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from klmonitor._args import MONITOR_ARGS, check_keywords
from klmonitor._validate import check_int, check_str
from klmonitor.monitor import Monitor, WindowResult

log = logging.getLogger("klmonitor")

__all__ = ["KLMonitorCallback"]

#: The ``report_to`` integrations whose tracker klmonitor writes to itself.
SUPPORTED_TRACKERS = ("tensorboard", "wandb")


class KLMonitorCallback(TrainerCallback):
    r"""Monitor KL(policy || reference) in a ``transformers.Trainer``: log and alert per window.

    Feed it from ``compute_loss`` with ``callback.monitor.update(logprobs, ref_logprobs,
    mask)`` (every micro-batch; on device, no host sync). Every ``log_every_n_steps``
    optimizer steps (by ``state.global_step``) the window is reduced over all processes,
    logged on the main process at that step, checked by the alert rules (identically on
    every process) and reset; the window still open when training ends is flushed.

    Where the numbers go: the ``sinks`` given to the :class:`~klmonitor.Monitor`, if any;
    otherwise the trackers of the Trainer's ``report_to`` that klmonitor supports:

    * ``"tensorboard"``: a ``SummaryWriter`` of its own (the Trainer's writer is not reachable
      from a callback) in ``logging_dir``: by default ``$TENSORBOARD_LOGGING_DIR`` when set
      (the directory the Trainer's ``TensorBoardCallback`` writes to: one TensorBoard run; on
      transformers 4.x, ``args.logging_dir``), else ``<output_dir>/runs/klmonitor`` (a run of
      its own next to the Trainer's, whose directory is named by the time it started);
    * ``"wandb"``: the W&B run the Trainer's ``WandbCallback`` opened (``wandb.run``); the
      ``kl/*`` metrics are plotted against ``trainer/global_step``.

    Other integrations (MLflow, Comet, ...) get nothing unless passed as ``sinks`` (a
    callable ``fn(metrics, step)`` works for any of them); the callback says so once.
    Alerts go to the Python log, the sinks (TensorBoard text, W&B alerts) and ``on_alert``.
    The metrics logged are listed in :class:`klmonitor.lightning.KLMonitor`.

    Checkpoints: before each checkpoint the monitor's state (alert state, window position,
    open window) is stored in ``state.stateful_callbacks`` under :attr:`state_key`, so it is
    saved in the checkpoint's ``trainer_state.json`` and read back when training resumes from
    that checkpoint (``trainer.train(resume_from_checkpoint=...)``), wherever it lies. The
    entry is plain JSON; with ``restore_callback_states_from_checkpoint=True`` the Trainer
    logs that it is not one of its own stateful callbacks and leaves it to this callback.

    Args:
        monitor: the :class:`~klmonitor.Monitor` to drive; ``None`` builds one from
            ``monitor_kwargs``.
        log_every_n_steps: optimizer steps per window; ``None`` takes the Trainer's
            ``logging_steps`` (so the ``kl/*`` points share the loss's steps).
        logging_dir: where the TensorBoard writer writes (see above); ``None`` for the default.
        **monitor_kwargs: :class:`~klmonitor.Monitor`'s arguments (``max_kl``, ``rules``,
            ``stop_on``, ``on_alert``, ``prefix``, ``level``, ``sinks``, ``strict``, ...)
            when ``monitor`` is ``None``.

    >>> cb = KLMonitorCallback(max_kl=0.1, prefix="kl/")
    >>> cb.monitor.prefix, cb.state_key
    ('kl/', 'klmonitor:kl/')
    """

    def __init__(
        self,
        monitor: Monitor | None = None,
        *,
        log_every_n_steps: int | None = None,
        logging_dir: str | os.PathLike[str] | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        if monitor is not None and not isinstance(monitor, Monitor):
            raise TypeError(
                f"monitor must be a klmonitor.Monitor or None (to build one from keyword arguments), "
                f"got {type(monitor).__name__}"
            )
        if monitor is not None and monitor_kwargs:
            raise ValueError(
                f"pass either monitor= (a Monitor you built) or Monitor keyword arguments "
                f"{sorted(monitor_kwargs)}, not both"
            )
        if log_every_n_steps is not None:
            check_int(
                log_every_n_steps, "log_every_n_steps", low=1, hint=" or None (the Trainer's logging_steps)"
            )
        if logging_dir is not None:
            logging_dir = check_str(os.fspath(logging_dir), "logging_dir")
        self.log_every_n_steps = log_every_n_steps
        self.logging_dir = logging_dir
        if monitor is None:  # a misspelled keyword names this class and the closest argument
            own = ["monitor", "log_every_n_steps", "logging_dir"]
            check_keywords(
                f"{type(self).__module__}.{type(self).__qualname__}",
                monitor_kwargs,
                own + [n for n in MONITOR_ARGS if n not in own],
            )
        self.monitor = monitor if monitor is not None else Monitor(**monitor_kwargs)
        # Sinks the user gave are kept; otherwise they are chosen from report_to per run.
        self._user_sinks = bool(self.monitor.sinks)
        self._own_writer: Any = None
        self.last_result: WindowResult | None = None

    @property
    def state_key(self) -> str:
        """Key of the monitor's state in ``state.stateful_callbacks`` (one per prefix)."""
        return f"klmonitor:{self.monitor.prefix}"

    # -- Trainer events --------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Fresh windows or the checkpoint's state, the window length, the device and the sinks."""
        mon = self.monitor
        mon.log_every_n_steps = self.log_every_n_steps or max(1, int(state.logging_steps or 1))
        mon.rank = int(args.process_index)
        mon.reset_window()
        mon.to(args.device)
        if not self._user_sinks:
            mon.set_sinks(self._tracker_sinks(args) if state.is_world_process_zero else [])
        if state.global_step > 0:
            saved = _stateful_callbacks(state).get(self.state_key)
            if saved is None:
                mon.problem(
                    "resume-no-state",
                    f"klmonitor: training resumes at step {state.global_step} but the checkpoint's "
                    f"trainer_state.json has no '{self.state_key}' entry (saved without this callback, "
                    "or with another prefix); the alert state starts fresh.",
                )
                mon.reset_window(int(state.global_step))  # windows (s, s + N], not (0, N]
            else:
                mon.load_state_dict(saved)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After an optimizer step: end the window at a boundary; store the state before a checkpoint."""
        res = self.monitor.step(int(state.global_step))
        if res is not None:
            self._after_window(res, control)
        if control.should_save:
            self._store_state(state)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Store the state before an end-of-epoch checkpoint (``save_strategy="epoch"``)."""
        if control.should_save:
            self._store_state(state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Flush the window still open, then the sinks; close the writer this callback opened."""
        res = self.monitor.flush(int(state.global_step))
        if res is not None:
            self._after_window(res, control)
        self.monitor.close()
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None

    # -- helpers ---------------------------------------------------------------------------
    def _after_window(self, res: WindowResult, control: TrainerControl) -> None:
        self.last_result = res
        if res.stop:
            control.should_training_stop = True

    def _store_state(self, state: TrainerState) -> None:
        entries = _stateful_callbacks(state)
        entries[self.state_key] = self.monitor.state_dict()
        state.stateful_callbacks = cast(Any, entries)

    def _tracker_sinks(self, args: TrainingArguments) -> list[Any]:
        report_to = list(args.report_to or [])
        sinks: list[Any] = []
        if "tensorboard" in report_to:
            writer = self._open_writer(args)
            if writer is not None:
                sinks.append(writer)
        if "wandb" in report_to:
            try:
                import wandb

                run = wandb.run
            except ImportError:
                run = None
            if run is None:
                self.monitor.problem(
                    "wandb-no-run",
                    "klmonitor: report_to has 'wandb' but no W&B run is open (wandb.run is None) when "
                    "training begins; the kl/* metrics do not go to W&B. Pass sinks=[run] to send them.",
                )
            else:
                sinks.append(run)
        others = [r for r in report_to if r not in SUPPORTED_TRACKERS]
        if others:
            log.info(
                "klmonitor: report_to %s: klmonitor writes to %s itself; for the others pass "
                "sinks=[fn(metrics, step)] to the callback",
                others,
                list(SUPPORTED_TRACKERS),
            )
        return sinks

    def _open_writer(self, args: TrainingArguments) -> Any:
        logdir = (
            self.logging_dir
            or os.environ.get("TENSORBOARD_LOGGING_DIR")
            or getattr(args, "logging_dir", None)  # transformers 4.x: the Trainer's own directory
            or os.path.join(args.output_dir or ".", "runs", "klmonitor")
        )
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            self.monitor.problem(
                "tensorboard-missing",
                f"klmonitor: report_to has 'tensorboard' but torch.utils.tensorboard cannot be imported "
                f"({exc}); install tensorboard to log the kl/* metrics there.",
                exc,
            )
            return None
        if self._own_writer is not None:
            self._own_writer.close()
        self._own_writer = SummaryWriter(log_dir=os.path.expanduser(logdir))
        return self._own_writer


def _stateful_callbacks(state: TrainerState) -> dict[str, Any]:
    """``state.stateful_callbacks``: a dict ``{name: state}`` once the Trainer built it (annotated as a list)."""
    entries: Any = state.stateful_callbacks
    return entries if isinstance(entries, dict) else {}
