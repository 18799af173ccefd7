"""Window moments: the state vector KLStats accumulates, and the two ways to fill it.

A *moments vector* is a float64 tensor of ``SIZE`` entries (layout below) describing a set of
samples: their count, the mean and M2 (sum of squared deviations) of each of the six
quantities, and the token diagnostics. Two vectors merge exactly with Chan's parallel update,
so chunks, steps and ranks combine in any order. Everything here runs on the tensors' device
with no host sync: no ``.item()``, no boolean indexing, no Python branch on a tensor value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from klmonitor import estimators as est
from klmonitor._layout import (  # noqa: F401  (re-exported: the layout is read through this module)
    CLAMPED,
    COUNT,
    M2,
    MAX_ABS,
    MEAN,
    NONFINITE,
    NQ,
    QUANTITIES,
    SIZE,
    TOKENS,
)

# Elements per eager chunk: bounds the temporaries of the torch path (~30 arrays this long).
_CHUNK = 1 << 20
_SAMPLE = 256


def empty(device: torch.device | str | None = None) -> Tensor:
    """The moments vector of no samples."""
    return torch.zeros(SIZE, dtype=torch.float64, device=device)


def merge(a: Tensor, b: Tensor) -> Tensor:
    """Chan's parallel merge of two moments vectors (exact; either may be empty)."""
    na, nb = a[COUNT], b[COUNT]
    n = na + nb
    inv = 1.0 / n.clamp_min(1.0)
    delta = b[MEAN] - a[MEAN]
    mean = a[MEAN] + delta * (nb * inv)
    m2 = a[M2] + b[M2] + delta * delta * (na * nb * inv)
    counts = a[TOKENS:MAX_ABS] + b[TOKENS:MAX_ABS]
    mx = torch.maximum(a[MAX_ABS], b[MAX_ABS])
    return torch.cat([n.reshape(1), mean, m2, counts, mx.reshape(1)])


def merge_rows(rows: Tensor) -> Tensor:
    """Merge the moments vectors stacked in ``rows`` (``[R, SIZE]``, e.g. one per rank)."""
    rows = rows.reshape(-1, SIZE)
    out = rows[0]
    for r in range(1, rows.shape[0]):
        out = merge(out, rows[r])
    return out


def from_shifted_sums(count: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, diagnostics: Tensor) -> Tensor:
    """Build a moments vector from ``S1 = sum(x - shift)`` and ``S2 = sum((x - shift)**2)``.

    ``diagnostics`` holds tokens, nonfinite, clamped, max|l| (float64, same device).
    """
    count = count.to(torch.float64)
    inv = 1.0 / count.clamp_min(1.0)
    s1 = s1.to(torch.float64)
    mean = shift.to(torch.float64) + s1 * inv
    m2 = (s2.to(torch.float64) - s1 * s1 * inv).clamp_min(0.0)
    # With no samples the mean is meaningless; 0 keeps merges and reports clean.
    mean = torch.where(count > 0, mean, torch.zeros_like(mean))
    return torch.cat([count.reshape(1), mean, m2, diagnostics.to(torch.float64)])


def quantities(lc: Tensor) -> list[Tensor]:
    """The six per-sample quantities of clamped, finite log-ratios ``lc``.

    Shares subexpressions, and takes ``k2 - k3 = -(l**3/6 + l**4/24 + ...)`` from its series
    near 0, where subtracting the two would cancel.
    """
    k3 = est.k3(lc)
    k2 = est.k2(lc)
    em1 = torch.expm1(lc)
    # r - 1 = l + k3 holds exactly; near 0 it is more precise than expm1 in low precision.
    small = lc.abs() < est._TAYLOR_BELOW
    em1 = torch.where(small, lc + k3, em1)
    # k2 - k3 = -l**3 (1/6 + l/24 + ...)
    diff = torch.where(small, -(lc * lc * lc) * est._horner(lc, est._K3_COEFFS[1:]), k2 - k3)
    kl_pq = (em1 * lc - k3).clamp_min(0.0)
    return [-lc, k2, k3, kl_pq, em1, diff]


def _prepare(
    logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Log-ratio, validity weights, clamped log-ratio and the per-token diagnostics."""
    lr = est.log_ratio(logp, ref)
    finite = torch.isfinite(lr)
    valid = mask if mask is not None else torch.ones_like(finite)
    good = valid & finite
    lz = torch.where(good, lr, torch.zeros_like(lr))
    lc = lz.clamp(-clamp, clamp)
    w = good.to(lr.dtype)
    nonfinite = (valid & ~finite).sum(-1, dtype=torch.float64)
    clamped = (lz.abs() > clamp).sum(-1, dtype=torch.float64)
    max_abs = lz.abs().amax(-1).to(torch.float64) if lz.numel() else lz.new_zeros(lz.shape[:-1])
    diag = torch.stack([w.sum(-1, dtype=torch.float64), nonfinite, clamped, max_abs.double()], -1)
    return lc, w, good, diag


def token_chunk(logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float) -> Tensor:
    """Moments vector over the valid tokens of one flat chunk, in one torch expression.

    Written so ``torch.compile`` can fuse it into a single pass (``backend="compile"``).
    """
    lc, w, _, diag = _prepare(logp, ref, mask, clamp)
    # Shifts: the quantities' mean over a few evenly spread valid tokens, so the sums of
    # squares below stay well conditioned when the mean dwarfs the spread.
    stride = max(1, logp.shape[0] // _SAMPLE)
    ws = w[::stride][:_SAMPLE]
    sample = quantities(lc[::stride][:_SAMPLE])
    inv = 1.0 / ws.sum().clamp_min(1.0)
    shift = torch.stack([(q * ws).sum() * inv for q in sample])
    s1, s2 = [], []
    for q, sh in zip(quantities(lc), shift, strict=True):
        d = ((q - sh) * w).double()
        s1.append(d.sum())
        s2.append((d * d).sum())
    return from_shifted_sums(diag[0], shift, torch.stack(s1), torch.stack(s2), diag)


def token_moments_torch(logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float) -> Tensor:
    """Moments vector over the valid tokens of flat tensors, in plain torch ops.

    Eager torch materialises ~30 temporaries per element, so long inputs go in chunks.
    """
    out = empty(logp.device)
    n = logp.numel()
    for lo in range(0, max(n, 1), _CHUNK):
        hi = min(lo + _CHUNK, n)
        m = mask[lo:hi] if mask is not None else None
        out = merge(out, token_chunk(logp[lo:hi], ref[lo:hi], m, clamp))
    return out


_compiled: Any = None


def token_moments_compiled(logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float) -> Tensor:
    """:func:`token_chunk` through ``torch.compile``: one fused pass on GPU.

    Dynamic shapes: compiled once per dtype, device and mask-or-not, not per batch size.
    """
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(token_chunk, dynamic=True)
    if logp.numel() == 0:
        return token_chunk(logp, ref, mask, clamp)
    # detach() drops the view's link to its base (the caller flattens [B, T] inputs): dynamo
    # would otherwise guard on the base's shape and recompile when B becomes 1.
    flat_mask = mask.detach() if mask is not None else None
    result: Tensor = _compiled(logp.detach(), ref.detach(), flat_mask, clamp)
    return result


def sequence_moments(logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float) -> Tensor:
    """Moments vector over sequences of ``[B, T]`` inputs.

    Each row's quantities are summed over its valid tokens; a row with no valid token is not a
    sample. The diagnostics (tokens, nonfinite, clamped, max) still count tokens.
    """
    lc, w, good, diag = _prepare(logp, ref, mask, clamp)
    per_seq = torch.stack([(q * w).double().sum(-1) for q in quantities(lc)], -1)  # [B, 6]
    has = (good.sum(-1) > 0).double()  # [B]
    count = has.sum()
    inv = 1.0 / count.clamp_min(1.0)
    mean = (per_seq * has[:, None]).sum(0) * inv
    dev = (per_seq - mean) * has[:, None]
    m2 = (dev * dev).sum(0)
    totals = diag.sum(0)
    totals[3] = diag[:, 3].amax() if diag.shape[0] else totals[3]
    return torch.cat([count.reshape(1), mean, m2, totals])
