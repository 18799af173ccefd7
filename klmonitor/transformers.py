"""The Hugging Face ``transformers.Trainer`` adapter: :func:`attach` and :class:`KLMonitorCallback`.

A ``TrainerCallback`` over a :class:`~klmonitor.Monitor`. :func:`attach` registers it so that
the ``kl/*`` scalars go through the Trainer's own log (``trainer.log`` -> ``on_log``), at its
logging steps: into the same run of every ``report_to`` integration as ``train/loss``, and into
``trainer.state.log_history``. ``Trainer(callbacks=[KLMonitorCallback(...)])`` keeps working as
before (windows on its own schedule, written by klmonitor's own sinks). The Trainer does not hand a
callback the model's outputs, so the log-probs come from where the loss is computed: call
``callback.monitor.update(logprobs, ref_logprobs, mask)`` in your ``compute_loss`` (TRL's
``GRPOTrainer`` is covered by :mod:`klmonitor.trl`). The callback does the rest:

* ``on_train_begin``: fresh windows (or the checkpoint's state when resuming), the window
  length (the Trainer's ``logging_steps`` unless given), the device, the sinks (the trackers
  of ``args.report_to`` that klmonitor can write to: TensorBoard, W&B), and the Trainer's
  tokenizer (``processing_class``) as the monitor's ``decode`` unless one was given, so the
  top sequences (on by default) show as text when ``update`` gets ``token_ids``;
* ``on_step_end`` (after each optimizer step): ``monitor.step(state.global_step)``; a stop
  rule sets ``control.should_training_stop``; before a checkpoint, the monitor's state goes
  into ``state.stateful_callbacks`` (saved in the checkpoint's ``trainer_state.json``);
* ``on_train_end``: the window still open is flushed and the sinks flushed.

Usage::

    from klmonitor.transformers import attach

    class MyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logp, ref_logp, mask, ids = ...  # the sampled tokens' log-probs and ids, [B, T]
            if model.training:  # the Trainer's evaluation calls compute_loss too
                # on device, no host sync; token_ids (the sampled ids, [B, T]) give the top
                # sequences their text, decoded with the Trainer's tokenizer
                self.kl.monitor.update(logp, ref_logp, mask, token_ids=ids)
            return loss

    trainer = MyTrainer(model, args, train_dataset=data)
    trainer.kl = attach(trainer, max_kl=0.1)  # kl/* beside the loss, in every report_to tracker
    trainer.train()

See ``examples/hf_trainer.py`` for a complete script.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, cast

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from klmonitor._args import MONITOR_ARGS, check_keywords
from klmonitor._validate import check_int, check_str
from klmonitor.monitor import Monitor, WindowResult
from klmonitor.sinks import TensorBoardSink
from klmonitor.summary import bands

log = logging.getLogger("klmonitor")

__all__ = ["KLMonitorCallback", "attach"]

#: The ``report_to`` integrations whose tracker klmonitor writes to itself.
SUPPORTED_TRACKERS = ("tensorboard", "wandb")
#: What the Trainer's integrations (TensorBoard, W&B) put before the names of a training log.
TRAINER_LOG_PREFIX = "train/"
#: The window length of an attached callback: never reached, so only the Trainer's logs end windows.
_NO_SCHEDULE = 2**62


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

    Text: the window's top sequences (``top_sequences=5`` by default, a table
    ``kl/top_sequences``) and top tokens are decoded with the Trainer's tokenizer, its
    ``processing_class`` (``tokenizer`` on older transformers) when it has a ``decode``, unless
    ``decode=`` was given (``decode=`` wins). Feed ``token_ids=`` (the sampled ids) to
    ``monitor.update`` for the text; without them the tables hold the numbers only.

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
        # Set by attach() (and klmonitor.trl): windows end at the Trainer's training logs, and
        # the scalars go into them; ``_handler`` is the Trainer's CallbackHandler (its
        # TensorBoardCallback's writer gets the extras), ``_merge_in_on_log`` says whether
        # on_log adds kl/* to the logs (attach) or the trainer's own ``log`` does (TRL).
        self._attached = False
        self._merge_in_on_log = False
        self._handler: Any = None
        # The tokenizer's decode this callback gave the monitor (None: none, or the user's own).
        self._adopted_decode: Any = None

    @property
    def attached(self) -> bool:
        """Whether :func:`attach` (or :mod:`klmonitor.trl`) registered it: kl/* in the Trainer's own log."""
        return self._attached

    def _attach(self, handler: Any, merge_in_on_log: bool) -> None:
        """Log through the Trainer: windows end at its training logs (see :func:`attach`)."""
        if self.log_every_n_steps is not None or self.logging_dir is not None:
            given = "log_every_n_steps" if self.log_every_n_steps is not None else "logging_dir"
            fix = (
                "set TrainingArguments(logging_steps=...) (GRPOConfig for TRL) instead"
                if given == "log_every_n_steps"
                else "the Trainer's report_to integrations write them where they write train/loss"
            )
            raise ValueError(
                f"klmonitor: {given}={getattr(self, given)!r} is for KLMonitorCallback's own logging "
                f"(Trainer(callbacks=[KLMonitorCallback(...)])); attached to the Trainer, the kl/* "
                f"windows end at the Trainer's logging steps and go into its log: {fix}."
            )
        self._attached = True
        self._merge_in_on_log = merge_in_on_log
        self._handler = handler

    def adopt_tokenizer(self, tokenizer: Any) -> bool:
        """Decode the top sequences' and tokens' text with ``tokenizer.decode``, unless ``decode`` was given.

        Called with the Trainer's ``processing_class`` by :func:`attach` and when training
        begins; a ``decode`` the user gave (``decode=`` or ``monitor.decode = ...``) is kept,
        and an object without a callable ``decode`` changes nothing. Returns whether the
        monitor now decodes with ``tokenizer``.

        >>> class Tok:
        ...     def decode(self, ids):
        ...         return " ".join(map(str, ids))
        >>> cb = KLMonitorCallback()
        >>> cb.adopt_tokenizer(Tok()), cb.monitor.decode([1, 2])
        (True, '1 2')
        >>> KLMonitorCallback(decode=str).adopt_tokenizer(Tok())
        False
        """
        mon = self.monitor
        if mon.decode is not None and (self._adopted_decode is None or mon.decode != self._adopted_decode):
            return False  # the user's own decode
        decode = getattr(tokenizer, "decode", None)
        if not callable(decode):
            return False
        mon.decode = self._adopted_decode = decode
        return True

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
        if self._attached:  # only the Trainer's training logs end a window (flush in on_log)
            mon.log_every_n_steps = _NO_SCHEDULE
        else:
            mon.log_every_n_steps = self.log_every_n_steps or max(1, int(state.logging_steps or 1))
        mon.rank = int(args.process_index)
        mon.reset_window()
        mon.to(args.device)
        # The Trainer hands its callbacks processing_class (transformers >= 4.46) or tokenizer.
        self.adopt_tokenizer(kwargs.get("processing_class", kwargs.get("tokenizer")))
        if not self._user_sinks:
            if not state.is_world_process_zero:
                mon.set_sinks([])
            elif self._attached:
                mon.set_sinks(self._trainer_extras_sinks(args))
            else:
                mon.set_sinks(self._tracker_sinks(args))
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
        """After an optimizer step: end the window at a boundary; store the state before a checkpoint.

        Attached (:func:`attach`), the step only moves the monitor's step count: the window
        ends when the Trainer logs (:meth:`on_log`).
        """
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

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Attached by :func:`attach`: a training log ends the window and carries its ``kl/*``.

        Runs before the ``report_to`` integrations (:func:`attach` puts this callback first),
        so they write kl/* with the loss, at the same step and in the same run; the entry the
        Trainer just appended to ``state.log_history`` gets them too. Evaluation logs are left
        alone. Then the monitor's state is stored when a checkpoint follows.
        """
        if self._attached and self._merge_in_on_log and logs is not None:
            metrics = self.window_for_log(logs, state, control)
            if metrics:
                entry = state.log_history[-1] if state.log_history else None
                logs.update(metrics)
                # Trainer.log appended {**logs, "step": global_step} just before calling on_log.
                if isinstance(entry, dict) and entry.get("step") == state.global_step:
                    entry.update(metrics)
        if self._attached and control.should_save:
            self._store_state(state)

    def window_for_log(
        self, logs: dict[str, Any], state: TrainerState, control: TrainerControl
    ) -> dict[str, float]:
        """End the window for a training log of the Trainer and return its ``kl/*`` scalars.

        A training log is one with the loss (``loss``, or ``train_loss`` in the summary logged
        when training ends, which takes the steps since the last logging step); any other log
        (evaluation's ``eval_*``, a user's own ``trainer.log``) gets nothing (``{}``), as does
        a log with no batch fed since the last window. Every process must call it alike (the
        window's reduction); the scalars are the same on every process. A stop rule that fires
        sets ``control.should_training_stop``.
        """
        if not _is_training_log(logs):
            return {}
        res = self.monitor.flush(int(state.global_step))
        if res is None:
            return {}
        self._after_window(res, control)
        return dict(res.metrics)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Flush the window still open, then the sinks; close the writer this callback opened.

        Attached, the Trainer's last log (its training summary) has already taken the steps
        since the last logging step, so nothing is left unless training ended without it.
        """
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

    def _trainer_extras_sinks(self, args: TrainingArguments) -> list[Any]:
        """Attached: the Trainer's own TensorBoard writer, for what its log cannot carry."""
        if "tensorboard" not in list(args.report_to or []) or self._handler is None:
            return []
        from transformers.integrations import TensorBoardCallback

        for cb in getattr(self._handler, "callbacks", []):
            if isinstance(cb, TensorBoardCallback):
                return [_TrainerTensorBoardSink(cb, self.monitor.prefix)]
        return []

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


class _TrainerTensorBoardSink(TensorBoardSink):
    """The writer of the Trainer's ``TensorBoardCallback``: the extras of kl/*, in the Trainer's run.

    The scalars go through ``trainer.log``, which the callback writes as ``train/<name>``; this
    sink adds, under the same ``train/`` names, what a log cannot carry: the std bands, the
    custom-scalars layout, the log-ratio histogram, alerts and tables as text. (``klmonitor
    report --prefix train/kl/`` reads the run back.) The writer is the callback's, opened in
    its ``on_train_begin`` and closed in its ``on_train_end``.
    """

    def __init__(self, tb_callback: Any, prefix: str) -> None:
        super().__init__(tb_callback, TRAINER_LOG_PREFIX + prefix)

    def _writer(self) -> Any:
        writer = getattr(self.target, "tb_writer", None)
        if writer is None:
            raise RuntimeError("the Trainer's TensorBoardCallback has no open writer (tb_writer is None)")
        return writer

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:  # noqa: D102
        # The scalars themselves are in the Trainer's log; only the bands are written here.
        named = {TRAINER_LOG_PREFIX + name: value for name, value in metrics.items()}
        scalars = bands(named, self.prefix)

        def write() -> None:
            writer = self._writer()
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)

        self._guard("log the std bands", write)

    def finalize(self) -> None:  # noqa: D102
        writer = getattr(self.target, "tb_writer", None)
        if writer is not None:
            self._guard("flush", writer.flush)


def _is_training_log(logs: Mapping[str, Any]) -> bool:
    """A log of the training loop: the loss since the last log, or the summary at the end."""
    return "loss" in logs or "train_loss" in logs


def attach(trainer: Trainer, monitor: Monitor | None = None, **monitor_kwargs: Any) -> KLMonitorCallback:
    """Register a :class:`KLMonitorCallback` so that ``kl/*`` go through ``trainer``'s own log.

    A window ends at each of the Trainer's training logs (every ``logging_steps``, or each
    epoch with ``logging_strategy="epoch"``; the steps after the last one go into the summary
    the Trainer logs when training ends). Its scalars are added to that log, so every
    ``report_to`` integration (TensorBoard, W&B, MLflow, trackio, Comet, ...) writes them in
    the run that holds ``train/loss``, at the same step, and ``trainer.state.log_history``
    has them; no environment variable is needed. The integrations name them as they name the
    loss: TensorBoard and W&B write ``train/kl/k3/mean``. With ``"tensorboard"`` in
    ``report_to`` the Trainer's own writer also gets the std bands, the custom-scalars layout,
    the histogram and alerts (under ``train/kl/``). Alerts go to the Python log, ``on_alert``
    and any ``sinks`` given; a stop rule stops training at the log that ends its window.

    Feed the monitor from ``compute_loss`` as with the callback:
    ``callback.monitor.update(logprobs, ref_logprobs, mask, token_ids=ids)``. The top
    sequences (on by default) are decoded with the Trainer's ``processing_class`` (its
    tokenizer) unless ``decode`` is given; with ``"tensorboard"`` in ``report_to`` their table
    is a text entry ``train/kl/top_sequences`` in the Trainer's run at each window.

    Args:
        trainer: the ``transformers.Trainer`` (a subclass such as your own is fine).
        monitor: a :class:`~klmonitor.Monitor` you built, or ``None`` to build one from
            ``monitor_kwargs``.
        **monitor_kwargs: :class:`~klmonitor.Monitor`'s arguments (``max_kl``, ``rules``,
            ``stop_on``, ``on_alert``, ``prefix``, ``sinks``, ...). ``log_every_n_steps``
            and ``logging_dir`` are not taken: the Trainer's ``logging_steps`` and its
            integrations decide when and where.

    Returns:
        the callback, first in the Trainer's callbacks (before the integrations, so its
        ``on_log`` adds kl/* before they write the log).
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(
            f"attach() takes a transformers.Trainer (or a subclass), got {type(trainer).__name__}; "
            "for another training loop use klmonitor.Monitor directly"
        )
    for name in ("log_every_n_steps", "logging_dir"):
        if name in monitor_kwargs:
            raise ValueError(
                f"attach(trainer, {name}=...): attached, kl/* are logged at the Trainer's logging steps "
                "by its report_to integrations; set TrainingArguments(logging_steps=...) for the window "
                "length, or use Trainer(callbacks=[KLMonitorCallback(...)]) for klmonitor's own logging."
            )
    callback = KLMonitorCallback(monitor, **monitor_kwargs)
    handler = trainer.callback_handler
    for cb in handler.callbacks:
        if isinstance(cb, KLMonitorCallback) and cb.monitor.prefix == callback.monitor.prefix:
            raise ValueError(
                f"the Trainer already has a KLMonitorCallback with prefix {callback.monitor.prefix!r}; "
                "attach once per Trainer, or give each monitor its own prefix= (e.g. 'kl_sft/')"
            )
    callback._attach(handler, merge_in_on_log=True)
    handler.callbacks.insert(0, callback)
    callback.adopt_tokenizer(_trainer_tokenizer(trainer))
    return callback


def _trainer_tokenizer(trainer: Any) -> Any:
    """The Trainer's tokenizer: ``processing_class`` (transformers >= 4.46), else ``tokenizer``."""
    if hasattr(trainer, "processing_class"):  # newer Trainers warn on (or lack) .tokenizer
        return trainer.processing_class
    return getattr(trainer, "tokenizer", None)


def _stateful_callbacks(state: TrainerState) -> dict[str, Any]:
    """``state.stateful_callbacks``: a dict ``{name: state}`` once the Trainer built it (annotated as a list)."""
    entries: Any = state.stateful_callbacks
    return entries if isinstance(entries, dict) else {}
