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
    ref[2 :: max(1, n // 3)] = logp[2 :: max(1, n // 3)] + 30.0  # extreme
    return logp, ref, mask


def _fields(s: KLSummary) -> dict[str, float]:
    out = {"tokens": s.tokens, "nonfinite": s.nonfinite, "extreme": s.extreme, "max": s.max_abs_log_ratio}
    for name in ("k1", "k2", "k3", "kl_pq", "r_minus_1", "k2_minus_k3"):
        st = getattr(s, name)
        out[f"{name}.mean"], out[f"{name}.var"] = st.mean, st.var
    return out


def _close(a: dict[str, float], b: dict[str, float]) -> None:
    for key, va in a.items():
        vb = b[key]
        if key in ("tokens", "nonfinite", "extreme"):
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


def test_compile_backend_does_not_recompile_as_batch_shapes_change() -> None:
    # Dynamic shapes: one graph with a mask and one without, whatever [B, T] is (B = 1
    # included: dynamo specialises sizes 0 and 1, and a flattened view would carry its base's).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    s, plain = KLStats(backend="compile"), KLStats(backend="torch")
    for i, shape in enumerate([(3, 1000), (7, 333), (1, 4097), (64, 50), (1, 999), (5, 4097)]):
        g = torch.Generator().manual_seed(i)
        logp = -3 * torch.rand(shape, generator=g)
        ref = logp + 0.2 * torch.randn(shape, generator=g)
        mask = torch.rand(shape, generator=g) < 0.7
        for m in (mask, None):
            s.update(logp, ref, m)
            plain.update(logp, ref, m)
    assert counters["stats"]["unique_graphs"] == 2
    _close(_fields(plain.compute()), _fields(s.compute()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "compile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_match_cpu_reference(backend: str, dtype: torch.dtype) -> None:
    # The GPU paths (eager chunks, and the fused compiled pass) give the CPU reference's
    # numbers, non-finite, extreme and masked tokens included.
    for n, seed in ((37, 0), (5000, 1), (2_000_003, 2)):
        logp, ref, mask = _data(n, seed)
        logp, ref = logp.to(dtype), ref.to(dtype)
        for m in (mask, None):
            plain, gpu = KLStats(backend="torch"), KLStats(backend=backend)
            plain.update(logp, ref, m)
            gpu.update(logp.cuda(), ref.cuda(), None if m is None else m.cuda())
            _close(_fields(plain.compute()), _fields(gpu.compute()))
