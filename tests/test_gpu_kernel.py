"""The fused Triton kernel: numerics in CI through Triton's interpreter (CPU), and on CUDA.

CPU: ``tests/triton_cases.py`` runs the kernel under ``TRITON_INTERPRET=1`` in a subprocess
(the interpreter must be chosen before Triton is imported); its results are compared here with
an independent float64 reference and with the eager torch path, and (without a clamp, at any
|l| up to 700 and beyond) with per-token values from mpmath at 50 digits. CUDA tests (skipped
without a device) check the same numbers on the GPU, that ``update`` does not synchronise, and
that the kernel compiles once per dtype and mask-or-not, not per batch shape or clamp.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch

from klmonitor import KLStats, _triton
from klmonitor import _moments as mom

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_cases  # noqa: E402
from kl_reference import assert_moments_close, moments  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not _triton.available(), reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, list[float]]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_cases.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def on_cuda() -> dict[str, list[float]]:
    if not torch.cuda.is_available() or not _triton.available():
        pytest.skip("needs a CUDA device and Triton")
    return triton_cases.exact_results("cuda", interpret=False)


@pytest.fixture(params=["interpreter", "cuda"])
def results(request) -> dict[str, list[float]]:
    """The exactness cases' results: Triton's interpreter on CPU, or the compiled kernel on CUDA."""
    if not _triton.available():
        pytest.skip("Triton is not installed")
    return request.getfixturevalue("interpreted" if request.param == "interpreter" else "on_cuda")


@needs_triton
@pytest.mark.parametrize("name", list(triton_cases.cases()))
def test_interpreted_kernel_matches_float64_and_eager(interpreted, name: str) -> None:
    logp, ref, mask, clamp = triton_cases.cases()[name]
    got = np.array(interpreted[name])
    assert_moments_close(got, moments(logp, ref, mask, clamp, extreme=clamp), rtol=4e-6)
    eager = mom.token_fold_torch(mom.empty(), logp, ref, mask, clamp, clamp).numpy()
    assert_moments_close(got, eager, rtol=4e-6)


@needs_triton
def test_interpreted_nearly_constant_keeps_full_precision(interpreted) -> None:
    logp, ref, mask, _ = triton_cases.cases()["nearly_constant"]
    got, want = interpreted["nearly_constant"], moments(logp, ref, mask)
    assert got[1] == pytest.approx(want[1], rel=1e-12)  # k1's mean, from tile sums about m
    assert got[7] == pytest.approx(want[7], rel=1e-5)


@needs_triton
def test_interpreted_folding_and_klstats(interpreted) -> None:
    assert interpreted["empty_keeps_state"] == (mom.empty() + 1.0).tolist()
    logp, ref, mask = triton_cases._batch(7000, 9)
    want = moments(logp, ref, mask)
    assert_moments_close(np.array(interpreted["folded_batches"]), want, rtol=4e-6)
    assert_moments_close(np.array(interpreted["klstats_triton"]), want, rtol=4e-6)


def test_kernel_declines_what_it_does_not_take() -> None:
    x = torch.zeros(8)
    assert not _triton.supports(x, x, interpret=False)  # CPU tensors without the interpreter
    assert not _triton.supports(x.double(), x, interpret=True)  # float64: eager path
    assert not _triton.supports(x[:0], x[:0], interpret=True)
    assert _triton.supports(x, x.bfloat16(), interpret=True) == _triton.available()  # any clamp


def test_float32_around_brackets_the_threshold() -> None:
    for t in (20.0, 0.1, 1e-6, 30.5, 1e39, math.inf):
        lo, hi = _triton._float32_around(t)
        assert lo <= t <= hi and np.float32(lo) == lo and np.float32(hi) == hi
        with np.errstate(over="ignore"):
            assert lo == hi or np.nextafter(np.float32(lo), np.float32(np.inf)) == np.float32(hi)
        # a float32 |l| is above t exactly when it is above lo
        for a in np.float32([lo, hi, np.nextafter(np.float32(lo), np.float32(0))]):
            assert (float(a) > t) == (float(a) > lo)


def test_a_failing_kernel_warns_once_and_falls_back(monkeypatch) -> None:
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(_triton, "available", lambda: True)
    monkeypatch.setattr(_triton, "supports", lambda *a, **k: True)
    monkeypatch.setattr(_triton, "fold", broken)
    logp, ref, mask = triton_cases._batch(3000, 4)
    s = KLStats(backend="triton")
    with pytest.warns(UserWarning, match="fused Triton kernel failed"):
        s.update(logp, ref, mask)
    s.update(logp, ref, mask)  # no second attempt, no second warning
    assert len(calls) == 1
    assert_moments_close(
        s.summary_vector().numpy(),
        moments(torch.cat([logp, logp]), torch.cat([ref, ref]), torch.cat([mask, mask])),
    )


def test_triton_backend_needs_triton(monkeypatch) -> None:
    monkeypatch.setattr(_triton, "available", lambda: False)
    with pytest.raises(RuntimeError, match="needs Triton"):
        KLStats(backend="triton")


# -- exact values without a clamp, against mpmath -----------------------------------------------
mpmath.mp.dps = 50
RTOL = 1e-4  # per-token values, and means against the float64 mean of mpmath values


@functools.cache
def _exact(l: float, clamp: float) -> tuple[float, ...]:
    """k1, k2, k3, kl_pq, r - 1, k2 - k3 of the float64 log-ratio ``l`` at 50 digits (as floats)."""
    x = mpmath.mpf(l)
    if clamp < math.inf:
        x = max(min(x, mpmath.mpf(clamp)), -mpmath.mpf(clamp))
    em1 = mpmath.expm1(x)
    k2, k3 = x * x / 2, em1 - x
    return tuple(float(v) for v in (-x, k2, k3, (em1 + 1) * x - em1, em1, k2 - k3))


def exact_log_ratio(logp: torch.Tensor, ref: torch.Tensor, clamp: float) -> np.ndarray:
    """``ref - logp`` as defined by the clamp: exactly (float64) without a clamp or above 30;
    rounded to float32 at clamps up to 30 (the float32 path's definition, as before)."""
    if clamp > 30:
        return (ref.double() - logp.double()).numpy()
    return (ref.float() - logp.float()).double().numpy()


def exact_moments(logp, ref, mask, clamp: float, threshold: float) -> np.ndarray:
    """The moments vector from mpmath per-token values (float64 means and M2 of them)."""
    l = exact_log_ratio(logp, ref, clamp)
    valid = np.ones(l.shape, bool) if mask is None else mask.numpy() != 0
    usable = np.isfinite(l)
    if clamp > 700:  # above l = 700 (e**l at float64's limit) a token counts as non-finite
        usable &= l <= 700
    good = valid & usable
    lz = l[good]
    n = len(lz)
    q = np.array([_exact(float(v), clamp) for v in lz]).reshape(n, 6)
    with np.errstate(over="ignore", invalid="ignore"):
        mean = (q / max(n, 1)).sum(0)  # sums of q / n: n q may overflow
        m2 = ((q - mean) ** 2).sum(0) if n else np.zeros(6)
    diag = [n, int((valid & ~usable).sum()), int((np.abs(lz) > threshold).sum())]
    return np.concatenate([[n], mean, m2, diag, [np.abs(lz).max() if n else 0.0]])


def assert_exact(got, want: np.ndarray, rtol: float = RTOL) -> None:
    """No NaN; counts exact, max |l| to float32 rounding; each mean within ``rtol`` of the
    quantity's RMS (of |mean| where M2 is beyond float64; infinite where the mean is); each M2
    within ``rtol`` plus the per-token errors' share, and ``inf`` exactly where the exact M2 is
    beyond float64."""
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any(), f"NaN in {got}"
    n = want[0]
    assert got[0] == n and list(got[13:16]) == list(want[13:16]), (
        f"counts {got[[0, 13, 14, 15]]} != {want[[0, 13, 14, 15]]}"
    )
    assert abs(got[16] - want[16]) <= 2**-24 * want[16], f"max|l| {got[16]} != {want[16]}"
    for j, name in enumerate(mom.QUANTITIES):
        mean, m2, g_mean, g_m2 = want[1 + j], want[7 + j], got[1 + j], got[7 + j]
        if math.isinf(mean):
            assert g_mean == mean and g_m2 == math.inf, f"{name}: {g_mean}, M2 {g_m2} (want {mean}, inf)"
            continue
        scale = abs(mean) if math.isinf(m2) else math.hypot(mean, math.sqrt(m2 / max(n, 1)))
        assert abs(g_mean - mean) <= rtol * scale, f"{name} mean {g_mean!r} vs {mean!r}"
        if math.isinf(m2):
            assert g_m2 == math.inf, f"{name} M2 {g_m2!r}, want inf (beyond float64)"
            continue
        with np.errstate(over="ignore"):  # values near 1e154 and above: no M2 to compare to
            e = np.float64(rtol * scale)
            tol = rtol * m2 + 2 * n * math.sqrt(m2 / max(n, 1)) * e + n * e * e
        assert abs(g_m2 - m2) <= tol, f"{name} M2 {g_m2!r} vs {m2!r}"


def _exact_case(name: str):
    return {**triton_cases.exact_cases(), **triton_cases.edge_cases()}[name]


@pytest.mark.parametrize("name", list(triton_cases.exact_cases()))
def test_exact_values_against_mpmath(results, name: str) -> None:
    logp, ref, mask, clamp, threshold = _exact_case(name)
    want = exact_moments(logp, ref, mask, clamp, threshold)
    got = results[name]
    assert_exact(got, want)
    if name.startswith("one_"):  # one token: its values, and M2 exactly 0
        assert got[0] == 1 and got[7:13] == [0.0] * 6
        if "_0" == name[-2:]:
            assert got[1:7] == [0.0] * 6  # l = 0: every quantity is exactly 0


@pytest.mark.parametrize("name", list(triton_cases.edge_cases()))
def test_edges_against_mpmath(results, name: str) -> None:
    logp, ref, mask, clamp, threshold = _exact_case(name)
    assert_exact(results[name], exact_moments(logp, ref, mask, clamp, threshold))


def test_plus700_never_nan_means_exact(results) -> None:
    k1, k2, k3, kl_pq, em1, diff = range(6)
    for name in ("plus700_scattered", "plus700_full_tiles"):
        got = np.array(results[name])
        assert np.isfinite(got[1:7]).all(), got  # the means stay finite (and exact: above)
        assert np.isfinite(got[7 + np.array([k1, k2])]).all()
        assert (got[7 + np.array([k3, kl_pq, em1, diff])] == math.inf).all()  # squares of 1e304
    # a tile full of l = 700: kl_pq's mean is 699 e**700 = 7.07e306, although n times it is not
    got = results["plus700_full_tiles"]
    assert got[1 + kl_pq] == pytest.approx(0.75 * _exact(700.0, math.inf)[kl_pq] + 0.25 * 0.0, rel=1e-3)
    # folded three times into one state (Chan's merge with infinite M2 and means near 1e304)
    logp, ref, mask, clamp, threshold = _exact_case("plus700_scattered")
    three = [torch.cat([t, t, t]) for t in (logp, ref, mask)]
    assert_exact(results["plus700_folded_thrice"], exact_moments(*three, clamp, threshold))


def test_beyond_float64_is_non_finite_not_nan(results) -> None:
    # l = 750 and 1e4 (e**l beyond float64) without a clamp: counted as non-finite and kept out
    # (as l = +inf), so every mean stays finite; l = -800 (r underflows) is exact and extreme.
    got = np.array(results["beyond_float64"])
    assert not np.isnan(got).any() and np.isfinite(got[1:7]).all()
    assert got[mom.NONFINITE] >= 2 and got[16] == 800.0 and got[15] == 1
    assert_exact(got, exact_moments(*_exact_case("beyond_float64")))


def test_extreme_count_is_exact_at_the_threshold(results) -> None:
    for thr in (20.0, 0.1):
        logp, ref, mask, clamp, threshold = _exact_case(f"threshold{thr:g}_clamp_inf")
        exact = np.abs(ref.double().numpy() - logp.double().numpy())
        got = results[f"threshold{thr:g}_clamp_inf"]
        assert got[mom.EXTREME] == (exact > thr).sum() > 0
        if thr == 20.0:  # the case can fail: float32 rounding of l crosses the threshold here
            rounded = np.abs((ref - logp).double().numpy())
            assert ((rounded > thr) != (exact > thr)).sum() > 0


def test_opt_in_clamp_counts_and_clamps(results) -> None:
    for name in ("clamp10", "clamp10_bf16"):
        logp, ref, mask, clamp, threshold = _exact_case(name)
        l = (ref.float() - logp.float()).double().numpy()[mask.numpy()]
        got = results[name]
        assert got[mom.EXTREME] == (np.abs(l) > 10.0).sum() > 0  # the clamped tokens
        clamped = np.clip(l, -10.0, 10.0)
        # k3's mean is the clamped one (a clamp of 10 cuts e**14 to e**10), not the exact one
        assert got[3] == pytest.approx(np.mean([_exact(v, math.inf)[2] for v in clamped]), rel=1e-5)
        assert got[3] < 0.9 * np.mean([_exact(v, math.inf)[2] for v in l])


# -- on a GPU ----------------------------------------------------------------------------------
@needs_cuda
@needs_triton
@pytest.mark.parametrize("name", [n for n in triton_cases.cases() if not n.startswith("n37_")])
def test_cuda_kernel_matches_float64(name: str) -> None:
    logp, ref, mask, clamp = triton_cases.cases()[name]
    dev = torch.device("cuda")
    m = mask.to(dev) if mask is not None else None
    got = _triton.fold(mom.empty(dev), logp.to(dev), ref.to(dev), m, clamp, clamp).cpu().numpy()
    assert_moments_close(got, moments(logp, ref, mask, clamp, extreme=clamp), rtol=4e-6)


@needs_cuda
@needs_triton
def test_cuda_auto_uses_the_kernel_without_sync_or_recompiles() -> None:
    dev = torch.device("cuda")
    s = KLStats()  # auto: the fused kernel on CUDA
    logp, ref, mask = (t.to(dev) for t in triton_cases._batch(4096, 5))
    s.update(logp, ref, mask)
    s.update(logp, ref)  # both variants compiled
    for m in (mask, None):  # and the float64 kernel's (launched when the clamp is above 30)
        _triton.fold(mom.empty(dev), logp, ref, m, math.inf, 20.0)
    torch.cuda.synchronize()
    kernels = (_triton._kernel(False), _triton._kernel_wide(False))
    before = _compiled_variants(*kernels)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for shape in ((3, 1000), (7, 333), (64, 512), (1, 65537), (1, 1), (5, 4097)):
            lp = -torch.rand(shape, device=dev)
            s.update(lp, lp + 0.05, torch.rand(shape, device=dev) < 0.8)
            s.update(lp, lp + 0.05)
        # no clamp and tokens at l = +-700 (the float64 kernel), then opt-in clamps: no compiles
        acc = mom.empty(dev)
        lp = -torch.rand(5000, device=dev)
        wide = lp + torch.where(torch.arange(5000, device=dev) % 1500 == 7, 700.0, 0.05)
        for clamp, threshold in ((math.inf, 20.0), (10.0, 10.0), (50.0, 20.0), (math.inf, 0.1)):
            acc = _triton.fold(acc, lp, wide, None, clamp, threshold)
            acc = _triton.fold(acc, lp - 700.0, lp, lp > -0.5, clamp, threshold)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert _compiled_variants(*kernels) == before, "a kernel recompiled for a batch shape or clamp"
    assert s.compute().tokens > 0
    assert not acc.isnan().any()


def _compiled_variants(*kernels) -> int:
    total = 0
    for kernel in kernels:
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton version does not expose its kernel cache")
        total += sum(len(c[0]) for c in caches.values())
    return total
