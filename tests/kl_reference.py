"""An independent float64 reference for the moments vector of a token-level window.

Written from the definitions (ESTIMATORS.md) with numpy in float64, not from klmonitor's code:
the six quantities of each finite, valid log-ratio, clamped only when a clamp is given (Taylor
series near 0, where expm1(l) - l would cancel even in float64), then their count, mean and M2,
and the token diagnostics, in the layout of ``klmonitor._moments``. The log-ratio is klmonitor's:
the float32 difference of the inputs (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import numpy as np
import torch

# sum_{n>=2} l**n / n! and sum_{n>=2} (n - 1) l**n / n!, to l**12: exact in float64 for |l| < 0.05
_K3 = [1 / math.factorial(n) for n in range(2, 13)]
_KLPQ = [(n - 1) / math.factorial(n) for n in range(2, 13)]


def _series(l: np.ndarray, coeffs: list[float]) -> np.ndarray:
    acc = np.zeros_like(l)
    for c in reversed(coeffs):
        acc = acc * l + c
    return acc * l * l


def quantities(l: np.ndarray) -> np.ndarray:
    """``[n, 6]``: k1, k2, k3, kl_pq, r - 1, k2 - k3 of float64 log-ratios."""
    small = np.abs(l) < 0.05
    em1 = np.expm1(l)
    k3 = np.where(small, _series(l, _K3), em1 - l)
    klpq = np.where(small, _series(l, _KLPQ), (em1 + 1) * l - em1)
    k2 = 0.5 * l * l
    diff = np.where(small, -_series(l, _K3[1:]) * l, k2 - k3)  # k2 - k3 = -(l**3/6 + ...)
    return np.stack([-l, k2, k3, klpq, em1, diff], 1)


def log_ratio(logp: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """``ref - logp`` as klmonitor defines it: in float32 at least, then as float64."""
    dtype = torch.float64 if torch.float64 in (logp.dtype, ref.dtype) else torch.float32
    return (ref.to(dtype) - logp.to(dtype)).double().reshape(-1).numpy()


def _limits(clamp: float | None, extreme: float) -> tuple[float, float]:
    """(clamp as a number, the extreme-count threshold)."""
    c = math.inf if clamp is None else clamp
    return c, min(extreme, c)


def moments(
    logp: torch.Tensor,
    ref: torch.Tensor,
    mask: torch.Tensor | None,
    clamp: float | None = None,
    extreme: float = 20.0,
) -> np.ndarray:
    """The 17-float moments vector (count, 6 means, 6 M2, tokens, nonfinite, extreme, max|l|)."""
    c, thr = _limits(clamp, extreme)
    lr = log_ratio(logp, ref)
    valid = np.ones(lr.shape, bool) if mask is None else mask.reshape(-1).numpy() != 0
    finite = np.isfinite(lr)
    good = valid & finite
    lz = lr[good]
    q = quantities(np.clip(lz, -c, c))
    n = len(lz)
    mean = q.mean(0) if n else np.zeros(6)
    m2 = ((q - mean) ** 2).sum(0) if n else np.zeros(6)
    diag = [
        n,
        int((valid & ~finite).sum()),
        int((np.abs(lz) > thr).sum()),
        float(np.abs(lz).max()) if n else 0.0,
    ]
    return np.concatenate([[n], mean, m2, diag])


def assert_moments_close(
    got: np.ndarray, want: np.ndarray, rtol: float = 2e-6, var_rtol: float = 2e-5
) -> None:
    """Counts exact; means within ``rtol`` of the quantity's RMS; M2 within ``var_rtol``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    n = want[0]  # samples: tokens, or sequences
    assert got[0] == n, f"count {got[0]} != {n}"
    assert list(got[13:16]) == list(want[13:16]), f"tokens/nonfinite/extreme {got[13:16]} != {want[13:16]}"
    assert got[16] == want[16] or abs(got[16] - want[16]) <= 1e-6 * abs(want[16]), (
        f"max {got[16]} != {want[16]}"
    )
    if n == 0:
        return
    for j in range(6):
        rtol = max(rtol, 3e-5) if j == 5 else rtol
        mean, m2 = want[1 + j], want[7 + j]
        rms = math.sqrt(mean * mean + m2 / n)
        assert abs(got[1 + j] - mean) <= rtol * rms + 1e-30, f"mean[{j}] {got[1 + j]!r} vs {mean!r}"
        # M2 = n var: a per-sample error d moves it by ~2 n std d (see test_stats.assert_stats_close)
        tol = var_rtol * m2 + 2 * n * math.sqrt(m2 / n) * rtol * rms + n * (rtol * rms) ** 2
        assert abs(got[7 + j] - m2) <= tol + 1e-30, f"M2[{j}] {got[7 + j]!r} vs {m2!r}"


def sequence_moments(
    logp: torch.Tensor,
    ref: torch.Tensor,
    mask: torch.Tensor | None,
    clamp: float | None = None,
    extreme: float = 20.0,
) -> np.ndarray:
    """The moments vector over the rows of ``[B, T]`` inputs: each row's quantities summed over
    its valid, finite tokens; rows without one are not samples; diagnostics count tokens."""
    c, thr = _limits(clamp, extreme)
    rows, length = logp.shape
    lr = log_ratio(logp, ref).reshape(rows, length)
    valid = np.ones(lr.shape, bool) if mask is None else mask.numpy() != 0
    good = valid & np.isfinite(lr)
    sums, tokens = [], 0
    for i in range(rows):
        lz = lr[i][good[i]]
        tokens += len(lz)
        if len(lz):
            sums.append(quantities(np.clip(lz, -c, c)).sum(0))
    q = np.array(sums).reshape(-1, 6)
    n = len(q)
    mean = q.mean(0) if n else np.zeros(6)
    m2 = ((q - mean) ** 2).sum(0) if n else np.zeros(6)
    lz = lr[good]
    nonfinite = int((valid & ~np.isfinite(lr)).sum())
    diag = [tokens, nonfinite, int((np.abs(lz) > thr).sum()), float(np.abs(lz).max()) if len(lz) else 0.0]
    return np.concatenate([[n], mean, m2, diag])
