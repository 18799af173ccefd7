r"""verl with klmonitor: :func:`feed` a ``DataProto`` into a :class:`~klmonitor.Monitor`, or train with the V1 trainer.

verl logs one number for the KL (``actor/kl_loss`` or ``actor/reward_kl_penalty``: a mean of a
clamped estimator). Its batches carry everything klmonitor needs, on the driver and on the CPU:

* policy: ``old_log_probs`` (the actor's log-probs of the sampled tokens before the update);
* reference: ``ref_log_prob``, computed only when the run uses a reference, i.e. with
  ``actor_rollout_ref.actor.use_kl_loss=True`` or ``algorithm.use_kl_in_reward=True``;
* mask: ``response_mask``;
* the rollout engine's log-probs: ``rollout_log_probs`` (with
  ``actor_rollout_ref.rollout.calculate_log_probs=True``), as ``rollout_logprobs``: the
  monitor adds KL(rollout || trainer) (``kl/rollout/...``), unless it is the very tensor of
  ``old_log_probs`` (rollout-correction ``bypass_mode``, where verl uses the rollout's
  log-probs as the policy's and there is nothing to compare);
* token ids: ``responses``, for ``top_sequences`` and ``top_tokens``.

Two ways in:

1. Your own loop or recipe (the deprecated ``RayPPOTrainer`` included): call
   ``feed(monitor, batch)`` once the batch has ``old_log_probs`` and ``ref_log_prob``, and
   ``monitor.step(global_steps)`` once per step; merge ``result.metrics`` into verl's
   ``metrics`` dict before ``logger.log(...)``.
2. The V1 trainer (verl's default, ``trainer.use_v1=True``): :func:`register` registers
   :func:`trainer_class`'s trainer under a name in verl's trainer registry; choose it with
   ``trainer.v1.trainer_mode=klmonitor``. Registration must happen in verl's Ray driver
   (``TaskRunnerV1``), which Ray's ``worker_process_setup_hook`` does::

       python -m verl.trainer.main_ppo ... \
           trainer.v1.trainer_mode=klmonitor \
           +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=klmonitor.verl.register \
           +trainer.klmonitor.max_kl=0.1

   ``trainer.klmonitor`` holds :class:`~klmonitor.Monitor`'s keyword arguments
   (``log_every_n_steps`` defaults to 1 here: one window per verl step). The trainer feeds
   every step's batch, merges the window's ``kl/*`` scalars into the metrics dict that verl's
   ``Tracking`` sends to every backend (wandb, tensorboard, mlflow, console, ...), and saves
   the monitor's state as ``klmonitor.json`` in each ``global_step_<N>`` checkpoint folder,
   restoring it on resume.

Supported verl versions: :data:`SUPPORTED_VERL` (the ``[verl]`` extra). ``tests/test_verl.py``
checks the field names and the trainer methods relied on, and fails naming what moved.
This module imports verl only when it is used.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from klmonitor._validate import version_in
from klmonitor.monitor import Monitor

log = logging.getLogger("klmonitor")

__all__ = [
    "SUPPORTED_VERL",
    "KLMonitorTrainerMixin",
    "feed",
    "register",
    "trainer_class",
]

#: verl versions this integration is tested with (``pip install klmonitor[verl]``).
SUPPORTED_VERL = ">=0.9,<0.10"
_SUPPORTED_RANGE = ((0, 9), (0, 10))

#: The batch fields read (verl's names).
POLICY, REFERENCE, ROLLOUT, MASK, RESPONSES = (
    "old_log_probs",
    "ref_log_prob",
    "rollout_log_probs",
    "response_mask",
    "responses",
)
#: The config keys that make verl compute ``ref_log_prob``.
REFERENCE_KEYS = "actor_rollout_ref.actor.use_kl_loss=True or algorithm.use_kl_in_reward=True"
#: The file the V1 trainer writes the monitor's state to, in each ``global_step_<N>`` folder.
STATE_FILE = "klmonitor.json"


def _check_verl_version(version: str) -> str | None:
    """A warning when ``version`` is outside :data:`SUPPORTED_VERL`, else ``None``.

    >>> _check_verl_version("0.9.1") is None, _check_verl_version("0.10.0") is None
    (True, False)
    """
    if version_in(version, _SUPPORTED_RANGE):
        return None
    return (
        f"klmonitor.verl is tested with verl{SUPPORTED_VERL} and verl {version} is installed; it relies on "
        "verl's batch field names and V1 trainer methods, which a release may move (run klmonitor's "
        f"tests/test_verl.py to check), or install 'verl{SUPPORTED_VERL}'."
    )


def _fields(batch: Any) -> Any:
    """The tensors of a ``DataProto`` (its ``.batch`` TensorDict), a TensorDict or a dict."""
    if hasattr(batch, "non_tensor_batch") and hasattr(batch, "batch"):  # a DataProto
        tensors = batch.batch
        if tensors is None:
            raise TypeError(
                "klmonitor.verl.feed: this DataProto has no tensors (its .batch is None); pass the "
                f"training batch after verl computed {POLICY!r} (and {REFERENCE!r})"
            )
        return tensors
    if isinstance(batch, Mapping) or (hasattr(batch, "keys") and hasattr(batch, "get")):
        return batch
    raise TypeError(
        "klmonitor.verl.feed takes a verl DataProto, its TensorDict (DataProto.batch, or what "
        f"transfer_queue.kv_batch_get returns) or a dict of tensors, got {type(batch).__name__}"
    )


def _get(tensors: Any, key: str) -> Any:
    return tensors.get(key, None) if key in tensors.keys() else None


def _padded(t: Any) -> Any:
    """A jagged (nested) tensor, as verl's V1 trainer keeps them, padded with zeros; else ``t``."""
    if isinstance(t, Tensor) and t.is_nested:
        return torch.nested.to_padded_tensor(t, 0)
    return t


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """The same storage, shape and strides: one tensor under two names (verl's bypass mode)."""
    return a is b or (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def feed(monitor: Monitor, batch: Any) -> bool:
    """Fold one verl batch into ``monitor`` (no window ends here: call ``monitor.step``).

    Args:
        monitor: the :class:`~klmonitor.Monitor`.
        batch: a verl ``DataProto``, its ``.batch`` TensorDict (padded, or jagged as
            ``transfer_queue.kv_batch_get`` returns them in verl's V1 trainer) or a dict of
            tensors, with ``old_log_probs`` and ``ref_log_prob`` ``[B, T]`` (and optionally
            ``response_mask``, ``rollout_log_probs``, ``responses``).

    Returns:
        ``True`` when the batch was fed; ``False`` when it was skipped (counted with
        :meth:`Monitor.skipped_batch`) after one warning saying why: no ``ref_log_prob``
        (the run has no reference: set ``actor_rollout_ref.actor.use_kl_loss=True`` or
        ``algorithm.use_kl_in_reward=True``) or no ``old_log_probs``. Under
        ``Monitor(strict=True)`` these raise :class:`~klmonitor.monitor.KLMonitorInputError`.

    >>> import torch
    >>> mon = Monitor(log_every_n_steps=1)
    >>> batch = {"old_log_probs": torch.tensor([[-1.0, -2.0]]), "ref_log_prob": torch.tensor([[-1.1, -1.8]]),
    ...          "response_mask": torch.tensor([[1, 1]])}
    >>> feed(mon, batch), round(mon.step(1).summary.k3.mean, 5)
    (True, 0.01312)
    """
    tensors = _fields(batch)
    policy = _padded(_get(tensors, POLICY))
    ref = _padded(_get(tensors, REFERENCE))
    if policy is None:
        monitor.problem(
            "verl:no-policy",
            f"klmonitor.verl: the batch has no {POLICY!r} (its fields: {sorted(tensors.keys())}); feed it "
            "after verl computed the old log-probs (after compute_log_prob). The batch is not monitored.",
        )
        monitor.skipped_batch()
        return False
    if ref is None:
        monitor.problem(
            "verl:no-reference",
            f"klmonitor.verl: the batch has no {REFERENCE!r}: verl computes the reference's log-probs only "
            f"when the run uses them. Set {REFERENCE_KEYS} (a small actor_rollout_ref.actor.kl_loss_coef "
            "such as 1e-4 barely changes the loss), or there is no KL(policy || reference) to monitor. "
            "Batches without it are skipped.",
        )
        monitor.skipped_batch()
        return False
    mask = _padded(_get(tensors, MASK))
    raw_rollout = _get(tensors, ROLLOUT)
    raw_policy = _get(tensors, POLICY)
    rollout = None
    if raw_rollout is not None and not _same_tensor(raw_rollout, raw_policy):
        rollout = _padded(raw_rollout)
    ids = _padded(_get(tensors, RESPONSES))
    if isinstance(ids, Tensor) and (ids.shape != policy.shape or ids.is_floating_point()):
        ids = None  # e.g. multi-turn responses longer than the log-probs: no ids rather than a warning
    monitor.update(policy, ref, mask, rollout_logprobs=rollout, token_ids=ids)
    return True


# -- the V1 trainer ------------------------------------------------------------------------


def _monitor_options(config: Any) -> dict[str, Any]:
    trainer_cfg = config.trainer
    raw = trainer_cfg.get("klmonitor", None) if hasattr(trainer_cfg, "get") else None
    if raw is None:
        return {"log_every_n_steps": 1}
    try:
        from omegaconf import OmegaConf

        opts = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw
    except ImportError:  # pragma: no cover - verl depends on omegaconf
        opts = raw
    if not isinstance(opts, Mapping):
        raise TypeError(
            "trainer.klmonitor must be a mapping of klmonitor.Monitor's keyword arguments "
            f"(e.g. +trainer.klmonitor.max_kl=0.1), got {type(opts).__name__}: {opts!r}"
        )
    opts = {str(k): v for k, v in opts.items()}
    opts.setdefault("log_every_n_steps", 1)
    return opts


class KLMonitorTrainerMixin:
    """The V1 trainer's klmonitor part, mixed before a verl ``PPOTrainer`` subclass.

    :func:`trainer_class` builds ``class KLMonitorPPOTrainerSync(KLMonitorTrainerMixin,
    PPOTrainerSync)``; mix it into your own subclass the same way (the mixin first). It keeps
    the base trainer's mode (``self.trainer_mode``: ``"sync"`` for ``PPOTrainerSync``) so verl's
    replay buffer and checkpoints behave as the base trainer's, whatever name it is registered
    under. Attributes: ``kl_monitor`` (the :class:`~klmonitor.Monitor`), ``kl_result`` (the
    last :class:`~klmonitor.monitor.WindowResult`).
    """

    #: The registry name of the trainer this class extends (verl's ``trainer.v1.trainer_mode``).
    klm_base_mode: str = "sync"
    kl_monitor: Monitor
    kl_result: Any

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        from omegaconf import open_dict

        # verl reads trainer.v1.trainer_mode for the replay buffer, the checkpoint contents and
        # the resume path: they must be the base trainer's, not the name this class is chosen by.
        with open_dict(config):
            config.trainer.v1.trainer_mode = self.klm_base_mode
        self.kl_monitor = Monitor(**_monitor_options(config))
        self.kl_result = None
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]

    # -- the step -----------------------------------------------------------------------------
    def step(self, metrics: dict[str, Any], timing_raw: dict[str, Any]) -> Any:
        """Run verl's step, then feed the batch into the monitor and the window's ``kl/*`` into ``metrics``."""
        batch = super().step(metrics, timing_raw)  # type: ignore[misc]
        start = time.perf_counter()
        trainer: Any = self
        if self.kl_monitor.decode is None:
            decode = getattr(getattr(trainer, "tokenizer", None), "decode", None)
            if callable(decode):
                self.kl_monitor.decode = decode
        feed(self.kl_monitor, self.klm_fetch(batch))
        result = self.kl_monitor.step(int(trainer.global_steps))
        self.kl_result = result
        if result is not None:
            metrics.update(result.metrics)
            if result.stop:
                self._klm_stop(result)
        timing_raw["klmonitor"] = time.perf_counter() - start
        return batch

    def klm_fields(self) -> list[str]:
        """The fields read from verl's TransferQueue for the monitor."""
        trainer: Any = self
        cfg = trainer.config
        fields = [POLICY, MASK, RESPONSES]
        if trainer.use_reference_policy:
            fields.append(REFERENCE)
        corr = cfg.algorithm.get("rollout_correction", None)
        bypass = bool(corr and corr.get("bypass_mode", False))
        if cfg.actor_rollout_ref.rollout.get("calculate_log_probs", False) and not bypass:
            fields.append(ROLLOUT)  # in bypass mode old_log_probs *are* the rollout's
        return fields

    def klm_fetch(self, batch: Any) -> Any:
        """The step's tensors (a TensorDict of jagged tensors) for ``batch``, a ``KVBatchMeta``.

        Padding rows (``tags[i]["is_padding"]``) have an all-zero ``response_mask``: the
        monitor does not count them.
        """
        import transfer_queue as tq

        return tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=self.klm_fields()
        )

    def _klm_stop(self, result: Any) -> None:
        trainer: Any = self
        names = sorted({a.rule for a in result.alerts})
        log.error(
            "klmonitor: alert(s) %s ask to stop training at step %d; verl's loop ends after this step "
            "(no checkpoint is written for it unless save_freq falls on it).",
            names,
            trainer.global_steps,
        )
        trainer.total_training_steps = trainer.global_steps

    # -- checkpoints ----------------------------------------------------------------------------
    def klm_checkpoint_dir(self) -> str:
        """The ``global_step_<N>`` folder verl saves this step's checkpoint to."""
        trainer: Any = self
        return os.path.join(trainer.config.trainer.default_local_dir, f"global_step_{trainer.global_steps}")

    def _save_checkpoint(self) -> None:
        # Written before verl's own files, so that latest_checkpointed_iteration.txt never names
        # a folder without the monitor's state.
        folder = self.klm_checkpoint_dir()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, STATE_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.kl_monitor.state_dict(), f)
        os.replace(tmp, path)
        super()._save_checkpoint()  # type: ignore[misc]

    def _load_checkpoint(self) -> None:
        super()._load_checkpoint()  # type: ignore[misc]
        trainer: Any = self
        if not trainer.global_steps:
            return  # training from scratch
        cfg = trainer.config.trainer
        if cfg.resume_mode == "resume_path":
            folder = str(cfg.resume_from_path)
            if not os.path.isabs(folder):
                folder = os.path.join(os.getcwd(), folder)
        else:
            base = str(cfg.default_local_dir)
            if not os.path.isabs(base):
                base = os.path.join(os.getcwd(), base)
            folder = os.path.join(base, f"global_step_{trainer.global_steps}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path):
            log.warning(
                "klmonitor: resuming from %s, which has no %s (saved without klmonitor's trainer): the "
                "monitor starts fresh (its alert history and drift baselines are lost).",
                folder,
                STATE_FILE,
            )
            self.kl_monitor.reset_window(int(trainer.global_steps))
            return
        with open(path) as f:
            self.kl_monitor.load_state_dict(json.load(f))


_CLASSES: dict[str, type] = {}


def trainer_class(base: str = "sync") -> type:
    """The klmonitor trainer extending verl's V1 trainer registered as ``base`` (built once, cached).

    The class is ``klmonitor.verl.KLMonitor<Base>`` (e.g. ``KLMonitorPPOTrainerSync``), a
    subclass of :class:`KLMonitorTrainerMixin` and of ``verl.trainer.ppo.v1.get_trainer_cls(base)``.
    Imports verl's trainer modules (which need verl's ``[verl-core]`` dependencies).
    """
    if base in _CLASSES:
        return _CLASSES[base]
    import verl
    from verl.trainer.ppo.v1 import get_trainer_cls

    note = _check_verl_version(getattr(verl, "__version__", "0"))
    if note:
        log.warning(note)
    parent = get_trainer_cls(base)
    if issubclass(parent, KLMonitorTrainerMixin):
        raise ValueError(
            f"trainer_class(base={base!r}): {parent.__name__} already is a klmonitor trainer; pass the "
            "name of one of verl's own trainers (sync, colocate_async, separate_async)"
        )
    name = f"KLMonitor{parent.__name__}"
    cls = type(
        name,
        (KLMonitorTrainerMixin, parent),
        {"__module__": __name__, "__qualname__": name, "klm_base_mode": base, "__doc__": parent.__doc__},
    )
    _CLASSES[base] = cls
    globals()[name] = cls  # importable (and picklable) as klmonitor.verl.<name>
    return cls


def register(name: str = "klmonitor", base: str = "sync") -> type:
    """Register :func:`trainer_class` ``(base)`` in verl's V1 trainer registry as ``name``.

    Idempotent; returns the class. With no arguments it is the Ray ``worker_process_setup_hook``
    (``klmonitor.verl.register``) that makes ``trainer.v1.trainer_mode=klmonitor`` work in verl's
    Ray driver. ``name`` must differ from verl's own names (``sync``, ...).
    """
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer

    cls = trainer_class(base)
    if TRAINER_REGISTRY.get(name) is not cls:
        register_trainer(name)(cls)
    return cls


def __getattr__(attr: str) -> Any:
    # KLMonitorPPOTrainerSync etc. without calling trainer_class first (e.g. for unpickling).
    if attr.startswith("KLMonitorPPOTrainer"):
        for base in ("sync", "colocate_async", "separate_async"):
            try:
                cls = trainer_class(base)
            except (ImportError, ValueError):
                continue
            if cls.__name__ == attr:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
