"""The fused GPU kernel: one pass over the inputs, in Triton, for ``KLStats`` at token level.

One program per tile of ``BLOCK`` tokens reads ``logp``, ``ref`` (float32, bf16 or fp16, as they
are) and the mask once, computes the log-ratio ``l = ref - logp``, the diagnostics and the six
quantities in registers, and writes one float64 row of partial statistics: the tile's counts,
max |l|, and per quantity a rough mean ``m`` with ``C = sum(q - m) / n`` and
``S2 = sum((q - m)**2)`` over its valid tokens. Because each tile's sums are about its own
mean, they stay precise when the mean dwarfs the spread, and ``m + C`` recovers the mean to
float64 precision. A few torch ops (no host sync) merge the rows in float64 and fold them
into the state. The tile count follows ``n``, but ``n`` is not a specialisation key, so batch
shapes do not recompile the kernel (one compile per input dtypes and mask-or-not).

Exact values at any ``|l|``: the kernel computes in float32, exact where a tile's clamped
``|l|`` stays at most 30 (``l e**l`` and its square far below float32's range). Any other tile
(rare: a token the policy emits e**30 = 1e13 times more or less readily than the reference) is
redone by a second, float64 kernel launched right after on the same stream (no host sync; only
when the clamp is above 30, e.g. none): each of its programs reads the max |l| of ``GROUP``
tiles and returns unless one needs float64, then recomputes that tile's row from the inputs,
exact to ``|l|`` of about 700 (float64's ``exp`` overflows above 709.78). Keeping the float64
code out of the float32 kernel keeps its registers, and its speed (measured on an H200 at 64M
float32 tokens: 0.77 ms against 0.70 ms for the float32-only kernel before, 1.6x the time of a
plain read of the inputs). Beyond float64 (``r - 1`` of ``l = 700`` is 1e304, whose square is
not a float64) a variance is ``inf`` and a mean may be ``inf``, never NaN.

Diagnostics in the same launches (``fold(..., diag=Diagnostics(...))``, as the C kernel's
``klm_fold_diag``; constexpr switches, so the kernels without them compile to the same
instructions as before): each token's k3, as the moments use it, goes to its row's sum and
count (``top_sequences``), its position bucket's (``by_position``, every row) and its token
id's (``top_tokens``, a float64 table of the vocabulary). A tile spans a few rows and buckets:
a segmented scan sums each run in float64 and the run's last token adds it to the outputs with
a float64 ``atomic_add`` (relaxed, fire-and-forget); the token table takes one atomic per token.
Atomics rather than per-tile partials merged by torch ops: no extra buffers or launches, and
the atomics are few (one per run, not per token) except for the token table, where any
equivalent scatters per token too. The price: float64 sums whose last bit depends on the order
the GPU runs the tiles in. A tile the float64 kernel redoes is left out by the float32 kernel
and added, with its float64 k3, by the float64 kernel.

Everything here imports Triton lazily; without it (or for inputs the kernel does not take:
float64) ``KLStats`` uses the eager torch path. The kernel also runs in Triton's interpreter on
CPU tensors (``interpret=True``), which is how CI tests it.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from klmonitor import _moments as mom
from klmonitor._merge import chan
from klmonitor._native import MAX_BUCKETS, Diagnostics

__all__ = ["BLOCK", "available", "fold", "supports"]

#: Tokens per program (tile): one row of partial statistics each.
BLOCK = 1024
NUM_WARPS = 4
#: Tiles per program of the float64 kernel (which reads their max |l| and returns when none
#: needs float64).
GROUP = 64
_ROW = 4 + 3 * mom.NQ  # valid, extreme, good, max|l|, then 6 x (m, C, S2)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Longest rows whose diagnostics the kernels compute (positions are int32 within a tile's rows);
#: a request with longer rows is not done (the caller computes it).
MAX_ROW_LEN = 2**30
#: Above this clamped |l| the float64 kernel redoes a tile: float32 squares of l e**l
#: overflow above ~44 and float32's exp above 88.7.
WIDE_ABOVE = mom.FLOAT32_CLAMP


try:  # optional: without Triton, KLStats runs the eager torch path
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except Exception:  # ImportError, or a broken install
    triton = tl = libdevice = None


def available() -> bool:
    """Whether Triton can be imported here."""
    return triton is not None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` asks for Triton's interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(logp: Tensor, ref: Tensor, interpret: bool | None = None) -> bool:
    """Whether the kernel takes these inputs (at any clamp, including none).

    A CUDA device (or CPU tensors under Triton's interpreter), float32/bf16/fp16 log-probs, and
    Triton importable.
    """
    interpret = interpreting() if interpret is None else interpret
    device_ok = logp.device.type == "cuda" or (interpret and logp.device.type == "cpu")
    return device_ok and logp.dtype in _DTYPES and ref.dtype in _DTYPES and logp.numel() > 0 and available()


if tl is not None:
    # The jit functions' parameters are annotated tl.tensor, not typing.Any: Triton resolves
    # annotations while compiling and refuses globals that are not constexpr (Triton 3.6).
    _WIDE = tl.constexpr(WIDE_ABOVE)
    _LOG_MAX = tl.constexpr(mom.LOG_MAX)  # above, a token is non-finite (see _moments.LOG_MAX)

    @triton.jit
    def _put_stats(row: tl.tensor, COL: tl.constexpr, q: tl.tensor, good: tl.tensor, inv: tl.tensor) -> None:
        """Store a quantity's ``m, C, S2`` at ``row + COL`` (any float dtype; ``inv = 1 / n``).

        ``m = sum(q / n)`` cannot overflow where every ``q`` is finite; where one is ``inf``
        (beyond float64) ``m`` is ``inf``, the sums are taken about 0 and are infinite of the
        same sign, so the merged mean is that infinity and never NaN. Invalid tokens have
        ``q = 0`` and are left out of ``C`` and ``S2``.
        """
        m = tl.sum(q * inv, axis=0)
        shift = tl.where(tl.abs(m) < float("inf"), m, 0.0)
        d = tl.where(good, q - shift, 0.0)
        tl.store(row + COL, m)
        tl.store(row + COL + 1, tl.sum(d * inv, axis=0))
        tl.store(row + COL + 2, tl.sum(d * d, axis=0))

    @triton.jit
    def _put_quantities(
        row: tl.tensor, l: tl.tensor, good: tl.tensor, cnt: tl.tensor, LIBDEVICE: tl.constexpr
    ) -> tl.tensor:
        """Store the tile statistics of the six quantities (QUANTITIES order) from column 4.

        ``l``: clamped log-ratios, 0 where not ``good``; computed in ``l``'s dtype. ``cnt``:
        the number of ``good`` tokens. Returns each token's k3 (0 where ``l`` is), for the
        diagnostics; unused (and compiled away) without them.
        """
        inv = 1.0 / tl.maximum(cnt.to(l.dtype), 1.0)
        x = l * l
        small = x < 0.01  # |l| < 0.1: the Taylor branch
        # T = l**3 H(l), H = 1/6 + l/24 + l**2/120 + l**3/720 + l**4/5040: k3 - k2 there
        h = (((l * (1.0 / 5040.0) + 1.0 / 720.0) * l + 1.0 / 120.0) * l + 1.0 / 24.0) * l + 1.0 / 6.0
        t = h * l * x
        k2 = 0.5 * x
        if LIBDEVICE:
            em1_big = libdevice.expm1(l)
        else:  # expm1 from exp and log (Kahan's trick near u = 1), as accurate as they are
            u = tl.exp(l)
            lu = tl.log(u)
            # elsewhere u - 1 does not cancel (and log of a subnormal u would be inexact);
            # u = 0 (l below -745) gives -1, u = inf (l above 709.78) inf
            near = (u > 0.5) & (u < 2.0) & (lu != 0.0)
            em1_big = tl.where(near, (u - 1.0) * (l / tl.where(near, lu, 1.0)), u - 1.0)
        k3 = tl.where(small, k2 + t, em1_big - l)
        em1 = tl.where(small, l + k3, em1_big)
        diff = tl.where(small, -t, k2 - k3)
        # kl_pq = r l - (r - 1); inf where r - 1 is (l above 709.78: inf * l - inf is NaN)
        klpq = tl.where(em1 < float("inf"), tl.maximum(em1 * l - k3, 0.0), em1)
        _put_stats(row, 4, -l, good, inv)
        _put_stats(row, 7, k2, good, inv)
        _put_stats(row, 10, k3, good, inv)
        _put_stats(row, 13, klpq, good, inv)
        _put_stats(row, 16, em1, good, inv)
        _put_stats(row, 19, diff, good, inv)
        return k3

    @triton.jit
    def _segment_sum(
        a_s: tl.tensor, a_p: tl.tensor, b_s: tl.tensor, b_p: tl.tensor
    ) -> tuple[tl.tensor, tl.tensor]:
        """The combine of a segmented sum of ``(k3, 2 count + opens)``: restart where ``b`` opens.

        Where ``b`` does not open a segment its low bit is 0, so ``a_p + b_p`` adds the counts
        and keeps ``a``'s bit; count and flag in one int32 keep the scan's registers down.
        """
        opens = (b_p & 1) != 0
        return tl.where(opens, b_s, a_s + b_s), tl.where(opens, b_p, a_p + b_p)

    @triton.jit
    def _opens_bucket(pos: tl.tensor, BUCKETS: tl.constexpr) -> tl.tensor:
        """Whether position ``pos`` opens a bucket other than the first: 2, 4, 8, ... 2**(BUCKETS-1)."""
        return (pos >= 2) & ((pos & (pos - 1)) == 0) & ((pos >> (BUCKETS - 1)) <= 1)

    @triton.jit
    def _put_diagnostics(  # noqa: PLR0913
        k3: tl.tensor,
        good: tl.tensor,
        first: tl.tensor,
        n: tl.tensor,
        ids_ptr: tl.tensor,
        row_sum_ptr: tl.tensor,
        row_count_ptr: tl.tensor,
        bucket_sum_ptr: tl.tensor,
        bucket_count_ptr: tl.tensor,
        token_sum_ptr: tl.tensor,
        token_count_ptr: tl.tensor,
        outside_ptr: tl.tensor,
        row_len: tl.tensor,
        vocab: tl.tensor,
        ROWS: tl.constexpr,
        BUCKETS: tl.constexpr,
        TOKENS: tl.constexpr,
        BLOCK: tl.constexpr,
    ) -> None:
        """Add one tile's k3 (any float dtype; 0 where not ``good``) to the diagnostics' outputs.

        ``first``: the tile's first token (int64). Rows and position buckets: the tile is cut
        into segments (one row's run of tokens in one bucket; a segment also ends at the tile's
        edge), a segmented scan sums each in float64 (counts in int32), and each segment's last
        token adds its sum and count to its row and bucket with a float64 ``atomic_add``
        (segments without a counted token add nothing). Positions are int32 within the tile's
        first row (rows are at most ``MAX_ROW_LEN`` tokens). Token table: each counted token
        with an id in ``[0, vocab)`` adds its k3 and 1 at its id; the others are counted once
        per tile into ``outside``. Atomics are relaxed: only their sum matters, read after the
        kernel.
        """
        k = tl.where(good, k3, 0.0).to(tl.float64)
        lane = tl.arange(0, BLOCK)
        left = tl.minimum(n - first, BLOCK).to(tl.int32)  # the tile's tokens
        if ROWS or BUCKETS > 0:
            t = row_len.to(tl.int32)
            row0 = first // row_len
            q = (first - row0 * row_len).to(tl.int32) + lane  # < row_len + BLOCK
            down = q // t  # rows below the tile's first row
            pos = q - down * t
            opens = (pos == 0) | (lane == 0)
            closes = (pos + 1 == t) | (lane + 1 >= left)
            if BUCKETS > 1:
                opens = opens | _opens_bucket(pos, BUCKETS)
                closes = closes | _opens_bucket(pos + 1, BUCKETS)
            packed = good.to(tl.int32) * 2 + opens.to(tl.int32)
            s, p = tl.associative_scan((k, packed), 0, _segment_sum)
            put = closes & (lane < left) & (p >= 2)
            cf = (p >> 1).to(tl.float64)
            if ROWS:
                tl.atomic_add(row_sum_ptr + row0 + down, s, mask=put, sem="relaxed")
                tl.atomic_add(row_count_ptr + row0 + down, cf, mask=put, sem="relaxed")
            if BUCKETS > 0:
                # floor(log2(pos)) from float64's exponent (exact for any int32), capped
                b = (pos.to(tl.float64).to(tl.int64, bitcast=True) >> 52).to(tl.int32) - 1023
                b = tl.minimum(tl.maximum(b, 0), BUCKETS - 1)
                tl.atomic_add(bucket_sum_ptr + b, s, mask=put, sem="relaxed")
                tl.atomic_add(bucket_count_ptr + b, cf, mask=put, sem="relaxed")
        if TOKENS:
            ids = tl.load(ids_ptr + first + lane, mask=lane < left, other=-1)
            inside = (ids >= 0) & (ids < vocab)
            use = good & inside
            slot = tl.where(use, ids, 0)
            tl.atomic_add(token_sum_ptr + slot, k, mask=use, sem="relaxed")
            tl.atomic_add(token_count_ptr + slot, tl.full([BLOCK], 1.0, tl.float64), mask=use, sem="relaxed")
            apart = tl.sum((good & ~inside).to(tl.int32), axis=0)
            tl.atomic_add(outside_ptr, apart.to(tl.float64), mask=apart > 0, sem="relaxed")

    def _moments_kernel(  # noqa: PLR0913
        logp_ptr: tl.tensor,
        ref_ptr: tl.tensor,
        mask_ptr: tl.tensor,
        out_ptr: tl.tensor,
        n: tl.tensor,
        clamp: tl.float32,
        threshold_lo: tl.float32,
        near_lo: tl.float32,
        near_hi: tl.float32,
        ids_ptr: tl.tensor,
        row_sum_ptr: tl.tensor,
        row_count_ptr: tl.tensor,
        bucket_sum_ptr: tl.tensor,
        bucket_count_ptr: tl.tensor,
        token_sum_ptr: tl.tensor,
        token_count_ptr: tl.tensor,
        outside_ptr: tl.tensor,
        row_len: tl.tensor,
        vocab: tl.tensor,
        redo_above: tl.float32,
        HAS_MASK: tl.constexpr,
        BLOCK: tl.constexpr,
        LIBDEVICE: tl.constexpr,
        ROW: tl.constexpr,
        DIAG: tl.constexpr,
        ROWS: tl.constexpr,
        BUCKETS: tl.constexpr,
        TOKENS: tl.constexpr,
    ) -> None:
        """One tile in float32: counts, max |l| and the six quantities' statistics, one row.

        ``threshold_lo``: the float32 number next to the threshold from below (or equal), for
        an exact float32 compare ``|l| > threshold`` (``|l| > lo``). ``[near_lo, near_hi]``:
        where the float32 rounding of ``l`` could cross the threshold (without a clamp, or
        above 30, ``l`` is defined in float64; else ``inf``): a tile with a float32 ``|l|``
        there stores a max |l| of ``inf``, so :func:`_wide_kernel` redoes it in float64, as
        any tile whose clamped max |l| is above 30 (its float32 numbers here may overflow).

        With ``DIAG`` (see :func:`_put_diagnostics`: ``ROWS``, ``BUCKETS``, ``TOKENS``) the
        tile's k3 also goes to the diagnostics, unless its max |l| is above ``redo_above``
        (30 where :func:`_wide_kernel` runs, else ``inf``): that kernel redoes such a tile and
        adds its float64 k3 instead. Without ``DIAG`` the kernel compiles to the same code.
        """
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        lr = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        lr -= tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = inb & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
        else:
            valid = inb
        row = out_ptr + pid.to(tl.int64) * ROW
        good = valid & (tl.abs(lr) < float("inf"))
        lz = tl.where(good, lr, 0.0)
        az = tl.abs(lz)
        cnt = tl.sum(good.to(tl.float32), axis=0)
        tl.store(row + 0, tl.sum(valid.to(tl.float32), axis=0))
        tl.store(row + 1, tl.sum((az > threshold_lo).to(tl.float32), axis=0))
        tl.store(row + 2, cnt)
        top = tl.max(tl.where((az >= near_lo) & (az <= near_hi), float("inf"), az), axis=0)
        tl.store(row + 3, top)
        k3 = _put_quantities(row, tl.minimum(tl.maximum(lz, -clamp), clamp), good, cnt, LIBDEVICE)
        if DIAG:
            if top <= redo_above:  # else the float64 kernel adds this tile (top is never NaN)
                _put_diagnostics(
                    k3, good, pid.to(tl.int64) * BLOCK, n, ids_ptr, row_sum_ptr, row_count_ptr, bucket_sum_ptr,
                    bucket_count_ptr, token_sum_ptr, token_count_ptr, outside_ptr, row_len, vocab,
                    ROWS, BUCKETS, TOKENS, BLOCK,
                )  # fmt: skip

    def _wide_kernel(  # noqa: PLR0913
        logp_ptr: tl.tensor,
        ref_ptr: tl.tensor,
        mask_ptr: tl.tensor,
        out_ptr: tl.tensor,
        n: tl.tensor,
        tiles: tl.tensor,
        clamp: tl.float64,
        threshold: tl.float64,
        ids_ptr: tl.tensor,
        row_sum_ptr: tl.tensor,
        row_count_ptr: tl.tensor,
        bucket_sum_ptr: tl.tensor,
        bucket_count_ptr: tl.tensor,
        token_sum_ptr: tl.tensor,
        token_count_ptr: tl.tensor,
        outside_ptr: tl.tensor,
        row_len: tl.tensor,
        vocab: tl.tensor,
        HAS_MASK: tl.constexpr,
        BLOCK: tl.constexpr,
        GROUP: tl.constexpr,
        LIBDEVICE: tl.constexpr,
        ROW: tl.constexpr,
        DIAG: tl.constexpr,
        ROWS: tl.constexpr,
        BUCKETS: tl.constexpr,
        TOKENS: tl.constexpr,
    ) -> None:
        """Redo in float64 the rows of the tiles whose clamped max |l| is above 30.

        Per tile (``GROUP`` per program): the log-ratios, counts, max |l| and the six
        quantities' statistics in float64. A separate kernel, launched after :func:`_moments_kernel` on the same stream (no host
        sync), so that the common float32 kernel keeps its registers and its speed; most
        programs read ``GROUP`` numbers and return. With ``DIAG``, a redone tile's float64 k3
        goes to the diagnostics (:func:`_moments_kernel` left the tile out of them).
        """
        pid = tl.program_id(0)
        tile = pid * GROUP + tl.arange(0, GROUP)
        top = tl.load(out_ptr + tile.to(tl.int64) * ROW + 3, mask=tile < tiles, other=0.0)
        clamp64 = tl.full([], clamp, tl.float64)
        if tl.max(tl.minimum(top, clamp64), axis=0) > _WIDE:
            for j in range(GROUP):
                t = pid * GROUP + j
                row = out_ptr + t.to(tl.int64) * ROW
                if tl.minimum(tl.load(row + 3, mask=t < tiles, other=0.0), clamp64) > _WIDE:
                    offs = t.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
                    inb = offs < n
                    l64 = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float64)
                    l64 -= tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float64)
                    if HAS_MASK:
                        valid = inb & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
                    else:
                        valid = inb
                    # above l = 700 (e**l at float64's limit), without a clamp below it: non-finite
                    up = tl.where(clamp64 > _LOG_MAX, _LOG_MAX, float("inf"))
                    good = valid & (tl.abs(l64) < float("inf")) & (l64 <= up)
                    az = tl.where(good, tl.abs(l64), 0.0)
                    cnt = tl.sum(good.to(tl.float32), axis=0)
                    tl.store(row + 0, tl.sum(valid.to(tl.float32), axis=0))
                    tl.store(
                        row + 1, tl.sum((az > tl.full([], threshold, tl.float64)).to(tl.float32), axis=0)
                    )
                    tl.store(row + 2, cnt)
                    tl.store(row + 3, tl.max(az, axis=0))
                    lc = tl.minimum(tl.maximum(tl.where(good, l64, 0.0), -clamp64), clamp64)
                    k3 = _put_quantities(row, lc, good, cnt, LIBDEVICE)
                    if DIAG:
                        _put_diagnostics(
                            k3, good, t.to(tl.int64) * BLOCK, n, ids_ptr, row_sum_ptr, row_count_ptr, bucket_sum_ptr,
                            bucket_count_ptr, token_sum_ptr, token_count_ptr, outside_ptr, row_len,
                            vocab, ROWS, BUCKETS, TOKENS, BLOCK,
                        )  # fmt: skip


# Integer arguments that vary per batch, and the diagnostics' pointers (views at any offset,
# e.g. the counts half of a window's vector): never specialisation keys, so neither batch
# shapes nor where a table sits recompile the kernels.
_DIAG_POINTERS = (
    "ids_ptr",
    "row_sum_ptr",
    "row_count_ptr",
    "bucket_sum_ptr",
    "bucket_count_ptr",
    "token_sum_ptr",
    "token_count_ptr",
    "outside_ptr",
)


def _jit(fn: Any, interpret: bool, ints: list[str]) -> Any:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn, do_not_specialize=ints)
    return triton.jit(fn, do_not_specialize=ints, do_not_specialize_on_alignment=list(_DIAG_POINTERS))


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The float32 kernel: compiled per input dtypes, mask-or-not and diagnostics on first launch.

    Not per n or batch shape.
    """
    return _jit(_moments_kernel, interpret, ["n", "row_len", "vocab"])


@functools.cache
def _kernel_wide(interpret: bool) -> Any:
    """The float64 kernel (likewise; launched only when the clamp is above 30)."""
    return _jit(_wide_kernel, interpret, ["n", "tiles", "row_len", "vocab"])


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        kind = "" if t.is_contiguous() else "non-contiguous "
        return f"a {kind}{t.dtype} tensor of {t.numel()} elements on {t.device}"
    return type(t).__name__


def _diagnostic_args(diag: Diagnostics, n: int, device: torch.device, dummy: Tensor) -> tuple[list[Any], dict[str, Any]]:  # fmt: skip
    """The kernels' diagnostics arguments for ``diag`` (pointers, ints; constexprs), checked.

    Raises ValueError where an output is not a contiguous float64 tensor of its size on the
    inputs' device (``ids``: int64), or the parts do not fit together.
    """

    def buf(t: Tensor | None, name: str, size: int, dtype: torch.dtype = torch.float64) -> Tensor:
        if t is None:
            return dummy
        if not (isinstance(t, Tensor) and t.device == device and t.is_contiguous() and t.dtype == dtype):
            raise ValueError(
                f"Diagnostics.{name} must be a contiguous {dtype} tensor on {device} (the inputs' "
                f"device), got {_describe(t)}"
            )
        if t.numel() != size:
            raise ValueError(f"Diagnostics.{name} has {t.numel()} elements, not {size}")
        return t

    if diag.n != n:
        raise ValueError(f"Diagnostics for {diag.n} tokens, but the batch has {n}")
    if getattr(diag, "entropy", None) is not None:
        raise ValueError(
            "Diagnostics.entropy is computed by the C kernel only; leave it None for the Triton "
            "kernel (the caller then updates the entropy itself)"
        )
    row_len = diag.row_len
    if row_len < 0 or (row_len and n % row_len):
        raise ValueError(f"Diagnostics: {n} tokens do not split into rows of {row_len}")
    rows = n // row_len if row_len else 0
    has_rows = diag.row_sum is not None
    if has_rows != (diag.row_count is not None) or (has_rows and not row_len):
        raise ValueError("Diagnostics: row_sum and row_count go together, with row_len > 0")
    buckets = 0 if diag.bucket_sum is None else diag.bucket_sum.numel()
    if (diag.bucket_sum is None) != (diag.bucket_count is None) or (
        buckets and not (row_len and buckets <= MAX_BUCKETS)
    ):
        raise ValueError(
            f"Diagnostics: bucket_sum and bucket_count go together, with row_len > 0 and at most "
            f"{MAX_BUCKETS} buckets"
        )
    parts = (diag.ids, diag.token_sum, diag.token_count, diag.outside)
    has_tokens = diag.ids is not None
    vocab = 0 if diag.token_sum is None else diag.token_sum.numel()
    if any((p is None) == has_tokens for p in parts) or (has_tokens and vocab == 0):
        raise ValueError("Diagnostics: ids, token_sum (vocab > 0), token_count and outside go together")
    pointers = [
        buf(diag.ids, "ids", n, torch.int64),
        buf(diag.row_sum, "row_sum", rows),
        buf(diag.row_count, "row_count", rows),
        buf(diag.bucket_sum, "bucket_sum", buckets),
        buf(diag.bucket_count, "bucket_count", buckets),
        buf(diag.token_sum, "token_sum", vocab),
        buf(diag.token_count, "token_count", vocab),
        buf(diag.outside, "outside", 1),
        max(row_len, 1),
        vocab,
    ]
    flags = {"ROWS": has_rows, "BUCKETS": buckets, "TOKENS": has_tokens}
    return pointers, {"DIAG": has_rows or buckets > 0 or has_tokens, **flags}


@functools.cache
def _float32_around(threshold: float) -> tuple[float, float]:
    """The float32 numbers ``lo <= threshold <= hi`` next to ``threshold`` (equal if it is one).

    For a float32 ``a``, ``a > threshold`` exactly when ``a > lo``.
    """
    with np.errstate(over="ignore"):  # above float32's range: inf
        t = np.float32(threshold)
    if float(t) > threshold:
        return float(np.nextafter(t, np.float32(-np.inf))), float(t)
    if float(t) < threshold:
        return float(t), float(np.nextafter(t, np.float32(np.inf)))
    return float(t), float(t)


def partials(
    logp: Tensor,
    ref: Tensor,
    mask: Tensor | None,
    clamp: float,
    threshold: float,
    interpret: bool = False,
    diag: Diagnostics | None = None,
) -> Tensor:
    """The kernel's ``[tiles, 22]`` float64 rows for flat inputs (see the module docstring).

    ``clamp``: log-ratios are clamped to ``[-clamp, clamp]`` (``math.inf``: no clamp);
    ``threshold``: row column 1 counts valid, finite tokens with ``|l| > threshold``;
    ``diag``: diagnostics added to in the same launches (see :func:`fold`).
    """
    n = logp.numel()
    tiles = -(-n // BLOCK)
    logp, ref = logp.contiguous(), ref.contiguous()  # the kernel reads with stride 1
    mask = mask.contiguous() if mask is not None else None
    out = torch.empty(tiles, _ROW, dtype=torch.float64, device=logp.device)
    if diag is None:  # any pointers: the kernels compile without the code that would read them
        diag_args: list[Any] = [out] * 8 + [1, 0]
        flags: dict[str, Any] = {"DIAG": False, "ROWS": False, "BUCKETS": 0, "TOKENS": False}
    else:
        diag_args, flags = _diagnostic_args(diag, n, logp.device, out)
    has_mask = mask is not None
    mask_arg = mask.view(torch.uint8) if mask is not None else logp  # any pointer when unused
    lo, hi = _float32_around(float(threshold))
    wide = clamp > WIDE_ABOVE
    near_lo, near_hi = (lo, hi) if wide else (math.inf, math.inf)
    libdevice_ok = not interpret and logp.device.type == "cuda"
    _kernel(interpret)[(tiles,)](
        logp,
        ref,
        mask_arg,
        out,
        n,
        float(clamp),
        lo,
        near_lo,
        near_hi,
        *diag_args,
        WIDE_ABOVE if wide else math.inf,  # the tiles the float64 kernel adds to the diagnostics
        HAS_MASK=has_mask,
        BLOCK=BLOCK,
        LIBDEVICE=libdevice_ok,
        ROW=_ROW,
        **flags,
        num_warps=NUM_WARPS,
    )
    if wide:  # at a clamp of at most 30 no tile needs float64
        _kernel_wide(interpret)[(-(-tiles // GROUP),)](
            logp,
            ref,
            mask_arg,
            out,
            n,
            tiles,
            float(clamp),
            float(threshold),
            *diag_args,
            HAS_MASK=has_mask,
            BLOCK=BLOCK,
            GROUP=GROUP,
            LIBDEVICE=libdevice_ok,
            ROW=_ROW,
            **flags,
            num_warps=NUM_WARPS,
        )
    return out


def fold(
    acc: Tensor,
    logp: Tensor,
    ref: Tensor,
    mask: Tensor | None,
    clamp: float,
    threshold: float,
    interpret: bool = False,
    diag: Diagnostics | None = None,
) -> Tensor:
    """``acc`` merged with the moments of the valid tokens of flat inputs, by the fused kernel.

    ``clamp`` may be ``math.inf`` (no clamp, exact values); ``acc[EXTREME]`` gains the valid,
    finite tokens with ``|l| > threshold``. The kernel's rows merge in float64: each tile's
    mean is ``m + C`` and its M2 ``S2 - n C**2``; then Chan's formula over tiles and with
    ``acc``, written so that quantities beyond float64 (``r - 1`` of ``l = 700`` is 1e304)
    give an ``inf`` M2 (and an ``inf`` mean only where a value is ``inf``), never NaN. No host
    sync.

    ``diag`` (a :class:`klmonitor._native.Diagnostics` of ``n = logp.numel()`` tokens whose
    outputs are on the inputs' device): the same launches add each token's k3 (as the moments
    use it: clamped, 0 where masked or non-finite, float64 for tiles the float64 kernel redoes)
    to its row, position bucket and token id, and set ``diag.done`` (not for rows longer than
    :data:`MAX_ROW_LEN`: then nothing is added). Sums are float64 and added
    with atomics: their last bit depends on the order the GPU runs the tiles in.
    """
    if logp.numel() == 0:
        if diag is not None:
            _diagnostic_args(diag, 0, logp.device, acc)  # nothing to add: checked, and done
            diag.done = True
        return acc
    if diag is not None and diag.row_len > MAX_ROW_LEN:
        diag = None  # the kernels' positions are int32: such rows are left to the caller (not done)
    rows = partials(logp, ref, mask, clamp, threshold, interpret, diag)
    if diag is not None:
        diag.done = True
    counts = rows[:, :3].sum(0)  # valid, extreme, good
    n_t = rows[:, 2:3]
    m, c, s2 = rows[:, 4:].view(-1, mom.NQ, 3).unbind(2)
    mean_t = m + c  # inf + inf where a value is inf (C has that sign then), never inf - inf
    # M2 = S2 - n C**2 (>= 0); inf where S2 overflowed (n C**2 may have too: not inf - inf)
    m2_t = torch.where(s2 == math.inf, s2, torch.addcmul(s2, c * n_t, c, value=-1.0).clamp_min_(0.0))
    total = counts[2:3]
    # The batch's mean, weights n_t / total <= 1: n_t * mean_t could overflow
    mean = ((n_t / total.clamp_min(1.0)) * mean_t).sum(0)
    dev = mean_t - mean  # finite where mean is (empty tiles: mean_t = 0, n_t dev**2 = 0)
    m2 = m2_t.sum(0) + (n_t * dev * dev).sum(0)
    # Fold into acc: the batch is (total, mean, m2); Chan's merge, shared with every other path.
    n_a, mean_a, m2_a, tallies_a, max_a = acc.split([1, mom.NQ, mom.NQ, 3, 1])
    new_n, new_mean, new_m2 = chan(n_a, mean_a, m2_a, total, mean, m2)
    # counts [valid, extreme, good] -> [tokens, nonfinite, extreme]
    tallies = tallies_a + torch.stack([counts[2], counts[0] - counts[2], counts[1]])
    max_abs = torch.maximum(max_a, rows[:, 3].amax().view(1))
    return torch.cat([new_n, new_mean, new_m2, tallies, max_abs])


def compile_seconds(device: torch.device | str = "cuda") -> float:
    """Wall time of a first call on ``device`` (compiling both mask variants), in seconds."""
    dev = torch.device(device)
    logp = torch.zeros(4096, device=dev)
    ref = torch.full((4096,), 0.01, device=dev)
    mask = torch.ones(4096, dtype=torch.bool, device=dev)
    t0 = time.perf_counter()
    for m in (mask, None):
        fold(mom.empty(dev), logp, ref, m, math.inf, 20.0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0
