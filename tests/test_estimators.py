"""The elementwise estimators against a 50-digit reference, and their contracts."""

from __future__ import annotations

import functools

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from klmonitor import estimators as est

FUNCS = {
    "k1": est.k1,
    "k2": est.k2,
    "k3": est.k3,
    "kl_pq": est.kl_pq,
    "ratio_minus_one": est.ratio_minus_one,
}
NONNEG = ("k2", "k3", "kl_pq")
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def _exact(name: str, l: float) -> mpmath.mpf:
    """The per-sample value at the exactly representable input ``l``, to 50 digits."""
    with mpmath.workdps(50):
        x = mpmath.mpf(l)
        r = mpmath.exp(x)
        return {
            "k1": -x,
            "k2": x * x / 2,
            "k3": (r - 1) - x,
            "kl_pq": r * x - (r - 1),
            "ratio_minus_one": r - 1,
        }[name]


def _grid() -> np.ndarray:
    """|l| over 1e-7..20 on a log grid, both signs, plus the Taylor/direct boundary at 0.1."""
    mags = np.geomspace(1e-7, 20.0, 401)
    edge = np.array([0.0999999, 0.1, 0.1000001, 0.09, 0.11, 0.5, 1.0, 2.0, 19.999, 20.0])
    mags = np.concatenate([mags, edge])
    return np.concatenate([mags, -mags])


@functools.cache
def _reference(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """Inputs of ``dtype`` over the grid and the exact values at those inputs (float64)."""
    x = torch.tensor(_grid(), dtype=torch.float64).to(dtype)
    exact = np.array([float(_exact(name, float(v))) for v in x.double().tolist()])
    return x, exact


def _rel_err(got: torch.Tensor, exact: np.ndarray) -> np.ndarray:
    return np.abs(got.double().numpy() - exact) / np.abs(exact)


@pytest.mark.parametrize("name", list(FUNCS))
def test_float32_relative_error_over_whole_range(name: str) -> None:
    x, exact = _reference(name, torch.float32)
    got = FUNCS[name](x)
    assert got.dtype == torch.float32
    err = _rel_err(got, exact)
    worst = int(np.argmax(err))
    assert err[worst] <= 1e-4, f"{name}({float(x[worst])!r}): relative error {err[worst]:.3g}"


@pytest.mark.parametrize("name", list(FUNCS))
def test_float64_relative_error_over_whole_range(name: str) -> None:
    # The Taylor branch keeps terms up to l**7; its truncation below |l| = 0.1 is ~3.5e-10
    # relative for kl_pq, so float64 inputs get ~1e-9, far better than float32.
    x, exact = _reference(name, torch.float64)
    got = FUNCS[name](x)
    assert got.dtype == torch.float64
    err = _rel_err(got, exact)
    worst = int(np.argmax(err))
    assert err[worst] <= 1e-9, f"{name}({float(x[worst])!r}): relative error {err[worst]:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(FUNCS))
def test_half_inputs_are_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    # The half-precision input is exact; from there on everything is float32.
    x, exact = _reference(name, dtype)
    keep = x.float().abs() > 0  # fp16 flushes the smallest magnitudes of the grid to 0
    got = FUNCS[name](x)
    assert got.dtype == torch.float32
    expected = FUNCS[name](x.float())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    err = _rel_err(got[keep], exact[keep.numpy()])
    assert err.max() <= 1e-4


@pytest.mark.parametrize("name", NONNEG)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_nonnegative_on_grid_and_random(name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    random = torch.cat(
        [
            torch.randn(20_000, generator=gen, dtype=torch.float64) * scale
            for scale in (1e-8, 1e-4, 1e-2, 0.1, 1.0, 10.0)
        ]
    )
    grid = torch.tensor(_grid(), dtype=torch.float64)
    # Around the Taylor boundary, where the two branches meet.
    boundary = torch.linspace(0.09, 0.11, 4001, dtype=torch.float64)
    x = torch.cat([random, grid, boundary, -boundary, torch.zeros(3, dtype=torch.float64)]).to(dtype)
    got = FUNCS[name](x)
    assert got.dtype == est.compute_dtype(dtype)
    assert torch.isfinite(got).all()
    assert (got >= 0).all(), f"{name} negative at {x[got < 0][:5].tolist()}"


@pytest.mark.parametrize("name", NONNEG)
@pytest.mark.parametrize("l", [0.0, -0.0])
def test_nonnegative_estimators_vanish_at_zero(name: str, l: float) -> None:
    for dtype in (torch.float32, torch.float64):
        assert FUNCS[name](torch.tensor([l], dtype=dtype)).item() == 0.0


@given(
    arrays(
        np.float32,
        st.integers(1, 64),
        elements=st.floats(-80, 80, width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_nonnegative_and_finite_property(values: np.ndarray) -> None:
    # Up to |l| = 80 exp does not overflow float32 (KLStats widens to float64 above 30).
    x = torch.from_numpy(values)
    for name in NONNEG:
        got = FUNCS[name](x)
        assert torch.isfinite(got).all(), name
        assert (got >= 0).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_minus_k1_is_ratio_minus_one(dtype: torch.dtype) -> None:
    x = torch.tensor(_grid(), dtype=torch.float64).to(dtype)
    lhs = est.k3(x) - est.k1(x)
    rhs = est.ratio_minus_one(x)
    eps = torch.finfo(dtype).eps
    # k3 - k1 adds two rounded numbers: a few ulps of the larger term, plus k3's own error
    # (float64: the Taylor branch's ~1e-10 relative truncation).
    k3 = est.k3(x)
    tol = 4 * eps * (k3.abs() + x.abs()) + 1e-9 * k3.abs()
    assert ((lhs - rhs).abs() <= tol).all()


def test_k1_and_k2_are_exact_formulas() -> None:
    x = torch.tensor([-2.5, -1e-3, 0.0, 1e-3, 3.0])
    torch.testing.assert_close(est.k1(x), -x, rtol=0, atol=0)
    torch.testing.assert_close(est.k2(x), x * x / 2, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_raises_type_error(name: str, dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=str(dtype)):
        FUNCS[name](torch.zeros(3, dtype=dtype))


def test_log_ratio_is_reference_minus_policy() -> None:
    logp = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.bfloat16)
    ref = torch.tensor([-1.5, -2.0, -1.0], dtype=torch.bfloat16)
    lr = est.log_ratio(logp, ref)
    assert lr.dtype == torch.float32
    torch.testing.assert_close(lr, torch.tensor([-0.5, 0.0, 2.0]))
    lr64 = est.log_ratio(logp.double(), ref.double())
    assert lr64.dtype == torch.float64


def test_log_ratio_shape_mismatch_raises_value_error_naming_shapes() -> None:
    with pytest.raises(ValueError) as info:
        est.log_ratio(torch.zeros(2, 3), torch.zeros(2, 4))
    assert "(2, 3)" in str(info.value) and "(2, 4)" in str(info.value)


@pytest.mark.parametrize("which", ["logprobs", "ref_logprobs"])
def test_log_ratio_integer_input_raises_type_error(which: str) -> None:
    good, bad = torch.zeros(3), torch.zeros(3, dtype=torch.long)
    args = (bad, good) if which == "logprobs" else (good, bad)
    with pytest.raises(TypeError, match="int64"):
        est.log_ratio(*args)


def test_estimators_do_not_clamp_overflow() -> None:
    # The estimators are pure math in the input's dtype: exp overflows float32 above ~88.7 and
    # that shows (KLStats computes in float64 there; these functions must not hide it).
    assert torch.isinf(est.k3(torch.tensor([100.0]))).all()
    assert torch.isfinite(est.k3(torch.tensor([100.0], dtype=torch.float64))).all()


def test_estimator_names() -> None:
    assert est.ESTIMATORS == ("k1", "k2", "k3", "kl_pq")
