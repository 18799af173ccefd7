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

Supported OpenRLHF versions: :data:`SUPPORTED_OPENRLHF` (the ``[openrlhf]`` extra).
``tests/test_openrlhf.py`` checks the ``Experience`` fields relied on, and fails naming what
moved. This module does not import OpenRLHF.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from klmonitor._validate import version_in
from klmonitor.monitor import Monitor

__all__ = ["SUPPORTED_OPENRLHF", "feed"]

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
