"""The native kernel's self-test: its numbers against a float64 numpy reference.

Plain numpy and ctypes, no torch and no other klmonitor module, so that the loader can run it
in a short-lived child process (``python -c``, see ``klmonitor._native._check_in_child``)
before it loads the library into the training process: a damaged library that crashes or
hangs there kills only the child. The layout module is passed in (the child loads
``klmonitor/_layout.py`` by its path, without importing the package).
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

#: The interface this module speaks (``klm_abi_version`` in moments.c).
ABI_VERSION = 6
# Element types the kernel knows (codes as in moments.c).
FLOAT32, BFLOAT16, FLOAT16 = 0, 1, 2
#: Batch sizes of the sweep: one token, a scalar tail only, one vector, the float body's block
#: of 512 and its neighbours, several blocks plus a tail, and a batch split over threads.
SIZES = (1, 7, 8, 511, 512, 513, 4097, 140_001)
#: The split of the largest batch: this many slices (OpenMP threads, or C calls per slice).
SPLIT_WORKERS = 3
#: Most position buckets ``klm_fold_diag`` sums (``KLM_MAX_BUCKETS`` in moments.c).
MAX_BUCKETS = 64


class Diag(ctypes.Structure):
    """``klm_diag`` of moments.c: what ``klm_fold_diag`` adds to (NULL, 0: that part is off)."""

    _fields_ = [
        ("row_len", ctypes.c_int64),
        ("row_sum", ctypes.c_void_p),
        ("row_count", ctypes.c_void_p),
        ("buckets", ctypes.c_int64),
        ("bucket_sum", ctypes.c_void_p),
        ("bucket_count", ctypes.c_void_p),
        ("ids", ctypes.c_void_p),
        ("vocab", ctypes.c_int64),
        ("token_sum", ctypes.c_void_p),
        ("token_count", ctypes.c_void_p),
        ("outside", ctypes.c_void_p),
        ("scratch", ctypes.c_void_p),
        ("scratch_tables", ctypes.c_int64),
        ("entropy", ctypes.c_void_p),
    ]


def bind(lib: ctypes.CDLL) -> None:
    """Declare the kernel's functions (AttributeError where the library lacks one)."""
    p, i64, f32, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures: dict[str, tuple[list[Any], Any]] = {
        "klm_abi_version": ([], cint),
        "klm_source_sha256": ([], ctypes.c_char_p),
        "klm_select_isa": ([cint], cint),
        "klm_cpu_has_avx2": ([], cint),
        "klm_vector_isa": ([], cint),
        "klm_openmp": ([], cint),
        "klm_sample_shift": ([p, p, cint, p, i64, f32, p], None),
        "klm_token_moments": ([p, p, cint, p, i64, i64, p, f32, f32, p], None),
        "klm_fold": ([p, p, cint, p, i64, f32, f32, cint, p], cint),
        "klm_fold_diag": ([p, p, cint, p, i64, f32, f32, cint, p, ctypes.POINTER(Diag)], cint),
        "klm_fold_sums": ([p, p, p], None),
        "klm_token_k3": ([p, p, cint, p, i64, f32, p], None),
        "klm_rows_k3": ([p, p, cint, p, i64, i64, p, i64, f32, p], None),
        "klm_top_rows": ([p, p, i64, i64, ctypes.c_double, p], i64),
        "klm_top_sequences": (
            [p, i64, i64, p, p, i64, i64, p, p, cint, p, p, f32, ctypes.c_double, ctypes.c_double, p],
            i64,
        ),
        "klm_ratio_range": ([p, p, cint, p, i64, cint, p], None),
        "klm_vector_size": ([], cint),
        "klm_reads_dtype": ([cint], cint),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res


def reference_moments(
    logp: np.ndarray, ref: np.ndarray, mask: np.ndarray, clamp: float, threshold: float, layout: Any
) -> np.ndarray:
    """The moments vector of one batch in float64 numpy, as the kernel defines it.

    ``logp`` and ``ref`` hold the inputs' values as float64, ``mask`` is bool. Validity, the
    extreme count and max |l| follow the float32 log-ratio (as the kernel's); the quantities
    follow the float64 one, clamped to +-clamp.
    """
    with np.errstate(all="ignore"):
        l32 = ref.astype(np.float32) - logp.astype(np.float32)
        a32 = np.abs(l32.astype(np.float64))
        good = mask & np.isfinite(l32)
        lc = np.clip((ref - logp)[good], -clamp, clamp)
        em1 = np.expm1(lc)
    k2, k3 = 0.5 * lc * lc, em1 - lc
    q = np.stack([-lc, k2, k3, em1 * lc - k3, em1, k2 - k3])
    out = np.zeros(layout.SIZE, dtype=np.float64)
    out[layout.COUNT] = n = good.sum()
    out[layout.TOKENS] = n
    out[layout.NONFINITE] = (mask & ~np.isfinite(l32)).sum()
    if n:
        out[layout.MEAN] = q.mean(axis=1)
        out[layout.M2] = ((q - out[layout.MEAN][:, None]) ** 2).sum(axis=1)
        out[layout.EXTREME] = (a32[good] > threshold).sum()
        out[layout.MAX_ABS] = a32[good].max()
    return out


def _as_dtype(x: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """(the kernel's input array of ``x`` in element type ``code``, its values as float64)."""
    f32 = np.ascontiguousarray(x, dtype=np.float32)
    if code == FLOAT32:
        return f32, f32.astype(np.float64)
    if code == FLOAT16:
        with np.errstate(over="ignore"):
            h = f32.astype(np.float16)
        return h, h.astype(np.float64)
    u = f32.view(np.uint32).astype(np.uint64)  # bf16: float32 rounded to its top 16 bits (ties to even)
    b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    b = np.where(np.isnan(f32), np.uint16(0x7FC0), b)
    return b, (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A masked batch of ``n`` tokens through every branch of the kernel's math.

    Ordinary log-ratios, some near 0 (the series branch), a few NaN and inf tokens and a few
    beyond the extreme threshold and beyond 30 (the double rescan).
    """
    rng = np.random.default_rng(seed)
    logp = -8.0 * rng.random(n)
    ref = logp + 2.5 * rng.standard_normal(n)
    near = rng.random(n) < 0.2
    ref[near] = logp[near] + 0.3 * rng.standard_normal(int(near.sum()))
    mask = rng.random(n) < 0.8
    if n >= 7:
        ref[3], logp[5] = np.nan, -np.inf
        ref[n // 2] = logp[n // 2] - 61.0
        ref[n - 2] = logp[n - 2] - 25.0
        mask[[n // 2, n - 2]] = True
    return logp, ref, mask


def _split(lib: ctypes.CDLL, lp: np.ndarray, rp: np.ndarray, code: int, mask: np.ndarray, clamp: float, threshold: float, acc: np.ndarray) -> None:  # fmt: skip
    """What the loader does without OpenMP: one shift, the shifted sums of each slice, one merge."""
    n = lp.size
    shift = np.zeros(6, dtype=np.float32)
    lib.klm_sample_shift(lp.ctypes.data, rp.ctypes.data, code, mask.ctypes.data, n, clamp, shift.ctypes.data)
    parts = np.zeros((SPLIT_WORKERS, 16), dtype=np.float64)
    bounds = [n * k // SPLIT_WORKERS for k in range(SPLIT_WORKERS + 1)]
    for k in range(SPLIT_WORKERS):
        lib.klm_token_moments(
            lp.ctypes.data, rp.ctypes.data, code, mask.ctypes.data, bounds[k], bounds[k + 1],
            shift.ctypes.data, clamp, threshold, parts[k].ctypes.data,
        )  # fmt: skip
    sums = parts.sum(axis=0)
    sums[15] = parts[:, 15].max()
    lib.klm_fold_sums(acc.ctypes.data, shift.ctypes.data, sums.ctypes.data)


def _compare(got: np.ndarray, want: np.ndarray, layout: Any) -> bool:
    """Whether ``got`` matches the reference ``want``.

    Exact counts, max |l| to 1e-6, means and M2 within 1e-4 of the samples' scale (the kernel
    agrees to ~1e-6; a broken build is off by far more).
    """
    checks = [layout.COUNT, layout.TOKENS, layout.NONFINITE, layout.EXTREME]
    if not np.array_equal(got[checks], want[checks]):
        return False
    count = want[layout.COUNT]
    if count == 0:
        return True
    scale = np.sqrt(want[layout.MEAN] ** 2 + want[layout.M2] / count)
    return bool(
        abs(got[layout.MAX_ABS] - want[layout.MAX_ABS]) <= 1e-6 * want[layout.MAX_ABS]
        and np.all(np.abs(got[layout.MEAN] - want[layout.MEAN]) <= 1e-4 * scale + 1e-30)
        and np.all(np.abs(got[layout.M2] - want[layout.M2]) <= 1e-4 * count * scale**2 + 1e-30)
    )


def bucket_index(length: int, buckets: int) -> np.ndarray:
    """Each position's bucket: ``floor(log2(max(pos, 1)))`` capped at ``buckets - 1``."""
    pos = np.maximum(np.arange(length), 1)
    return np.minimum(np.floor(np.log2(pos)).astype(np.int64), buckets - 1)


def reference_diagnostics(
    logp: np.ndarray, ref: np.ndarray, mask: np.ndarray, ids: np.ndarray, rows: int, clamp: float, buckets: int, vocab: int
) -> dict[str, np.ndarray]:  # fmt: skip
    """``klm_fold_diag``'s outputs for one batch of ``rows`` rows in float64 numpy (values as float64)."""
    with np.errstate(all="ignore"):
        good = mask & np.isfinite(ref.astype(np.float32) - logp.astype(np.float32))
        lc = np.clip(np.where(good, ref - logp, 0.0), -clamp, clamp)
        k3 = np.where(good, np.expm1(lc) - lc, 0.0)
    k3r, gr = k3.reshape(rows, -1), good.reshape(rows, -1).astype(np.float64)
    idx = bucket_index(k3r.shape[1], buckets)
    inside = (ids >= 0) & (ids < vocab)
    use = good & inside
    return {
        "row_sum": k3r.sum(1),
        "row_count": gr.sum(1),
        "bucket_sum": np.bincount(idx, k3r.sum(0), minlength=buckets),
        "bucket_count": np.bincount(idx, gr.sum(0), minlength=buckets),
        "token_sum": np.bincount(ids[use], k3[use], minlength=vocab),
        "token_count": np.bincount(ids[use], minlength=vocab).astype(np.float64),
        "outside": np.array([float((good & ~inside).sum())]),
    }


def fold_diag_outputs(
    lib: ctypes.CDLL, lp: np.ndarray, rp: np.ndarray, code: int, mask: np.ndarray, ids: np.ndarray,
    rows: int, clamp: float, buckets: int, vocab: int, workers: int, size: int,
    scratch: np.ndarray | None = None,
) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """``klm_fold_diag`` on numpy arrays: (its return, the moments vector, its outputs).

    ``scratch``: float64 zeros of a multiple of ``2 * vocab`` (the threads' token tables), or
    ``None`` (the kernel allocates them).
    """
    out = {
        "row_sum": np.zeros(rows), "row_count": np.zeros(rows),
        "bucket_sum": np.zeros(buckets), "bucket_count": np.zeros(buckets),
        "token_sum": np.zeros(vocab), "token_count": np.zeros(vocab), "outside": np.zeros(1),
    }  # fmt: skip
    ids64 = np.ascontiguousarray(ids, dtype=np.int64)
    d = Diag(lp.size // rows, out["row_sum"].ctypes.data, out["row_count"].ctypes.data, buckets,
             out["bucket_sum"].ctypes.data, out["bucket_count"].ctypes.data, ids64.ctypes.data, vocab,
             out["token_sum"].ctypes.data, out["token_count"].ctypes.data, out["outside"].ctypes.data,
             scratch.ctypes.data if scratch is not None else None,
             scratch.size // (2 * vocab) if scratch is not None else 0)  # fmt: skip
    acc = np.zeros(size, dtype=np.float64)
    rc = lib.klm_fold_diag(lp.ctypes.data, rp.ctypes.data, code, mask.ctypes.data, lp.size, clamp, 20.0, workers, acc.ctypes.data, ctypes.byref(d))  # fmt: skip
    if rc == 0:  # built without OpenMP: one thread
        rc = lib.klm_fold_diag(lp.ctypes.data, rp.ctypes.data, code, mask.ctypes.data, lp.size, clamp, 20.0, 1, acc.ctypes.data, ctypes.byref(d))  # fmt: skip
    return rc, acc, out


def _diag_problem(lib: ctypes.CDLL, layout: Any) -> str | None:
    """Why ``klm_fold_diag``'s diagnostics or moments differ from the references, or ``None``."""
    for rows, cols, clamp, workers in ((1, 1, float("inf"), 1), (3, 1367, float("inf"), 1), (3, 1367, 5.0, 1), (7, 20001, float("inf"), SPLIT_WORKERS)):  # fmt: skip
        logp, ref, mask = _batch(rows * cols, rows * cols + 7)
        ids = np.random.default_rng(rows).integers(-2, 300, rows * cols)
        lp, rp = np.ascontiguousarray(logp, np.float32), np.ascontiguousarray(ref, np.float32)
        mk = np.ascontiguousarray(mask, dtype=np.bool_)
        rc, acc, got = fold_diag_outputs(lib, lp, rp, FLOAT32, mk, ids, rows, clamp, 12, 290, workers, layout.SIZE)  # fmt: skip
        l64, r64 = lp.astype(np.float64), rp.astype(np.float64)
        want = reference_diagnostics(l64, r64, mk, ids, rows, clamp, 12, 290)
        moments = reference_moments(l64, r64, mk, clamp, 20.0, layout)
        bad = [
            k
            for k in want
            if not np.allclose(got[k], want[k], rtol=1e-5, atol=1e-9 * (1 + np.abs(want[k]).max()))
        ]
        if rc != 1 or bad or not _compare(acc, moments, layout):
            return f"klm_fold_diag gave wrong numbers on a {rows} x {cols} self-test batch (clamp={clamp}, return {rc}, wrong: {bad or 'moments'})"  # fmt: skip
    return None


def run(lib: ctypes.CDLL, layout: Any) -> str | None:
    """Why the library's numbers differ from the float64 reference, or ``None``.

    For each element type the selected body reads directly (float32 always; bf16 and fp16
    with the AVX2 body): a 203-token batch through every branch of the math, with no clamp
    (large |l| of both signs, then all negative: a positive one's e^l would hide their errors)
    and with a clamp of 5; then float32 batches of every size in :data:`SIZES` (tails, vector
    and block boundaries); then the largest split over :data:`SPLIT_WORKERS` threads by
    ``klm_fold`` (OpenMP) and slice by slice (the split klmonitor makes without OpenMP).
    """
    if lib.klm_vector_size() != layout.SIZE:
        return f"its moments vector has {lib.klm_vector_size()} entries, not {layout.SIZE}"

    def fold(logp: np.ndarray, ref: np.ndarray, mask: np.ndarray, code: int, clamp: float, threshold: float, how: str) -> str | None:  # fmt: skip
        lp, lp64 = _as_dtype(logp, code)
        rp, rp64 = _as_dtype(ref, code)
        mk = np.ascontiguousarray(mask, dtype=np.bool_)
        want = reference_moments(lp64, rp64, mk, clamp, threshold, layout)
        got = np.zeros(layout.SIZE, dtype=np.float64)
        n = lp.size
        if how == "split":
            _split(lib, lp, rp, code, mk, clamp, threshold, got)
        else:
            workers = SPLIT_WORKERS if how == "threads" else 1
            if not lib.klm_fold(lp.ctypes.data, rp.ctypes.data, code, mk.ctypes.data, n, clamp, threshold, workers, got.ctypes.data):  # fmt: skip
                _split(lib, lp, rp, code, mk, clamp, threshold, got)  # built without OpenMP
        if _compare(got, want, layout):
            return None
        name = {FLOAT32: "float32", BFLOAT16: "bfloat16", FLOAT16: "float16"}[code]
        return (
            f"it gave wrong numbers on a {n}-token {name} self-test batch ({how}, clamp={clamp}): "
            f"{got.tolist()} vs {want.tolist()}"
        )

    logp, ref, mask = _batch(203, 20240611)
    mask[60:64] = True
    large = {"mixed": [25.0, -24.0, 44.0, -61.0], "negative": [-25.0, -24.0, -44.0, -61.0]}
    runs = [("mixed", float("inf"), 20.0), ("negative", float("inf"), 20.0), ("mixed", 5.0, 5.0)]
    for code in (FLOAT32, BFLOAT16, FLOAT16):
        if not lib.klm_reads_dtype(code):
            continue
        for signs, clamp, threshold in runs:
            ref[60:64] = logp[60:64] + np.array(large[signs])  # above 20, above 30
            why = fold(logp, ref, mask, code, clamp, threshold, "one thread")
            if why:
                return why
    for n in SIZES:
        logp, ref, mask = _batch(n, n)
        for how in ("one thread", "threads", "split") if n == SIZES[-1] else ("one thread",):
            why = fold(logp, ref, mask, FLOAT32, float("inf"), 20.0, how)
            if why:
                return why
    return _diag_problem(lib, layout) or _ratio_range_problem(lib)


def reference_ratio_range(logp: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``klm_ratio_range``'s output in numpy.

    The min and max of the float32 ``l = ref - logp`` and the count of ``|l| > ln 2`` (in
    float32), over masked-in tokens with a finite ``l``; ``[inf, -inf, 0]`` where none is.
    """
    with np.errstate(all="ignore"):
        l32 = ref.astype(np.float32) - logp.astype(np.float32)
    ok = mask & np.isfinite(l32)
    if not ok.any():
        return np.array([np.inf, -np.inf, 0.0])
    use = l32[ok]
    return np.array([float(use.min()), float(use.max()), float((np.abs(use) > np.float32(np.log(2))).sum())])


def _ratio_range_problem(lib: ctypes.CDLL) -> str | None:
    """Why ``klm_ratio_range`` differs from :func:`reference_ratio_range`, or ``None``."""
    for n, workers in ((1, 1), (7, 1), (8, 1), (513, 1), (4097, 1), (140_001, SPLIT_WORKERS)):
        logp, ref, mask = _batch(n, n + 11)
        for code in (FLOAT32, BFLOAT16, FLOAT16):
            lp, lp64 = _as_dtype(logp, code)
            rp, rp64 = _as_dtype(ref, code)
            for mk in (np.ascontiguousarray(mask, dtype=np.bool_), None):
                got = np.zeros(3)
                mp = mk.ctypes.data if mk is not None else None
                lib.klm_ratio_range(lp.ctypes.data, rp.ctypes.data, code, mp, n, workers, got.ctypes.data)
                want = reference_ratio_range(lp64, rp64, mk if mk is not None else np.ones(n, dtype=bool))
                if not np.array_equal(got, want):
                    return f"klm_ratio_range gave {got.tolist()} on a {n}-token self-test batch (dtype {code}), not {want.tolist()}"  # fmt: skip
    return None


def _load_layout(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_klm_layout", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layout_path() -> Path:
    """Where ``klmonitor/_layout.py`` is (for the child, which does not import the package)."""
    return Path(__file__).resolve().parents[1] / "_layout.py"


def main(argv: list[str]) -> int:
    """The child process: load the library at ``argv[1]`` and self-test every body this CPU runs.

    ``argv``: the layout module's path, the library's path (``/proc/self/fd/N`` where the
    parent passed its checked file). Prints ``ok`` and returns 0, or prints why not and
    returns 1; a crash or a hang is the parent's to see.
    """
    layout = _load_layout(argv[0])
    lib = ctypes.CDLL(argv[1])
    try:
        bind(lib)
    except AttributeError as exc:
        print(f"it is not klmonitor's kernel (it lacks a function: {exc})")
        return 1
    abi = lib.klm_abi_version()
    if abi != ABI_VERSION:
        print(f"it has interface version {abi}, this klmonitor needs {ABI_VERSION}")
        return 1
    for isa in (0, 1) if lib.klm_cpu_has_avx2() else (0,):
        lib.klm_select_isa(isa)
        why = run(lib, layout)
        if why:
            print(f"{why} ({'avx2' if isa else 'portable'} body)")
            return 1
    print("ok")
    return 0


if __name__ == "__main__":  # pragma: no cover - run by the loader's child process
    sys.exit(main(sys.argv[1:]))
