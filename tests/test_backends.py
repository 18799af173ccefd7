"""Every fast path gives the plain torch path's numbers (the compiled one included)."""

from __future__ import annotations

import math

import pytest
import torch

from klmonitor import KLStats, KLSummary


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = -5 * torch.rand(n, generator=g)
    ref = logp + 0.3 * torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.8
    ref[:: max(1, n // 7)] = float("nan")
    ref[1 :: max(1, n // 5)] = float("-inf")
    ref[2 :: max(1, n // 3)] = logp[2 :: max(1, n // 3)] + 30.0  # clamped
    return logp, ref, mask


def _fields(s: KLSummary) -> dict[str, float]:
    out = {"tokens": s.tokens, "nonfinite": s.nonfinite, "clamped": s.clamped, "max": s.max_abs_log_ratio}
    for name in ("k1", "k2", "k3", "kl_pq", "r_minus_1", "k2_minus_k3"):
        st = getattr(s, name)
        out[f"{name}.mean"], out[f"{name}.var"] = st.mean, st.var
    return out


def _close(a: dict[str, float], b: dict[str, float]) -> None:
    for key, va in a.items():
        vb = b[key]
        if key in ("tokens", "nonfinite", "clamped"):
            assert va == vb, key
        elif math.isnan(va):
            assert math.isnan(vb), key
        else:
            assert vb == pytest.approx(va, rel=1e-5, abs=1e-9), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_backend_matches_torch(dtype: torch.dtype) -> None:
    for n, seed in ((37, 0), (5000, 1), (70_001, 2)):
        logp, ref, mask = _data(n, seed)
        logp, ref = logp.to(dtype), ref.to(dtype)
        for m in (mask, None):
            plain, fused = KLStats(backend="torch"), KLStats(backend="compile")
            plain.update(logp, ref, m)
            fused.update(logp, ref, m)
            _close(_fields(plain.compute()), _fields(fused.compute()))


def test_compile_backend_empty_and_all_masked() -> None:
    s = KLStats(backend="compile")
    s.update(torch.zeros(0), torch.zeros(0))
    s.update(torch.zeros(8), torch.ones(8), mask=torch.zeros(8, dtype=torch.bool))
    out = s.compute()
    assert out.tokens == 0 and out.count == 0
