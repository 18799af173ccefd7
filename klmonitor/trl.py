"""TRL's ``GRPOTrainer`` with klmonitor: :class:`KLMonitorGRPOTrainer` (or the mixin, for subclasses).

TRL logs one number for the KL (a token mean of k3, only when ``beta > 0``). This module feeds
every micro-batch of sampled completions into a :class:`~klmonitor.transformers.KLMonitorCallback`
from ``compute_loss``, with no extra forward pass when TRL already computes the reference, and
logs the ``kl/*`` scalars in TRL's own log: a window ends at each of TRL's training logs
(``logging_steps``) and its scalars join that log beside TRL's ``kl``, ``reward``, ``loss``, so
every ``report_to`` integration writes them in the run that holds ``train/kl`` (TensorBoard and
W&B name them ``train/kl/k3/mean``, ...), and ``trainer.state.log_history`` has them.

* policy log-probs: the current policy's on every pass, taken from TRL's own forward pass in
  ``_compute_loss`` (what TRL's ``kl`` measures; with ``num_iterations > 1`` or
  ``steps_per_generation`` above the accumulation steps, each pass over a generation batch
  scores it with the policy of that pass), so ``kl/k3/mean`` equals TRL's ``kl`` when they
  measure the same tokens (one micro-batch per logging step: TRL averages micro-batch means,
  klmonitor pools the window's tokens);
* reference log-probs: ``inputs["ref_per_token_logps"]``, which TRL computes when
  ``GRPOConfig(beta > 0)``. Under TRL's default ``beta=0.0`` there are none: set ``beta``
  (any positive value; a small one such as ``1e-4`` barely changes the loss but costs the
  reference model's memory and one forward per generation batch), or pass
  ``kl_ref_model=`` (a model or a path) and klmonitor runs the reference forward itself, per
  micro-batch, without gradient, prepared as TRL prepares its own reference (fused log-prob
  head at the same temperature, ``accelerator.prepare_model(..., evaluation_mode=True)``;
  under DeepSpeed ZeRO-3 or FSDP use ``beta > 0`` instead);
* mask: ``completion_mask`` (times ``tool_mask``: tool output was not sampled by the policy);
* the rollout engine's log-probs (``inputs["sampling_per_token_logps"]``, with vLLM) as
  ``rollout_logprobs``: the monitor adds KL(sampler || trainer's policy) on the sampler's own
  tokens (``kl/rollout/...``, the ``rollout_mismatch`` rule). Without them (no vLLM) the
  ``klmonitor`` logger says once, at INFO, that the rollout check has nothing to compare;
* the completion ids (``inputs["completion_ids"]``) as ``token_ids``, and the trainer's
  tokenizer as ``decode`` (unless given), for ``top_sequences`` and ``top_tokens``.

Usage (three lines)::

    from klmonitor.trl import KLMonitorGRPOTrainer
    trainer = KLMonitorGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(beta=0.04, ...),
                                   train_dataset=..., kl_monitor={"max_kl": 0.1})
    trainer.train()  # kl/* in TRL's log (every report_to tracker); trainer.kl_callback.monitor

Supported TRL versions: :data:`SUPPORTED_TRL` (the ``[trl]`` extra). The mixin relies on
``GRPOTrainer.compute_loss``, ``GRPOTrainer._get_per_token_logps_and_entropies`` and the
names of the ``inputs`` keys above, and ``trl.trainer.utils.add_fused_lm_head`` (to prepare
``kl_ref_model`` as TRL prepares its own reference); ``tests/test_trl.py`` fails with a clear message when a
TRL release moves one of them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from klmonitor._validate import version_in
from klmonitor.transformers import KLMonitorCallback

log = logging.getLogger("klmonitor")

__all__ = ["SUPPORTED_TRL", "KLMonitorGRPOMixin", "KLMonitorGRPOTrainer"]

#: TRL versions this integration is tested with (``pip install klmonitor[trl]``).
SUPPORTED_TRL = ">=1.16,<1.17"
_SUPPORTED_RANGE = ((1, 16), (1, 17))


def _check_trl_version(version: str) -> str | None:
    """A warning when ``version`` is outside :data:`SUPPORTED_TRL`, else ``None``.

    >>> _check_trl_version("1.16.0") is None, _check_trl_version("1.17.0.dev0") is None
    (True, False)
    """
    if version_in(version, _SUPPORTED_RANGE):
        return None
    return (
        f"klmonitor.trl is tested with trl{SUPPORTED_TRL} and trl {version} is installed; it relies "
        "on GRPOTrainer internals that TRL may move (run klmonitor's tests/test_trl.py to check), or "
        f"install 'trl{SUPPORTED_TRL}'."
    )


def _as_callback(value: Any) -> KLMonitorCallback:
    if isinstance(value, KLMonitorCallback):
        return value
    if value is None:
        return KLMonitorCallback()
    if isinstance(value, Mapping):
        return KLMonitorCallback(**value)
    raise TypeError(
        f"kl_monitor must be a KLMonitorCallback, a dict of its keyword arguments (e.g. {{'max_kl': 0.1}}) "
        f"or None, got {type(value).__name__}"
    )


class KLMonitorGRPOMixin:
    """Mix into a ``GRPOTrainer`` (subclass) to monitor KL(policy || reference) per micro-batch.

    ``class MyTrainer(KLMonitorGRPOMixin, MyGRPOTrainer): ...`` (the mixin first). Keyword
    arguments, taken before the trainer's own:

    Args:
        kl_monitor: a :class:`~klmonitor.transformers.KLMonitorCallback`, or a dict of its
            arguments (``max_kl``, ``rules``, ``stop_on``, ``sinks``, ...), or ``None`` for
            the defaults. Added to the trainer's callbacks; ``self.kl_callback``. Its windows
            end at TRL's logging steps (``GRPOConfig(logging_steps=...)``), so
            ``log_every_n_steps`` may only repeat ``logging_steps`` and ``logging_dir`` is
            not taken (TRL's integrations write the kl/* scalars).
        kl_ref_model: the reference model (or a path for ``AutoModelForCausalLM``) when
            ``beta == 0``, TRL's default, where TRL computes no reference log-probs. Must be
            ``None`` when ``beta > 0`` (TRL's reference is used).
    """

    kl_callback: KLMonitorCallback
    kl_ref_model: torch.nn.Module | None

    def __init__(
        self,
        *args: Any,
        kl_monitor: KLMonitorCallback | Mapping[str, Any] | None = None,
        kl_ref_model: PreTrainedModel | str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(self, GRPOTrainer):
            raise TypeError(
                f"KLMonitorGRPOMixin must be mixed into a trl.GRPOTrainer subclass, and {type(self).__name__} "
                "is not one; write class MyTrainer(KLMonitorGRPOMixin, GRPOTrainer)"
            )
        kl_callback = _as_callback(kl_monitor)
        super().__init__(*args, **kwargs)
        trainer: Any = self
        beta = float(trainer.beta)
        if beta == 0.0 and kl_ref_model is None:
            raise ValueError(
                "klmonitor: GRPOConfig(beta=0.0) (TRL's default) computes no reference log-probs, so there "
                "is no KL(policy || reference) to monitor. Set GRPOConfig(beta=...) > 0 (e.g. 0.04; a small "
                "value such as 1e-4 barely changes the loss), or pass kl_ref_model=<the reference model or "
                "its path> and klmonitor computes the reference log-probs itself."
            )
        if beta != 0.0 and kl_ref_model is not None:
            raise ValueError(
                f"klmonitor: kl_ref_model is for beta=0.0 only; with beta={beta} TRL already computes the "
                "reference log-probs (from its ref_model) and klmonitor uses them. Drop kl_ref_model."
            )
        ref_model: Any = kl_ref_model
        if isinstance(ref_model, str):
            ref_model = AutoModelForCausalLM.from_pretrained(ref_model)
        if ref_model is not None:
            if not isinstance(ref_model, PreTrainedModel):
                raise TypeError(
                    f"kl_ref_model must be a transformers causal LM, a model path or None, got "
                    f"{type(ref_model).__name__}"
                )
            # As TRL prepares its own reference: the fused log-prob head (same temperature) and
            # the accelerator's evaluation wrapping (device, mixed-precision autocast).
            ref_model.eval().requires_grad_(False)
            add_fused_lm_head(
                ref_model,
                temperature=trainer.temperature,
                cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32,
            )
            ref_model = trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.kl_ref_model = ref_model

        self.kl_callback = kl_callback
        if (
            kl_callback.log_every_n_steps is not None
            and kl_callback.log_every_n_steps == trainer.args.logging_steps
        ):
            kl_callback.log_every_n_steps = None  # the same window length as TRL's logs: nothing to decide
        kl_callback._attach(trainer.callback_handler, merge_in_on_log=False)  # self.log merges kl/*
        trainer.add_callback(kl_callback)
        # The top sequences and tokens as text: the tokenizer's decode, unless decode= was given.
        kl_callback.adopt_tokenizer(getattr(trainer, "processing_class", None))
        self._klm_capture = False
        self._klm_policy_logps: Tensor | None = None
        self._klm_told_no_rollout = False

    # -- TRL hooks -------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's method; the first call inside :meth:`compute_loss` is the policy's, kept for the monitor."""
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)  # type: ignore[misc]
        if self._klm_capture:
            self._klm_capture = False
            self._klm_policy_logps = out[0] if isinstance(out, tuple | list) else None
        return out

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """TRL's loss; then the micro-batch's log-probs go to the monitor(s) (no host sync).

        The policy's log-probs are those TRL's loss computes in this pass (the current policy,
        also when ``old_per_token_logps`` holds the generation-time policy's for the ratio).
        """
        self._klm_capture = True
        self._klm_policy_logps = None
        try:
            loss = super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            self._klm_capture = False
        policy = self._klm_policy_logps
        self._klm_policy_logps = None
        if model.training:  # evaluation (prediction_step) calls compute_loss too: not training's KL
            self._feed(inputs, policy)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log; a training log first ends the window and takes its ``kl/*`` scalars.

        TRL adds its own metrics (``kl``, ``reward``, ...) to the same dict, so every
        ``report_to`` integration writes both in one run, at one step, and
        ``state.log_history`` holds them. Evaluation logs are left alone.
        """
        trainer: Any = self
        logs.update(self.kl_callback.window_for_log(logs, trainer.state, trainer.control))
        super().log(logs, start_time)  # type: ignore[misc]

    # -- feeding the monitors --------------------------------------------------------------
    def _feed(self, inputs: Mapping[str, Any], policy: Tensor | None) -> None:
        mon = self.kl_callback.monitor
        mask = inputs.get("completion_mask")
        if mask is not None and inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]
        if policy is None or mask is None:
            missing = "completion_mask" if mask is None else "the policy's per-token log-probs"
            mon.problem(
                "trl-inputs",
                f"klmonitor: GRPOTrainer gave no {missing} for this micro-batch (a TRL version outside "
                f"{SUPPORTED_TRL}, or a loss path such as Liger's that skips _compute_loss); it is not "
                "monitored.",
            )
            mon.skipped_batch()
            return
        ref = self._reference_logps(inputs)
        if ref is None:
            mon.skipped_batch()
            return
        if inputs.get("sampling_per_token_logps") is None and not self._klm_told_no_rollout:
            self._klm_told_no_rollout = True
            log.info(
                "klmonitor: TRL gives no sampler log-probs (sampling_per_token_logps: the completions "
                "were generated without vLLM, or vllm_importance_sampling_correction=False), so the "
                "rollout check (kl/rollout/*, rule rollout_mismatch) has nothing to compare and is off."
            )
        # The sampler's log-probs of its own tokens (vLLM): KL(sampler || trainer's policy).
        mon.update(
            policy,
            ref,
            mask,
            rollout_logprobs=inputs.get("sampling_per_token_logps"),
            token_ids=inputs.get("completion_ids"),
            # The trainer's policy at generation time (TRL keeps it for the ratio when
            # num_iterations > 1 or with vLLM): the policy update's size, kl/update/*.
            behaviour_logprobs=inputs.get("old_per_token_logps"),
        )

    def _reference_logps(self, inputs: Mapping[str, Any]) -> Tensor | None:
        ref = inputs.get("ref_per_token_logps")
        if ref is not None:
            return ref
        if self.kl_ref_model is None:
            self.kl_callback.monitor.problem(
                "trl-no-ref",
                "klmonitor: GRPOTrainer gave no ref_per_token_logps although beta > 0 (a TRL version "
                f"outside {SUPPORTED_TRL}?); the KL is not monitored.",
            )
            return None
        trainer: Any = self
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad():
            out = trainer._get_per_token_logps_and_entropies(
                self.kl_ref_model, input_ids, attention_mask, completion_ids.size(1)
            )
        logps: Tensor = out[0]
        return logps


class KLMonitorGRPOTrainer(KLMonitorGRPOMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with klmonitor: the same arguments plus those of :class:`KLMonitorGRPOMixin`."""


def _warn_if_unsupported() -> None:
    import trl

    message = _check_trl_version(str(getattr(trl, "__version__", "0")))
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=3)


_warn_if_unsupported()
