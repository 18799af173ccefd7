"""Window moments: the state vector KLStats accumulates, and how torch ops fill it.

The eager folds (:func:`token_fold_torch`, :func:`sequence_fold_torch`: the path on GPUs
without the fused Triton kernel of ``klmonitor._triton``, and wherever ``backend="torch"``) work
in bounded chunks through one in-place workspace; :func:`token_chunk` is one torch expression
for ``torch.compile`` (``backend="compile"``).

A *moments vector* is a float64 tensor of ``SIZE`` entries (layout below) describing a set of
samples: their count, the mean and M2 (sum of squared deviations) of each of the six
quantities, and the token diagnostics. Two vectors merge exactly with Chan's parallel update,
so chunks, steps and ranks combine in any order. Everything here runs on the tensors' device
with no host sync: no ``.item()``, no boolean indexing, no Python branch on a tensor value.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from klmonitor import estimators as est
from klmonitor._layout import (  # noqa: F401  (re-exported: the layout is read through this module)
    COUNT,
    EXTREME,
    M2,
    MAX_ABS,
    MEAN,
    NONFINITE,
    NQ,
    QUANTITIES,
    SIZE,
    TOKENS,
)
from klmonitor._merge import chan

_SAMPLE = 256
# Above this |l| (or clamp), float32 is not enough: exp overflows float32 above 88.7, and the
# float32 squares of l e**l (the variances) above ~44. The torch paths then compute in float64.
FLOAT32_CLAMP = 30.0
# Above this l, a token's values near float64's limit: r = e**700 = 1e304, and r l (kl_pq)
# overflows at l = 703.2, e**l at 709.8. Without a clamp below it, such a token counts as
# non-finite (as l = +inf does: a token the policy gives zero probability to float64's
# precision) and is kept out of the statistics. Negative l has no such limit (r -> 0).
LOG_MAX = 700.0


def empty(device: torch.device | str | None = None) -> Tensor:
    """The moments vector of no samples."""
    return torch.zeros(SIZE, dtype=torch.float64, device=device)


def merge(a: Tensor, b: Tensor) -> Tensor:
    """Chan's parallel merge of two moments vectors (exact; either may be empty)."""
    n, mean, m2 = chan(a[COUNT], a[MEAN], a[M2], b[COUNT], b[MEAN], b[M2])
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

    ``diagnostics`` holds tokens, nonfinite, extreme, max|l| (float64, same device).
    """
    count = count.to(torch.float64)
    inv = 1.0 / count.clamp_min(1.0)
    s1 = s1.to(torch.float64)
    q = s1 * inv
    mean = shift.to(torch.float64) + q
    m2 = _m2(s2.to(torch.float64), s1, q)
    # With no samples the mean is meaningless; 0 keeps merges and reports clean.
    mean = torch.where(count > 0, mean, torch.zeros_like(mean))
    return torch.cat([count.reshape(1), mean, m2, diagnostics.to(torch.float64)])


def _m2(s2: Tensor, s1: Tensor, q: Tensor) -> Tensor:
    """``M2 = S2 - S1 q`` (``q = S1 / n``), at least 0; ``inf`` where ``S2`` overflowed float64.

    A token of ``l`` near 700 has ``r - 1`` near 1e304, whose square is beyond float64: the
    variance is then reported as ``inf``, never as the NaN of ``inf - inf``.
    """
    m2 = torch.addcmul(s2, s1, q, value=-1.0).clamp_min_(0.0)
    return torch.where(torch.isinf(s2), s2, m2)


def quantities(lc: Tensor) -> list[Tensor]:
    """The six per-sample quantities of clamped, finite log-ratios ``lc``.

    Shares subexpressions, and takes ``k2 - k3 = -(l**3/6 + l**4/24 + ...)`` from its series
    near 0, where subtracting the two would cancel.
    """
    k3 = est.k3(lc)
    k2 = est.k2(lc)
    em1 = torch.expm1(lc)
    # r - 1 = l + k3 holds exactly; near 0 it is more precise than expm1 in low precision.
    small = lc.abs() < est.TAYLOR_BELOW
    em1 = torch.where(small, lc + k3, em1)
    # k2 - k3 = -l**3 (1/6 + l/24 + ...)
    diff = torch.where(small, -(lc * lc * lc) * est.horner(lc, est.K3_SERIES[1:]), k2 - k3)
    kl_pq = (em1 * lc - k3).clamp_min(0.0)
    return [-lc, k2, k3, kl_pq, em1, diff]


def _prepare(
    logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, threshold: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Log-ratio, validity weights, clamped log-ratio and the per-token diagnostics.

    The log-ratio (float32 at least) is widened to float64 where float32 could overflow
    (``clamp`` above 30, e.g. no clamp: ``exp`` overflows float32 above 88.7 and float32 squares
    of ``l e**l`` above ~44); the extreme count is of valid, finite tokens with ``|l| > threshold``.
    """
    lr = est.log_ratio(logp, ref)
    if clamp > FLOAT32_CLAMP:
        lr = lr.double()
    finite = torch.isfinite(lr)
    if clamp > LOG_MAX:  # e**l finite in float64 too (see LOG_MAX)
        finite = finite & (lr <= LOG_MAX)
    valid = mask if mask is not None else torch.ones_like(finite)
    good = valid & finite
    lz = torch.where(good, lr, torch.zeros_like(lr))
    lc = lz.clamp(-clamp, clamp)
    w = good.to(lr.dtype)
    nonfinite = (valid & ~finite).sum(-1, dtype=torch.float64)
    extreme = (lz.abs() > threshold).sum(-1, dtype=torch.float64)
    max_abs = lz.abs().amax(-1).to(torch.float64) if lz.numel() else lz.new_zeros(lz.shape[:-1])
    diag = torch.stack([w.sum(-1, dtype=torch.float64), nonfinite, extreme, max_abs.double()], -1)
    return lc, w, good, diag


def token_chunk(logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, threshold: float) -> Tensor:
    """Moments vector over the valid tokens of one flat chunk, in one torch expression.

    Written so ``torch.compile`` can fuse it into a single pass (``backend="compile"``).
    """
    lc, w, _, diag = _prepare(logp, ref, mask, clamp, threshold)
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


# Elements per chunk of the eager path. A chunk needs five rows of the compute dtype and two
# bool masks (22 bytes per float32 element, ~17 MiB here) whatever the input's length: 4M
# float32 tokens (36 MB with a bool mask) go in five chunks, with temporaries below half the
# inputs and under 200 aten ops per update (benchmarks/bench_eager_ops.py).
_EAGER_CHUNK = 819_200
# The Taylor branch (|l| < 0.1): k3 = l**2 / 2 + T and k2 - k3 = -T with T = l**3 H(l),
# H = 1/6 + l/24 + l**2/120 + l**3/720 (+ l**4/5040 in float64; in float32 that term is below
# 2 ulp of T and 1e-8 of k3 on the branch).
_H32 = est.K3_SERIES[1:5]
_H64 = est.K3_SERIES[1:]
# The eager path's workspace rows: [k3 - k2, l**2, r - 1, k3, l]; group A is the first two
# (reduced first), then -kl_pq replaces l**2 and group B is the last four. In that order of
# rows ("Q rows": A then B), _ROW_MAP gives, per quantity (QUANTITIES order), its row and
# factor.
_ROW_MAP = ((5, -1.0), (1, 0.5), (4, 1.0), (2, -1.0), (3, 1.0), (0, -1.0))
# Each chunk leaves a row of 23 numbers ("stats row"): min and max of its log-ratios (invalid
# ones read 0); the counts [valid, extreme, valid and finite]; var and mean of group A's rows;
# var and mean of group B's rows (of the shifted values); 6 zeros. The shift has a row of its
# own: 17 zeros, then the shifts of group A's and group B's rows.
_STATS = 23
_MEAN_COL = (7, 8, 13, 14, 15, 16)
_VAR_COL = (5, 6, 9, 10, 11, 12)
_COUNT_COL = (2, 3, 4)
_SHIFT_COL = (17, 18, 19, 20, 21, 22)
_consts_cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, ...]] = {}


def _consts(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Constants of the eager path, made once per device and dtype (``spread_nz``: where ``spread`` is not 0).

    Made on the device by fills (no host-to-device copy, which would synchronise): zero and
    the Horner coefficients (0-d), zero pads of the stats rows, and float64 maps. ``spread``
    [21, 46] takes the column sums of ``[table, table**2]`` (chunk rows and shift row) to
    ``[S1 / size, S2 / size, counts, shift]``: the shifted sums of the six quantities (per
    chunk length), the counts ``[valid, extreme, finite]`` and the shifts, in QUANTITIES
    order. ``last`` marks the columns a shorter last chunk scales. ``to_diag`` [3, 3] takes
    the counts to ``[tokens, nonfinite, extreme]``; ``to_q`` [6, 6] takes the rows' order to
    QUANTITIES order (signs and the 1/2 of k2 included).
    """
    key = (device, dtype)
    if key not in _consts_cache:
        coeffs = _H64 if dtype == torch.float64 else _H32
        consts = [torch.full((), c, dtype=dtype, device=device) for c in (0.0, *coeffs[:-1])]
        spread = torch.zeros(3 * NQ + 3, 2 * _STATS, dtype=torch.float64, device=device)
        for j, (row, f) in enumerate(_ROW_MAP):
            spread[j, _MEAN_COL[row]] = f  # S1 += f (mean - shift)
            spread[NQ + j, _VAR_COL[row]] = f * f  # S2 += f**2 (var + (mean - shift)**2)
            spread[NQ + j, _STATS + _MEAN_COL[row]] = f * f
            spread[2 * NQ + 3 + j, _SHIFT_COL[row]] = f
        for i, col in enumerate(_COUNT_COL):
            spread[2 * NQ + i, col] = 1.0
        last = torch.zeros(2 * _STATS, dtype=torch.float64, device=device)
        for col in _MEAN_COL + _VAR_COL:
            last[col] = last[_STATS + col] = 1.0
        to_diag = torch.zeros(3, 3, dtype=torch.float64, device=device)
        to_diag[0, 2] = to_diag[1, 0] = to_diag[2, 1] = 1.0
        to_diag[1, 2] = -1.0
        to_q = torch.zeros(NQ, NQ, dtype=torch.float64, device=device)
        for j, (row, f) in enumerate(_ROW_MAP):
            to_q[j, row] = f
        pads = (torch.zeros(6, 1, dtype=dtype, device=device), torch.zeros(17, 1, dtype=dtype, device=device))
        spread_nz = (spread != 0).double()
        _consts_cache[key] = (*consts, *pads, spread, last, to_diag, to_q, spread_nz)
    return _consts_cache[key]


def _workspace(q: Tensor) -> tuple[Tensor, ...]:
    """Views of a ``[5, n]`` workspace: its rows, its groups, the count rows, x as [1, n]."""
    return (*q.unbind(0), q[0:2], q[1:5], q[0:3], q[1:2])


class _Consts:
    """What one chunk's elementwise work needs besides its inputs (see _chunk_rows)."""

    def __init__(
        self,
        zero: Tensor,
        h: list[Tensor],
        top: float,
        dtype: torch.dtype,
        ratio_dtype: torch.dtype,
        direct: bool,
    ) -> None:
        self.zero, self.h, self.top = zero, h, top
        self.dtype, self.ratio_dtype, self.direct = dtype, ratio_dtype, direct


def _chunk_rows(
    rows: tuple[Tensor, ...],
    lp: Tensor,
    rp: Tensor,
    valid: Tensor | None,
    clamp: float,
    threshold: float,
    k: _Consts,
    stats: list[Tensor],
    dim: int | tuple[int, ...],
) -> Tensor:
    """Fill a chunk's workspace rows in place; append min, max and counts to ``stats``.

    Afterwards ``y = k3 - k2``, ``x = l**2``, ``em1 = r - 1``, ``k3`` and ``lr = l``, all 0
    where the token is invalid; returns ``good`` (valid and finite). ``stats`` gets the min
    and max of the log-ratio (``x_2d``'s reduction over ``dim``) and the sums over ``dim`` of
    the count rows ``[valid, extreme, good]`` (exact float sums below 2**24 per chunk).
    """
    y, x, em1, k3, lr, _, _, count_rows, x_2d = rows
    # x: the log-ratio in float32 at least (estimators.log_ratio), then 0 where invalid.
    if k.direct:  # float32 (float64) inputs: l in float32 (float64), written to the rows
        torch.sub(rp, lp, out=x)
    else:  # bf16, fp16 or mixed: upcast, then subtract in the rows' dtype (no copies)
        x.copy_(rp)
        x.sub_(lp)
    good = torch.lt(torch.abs(x, out=y), math.inf)  # finite
    if clamp > LOG_MAX:  # and e**l finite in float64 (see LOG_MAX)
        good.logical_and_(torch.le(x, LOG_MAX))
    if valid is not None:
        y.copy_(valid)
        good.logical_and_(valid)
    else:
        y.fill_(1.0)
    if math.isinf(clamp):  # no clamp (the default): l as it is
        torch.where(good, x, k.zero, out=lr)
        torch.abs(lr, out=x)
        stats += torch.aminmax(x_2d, dim=1, keepdim=True)  # of |l|: the max is max |l|
        torch.gt(x, threshold, out=x)  # extreme: |l| > threshold
    else:
        torch.where(good, x, k.zero, out=x)
        stats += torch.aminmax(x_2d, dim=1, keepdim=True)
        torch.clamp(x, -clamp, clamp, out=lr)  # l
        if threshold == clamp:
            torch.ne(x, lr, out=x)  # clamped = extreme
        else:
            torch.abs(x, out=x)
            torch.gt(x, threshold, out=x)  # extreme: |l| > threshold
    em1.copy_(good)
    stats.append(count_rows.sum(dim, keepdim=True))  # [valid, extreme, good]
    torch.mul(lr, lr, out=x)  # l**2
    large = torch.ge(x, est.TAYLOR_BELOW**2)  # |l| >= 0.1: off the Taylor branch
    # y = T = l**3 H(l) (Horner's rule), k3 - k2 on the Taylor branch
    h = k.h
    torch.add(h[-1], lr, alpha=k.top, out=y)
    for coeff in reversed(h[:-1]):
        torch.addcmul(coeff, y, lr, out=y)
    y.mul_(lr).mul_(x)
    torch.expm1(lr, out=em1)
    em1.sub_(lr)  # k3 off the branch: (r - 1) - l
    torch.add(y, x, alpha=0.5, out=k3)  # k3 on the branch: T + l**2 / 2
    torch.where(large, em1, k3, out=k3)  # k3
    torch.where(large, em1, y, out=y)
    y.addcmul_(x, large, value=-0.5)  # k3 - k2: T, or (r - 1 - l) - l**2 / 2 off the branch
    torch.expm1(lr, out=em1)  # r - 1
    return good


def token_fold_torch(
    acc: Tensor, logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, threshold: float
) -> Tensor:
    """``acc`` merged with the moments of the valid tokens of flat tensors, in eager torch ops.

    Lean in ops and memory, for GPUs without the fused kernel: the input goes in chunks of at
    most ``_EAGER_CHUNK`` elements through one ``[5, chunk]`` workspace, every elementwise op
    writes into it in place, and the six quantities are reduced by two ``var_mean`` calls per
    chunk; counts are sums of float rows (a bool tensor's ``sum`` would copy it to int64).
    Invalid tokens (masked or non-finite) get l = 0, where all six quantities are 0. Before
    each reduction the shift (the quantities' mean over the first chunk's valid tokens) is
    taken off the valid entries, so the reductions see deviations (0 for invalid entries):
    float32 reductions keep the precision of the mean and variance when the mean dwarfs the
    spread. No host sync, no host-to-device copy.

    ``clamp`` may be ``math.inf`` (no clamp); above 30 the rows are float64 (exact values to
    |l| = 700); ``threshold``: tokens with ``|l|`` above it are counted as extreme.
    """
    n = logp.numel()
    if n == 0:
        return acc
    # float64 rows for float64 inputs, and above a clamp of 30 (no clamp, by default), where
    # float32's exp and squares of l e**l (the variances) overflow.
    ratio_dtype = torch.float64 if torch.float64 in (logp.dtype, ref.dtype) else torch.float32
    dtype = torch.float64 if clamp > FLOAT32_CLAMP else ratio_dtype
    zero, *h, pad6, pad17, spread, last_cols, to_diag, _, spread_nz = _consts(logp.device, dtype)
    top = (_H64 if dtype == torch.float64 else _H32)[-1]  # the last coefficient, a Python float
    k = -(-n // _EAGER_CHUNK)
    size = -(-n // k)  # balanced chunks: k - 1 of this size, the last at most this long
    masks: tuple[Tensor | None, ...]
    if k == 1:
        lps, rps, masks = (logp,), (ref,), (mask,)
    else:
        lps, rps = logp.split(size), ref.split(size)
        masks = mask.split(size) if mask is not None else (None,) * k
    space = torch.empty(5, size, dtype=dtype, device=logp.device)
    work = _workspace(space)
    direct = logp.dtype == ratio_dtype and ref.dtype == ratio_dtype
    consts = _Consts(zero, h, top, dtype, ratio_dtype, direct)
    stats: list[Tensor] = []
    shift_a = shift_b = pad6
    for c in range(k):
        lp, rp, valid = lps[c], rps[c], masks[c]
        rows = work if lp.shape[0] == size else _workspace(space.narrow(1, 0, lp.shape[0]))
        y, x, em1, k3, lr, group_a, group_b, count_rows, x_2d = rows
        good = _chunk_rows(rows, lp, rp, valid, clamp, threshold, consts, stats, (1,))
        # Group A = [k3 - k2, l**2], then -kl_pq takes the place of l**2 and group B =
        # [-kl_pq, r - 1, k3, l]: each is 0 at invalid entries, and loses the shift at valid ones.
        if c == 0:
            count0 = stats[2][2].clamp_min(1.0)
            shift_a = group_a.sum(1, keepdim=True) / count0
        group_a.addcmul_(good, shift_a, value=-1.0)
        stats += torch.var_mean(group_a, 1, correction=0, keepdim=True)
        torch.addcmul(k3, em1, lr, value=-1.0, out=x)  # -kl_pq = k3 - (r - 1) l
        if c == 0:
            shift_b = group_b.sum(1, keepdim=True) / count0
        group_b.addcmul_(good, shift_b, value=-1.0)
        stats += torch.var_mean(group_b, 1, correction=0, keepdim=True)
        stats.append(pad6)
        del good
    stats += [pad17, shift_a, shift_b]  # all [m, 1]
    table = torch.cat(stats).view(k + 1, _STATS).double()  # a row per chunk, then the shift
    both = torch.cat([table, table * table], 1)
    if lps[-1].shape[0] != size:  # the shorter last chunk's sums weigh less
        both[k - 1].addcmul_(both[k - 1], last_cols, value=lps[-1].shape[0] / size - 1.0)
    # float64 rows (no clamp) can overflow float64 (tokens of l in the hundreds); float32 rows
    # hold values below e**30 and need no guard.
    guard = dtype == torch.float64
    cols = both.sum(0)
    sums = _spread(spread, spread_nz, cols) if guard else torch.mv(spread, cols)
    s1, s2, counts, shift = sums.split([NQ, NQ, 3, NQ])
    max_abs = torch.linalg.vector_norm(table[:, :2], math.inf)
    return _fold_shifted(acc, shift, s1, s2, float(size), counts, max_abs, to_diag, guard)


def _spread(spread: Tensor, spread_nz: Tensor, cols: Tensor) -> Tensor:
    """``spread @ cols``, with ``inf`` (not the NaN of ``0 * inf``) where an overflowed column is used.

    Float64 sums overflow only for tokens of ``l`` in the hundreds (``(r - 1)**2`` beyond
    1e308, or the sum of many ``r`` near 1e304): the entries that read such a column are
    ``inf``, the others (the counts among them) stay exact.
    """
    big = ~torch.isfinite(cols)  # inf, or the NaN var_mean gives for a row summing to inf
    out = torch.mv(spread, cols.masked_fill(big, 0.0))
    return out.masked_fill(torch.mv(spread_nz, big.double()) > 0, math.inf)


def _fold_shifted(
    acc: Tensor,
    shift: Tensor,
    s1: Tensor,
    s2: Tensor,
    scale: float,
    counts: Tensor,
    max_abs: Tensor,
    to_diag: Tensor,
    guard: bool = True,
) -> Tensor:
    """Merge a batch's shifted sums ``scale * s1``, ``scale * s2`` (float64) into ``acc``.

    ``counts``: the batch's ``[valid, extreme, finite]`` token counts. The accumulator's own
    sums about the same shift are ``n (mean - shift)`` and ``M2 + n (mean - shift)**2``;
    adding them and taking the moments back is exact, and float64 keeps it precise unless the
    window's mean is ~1e6 spreads away from the shift. ``guard``: report an overflowed S2 as
    ``inf`` (see :func:`_m2`); not needed when nothing can overflow.
    """
    n_a, mean_a, m2_a, diag_a, max_a = acc.split([1, NQ, NQ, 3, 1])
    d_a = mean_a - shift
    t = n_a * d_a
    s1 = torch.add(t, s1, alpha=scale)
    s2 = torch.add(m2_a, s2, alpha=scale).addcmul_(t, d_a)
    diag = torch.addmv(diag_a, to_diag, counts)  # tokens, nonfinite, extreme
    total = diag[:1]  # at token level the count is the token count
    q = s1 / total.clamp_min(1.0)
    m2 = _m2(s2, s1, q) if guard else torch.addcmul(s2, s1, q, value=-1.0).clamp_min_(0.0)
    return torch.cat([total, shift + q, m2, diag, torch.maximum(max_a, max_abs)])


def sequence_fold_torch(
    acc: Tensor, logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, threshold: float
) -> Tensor:
    """``acc`` merged with the moments over the sequences (rows) of ``[B, T]`` inputs, eagerly.

    As :func:`token_fold_torch`, in blocks of whole rows through one workspace: each row's six
    quantities are summed over its valid tokens (float32 sums of the values minus the shift,
    plus the row's count times the shift in float64); a row without a valid token is not a
    sample; the diagnostics count tokens. Then Chan's merge with ``acc``. No host sync.
    """
    rows_total, length = logp.shape
    if logp.numel() == 0:
        return acc
    ratio_dtype = torch.float64 if torch.float64 in (logp.dtype, ref.dtype) else torch.float32
    dtype = torch.float64 if clamp > FLOAT32_CLAMP else ratio_dtype
    zero, *h, _, _, _, _, to_diag, to_q, _ = _consts(logp.device, dtype)
    top = (_H64 if dtype == torch.float64 else _H32)[-1]
    k = -(-rows_total // max(1, _EAGER_CHUNK // length))
    block = -(-rows_total // k)  # rows per block; the last may have fewer
    masks: tuple[Tensor | None, ...]
    if k == 1:
        lps, rps, masks = (logp,), (ref,), (mask,)
    else:
        lps, rps = logp.split(block), ref.split(block)
        masks = mask.split(block) if mask is not None else (None,) * k
    space = torch.empty(5, block, length, dtype=dtype, device=logp.device)
    work = _seq_workspace(space)
    consts = _Consts(zero, h, top, dtype, ratio_dtype, logp.dtype == ratio_dtype and ref.dtype == ratio_dtype)
    stats: list[Tensor] = []
    sums_a: list[Tensor] = []
    sums_b: list[Tensor] = []
    shift_a = shift_b = zero
    for c in range(k):
        lp, rp, valid = lps[c], rps[c], masks[c]
        rows = work if lp.shape[0] == block else _seq_workspace(space.narrow(1, 0, lp.shape[0]))
        _, x, em1, k3, lr, group_a, group_b, _, _ = rows
        good = _chunk_rows(rows, lp, rp, valid, clamp, threshold, consts, stats, -1)
        if c == 0:  # the shift: the quantities' mean over the first block's valid tokens
            count0 = stats[2][2].sum().clamp_min(1.0)
            shift_a = group_a.sum((1, 2), keepdim=True) / count0
        group_a.addcmul_(good, shift_a, value=-1.0)
        sums_a.append(group_a.sum(-1))
        torch.addcmul(k3, em1, lr, value=-1.0, out=x)  # -kl_pq
        if c == 0:
            shift_b = group_b.sum((1, 2), keepdim=True) / count0
        group_b.addcmul_(good, shift_b, value=-1.0)
        sums_b.append(group_b.sum(-1))
        del good
    counts = torch.cat(stats[2::3], 1).view(3, rows_total).double()  # valid, extreme, good per row
    shift = torch.cat([shift_a, shift_b]).view(NQ, 1).double()
    per_row = torch.cat([torch.cat(sums_a, 1), torch.cat(sums_b, 1)]).double()  # [6, B] minus shift
    per_row = to_q @ per_row.addcmul_(shift, counts[2:3])  # each row's sums, QUANTITIES order
    has = (counts[2] > 0).double()
    count = has.sum().view(1)
    mean = (per_row * has).sum(1) / count.clamp_min(1.0)
    dev = (per_row - mean[:, None]) * has
    m2 = (dev * dev).sum(1)
    max_abs = torch.stack([*stats[0::3], *stats[1::3]]).abs().amax().double()
    # Chan's merge with acc (at sequence level the count is of sequences, not tokens)
    n_a, mean_a, m2_a, diag_a, max_a = acc.split([1, NQ, NQ, 3, 1])
    total, new_mean, new_m2 = chan(n_a, mean_a, m2_a, count, mean, m2)
    diag = torch.addmv(diag_a, to_diag, counts.sum(1))
    return torch.cat([total, new_mean, new_m2, diag, torch.maximum(max_a, max_abs)])


def _seq_workspace(q: Tensor) -> tuple[Tensor, ...]:
    """Views of a ``[5, b, T]`` workspace: rows, groups, count rows, x as [1, b T]."""
    return (*q.unbind(0), q[0:2], q[1:5], q[0:3], q[1:2].view(1, -1))


def token_moments_torch(
    logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, threshold: float
) -> Tensor:
    """Moments vector over the valid tokens of flat tensors, in eager torch ops."""
    return token_fold_torch(empty(logp.device), logp, ref, mask, clamp, threshold)


_compiled: Any = None


def token_moments_compiled(
    logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, threshold: float
) -> Tensor:
    """:func:`token_chunk` through ``torch.compile``: one fused pass on GPU.

    Dynamic shapes: compiled once per dtype, device and mask-or-not, not per batch size.
    """
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(token_chunk, dynamic=True)
    if logp.numel() == 0:
        return token_chunk(logp, ref, mask, clamp, threshold)
    # detach() drops the view's link to its base (the caller flattens [B, T] inputs): dynamo
    # would otherwise guard on the base's shape and recompile when B becomes 1.
    flat_mask = mask.detach() if mask is not None else None
    result: Tensor = _compiled(logp.detach(), ref.detach(), flat_mask, clamp, threshold)
    return result


def sequence_moments(
    logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, threshold: float
) -> Tensor:
    """Moments vector over sequences of ``[B, T]`` inputs.

    Each row's quantities are summed over its valid tokens; a row with no valid token is not a
    sample. The diagnostics (tokens, nonfinite, extreme, max) still count tokens.
    """
    lc, w, good, diag = _prepare(logp, ref, mask, clamp, threshold)
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
