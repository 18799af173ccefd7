"""Monitor: the framework-free product. Windows, histogram, alerts, sinks and checkpoint state.

Every way of training drives the same object: call :meth:`Monitor.update` with each
micro-batch's log-probs (on device, no host sync), :meth:`Monitor.step` once per optimizer step
(it ends the window at each ``log_every_n_steps`` boundary) and :meth:`Monitor.flush` at the end
of training. The adapters (:mod:`klmonitor.lightning`, :mod:`klmonitor.pytorch_lightning`,
:mod:`klmonitor.transformers`) only translate their framework's events into these calls.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import pickle
import random
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import numpy as np
import torch
from torch import Tensor

from klmonitor import _layout as lay
from klmonitor import _native
from klmonitor import estimators as est
from klmonitor._validate import check_bool, check_callables, check_int, check_number, check_str
from klmonitor.alerts import Alert, AlertEngine, Rule, default_rules
from klmonitor.diagnostics import (
    Decode,
    EntropyMoments,
    InitialCheck,
    PositionProfile,
    RatioRange,
    TopSequences,
    TopTokens,
    token_k3,
)
from klmonitor.fdiv import FDivergence
from klmonitor.sinks import Sink, WarnOnce, make_sinks
from klmonitor.stats import KLStats
from klmonitor.summary import KLSummary, Level, RolloutSummary, read_f
from klmonitor.window import FMoments, Moments, Window
from klmonitor.window import distributed as _distributed

log = logging.getLogger("klmonitor")

__all__ = ["STATE_VERSION", "KLMonitorInputError", "Monitor", "WindowResult"]

#: Version of :meth:`Monitor.state_dict`'s layout; a newer one is not loaded.
STATE_VERSION = 3
# Versions this code reads: 1 (the callback's state before Monitor existed) has the same keys;
# 3 adds "config" (what the state was made with) and "histogram" (the ring buffer), read with
# defaults when absent.
_READABLE_VERSIONS = (1, 2, 3)
#: Most threads that scatter into the fused kernel's token tables (each holds 2 x vocab_size
#: float64 numbers: 0.8 MB for 50,257 ids).
_SCRATCH_TABLES = 8

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _locked(fn: _Fn) -> _Fn:
    """Run a :class:`Monitor` method under the monitor's lock.

    A rollout thread may call ``update`` while the trainer's thread calls ``step``.
    """

    @functools.wraps(fn)
    def locked(self: Monitor, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return cast(_Fn, locked)


class KLMonitorInputError(ValueError):
    """A problem with the monitor's input or state, raised under ``strict=True`` (a ``ValueError``)."""


@dataclass
class WindowResult:
    """What ending one window produced (the same on every rank of a distributed job).

    Attributes:
        step: the step the window was logged at.
        summary: the window's :class:`KLSummary`, reduced over all ranks.
        alerts: the alerts that fired on it.
        stop: ``True`` when an alert asks to stop training (``stop_on`` or ``stop_training``).
        metrics: the scalars logged, ``{name: value}`` (names under the monitor's prefix).
        histogram: the sampled log-ratios logged as a histogram (``None`` when off).
    """

    step: int
    summary: KLSummary
    alerts: list[Alert] = field(default_factory=list)
    stop: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    histogram: np.ndarray | None = None


def _host_array(t: Tensor) -> np.ndarray:
    """A CPU tensor as a float32 (or bool/integer) numpy array; bf16/fp16 go through float32."""
    if t.dtype in (torch.bfloat16, torch.float16, torch.float64):
        t = t.float()
    return t.numpy()


class Monitor:
    r"""KL(policy || reference) monitoring for any training loop.

    Args:
        log_every_n_steps: optimizer steps per window; windows are ``(0, N]``, ``(N, 2N]``, ...
        sinks: where numbers and alerts go (a list, or one): ``SummaryWriter``, W&B run,
            Lightning/Fabric loggers, callables ``fn(metrics, step)``; see
            :func:`klmonitor.sinks.as_sink`. ``None``: the Python log only.
        rules: alert rules; ``None`` uses :func:`klmonitor.alerts.default_rules` with
            ``max_kl``; ``[]`` disables alerts.
        max_kl: a KL budget (per token, or per sequence at sequence level) added to the
            default rules as ``kl_budget``.
        max_update_kl: a limit on the policy update's size, KL(behaviour || current) per token
            (PPO's target KL, ``behaviour_logprobs`` in :meth:`update`), added to the default
            rules as ``update_size``.
        on_alert: a callable, or a list of them, called with each :class:`Alert` on rank 0.
        stop_on: names of rules whose firing sets ``WindowResult.stop`` (as do rules built
            with ``stop_training=True``); decided identically on every rank.
        prefix: prefix of every logged name.
        level: ``"token"`` or ``"sequence"`` statistics (see :class:`~klmonitor.KLStats`).
        histogram: log a histogram of a sample of the window's log-ratios.
        histogram_samples: log-ratios kept per window for the histogram (a ring buffer on
            device, filled with a contiguous run at a random offset of each batch).
        strict: raise :class:`KLMonitorInputError` on bad input or state instead of warning
            once per kind of problem and skipping it.
        clamp: ``None`` (default): exact values, no clamp; a number clamps log-ratios to
            ``[-clamp, clamp]`` as peers do (biased; see :class:`~klmonitor.KLStats`).
        extreme: tokens with ``|log-ratio|`` above this many nats (default 20) are counted in
            ``kl/extreme`` and fire the ``extreme`` rule; their values still count exactly.
        backend: :class:`~klmonitor.KLStats`' backend.
        alert_history_size: alerts kept in :attr:`alert_history` (oldest dropped first).
        wandb_alert_wait_s: W&B's minimum seconds between two alerts with the same title.
        rank: this process's global rank; ``None`` reads it from ``torch.distributed`` (0
            when it is not initialised). Only rank 0 writes to sinks.
        by_position: keep the mean k3 per position bucket (``[B, T]`` inputs; nothing for
            ``[N]`` ones): ``summary.by_position``, the scalars
            ``kl/by_position/<bucket>/k3`` and ``.../tokens`` and a table
            ``kl/by_position``. On by default (the fused kernels sum the buckets in their
            pass; ``benchmarks/bench_diagnostics.py`` measures the cost); ``False`` turns it off.
        position_buckets: buckets of token positions: 0-1, 2-3, 4-7, ..., the last open-ended.
        position_rows: rows of each batch the position profile reads (an evenly strided sample
            at a random offset, so its cost stays small whatever the batch; an unbiased
            estimate of each bucket's mean); ``None`` reads every row (exact). Every row is
            read anyway when ``top_sequences`` or ``top_tokens`` is on.
        top_sequences: keep the window's K sequences with the largest summed k3 (``[B, T]``
            inputs): ``summary.top_sequences``, a table ``kl/top_sequences`` (TensorBoard
            text, a W&B table) per window, as text when ``token_ids`` and ``decode`` are
            given. 5 by default; ``0`` turns it off.
        top_sequences_max_len: token ids and per-token k3 kept per top sequence.
        top_tokens: keep the K vocabulary entries contributing the most summed k3 (0: off;
            needs ``token_ids`` in :meth:`update` and ``vocab_size``).
        vocab_size: the size of the id table of ``top_tokens`` (``len(tokenizer)``).
        decode: ``callable(token_ids: list[int]) -> str`` (e.g. a tokenizer's ``decode``) to
            show the top sequences and tokens as text. The adapters that know the trainer's
            tokenizer (:mod:`klmonitor.transformers`, :mod:`klmonitor.trl`,
            :mod:`klmonitor.verl`, :mod:`klmonitor.openrlhf`) set it unless given.
        f_divergences: f-divergences to estimate beside the KL (``"chi2"``, ``"hellinger"``,
            ``"js"``, ``"tv"`` or :class:`klmonitor.FDivergence` entries): ``summary.f[name]``
            and ``kl/f/<name>/mean|std|stderr`` (see :class:`~klmonitor.KLStats`). Off by default.
        entropy: estimate the policy's entropy from the sampled tokens (``summary.entropy``,
            ``kl/entropy/...``, the ``entropy_collapse`` rule): a few torch ops per update.

    Under an initialised ``torch.distributed``, :meth:`step` and :meth:`flush` reduce the
    window over all ranks with one ``all_gather`` of a few hundred bytes per rank, plus, with
    ``top_tokens`` or ``top_sequences``, one ``all_reduce`` of the additive diagnostics (whose
    size does not grow with the number of ranks), so every rank must call them at the same
    steps (and every rank must call :meth:`flush`, whether or not it saw a batch since the
    last window); every rank gets the same :class:`WindowResult`. The step and batch count
    of each rank travel in the gather: ranks that end a window at different steps are
    warned about (an error under ``strict=True``), never merged silently.

    A monitor may be fed from several threads (a rollout thread calling :meth:`update` while
    the trainer's calls :meth:`step`): its state changes under a lock.

    >>> import torch
    >>> seen = []
    >>> mon = Monitor(log_every_n_steps=2, sinks=lambda metrics, step: seen.append(step))
    >>> for step in (1, 2, 3):
    ...     mon.update(torch.tensor([-1.0, -2.0]), torch.tensor([-1.1, -1.8]))
    ...     res = mon.step(step)
    >>> res is None, seen, round(mon.last_summary.k3.mean, 5)
    (True, [2], 0.01312)
    >>> mon.flush(3).step, seen
    (3, [2, 3])
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        sinks: Any = None,
        rules: Sequence[Rule] | None = None,
        max_kl: float | None = None,
        max_update_kl: float | None = None,
        on_alert: Callable[[Alert], Any] | Sequence[Callable[[Alert], Any]] | None = None,
        stop_on: Sequence[str] = (),
        prefix: str = "kl/",
        level: Level = "token",
        histogram: bool = True,
        histogram_samples: int = 4096,
        strict: bool = False,
        clamp: float | None = None,
        extreme: float = 20.0,
        backend: Literal["auto", "torch", "native", "triton", "compile"] = "auto",
        alert_history_size: int = 1000,
        wandb_alert_wait_s: float = 300.0,
        rank: int | None = None,
        by_position: bool = True,
        position_buckets: int = 12,
        position_rows: int | None = 16,
        top_sequences: int = 5,
        top_sequences_max_len: int = 256,
        top_tokens: int = 0,
        vocab_size: int | None = None,
        decode: Decode | None = None,
        f_divergences: Sequence[str | FDivergence] | None = None,
        entropy: bool = True,
    ) -> None:
        self._lock = threading.RLock()
        self.log_every_n_steps = log_every_n_steps
        self.prefix = check_str(prefix, "prefix", allow_empty=True)
        if max_kl is not None:
            check_number(max_kl, "max_kl", low=0.0, hint=" (a KL budget in nats) or None")
        if max_update_kl is not None:
            check_number(max_update_kl, "max_update_kl", low=0.0, hint=" (nats per token) or None")
        if rules is not None and (max_kl is not None or max_update_kl is not None):
            raise ValueError(
                "pass either rules (your own list) or max_kl / max_update_kl (for the default rules), not both"
            )
        self.on_alert = check_callables(on_alert, "on_alert", "fn(alert)")
        self.histogram = check_bool(histogram, "histogram")
        self.histogram_samples = check_int(histogram_samples, "histogram_samples", low=1)
        self.strict = check_bool(strict, "strict")
        self.wandb_alert_wait_s = check_number(
            wandb_alert_wait_s, "wandb_alert_wait_s", low=0.0, low_inclusive=True
        )
        self.rank = None if rank is None else check_int(rank, "rank", low=0)
        self.engine = AlertEngine(
            list(default_rules(max_kl=max_kl, max_update_kl=max_update_kl) if rules is None else rules),
            history_size=check_int(alert_history_size, "alert_history_size", low=1),
        )
        if isinstance(stop_on, str):
            stop_on = (stop_on,)
        names = {r.name for r in self.engine.rules}
        unknown = [s for s in stop_on if s not in names]
        if unknown:
            raise ValueError(f"stop_on names unknown rules {unknown}; the rules are {sorted(names)}")
        self.stop_on = tuple(stop_on)
        # Validates level, clamp, extreme and backend with KLStats' own messages.
        self.stats = KLStats(
            level=level,
            clamp=clamp,
            extreme=extreme,
            backend=backend,
            f_divergences=f_divergences,
            sync_on_compute=False,
        )
        self.level: Level = level
        # The rollout engine as the sampler, the trainer as the reference: KL(rollout || trainer).
        self.rollout_stats = KLStats(
            level="token", clamp=clamp, extreme=extreme, backend=backend, sync_on_compute=False
        )
        # The behaviour policy (that sampled the tokens) against the current one: the size of
        # the policy update, KL(behaviour || current), PPO's approx-KL with its variance.
        self.update_stats = KLStats(
            level="token", clamp=clamp, extreme=extreme, backend=backend, sync_on_compute=False
        )
        self._ratio = RatioRange()
        # -log q over the sampled tokens: the policy's entropy (summary.entropy).
        self._entropy = EntropyMoments() if check_bool(entropy, "entropy") else None
        # The batches scored before the first optimizer step: the initial_kl rule's evidence.
        self._initial = InitialCheck()
        self._untrained = True
        self.positions = (
            PositionProfile(check_int(position_buckets, "position_buckets", low=2))
            if check_bool(by_position, "by_position")
            else None
        )
        self.position_rows = (
            None
            if position_rows is None
            else check_int(position_rows, "position_rows", low=1, hint=" or None (all rows)")
        )
        k_seq = check_int(top_sequences, "top_sequences", low=0, hint=" (0: off)")
        max_len = check_int(top_sequences_max_len, "top_sequences_max_len", low=1)
        self.sequences = TopSequences(k_seq, max_len) if k_seq else None
        k_tok = check_int(top_tokens, "top_tokens", low=0, hint=" (0: off)")
        if k_tok and vocab_size is None:
            raise ValueError(
                "top_tokens needs vocab_size (e.g. len(tokenizer) or model.config.vocab_size): the "
                "per-token sums live in a fixed-size table on the device"
            )
        if vocab_size is not None:
            check_int(vocab_size, "vocab_size", low=1)
        self.tokens = TopTokens(int(vocab_size), k_tok) if k_tok and vocab_size is not None else None
        if decode is not None and not callable(decode):
            raise TypeError(
                f"decode must be callable(token_ids: list[int]) -> str, got {type(decode).__name__}"
            )
        self.decode = decode
        # Every accumulator of the window, in the (fixed) order of its one reduce and its state.
        self.window = Window()
        self.window.add("main", Moments(self.stats), key="window")
        if self.stats.f_divergences:
            self.window.add("f-divergences", FMoments(self.stats), key="f_window")
        self.window.add("rollout", Moments(self.rollout_stats), key="rollout_window", optional=True)
        self.window.add("policy update", Moments(self.update_stats), key="update_window", optional=True)
        for name, part in (
            ("ratio", self._ratio),
            ("entropy", self._entropy),
            ("positions", self.positions),
            ("sequences", self.sequences),
            ("tokens", self.tokens),
            ("initial", self._initial),
        ):
            if part is not None:
                self.window.add(name, part)

        self._warn_once = WarnOnce()
        self._sinks: list[Sink] = []
        self._sinks_ready: set[int] = set()
        self.set_sinks(sinks)
        self.last_summary: KLSummary | None = None
        self._last_logged_step = 0
        self._batches = 0
        self._mask_bad: Tensor | None = None  # this rank's mask values other than 0/1, on device
        self._windows = 0
        self._hist: Tensor | None = None
        self._hist_pos = 0
        self._rng = random.Random(0)
        self._told_no_sinks = False
        self._step_seen = 0
        self._pending: _native.Diagnostics | None = None
        self._token_scratch: Tensor | None = None  # the fused kernel's token tables (zeros)

    # -- configuration ---------------------------------------------------------------------
    @property
    def log_every_n_steps(self) -> int:
        """Optimizer steps per window."""
        return self._every

    @log_every_n_steps.setter
    def log_every_n_steps(self, value: int) -> None:
        self._every = check_int(value, "log_every_n_steps", low=1, hint=" (optimizer steps per window)")

    @property
    def sinks(self) -> list[Sink]:
        """The sinks written to (on rank 0)."""
        return list(self._sinks)

    @_locked
    def set_sinks(self, sinks: Any) -> None:
        """Replace the sinks; each new one gets its layout/metric definitions before its first write."""
        self._sinks = make_sinks(sinks, self.prefix, self._warn_once, self.wandb_alert_wait_s)
        self._sinks_ready = set()

    @property
    def rules(self) -> list[Rule]:
        """The alert rules, in evaluation order."""
        return self.engine.rules

    @property
    def alert_history(self) -> list[Alert]:
        """Alerts fired so far (bounded by ``alert_history_size``), oldest first."""
        return self.engine.history

    @property
    def windows(self) -> int:
        """Windows ended so far."""
        return self._windows

    @property
    def warned(self) -> set[str]:
        """The kinds of problem warned about so far (each is warned once)."""
        return set(self._warn_once.seen)

    @property
    def is_writer(self) -> bool:
        """Whether this process writes to the sinks (global rank 0)."""
        return self._rank() == 0

    def to(self, device: torch.device | str) -> Monitor:
        """Keep the window on ``device`` (it also follows the first batch's device)."""
        self.stats = self.stats.to(device)
        self.rollout_stats = self.rollout_stats.to(device)
        return self

    # -- copies ----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """The state a pickle takes: the lock stays behind, and sinks that cannot be pickled.

        A ``SummaryWriter`` (threads, an open file) cannot be; it is left out of the copy with
        a warning naming it, and the rest is copied.
        """
        with self._lock:
            state = {k: v for k, v in self.__dict__.items() if k != "_lock"}
            kept, left = [], []
            for sink in self._sinks:
                try:
                    pickle.dumps(sink)
                except Exception as exc:
                    left.append((sink, exc))
                else:
                    kept.append(sink)
            state["_sinks"] = kept
            state["_sinks_ready"] = set()  # the copy's sinks are new objects: set them up again
            state["_token_scratch"] = None  # a workspace of zeros: made again when needed
        self._left_out(left)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __deepcopy__(self, memo: dict[int, Any]) -> Monitor:
        """A deep copy; sinks that cannot be copied are left out with a warning naming them."""
        with self._lock:
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            kept, left = [], []
            for sink in self._sinks:
                try:
                    kept.append(copy.deepcopy(sink, memo))
                except Exception as exc:
                    left.append((sink, exc))
            skip = ("_lock", "_sinks", "_sinks_ready", "_token_scratch")
            rest = {k: v for k, v in self.__dict__.items() if k not in skip}
            state = copy.deepcopy(rest, memo)
        state["_sinks"] = kept
        state["_sinks_ready"] = set()
        state["_token_scratch"] = None
        new.__setstate__(state)
        self._left_out(left)
        return new

    @staticmethod
    def _left_out(left: list[tuple[Sink, Exception]]) -> None:
        if left:
            what = ", ".join(f"{s!r} ({type(e).__name__}: {e})" for s, e in left)
            warnings.warn(
                f"klmonitor: the sinks {what} cannot be copied and are left out of the copy of this "
                "Monitor (the original keeps them); give the copy its own with copy.set_sinks(...).",
                UserWarning,
                stacklevel=3,
            )

    @_locked
    def reset_window(self, step: int = 0) -> None:
        """Start afresh: drop the open window and restart the schedule at ``step`` (a new run).

        Windows then are ``(step, step + N]``, ... Alert rules and their history are kept;
        :meth:`load_state_dict` restores those. At ``step`` 0 the batches fed before the first
        :meth:`step` count as the untrained policy's (the ``initial_kl`` check); a run started
        at a later step is past its start.
        """
        step = check_int(step, "step", low=0, hint=" (the step training starts from)")
        self._untrained = step == 0
        self._reset_window()
        self._last_logged_step = step
        self._step_seen = step
        if self._hist is not None:
            self._hist.fill_(math.nan)
        self._hist_pos = 0

    # -- problems --------------------------------------------------------------------------
    def problem(self, kind: str, message: str, exc: BaseException | None = None) -> None:
        """Report a problem: raise under ``strict=True``, else warn once per ``kind``."""
        if self.strict:
            raise KLMonitorInputError(message) from exc
        self._warn_once(f"input:{kind}", message + " (klmonitor warns once per kind of problem.)")

    # -- the hot path ----------------------------------------------------------------------
    @_locked
    def update(
        self,
        logprobs: Tensor,
        ref_logprobs: Tensor,
        mask: Tensor | None = None,
        rollout_logprobs: Tensor | None = None,
        token_ids: Tensor | None = None,
        behaviour_logprobs: Tensor | None = None,
    ) -> None:
        """Fold one (micro-)batch into the window, on its device, with no host sync.

        Args:
            logprobs: log-probs of the sampled tokens under the policy, ``[N]`` or ``[B, T]``,
                any float dtype, on any device; may require grad (detached here).
            ref_logprobs: the same tokens' log-probs under the reference, same shape.
            mask: optional, same shape; True/1 marks tokens to count.
            rollout_logprobs: optional, same shape: the tokens' log-probs under the engine
                that sampled them (vLLM, SGLang, HF generate); adds KL(rollout || trainer).
            token_ids: optional integer ids of the sampled tokens, same shape: for
                ``top_sequences`` (text) and ``top_tokens``.
            behaviour_logprobs: optional, same shape: the tokens' log-probs under the policy
                that sampled them, as the trainer computed them at sampling time (PPO's and
                GRPO's "old" log-probs); adds the policy update's size KL(behaviour || current)
                (``summary.policy_update``, ``kl/update/...``, the ``update_size`` rule).

        Bad input (wrong types, shapes or devices) is warned about once per kind and the
        batch (or the bad optional part) is skipped (under ``strict=True``:
        :class:`KLMonitorInputError`); the open window is left intact.
        """
        self._batches += 1
        self._pending = self._kernel_request(logprobs, token_ids)  # diagnostics in the kernel's pass
        try:
            with _native.diagnosing(self._pending):
                self.stats.update(logprobs, ref_logprobs, mask)
        except (TypeError, ValueError, RuntimeError) as exc:
            self.problem(
                f"update:{type(exc).__name__}",
                f"klmonitor: this batch's log-probs were rejected: {exc}. The batch is not monitored.",
                exc,
            )
            return
        bad_mask = self.stats.last_invalid_mask  # a numeric mask's values other than 0/1, on device
        if bad_mask is not None:
            # Added up on device (no host sync) and read at the window's end, only when the
            # window has non-finite tokens: that is where the mask is named (see _end_window).
            held = self._mask_bad
            self._mask_bad = bad_mask if held is None else held + bad_mask.to(held.device)
        logp, ref = logprobs.detach(), ref_logprobs.detach()
        # The tokens KLStats counted (a numeric mask counts where it is exactly 1).
        valid = None if mask is None else (mask if mask.dtype == torch.bool else mask == 1).to(logp.device)
        req = self._pending
        if self._entropy is not None and not (req is not None and req.done and req.entropy is not None):
            self._entropy.update(logp, ref, valid, self.level == "sequence")
        uses_ids = self.sequences is not None or self.tokens is not None
        ids = self._checked_ids(token_ids, logp) if token_ids is not None and uses_ids else None
        wants_rows = (self.positions is not None or self.sequences is not None) and logp.dim() == 2
        diagnose = wants_rows or (self.tokens is not None and ids is not None)
        if rollout_logprobs is not None or diagnose or self._untrained:
            if self._untrained:  # scored before the first optimizer step: the initial_kl check
                self._initial.update(logp, ref, valid)
            if rollout_logprobs is not None:
                self._update_rollout(logp, rollout_logprobs, mask, valid)
            if diagnose:
                self._diagnose(logp, ref, valid, ids, wants_rows)
        self._pending = None  # what the kernel's pass added is in the windows; drop the request
        if behaviour_logprobs is not None:
            try:  # the behaviour policy sampled the tokens: it is the sampler, the current policy the reference
                self.update_stats.update(behaviour_logprobs, logp, mask)
            except (TypeError, ValueError, RuntimeError) as exc:
                self.problem(
                    f"behaviour:{type(exc).__name__}",
                    f"klmonitor: this batch's behaviour_logprobs were rejected: {exc}. The policy-update "
                    "size skips the batch; the main statistics have it.",
                    exc,
                )
        if self.histogram:
            try:
                self._sample_histogram(logp, ref, mask)
            except Exception as exc:  # the statistics are in; a histogram sample is not worth a crash
                self.problem(
                    "histogram",
                    f"klmonitor: could not sample this batch's log-ratios for the histogram "
                    f"({type(exc).__name__}: {exc}); the statistics are unaffected.",
                    exc,
                )

    def _update_rollout(self, logp: Tensor, rollout: Any, mask: Tensor | None, valid: Tensor | None) -> None:
        try:
            self.rollout_stats.update(rollout, logp, mask)
        except (TypeError, ValueError, RuntimeError) as exc:
            self.problem(
                f"rollout:{type(exc).__name__}",
                f"klmonitor: this batch's rollout_logprobs were rejected: {exc}. The rollout check "
                "skips the batch; the main statistics have it.",
                exc,
            )
            return
        rollout = rollout.detach()
        if self.rollout_stats.next_backend(rollout, logp) == "native":  # the C kernel took the batch
            batch = _native.ratio_range(rollout, logp, valid)  # one C pass (None: not what C reads)
            if batch is not None:
                self._ratio.fold(batch)
                return
        lr = est.log_ratio(rollout, logp)  # log pi_trainer - log pi_rollout
        ok = torch.isfinite(lr) if valid is None else torch.isfinite(lr) & valid
        self._ratio.update(lr, ok)

    def _checked_ids(self, token_ids: Any, logp: Tensor) -> Tensor | None:
        if (
            not isinstance(token_ids, Tensor)
            or token_ids.is_floating_point()
            or token_ids.is_complex()
            or token_ids.dtype == torch.bool
            or token_ids.shape != logp.shape
        ):
            self.problem(
                "token_ids",
                f"klmonitor: token_ids must be an integer tensor of the log-probs' shape "
                f"{tuple(logp.shape)}, got {type(token_ids).__name__} "
                f"{getattr(token_ids, 'dtype', '')} {tuple(getattr(token_ids, 'shape', ()))}; "
                "top sequences and tokens are computed without ids for such batches.",
            )
            return None
        return token_ids.to(logp.device, non_blocking=True)

    def _kernel_request(self, logprobs: Any, token_ids: Any) -> _native.Diagnostics | None:
        # What the fused kernel that takes this batch (C on the CPU; Triton on CUDA, or on CPU
        # tensors under TRITON_INTERPRET=1 with backend="triton") can add in its pass over it:
        # the row and position-bucket sums, and the token table (and, the C kernel only, the
        # entropy's moments), written into the windows on the batch's device. `done` says
        # whether one did (else _diagnose does the work).
        entropy = self._entropy is not None and self.level == "token"
        diagnostics = self.positions is not None or self.sequences is not None or self.tokens is not None
        if not ((diagnostics or entropy) and isinstance(logprobs, Tensor)):
            return None
        taker = self.stats.next_backend(logprobs, logprobs)
        if taker not in ("native", "triton"):
            return None
        fused = taker == "triton"
        if fused and not diagnostics:  # the Triton kernel does not compute the entropy
            return None
        if self.positions is not None and self.positions.buckets > _native.MAX_BUCKETS:
            return None
        n, dev = logprobs.numel(), logprobs.device
        req = _native.Diagnostics(n)
        if entropy and self._entropy is not None and not fused:
            req.entropy = self._entropy.writable(dev)
        if logprobs.dim() == 2 and logprobs.shape[1] > 0:
            req.row_len = logprobs.shape[1]
            if self.sequences is not None:
                zeros = torch.zeros(2, logprobs.shape[0], dtype=torch.float64, device=dev)
                req.row_sum, req.row_count = zeros.unbind(0)
            if self.positions is not None:
                req.bucket_sum, req.bucket_count = self.positions.writable(dev).view(2, -1).unbind(0)
        ids_ok = (
            isinstance(token_ids, Tensor)
            and (token_ids.device == dev or token_ids.is_cpu)
            and not (token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool)
            and token_ids.shape == logprobs.shape
        )
        if self.tokens is not None and ids_ok:
            v = self.tokens.writable(dev)
            vocab = self.tokens.vocab_size
            req.ids = token_ids.reshape(-1).to(dev, torch.int64, non_blocking=True).contiguous()
            req.token_sum, req.token_count, req.outside = v[:vocab], v[vocab:-1], v[-1:]
            if fused:  # the Triton kernel adds to the table itself (atomics): no thread tables
                return req
            # The threads' token tables, kept zero between calls (the kernel clears them as it
            # merges): at most _SCRATCH_TABLES threads scatter, so a wide host keeps this small.
            tables = max(1, min(torch.get_num_threads(), _SCRATCH_TABLES))
            if self._token_scratch is None or self._token_scratch.numel() != tables * 2 * vocab:
                self._token_scratch = torch.zeros(tables * 2 * vocab, dtype=torch.float64)
            req.scratch = self._token_scratch
        return req

    def _diagnose(
        self, logp: Tensor, ref: Tensor, valid: Tensor | None, ids: Tensor | None, rows: bool
    ) -> None:
        clamp, _ = self.stats.limits
        req, self._pending = self._pending, None
        if req is not None and req.done:
            # The fused kernel added the position buckets (every row, exact) and the token
            # table in its pass, and summed each row; only the winning rows' k3 is computed here.
            if rows and self.sequences is not None and req.row_sum is not None and req.row_count is not None:
                seqs = self.sequences
                if logp.is_cpu and seqs.update_kernel(
                    req.row_sum, req.row_count, logp, ref, valid, ids, clamp, self._step_seen, self._rank()
                ):
                    return

                def k3_of(pick: Tensor) -> Tensor:  # the kernel read these inputs: a C call per row
                    if not (logp.is_cpu and _native.available()):  # the Triton kernel's (CUDA)
                        sub = valid.index_select(0, pick) if valid is not None else None
                        return token_k3(logp.index_select(0, pick), ref.index_select(0, pick), sub, clamp)[0]
                    return _native.token_k3(logp, ref, valid, clamp, rows=pick, cols=seqs.max_len)

                self.sequences.update_sums(
                    req.row_sum,
                    req.row_count,
                    logp.shape[1],
                    k3_of,
                    ids,
                    self._step_seen,
                    self._rank(),
                    valid,
                )
            return
        # One per-token k3 shared by the position profile, the top sequences and the top tokens.
        # When only the position profile wants it, a strided sample of `position_rows` rows at
        # a random offset (a view: no copy, no host sync) bounds its cost whatever the batch.
        alone = self.sequences is None and (self.tokens is None or ids is None)
        if alone and self.position_rows is not None and logp.shape[0] > self.position_rows:
            stride = logp.shape[0] // self.position_rows
            # The offset is a hash of (step, batch in window): a resumed run samples the same rows.
            start = _mix(self._step_seen, self._batches) % stride
            pick = slice(start, start + stride * self.position_rows, stride)
            logp, ref = logp[pick], ref[pick]
            valid = valid[pick] if valid is not None else None
        k3, ok = token_k3(logp, ref, valid, clamp)
        if rows and self.positions is not None:
            self.positions.update(k3, ok)
        if rows and self.sequences is not None:
            self.sequences.update(k3, ok, ids, self._step_seen, self._rank(), shown=valid)
        if self.tokens is not None and ids is not None:
            self.tokens.update(k3, ok, ids)

    def _rank(self) -> int:
        return self.rank if self.rank is not None else _distributed()[0]

    def _sample_histogram(self, logp: Tensor, ref: Tensor, mask: Tensor | None) -> None:
        # A contiguous run of tokens at a random offset (host RNG: no device sync) goes into a
        # device ring buffer sized so the window's steps share it; masked and non-finite
        # entries are stored as NaN and dropped on the host at the logging step.
        n = logp.numel()
        if n == 0:
            return
        dev = logp.device
        size = self.histogram_samples
        if self._hist is not None and self._hist.device != dev and self._hist.numel() == size:
            self._hist = self._hist.to(dev)  # e.g. a ring restored from a checkpoint on the CPU
        if self._hist is None or self._hist.device != dev or self._hist.numel() != size:
            self._hist = torch.full((size,), math.nan, dtype=torch.float32, device=dev)
            self._hist_pos = 0
        k = min(n, size, -(-size // self._every))
        start = self._rng.randrange(n - k + 1)
        lp = logp.reshape(-1)[start : start + k]
        rf = ref.reshape(-1)[start : start + k]
        keep = mask.detach().reshape(-1)[start : start + k] if mask is not None else None
        first = min(k, size - self._hist_pos)
        if dev.type == "cpu" and (keep is None or keep.device.type == "cpu"):
            # On the host numpy does this in microseconds; torch's per-op dispatch made this
            # sample a third of the hook's time on small CPU models.
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

    @_locked
    def skipped_batch(self) -> None:
        """Count a batch whose input could not be read (an adapter's problem, already reported).

        It belongs to the window like any batch, so :meth:`flush` ends the window on every rank.
        """
        self._batches += 1

    # -- window boundaries -----------------------------------------------------------------
    @_locked
    def step(self, step: int, log_step: int | None = None) -> WindowResult | None:
        """Call once per optimizer step (after it) with the step count; ends the window at a boundary.

        Windows are ``(0, N]``, ``(N, 2N]``, ... in steps; with gradient accumulation the
        micro-batches before a boundary's optimizer step belong to the window it closes.
        Calling it again with the same step (e.g. after each micro-batch) is harmless. A step
        that goes back to or below the last window's end (an epoch-local counter, a restarted
        run, a checkpoint's state from a later run) is warned about once and the schedule
        restarts from it (an error under ``strict=True``).

        Args:
            step: the optimizer step count; the window schedule follows it.
            log_step: the step number a window ending here is written to the sinks and alerted
                at (``WindowResult.step``, ``Alert.step``); ``None``: ``step``. For a framework
                that numbers its own logs differently, so kl/* land among the user's metrics
                (Lightning logs a batch's ``self.log`` at the step before its optimizer step).

        Returns:
            the :class:`WindowResult` when a window ended, else ``None``.
        """
        step = check_int(step, "step", low=0, hint=" (the optimizer step count)")
        if log_step is not None:
            log_step = check_int(log_step, "log_step", low=0, hint=" (the step the window is logged at)")
        if step < self._step_seen and step <= self._last_logged_step:
            self._step_went_back(step)
        self._step_seen = step
        if step > 0:  # an optimizer step has changed the policy
            self._untrained = False
        if step >= (self._last_logged_step // self._every + 1) * self._every:
            return self._end_window(step, log_step=log_step)
        return None

    @_locked
    def flush(self, step: int, log_step: int | None = None) -> WindowResult | None:
        """End the open window now (end of training); ``None`` when no batch came since the last one.

        Under several processes every rank must call it (it joins the window's collectives even
        on a rank that saw no batch since the last window); it returns ``None`` on every rank
        when no rank had a batch, else the same :class:`WindowResult` on every rank.
        ``log_step`` is as in :meth:`step`.
        """
        step = check_int(step, "step", low=0, hint=" (the optimizer step count)")
        if log_step is not None:
            log_step = check_int(log_step, "log_step", low=0, hint=" (the step the window is logged at)")
        if self._batches == 0 and _distributed()[1] == 1:
            return None
        return self._end_window(step, flushing=True, log_step=log_step)

    def _step_went_back(self, step: int) -> None:
        self.problem(
            "step-went-back",
            f"klmonitor: the step went back from step {self._step_seen} to step {step}, at or below "
            f"the last window's end (step {self._last_logged_step}): an epoch-local or restarted step "
            "counter, or a checkpoint's monitor state from a later run. The window schedule restarts "
            "from this step. Pass a global step that only grows (e.g. trainer.global_step), or call "
            "mon.reset_window(step) when the counter restarts on purpose.",
        )
        self._last_logged_step = max(0, (step - 1) // self._every * self._every)

    @_locked
    def close(self) -> None:
        """Flush every sink (the sinks' targets stay open: they are the caller's)."""
        if self.is_writer:
            for sink in self._sinks:
                self._sink_call(sink, "flush", sink.finalize)

    def _reduce(self, step: int) -> tuple[KLSummary, list[int], list[int]]:
        """The window over all ranks: one or two collectives, one host transfer.

        One ``all_gather`` of what every rank needs of every other, small: each rank's ``step``
        and batch count, the moments vectors (merged by Chan's rule), the ratio range's min and
        max, the top sequences' scores. Then one ``all_reduce`` (sum) of every additive part
        (token and position sums and counts, the initial check, the winning top sequences),
        whose size does not grow with the world size. When the additive parts are a few numbers
        (no ``top_tokens`` nor ``top_sequences``) they travel whole in the gather instead: one
        collective. Returned with the summary as ``(summary, steps by rank, batches by rank)``.
        """
        dev = self.stats.summary_vector().device
        header = torch.tensor([float(step), float(self._batches)], dtype=torch.float64, device=dev)
        headers, values = self.window.reduce(header)
        steps, batches = [int(h[0]) for h in headers], [int(h[1]) for h in headers]
        summary = KLSummary.from_vector(values["main"], self.level)
        if "f-divergences" in values:
            summary.f = read_f(values["f-divergences"], self.stats.f_divergences)
        rollout = KLSummary.from_vector(values["rollout"], "token")
        update = KLSummary.from_vector(values["policy update"], "token")
        if update.tokens + update.nonfinite > 0:
            summary.policy_update = update
        ratio = values["ratio"]
        if rollout.tokens + rollout.nonfinite > 0:
            lo, hi, outside = RatioRange.read(ratio, rollout.tokens)
            summary.rollout = RolloutSummary(rollout, 1.0 + rollout.r_minus_1.mean, lo, hi, outside)
        if self.positions is not None:
            summary.by_position = self.positions.read(values["positions"])
        if self.sequences is not None:
            summary.top_sequences = self.sequences.read(values["sequences"], self.decode)
        if self.tokens is not None:
            summary.top_tokens, outside_vocab = self.tokens.read(values["tokens"], self.decode)
            if outside_vocab:
                self.problem(
                    "vocab_size",
                    f"klmonitor: {outside_vocab} token ids were outside [0, vocab_size={self.tokens.vocab_size}) "
                    "and are left out of top_tokens; pass the tokenizer's full size as vocab_size.",
                )
        summary.initial = InitialCheck.read(values["initial"])
        if "entropy" in values:
            summary.entropy = EntropyMoments.read(values["entropy"])
        return summary, steps, batches

    def _reset_window(self) -> None:
        self.window.reset()
        self._batches = 0
        self._mask_bad = None

    def _end_window(
        self, step: int, flushing: bool = False, log_step: int | None = None
    ) -> WindowResult | None:
        # Every rank gets here: the collectives of the window. The schedule follows ``step``;
        # the window is written and alerted at ``log_step`` (the caller's numbering of its logs).
        shift = 0 if log_step is None else log_step - step
        summary, steps, batches = self._reduce(step)
        if flushing and sum(batches) == 0:
            return None  # no rank had a batch since the last window: every rank returns None
        mask_bad = self._mask_bad
        hist = None
        if self._hist is not None:
            values = self._hist.cpu().numpy()
            hist = values[np.isfinite(values)]
            self._hist.fill_(math.nan)
        self._reset_window()
        self._last_logged_step = step
        self._windows += 1
        self.last_summary = summary
        step += shift
        if len(set(steps)) > 1:
            by_rank = ", ".join(f"rank {r}: step {s + shift}" for r, s in enumerate(steps))
            step = max(0, max(steps) + shift)
            self.problem(
                "ddp-steps",
                f"klmonitor: the ranks ended this window at different steps ({by_rank}): their step "
                "counters disagree, so this window merges different steps. It is logged at step "
                f"{step}. Every rank must call step() with the same step count and flush() at the "
                "same step (e.g. the trainer's global step).",
            )

        if summary.count == 0:
            self.problem(
                "empty-window",
                f"klmonitor: no valid tokens in the window ending at step {step} (every token masked, "
                "non-finite, or every batch skipped); check the mask. Nothing but counts is logged.",
            )
        bad_mask_note = self._bad_mask_note(summary, mask_bad, step)
        if summary.nonfinite and self.strict:
            raise KLMonitorInputError(
                f"klmonitor: {summary.nonfinite} tokens had a NaN or infinite log-ratio or a mask value "
                f"other than 0 or 1 in the window ending at step {step} (strict=True)." + bad_mask_note
            )
        if bad_mask_note:
            self.problem("mask-values", "klmonitor:" + bad_mask_note)
        alerts = self.engine.evaluate(summary, step)
        stop = any(a.stop or a.rule in self.stop_on for a in alerts)
        metrics = summary.to_dict(self.prefix)
        if self.is_writer:
            self._write(step, summary, metrics, hist, alerts, stop)
        return WindowResult(step, summary, alerts, stop, metrics, hist if self.histogram else None)

    def _bad_mask_note(self, summary: KLSummary, mask_bad: Tensor | None, step: int) -> str:
        """The mask's part of a window's non-finite count, named (``""`` when it has none).

        Read only in a window with non-finite tokens (known on the host after the reduction,
        the same on every rank): one scalar of this rank, after the window's transfer.
        """
        if not summary.nonfinite or mask_bad is None:
            return ""
        n = int(mask_bad.item())
        if n <= 0:
            return ""
        rank, world = _distributed()
        where = f" on rank {rank}" if world > 1 else ""
        return (
            f" the mask held {n} values other than 0 and 1 (e.g. 0.5 from a soft mask, 2 from a summed "
            f"one, -1, NaN) in the window ending at step {step}{where}. The mask says which tokens count, "
            "it is not a weight: those tokens are left out of the KL statistics and counted in "
            "kl/nonfinite (the nonfinite alert's count), not NaN log-probs. Pass mask.bool() (or "
            "mask > 0), or a mask of 0s and 1s. A numeric mask is checked on its device, without a host "
            "sync per step, so this shows at the window's end."
        )

    def _write(
        self,
        step: int,
        summary: KLSummary,
        metrics: dict[str, float],
        hist: np.ndarray | None,
        alerts: list[Alert],
        stop: bool,
    ) -> None:
        if not self._sinks:
            if not self._told_no_sinks:
                log.info("klmonitor: no sink attached; summaries and alerts go to the Python log only")
                self._told_no_sinks = True
            log.info(
                "klmonitor step %d: KL %.4g ± %.2g (k3 mean ± stderr), drift %.3g, %d tokens",
                step,
                summary.kl,
                summary.k3.stderr,
                summary.drift,
                summary.tokens,
            )
        tables = _tables(summary)
        for sink in self._sinks:
            if id(sink) not in self._sinks_ready:
                self._sinks_ready.add(id(sink))
                self._sink_call(sink, "set up", sink.setup, [r.name for r in self.rules])
            self._sink_call(sink, "log scalars", sink.log_scalars, metrics, step)
            if hist is not None and hist.size:
                self._sink_call(sink, "log a histogram", sink.log_histogram, hist, step)
            for name, (columns, rows) in tables.items():
                self._sink_call(sink, f"log the {name} table", sink.log_table, name, columns, rows, step)
        for alert in alerts:
            self._dispatch(alert)
        if stop:
            log.warning(
                "klmonitor: stopping training at step %d on alert(s) %s", step, [a.rule for a in alerts]
            )

    def _dispatch(self, alert: Alert) -> None:
        py_level = {"info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}[alert.level.value]
        log.log(py_level, "klmonitor alert [%s] step %d: %s", alert.rule, alert.step, alert.message)
        for sink in self._sinks:
            self._sink_call(sink, "log an alert", sink.log_alert, alert)
        for fn in self.on_alert:
            try:
                fn(alert)
            except Exception as exc:
                self._note(
                    f"on_alert:{getattr(fn, '__name__', repr(fn))}",
                    f"klmonitor: on_alert callable {fn!r} raised {type(exc).__name__}: {exc}; "
                    "the alert was still logged. This warning is shown once.",
                )

    def _sink_call(self, sink: Sink, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Call one sink method, guarded whatever the class of the sink.

        Whatever it raises (warnings turned into errors included) is noted once per sink and
        call; the other sinks and the alerts still get everything.
        """
        try:
            fn(*args)
        except Exception as exc:  # a tracker must never take training down, nor the window
            name = getattr(sink, "name", None) or type(sink).__name__
            self._note(
                f"sink:{name}:{what}:raised",
                f"klmonitor: the sink {name} ({type(sink).__name__}) failed to {what} "
                f"({type(exc).__name__}: {exc}); the other sinks and the alerts still get everything. "
                "This warning is shown once.",
            )

    def _note(self, kind: str, message: str) -> None:
        """Warn once per ``kind``; under warnings-as-errors (``-W error``) log it instead."""
        try:
            self._warn_once(kind, message)
        except Warning:  # the filter turned the note into an exception: training goes on
            log.warning(message)

    # -- checkpointing ---------------------------------------------------------------------
    @_locked
    def state_dict(self) -> dict[str, Any]:
        """Alert state (rules, history), the window schedule and the open window's moments.

        Plain Python values (JSON-safe but for non-finite alert values, kept as strings). It
        carries what it was made with (``config``: level, prefix, estimators, clamp, extreme,
        diagnostics) and the histogram's ring buffer (``None`` for its empty entries).
        """
        ring = None
        if self._hist is not None:
            ring = {
                "values": [x if math.isfinite(x) else None for x in self._hist.cpu().tolist()],
                "pos": self._hist_pos,
            }
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "histogram": ring,
            "engine": self.engine.state_dict(),
            "last_logged_step": self._last_logged_step,
            "batches_in_window": self._batches,
            "windows": self._windows,
            "step_seen": self._step_seen,
            # "window", "f_window", "rollout_window", "update_window", "diagnostics"
            **self.window.state_dict(self.stats.summary_vector().device),
        }

    @_locked
    def load_state_dict(self, state_dict: Any) -> None:
        """Restore :meth:`state_dict` output, checking it first.

        A state that is not a dict, of a newer version, or with a field of the wrong type or
        an impossible value (a NaN, infinite, fractional or negative count, a negative step, a
        rule's cooldown outside its range) is not loaded: one warning (an error under
        ``strict=True``) and the monitor keeps a fresh state for what was wrong. A state made
        with another configuration (level, prefix, estimators, clamp, extreme, diagnostics) is
        warned about the same way; its alert state and schedule load, its open window does not.
        Under several processes the open window is not restored (it held rank 0's
        tokens only): the first window after resuming is shorter.
        """
        sd = state_dict
        self._untrained = False  # a resumed run is past its start
        if not isinstance(sd, Mapping):
            self._bad_state(f"it is a {type(sd).__name__}, not a dict from Monitor.state_dict()")
            return
        version = sd.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            self._bad_state(f"its version is {version!r}, not an int")
            return
        if version not in _READABLE_VERSIONS:
            self._bad_state(
                f"it has version {version}, and this klmonitor reads versions {_READABLE_VERSIONS} "
                "(saved by a newer klmonitor? upgrade klmonitor to resume its alert state)"
            )
            return
        mismatch = self._config_mismatch(sd.get("config"))
        if mismatch is not None:
            # Refused before anything changes (strict raises here); the alert state and the
            # schedule still load below, the open window starts empty.
            self.problem(
                "checkpoint-config",
                f"klmonitor: the checkpoint's monitor state was made with {mismatch}; its open window "
                "is not restored (it would mix statistics of another kind), the window starts empty. "
                "Resume with the configuration the checkpoint was saved with to keep it.",
            )
        counters: dict[str, int] = {}
        for key in ("last_logged_step", "batches_in_window", "windows", "step_seen"):
            value = sd.get(key, sd.get("last_logged_step", 0) if key == "step_seen" else 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self._bad_state(f"{key} is {value!r}, not an int >= 0")
                return
            counters[key] = value
        engine_state = sd.get("engine", {})
        fresh_engine = self.engine.state_dict()
        try:
            self.engine.load_state_dict(engine_state)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            self.engine.load_state_dict(fresh_engine)
            self._bad_state(f"its alert-engine state is unreadable ({type(exc).__name__}: {exc})")
            return
        self._last_logged_step = counters["last_logged_step"]
        self._windows = counters["windows"]
        self._step_seen = counters["step_seen"]
        if self._hist is not None:
            self._hist.fill_(math.nan)  # the open window's samples are the checkpoint's
        self._hist_pos = 0
        if mismatch is not None:
            self._reset_window()
            return
        first, problem, values = self.window.load_problem(sd)
        if first is not None:
            self._reset_window()
            self._bad_state(f"its open window {first}; the window starts empty")
            return
        if _distributed()[1] > 1:
            self._reset_window()
            log.info(
                "klmonitor: the checkpoint's partly filled window is not restored under several "
                "processes (it held rank 0's tokens only); the first window after resuming is "
                "shorter. Checkpoint on logging steps for exact resumption under DDP."
            )
            return
        if problem is None:
            ring_problem = self._load_ring(sd.get("histogram"))
            problem = None if ring_problem is None else f"histogram ring buffer {ring_problem}"
        if problem is not None:
            self._reset_window()
            self._bad_state(f"its saved window's {problem}; the window starts empty")
            return
        self.window.load(values, self.stats.summary_vector().device)
        self._batches = counters["batches_in_window"]

    def _config(self) -> dict[str, Any]:
        """What this monitor's window is made with (a checkpoint's state must match it)."""
        return {
            "level": self.level,
            "prefix": self.prefix,
            "estimators": list(lay.QUANTITIES),
            "clamp": self.stats.clamp,
            "extreme": self.stats.extreme,
            "f_divergences": list(self.stats.f_divergences),
            "diagnostics": self.window.config(),
        }

    def _config_mismatch(self, saved: Any) -> str | None:
        """What differs between a checkpoint's ``config`` and this monitor's, or ``None``."""
        if saved is None:
            return None  # a state before version 3: nothing to compare
        if not isinstance(saved, Mapping):
            return f"a config that is a {type(saved).__name__}, not a dict"
        ours = self._config()
        # A key this klmonitor added later reads as its default in an older state.
        defaults: dict[str, Any] = {"f_divergences": []}
        diffs = [
            f"{key}={saved.get(key, defaults.get(key))!r} (this monitor: {value!r})"
            for key, value in ours.items()
            if saved.get(key, defaults.get(key)) != value
        ]
        return ", ".join(diffs) or None

    def _load_ring(self, saved: Any) -> str | None:
        """Restore the histogram's ring buffer; why it cannot be, or ``None``."""
        if saved is None or not self.histogram:
            return None  # not saved (a state before version 3, or no sample yet), or no histogram
        if not isinstance(saved, Mapping):
            return f"is a {type(saved).__name__}, not a dict"
        values, pos = saved.get("values"), saved.get("pos")
        if not isinstance(values, list) or not all(
            x is None or (isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x))
            for x in values
        ):
            return "holds values that are neither finite numbers nor None"
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < max(len(values), 1):
            return f"has the position {pos!r}, outside its {len(values)} entries"
        if len(values) != self.histogram_samples:
            return None  # another histogram_samples: this window's histogram starts afresh
        ring = [math.nan if x is None else float(x) for x in values]
        dev = self.stats.summary_vector().device
        self._hist = torch.tensor(ring, dtype=torch.float32, device=dev)
        self._hist_pos = pos
        return None

    def _bad_state(self, what: str) -> None:
        self.problem(
            "checkpoint-state",
            f"klmonitor: the checkpoint's monitor state was not loaded: {what}. Monitoring goes on "
            "from a fresh state.",
        )


def _mix(a: int, b: int) -> int:
    """A well-spread 64-bit hash of two counters (splitmix64's finaliser)."""
    x = (a * 0x9E3779B97F4A7C15 + b * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _tables(summary: KLSummary) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The window's diagnostics as tables: by_position, top_sequences, top_tokens (when present)."""
    out: dict[str, tuple[list[str], list[list[Any]]]] = {}
    if summary.by_position:
        out["by_position"] = (
            ["positions", "k3 mean", "tokens"],
            [[b.label, b.k3_mean, b.tokens] for b in summary.by_position],
        )
    if summary.top_sequences:
        out["top_sequences"] = (
            ["step", "rank", "row", "KL (sum of k3)", "KL per token", "tokens", "text"],
            [
                [s.step, s.rank, s.row, s.kl_sum, s.kl_mean, s.tokens, s.text if s.text is not None else ""]
                for s in summary.top_sequences
            ],
        )
    if summary.top_tokens:
        out["top_tokens"] = (
            ["token id", "text", "count", "KL (sum of k3)", "KL per occurrence"],
            [
                [t.token_id, t.text if t.text is not None else "", t.count, t.kl_sum, t.kl_mean]
                for t in summary.top_tokens
            ],
        )
    return out
