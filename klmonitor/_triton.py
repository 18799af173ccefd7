"""The fused GPU kernel: one pass over the inputs, in Triton, for ``KLStats`` at token level.

One program per tile of ``BLOCK`` tokens reads ``logp``, ``ref`` (float32, bf16 or fp16, as they
are) and the mask once, computes the log-ratio, the diagnostics and the six quantities in
registers, and writes one row of partial statistics: the tile's counts, max |l|, and per
quantity a rough mean ``m`` (in float32) with the sums ``S1 = sum(q - m)`` and
``S2 = sum((q - m)**2)`` over its valid tokens. Because each tile's sums are about its own
mean, they stay precise when the mean dwarfs the spread, and ``m + S1 / n`` recovers the mean
to float64 precision. A few torch ops (no host sync) merge the rows in float64 and fold them
into the state. The tile count follows ``n``, but ``n`` is not a specialisation key, so batch
shapes do not recompile the kernel (one compile per input dtypes and mask-or-not).

Everything here imports Triton lazily; without it (or for inputs the kernel does not take:
float64, clamps above 30) ``KLStats`` uses the eager torch path. The kernel also runs in
Triton's interpreter on CPU tensors (``interpret=True``), which is how CI tests it.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import torch
from torch import Tensor

from klmonitor import _moments as mom

__all__ = ["BLOCK", "available", "fold", "supports"]

#: Tokens per program (tile): one row of partial statistics each.
BLOCK = 1024
NUM_WARPS = 4
_ROW = 4 + 3 * mom.NQ  # valid, clamped, good, max, then 6 x (m, S1, S2)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_CLAMP = 30.0  # above, float32 squares of l e**l overflow: the eager path takes float64


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


def supports(logp: Tensor, ref: Tensor, clamp: float, interpret: bool | None = None) -> bool:
    """Whether the kernel takes these inputs.

    A CUDA device (or CPU tensors under Triton's interpreter), float32/bf16/fp16 log-probs, a
    clamp of at most 30, and Triton importable.
    """
    interpret = interpreting() if interpret is None else interpret
    device_ok = logp.device.type == "cuda" or (interpret and logp.device.type == "cpu")
    return (
        device_ok
        and logp.dtype in _DTYPES
        and ref.dtype in _DTYPES
        and clamp <= _MAX_CLAMP
        and logp.numel() > 0
        and available()
    )


if tl is not None:

    def _moments_kernel(  # noqa: PLR0913
        logp_ptr: Any,
        ref_ptr: Any,
        mask_ptr: Any,
        out_ptr: Any,
        n: Any,
        clamp: Any,
        HAS_MASK: tl.constexpr,
        BLOCK: tl.constexpr,
        LIBDEVICE: tl.constexpr,
        ROW: tl.constexpr,
    ) -> None:
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        rp = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        lr = rp - lp
        if HAS_MASK:
            valid = inb & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
        else:
            valid = inb
        good = valid & (tl.abs(lr) < float("inf"))
        lz = tl.where(good, lr, 0.0)
        az = tl.abs(lz)
        l = tl.minimum(tl.maximum(lz, -clamp), clamp)
        x = l * l
        small = x < 0.01  # |l| < 0.1: the Taylor branch
        # T = l**3 H(l), H = 1/6 + l/24 + l**2/120 + l**3/720 + l**4/5040: k3 - k2 there
        h = (((l * (1.0 / 5040.0) + 1.0 / 720.0) * l + 1.0 / 120.0) * l + 1.0 / 24.0) * l + 1.0 / 6.0
        t = h * l * x
        k2 = 0.5 * x
        if LIBDEVICE:
            em1_big = libdevice.expm1(l)
        else:  # expm1 from exp and log (Kahan's trick), as accurate as they are
            u = tl.exp(l)
            lu = tl.log(u)
            em1_big = tl.where(u == 1.0, l, (u - 1.0) * (l / tl.where(lu == 0.0, 1.0, lu)))
        k3 = tl.where(small, k2 + t, em1_big - l)
        em1 = tl.where(small, l + k3, em1_big)
        diff = tl.where(small, -t, k2 - k3)
        klpq = tl.maximum(em1 * l - k3, 0.0)
        w = good.to(tl.float32)
        cnt = tl.sum(w, axis=0)
        inv = 1.0 / tl.maximum(cnt, 1.0)
        row = out_ptr + pid.to(tl.int64) * ROW
        tl.store(row + 0, tl.sum(valid.to(tl.float32), axis=0))
        tl.store(row + 1, tl.sum((az > clamp).to(tl.float32), axis=0))
        tl.store(row + 2, cnt)
        tl.store(row + 3, tl.max(az, axis=0))
        # Per quantity (QUANTITIES order): the tile's rough mean m, then S1 and S2 about it.
        # Invalid tokens have l = 0, where every quantity is 0; w keeps them out of S1, S2.
        m = tl.sum(-l, axis=0) * inv
        d = (-l - m) * w
        tl.store(row + 4, m)
        tl.store(row + 5, tl.sum(d, axis=0))
        tl.store(row + 6, tl.sum(d * d, axis=0))
        m = tl.sum(k2, axis=0) * inv
        d = (k2 - m) * w
        tl.store(row + 7, m)
        tl.store(row + 8, tl.sum(d, axis=0))
        tl.store(row + 9, tl.sum(d * d, axis=0))
        m = tl.sum(k3, axis=0) * inv
        d = (k3 - m) * w
        tl.store(row + 10, m)
        tl.store(row + 11, tl.sum(d, axis=0))
        tl.store(row + 12, tl.sum(d * d, axis=0))
        m = tl.sum(klpq, axis=0) * inv
        d = (klpq - m) * w
        tl.store(row + 13, m)
        tl.store(row + 14, tl.sum(d, axis=0))
        tl.store(row + 15, tl.sum(d * d, axis=0))
        m = tl.sum(em1, axis=0) * inv
        d = (em1 - m) * w
        tl.store(row + 16, m)
        tl.store(row + 17, tl.sum(d, axis=0))
        tl.store(row + 18, tl.sum(d * d, axis=0))
        m = tl.sum(diff, axis=0) * inv
        d = (diff - m) * w
        tl.store(row + 19, m)
        tl.store(row + 20, tl.sum(d, axis=0))
        tl.store(row + 21, tl.sum(d * d, axis=0))


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The jitted kernel: compiled per input dtypes and mask-or-not on first launch, not per n."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_moments_kernel, do_not_specialize=["n"])
    return triton.jit(_moments_kernel, do_not_specialize=["n"])


def partials(logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, interpret: bool = False) -> Tensor:
    """The kernel's ``[tiles, 22]`` float32 rows for flat inputs (see the module docstring)."""
    n = logp.numel()
    tiles = -(-n // BLOCK)
    logp, ref = logp.contiguous(), ref.contiguous()  # the kernel reads with stride 1
    mask = mask.contiguous() if mask is not None else None
    out = torch.empty(tiles, _ROW, dtype=torch.float32, device=logp.device)
    has_mask = mask is not None
    mask_arg = mask.view(torch.uint8) if mask is not None else logp  # any pointer when unused
    _kernel(interpret)[(tiles,)](
        logp,
        ref,
        mask_arg,
        out,
        n,
        float(clamp),
        HAS_MASK=has_mask,
        BLOCK=BLOCK,
        LIBDEVICE=not interpret and logp.device.type == "cuda",
        ROW=_ROW,
        num_warps=NUM_WARPS,
    )
    return out


def fold(
    acc: Tensor, logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, interpret: bool = False
) -> Tensor:
    """``acc`` merged with the moments of the valid tokens of flat inputs, by the fused kernel.

    The kernel's rows merge in float64: each tile's mean is ``m + S1 / n`` and its M2
    ``S2 - S1**2 / n``; then Chan's formula over tiles and with ``acc``. No host sync.
    """
    if logp.numel() == 0:
        return acc
    rows = partials(logp, ref, mask, clamp, interpret).double()
    counts = rows[:, :3].sum(0)  # valid, clamped, good
    n_t = rows[:, 2:3]
    m, s1, s2 = rows[:, 4:].view(-1, mom.NQ, 3).unbind(2)
    q = s1 / n_t.clamp_min(1.0)
    mean_t = m + q
    m2_t = torch.addcmul(s2, s1, q, value=-1.0).clamp_min_(0.0)
    total = counts[2:3]
    mean = (n_t * mean_t).sum(0) / total.clamp_min(1.0)
    dev = mean_t - mean
    m2 = m2_t.sum(0) + (n_t * dev * dev).sum(0)
    # Fold into acc (Chan): the batch is (total, mean, m2).
    n_a, mean_a, m2_a, diag_a, max_a = acc.split([1, mom.NQ, mom.NQ, 3, 1])
    both = n_a + total
    frac = total / both.clamp_min(1.0)
    delta = mean - mean_a
    new_mean = torch.addcmul(mean_a, delta, frac)
    new_m2 = (m2_a + m2).addcmul_(delta * delta, n_a * frac)
    # counts [valid, clamped, good] -> [tokens, nonfinite, clamped]
    diag = diag_a + torch.stack([counts[2], counts[0] - counts[2], counts[1]])
    max_abs = torch.maximum(max_a, rows[:, 3].amax().view(1))
    return torch.cat([both, new_mean, new_m2, diag, max_abs])


def compile_seconds(device: torch.device | str = "cuda") -> float:
    """Wall time of a first call on ``device`` (compiling both mask variants), in seconds."""
    dev = torch.device(device)
    logp = torch.zeros(4096, device=dev)
    ref = torch.full((4096,), 0.01, device=dev)
    mask = torch.ones(4096, dtype=torch.bool, device=dev)
    t0 = time.perf_counter()
    for m in (mask, None):
        fold(mom.empty(dev), logp, ref, m, 20.0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0
