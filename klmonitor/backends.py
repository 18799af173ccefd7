"""The backends that fold a batch into a window's moments vector, in one registry.

Each :class:`Backend` declares what it computes (the six quantities of the layout, for the
levels it supports) and when it runs; :func:`choose` picks, for a batch, the first backend of
:data:`REGISTRY` that accepts it, and :class:`klmonitor.KLStats` calls its ``fold``. The fused
kernels (``triton`` on CUDA, ``native`` on CPU) keep their fixed set; everything else (the
f-divergences, sequence level without ``compile``, float64 inputs) takes the torch path. Every
backend merges with the one Chan rule of :mod:`klmonitor._merge`.

>>> [b.name for b in REGISTRY]
['triton', 'native', 'compile', 'torch']
>>> choose("auto", torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), "token").name
'torch'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from klmonitor import _moments as mom
from klmonitor import _native
from klmonitor._layout import QUANTITIES

__all__ = ["NAMES", "REGISTRY", "Backend", "Fold", "check", "choose"]

#: What ``backend=`` accepts: ``"auto"`` or a registered backend's name.
NAMES: tuple[str, ...] = ("auto", "torch", "native", "triton", "compile")
BackendName = Literal["auto", "torch", "native", "triton", "compile"]

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: ``fold(acc, logp, ref, valid, clamp, threshold, level) -> acc``: the window with the batch in.
Fold = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float, float, str], Tensor]


def _fused() -> Any:
    """The Triton kernel's module, imported on first use (it imports Triton if installed)."""
    from klmonitor import _triton

    return _triton


def _flat(valid: Tensor | None) -> Tensor | None:
    return valid.reshape(-1) if valid is not None else None


def _diagnostics_asked(n: int) -> _native.Diagnostics | None:
    """The diagnostics a Monitor asked this fold of ``n`` tokens for (``_native.diagnosing``).

    The same thread-local request the C kernel's ``_native.fold`` reads: whichever fused kernel
    takes the batch computes it in its pass and sets ``done``.
    """
    request: _native.Diagnostics | None = getattr(_native._pending, "request", None)
    return request if request is not None and not request.done and request.n == n else None


def _fold_triton(
    acc: Tensor, logp: Tensor, ref: Tensor, valid: Tensor | None, clamp: float, threshold: float, level: str
) -> Tensor:
    with torch.no_grad():
        return _fused().fold(
            acc,
            logp.reshape(-1),
            ref.reshape(-1),
            _flat(valid),
            clamp,
            threshold,
            interpret=logp.device.type == "cpu",
            diag=_diagnostics_asked(logp.numel()),
        )


def _fold_native(
    acc: Tensor, logp: Tensor, ref: Tensor, valid: Tensor | None, clamp: float, threshold: float, level: str
) -> Tensor:
    # One C call computes the batch's moments and merges them into the state in place (no
    # torch ops, which cost more than the kernel on small batches).
    if acc.is_shared():  # never write into memory another process may share
        acc = acc.clone()
    logp, ref = logp.detach(), ref.detach()
    if logp.dtype == ref.dtype and _native.reads_dtype(logp.dtype):
        lp, rp = logp.reshape(-1).contiguous(), ref.reshape(-1).contiguous()
    else:  # e.g. bf16 without AVX2, or mixed dtypes: one float32 copy of each
        lp = logp.reshape(-1).to(torch.float32).contiguous()
        rp = ref.reshape(-1).to(torch.float32).contiguous()
    mk = valid.reshape(-1).contiguous() if valid is not None else None
    _native.fold(lp, rp, mk, clamp, threshold, acc.numpy())
    return acc


def _fold_compile(
    acc: Tensor, logp: Tensor, ref: Tensor, valid: Tensor | None, clamp: float, threshold: float, level: str
) -> Tensor:
    logp, ref = logp.detach(), ref.detach()
    if level == "sequence":
        chunk = mom.sequence_moments(logp, ref, valid, clamp, threshold)
    else:
        chunk = mom.token_moments_compiled(logp.reshape(-1), ref.reshape(-1), _flat(valid), clamp, threshold)
    return mom.merge(acc, chunk)


def _fold_torch(
    acc: Tensor, logp: Tensor, ref: Tensor, valid: Tensor | None, clamp: float, threshold: float, level: str
) -> Tensor:
    # Eager ops in bounded chunks (or blocks of rows), folded into the state directly (under
    # no_grad: no detach ops, no graph).
    with torch.no_grad():
        if level == "sequence":
            return mom.sequence_fold_torch(acc, logp, ref, valid, clamp, threshold)
        return mom.token_fold_torch(acc, logp.reshape(-1), ref.reshape(-1), _flat(valid), clamp, threshold)


@dataclass(frozen=True)
class Backend:
    """One way to fold a batch into the moments vector.

    Attributes:
        name: what ``backend=`` calls it.
        computes: the per-sample quantities it writes (the layout's fixed set).
        levels: the statistics levels it supports.
        requested_by: the ``backend=`` values under which it may run.
        accepts: ``accepts(logp, ref, requested) -> bool``: whether it runs this batch.
        fold: the fold itself.
        note: where it runs, for the docs.
    """

    name: str
    computes: tuple[str, ...]
    levels: tuple[str, ...]
    requested_by: tuple[str, ...]
    accepts: Callable[[Tensor, Tensor, str], bool]
    fold: Fold
    note: str = ""

    def runs(self, logp: Tensor, ref: Tensor, level: str, requested: str) -> bool:
        """Whether this backend folds this batch at ``level`` under ``backend=requested``."""
        return requested in self.requested_by and level in self.levels and self.accepts(logp, ref, requested)


def _triton_accepts(logp: Tensor, ref: Tensor, requested: str) -> bool:
    # CUDA float32/bf16/fp16 inputs; CPU tensors only when asked for (Triton's interpreter).
    if logp.device.type != "cuda" and requested != "triton":
        return False
    return bool(_fused().supports(logp, ref))


def _native_accepts(logp: Tensor, ref: Tensor, requested: str) -> bool:
    # float64 in either input keeps the float64 torch path (as log_ratio would promote).
    return (
        logp.device.type == "cpu"
        and logp.dtype in _NATIVE_DTYPES
        and ref.dtype in _NATIVE_DTYPES
        and logp.numel() > 0
        and _native.available()
    )


#: The backends in the order ``"auto"`` tries them; the torch path accepts everything.
REGISTRY: tuple[Backend, ...] = (
    Backend(
        "triton",
        QUANTITIES,
        ("token",),
        ("auto", "triton"),
        _triton_accepts,
        _fold_triton,
        "the fused Triton kernel: CUDA float32/bf16/fp16 inputs",
    ),
    Backend(
        "native",
        QUANTITIES,
        ("token",),
        ("auto", "native"),
        _native_accepts,
        _fold_native,
        "the fused C kernel built at install time: CPU float32/bf16/fp16 inputs",
    ),
    Backend(
        "compile",
        QUANTITIES,
        ("token", "sequence"),
        ("compile",),
        lambda logp, ref, requested: True,
        _fold_compile,
        "the torch path through torch.compile",
    ),
    Backend(
        "torch",
        QUANTITIES,
        ("token", "sequence"),
        NAMES,
        lambda logp, ref, requested: True,
        _fold_torch,
        "eager torch ops in bounded chunks: every device and dtype",
    ),
)

_BY_NAME = {b.name: b for b in REGISTRY}


def get(name: str) -> Backend:
    """The registered backend called ``name``."""
    return _BY_NAME[name]


def check(requested: Any) -> None:
    """Raise the error a user can act on when ``backend=requested`` cannot run here.

    Raises:
        ValueError: not a backend name.
        RuntimeError: ``"triton"`` without Triton, ``"native"`` without the built kernel.
    """
    if requested not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {requested!r}")
    if requested == "triton" and not _fused().available():
        raise RuntimeError(
            "backend='triton' needs Triton, which could not be imported: pip install triton "
            "(it comes with CUDA builds of torch on Linux) or use backend='auto'"
        )
    if requested == "native" and not _native.available():
        raise RuntimeError(
            f"backend='native' needs the fused CPU kernel, which is not available: "
            f"{_native.unavailable_reason()}. Use backend='auto' (the same numbers through "
            "the pure-torch path where the kernel is missing)"
        )


def choose(requested: str, logp: Tensor, ref: Tensor, level: str, skip: tuple[str, ...] = ()) -> Backend:
    """The first backend of the registry that folds this batch (never ``skip``'s, e.g. a failed kernel)."""
    for backend in REGISTRY:
        if backend.name not in skip and backend.runs(logp, ref, level, requested):
            return backend
    return _BY_NAME["torch"]
