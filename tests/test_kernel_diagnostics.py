"""Diagnostics in the fused CPU kernel's pass (klm_fold_diag) against independent references.

The kernel's per-row, per-position-bucket and per-token-id k3 sums against float64 numpy, on
both bodies and over threads; and a Monitor whose diagnostics come from the kernel against one
on the eager torch path (backend="torch"), at extreme log-ratios (the double rescan), NaN, a
mask and ids outside the vocabulary.
"""

from __future__ import annotations

import ctypes
import math

import mpmath
import numpy as np
import pytest
import torch

from klmonitor import Monitor, _native
from klmonitor._layout import SIZE
from klmonitor._native import _selftest

pytestmark = pytest.mark.skipif(not _native.available(), reason="the fused CPU kernel is not built")


@pytest.mark.parametrize(("rows", "cols", "clamp", "workers"), [(1, 1, math.inf, 1), (4, 777, math.inf, 1), (4, 777, 3.0, 1), (9, 5003, math.inf, 2), (2, 9, math.inf, 2)])  # fmt: skip
def test_kernel_sums_equal_a_float64_reference(body: object, rows: int, cols: int, clamp: float, workers: int) -> None:  # fmt: skip
    lib = _native.load()
    assert lib is not None
    n = rows * cols
    logp, ref, mask = _selftest._batch(n, n)  # NaN, -inf, |l| = 61 and 25 among ordinary ones
    ids = np.random.default_rng(n).integers(-3, 400, n)
    lp, rp = logp.astype(np.float32), ref.astype(np.float32)
    rc, acc, got = _selftest.fold_diag_outputs(lib, lp, rp, 0, mask, ids, rows, clamp, 7, 390, workers, SIZE)
    want = _selftest.reference_diagnostics(lp.astype(np.float64), rp.astype(np.float64), mask, ids, rows, clamp, 7, 390)  # fmt: skip
    assert rc == 1
    for key, value in want.items():
        if key.endswith("count") or key == "outside":
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], value, rtol=2e-6, atol=1e-12, err_msg=key)
    assert acc[0] == want["row_count"].sum()  # the moments saw the same tokens


@pytest.mark.parametrize("tables", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2])
def test_scratch_tables_give_the_same_sums_and_are_left_zero(body: object, tables: int, workers: int) -> None:
    """The caller's token tables (Monitor keeps one set): same sums as tables allocated per
    call, whatever the tables-to-threads ratio, and zero again after the call."""
    lib = _native.load()
    assert lib is not None
    rows, cols, vocab = 6, 4001, 333
    n = rows * cols
    logp, ref, mask = _selftest._batch(n, n + 1)
    ids = np.random.default_rng(5).integers(-3, vocab + 40, n)
    lp, rp = logp.astype(np.float32), ref.astype(np.float32)
    scratch = np.zeros(tables * 2 * vocab)
    rc, acc, got = _selftest.fold_diag_outputs(lib, lp, rp, 0, mask, ids, rows, math.inf, 7, vocab, workers, SIZE, scratch)  # fmt: skip
    rc0, acc0, want = _selftest.fold_diag_outputs(lib, lp, rp, 0, mask, ids, rows, math.inf, 7, vocab, workers, SIZE)  # fmt: skip
    assert rc == rc0 == 1
    assert not scratch.any()
    for key in ("token_sum", "token_count", "outside"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-300, err_msg=key)
    ref64 = _selftest.reference_diagnostics(lp.astype(np.float64), rp.astype(np.float64), mask, ids, rows, math.inf, 7, vocab)  # fmt: skip
    np.testing.assert_array_equal(got["token_count"], ref64["token_count"])
    np.testing.assert_allclose(got["token_sum"], ref64["token_sum"], rtol=2e-6, atol=1e-12)


def test_bad_scratch_is_refused() -> None:
    lib = _native.load()
    assert lib is not None
    ids = torch.zeros(9, dtype=torch.int64)
    v = torch.zeros(2 * 5 + 1, dtype=torch.float64)
    req = _native.Diagnostics(9, ids=ids, token_sum=v[:5], token_count=v[5:10], outside=v[10:])
    req.scratch = torch.zeros(15, dtype=torch.float64)
    with pytest.raises(ValueError, match="multiple of 2 \\* vocab = 10"):
        req._struct()
    req.scratch = torch.zeros(10, dtype=torch.float32)
    with pytest.raises(ValueError, match="contiguous CPU float64"):
        req._struct()
    # NULL scratch with a table count: the kernel refuses (-1), doing nothing.
    lp = np.zeros(9, dtype=np.float32)
    out = {k: np.zeros(5) for k in ("token_sum", "token_count")}
    outside = np.zeros(1)
    ids64 = np.zeros(9, dtype=np.int64)
    d = _selftest.Diag(0, None, None, 0, None, None, ids64.ctypes.data, 5, out["token_sum"].ctypes.data,
                       out["token_count"].ctypes.data, outside.ctypes.data, None, 2)  # fmt: skip
    acc = np.zeros(SIZE)
    rc = lib.klm_fold_diag(lp.ctypes.data, lp.ctypes.data, 0, None, 9, math.inf, 20.0, 1, acc.ctypes.data, ctypes.byref(d))  # fmt: skip
    assert rc == -1 and not acc.any() and not out["token_count"].any()


def test_inconsistent_requests_are_refused() -> None:
    t = torch.zeros(6)
    with pytest.raises(ValueError, match="do not split into rows"):
        _native.Diagnostics(7, row_len=3)._struct()
    with pytest.raises(ValueError, match="has 2 elements, not 3"):
        _native.Diagnostics(9, row_len=3, row_sum=torch.zeros(2, dtype=torch.float64), row_count=t.double()[:2])._struct()  # fmt: skip
    with pytest.raises(ValueError, match="at most 64 buckets"):
        z = torch.zeros(65, dtype=torch.float64)
        _native.Diagnostics(9, row_len=3, bucket_sum=z, bucket_count=z)._struct()


def _monitors_agree(backend_batch: dict[str, torch.Tensor], clamp: float | None) -> None:
    out = {}
    for backend in ("auto", "torch"):
        m = Monitor(
            log_every_n_steps=1, by_position=True, position_rows=None, top_sequences=4, top_tokens=5,
            vocab_size=50, rules=[], backend=backend, clamp=clamp, histogram=False,
        )  # fmt: skip
        m.reset_window(1)
        m.update(**backend_batch)
        if backend == "auto":
            assert m.stats.backend == "auto" and m._pending is None
        res = m.step(2)
        assert res is not None
        out[backend] = res.summary
    a, b = out["auto"], out["torch"]
    assert a.by_position and len(a.by_position) == len(b.by_position)
    for x, y in zip(a.by_position, b.by_position, strict=True):
        assert (x.label, x.tokens) == (y.label, y.tokens)
        assert x.k3_mean == pytest.approx(y.k3_mean, rel=1e-6)
    assert len(a.top_sequences) == 4
    for s, t in zip(a.top_sequences, b.top_sequences, strict=True):
        assert (s.row, s.tokens, s.token_ids) == (t.row, t.tokens, t.token_ids)
        assert s.kl_sum == pytest.approx(t.kl_sum, rel=1e-6)
        # The kernel's per-token k3 is float64; the torch path's is too above a clamp of 30,
        # float32 at or below it.
        rel = 1e-9 if clamp is None or clamp > 30 else 2e-6
        assert s.token_kl == pytest.approx(t.token_kl, rel=rel, abs=1e-12)
    assert [(t.token_id, t.count) for t in a.top_tokens] == [(t.token_id, t.count) for t in b.top_tokens]
    assert [t.kl_sum for t in a.top_tokens] == pytest.approx([t.kl_sum for t in b.top_tokens], rel=1e-6)


@pytest.mark.parametrize("clamp", [None, 10.0])
def test_monitor_from_the_kernel_equals_the_torch_path(body: object, clamp: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(37, 301, generator=g) * 4
    rf = lp + 0.3 * torch.randn(37, 301, generator=g)
    rf[3, 7], rf[5, 100], rf[6, 2], rf[8, 9] = lp[3, 7] + 45, lp[5, 100] - 60, math.nan, lp[8, 9] + 800
    batch = {
        "logprobs": lp,
        "ref_logprobs": rf,
        "mask": torch.rand(37, 301, generator=g) < 0.9,
        "token_ids": torch.randint(0, 50, (37, 301), generator=g),
    }
    _monitors_agree(batch, clamp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_k3_matches_float64(body: object, dtype: torch.dtype) -> None:
    """``_native.token_k3``: k3 of the float log-ratio in float64, 0 where masked or unusable."""
    if not _native.reads_dtype(dtype):
        pytest.skip(f"this body does not read {dtype}")
    l_vals = [0.0, 1e-9, -1e-7, 0.05, -0.0999, 0.1, -0.1001, 1.0, -3.0, 29.0, 31.0, 45.0, -60.0, 699.0, 700.5,
              math.inf, -math.inf, math.nan, 2.0]  # fmt: skip
    ref = torch.tensor(l_vals, dtype=torch.float64)
    logp = torch.full_like(ref, -1.0)
    lp, rf = logp.to(dtype), (logp + ref).to(dtype)
    mask = torch.ones(len(l_vals), dtype=torch.bool)
    mask[-1] = False
    for clamp in (math.inf, 40.0, 10.0):
        got = _native.token_k3(lp, rf, mask, clamp)
        lr = (rf.float() - lp.float()).double()  # the float difference, as the moments take it
        want = []
        for i, l in enumerate(lr.tolist()):
            usable = math.isfinite(l) and (clamp <= 700 or l <= 700) and bool(mask[i])
            lz = max(-clamp, min(clamp, l)) if usable else 0.0
            with mpmath.workdps(50):
                want.append(float(mpmath.expm1(mpmath.mpf(lz)) - lz) if usable else 0.0)
        assert got.dtype == torch.float64 and got.shape == lp.shape
        assert got.tolist() == pytest.approx(want, rel=1e-13, abs=1e-300), clamp


def _entropy_batch(n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, generator=g) * 12 - 1e-3
    rf = lp + 0.5 * torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.85
    specials = [(-math.inf, 0.0), (-1.0, math.nan), (-900.0, -1.0), (-50.0, -2.0), (-1.0, math.inf)]
    for k, (a, b) in enumerate(specials):  # non-finite, l = 899 (unusable for KL, kept here), l = 48
        if k < n:
            lp[(k * 7919) % n], rf[(k * 7919) % n] = a, b
    return lp.to(dtype), rf.to(dtype), mask


@pytest.mark.parametrize("n", [1, 7, 513, 140_001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_entropy_in_the_kernel_equals_a_float64_reference(body: object, n: int, dtype: torch.dtype) -> None:
    """The kernel merges the batch's -log q moments (masked-in tokens with both log-probs
    finite, as EntropyMoments takes them) into a window that already holds some, by Chan."""
    if not _native.reads_dtype(dtype):
        pytest.skip(f"this body does not read {dtype}")
    lp, rf, mask = _entropy_batch(n, n, dtype)
    prior = torch.tensor([40.0, 3.5, 12.0], dtype=torch.float64)  # count, mean, M2 of a window so far
    for use_mask in (True, False):
        ent = prior.clone()
        req = _native.Diagnostics(n, entropy=ent)
        acc = np.zeros(SIZE)
        with _native.diagnosing(req):
            _native.fold(lp, rf, mask if use_mask else None, math.inf, 20.0, acc)
        assert req.done
        a, b = lp.double(), rf.double()
        ok = torch.isfinite(a) & torch.isfinite(b)
        if use_mask:
            ok &= mask
        x = (-a[ok]).numpy()
        na, ma, m2a = prior.tolist()
        nb = x.size
        if nb == 0:
            assert ent.tolist() == prior.tolist()
            continue
        mb, m2b = x.mean(), ((x - x.mean()) ** 2).sum()
        delta = mb - ma
        want = [na + nb, ma + delta * nb / (na + nb), m2a + m2b + delta**2 * na * nb / (na + nb)]
        assert ent[0].item() == want[0]
        assert ent[1:].tolist() == pytest.approx(want[1:], rel=1e-6, abs=1e-9), (use_mask, ent, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_monitor_entropy_from_the_kernel_equals_the_torch_path(body: object, dtype: torch.dtype) -> None:
    """summary.entropy the same from the kernel's pass and from EntropyMoments' torch ops (which
    summed bf16 in bf16 before: a mean off by 1e-3 relative)."""
    if not _native.reads_dtype(dtype):
        pytest.skip(f"this body does not read {dtype}")
    lp, rf, mask = _entropy_batch(37 * 301, 3, dtype)
    lp, rf, mask = lp.view(37, 301), rf.view(37, 301), mask.view(37, 301)
    out = {}
    for backend in ("auto", "torch"):
        m = Monitor(log_every_n_steps=1, rules=[], backend=backend, histogram=False, by_position=False, top_sequences=0)  # fmt: skip
        m.reset_window(1)
        m.update(lp, rf, mask)
        m.update(lp[:5], rf[:5])
        res = m.step(2)
        assert res is not None and res.summary.entropy is not None
        out[backend] = res.summary.entropy
    a, b = lp[:5].double(), rf[:5].double()
    x = torch.cat([-lp.double()[torch.isfinite(lp.double()) & torch.isfinite(rf.double()) & mask],
                   -a[torch.isfinite(a) & torch.isfinite(b)]])  # fmt: skip
    for got in out.values():
        assert got.mean == pytest.approx(x.mean().item(), rel=1e-7)
        assert got.var == pytest.approx(x.var().item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_k3_of_some_rows_equals_the_whole(body: object, dtype: torch.dtype) -> None:
    """The rows path (the top sequences' tokens): the same numbers as the whole batch's, read in
    place for the rows asked, in their order, first ``cols`` tokens; bad rows refused."""
    if not _native.reads_dtype(dtype):
        pytest.skip(f"this body does not read {dtype}")
    lp, rf, mask = _entropy_batch(9 * 301, 11, dtype)
    lp, rf, mask = lp.view(9, 301), rf.view(9, 301), mask.view(9, 301)
    whole = _native.token_k3(lp, rf, mask, math.inf)
    rows = torch.tensor([8, 0, 3, 3])
    for cols in (None, 256, 1, 0, 999):
        got = _native.token_k3(lp, rf, mask, math.inf, rows=rows, cols=cols)
        t = 301 if cols is None else min(cols, 301)
        assert got.shape == (4, t)
        assert torch.equal(got, whole[rows, :t])
    assert torch.equal(
        _native.token_k3(lp, rf, None, 5.0, rows=rows), _native.token_k3(lp, rf, None, 5.0)[rows]
    )
    for bad in ([9], [-1]):
        with pytest.raises(ValueError, match="rows must be in"):
            _native.token_k3(lp, rf, mask, math.inf, rows=torch.tensor(bad))
    with pytest.raises(ValueError, match="rows need"):
        _native.token_k3(lp.reshape(-1), rf.reshape(-1), None, math.inf, rows=rows)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_top_sequences_leave_the_masked_tokens_out_of_the_text(backend: str) -> None:
    """A right-padded completion: the padding's ids are kept as -1 and not decoded (its k3 is 0)."""
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(6, 40, generator=g) * 3
    rf = lp + 0.1 * torch.randn(6, 40, generator=g)
    rf[2, :25] += 1.5  # row 2 is the top sequence
    mask = torch.ones(6, 40, dtype=torch.bool)
    mask[:, 25:] = False  # padding
    ids = torch.randint(0, 26, (6, 40), generator=g)
    ids[:, 25:] = 26  # the pad id, decoded as "#"
    m = Monitor(log_every_n_steps=1, rules=[], backend=backend, histogram=False, top_sequences=2,
                decode=lambda t: "".join("abcdefghijklmnopqrstuvwxyz#"[i] for i in t))  # fmt: skip
    m.reset_window(1)
    m.update(lp, rf, mask, token_ids=ids)
    res = m.step(2)
    assert res is not None
    top = res.summary.top_sequences[0]
    assert top.row == 2 and top.tokens == 25
    assert top.token_ids is not None
    assert top.token_ids[:25] == ids[2, :25].tolist() and top.token_ids[25:] == [-1] * 15
    assert top.text is not None and "#" not in top.text
    assert top.text.replace("*", "") == "".join("abcdefghijklmnopqrstuvwxyz"[i] for i in ids[2, :25].tolist())
    assert top.token_kl[25:] == [0.0] * 15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "cols", "max_len", "with_ids", "with_mask"), [(40, 30, 16, True, True), (7, 9, 16, True, False), (3, 50, 64, False, True), (90, 33, 33, True, True)])  # fmt: skip
def test_top_sequences_in_c_equal_the_numpy_bookkeeping(
    body: object, dtype: torch.dtype, rows: int, cols: int, max_len: int, with_ids: bool, with_mask: bool
) -> None:
    """klm_top_sequences against TopSequences' numpy path over several batches: the same table,
    number for number, with ties (repeated rows), fewer rows than k, rows shorter and longer
    than max_len, no ids, no mask."""
    from klmonitor.diagnostics import TopSequences

    if not _native.reads_dtype(dtype):
        pytest.skip(f"this body does not read {dtype}")
    g = torch.Generator().manual_seed(rows * cols)
    a, b = TopSequences(5, max_len), TopSequences(5, max_len)
    for step in range(4):
        lp = (-torch.rand(rows, cols, generator=g) * 3).to(dtype)
        rf = (lp.float() + 0.4 * torch.randn(rows, cols, generator=g)).to(dtype)
        if rows > 2:
            lp[1], rf[1] = lp[0], rf[0]  # a tie
        mask = torch.rand(rows, cols, generator=g) < 0.8 if with_mask else None
        ids = torch.randint(0, 1000, (rows, cols), generator=g) if with_ids else None
        k3 = _native.token_k3(lp, rf, mask, math.inf)
        sums, counts = k3.sum(1), (mask.sum(1) if mask is not None else torch.full((rows,), cols)).double()
        assert a.update_kernel(sums, counts, lp, rf, mask, ids, math.inf, step, 0)
        b.update_sums(sums, counts, cols, lambda r, k3=k3: k3.index_select(0, r), ids, step, 0, mask)
        va, vb = a.vector(torch.device("cpu")), b.vector(torch.device("cpu"))
        assert torch.equal(va, vb), (step, (va - vb).abs().max())


def test_top_sequences_in_c_decline_what_they_do_not_read() -> None:
    from klmonitor.diagnostics import TopSequences

    ts = TopSequences(5, 8)
    lp = -torch.rand(4, 6)
    sums, counts = torch.ones(4, dtype=torch.float64), torch.full((4,), 6.0, dtype=torch.float64)
    assert not ts.update_kernel(
        sums, counts, lp, lp, None, torch.zeros(4, 6, dtype=torch.int32), math.inf, 1, 0
    )
    assert not ts.update_kernel(sums, counts, lp.t().contiguous().t(), lp, None, None, math.inf, 1, 0)
    assert not ts.update_kernel(sums, counts, lp.double(), lp.double(), None, None, math.inf, 1, 0)
    assert torch.equal(ts.vector(torch.device("cpu")), TopSequences(5, 8).vector(torch.device("cpu")))
