"""The rollout check's ratio range in one C pass (klm_ratio_range) against independent references.

The kernel's min, max and count of |l| > ln 2 against numpy (float32 log-ratios, as torch takes
them) on both bodies, every element type, masked and not, across vector tails and threads; then
a Monitor whose rollout check runs in C against one on the eager torch path (backend="torch").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from klmonitor import Monitor, _native
from klmonitor import estimators as est
from klmonitor._native import _selftest
from klmonitor.diagnostics import RatioRange

pytestmark = pytest.mark.skipif(not _native.available(), reason="the fused CPU kernel is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _torch_range(logp: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    lr = est.log_ratio(logp, ref)
    ok = torch.isfinite(lr) if valid is None else torch.isfinite(lr) & valid
    rr = RatioRange()
    rr.update(lr, ok)
    return rr.vector(torch.device("cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 4097, 200_003])
@pytest.mark.parametrize("masked", [True, False])
def test_kernel_equals_numpy_and_torch(body: object, dtype: torch.dtype, n: int, masked: bool) -> None:
    logp64, ref64, mask_np = _selftest._batch(n, n + 3)  # NaN, -inf, |l| = 61 and 25 among ordinary ones
    logp = torch.from_numpy(logp64).to(dtype)
    ref = torch.from_numpy(ref64).to(dtype)
    mask = torch.from_numpy(mask_np) if masked else None
    got = _native.ratio_range(logp, ref, mask)
    assert got is not None
    want = _selftest.reference_ratio_range(
        logp.double().numpy(), ref.double().numpy(), mask_np if masked else np.ones(n, dtype=bool)
    )
    np.testing.assert_array_equal(got.numpy(), want)
    assert torch.equal(got, _torch_range(logp, ref, mask))


def test_threads_and_count_beyond_a_lane(body: object) -> None:
    """Every token counted (|l| = 1 > ln 2), over threads: the count is exact, min and max are the planted ones."""
    n = 3 * (1 << 16) + 5
    logp = torch.zeros(n)
    ref = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    ref[12345], ref[n - 1] = 40.0, -700.0
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = _native.ratio_range(logp, ref, None)
    finally:
        torch.set_num_threads(before)
    assert got is not None
    assert got.tolist() == [-700.0, 40.0, float(n)]


def test_nothing_usable_gives_the_empty_range(body: object) -> None:
    logp = torch.tensor([0.0, float("nan"), -float("inf"), 0.0] * 5)
    ref = torch.tensor([float("inf"), 0.0, -float("inf"), 1.0] * 5)
    mask = torch.tensor([True, True, True, False] * 5)  # the only finite token is masked out
    got = _native.ratio_range(logp, ref, mask)
    assert got is not None and got.tolist() == [math.inf, -math.inf, 0.0]
    assert torch.equal(got, _torch_range(logp, ref, mask))


def test_declines_what_c_does_not_read() -> None:
    x = torch.zeros(4, 6)
    assert _native.ratio_range(x.double(), x.double(), None) is None  # float64
    assert _native.ratio_range(x, x.double(), None) is None  # float64 on one side
    assert _native.ratio_range(x, x, torch.ones(4, 6)) is None  # a float mask
    assert _native.ratio_range(x, x[:, :3].contiguous(), None) is None  # shapes differ


@pytest.mark.parametrize(("a", "b"), [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_mixed_dtypes_and_strided_inputs_equal_torch(body: object, a: torch.dtype, b: torch.dtype) -> None:
    """Mixed dtypes are widened to float32 as torch's log-ratio widens them; strided inputs are copied."""
    g = torch.Generator().manual_seed(3)
    base = -4 * torch.rand(300, 70, generator=g)
    logp = base.to(a).t()  # [70, 300], not contiguous
    ref = (base + torch.randn(300, 70, generator=g)).to(b).t()
    mask = (torch.rand(300, 70, generator=g) < 0.7).t()
    assert not logp.is_contiguous()
    got = _native.ratio_range(logp, ref, mask)
    assert got is not None
    assert torch.equal(got, _torch_range(logp, ref, mask))


def _monitor_rollout(backend: str, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float, float]:
    mon = Monitor(log_every_n_steps=10**6, histogram=False, rules=[], backend=backend)
    for b in batches:
        mon.update(b["logp"], b["ref"], b["mask"], rollout_logprobs=b["rollout"])
    res = mon.flush(1)
    assert res is not None and res.summary.rollout is not None
    r = res.summary.rollout
    return r.ratio_min, r.ratio_max, r.ratio_outside


@pytest.mark.parametrize("dtype", DTYPES)
def test_monitor_rollout_range_equals_the_torch_path(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    batches = []
    for k in range(3):
        logp = (-4 * torch.rand(16, 300, generator=g)).to(dtype)
        rollout = (logp.float() + 0.3 * torch.randn(16, 300, generator=g)).to(dtype)
        rollout[k, 7] = logp[k, 7].float() - 3.0  # ratio e**3 beyond the others
        rollout[k, 9] = float("nan")  # non-finite: left out of the range
        batches.append(
            {"logp": logp, "ref": logp, "rollout": rollout, "mask": torch.rand(16, 300, generator=g) < 0.9}
        )
    native = _monitor_rollout("auto", batches)
    eager = _monitor_rollout("torch", batches)
    assert native == eager
    assert native[1] == pytest.approx(math.exp(3.0), rel=0.02)
