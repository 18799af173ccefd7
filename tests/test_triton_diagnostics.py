"""Diagnostics in the fused Triton kernels' pass, against independent references.

CPU (CI): ``tests/triton_diag_cases.py`` runs the kernels under ``TRITON_INTERPRET=1`` in a
subprocess (the interpreter must be chosen before Triton is imported); the per-row,
per-position-bucket and per-token-id k3 sums it returns are compared here with float64 numpy,
and a ``Monitor(backend="triton")``'s windows with a ``Monitor(backend="torch")``'s. The
kernels are also compiled for an sm_90 GPU (no device needed): with diagnostics on they must
compile, with them off hold no atomics. CUDA tests (skipped without a device) check the same
numbers on the GPU, and that a monitor with every diagnostic neither syncs nor recompiles.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from klmonitor import Monitor, _native, _triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_diag_cases as cases  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RTOL = 4e-6  # float32 k3 (and l rounded to float32 where |l| <= 30), summed in float64
needs_triton = pytest.mark.skipif(not _triton.available(), reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _triton.available()), reason="needs a CUDA device and Triton"
)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_diag_cases.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def reference(c: dict[str, Any]) -> dict[str, np.ndarray]:
    """The case's diagnostics in float64 numpy, from the definitions.

    l: the float64 difference of the inputs (above a clamp of 30), or its float32 rounding (the
    float32 kernel's l, at clamps up to 30); counted: unmasked, finite (and at most 700 without
    a clamp below it); k3 = expm1(l) - l of l clamped, 0 where not counted. Rows of ``row_len``
    tokens; bucket of position p: floor(log2(p)) for p >= 2 (else 0), at most ``buckets - 1``.
    """
    clamp = c["clamp"]
    with np.errstate(all="ignore"):
        if clamp > 30:
            l = c["ref"].double().numpy() - c["logp"].double().numpy()
        else:
            l = (c["ref"].float() - c["logp"].float()).double().numpy()
        good = np.isfinite(l) if c["mask"] is None else np.isfinite(l) & c["mask"].numpy()
        if clamp > 700:
            good &= l <= 700
        lc = np.clip(np.where(good, l, 0.0), -clamp, clamp)
        k3 = np.where(good, np.expm1(lc) - lc, 0.0)
    want: dict[str, np.ndarray] = {}
    t = c["row_len"]
    if t:
        k3r, gr = k3.reshape(-1, t), good.reshape(-1, t).astype(np.float64)
        if c["rows"]:
            want["row_sum"], want["row_count"] = k3r.sum(1), gr.sum(1)
        if c["buckets"]:
            idx = np.array([min(max(p.bit_length() - 1, 0), c["buckets"] - 1) for p in range(t)])
            want["bucket_sum"] = np.bincount(idx, k3r.sum(0), minlength=c["buckets"])
            want["bucket_count"] = np.bincount(idx, gr.sum(0), minlength=c["buckets"])
    if c["ids"] is not None:
        ids = c["ids"].numpy()
        inside = (ids >= 0) & (ids < c["vocab"])
        use = good & inside
        want["token_sum"] = np.bincount(ids[use], k3[use], minlength=c["vocab"])
        want["token_count"] = np.bincount(ids[use], minlength=c["vocab"]).astype(np.float64)
        want["outside"] = np.array([float((good & ~inside).sum())])
    return want


def assert_diagnostics(got: dict[str, Any], c: dict[str, Any], fill: float = 1.0) -> None:
    """``got`` (outputs that started at ``fill``) against :func:`reference`: counts exact."""
    want = reference(c)
    assert got["done"] and got["moments_unchanged"]
    assert set(want) == {k for k in cases.OUTPUTS if k in got}
    for key, value in want.items():
        g = np.array(got[key]) - fill
        if key.endswith("count") or key == "outside":
            np.testing.assert_array_equal(g, value, err_msg=key)
        else:
            np.testing.assert_allclose(g, value, rtol=RTOL, atol=1e-12, err_msg=key)


@needs_triton
@pytest.mark.parametrize("name", list(cases.kernel_cases()))
def test_interpreted_diagnostics_equal_a_float64_reference(interpreted: dict[str, Any], name: str) -> None:
    c = cases.kernel_cases()[name]
    assert_diagnostics(interpreted["kernel"][name], c)


def test_the_cases_reach_what_they_are_for() -> None:
    # each case holds what its name says: tiles the float64 kernel redoes, rows across tiles
    all_cases = cases.kernel_cases()
    c = all_cases["rows_span_tiles"]
    l = (c["ref"].double() - c["logp"].double()).numpy()
    tiles_above_30 = {i // c["block"] for i in np.flatnonzero(np.abs(l) > 30)}
    assert tiles_above_30 == {0, 2} and c["row_len"] % c["block"] and c["row_len"] > c["block"]
    assert reference(c)["row_count"][1] == c["mask"][1100:].sum() - 1  # l = 800 is not counted
    assert reference(all_cases["all_masked"])["row_count"].sum() == 0
    assert reference(all_cases["ids_outside"])["token_count"].sum() == 0
    assert reference(all_cases["ids_outside"])["outside"][0] > 0
    g = all_cases["float64_groups"]
    l = (g["ref"].double() - g["logp"].double()).numpy()
    assert {i // g["block"] // g["group"] for i in np.flatnonzero(np.abs(l) > 30)} == {0, 1}


def _close(a: list[float], b: list[float], what: str) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=RTOL, atol=1e-12, err_msg=what)


def assert_windows_agree(fused: list[dict[str, Any]], eager: list[dict[str, Any]]) -> None:
    """Windows of a monitor whose diagnostics came from the kernel against eager ones."""
    assert len(fused) == len(eager) == 2
    for a, b in zip(fused, eager, strict=True):
        assert all(a["done"]) and not any(b["done"]), (a["done"], b["done"])
        assert a["tokens_counted"] == b["tokens_counted"]
        assert a["k3_mean"] == pytest.approx(b["k3_mean"], rel=RTOL)
        _close(a["positions"], b["positions"], "position buckets")
        _close(a["tokens"], b["tokens"], "token table (sums, counts, outside)")
        _close(a["sequences"], b["sequences"], "top sequences (scores, counts, rows, ids, k3)")
        assert [x[:2] for x in a["by_position"]] == [x[:2] for x in b["by_position"]]
        assert [x[2] for x in a["by_position"]] == pytest.approx([x[2] for x in b["by_position"]], rel=RTOL)
        assert [x[:3] for x in a["top_sequences"]] == [x[:3] for x in b["top_sequences"]]
        for x, y in zip(a["top_sequences"], b["top_sequences"], strict=True):
            assert x[3] == pytest.approx(y[3], rel=RTOL)
            _close(x[4], y[4], "a top sequence's per-token k3")
        assert [x[:2] for x in a["top_tokens"]] == [x[:2] for x in b["top_tokens"]]
        assert [x[2] for x in a["top_tokens"]] == pytest.approx([x[2] for x in b["top_tokens"]], rel=RTOL)
    assert len(fused[0]["top_sequences"]) == 4 and len(fused[0]["by_position"]) >= 8
    assert fused[0]["tokens"][-1] > 0  # ids outside the vocabulary, counted apart


@needs_triton
def test_interpreted_monitor_equals_the_torch_path(interpreted: dict[str, Any]) -> None:
    assert_windows_agree(interpreted["monitor"], cases.monitor_windows("torch", "cpu"))


@needs_triton
def test_rows_beyond_the_kernels_int32_positions_are_left_to_the_caller(interpreted: dict[str, Any]) -> None:
    assert interpreted["declined"] == {"done": False, "untouched": True, "moments_unchanged": True}


def _diag(n: int, **parts: Any) -> _native.Diagnostics:
    return _native.Diagnostics(n, **parts)


def test_inconsistent_or_misplaced_outputs_are_refused() -> None:
    cpu, dummy = torch.device("cpu"), torch.zeros(1, dtype=torch.float64)
    z = lambda k, dt=torch.float64: torch.zeros(k, dtype=dt)  # noqa: E731

    def refused(d: _native.Diagnostics, n: int, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            _triton._diagnostic_args(d, n, cpu, dummy)

    refused(_diag(9), 8, "Diagnostics for 9 tokens, but the batch has 8")
    refused(_diag(7, row_len=3), 7, "7 tokens do not split into rows of 3")
    refused(_diag(9, row_len=3, row_sum=z(3)), 9, "row_sum and row_count go together")
    refused(_diag(9, row_sum=z(3), row_count=z(3)), 9, "with row_len > 0")
    refused(_diag(9, row_len=3, row_sum=z(2), row_count=z(3)), 9, "row_sum has 2 elements, not 3")
    refused(_diag(9, row_len=3, row_sum=z(3), row_count=z(3, torch.float32)), 9, "row_count must be a contiguous torch.float64 tensor on cpu")  # fmt: skip
    refused(_diag(9, row_len=3, row_sum=z(6)[::2], row_count=z(3)), 9, "got a non-contiguous")
    refused(_diag(9, row_len=3, bucket_sum=z(65), bucket_count=z(65)), 9, "at most 64 buckets")
    refused(_diag(9, bucket_sum=z(4), bucket_count=z(4)), 9, "with row_len > 0")
    refused(_diag(9, ids=z(9, torch.int64), token_sum=z(5), token_count=z(5)), 9, "ids, token_sum .* go together")  # fmt: skip
    refused(_diag(9, ids=z(9, torch.int32), token_sum=z(5), token_count=z(5), outside=z(1)), 9, "ids must be a contiguous torch.int64")  # fmt: skip
    refused(_diag(9, entropy=z(3)), 9, "entropy is computed by the C kernel only")
    meta = torch.zeros(3, dtype=torch.float64, device="meta")
    refused(
        _diag(9, row_len=3, row_sum=meta, row_count=z(3)), 9, r"on cpu \(the inputs' device\), got .* on meta"
    )
    ok = _diag(9, row_len=3, row_sum=z(3), row_count=z(3), bucket_sum=z(4), bucket_count=z(4))
    args, flags = _triton._diagnostic_args(ok, 9, cpu, dummy)
    assert flags == {"DIAG": True, "ROWS": True, "BUCKETS": 4, "TOKENS": False}
    assert args[0] is dummy and args[1] is ok.row_sum and args[-2:] == [3, 0]


@needs_triton
def test_fold_checks_the_request_before_launching() -> None:
    x = torch.zeros(9)
    bad = _diag(9, row_len=3, row_sum=torch.zeros(2, dtype=torch.float64), row_count=torch.zeros(3, dtype=torch.float64))  # fmt: skip
    from klmonitor import _moments as mom

    with pytest.raises(ValueError, match="row_sum has 2 elements"):
        _triton.fold(mom.empty(), x, x, None, math.inf, 20.0, interpret=True, diag=bad)
    assert not bad.done
    empty = _diag(0)
    assert _triton.fold(mom.empty(), x[:0], x[:0], None, math.inf, 20.0, diag=empty).equal(mom.empty())
    assert empty.done  # nothing to add


def _monitor(**kw: Any) -> Monitor:
    parts = {"by_position": True, "position_rows": None, "top_sequences": 3, "top_tokens": 5, **kw}
    return Monitor(log_every_n_steps=1, vocab_size=50, rules=[], histogram=False, **parts)


@needs_triton
def test_requests_go_to_the_kernel_that_takes_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    lp, ids = torch.zeros(4, 6), torch.zeros(4, 6, dtype=torch.int32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors: the Triton kernel under backend="triton"
    fused = _monitor(backend="triton")._kernel_request(lp, ids)
    assert (
        fused is not None and fused.row_len == 6 and fused.ids is not None and fused.ids.dtype == torch.int64
    )
    assert fused.scratch is None  # the Triton kernel scatters into the window's table itself
    assert fused.entropy is None  # nor does it compute the entropy: the monitor does
    assert _monitor(backend="triton", by_position=False, top_sequences=0, top_tokens=0)._kernel_request(lp, ids) is None  # fmt: skip
    m = _monitor(backend="triton")
    m.stats._triton_failed = True  # after a failed launch the eager path takes the batches
    assert m._kernel_request(lp, ids) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the eager path: no kernel to ask
    assert _monitor(backend="triton")._kernel_request(lp, ids) is None
    assert _monitor(backend="torch")._kernel_request(lp, ids) is None
    native = _monitor(backend="auto")._kernel_request(lp, ids)  # the C kernel where it is built
    assert (native is not None and native.scratch is not None) == _native.available()
    assert _monitor(backend="auto")._kernel_request(lp.double(), ids) is None  # float64: eager


def test_kernels_compile_for_a_gpu_without_one() -> None:
    # The compiled (not interpreted) kernels, for an H100/H200 (sm_90), built here without a
    # device: with every diagnostic they compile, with their atomics relaxed (no fences); with
    # none, the float32 kernel has no atomics (its code is the kernel's without diagnostics).
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton cannot compile ahead of time")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("Triton's NVIDIA backend is not installed")

    def ptx(kernel: Any, on: bool) -> str:
        sig = {}
        for name in kernel.__code__.co_varnames[: kernel.__code__.co_argcount]:
            ann = str(kernel.__annotations__.get(name, ""))
            sig[name] = "constexpr" if "constexpr" in ann else "*fp64" if name.endswith("_ptr") else "fp64" if "float" in ann else "i32"  # fmt: skip
        sig.update(logp_ptr="*fp32", ref_ptr="*fp32", mask_ptr="*u8", ids_ptr="*i64")
        if kernel is _triton._moments_kernel:
            sig.update({k: "fp32" for k in ("clamp", "threshold_lo", "near_lo", "near_hi", "redo_above")})
        consts = {"HAS_MASK": True, "BLOCK": _triton.BLOCK, "LIBDEVICE": True, "ROW": _triton._ROW,
                  "GROUP": _triton.GROUP, "DIAG": on, "ROWS": on, "BUCKETS": 12 * on, "TOKENS": on}  # fmt: skip
        consts = {k: v for k, v in consts.items() if sig.get(k) == "constexpr"}
        try:
            fn = triton.jit(kernel)
            compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))
        except RuntimeError as exc:  # e.g. no ptxas for this platform
            if "ptxas" in str(exc):
                pytest.skip(f"cannot compile for sm_90 here: {exc}")
            raise
        text: str = compiled.asm["ptx"]
        return text

    on, off = ptx(_triton._moments_kernel, True), ptx(_triton._moments_kernel, False)
    wide = ptx(_triton._wide_kernel, True)
    for code in (on, wide):
        assert "red.global.gpu.relaxed.add.f64" in code, "the atomics are fire-and-forget and relaxed"
        assert "fence" not in code and "membar" not in code and "atom.global" not in code
    assert "red.global" not in off and "atom.global" not in off


# -- on a GPU ----------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("name", list(cases.kernel_cases()))
def test_cuda_diagnostics_equal_a_float64_reference(name: str) -> None:
    assert_diagnostics(_cuda_results()[name], cases.kernel_cases()[name])


def _cuda_results() -> dict[str, Any]:
    if not hasattr(_cuda_results, "value"):
        _cuda_results.value = cases.kernel_results("cuda", interpret=False)  # type: ignore[attr-defined]
    value: dict[str, Any] = _cuda_results.value  # type: ignore[attr-defined]
    return value


@needs_cuda
def test_cuda_monitor_equals_the_torch_path() -> None:
    assert_windows_agree(cases.monitor_windows("auto", "cuda"), cases.monitor_windows("torch", "cpu"))


@needs_cuda
def test_cuda_monitor_diagnostics_without_sync_or_recompiles() -> None:
    dev = torch.device("cuda")
    m = _monitor(backend="auto", top_sequences=5)
    m.reset_window(1)

    def batch(shape: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator(device=dev).manual_seed(seed)
        lp = -torch.rand(shape, device=dev, generator=g)
        return {
            "logprobs": lp,
            "ref_logprobs": lp + 0.1 * torch.randn(shape, device=dev, generator=g),
            "mask": torch.rand(shape, device=dev, generator=g) < 0.9,
            "token_ids": torch.randint(0, 60, shape, device=dev, generator=g),
        }

    warm = batch((4, 300), 0)
    m.update(**warm)
    m.update(**{**warm, "mask": None})
    torch.cuda.synchronize()
    kernels = (_triton._kernel(False), _triton._kernel_wide(False))
    before = sum(len(c[0]) for k in kernels for c in getattr(k, "device_caches", {}).values())
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, shape in enumerate(((3, 1000), (7, 333), (64, 512), (1, 65537), (1, 1), (5, 4097))):
            m.update(**batch(shape, i + 1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    after = sum(len(c[0]) for k in kernels for c in getattr(k, "device_caches", {}).values())
    assert after == before, "a kernel recompiled for a batch shape"
    res = m.step(2)
    assert res is not None and res.summary.by_position and res.summary.top_tokens
    assert len(res.summary.top_sequences) == 5
