"""The fused CPU kernel (``klmonitor/_native``): both of its bodies against the torch path and
50-digit values, its run-time CPU dispatch, the build without a compiler, and every way loading
it can go wrong. Each fault must end with training running on the torch path's numbers, after
one message; none may crash, hang or run foreign code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mpmath
import numpy as np
import pytest
import torch
from test_stats import (
    _WHOLE_RANGE,
    BACKEND_RTOL,
    QUANTITIES,
    _exact_per_token,
    assert_stats_close,
    assert_summaries_match,
    random_batch,
    summary,
    torch_threads,
)

from klmonitor import EstimatorStats, KLStats, KLSummary, _native
from klmonitor import _layout as layout
from klmonitor import _moments as mom

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
NATIVE_DIR = Path(_native.__file__).resolve().parent
LIB = _native.library_path()

needs_native = pytest.mark.skipif(
    not _native.available(),
    reason=f"native kernel unavailable ({_native.unavailable_reason()}); build it with "
    "`pip install -e .` or `python setup.py build_ext --inplace`",
)
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOT_USED = "the fused CPU kernel is not used"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


needs_cc = pytest.mark.skipif(_compiler() is None, reason="no C compiler to build test libraries")


# --------------------------------------------------------------------------------------------
# 1. both bodies agree with the torch path
# --------------------------------------------------------------------------------------------
SIZES = [1, 2, 7, 255, 256, 257, 4097, 65_536, 65_537, 200_003]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", ["plain", "masked_bad"])
def test_backends_agree(dtype: torch.dtype, size: int, variant: str, body: str) -> None:
    masked = variant == "masked_bad"
    logp, ref, mask = random_batch(
        size, seed=size, dtype=dtype, mask_density=0.6 if masked else None, bad=masked
    )
    plain = summary(logp, ref, mask, backend="torch")
    with torch_threads(2):  # from 2 * 65536 tokens the native kernel splits over threads
        native = summary(logp, ref, mask, backend="auto")
    assert_summaries_match(native, plain, rtol=BACKEND_RTOL)
    if masked and size > 1000:
        assert native.nonfinite > 0 and native.extreme > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clamp", [0.25, 5.0, 30.0, 31.0, 80.0])
def test_backends_agree_at_any_clamp(dtype: torch.dtype, clamp: float, body: str) -> None:
    # Up to a clamp of 30 every token takes the float body; above, tokens with |l| > 30 are
    # computed in double in the rescan. The AVX2 body reads bf16/fp16 as they are at every
    # clamp. 0.25 clamps most tokens.
    logp, ref, mask = random_batch(20_003, seed=11, dtype=dtype, scale=3.0, mask_density=0.7, bad=True)
    plain = summary(logp, ref, mask, backend="torch", clamp=clamp)
    native = summary(logp, ref, mask, backend="native", clamp=clamp)
    assert native.extreme == plain.extreme
    assert plain.extreme > 0 or clamp > plain.max_abs_log_ratio  # |l| reach ~55 here
    assert native.nonfinite == plain.nonfinite > 0
    assert_summaries_match(native, plain, rtol=BACKEND_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backends_agree_on_log_ratio_concentrated_near_taylor_boundary(dtype: torch.dtype, body: str) -> None:
    # |l| in [0.05, 0.3], where the series and the exp-based branch meet.
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(50_000, generator=g) * 5
    sign = torch.where(torch.rand(50_000, generator=g) < 0.5, -1.0, 1.0)
    ref = logp + sign * (0.05 + 0.25 * torch.rand(50_000, generator=g))
    a = summary(logp.to(dtype), ref.to(dtype), backend="auto")
    b = summary(logp.to(dtype), ref.to(dtype), backend="torch")
    assert_summaries_match(a, b, rtol=BACKEND_RTOL)


@needs_native
def test_native_backend_is_used_for_float32_cpu_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = _native.fold

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(_native, "fold", spy)
    logp, ref, _ = random_batch(100, seed=0)
    summary(logp, ref, backend="auto")
    summary(logp.bfloat16(), ref.bfloat16(), backend="native")
    # bf16 goes to the kernel as it is where the kernel reads it (AVX2), else as float32.
    direct = _native.reads_dtype(torch.bfloat16)
    assert calls == [torch.float32, torch.bfloat16 if direct else torch.float32]
    summary(logp, ref, backend="torch")
    summary(logp.double(), ref.double(), backend="auto")  # float64 stays on the torch path
    summary(logp.reshape(10, 10), ref.reshape(10, 10), backend="auto", level="sequence")
    assert len(calls) == 2


def test_native_fold_merges_like_the_torch_path(body: str) -> None:
    # The kernel merges each batch into the state itself (Chan's update in C): its layout must
    # be _moments' and its merges must equal the torch path's over many uneven batches.
    lib = _native.load()
    assert lib is not None and lib.klm_vector_size() == mom.SIZE
    native, plain = KLStats(backend="native"), KLStats(backend="torch")
    for i, n in enumerate([1, 9, 0, 4097, 3, 70_001, 512, 2]):
        logp, ref, mask = random_batch(n, seed=i, mask_density=0.7, bad=i % 2 == 1, scale=0.1 + i)
        native.update(logp, ref, mask)
        plain.update(logp, ref, mask)
    assert_summaries_match(native.compute(), plain.compute(), rtol=BACKEND_RTOL)


def test_vector_path_values_over_whole_range(body: str) -> None:
    # One-token windows run the kernel's scalar tail; whole vectors of 8 (and 16) tokens run its
    # vector body, which has a fast path for vectors whose |l| are all below 0.34 and a general
    # one (range-reduced exp) otherwise. Each vector here holds copies of one value, so its
    # window mean is that value's per-token result, checked against 50 digits.
    for reps in (8, 16):
        worst = {k: 0.0 for k in QUANTITIES}
        for l in _WHOLE_RANGE.astype(np.float32):
            s = summary(torch.zeros(reps), torch.full((reps,), float(l)), backend="native")
            for name, exact in _exact_per_token(float(l)).items():
                worst[name] = max(worst[name], abs(getattr(s, name).mean - exact) / abs(exact))
        for name in ("k1", "k2", "k3", "kl_pq", "r_minus_1"):
            assert worst[name] <= 1e-5, (reps, name, worst[name])
        assert worst["k2_minus_k3"] <= 1e-3, (reps, worst["k2_minus_k3"])


@pytest.mark.parametrize("far", [0.3, 0.35, 2.0, -17.0])
def test_vector_path_mixes_near_and_far_tokens(far: float, body: str) -> None:
    # Seven tokens near zero and one at `far` in one vector: the vector takes the general path
    # (or, at 0.3, the fast one) and each lane must still get its own value: the window's mean
    # of each quantity equals the exact mean of the eight per-token values.
    near = [1e-6, -3e-4, 0.01, -0.05, 0.1, -0.2, 0.33]
    values = np.array([*near, far], dtype=np.float32)
    for perm in (values, values[::-1].copy()):
        s = summary(torch.zeros(8), torch.from_numpy(perm), backend="native")
        exact = [_exact_per_token(float(x)) for x in perm]
        for name in QUANTITIES:
            want = sum(e[name] for e in exact) / 8
            got = getattr(s, name).mean
            # At l = -17, kl_pq = (r - 1) l - k3 cancels 17 - 16 in float32 (an ulp of 16 is
            # 1.9e-6 of the result): the AVX2 body's FMA keeps the product exact, the portable
            # body, built for CPUs without FMA, rounds it as the torch path does.
            rel = 1e-5 if name == "k2_minus_k3" else (2e-6 if body == "portable" else 1e-6)
            tol = rel * sum(abs(e[name]) for e in exact) / 8
            assert abs(got - want) <= tol, (far, name, got, want)


@pytest.mark.parametrize("swap", [False, True])
def test_backends_agree_on_mixed_precision_inputs(swap: bool, body: str) -> None:
    # A float64 side must not be rounded to float32: log_ratio promotes, so both paths must.
    g = torch.Generator().manual_seed(0)
    logp = (-50 + torch.randn(1000, generator=g)).float()
    ref = logp.double() + 1e-6 * torch.randn(1000, generator=g, dtype=torch.float64)
    if swap:
        logp, ref = ref, logp
    a = summary(logp, ref, backend="auto")
    b = summary(logp, ref, backend="torch")
    assert_summaries_match(a, b, rtol=BACKEND_RTOL)


# --------------------------------------------------------------------------------------------
# 1b. exact values at any |log-ratio| (no clamp): tokens with |l| > 30 computed in double
# --------------------------------------------------------------------------------------------
# These call the kernel directly (KLStats' own arguments are the lead's), with the layout of
# klmonitor/_layout.py, and compare with 50-digit values of the inputs as the dtype stores them.
INF = math.inf
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_MAGNITUDES = (1e-6, 0.05, 0.3, 1.0, 10.0, 20.0, 29.9, 30.5, 31.0, 40.0, 88.0, 89.0, 100.0, 300.0, 700.0)
L_VALUES = [0.0, *(s * v for v in _MAGNITUDES for s in (1.0, -1.0))]
# Quantities that hold e^l: their squares exceed float64 from l ~ 354 (and e^l itself from 709.78).
HOLD_EXP = ("k3", "kl_pq", "r_minus_1", "k2_minus_k3")


def _fold(
    logp: torch.Tensor,
    ref: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clamp: float = INF,
    threshold: float = 20.0,
    acc: np.ndarray | None = None,
) -> np.ndarray:
    """The moments vector the kernel folds these tokens into (a fresh one, or ``acc``)."""
    out = np.zeros(layout.SIZE, dtype=np.float64) if acc is None else acc
    if not _native.reads_dtype(logp.dtype):  # the portable body reads float32 only
        logp, ref = logp.float(), ref.float()
    _native.fold(logp.contiguous(), ref.contiguous(), mask, clamp, threshold, out)
    return out


def _mp_token(logp: float, ref: float, clamp: float = INF) -> list[Any]:
    """The six quantities (mpmath numbers, 50 digits) of a token whose inputs are stored as
    these values, its log-ratio clamped to +-clamp."""
    with mpmath.workdps(50):
        x = mpmath.mpf(ref) - mpmath.mpf(logp)
        if clamp != INF:
            x = min(max(x, -mpmath.mpf(clamp)), mpmath.mpf(clamp))
        r = mpmath.exp(x)
        k2, k3 = x * x / 2, (r - 1) - x
        return [-x, k2, k3, r * x - (r - 1), r - 1, k2 - k3]


def _to_float(x: Any) -> float:
    """An mpmath number as float64 (+-inf beyond its range)."""
    return (
        float(x) if abs(x) < mpmath.mpf(1.7976931348623157e308) else math.copysign(INF, float(mpmath.sign(x)))
    )


def _rel(got: float, want: float) -> float:
    if want == 0:
        return abs(got)
    return abs(got - want) / abs(want)


def _f32_log_ratio(logp: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """The log-ratio as the kernel computes it, for its counts: float32 ref - logp."""
    return (ref.float() - logp.float()).numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_exact_per_token_values_without_clamp(dtype: torch.dtype, masked: bool, body: str) -> None:
    # Each log-ratio as one token (the scalar tail), as 8 copies (one vector) and as 19 (two
    # vectors and a tail); masked, each copy sits beside a masked-out NaN, -inf or l = 1000
    # token, which must change nothing. Every quantity within 1e-4 of its 50-digit value;
    # tokens above |l| = 20 counted as extreme, and only they.
    junk = [(0.0, float("nan")), (0.0, -INF), (-3.0, 997.0)]  # (logp, ref), masked out
    failures = []
    for l in L_VALUES:
        for base in (0.0, -3.0):
            lp = torch.tensor([base], dtype=dtype)
            rf = torch.tensor([base + l], dtype=torch.float64).to(dtype)
            exact = [_to_float(v) for v in _mp_token(float(lp), float(rf))]
            l32 = float(_f32_log_ratio(lp, rf)[0])
            for reps in (1, 8, 19):
                if masked:
                    pairs = [p for k in range(reps) for p in ((base, float(rf)), junk[k % 3])]
                    logp = torch.tensor([p[0] for p in pairs], dtype=torch.float64).to(dtype)
                    ref = torch.tensor([p[1] for p in pairs], dtype=torch.float64).to(dtype)
                    ref[0::2] = rf  # the token itself, as stored
                    mask = torch.arange(2 * reps) % 2 == 0
                else:
                    logp, ref, mask = lp.repeat(reps), rf.repeat(reps), None
                acc = _fold(logp, ref, mask)
                assert not np.isnan(acc).any(), (l, base, reps, acc)
                assert acc[layout.COUNT] == acc[layout.TOKENS] == reps and acc[layout.NONFINITE] == 0
                assert acc[layout.EXTREME] == (reps if abs(l32) > 20 else 0), (l, acc[layout.EXTREME])
                assert acc[layout.MAX_ABS] == abs(l32)
                for k, name in enumerate(QUANTITIES):
                    err = _rel(acc[layout.MEAN][k], exact[k])
                    if not err <= 1e-4:
                        failures.append((name, l, base, reps, acc[layout.MEAN][k], exact[k], err))
    assert failures == []


def _ordinary_batch(dtype: torch.dtype, n: int = 203) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` tokens of the usual regime (|l| ~ 0.05), a quarter masked out."""
    g = torch.Generator().manual_seed(17)
    logp = (-8.0 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    ref = (logp.double() + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    return logp, ref, torch.rand(n, generator=g) < 0.75


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_exact_values_mixed_into_a_batch_without_clamp(dtype: torch.dtype, masked: bool, body: str) -> None:
    # One token of each log-ratio among 202 ordinary ones, at a vector's first lane, inside,
    # at the last lane of the last vector and in the tail: the batch's means equal the mean of
    # the 50-digit per-token values, and its variances theirs where float64 holds them (+inf
    # where it does not, never NaN).
    logp0, ref0, mask0 = _ordinary_batch(dtype)
    n = logp0.numel()
    per_token = [_mp_token(float(a), float(b)) for a, b in zip(logp0.tolist(), ref0.tolist(), strict=True)]
    failures = []
    for l in L_VALUES:
        for pos in (0, 99, 199, 201):
            logp, ref = logp0.clone(), ref0.clone()
            # held exactly by every dtype: (-l, 0) or (0, l) (logp + 700 in bf16 would round past 700)
            logp[pos], ref[pos] = (-l, 0.0) if l > 0 else (0.0, l)
            mask = mask0.clone() if masked else torch.ones(n, dtype=torch.bool)
            mask[pos] = True
            values = list(per_token)
            values[pos] = _mp_token(float(logp[pos]), float(ref[pos]))
            acc = _fold(logp, ref, mask if masked else None)
            assert not np.isnan(acc).any(), (l, pos, acc)
            valid = [values[i] for i in range(n) if mask[i]]
            m = len(valid)
            assert acc[layout.COUNT] == m
            assert acc[layout.EXTREME] == (abs(float(_f32_log_ratio(logp, ref)[pos])) > 20)
            with mpmath.workdps(50):
                for k, name in enumerate(QUANTITIES):
                    mean = mpmath.fsum(v[k] for v in valid) / m
                    var = mpmath.fsum((v[k] - mean) ** 2 for v in valid) / (m - 1)
                    want_mean, want_var = _to_float(mean), _to_float(var)
                    got_mean, got_var = acc[layout.MEAN][k], acc[layout.M2][k] / (m - 1)
                    scale = math.sqrt(want_mean**2 + want_var) if math.isfinite(want_var) else abs(want_mean)
                    if not abs(got_mean - want_mean) <= 1e-4 * scale:
                        failures.append((name, "mean", l, pos, got_mean, want_mean))
                    if math.isfinite(want_var):
                        if not abs(got_var - want_var) <= 2e-4 * scale**2:
                            failures.append((name, "var", l, pos, got_var, want_var))
                    elif got_var != INF:
                        failures.append((name, "var", l, pos, got_var, want_var))
    assert failures == []


def _reference(
    logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None, clamp: float, threshold: float
) -> np.ndarray:
    """The moments vector in float64 numpy: quantities of the float64 log-ratio clamped to
    +-clamp; validity, extreme count and max |l| of the float32 one (the kernel's)."""
    l32 = _f32_log_ratio(logp, ref).astype(np.float64)
    fin = np.isfinite(l32)
    if clamp > 700:  # above l = 700 (e^l at float64's limit) a token counts as non-finite
        fin &= l32 <= 700
    valid = np.ones(l32.shape, dtype=bool) if mask is None else mask.numpy().astype(bool)
    good = valid & fin
    lc = np.clip((ref.double() - logp.double()).numpy()[good], -clamp, clamp)
    with np.errstate(over="ignore", invalid="ignore"):
        em1 = np.expm1(lc)
        k2, k3 = 0.5 * lc * lc, em1 - lc
        q = np.stack([-lc, k2, k3, em1 * lc - k3, em1, k2 - k3])
        out = np.zeros(layout.SIZE, dtype=np.float64)
        out[layout.COUNT] = out[layout.TOKENS] = good.sum()
        out[layout.MEAN] = q.mean(axis=1)
        out[layout.M2] = ((q - out[layout.MEAN][:, None]) ** 2).sum(axis=1)
    out[layout.NONFINITE] = (valid & ~fin).sum()
    out[layout.EXTREME] = (np.abs(l32[good]) > threshold).sum()
    out[layout.MAX_ABS] = np.abs(l32[good]).max()
    return out


def _assert_moments_close(got: np.ndarray, want: np.ndarray, what: Any, skip: tuple[str, ...] = ()) -> None:
    """Counts and max |l| exactly; means within 1e-5 (k2 - k3: 1e-4) of each quantity's RMS,
    M2 likewise of count * RMS^2 (float32 per-token math against float64); not the quantities
    in ``skip``."""
    for i in (layout.COUNT, layout.TOKENS, layout.NONFINITE, layout.EXTREME, layout.MAX_ABS):
        assert got[i] == want[i], (what, i, got[i], want[i])
    n = want[layout.COUNT]
    for k, name in enumerate(QUANTITIES):
        if name in skip:
            continue
        rtol = 1e-4 if name == "k2_minus_k3" else 1e-5
        mean, m2 = want[layout.MEAN][k], want[layout.M2][k]
        scale2 = mean * mean + m2 / n
        assert abs(got[layout.MEAN][k] - mean) <= rtol * math.sqrt(scale2), (
            what,
            name,
            got[layout.MEAN][k],
            mean,
        )
        assert abs(got[layout.M2][k] - m2) <= rtol * n * scale2, (what, name, got[layout.M2][k], m2)


def _extreme_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """``n`` float32 tokens (|l| ~ 2, mask density 0.8) with tokens of large |l|, NaN and inf
    at block starts and ends (blocks of 512 tokens), at every split of the range over 2, 3 or
    7 threads, around a vector's edges and in the tail (< 8 tokens)."""
    g = torch.Generator().manual_seed(seed)
    logp = -8.0 * torch.rand(n, generator=g)
    ref = logp + 2.0 * torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.8
    places = {0, 1, 7, 8, 511, 512, 513, 1023, 1024, 4095, 4096, n - 1, n - 2, n - 3, n - 9}
    for parts in (2, 3, 7):
        for t in range(1, parts):
            lo = n * t // parts
            places |= {lo - 1, lo, lo + 1}
    places |= {512 * b for b in range(0, n // 512, 37)} | {512 * b + 511 for b in range(3, n // 512, 41)}
    values = [20.5, -21.0, 25.0, -29.99, 30.25, -31.0, 45.0, -100.0, 700.0, -700.0, 20.0, -20.0]
    values += [float("nan"), INF, 5.0, -10.0, 10.0 + 1e-5, 88.75, -89.0]
    placed = sorted(p for p in places if 0 <= p < n)
    for k, i in enumerate(placed):
        v = values[k % len(values)]
        ref[i] = logp[i] + v if math.isfinite(v) else v
        if k % 5 == 4:
            mask[i] = False  # a masked-out extreme token: counted nowhere
    return logp, ref, mask, placed


@pytest.mark.parametrize(
    "clamp, threshold", [(INF, 20.0), (40.0, 20.0), (30.0, 20.0), (10.0, 10.0), (5.0, 5.0)]
)
@pytest.mark.parametrize("split", ["one", "openmp", "python3", "python7"])
def test_extreme_count_at_block_and_thread_boundaries(
    clamp: float, threshold: float, split: str, body: str
) -> None:
    # The rescan runs on blocks whose max |l| exceeds min(threshold, 30): tokens at block
    # starts and ends, in the tail and at each thread's first and last token must each be
    # counted once (|l| > threshold, strictly: 20.0 is not), and above a clamp of 30 computed
    # once, in double. Counts exactly, moments against float64 numpy.
    n = 200_003
    logp, ref, mask, placed = _extreme_batch(n, seed=int(threshold) + (0 if clamp == INF else int(clamp)))
    want = _reference(logp, ref, mask, clamp, threshold)
    assert want[layout.EXTREME] >= len(placed) // 4 and want[layout.NONFINITE] > 0
    lib = _native.load()
    assert lib is not None
    if split in ("one", "openmp"):
        with torch_threads(1 if split == "one" else 2):
            got = _fold(logp, ref, mask, clamp=clamp, threshold=threshold)
    else:
        got = np.zeros(layout.SIZE, dtype=np.float64)
        _native._fold_threads(lib, logp, ref, mask, clamp, threshold, int(split[6:]), got)
    assert not np.isnan(got).any()
    skip: tuple[str, ...] = ()
    if clamp == INF:  # l = +700 is in the batch: the squares of e^l exceed float64
        skip = HOLD_EXP
        for k, name in enumerate(QUANTITIES):
            assert math.isinf(got[layout.M2][k]) is (name in HOLD_EXP), (name, got[layout.M2][k])
            if name in HOLD_EXP:  # means dominated by e^700, computed in double
                assert _rel(got[layout.MEAN][k], want[layout.MEAN][k]) <= 1e-6, name
    _assert_moments_close(got, want, (clamp, threshold, split), skip)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_nan_with_huge_log_ratios(dtype: torch.dtype, body: str) -> None:
    # l = +700 (e^l = 1.0e304, its square beyond float64) among 200K ordinary tokens, split over
    # threads, then more batches merged into the same vector: means exact, M2 +inf only for
    # the quantities holding e^l, never NaN. l = 1000 without a clamp: non-finite, kept out.
    n = 200_003
    logp, ref, mask = _ordinary_batch(dtype, n)
    for i, l in ((5, 700.0), (100_001, 700.0), (n - 1, 700.0), (777, -700.0), (150_000, -700.0)):
        logp[i], ref[i] = (-l, 0.0) if l > 0 else (0.0, l)  # l exactly, in every dtype
        mask[i] = True
    acc = np.zeros(layout.SIZE, dtype=np.float64)
    small = (logp[:5], ref[:5], mask[:5])
    with torch_threads(2):
        for batch in ((logp, ref, mask), small, (logp[1:], ref[1:], None)):
            _fold(*batch, acc=acc)
            assert not np.isnan(acc).any(), acc
    want = _reference(torch.cat([logp, small[0], logp[1:]]), torch.cat([ref, small[1], ref[1:]]),
                      torch.cat([mask, small[2], torch.ones(n - 1, dtype=torch.bool)]), INF, 20.0)  # fmt: skip
    assert acc[layout.COUNT] == want[layout.COUNT] and acc[layout.EXTREME] == want[layout.EXTREME] == 10
    for k, name in enumerate(QUANTITIES):
        assert math.isinf(acc[layout.M2][k]) is (name in HOLD_EXP), (name, acc[layout.M2][k])
        assert _rel(acc[layout.MEAN][k], want[layout.MEAN][k]) <= 1e-4, (
            name,
            acc[layout.MEAN][k],
            want[layout.MEAN][k],
        )
    # Above l = 700 (e^l at double's limit), without a clamp: counted as non-finite and kept
    # out, as l = +inf is; with a clamp it is clamped like any other token.
    beyond_lp, beyond = logp.clone(), ref.clone()
    beyond_lp[9], beyond[9] = -1000.0, 0.0
    out = _fold(beyond_lp, beyond, None)
    assert not np.isnan(out).any(), out
    assert out[layout.NONFINITE] == 1 and out[layout.COUNT] == n - 1
    want = _reference(beyond_lp, beyond, None, INF, 20.0)
    assert want[layout.NONFINITE] == 1 and out[layout.EXTREME] == want[layout.EXTREME]
    for k, name in enumerate(QUANTITIES):
        assert _rel(out[layout.MEAN][k], want[layout.MEAN][k]) <= 1e-4, (name, out[layout.MEAN][k])
    clamped = _fold(beyond_lp, beyond, None, clamp=500.0, threshold=20.0)
    assert clamped[layout.NONFINITE] == 0 and clamped[layout.COUNT] == n
    assert 1e211 < clamped[layout.MEAN][2] < 1e213  # k3 of the token clamped to 500: e^500 / n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clamp", [5.0, 10.0, 30.5, 40.0])
def test_opt_in_clamp_gives_the_clamped_values(dtype: torch.dtype, clamp: float, body: str) -> None:
    # clamp= (peers' behaviour): every quantity is that of the log-ratio clamped to +-clamp,
    # in float below 30 and in double above; tokens beyond the clamp are counted as extreme
    # (threshold = clamp below the default threshold of 20, else 20).
    threshold = min(clamp, 20.0)
    values = [-700.0, -40.0, -31.0, -15.0, -10.0, -3.0, 0.2, 3.0, 10.0, 15.0, 31.0, 40.0, 100.0, 700.0]
    failures = []
    for l in values:
        lp = torch.tensor([-2.0], dtype=dtype)
        rf = torch.tensor([-2.0 + l], dtype=torch.float64).to(dtype)
        exact = [_to_float(v) for v in _mp_token(float(lp), float(rf), clamp)]
        for reps in (1, 8):
            acc = _fold(lp.repeat(reps), rf.repeat(reps), clamp=clamp, threshold=threshold)
            assert acc[layout.EXTREME] == (reps if abs(float(rf) - float(lp)) > threshold else 0), (l, acc)
            assert acc[layout.MAX_ABS] == abs(float(rf) - float(lp))  # the unclamped |l|
            for k, name in enumerate(QUANTITIES):
                if not _rel(acc[layout.MEAN][k], exact[k]) <= 1e-4:
                    failures.append((name, l, reps, acc[layout.MEAN][k], exact[k]))
    assert failures == []


def test_bodies_agree_without_clamp() -> None:
    # The portable and AVX2 bodies, on a batch with every kind of token, at no clamp.
    if not _native.available() or not _native.cpu_has_avx2():
        pytest.skip("needs the kernel on an AVX2 CPU")
    logp, ref, mask, _ = _extreme_batch(100_003, seed=3)
    out = {}
    before = _native.vector_isa()
    try:
        for name in ("avx2", "portable"):
            assert _native.select_isa(name) == name
            with torch_threads(2):
                out[name] = _fold(logp, ref, mask)
    finally:
        _native.select_isa(before or "auto")
    a, b = out["avx2"], out["portable"]
    assert not np.isnan(a).any() and np.array_equal(np.isinf(a), np.isinf(b))
    for k, name in enumerate(QUANTITIES):  # l = 700: M2 +inf, means dominated by e^700
        assert math.isinf(a[layout.M2][k]) is (name in HOLD_EXP)
        if name in HOLD_EXP:
            assert _rel(a[layout.MEAN][k], b[layout.MEAN][k]) <= 1e-9, name
    _assert_moments_close(a, b, "avx2 vs portable", skip=HOLD_EXP)


# --------------------------------------------------------------------------------------------
# 2. run-time CPU dispatch: one binary for every CPU of the architecture
# --------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.skipif(not (X86_64 and Path("/proc/cpuinfo").exists()), reason="x86-64 Linux only")
def test_cpu_detection_matches_the_kernel_s_view_of_the_cpu() -> None:
    # /proc/cpuinfo lists the features the kernel (OS) enabled; the AVX2 body needs three.
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    expected = {"avx2", "fma", "f16c"} <= flags
    assert _native.cpu_has_avx2() is expected
    before = _native.vector_isa()
    try:
        assert _native.select_isa("auto") == ("avx2" if expected else "portable")
        assert _native.select_isa("avx2") == ("avx2" if expected else "portable")  # never granted blindly
        assert _native.select_isa("portable") == "portable"
        assert _native.reads_dtype(torch.float32) and not _native.reads_dtype(torch.bfloat16)
    finally:
        _native.select_isa(before or "auto")


def _functions_using_extensions(lib: Path) -> tuple[dict[str, set[str]], int]:
    """Instructions beyond x86-64's baseline (SSE2), per function, from ``objdump -d``."""
    text = subprocess.run(
        [shutil.which("objdump") or "objdump", "-d", "--no-show-raw-insn", str(lib)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # AVX/AVX2/AVX-512 (VEX/EVEX mnemonics start with v), and common later scalar extensions.
    later = {
        "popcnt", "lzcnt", "tzcnt", "andn", "bextr", "blsi", "blsr", "bzhi", "pdep", "pext",
        "rorx", "sarx", "shlx", "shrx", "movbe", "pshufb", "ptest", "roundss", "roundsd",
        "roundps", "roundpd", "blendvps", "blendvpd", "pblendvb", "blendps", "pmaxsd", "pminsd",
        "pmulld", "insertps", "extractps", "pextrd", "pinsrd", "pmovzxbd", "pmovsxbd",
        "haddps", "movshdup", "movsldup", "movddup", "crc32", "pcmpgtq", "pcmpeqq",
    }  # fmt: skip
    found: dict[str, set[str]] = {}
    fn, count = "?", 0
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            fn = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[1].strip():
            continue
        count += 1
        mnemonic = parts[1].split()[0]
        if (mnemonic.startswith("v") and mnemonic not in ("verr", "verw")) or mnemonic in later:
            found.setdefault(fn, set()).add(mnemonic)
        elif re.search(r"%[yz]mm", parts[1]):
            found.setdefault(fn, set()).add(parts[1].strip())
    return found, count


@needs_native
@pytest.mark.skipif(not X86_64 or shutil.which("objdump") is None, reason="x86-64 with objdump only")
def test_library_is_baseline_code_outside_its_avx2_functions() -> None:
    # A build with -march=native (the cause of SIGILL on nodes with fewer features) or a
    # compiler defaulting to a newer target would put such instructions in the portable body,
    # the shift sample or the merge, which every CPU runs.
    assert LIB is not None
    found, count = _functions_using_extensions(LIB)
    assert count > 1000  # the disassembly was read
    outside = {fn: sorted(ins)[:5] for fn, ins in found.items() if "avx2" not in fn}
    assert outside == {}, f"instructions beyond SSE2 outside the AVX2 functions: {outside}"
    inside = {fn for fn in found if "avx2" in fn}
    assert any(fn.startswith("range_avx2") for fn in inside), found  # the check sees AVX code


@needs_native
@pytest.mark.skipif(not _native.available() or not _native.cpu_has_avx2(), reason="needs an AVX2 CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clamp", [5.0, 20.0, 40.0])
def test_portable_and_avx2_bodies_agree(dtype: torch.dtype, clamp: float) -> None:
    # The two bodies compute the same math with different instruction sequences; on a node
    # without AVX2 only the portable one runs, and it must give what the AVX2 one gives here.
    logp, ref, mask = random_batch(100_003, seed=5, dtype=dtype, scale=2.0, mask_density=0.8, bad=True)
    out = {}
    before = _native.vector_isa()
    try:
        for name in ("avx2", "portable"):
            assert _native.select_isa(name) == name
            with torch_threads(2):
                out[name] = summary(logp, ref, mask, backend="native", clamp=clamp)
    finally:
        _native.select_isa(before or "auto")
    assert_summaries_match(out["avx2"], out["portable"], rtol=BACKEND_RTOL)
    assert out["avx2"].extreme > 0 and out["avx2"].nonfinite > 0


_PORTABLE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from dataclasses import asdict
    torch.set_num_threads(2)
    import klmonitor._native as nat
    from klmonitor import KLStats
    sys.path.insert(0, sys.argv[1])
    from test_stats import random_batch
    out = {"isa": nat.vector_isa(), "bf16_direct": nat.reads_dtype(torch.bfloat16), "cases": []}
    cases = [(7, False, torch.float32), (4097, True, torch.float32), (200_003, True, torch.float32),
             (200_003, False, torch.float32), (4097, True, torch.bfloat16), (4097, True, torch.float16)]
    for size, masked, dtype in cases:
        logp, ref, mask = random_batch(
            size, seed=size, dtype=dtype, mask_density=0.6 if masked else None, bad=masked
        )
        pair = []
        for backend in ("native", "torch"):
            s = KLStats(backend=backend)
            s.update(logp, ref, mask)
            pair.append(asdict(s.compute()))
        out["cases"].append(pair)
    print(json.dumps(out))
    """
)


@needs_native
def test_portable_body_forced_by_env_matches_torch() -> None:
    # KLMONITOR_NATIVE=portable: what a CPU without AVX2 runs, from the load on.
    env = {**os.environ, "KLMONITOR_NATIVE": "portable"}
    proc = subprocess.run(
        [sys.executable, "-c", _PORTABLE_SCRIPT, str(TESTS)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["isa"] == "portable" and out["bf16_direct"] is False
    for native, plain in out["cases"]:
        a, b = KLSummary(**native), KLSummary(**plain)
        for field in ("tokens", "nonfinite", "extreme", "max_abs_log_ratio"):
            assert getattr(a, field) == getattr(b, field), field
        for name in QUANTITIES:
            assert_stats_close(
                EstimatorStats(**getattr(a, name)),
                EstimatorStats(**getattr(b, name)),
                BACKEND_RTOL[name],
                name,
            )


@needs_native
@pytest.mark.parametrize("workers", [2, 3, 7])
def test_python_thread_split_matches_the_torch_path(body: str, workers: int) -> None:
    # A library built without OpenMP splits large batches over Python threads instead.
    lib = _native.load()
    assert lib is not None
    logp, ref, mask = random_batch(200_003, seed=workers, mask_density=0.7, bad=True, scale=1.0)
    plain = KLStats(backend="torch")
    plain.update(logp, ref, mask)
    native = KLStats(backend="native")
    native.update(logp[:10], ref[:10], mask[:10])
    plain.update(logp[:10], ref[:10], mask[:10])
    _native._fold_threads(lib, logp, ref, mask, *native.limits, workers, native._acc.numpy())
    assert_summaries_match(native.compute(), plain.compute(), rtol=BACKEND_RTOL)


# --------------------------------------------------------------------------------------------
# 3. faults: every way the library can be missing, damaged, foreign or planted
# --------------------------------------------------------------------------------------------
# Runs each case in one fresh process: points klmonitor at the case's copy of the _native
# directory, sets the case's environment, trains KLStats windows (auto and torch backends,
# float32 and bf16, updates after a compute) and reports the numbers and the messages.
_RUNNER = textwrap.dedent(
    """
    import json, logging, os, sys
    from dataclasses import asdict
    from pathlib import Path
    import torch
    torch.set_num_threads(2)
    import klmonitor
    from klmonitor import KLStats, _native
    messages = []
    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logging.getLogger("klmonitor").addHandler(Keep())

    def batches(dtype):
        g = torch.Generator().manual_seed(7)
        out = []
        for n in (3000, 140_001, 5):
            logp = -torch.rand(n, generator=g) * 10
            ref = logp + 0.3 * torch.randn(n, generator=g)
            ref[::97] = float("nan")
            ref[::89] = logp[::89] + 30
            out.append((logp.to(dtype), ref.to(dtype), torch.rand(n, generator=g) < 0.8))
        return out

    results = []
    for case in json.loads(sys.argv[1]):
        saved = dict(os.environ)
        os.environ.update(case["env"])
        _native._library_dir = Path(case["dir"])
        _native._CHILD_TIMEOUT = case.get("timeout", 120.0)
        _native._reset()
        start = len(messages)
        out = {"name": case["name"]}
        for dtype in (torch.float32, torch.bfloat16):
            for backend in ("auto", "torch"):
                s = KLStats(backend=backend)
                for b in batches(dtype):
                    s.update(*b)
                s.compute()
                s.update(*batches(dtype)[0])
                out[backend + "_" + str(dtype)[6:]] = asdict(s.compute())
        out["available"] = _native.available()
        out["reason"] = _native.unavailable_reason()
        out["isa"] = _native.vector_isa()
        out["messages"] = messages[start:]
        out["child_seconds"] = _native._child_seconds
        os.environ.clear()
        os.environ.update(saved)
        results.append(out)
    print(json.dumps({"file": klmonitor.__file__, "results": results}))
    """
)

# A library with every function of the kernel whose constructor, run by dlopen before any
# check on its symbols could happen, leaves a file behind: proof that foreign code ran.
_PLANT_C = """
#include <stdio.h>
#include <stdlib.h>
#include "{source}"
__attribute__((constructor)) static void planted(void) {{
    const char* path = getenv("KLM_TEST_MARKER");
    FILE* f = path ? fopen(path, "w") : NULL;
    if (f) {{ fputs("planted code ran", f); fclose(f); }}
}}
"""


def _build_test_library(out: Path, source_text: str, source_hash: str) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source_text)
    cmd = [
        _compiler() or "cc", "-O1", "-shared", "-fPIC", f'-DKLM_SOURCE_SHA256="{source_hash}"',
        "-o", str(out), str(src), "-lm",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return out


def _nobody() -> int:
    import pwd

    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def _record(lib: bytes) -> str:
    """The build record setup.py writes beside a library of these bytes, built from moments.c."""
    source = hashlib.sha256((NATIVE_DIR / "moments.c").read_bytes()).hexdigest()
    return f"library-sha256 {hashlib.sha256(lib).hexdigest()}\nsource-sha256 {source}\n"


def _native_copy(root: Path, name: str, lib: bytes | None = None, built: bytes | None = None) -> Path:
    """A copy of klmonitor/_native (its loader and moments.c) under ``root/name``; ``lib``
    becomes its compiled library (``None``: none, as after an install without a compiler),
    with the build record of ``built`` (the bytes the build wrote; default ``lib``: a damaged
    copy passes ``built=`` the intact library's bytes)."""
    d = root / name
    d.mkdir()
    for f in ("__init__.py", "moments.c"):
        shutil.copy(NATIVE_DIR / f, d / f)
        os.chmod(d / f, 0o644)  # klmonitor's own files: writable by their owner only
    if lib is not None:
        assert LIB is not None
        (d / LIB.name).write_bytes(lib)
        (d / (LIB.name + _native.DIGEST_SUFFIX)).write_text(_record(lib if built is None else built))
    return d


def _fault_cases(root: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The cases and, per case, what must happen: ``use`` (kernel used or not), ``why`` (a
    phrase of the message), ``marker`` (a file foreign code would create) and whether it must
    exist (only the control, where we load the planted library ourselves)."""
    assert LIB is not None
    good = LIB.read_bytes()
    cases: list[dict[str, Any]] = []
    expect: dict[str, dict[str, Any]] = {}

    def add(
        name: str, d: Path, use: bool, why: str = "", env: dict[str, str] | None = None, **kw: Any
    ) -> None:
        cases.append({"name": name, "dir": str(d), "env": env or {}})
        expect[name] = {"use": use, "why": why, **kw}

    add("intact", _native_copy(root, "intact", good), True)
    add("not_built", _native_copy(root, "not_built"), False, "not built when klmonitor was installed")
    add("empty", _native_copy(root, "empty", b"", good), False, "empty (0 bytes)")
    add(
        "truncated_half",
        _native_copy(root, "truncated_half", good[: len(good) // 2], good),
        False,
        "truncated",
    )
    add("truncated_tail", _native_copy(root, "truncated_tail", good[:-4096], good), False, "truncated")
    add("truncated_header", _native_copy(root, "truncated_header", good[:40], good), False, "cut short")
    add(
        "not_elf", _native_copy(root, "not_elf", b"#!/bin/sh\necho not a library\n" * 50), False, "not an ELF"
    )
    # A real ELF shared library of this machine without the kernel's functions.
    import _ctypes

    foreign = getattr(_ctypes, "__file__", None) or torch._C.__file__
    add("no_symbols", _native_copy(root, "no_symbols", Path(foreign).read_bytes()), False, "lacks a function")
    other_machine = bytearray(good)
    other_machine[18:20] = (183 if other_machine[18:20] != b"\xb7\x00" else 62).to_bytes(2, "little")
    add(
        "other_machine",
        _native_copy(root, "other_machine", bytes(other_machine), good),
        False,
        "built for ELF machine",
    )
    stale = _native_copy(root, "stale", good)
    (stale / "moments.c").write_text((stale / "moments.c").read_text() + "\n/* edited after the build */\n")
    add("stale", stale, False, "another version")
    for mode, who in ((0o666, "its group and all users"), (0o664, "its group (mode")):
        d = _native_copy(root, f"writable_{mode:o}", good)
        os.chmod(d / LIB.name, mode)
        add(f"writable_{mode:o}", d, False, f"writable by {who}")
    as_dir = _native_copy(root, "directory")
    (as_dir / LIB.name).mkdir()
    add("directory", as_dir, False, "not a regular file")
    dangling = _native_copy(root, "dangling_link")
    os.symlink(root / "nowhere.so", dangling / LIB.name)
    add("dangling_link", dangling, False, "a link to a missing")
    if AS_ROOT:
        d = _native_copy(root, "other_owner", good)
        os.chown(d / LIB.name, _nobody(), -1)
        add("other_owner", d, False, "may have been planted")
    # Environments that used to break the build-at-first-use (cache and HOME unwritable or
    # invalid), and a compiler on PATH that must never run: the installed library is used.
    fake_bin = root / "fake_bin"
    fake_bin.mkdir()
    for cc in ("cc", "gcc", "clang"):
        (fake_bin / cc).write_text(f"#!/bin/sh\necho ran > {root / 'compiler_ran'}\nexit 1\n")
        os.chmod(fake_bin / cc, 0o755)
    intact = Path(cases[0]["dir"])
    add(
        "unwritable_cache_and_home",
        intact,
        True,
        env={
            "KLMONITOR_CACHE": "/etc/hostname/sub",
            "HOME": "/proc/self/nothing",
            "XDG_CACHE_HOME": "/etc/hostname",
        },
    )
    add(
        "compiler_on_path",
        intact,
        True,
        env={"PATH": str(fake_bin), "CC": str(fake_bin / "cc")},
        marker=root / "compiler_ran",
    )
    add("no_compiler_on_path", intact, True, env={"PATH": str(root / "empty_bin")})
    if _compiler() is not None:
        source = (NATIVE_DIR / "moments.c").read_text()
        right_hash = hashlib.sha256((NATIVE_DIR / "moments.c").read_bytes()).hexdigest()
        plant = _build_test_library(
            root / "plant.so", _PLANT_C.format(source=NATIVE_DIR / "moments.c"), right_hash
        )
        # The old cache locations (shared /tmp directory, shared home), stocked with planted
        # libraries under the names the old build used: never looked at.
        shared = root / "shared"
        home_cache = root / "home" / ".cache" / "klmonitor"
        home_cache.mkdir(parents=True)
        shared.mkdir()
        os.chmod(shared, 0o1777)
        for d in (shared, home_cache):
            shutil.copy(plant, d / "moments-8fd9ee36b399ca37.so")
            if AS_ROOT:
                os.chown(d / "moments-8fd9ee36b399ca37.so", _nobody(), -1)
        env = {
            "KLMONITOR_CACHE": str(shared),
            "HOME": str(root / "home"),
            "KLM_TEST_MARKER": str(root / "ran_cache"),
        }
        add("planted_in_old_cache", intact, True, env=env, marker=root / "ran_cache")
        if AS_ROOT:
            d = _native_copy(root, "planted_other_owner", plant.read_bytes())
            os.chown(d / LIB.name, _nobody(), -1)
            env = {"KLM_TEST_MARKER": str(root / "ran_other")}
            add("planted_other_owner", d, False, "may have been planted", env=env, marker=root / "ran_other")
        # Control: the same library, ours, is loaded and its constructor runs, so the markers
        # above would have appeared had those libraries been loaded.
        d = _native_copy(root, "planted_control", plant.read_bytes())
        env = {"KLM_TEST_MARKER": str(root / "ran_control")}
        add("planted_control", d, True, env=env, marker=root / "ran_control", marker_expected=True)
        # Every symbol and the right hash, but wrong numbers: the self-test refuses it.
        wrong = source.replace("q[1] = k2;", "q[1] = k2 * 1.01f;").replace(
            "*k2o = k2;", "*k2o = _mm256_mul_ps(k2, _mm256_set1_ps(1.01f));"
        )  # k2 1 % high in both bodies and in the double path of |l| > 30
        assert wrong.count("1.01f") == 3
        bad = _build_test_library(root / "wrong.so", wrong, right_hash)
        add("wrong_numbers", _native_copy(root, "wrong_numbers", bad.read_bytes()), False, "wrong numbers")
        # Right in the float bodies, wrong only for |l| > 30 (exp for expm1: r - 1 of l = -61
        # is 0 instead of -1): the self-test's tokens beyond 30 catch it.
        wrong = source.replace("const double em1 = expm1(l);", "const double em1 = exp(l);")
        assert wrong != source
        bad = _build_test_library(root / "wrong_exact.so", wrong, right_hash)
        add(
            "wrong_exact_numbers", _native_copy(root, "wrong_exact", bad.read_bytes()), False, "wrong numbers"
        )
    return cases, expect


@pytest.fixture(scope="module")
def fault_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if LIB is None or not _native.available():
        pytest.skip(f"native kernel unavailable: {_native.unavailable_reason()}")
    root = tmp_path_factory.mktemp("faults")
    cases, expect = _fault_cases(root)
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout)
    assert Path(out["file"]).resolve().parent == ROOT / "klmonitor"
    return {"results": {r["name"]: r for r in out["results"]}, "expect": expect}


FAULTS = [
    "intact", "not_built", "empty", "truncated_half", "truncated_tail", "truncated_header",
    "not_elf", "no_symbols", "other_machine", "stale", "writable_666", "writable_664",
    "directory", "dangling_link", "other_owner", "unwritable_cache_and_home", "compiler_on_path",
    "no_compiler_on_path", "planted_in_old_cache", "planted_other_owner", "planted_control",
    "wrong_numbers", "wrong_exact_numbers",
]  # fmt: skip


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN == NaN here


@pytest.mark.parametrize("case", FAULTS)
def test_fault_leaves_training_running_with_the_torch_path_numbers(
    case: str, fault_results: dict[str, Any]
) -> None:
    if case not in fault_results["expect"]:
        pytest.skip("needs root (files of another uid) or a C compiler (test libraries)")
    got, want = fault_results["results"][case], fault_results["expect"][case]
    refused = [m for m in got["messages"] if NOT_USED in m]
    assert got["available"] is want["use"], got["reason"]
    for dtype in ("float32", "bfloat16"):
        auto, plain = got[f"auto_{dtype}"], got[f"torch_{dtype}"]
        if want["use"]:
            assert got["isa"] in ("avx2", "portable")
            assert_summaries_match(_summary(auto), _summary(plain), rtol=BACKEND_RTOL)
        else:
            assert _same(auto, plain), dtype  # the torch path ran: bit for bit its numbers
    if want["use"]:
        assert got["reason"] is None and refused == []
    else:
        assert want["why"] in got["reason"], got["reason"]
        assert len(refused) == 1 and want["why"] in refused[0], got["messages"]  # one message
        assert "pure-torch path" in refused[0]
    if "marker" in want:
        assert want["marker"].exists() is want.get("marker_expected", False)


def _summary(d: dict[str, Any]) -> KLSummary:
    return KLSummary(
        **{k: EstimatorStats(**v) if isinstance(v, dict) and "mean" in v else v for k, v in d.items()}
    )


# --------------------------------------------------------------------------------------------
# 4. end to end: a Lightning run on a damaged install, and installs with and without a compiler
# --------------------------------------------------------------------------------------------
_LIGHTNING_RUN = textwrap.dedent(
    """
    import json, sys
    from dataclasses import asdict
    sys.path.insert(0, sys.argv[1])
    import torch
    torch.set_num_threads(1)
    import klmonitor
    from klmonitor import KLMonitor, _native
    from toy_models import ToyPolicy, make_trainer
    summaries = []
    class Keep(KLMonitor):
        def on_train_batch_end(self, *args, **kwargs):
            super().on_train_batch_end(*args, **kwargs)
            if self.last_summary is not None and (not summaries or summaries[-1] != asdict(self.last_summary)):
                summaries.append(asdict(self.last_summary))
    model = ToyPolicy(lr=0.5)
    make_trainer(sys.argv[2], 12, callbacks=[Keep(log_every_n_steps=4)]).fit(model)
    print(json.dumps({"file": klmonitor.__file__, "available": _native.available(), "summaries": summaries}))
    """
)


def _copy_project(dest: Path) -> Path:
    """The sources of this project (no build products) under ``dest``, as a fresh clone has them."""
    dest.mkdir()
    for f in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, dest / f)
    shutil.copytree(
        ROOT / "klmonitor",
        dest / "klmonitor",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.so.sha256"),
    )
    return dest


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> Any:
    return subprocess.run(
        args, cwd=cwd, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout
    )


@needs_native
def test_lightning_training_on_a_truncated_library_logs_the_torch_path_numbers(tmp_path: Path) -> None:
    # The probe that killed the process with SIGBUS: a cut-short library where klmonitor loads
    # it, under a real Trainer. The run must finish and log what a run without the kernel logs.
    project = _copy_project(tmp_path / "project")
    assert LIB is not None
    (project / "klmonitor" / "_native" / LIB.name).write_bytes(LIB.read_bytes()[: LIB.stat().st_size // 3])
    (project / "klmonitor" / "_native" / (LIB.name + _native.DIGEST_SUFFIX)).write_text(
        _record(LIB.read_bytes())
    )
    damaged = _run([sys.executable, "-c", _LIGHTNING_RUN, str(TESTS), str(tmp_path / "a")], cwd=project)
    assert damaged.returncode == 0, damaged.stderr[-5000:]
    off_env = {**os.environ, "KLMONITOR_NATIVE": "0"}
    off = _run([sys.executable, "-c", _LIGHTNING_RUN, str(TESTS), str(tmp_path / "b")], cwd=ROOT, env=off_env)
    assert off.returncode == 0, off.stderr[-5000:]
    a, b = json.loads(damaged.stdout), json.loads(off.stdout)
    assert Path(a["file"]).parent == project / "klmonitor" and Path(b["file"]).parent == ROOT / "klmonitor"
    assert a["available"] is False and b["available"] is False
    assert len(a["summaries"]) == 3 and a["summaries"] == b["summaries"]
    assert damaged.stderr.count(NOT_USED) == 1 and "truncated" in damaged.stderr
    assert NOT_USED not in off.stderr  # turned off on purpose: no warning


_LOAD_REPORT = textwrap.dedent(
    """
    import json, sys, torch
    from dataclasses import asdict
    torch.set_num_threads(1)
    import klmonitor
    from klmonitor import KLStats, _native
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(5000, generator=g) * 10
    ref = logp + 0.2 * torch.randn(5000, generator=g)
    out = {"file": klmonitor.__file__, "available": _native.available(), "isa": _native.vector_isa(),
           "reason": _native.unavailable_reason(), "library": str(_native.library_path())}
    for backend in ("auto", "torch"):
        s = KLStats(backend=backend)
        s.update(logp, ref)
        out[backend] = asdict(s.compute())
    try:
        KLStats(backend="native")
        out["native_error"] = None
    except RuntimeError as exc:
        out["native_error"] = str(exc)
    print(json.dumps(out))
    """
)


def test_install_without_a_compiler_succeeds_and_trains_on_the_torch_path(tmp_path: Path) -> None:
    # `pip install` runs this build_ext; with no compiler on PATH it must still succeed.
    project = _copy_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "LDSHARED", "CFLAGS")}
    env["PATH"] = str(tmp_path / "empty_bin")
    build = _run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=project, env=env)
    assert build.returncode == 0, build.stderr[-5000:]
    assert "the optional fused CPU kernel (klmonitor/_native/moments.c) was not built" in build.stderr
    assert list((project / "klmonitor" / "_native").glob("_klm_moments*")) == []
    run = _run([sys.executable, "-c", _LOAD_REPORT], cwd=project)
    assert run.returncode == 0, run.stderr[-5000:]
    out = json.loads(run.stdout)
    assert Path(out["file"]).parent == project / "klmonitor"
    assert out["available"] is False and out["library"] == "None"
    assert _same(out["auto"], out["torch"])
    assert "not built when klmonitor was installed" in out["native_error"]
    assert run.stderr.count(NOT_USED) == 1 and "gcc or clang" in run.stderr


@needs_cc
def test_install_with_a_compiler_builds_a_checked_kernel(tmp_path: Path) -> None:
    # What `pip install -e .` does in a fresh clone: the library lands beside the loader,
    # built from this moments.c, and a process started in the clone finds and uses it.
    project = _copy_project(tmp_path / "project")
    build = _run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=project)
    assert build.returncode == 0, build.stderr[-5000:]
    assert "was not built" not in build.stderr
    run = _run([sys.executable, "-c", _LOAD_REPORT], cwd=project)
    assert run.returncode == 0, run.stderr[-5000:]
    out = json.loads(run.stdout)
    assert out["available"] is True and out["reason"] is None and out["native_error"] is None, out
    assert Path(out["library"]).parent == project / "klmonitor" / "_native"
    assert out["isa"] == ("avx2" if _native.available() and _native.cpu_has_avx2() else out["isa"])
    assert_summaries_match(_summary(out["auto"]), _summary(out["torch"]), rtol=BACKEND_RTOL)
    assert NOT_USED not in run.stderr
    # A rebuild replaces the file (a new inode) rather than rewriting it: a running process
    # that has the old library mapped would die of SIGBUS were it truncated under it.
    before = os.stat(out["library"])
    rebuild = _run([sys.executable, "setup.py", "build_ext", "--inplace", "--force"], cwd=project)
    assert rebuild.returncode == 0, rebuild.stderr[-5000:]
    after = os.stat(out["library"])
    assert after.st_ino != before.st_ino and after.st_size > 0
    assert sorted(p.name for p in (project / "klmonitor" / "_native").iterdir() if "tmp" in p.name) == []


def test_native_disabled_by_env_uses_torch_path() -> None:
    env = {**os.environ, "KLMONITOR_NATIVE": "0"}
    proc = _run([sys.executable, "-c", _LOAD_REPORT], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["available"] is False
    assert _same(out["auto"], out["torch"])  # bit for bit: the same code ran
    assert out["native_error"] and "KLMONITOR_NATIVE=0" in out["native_error"]
    assert NOT_USED not in proc.stderr  # asked for: no warning


def test_unknown_env_value_warns_once_and_runs() -> None:
    env = {**os.environ, "KLMONITOR_NATIVE": "fastest"}
    proc = _run([sys.executable, "-c", _LOAD_REPORT], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert proc.stderr.count("KLMONITOR_NATIVE='fastest' is not one of") == 1
    assert out["available"] is _native.available()
