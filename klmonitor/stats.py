"""KLStats: streaming, masked, on-device statistics of the KL estimators; and KLSummary.

``update`` accumulates a window on the tensors' device with no host sync; ``compute`` reduces
across ranks (one ``all_gather`` of a small float64 vector), copies it to the host once and
returns a :class:`KLSummary` of plain Python numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from klmonitor import _moments as mom
from klmonitor import backends, fdiv
from klmonitor._merge import chan_rows
from klmonitor.summary import LEVELS, EstimatorStats, KLSummary, Level, read_f

__all__ = ["EstimatorStats", "KLStats", "KLSummary", "Level"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _gather_fixed(result: Tensor, group: Any = None) -> list[Tensor]:
    """One ``all_gather`` of a tensor whose shape is the same on every rank.

    torchmetrics' default gathers shapes first (and a barrier); our state has a fixed size.
    """
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    out = [torch.empty_like(result) for _ in range(world)]
    dist.all_gather(out, result.contiguous(), group=group)
    return out


class KLStats(Metric):
    """Streaming statistics of the KL estimators over masked log-probs (a torchmetrics Metric).

    Each ``update`` folds a batch into the window on the tensors' device without a host sync;
    ``compute`` merges the window over all ranks of a ``torch.distributed`` job (exactly:
    counts, means and M2 merged with Chan's update in float64) and returns a
    :class:`KLSummary`. ``reset`` starts a new window.

    Args:
        level: ``"token"`` pools all valid tokens; ``"sequence"`` sums each sequence's token
            values (inputs must be ``[B, T]``) and takes statistics over sequences.
        clamp: ``None`` (the default): no clamp, every finite log-ratio counts with its exact
            value (float64 wherever float32 would overflow: ``exp`` above 88.7, squares of
            ``l e**l`` above ~44), exact to 1e-4 up to ``|l| = 700``; a log-ratio above +700
            (``e**l`` at float64's limit) is counted as non-finite, like +inf (so a clamp above
            700 acts as none). A number clamps
            log-ratios to ``[-clamp, clamp]`` before the estimators, as peers do (biased: a
            token at ``l = -30`` clamped to -20 loses a third of its k3).
        extreme: tokens whose ``|log-ratio|`` exceeds this (default 20: a probability ratio of
            5e8) are counted in ``summary.extreme`` (with a clamp below it, every clamped token
            is counted); they keep their exact values in the estimates.
        backend: ``"auto"`` uses the fused CPU kernel for float32/bf16/fp16 CPU tensors when it
            was built at install time, the fused Triton kernel for float32/bf16/fp16 CUDA tensors
            when Triton is installed, and plain torch otherwise; ``"torch"``
            forces plain torch; ``"native"`` requires the fused kernel for CPU inputs;
            ``"triton"`` requires Triton and uses its kernel wherever it runs (CUDA; CPU
            tensors under ``TRITON_INTERPRET=1``); ``"compile"`` runs the torch path through
            ``torch.compile`` (compiled once, with dynamic shapes, on first use).
        f_divergences: f-divergences to estimate beside the KL, over the same tokens (or
            sequences): built-in names ``"chi2"``, ``"hellinger"``, ``"js"``, ``"tv"``, or
            :class:`klmonitor.FDivergence` entries. Reported in ``summary.f[name]`` and as
            ``kl/f/<name>/mean|std|stderr``. Off by default; each is a float64 torch pass over
            the batch (``benchmarks/bench_fdiv.py`` measures what it adds).
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``process_group``).

    As a torchmetrics Metric:

    * ``compute()`` and ``forward()`` (``stats(logp, ref, mask)``, which also folds the batch
      into the window) return a :class:`KLSummary` of Python floats, not a tensor: a window
      has many numbers (six estimators' means, standard errors and bands, token counts).
      ``summary.to_dict()`` gives the flat ``{"kl/k3/mean": float, ...}`` that klmonitor
      logs (for ``self.log_dict``, or each entry of a ``MetricCollection``'s results);
      ``summary.k3.mean`` one number; ``{k: torch.tensor(v) for k, v in
      summary.to_dict().items()}`` tensors; :meth:`summary_vector` the raw float64 moments.
    * The state is a float64 vector of moments, owned by the metric: ``load_state_dict``
      copies it, :meth:`summary_vector` returns a copy, and casts of the module
      (``to(dtype)``, ``half()``, ``set_dtype``, Lightning's ``precision="bf16-true"`` or
      ``"16-true"``) move it to the new device but keep it float64. Inputs may be of any
      float dtype.
    * In a ``MetricCollection`` (compute groups on by default), KLStats whose ``level``,
      ``clamp`` or extreme threshold differ are never put in one compute group; settings that
      give the same numbers (``backend``) may share one.
    * ``torch.jit.script`` accepts it (and a module holding it), as for every torchmetrics
      metric: the scripted copy holds the state, but ``update``/``compute``/``forward`` run
      in Python only.

    >>> stats = KLStats()
    >>> logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -9.0]])
    >>> ref = torch.tensor([[-1.2, -1.9, -3.0], [-0.4, -0.7, -1.0]])
    >>> stats.update(logp, ref, mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    >>> s = stats.compute()
    >>> s.tokens, round(s.k1.mean, 4), round(s.k3.mean, 5)
    (5, 0.0, 0.00581)
    >>> round(s.to_dict()["kl/k3/mean"], 5)
    0.00581
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    if TYPE_CHECKING:
        # Declared for type checkers only: under ``from __future__ import annotations`` a class
        # annotation is the string "Tensor", which ``torch.jit.script`` cannot resolve (it
        # infers the state's type from its value instead).
        _acc: Tensor

    def __init__(
        self,
        level: Level = "token",
        clamp: float | None = None,
        extreme: float = 20.0,
        backend: Literal["auto", "torch", "native", "triton", "compile"] = "auto",
        f_divergences: Sequence[str | fdiv.FDivergence] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dist_sync_fn", _gather_fixed)
        super().__init__(**kwargs)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if clamp is not None and (
            isinstance(clamp, bool) or not isinstance(clamp, int | float) or not clamp > 0
        ):
            raise ValueError(
                f"clamp must be None (no clamp: exact values, the default) or a positive number of "
                f"nats to clamp log-ratios to, got {clamp!r}"
            )
        if isinstance(extreme, bool) or not isinstance(extreme, int | float) or not extreme > 0:
            raise ValueError(
                f"extreme must be a positive number of nats (tokens with |log-ratio| above it are "
                f"counted in kl/extreme; default 20), got {extreme!r}"
            )
        backends.check(backend)
        self._fdivs = fdiv.resolve(f_divergences)
        self.f_divergences: tuple[str, ...] = tuple(name for name, _ in self._fdivs)
        self.level: Level = level
        self.clamp = None if clamp is None else float(clamp)
        self.extreme = float(extreme)
        # What the kernels take: the clamp (inf: none) and the extreme-count threshold, which
        # a clamp below ``extreme`` lowers so that every clamped token is counted.
        self._clamp = math.inf if clamp is None else float(clamp)
        self._threshold = min(self.extreme, self._clamp)
        self.backend = backend
        self._triton_failed = False
        self._warned_state_cast = False
        # The last update's count of numeric mask values other than 0 and 1 (a device scalar;
        # None for a bool or no mask): a Monitor adds these up to name the mask at its window's end.
        self.last_invalid_mask: Tensor | None = None
        self.add_state("_acc", default=mom.empty(), dist_reduce_fx=mom.merge_rows)
        if self._fdivs:
            # [count, means, M2s] of the f-divergences, merged by the same Chan rule.
            n_f = len(self._fdivs)
            self.add_state(
                "_f",
                default=torch.zeros(fdiv.size(n_f), dtype=torch.float64),
                dist_reduce_fx=functools.partial(chan_rows, q=n_f),
            )
        # torchmetrics' MetricCollection shares one state between metrics whose states are
        # equal after the first update (compute groups). Two KLStats that differ in a setting
        # that changes the numbers (level, clamp, the extreme threshold) can have equal states
        # after one batch (no token beyond the clamp yet); merged, the clamped one would report
        # the unclamped values from then on. The grouping check compares state names first, so
        # an always-empty state named after the settings keeps such metrics apart. It is never
        # gathered (an empty list costs no collective), saved or moved.
        self.add_state(self._config_state_name(), default=[], dist_reduce_fx=None, persistent=False)

    def _config_state_name(self) -> str:
        """The name of the empty state that encodes the settings that change the numbers.

        Metrics with different settings get different names, so torchmetrics never puts them
        in one compute group. Backends compute the same numbers and are left out.
        """
        parts = (self.level, repr(self._clamp), repr(self._threshold), *self.f_divergences)
        text = "_".join(parts).replace(".", "p").replace("-", "m").replace("+", "")
        return f"_config_{text}"

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Merge another window (a KLStats of the same settings, or its ``metric_state``) into this one.

        Raises:
            ValueError: the other window was computed with another ``level``, ``clamp``,
                extreme threshold or f-divergences (its numbers cannot be merged with these).
        """
        mine = self._config_state_name()
        if isinstance(incoming_state, KLStats):
            if incoming_state._config_state_name() != mine:
                raise ValueError(
                    f"cannot merge {incoming_state!r} into {self!r}: their level, clamp, extreme "
                    "threshold or f-divergences differ, so their windows hold different quantities"
                )
            incoming_state = incoming_state.metric_state
        elif isinstance(incoming_state, dict):
            others = [k for k in incoming_state if k.startswith("_config_") and k != mine]
            if others:
                raise ValueError(
                    f"cannot merge a state of other settings ({others[0]}) into {self!r}: their level, "
                    "clamp, extreme threshold or f-divergences differ"
                )
            incoming_state = {mine: [], **incoming_state}  # e.g. {"_acc": vector}
        super().merge_state(incoming_state)

    # -- torchmetrics contract: the state is float64, owned by this metric -------------------
    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        """Move the state with the module (``to``, ``cuda``, ``cpu``) but keep it float64.

        torchmetrics applies ``fn`` to every state on ``module.to(dtype)``, ``set_dtype`` and
        Lightning's ``precision="bf16-true"``/``"16-true"``, which would turn the float64 moments
        (counts to 2**53, sums of ``e**l``) into float16/bf16 and break the kernels. KLStats
        takes the device from ``fn`` and refuses the dtype: its inputs may be of any float dtype,
        its state stays float64.
        """
        own = ("_acc", "_f") if self._fdivs else ("_acc",)
        super()._apply(fn, exclude_state=(*own, *exclude_state))  # returns self
        for name in own:
            setattr(self, name, self._moved(getattr(self, name), fn))
            default = self._defaults[name]
            if isinstance(default, Tensor):
                self._defaults[name] = self._moved(default, fn)
        return self

    @staticmethod
    def _moved(value: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        moved = fn(value)
        # A dtype cast: move the float64 original instead (to the device ``fn`` chose).
        return moved if moved.dtype == torch.float64 else value.to(device=moved.device)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torchmetrics keeps the loaded tensor itself as the state; the native fold writes the
        # state in place, so that would write into the caller's dict (and into every other
        # metric loaded from it). Load a float64 copy of the right size instead.
        key = prefix + "_acc"
        if key in state_dict:
            value = state_dict.pop(key)
            if not isinstance(value, Tensor) or value.shape != (mom.SIZE,) or not value.is_floating_point():
                error_msgs.append(
                    f"{key}: expected a float tensor of shape ({mom.SIZE},) (a KLStats state), got "
                    f"{type(value).__name__} {tuple(getattr(value, 'shape', ()))} "
                    f"{getattr(value, 'dtype', '')}"
                )
            else:
                self._acc = self._own(value)
        key = prefix + "_f"
        if key in state_dict and self._fdivs:
            value = state_dict.pop(key)
            size = fdiv.size(len(self._fdivs))
            if not isinstance(value, Tensor) or value.shape != (size,) or not value.is_floating_point():
                error_msgs.append(
                    f"{key}: expected a float tensor of shape ({size},) (the state of "
                    f"f_divergences={list(self.f_divergences)}), got {type(value).__name__} "
                    f"{tuple(getattr(value, 'shape', ()))}"
                )
            else:
                self._f = value.detach().to(device=self._acc.device, dtype=torch.float64).clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _own(self, value: Tensor) -> Tensor:
        """A new float64, contiguous copy of ``value`` on the state's device."""
        out = torch.empty(mom.SIZE, dtype=torch.float64, device=self._acc.device)
        return out.copy_(value.detach().reshape(mom.SIZE))

    def _checked_state(self) -> Tensor:
        """The state, made a float64 vector of the layout's size if something replaced it.

        ``_apply`` and ``load_state_dict`` keep the state float64; this catches a state assigned
        from outside (e.g. ``stats._acc = t.half()``), so that no kernel runs on a state of the
        wrong dtype or size. A few attribute reads: no device work, no host sync.
        """
        acc = self._acc
        if isinstance(acc, Tensor) and acc.dtype == torch.float64 and acc.shape == (mom.SIZE,):
            if acc.is_contiguous():
                return acc
        elif not isinstance(acc, Tensor) or acc.numel() != mom.SIZE or not acc.is_floating_point():
            raise ValueError(
                f"KLStats' state was replaced by {type(acc).__name__} "
                f"{tuple(getattr(acc, 'shape', ()))}: it must be a float64 vector of {mom.SIZE} "
                "moments. Use load_summary_vector() or load_state_dict() to restore a window"
            )
        if acc.dtype != torch.float64 and not self._warned_state_cast:
            self._warned_state_cast = True
            rank_zero_warn(
                f"KLStats' state was set to {acc.dtype} from outside (it is float64: counts and sums "
                "of e**l overflow or round in lower precisions); converted back to float64, the "
                "window may have lost precision. Use load_summary_vector() to restore a window",
                UserWarning,
            )
        self._acc = self._own(acc)
        return self._acc

    # -- validation (shapes and dtypes; mask values on device, never on the host) -----------
    def _check(self, logprobs: Any, ref_logprobs: Any, mask: Any) -> Tensor | None:
        self.last_invalid_mask = None
        for name, t in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of log-probs, got {type(t).__name__}")
            if t.device.type == "meta":
                raise ValueError(
                    f"{name} is a 'meta' tensor (shape only, no values); pass the real log-probs, "
                    "e.g. after the model is materialised on a device"
                )
            if torch.is_floating_point(t) and t.dtype not in _FLOAT_DTYPES:
                raise TypeError(
                    f"{name} has dtype {t.dtype}, which klmonitor cannot compute with; pass float32, "
                    "bfloat16, float16 or float64 log-probs (e.g. logprobs.float())"
                )
            if not torch.is_floating_point(t):
                raise TypeError(
                    f"{name} has dtype {t.dtype}; expected floating-point log-probs (float32, "
                    "bfloat16, float16 or float64). Pass log-probabilities of the sampled tokens, "
                    "e.g. logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)"
                )
        if logprobs.shape != ref_logprobs.shape:
            raise ValueError(
                f"logprobs has shape {tuple(logprobs.shape)} but ref_logprobs has shape "
                f"{tuple(ref_logprobs.shape)}; both must hold the log-probs of the same sampled "
                "tokens (check for a one-token shift between policy and reference)"
            )
        if logprobs.device != ref_logprobs.device:
            raise ValueError(
                f"logprobs is on {logprobs.device} but ref_logprobs is on {ref_logprobs.device}; "
                "move both to the same device"
            )
        if logprobs.dim() == 0:
            raise ValueError("logprobs is a scalar; expected [N] or [B, T] per-token log-probs")
        if self.level == "sequence" and logprobs.dim() != 2:
            raise ValueError(
                f"level='sequence' needs [B, T] inputs, got shape {tuple(logprobs.shape)}; "
                "reshape to one row per sequence or use level='token'"
            )
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.device.type == "meta":
            raise ValueError(
                "mask is a 'meta' tensor (shape only, no values); pass the real mask, e.g. after "
                "the batch is materialised on a device"
            )
        if mask.shape != logprobs.shape:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but logprobs has shape "
                f"{tuple(logprobs.shape)}; pass one mask entry per token (1/True = counted)"
            )
        if mask.is_complex():
            raise TypeError(
                f"mask has dtype {mask.dtype}; expected a bool mask or a numeric one holding 0 and 1 "
                "(e.g. attention_mask[:, 1:].bool())"
            )
        if mask.device != logprobs.device:
            mask = mask.to(logprobs.device, non_blocking=True)
        if mask.dtype == torch.bool:
            return mask
        # A numeric mask must hold 0 or 1. Anything else (0.5, -1, 2, NaN) is an error that
        # cannot be raised here without a host sync, so it is detected on device: the token is
        # left out and counted in the window's `nonfinite` (tokens that could not be used), so
        # `kl/nonfinite` shows it and the `nonfinite` alert fires. Not a weight: peers'
        # masked_mean would weight by it, but a soft mask in RL fine-tuning is nearly always a
        # bug (a padded float mask, an inverted or summed mask), and a silent weighting hides it.
        counted = mask == 1
        invalid = ~(counted | (mask == 0))
        if self._acc.device != logprobs.device:
            self.to(logprobs.device)
        unit = torch.zeros_like(self._acc)
        unit[mom.NONFINITE] = 1.0
        n_invalid = invalid.sum(dtype=torch.float64)
        self._acc = self._acc + unit * n_invalid
        self.last_invalid_mask = n_invalid
        return counted

    def update(self, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor | None = None) -> None:
        """Fold a batch into the window (on device, no host sync).

        Args:
            logprobs: log q(x) of the sampled tokens under the policy, ``[N]`` or ``[B, T]``
                (any float dtype; detached here).
            ref_logprobs: log p(x) of the same tokens under the reference, same shape.
            mask: optional, same shape: True/1 marks tokens to count, False/0 tokens to skip.
                A numeric mask holding anything else (0.5, -1, NaN) is an error detected on
                device: such tokens are skipped and counted in ``summary.nonfinite``.

        Raises:
            TypeError: integer log-probs, or a non-tensor argument.
            ValueError: mismatched shapes or devices, or a non-2-D input at sequence level.
        """
        self._checked_state()
        valid = self._check(logprobs, ref_logprobs, mask)
        if self._acc.device != logprobs.device:
            self.to(logprobs.device)
        if self._fdivs:  # the f-divergences: a float64 torch pass over the same tokens
            with torch.no_grad():
                self._f = fdiv.fold(
                    self._f, logprobs, ref_logprobs, valid, self._clamp, self._fdivs, self.level == "sequence"
                )
        backend = self._chosen(logprobs, ref_logprobs)
        try:
            self._acc = backend.fold(
                self._acc, logprobs, ref_logprobs, valid, self._clamp, self._threshold, self.level
            )
        except Exception as err:  # e.g. a GPU Triton cannot compile for: never crash training
            if backend.name != "triton":
                raise
            self._triton_failed = True
            rank_zero_warn(
                f"KLStats: the fused Triton kernel failed ({type(err).__name__}: {err}); using "
                "the eager torch path from now on (backend='torch' skips the kernel)",
                UserWarning,
            )
            fallback = backends.choose(self.backend, logprobs, ref_logprobs, self.level, ("triton",))
            self._acc = fallback.fold(
                self._acc, logprobs, ref_logprobs, valid, self._clamp, self._threshold, self.level
            )

    def _chosen(self, logprobs: Tensor, ref_logprobs: Tensor) -> backends.Backend:
        skip = ("triton",) if self._triton_failed else ()
        return backends.choose(self.backend, logprobs, ref_logprobs, self.level, skip)

    def next_backend(self, logprobs: Tensor, ref_logprobs: Tensor) -> str:
        """The backend the next :meth:`update` of these inputs runs.

        ``"native"``, ``"triton"``, ``"compile"`` or ``"torch"``: what a caller may ask that
        kernel to add in its pass.
        """
        return self._chosen(logprobs, ref_logprobs).name

    @property
    def limits(self) -> tuple[float, float]:
        """``(clamp, threshold)`` as the kernels take them.

        The clamp (``inf`` for none) and the extreme-count threshold ``min(extreme, clamp)``.
        """
        return self._clamp, self._threshold

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Spawn launchers (ddp_spawn, torch.multiprocessing) move CPU tensors into shared
        # memory; the host fast path merges in place, so each process needs its own state.
        self._acc = self._acc.clone()
        # A KLStats pickled by an older klmonitor: add what it lacks.
        self.__dict__.setdefault("_warned_state_cast", False)
        self.__dict__.setdefault("_fdivs", ())
        self.__dict__.setdefault("f_divergences", ())
        if self._config_state_name() not in self._defaults:
            self.add_state(self._config_state_name(), default=[], dist_reduce_fx=None, persistent=False)

    def _wrap_compute(self, compute: Callable[[], KLSummary]) -> Callable[[], KLSummary]:
        # torchmetrics' wrapper does the same (warn, cache, sync and unsync around compute)
        # and then walks the result twice with apply_to_collection to squeeze and clone any
        # tensor in it. Our result is a dataclass of Python numbers, so those walks only
        # deep-copy it: ~0.4 ms per compute, 10 % of a 4M-token update. This skips them.
        @functools.wraps(compute)
        def wrapped() -> KLSummary:
            if not self.update_called:
                rank_zero_warn(
                    f"The ``compute`` method of metric {type(self).__name__} was called before the "
                    "``update`` method: the summary is of an empty window.",
                    UserWarning,
                )
            if self._computed is not None:
                return self._computed
            with self.sync_context(
                dist_sync_fn=self.dist_sync_fn,
                should_sync=self._to_sync,
                should_unsync=self._should_unsync,
            ):
                value = compute()
            if self.compute_with_cache:
                self._computed = value  # type: ignore[assignment]  # torchmetrics types it as None
            return value

        return wrapped

    def compute(self) -> KLSummary:
        """The window's :class:`KLSummary`, merged over all ranks (one host transfer)."""
        if not self._fdivs:
            return KLSummary.from_vector(self._acc.detach().cpu().numpy().tolist(), self.level)
        values = torch.cat([self._acc.detach(), self._f.detach().to(self._acc.device)]).cpu().tolist()
        summary = KLSummary.from_vector(values[: mom.SIZE], self.level)
        summary.f = read_f(values[mom.SIZE :], self.f_divergences)
        return summary

    def summary_vector(self) -> Tensor:
        """A copy of the raw moments vector of this rank's window (on device; for advanced use).

        A copy: the state itself is updated in place, and is never shared with the caller.
        """
        return self._acc.clone()

    def load_summary_vector(self, vector: Tensor) -> None:
        """Replace this rank's window by a moments vector from :meth:`summary_vector` (a resume).

        Raises:
            ValueError: not a float tensor of the moments vector's size.
        """
        if not isinstance(vector, Tensor) or vector.shape != (mom.SIZE,) or not vector.is_floating_point():
            raise ValueError(
                f"vector must be a float tensor of shape ({mom.SIZE},) from summary_vector(), got "
                f"{type(vector).__name__} {getattr(vector, 'shape', '')}"
            )
        self.reset()
        self._acc = vector.detach().to(device=self._acc.device, dtype=torch.float64).clone()

    def f_vector(self) -> Tensor | None:
        """A copy of this rank's f-divergence state ``[count, means, M2s]`` (``None``: none requested)."""
        return self._f.clone() if self._fdivs else None

    def load_f_vector(self, vector: Tensor) -> None:
        """Replace this rank's f-divergence state by one from :meth:`f_vector` (a resume).

        Raises:
            ValueError: no f-divergence was requested, or not a float tensor of the state's size.
        """
        size = fdiv.size(len(self._fdivs))
        if not self._fdivs or not isinstance(vector, Tensor) or vector.shape != (size,):
            raise ValueError(
                f"vector must be a float tensor of shape ({size},) from f_vector() of a KLStats with "
                f"f_divergences={list(self.f_divergences)}, got {type(vector).__name__} "
                f"{getattr(vector, 'shape', '')}"
            )
        self._f = vector.detach().to(device=self._acc.device, dtype=torch.float64).clone()

    def __repr__(self) -> str:
        return (
            f"KLStats(level={self.level!r}, clamp={self.clamp}, extreme={self.extreme}, "
            f"backend={self.backend!r}"
            + (f", f_divergences={list(self.f_divergences)}" if self._fdivs else "")
            + ")"
        )
