"""The fused Triton kernel: numerics in CI through Triton's interpreter (CPU), and on CUDA.

CPU: ``tests/triton_cases.py`` runs the kernel under ``TRITON_INTERPRET=1`` in a subprocess
(the interpreter must be chosen before Triton is imported); its results are compared here with
an independent float64 reference and with the eager torch path. CUDA tests (skipped without a
device) check the same numbers on the GPU, that ``update`` does not synchronise, and that the
kernel compiles once per dtype and mask-or-not, not per batch shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


@needs_triton
@pytest.mark.parametrize("name", list(triton_cases.cases()))
def test_interpreted_kernel_matches_float64_and_eager(interpreted, name: str) -> None:
    logp, ref, mask, clamp = triton_cases.cases()[name]
    got = np.array(interpreted[name])
    assert_moments_close(got, moments(logp, ref, mask, clamp), rtol=4e-6)
    eager = mom.token_fold_torch(mom.empty(), logp, ref, mask, clamp).numpy()
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
    assert not _triton.supports(x, x, 20.0, interpret=False)  # CPU tensors without the interpreter
    assert not _triton.supports(x.double(), x, 20.0, interpret=True)  # float64: eager path
    assert not _triton.supports(x, x, 31.0, interpret=True)  # clamp > 30: eager float64 rows
    assert not _triton.supports(x[:0], x[:0], 20.0, interpret=True)


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


# -- on a GPU ----------------------------------------------------------------------------------
@needs_cuda
@needs_triton
@pytest.mark.parametrize("name", [n for n in triton_cases.cases() if not n.startswith("n37_")])
def test_cuda_kernel_matches_float64(name: str) -> None:
    logp, ref, mask, clamp = triton_cases.cases()[name]
    dev = torch.device("cuda")
    m = mask.to(dev) if mask is not None else None
    got = _triton.fold(mom.empty(dev), logp.to(dev), ref.to(dev), m, clamp).cpu().numpy()
    assert_moments_close(got, moments(logp, ref, mask, clamp), rtol=4e-6)


@needs_cuda
@needs_triton
def test_cuda_auto_uses_the_kernel_without_sync_or_recompiles() -> None:
    dev = torch.device("cuda")
    s = KLStats()  # auto: the fused kernel on CUDA
    logp, ref, mask = (t.to(dev) for t in triton_cases._batch(4096, 5))
    s.update(logp, ref, mask)
    s.update(logp, ref)  # both variants compiled
    torch.cuda.synchronize()
    kernel = _triton._kernel(False)
    before = _compiled_variants(kernel)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for shape in ((3, 1000), (7, 333), (64, 512), (1, 65537), (1, 1), (5, 4097)):
            lp = -torch.rand(shape, device=dev)
            s.update(lp, lp + 0.05, torch.rand(shape, device=dev) < 0.8)
            s.update(lp, lp + 0.05)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert _compiled_variants(kernel) == before, "the kernel recompiled for a new batch shape"
    assert s.compute().tokens > 0


def _compiled_variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton version does not expose its kernel cache")
    return sum(len(c[0]) for c in caches.values())
