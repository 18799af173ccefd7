"""OpenRLHF with klmonitor: :func:`feed` an ``Experience`` into a :class:`~klmonitor.Monitor`.

OpenRLHF logs one number for the KL (``kl``: a mean of its estimator). Its ``Experience``
objects carry, on the driver and on the CPU after ``make_experience``:

* policy: ``action_log_probs`` (the actor's log-probs of the sampled tokens);
* reference: ``base_action_log_probs``, kept only with ``--algo.kl.use_loss`` (the KL in the
  loss). With the KL in the reward instead, ``make_experience`` computes the per-token ``kl``
  and then drops the reference's log-probs (``base_action_log_probs = None``), so there is no
  KL(policy || reference) to monitor; an upstream change that kept them (they are already on
  the driver) would lift this;
* mask: ``action_mask``;
* the rollout engine's log-probs: ``rollout_log_probs`` (vLLM), as ``rollout_logprobs``:
  KL(rollout || trainer), ``kl/rollout/...``;
* token ids: the tokens the log-probs score, ``sequences[:, 1:]`` (its last ``action_mask.shape[1]`` columns),
  for ``top_sequences`` and ``top_tokens``.

Usage: after each ``make_experience`` call, ``for e in experiences: feed(monitor, e)``; then
``monitor.step(global_step)`` once per training step, merging ``result.metrics`` into
OpenRLHF's ``status`` dict before it is logged.

Or let klmonitor do it: ``python -m klmonitor.openrlhf <train_ppo_ray's arguments>
--algo.kl.use_loss [--klmonitor.<Monitor kwarg> VALUE ...]`` runs OpenRLHF's
``openrlhf.cli.train_ppo_ray`` with its ``PPOTrainer`` swapped for :func:`trainer_class`'s
(``PPOTrainer.__ray_actor_class__`` with :class:`KLMonitorTrainerMixin`): each step's
Experiences are fed on the driver, the window's ``kl/*`` join OpenRLHF's logged status
(``train/kl/...`` in W&B and TensorBoard), a stop alert ends training after the step, and the
monitor's state rides in OpenRLHF's checkpoints (``client_states``). Synchronous trainer only
(not ``--train.async_enable``).

Supported OpenRLHF versions: :data:`SUPPORTED_OPENRLHF` (the ``[openrlhf]`` extra).
``tests/test_openrlhf.py`` checks the ``Experience`` fields relied on, and fails naming what
moved. This module does not import OpenRLHF.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
import time
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from klmonitor._validate import version_in
from klmonitor.monitor import Monitor

__all__ = ["SUPPORTED_OPENRLHF", "KLMonitorTrainerMixin", "feed", "main", "trainer_class"]

log = logging.getLogger(__name__)

#: OpenRLHF versions this integration is tested with (``pip install klmonitor[openrlhf]``).
SUPPORTED_OPENRLHF = ">=0.11,<0.12"
_SUPPORTED_RANGE = ((0, 11), (0, 12))

#: The ``Experience`` fields read (OpenRLHF's names).
POLICY, REFERENCE, ROLLOUT, MASK, SEQUENCES = (
    "action_log_probs",
    "base_action_log_probs",
    "rollout_log_probs",
    "action_mask",
    "sequences",
)


def _check_openrlhf_version(version: str) -> str | None:
    """A warning when ``version`` is outside :data:`SUPPORTED_OPENRLHF`, else ``None``.

    >>> _check_openrlhf_version("0.11.2") is None, _check_openrlhf_version("0.12.0") is None
    (True, False)
    """
    if version_in(version, _SUPPORTED_RANGE):
        return None
    return (
        f"klmonitor.openrlhf is tested with openrlhf{SUPPORTED_OPENRLHF} and openrlhf {version} is "
        "installed; it relies on Experience's field names, which a release may move (run klmonitor's "
        f"tests/test_openrlhf.py to check), or install 'openrlhf{SUPPORTED_OPENRLHF}'."
    )


def feed(monitor: Monitor, experience: Any) -> bool:
    """Fold one OpenRLHF ``Experience`` into ``monitor`` (no window ends here: call ``monitor.step``).

    Returns:
        ``True`` when it was fed; ``False`` when it was skipped (counted with
        :meth:`Monitor.skipped_batch`) after one warning saying why: no
        ``base_action_log_probs`` (run with ``--algo.kl.use_loss``) or no
        ``action_log_probs``. Under ``Monitor(strict=True)`` these raise
        :class:`~klmonitor.monitor.KLMonitorInputError`.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> exp = SimpleNamespace(action_log_probs=torch.tensor([[-1.0, -2.0]]),
    ...                       base_action_log_probs=torch.tensor([[-1.1, -1.8]]),
    ...                       action_mask=torch.tensor([[True, True]]), rollout_log_probs=None,
    ...                       sequences=None)
    >>> mon = Monitor(log_every_n_steps=1)
    >>> feed(mon, exp), round(mon.step(1).summary.k3.mean, 5)
    (True, 0.01312)
    """
    if not all(hasattr(experience, name) for name in (POLICY, REFERENCE, MASK)):
        raise TypeError(
            f"klmonitor.openrlhf.feed takes an OpenRLHF Experience (with {POLICY}, {REFERENCE}, {MASK}), "
            f"got {type(experience).__name__}"
        )
    policy = getattr(experience, POLICY)
    ref = getattr(experience, REFERENCE)
    if policy is None:
        monitor.problem(
            "openrlhf:no-policy",
            f"klmonitor.openrlhf: this Experience has no {POLICY}; feed it after make_experience filled "
            "it in. The batch is not monitored.",
        )
        monitor.skipped_batch()
        return False
    if ref is None:
        monitor.problem(
            "openrlhf:no-reference",
            f"klmonitor.openrlhf: this Experience has no {REFERENCE}: OpenRLHF keeps the reference's "
            "log-probs only with --algo.kl.use_loss (the KL in the loss; with the KL in the reward it "
            "drops them after computing its own kl). Run with --algo.kl.use_loss (a small "
            "--algo.kl.init_coef such as 1e-4 barely changes the loss), or there is no "
            "KL(policy || reference) to monitor. Experiences without it are skipped.",
        )
        monitor.skipped_batch()
        return False
    mask = getattr(experience, MASK)
    rollout = getattr(experience, ROLLOUT, None)
    if rollout is not None and rollout is policy:
        rollout = None
    ids = None
    seq = getattr(experience, SEQUENCES, None)
    if isinstance(seq, Tensor) and isinstance(policy, Tensor) and policy.dim() == 2 and seq.dim() == 2:
        width = policy.shape[1]
        if seq.shape[0] == policy.shape[0] and seq.shape[1] >= width and not seq.is_floating_point():
            ids = seq[:, seq.shape[1] - width :]  # the response tokens: OpenRLHF's actions
    monitor.update(policy, ref, mask, rollout_logprobs=rollout, token_ids=ids)
    return True


#: The key of the monitor's state in OpenRLHF's checkpoint ``client_states``.
STATE_KEY = "klmonitor"
#: The constructor keyword the launcher passes the Monitor's options with.
OPTIONS_KWARG = "klmonitor_options"
_CLASS_NAME = "KLMonitorPPOTrainer"


class KLMonitorTrainerMixin:
    """Monitors OpenRLHF's (synchronous) ``PPOTrainer``; put it first in the bases.

    * ``__init__(..., klmonitor_options={...})``: the :class:`~klmonitor.Monitor`'s keyword
      arguments (``log_every_n_steps`` defaults to ``--logger.logging_steps``, so each window
      ends on a step OpenRLHF logs). The monitor is ``self.kl_monitor``; the last window's
      result ``self.kl_result``.
    * ``experience_maker.make_experience_batch`` is wrapped: its Experiences (on the driver)
      are fed as they are made (before the policy update: the rollout's policy).
    * ``train_step``: OpenRLHF's step, then ``monitor.step(global_step)``; the window's
      metrics join the returned ``status`` (logged by ``save_logs_and_checkpoints``), with
      ``timing/klmonitor``.
    * A stop alert: an error is logged and the sample generator reports the data exhausted,
      so ``fit`` ends after this step (its logs and checkpoint, if ``--ckpt.save_steps``
      falls on it, are written as usual).
    * Checkpoints: the monitor's state is put in ``client_states[STATE_KEY]``, which OpenRLHF's
      actor saves with its DeepSpeed checkpoint; ``init_checkpoint_states`` restores it on
      resume (a checkpoint without it: one warning, a fresh window from the resumed step).
      With ``--ckpt.disable_ds`` OpenRLHF saves no client_states, so the monitor restarts.
    """

    kl_monitor: Monitor
    kl_result: Any
    kl_stop_requested: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = kwargs.pop(OPTIONS_KWARG, None)
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise TypeError(
                f"{OPTIONS_KWARG} takes a dict of klmonitor.Monitor keyword arguments, got {type(options).__name__}"
            )
        super().__init__(*args, **kwargs)
        trainer: Any = self
        options = dict(options)
        options.setdefault("log_every_n_steps", _logging_steps(trainer.args))
        self.kl_monitor = Monitor(**options)
        self.kl_result = None
        self.kl_stop_requested = False
        decode = getattr(getattr(trainer, "tokenizer", None), "decode", None)
        if self.kl_monitor.decode is None and callable(decode):
            self.kl_monitor.decode = decode
        maker = trainer.experience_maker
        make = maker.make_experience_batch
        monitor = self.kl_monitor

        def make_experience_batch(*a: Any, **k: Any) -> Any:
            experiences = make(*a, **k)
            for experience in experiences:
                feed(monitor, experience)
            return experiences

        maker.make_experience_batch = make_experience_batch
        generator = trainer.samples_generator
        generate = generator.generate_samples

        def generate_samples(*a: Any, **k: Any) -> Any:
            if self.kl_stop_requested:
                return [], None, 0, True  # fit's loop: no samples and the data exhausted -> it ends
            return generate(*a, **k)

        generator.generate_samples = generate_samples

    def train_step(self, rollout_samples: Any, global_step: int) -> Any:
        """OpenRLHF's step, then the monitor's; ``kl/*`` join the status at a window's end."""
        status, step = super().train_step(rollout_samples, global_step)  # type: ignore[misc]
        start = time.perf_counter()
        result = self.kl_monitor.step(int(step))
        self.kl_result = result
        if result is not None:
            status.update(result.metrics)
            if result.stop and not self.kl_stop_requested:
                self.kl_stop_requested = True
                log.error(
                    "klmonitor: alert(s) %s ask to stop training at step %d; OpenRLHF's fit ends after "
                    "this step (a checkpoint is written only if --ckpt.save_steps falls on it).",
                    sorted({a.rule for a in result.alerts}),
                    step,
                )
        status["timing/klmonitor"] = time.perf_counter() - start
        return status, step

    def save_logs_and_checkpoints(
        self, global_step: int, logs_dict: Any = None, client_states: Any = None
    ) -> Any:
        """Adds the monitor's state to ``client_states`` (saved with OpenRLHF's checkpoint)."""
        if client_states is None:
            client_states = {}
        client_states[STATE_KEY] = self.kl_monitor.state_dict()
        return super().save_logs_and_checkpoints(global_step, logs_dict, client_states)  # type: ignore[misc]

    def init_checkpoint_states(self) -> Any:
        """OpenRLHF's checkpoint states; restores the monitor's from them on resume."""
        states = super().init_checkpoint_states()  # type: ignore[misc]
        saved = states.get(STATE_KEY) if isinstance(states, dict) else None
        step = int(states.get("global_step", 0) or 0) if isinstance(states, dict) else 0
        if saved is not None:
            self.kl_monitor.load_state_dict(saved)
        elif step > 0:
            self.kl_monitor.problem(
                "openrlhf:no-state",
                f"klmonitor.openrlhf: resuming at step {step} from a checkpoint without the monitor's state "
                f"(client_states[{STATE_KEY!r}]: saved by an earlier run without klmonitor, or with "
                "--ckpt.disable_ds); the monitor starts a fresh window from this step.",
            )
            self.kl_monitor.reset_window(step)
        return states


def _logging_steps(args: Any) -> int:
    steps = getattr(getattr(args, "logger", None), "logging_steps", 1)
    try:
        n = int(steps)
    except (TypeError, ValueError, OverflowError):
        return 1
    return n if n >= 1 else 1


_TRAINER: type | None = None


def trainer_class() -> type:
    """``KLMonitorPPOTrainer``: :class:`KLMonitorTrainerMixin` on OpenRLHF's ``PPOTrainer`` (plain class).

    OpenRLHF's ``PPOTrainer`` is a Ray actor class; this derives from its
    ``__ray_actor_class__``. Built once, importable as ``klmonitor.openrlhf.KLMonitorPPOTrainer``
    (so Ray's workers unpickle it by name). Make a Ray actor of it with ``ray.remote(cls)``.
    """
    global _TRAINER
    if _TRAINER is None:
        import importlib.metadata

        from openrlhf.trainer.ppo_trainer import PPOTrainer

        warning = _check_openrlhf_version(importlib.metadata.version("openrlhf"))
        if warning:
            log.warning(warning)
        parent = getattr(PPOTrainer, "__ray_actor_class__", PPOTrainer)
        _TRAINER = type(
            _CLASS_NAME,
            (KLMonitorTrainerMixin, parent),
            {"__module__": __name__, "__qualname__": _CLASS_NAME, "__doc__": parent.__doc__},
        )
    return _TRAINER


def __getattr__(attr: str) -> Any:
    if attr == _CLASS_NAME:
        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


class _RemoteWithOptions:
    """Stands for OpenRLHF's ``PPOTrainer`` in ``train_ppo_ray``: ``.remote(...)`` adds the options."""

    def __init__(self, actor_class: Any, options: dict[str, Any]) -> None:
        self.actor_class = actor_class
        self.options = options

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.actor_class.remote(*args, **{OPTIONS_KWARG: self.options}, **kwargs)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a plain string (a rule name, a path)


def split_args(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """OpenRLHF's arguments and the Monitor's options (``--klmonitor.KEY VALUE`` or ``=VALUE``).

    Values are JSON when they parse as JSON (``0.1``, ``true``, ``["k3_max"]``), else strings.

    >>> split_args(["--algo.kl.use_loss", "--klmonitor.max_kl", "0.1", "--klmonitor.stop_on=kl_budget"])
    (['--algo.kl.use_loss'], {'max_kl': 0.1, 'stop_on': 'kl_budget'})
    """
    rest: list[str] = []
    options: dict[str, Any] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--klmonitor."):
            key, eq, text = arg[len("--klmonitor.") :].partition("=")
            if not key.isidentifier():
                raise ValueError(
                    f"{arg!r}: write --klmonitor.<Monitor keyword> VALUE, e.g. --klmonitor.max_kl 0.1"
                )
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{arg} needs a value, e.g. {arg} 0.1")
                i += 1
                text = argv[i]
            options[key] = _value(text)
        else:
            rest.append(arg)
        i += 1
    return rest, options


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m klmonitor.openrlhf <train_ppo_ray's arguments> [--klmonitor.KEY VALUE ...]``.

    Runs ``openrlhf.cli.train_ppo_ray`` as ``__main__`` with its ``PPOTrainer`` swapped for
    :func:`trainer_class`'s Ray actor, given the ``--klmonitor.*`` options as Monitor kwargs.
    """
    args, options = split_args(sys.argv[1:] if argv is None else argv)
    if any(a == "--train.async_enable" or a.startswith("--train.async_enable=") for a in args):
        raise SystemExit(
            "klmonitor.openrlhf monitors OpenRLHF's synchronous PPOTrainer only: drop --train.async_enable "
            "(or call klmonitor.openrlhf.feed on the Experiences in your own async trainer)"
        )
    if "--algo.kl.use_loss" not in args:
        log.warning(
            "klmonitor.openrlhf: --algo.kl.use_loss is not set: OpenRLHF then drops the reference's "
            "log-probs and there is no KL(policy || reference) to monitor (add --algo.kl.use_loss)."
        )
    Monitor(**options)  # bad options fail here, before Ray starts, with Monitor's message
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    import ray

    ppo_trainer.PPOTrainer = _RemoteWithOptions(ray.remote(trainer_class()), options)
    sys.argv = ["openrlhf.cli.train_ppo_ray", *args]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    # Run as ``python -m klmonitor.openrlhf``: this file is ``__main__``; the trainer class must
    # come from the importable ``klmonitor.openrlhf`` (Ray's workers unpickle it by that name).
    from klmonitor.openrlhf import main as _main

    _main()
