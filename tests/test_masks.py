"""Masks: bool or numeric 0/1 are accepted; any other value is an error detected on device.

A numeric mask value other than 0 or 1 (0.5, -1, 2, NaN, inf) cannot raise in ``update``
without a host sync, so the token is left out of the statistics and counted in
``summary.nonfinite``, where ``kl/nonfinite`` and the ``nonfinite`` alert show it; a
:class:`~klmonitor.Monitor` also counts them apart on device and names the mask in a warning
at the window's end.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.utils._python_dispatch import TorchDispatchMode

from klmonitor import KLStats, KLSummary, Monitor
from klmonitor.alerts import NonFiniteRule
from klmonitor.monitor import KLMonitorInputError

BACKENDS = ["auto", "torch"]
NUMERIC = [torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]


def summarise(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None, **kwargs: str) -> KLSummary:
    stats = KLStats(**kwargs)  # type: ignore[arg-type]
    stats.update(logp, ref, mask)
    return stats.compute()


def _same(a: KLSummary, b: KLSummary) -> bool:
    fa, fb = a.to_dict(), b.to_dict()
    return fa.keys() == fb.keys() and all(
        math.isclose(fa[k], fb[k], rel_tol=1e-12, abs_tol=1e-15) for k in fa
    )


def _batch(n: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=g) * 5
    ref = logp + 0.3 * torch.randn(n, generator=g)
    keep = torch.rand(n, generator=g) < 0.7
    return logp, ref, keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", NUMERIC)
def test_numeric_zero_one_masks_mean_the_same_as_bool(backend: str, dtype: torch.dtype) -> None:
    logp, ref, keep = _batch()
    want = summarise(logp, ref, keep, backend=backend)
    got = summarise(logp, ref, keep.to(dtype), backend=backend)
    assert _same(got, want) and got.nonfinite == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0, math.nan, math.inf, 1e-30])
def test_other_values_are_counted_as_errors_and_left_out(backend: str, level: str, bad: float) -> None:
    logp, ref, keep = _batch(2000)
    logp, ref, keep = logp.reshape(20, 100), ref.reshape(20, 100), keep.reshape(20, 100)
    mask = keep.double()
    mask[3, 5] = bad
    mask[7, 50:53] = bad
    invalid = torch.zeros_like(keep)
    invalid[3, 5] = True
    invalid[7, 50:53] = True
    got = summarise(logp, ref, mask, backend=backend, level=level)
    # Same statistics as a bool mask that leaves those tokens out, plus 4 counted errors.
    want = summarise(logp, ref, keep & ~invalid, backend=backend, level=level)
    assert got.nonfinite == 4 and want.nonfinite == 0
    assert got.tokens == want.tokens and got.count == want.count
    for name in ("k1", "k3", "r_minus_1"):
        assert getattr(got, name).mean == pytest.approx(getattr(want, name).mean, rel=1e-12, abs=1e-15)
    alert = NonFiniteRule().evaluate(got, 1)
    assert alert is not None and "mask value other than 0 or 1" in alert.message


def test_integer_mask_values_other_than_0_1_are_errors() -> None:
    logp, ref, keep = _batch(10)
    mask = keep.long()
    mask[0], mask[1] = 2, -1  # e.g. a summed or an inverted (1 - m with m in {0, 2}) mask
    got = summarise(logp, ref, mask)
    assert got.nonfinite == 2
    assert got.tokens == int(keep[2:].sum())


@given(
    values=arrays(
        np.float64,
        st.integers(1, 300),
        elements=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(allow_nan=True, allow_infinity=True)),
    ),
    backend=st.sampled_from(BACKENDS),
)
def test_property_any_numeric_mask(values: np.ndarray, backend: str) -> None:
    n = values.shape[0]
    g = torch.Generator().manual_seed(n)
    logp = -torch.rand(n, generator=g) * 3
    ref = logp + 0.2 * torch.randn(n, generator=g)
    mask = torch.from_numpy(values.copy()).float()
    got = summarise(logp, ref, mask, backend=backend)
    # float32 rounds some values to 0 or 1 (e.g. 1 + 1e-12) and large ones to inf: judge
    # them as float32 sees them.
    with np.errstate(over="ignore"):
        v32 = values.astype(np.float32)
    ones, zeros = v32 == 1.0, v32 == 0.0
    assert got.nonfinite == int((~(ones | zeros)).sum())
    assert got.tokens == int(ones.sum())
    want = summarise(logp, ref, torch.from_numpy(ones), backend=backend)
    assert got.k3.mean == pytest.approx(want.k3.mean, rel=1e-12, abs=1e-15) or (
        math.isnan(got.k3.mean) and math.isnan(want.k3.mean)
    )


class _SyncRecorder(TorchDispatchMode):
    """Records ops that copy a value to the host (or index with a boolean mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func.overloadpacket)
        if name in ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.equal"):
            self.bad.append(name)
        if name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.bad.append(f"{name} (boolean index)")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_mask_check_has_no_host_sync(backend: str, dtype: torch.dtype) -> None:
    logp, ref, keep = _batch(3000)
    mask = keep.to(dtype)
    mask[0] = 3
    stats = KLStats(backend=backend)
    stats.update(logp, ref, mask)
    with _SyncRecorder() as rec:
        stats.update(logp, ref, mask)
    assert rec.bad == []
    assert stats.compute().nonfinite == 2


def test_complex_mask_is_rejected_with_the_fix() -> None:
    logp, ref, keep = _batch(10)
    with pytest.raises(TypeError, match=r"bool mask or a numeric one holding 0 and 1"):
        KLStats().update(logp, ref, keep.to(torch.complex64))


def _soft(keep: torch.Tensor, every: int, value: float = 0.5) -> torch.Tensor:
    """A float 0/1 mask with ``value`` at every ``every``-th token (a soft mask's half weights)."""
    mask = keep.float()
    mask[::every] = value
    return mask


def _mask_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "the mask held" in str(w.message)]


def test_monitor_names_a_soft_mask_at_the_windows_end_once_without_a_host_sync() -> None:
    # Windows of 2 steps; 0.5s in the mask of steps 1, 2 and 4: the first window's end names
    # the mask with its count (not "NaN"), the second says nothing more (once per kind), and
    # update/step between logging steps copy nothing to the host.
    mon = Monitor(log_every_n_steps=2, histogram=False)
    batches = [_batch(seed=s) for s in range(4)]
    masks = [_soft(k, 7) if i in (0, 1, 3) else k.float() for i, (_, _, k) in enumerate(batches)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = []
        for step, ((logp, ref, _), mask) in enumerate(zip(batches, masks, strict=True), start=1):
            with _SyncRecorder() as rec:
                mon.update(logp, ref, mask)
                if step % 2:
                    assert mon.step(step) is None
            assert rec.bad == [], step
            if step % 2 == 0:
                assert len(_mask_warnings(caught)) == (step > 2), "named before the window's end"
                res = mon.step(step)
                assert res is not None
                results.append(res)
                assert len(_mask_warnings(caught)) == 1, _mask_warnings(caught)
    want = [int((m[::7] == 0.5).sum()) for m in masks]  # the 0.5s the helper planted, counted apart
    first, second = results
    assert first.summary.nonfinite == want[0] + want[1] and second.summary.nonfinite == want[3]
    (message,) = _mask_warnings(caught)
    assert f"the mask held {want[0] + want[1]} values other than 0 and 1" in message
    assert "ending at step 2" in message and "mask.bool()" in message and "not a weight" in message
    assert "nonfinite" in [a.rule for a in first.alerts]


def test_nan_log_probs_with_a_clean_numeric_mask_do_not_blame_the_mask() -> None:
    logp, ref, keep = _batch(seed=3)
    ref = ref.clone()
    ref[:5] = float("nan")
    mon = Monitor(log_every_n_steps=1, histogram=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon.update(logp, ref, torch.ones_like(logp))
        res = mon.step(1)
    assert res is not None and res.summary.nonfinite == 5
    assert _mask_warnings(caught) == []


def test_strict_names_the_mask_in_its_error() -> None:
    logp, ref, keep = _batch(seed=4)
    mon = Monitor(log_every_n_steps=1, strict=True)
    mon.update(logp, ref, _soft(keep, 10))
    with pytest.raises(KLMonitorInputError, match=r"the mask held 200 values other than 0 and 1"):
        mon.step(1)
