"""The control-variate estimate cv = k1 + lambda (r - 1), lambda from the window's own moments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from klmonitor import KLStats, Monitor


def _reference(l: np.ndarray) -> tuple[float, float, float]:
    """float64 numpy: mean, variance (Bessel) and lambda of k1 + lambda (r - 1), lambda = -Cov / Var."""
    k1, c = -l, np.expm1(l)
    cov = np.cov(k1, c)  # Bessel-corrected 2x2
    lam = -cov[0, 1] / cov[1, 1]
    x = k1 + lam * c
    # The residual variance of the least-squares fit: Var(k1) - Cov^2 / Var(r - 1).
    var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
    return float(x.mean()), float(var), float(lam)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("scale", [0.05, 0.5, 2.0])
def test_token_level_matches_float64(backend: str, scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(5000, generator=g, dtype=torch.float64) - 3
    ref = logp + scale * torch.randn(5000, generator=g, dtype=torch.float64) - scale**2 / 2
    s = KLStats(backend=backend)
    s.update(logp.float(), ref.float())
    got = s.compute()
    l = (ref.float() - logp.float()).double().numpy()
    mean, var, lam = _reference(l)
    assert got.cv_lambda == pytest.approx(lam, rel=1e-4, abs=1e-6)
    assert got.cv.mean == pytest.approx(mean, rel=1e-4, abs=1e-9)
    assert got.cv.var == pytest.approx(var, rel=1e-3)
    assert got.cv.stderr == pytest.approx(math.sqrt(var / l.size), rel=1e-3)
    # Never noisier than the two estimators it interpolates (least squares).
    assert got.cv.var <= got.k1.var and got.cv.var <= got.k3.var
    assert got.kl == got.cv.mean


def test_sequence_level_is_over_sequence_sums() -> None:
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(300, 40, generator=g) - 2
    # E[r] = 1 (- 0.3^2 / 2), as under the policy; without it r - 1 sits 12 stderr from 0 and cv is k1.
    ref = logp + 0.3 * torch.randn(300, 40, generator=g) - 0.045
    mask = torch.rand(300, 40, generator=g) > 0.2
    s = KLStats(level="sequence")
    s.update(logp, ref, mask)
    got = s.compute()
    l = (ref - logp).double().numpy()
    m = mask.numpy()
    k1 = np.where(m, -l, 0).sum(1)
    c = np.where(m, np.expm1(l), 0).sum(1)
    cov = np.cov(k1, c)
    lam = -cov[0, 1] / cov[1, 1]
    assert got.cv_lambda == pytest.approx(lam, rel=1e-4)
    assert got.cv.mean == pytest.approx(float((k1 + lam * c).mean()), rel=1e-4)
    assert got.cv.var == pytest.approx(cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1], rel=1e-3)


def test_at_the_reference_cv_is_k3() -> None:
    # Exact copy: every value 0. Differences at float32 rounding: the covariance is rounding,
    # lambda stays 1 and cv is k3, never a noisy mix.
    a = torch.randn(1000, generator=torch.Generator().manual_seed(3)) - 3
    s = KLStats()
    s.update(a, a)
    got = s.compute()
    assert (got.cv.mean, got.cv.var, got.cv_lambda) == (0.0, 0.0, 1.0)
    s = KLStats()
    s.update(a, a + 1e-6 * torch.randn(1000, generator=torch.Generator().manual_seed(4)))
    got = s.compute()
    assert got.cv_lambda == 1.0 and got.cv.mean == got.k3.mean and got.cv.var == got.k3.var
    assert got.cv.mean >= 0


def test_too_few_samples_fall_back_to_k3() -> None:
    s = KLStats()
    s.update(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]))
    got = s.compute()
    assert got.cv_lambda == 1.0 and got.cv.mean == got.k3.mean


def test_logged_by_the_monitor() -> None:
    seen: list[dict[str, float]] = []
    mon = Monitor(log_every_n_steps=1, sinks=lambda metrics, step: seen.append(metrics))
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(4, 64, generator=g) - 2
    mon.update(logp, logp + 0.5 * torch.randn(4, 64, generator=g))
    res = mon.step(1)
    assert res is not None
    m = seen[-1]
    for key in ("kl/cv/mean", "kl/cv/std", "kl/cv/var", "kl/cv/stderr", "kl/cv/lambda"):
        assert key in m
    assert m["kl/cv/mean"] == res.summary.cv.mean


def test_reference_mass_the_window_never_samples_gives_k1() -> None:
    # The reference puts 10 % of its mass on tokens the policy never emits: every sampled token
    # has r = 0.9, so the window's mean of r - 1 is -0.1 with a standard error of float32
    # rounding, where it is 0 under the policy. The exact KL(q || p) is -log 0.9 (= k1, whose
    # values do not involve r). Fitting lambda on the rounding gave cv = -0.0049 +- 4e-11: a
    # negative KL 2.6e9 standard errors from the truth. cv falls back to k1 (lambda 0).
    g = torch.Generator().manual_seed(6)
    logq = -0.1 - 10 * torch.rand(32768, generator=g)
    got = KLStats()
    got.update(logq, logq + math.log(0.9))
    s = got.compute()
    assert abs(s.r_minus_1.z) > 1e6
    assert s.cv_lambda == 0.0
    assert (s.cv.mean, s.cv.var, s.cv.stderr) == (s.k1.mean, s.k1.var, s.k1.stderr)
    assert s.kl == pytest.approx(-math.log(0.9), rel=2e-6)


def test_mean_of_r_minus_1_far_from_0_gives_k1_at_sequence_level() -> None:
    g = torch.Generator().manual_seed(7)
    logq = -0.1 - 10 * torch.rand(64, 32, generator=g)
    s = KLStats(level="sequence")
    s.update(logq, logq + math.log(0.9) + 1e-3 * torch.randn(64, 32, generator=g))
    got = s.compute()
    assert got.cv_lambda == 0.0 and got.cv.mean == got.k1.mean
    assert got.cv.mean == pytest.approx(-32 * math.log(0.9), rel=1e-3)


def test_a_window_carried_by_one_huge_ratio_is_k1_and_stable_under_merging() -> None:
    # One token at l = +25 (r = 7e10): k3 is almost r - 1, the residual variance is the difference
    # of two numbers near 1e19 that the moments cannot resolve, and the best lambda is ~3e-10.
    # cv is k1 then, and two ways of merging the same tokens agree (the DDP test's failure).
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(8, 50, generator=g) * 10
    rf = lp + 0.2 * torch.randn(8, 50, generator=g)
    rf[-1, -1] = lp[-1, -1] + 25.0
    whole = KLStats()
    whole.update(lp, rf)
    parts = KLStats()
    parts.update(lp[:3], rf[:3])
    parts.update(lp[3:], rf[3:])
    a, b = whole.compute(), parts.compute()
    assert a.cv_lambda == b.cv_lambda == 0.0
    assert (a.cv.mean, a.cv.var) == (a.k1.mean, a.k1.var)
    # (float32 per-token values: the two splits agree to float32 rounding, as k1 itself does)
    assert b.cv.mean == pytest.approx(a.cv.mean, rel=1e-6) and b.cv.var == pytest.approx(a.cv.var, rel=1e-6)
