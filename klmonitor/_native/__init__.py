"""The fused CPU kernel: ``moments.c`` built on first use with the system's C compiler.

Why a C file rather than ``torch.compile``: on CPU, Inductor's code for this reduction (twelve
float64 accumulators, an exp, a max) ran 4-6x slower than the memory floor, far from the
3x target; this plain loop, auto-vectorised by gcc/clang, runs within 2x of it (see
``benchmarks/``). The file is compiled once per machine into a cache directory (under a
second) and loaded with ``ctypes``, which releases the GIL, so several threads can each run
a slice. Without a compiler, or with ``KLMONITOR_NATIVE=0``, :func:`load` returns ``None`` and
KLStats uses its pure-torch path, which gives the same numbers.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("klmonitor")

_SOURCE = Path(__file__).with_name("moments.c")
_BASE_FLAGS = [
    "-O3",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-ffp-contract=fast",
    "-shared",
    "-fPIC",
]
# Tried in order: the host's vector units with OpenMP (which then shares torch's own runtime
# and worker threads), then without OpenMP (Python threads split the work), then generic code.
_ARCH_FLAGS: tuple[list[str], ...] = (["-march=native", "-fopenmp"], ["-march=native"], [])
NOUT = 16
# Element types the kernel knows (codes as in moments.c).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Below this many tokens one thread does the work; the pool's hand-off costs more than it saves.
_PARALLEL_FROM = 1 << 16

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None


def cache_dir() -> Path:
    """Where the compiled kernel is kept: ``$KLMONITOR_CACHE`` or ``~/.cache/klmonitor``."""
    env = os.environ.get("KLMONITOR_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "klmonitor"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str) -> Path | None:
    source = _SOURCE.read_bytes()
    for arch in _ARCH_FLAGS:
        flags = [*_BASE_FLAGS, *arch]
        key = hashlib.sha256(
            source + " ".join([cc, *flags, platform.machine(), sys.platform]).encode()
        ).hexdigest()[:16]
        target = cache_dir() / f"moments-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: ranks of a DDP job may race to build it.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run(
                [cc, *flags, "-o", tmp, str(_SOURCE)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if proc.returncode == 0:
                os.replace(tmp, target)
                return target
            log.debug("klmonitor: building the CPU kernel with %s failed: %s", flags, proc.stderr)
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("klmonitor: building the CPU kernel failed: %s", exc)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, built on first call; ``None`` where it cannot be had."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("KLMONITOR_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _tried = True
            return None
        cc = _compiler()
        path = _build(cc) if cc else None
        if path is None:
            log.info(
                "klmonitor: no C compiler could build the fused CPU kernel; using the "
                "pure-torch path (same results, slower). Set CC to a working compiler to enable it."
            )
        else:
            try:
                lib = ctypes.CDLL(str(path))
                p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
                cint = ctypes.c_int
                lib.klm_sample_shift.argtypes = [p, p, cint, p, i64, f32, p]
                lib.klm_sample_shift.restype = None
                lib.klm_token_moments.argtypes = [p, p, cint, p, i64, i64, p, f32, p]
                lib.klm_token_moments.restype = None
                lib.klm_fold.argtypes = [p, p, cint, p, i64, f32, cint, p]
                lib.klm_fold.restype = cint
                lib.klm_fold_sums.argtypes = [p, p, p]
                lib.klm_fold_sums.restype = None
                lib.klm_vector_size.argtypes = []
                lib.klm_vector_size.restype = cint
                lib.klm_reads_dtype.argtypes = [cint, f32]
                lib.klm_reads_dtype.restype = cint
                lib.klm_vector_isa.argtypes = []
                lib.klm_vector_isa.restype = ctypes.c_int
                _lib = lib
            except OSError as exc:
                log.info("klmonitor: could not load the fused CPU kernel (%s); using torch.", exc)
        _tried = True
        return _lib


def available() -> bool:
    """Whether the fused CPU kernel is built and loaded."""
    return load() is not None


def vector_isa() -> str | None:
    """Which vector body the kernel was built with.

    ``"avx2"`` (hand-written intrinsics), ``"portable"`` (compiler-vectorised C), or ``None``
    where there is no kernel.
    """
    lib = load()
    if lib is None:
        return None
    return "avx2" if lib.klm_vector_isa() == 1 else "portable"


def reads_dtype(dtype: torch.dtype, clamp: float) -> bool:
    """Whether :func:`fold` takes inputs of ``dtype`` as they are (no float32 copy).

    float32 always; bf16 (and fp16 where the CPU has F16C) with the AVX2 body and a clamp up
    to 30. Other inputs must be converted to float32 by the caller.
    """
    lib = load()
    code = _DTYPE_CODES.get(dtype)
    return lib is not None and code is not None and bool(lib.klm_reads_dtype(code, clamp))


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="klmonitor")
    return _pool


def fold(logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, acc: np.ndarray) -> None:
    """Fold contiguous 1-D CPU tensors of one dtype into the moments vector ``acc``, in place.

    ``acc`` is a float64 array in ``klmonitor._moments``' layout; the dtype must pass
    :func:`reads_dtype` (float32 always does); ``mask`` is a contiguous bool/uint8 tensor or
    ``None``. One C call does the shift sample, the shifted sums (split over torch's thread
    count from 64K tokens) and Chan's merge.
    """
    lib = load()
    assert lib is not None, "fold called without the native kernel"
    assert logp.dtype == ref.dtype and reads_dtype(logp.dtype, clamp), (logp.dtype, ref.dtype, clamp)
    assert acc.dtype == np.float64 and acc.flags.c_contiguous and acc.size == lib.klm_vector_size()
    dt = _DTYPE_CODES[logp.dtype]
    n = logp.numel()
    lp, rp, ap = logp.data_ptr(), ref.data_ptr(), acc.ctypes.data
    mp = mask.data_ptr() if mask is not None else None
    workers = max(1, min(torch.get_num_threads(), n // _PARALLEL_FROM))
    if lib.klm_fold(lp, rp, dt, mp, n, clamp, workers, ap):
        return
    # Built without OpenMP: ctypes releases the GIL, so Python threads split the range.
    shift = np.zeros(6, dtype=np.float32)
    lib.klm_sample_shift(lp, rp, dt, mp, n, clamp, shift.ctypes.data)
    parts = np.zeros((workers, NOUT), dtype=np.float64)
    bounds = [n * k // workers for k in range(workers + 1)]
    sp = shift.ctypes.data

    def run(k: int) -> None:
        lib.klm_token_moments(lp, rp, dt, mp, bounds[k], bounds[k + 1], sp, clamp, parts[k].ctypes.data)

    list(_thread_pool(workers).map(run, range(workers)))
    sums = parts.sum(axis=0)
    sums[15] = parts[:, 15].max()
    lib.klm_fold_sums(ap, sp, sums.ctypes.data)
