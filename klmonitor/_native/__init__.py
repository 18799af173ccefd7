"""The fused CPU kernel: ``moments.c``, compiled when klmonitor is installed, loaded with ctypes.

Why a C file rather than ``torch.compile``: on CPU, Inductor's code for this reduction (twelve
float64 accumulators, an exp, a max) ran 4-6x slower than the memory floor, far from the
3x target; this plain loop, with a hand-written AVX2 body, runs within 2x of it (see
``benchmarks/``). Calls through ``ctypes`` release the GIL.

How it is built: ``setup.py`` compiles the file once, at install time, into
``_klm_moments*.so`` beside this module (an optional extension: an install without a C
compiler succeeds without it). The library holds a portable body compiled for the baseline
of its architecture and, on x86-64, an AVX2+FMA+F16C body chosen at run time from cpuid, so
one binary runs on every node of a mixed cluster. Nothing is compiled, cached or written at
run time: no compiler call, no cache directory, no file another user could plant.

Before the library is used, :func:`load` checks that it is owned by you, root or the owner of
klmonitor's own files and no more writable than they are; that it is a complete ELF shared
library for this machine (a truncated file would crash the process inside ``dlopen``); that
it exports every function, with this module's interface version and a hash of the
``moments.c`` beside it (a stale build is not used); and that it reproduces a float64 numpy
reference on a small batch (see :func:`_self_test`). Any failure, or ``KLMONITOR_NATIVE=0``,
leaves :func:`load` returning ``None`` after one warning (naming the file and the fix), and
KLStats uses its pure-torch path, which gives the same numbers. ``KLMONITOR_NATIVE=portable``
forces the portable body.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import logging
import os
import stat
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from klmonitor import _layout

log = logging.getLogger("klmonitor")

#: The interface this module speaks (``klm_abi_version`` in moments.c).
ABI_VERSION = 3
_STEM = "_klm_moments"
NOUT = 16
# Element types the kernel knows (codes as in moments.c).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MASK_DTYPES = (torch.bool, torch.uint8)  # the kernel reads the mask as one byte per token
# Below this many tokens one thread does the work; the pool's hand-off costs more than it saves.
_PARALLEL_FROM = 1 << 16
# KLMONITOR_NATIVE values: off, or which body to run (-1: the best the CPU takes).
_OFF = ("0", "false", "no", "off")
_ISA_WANTED = {"": -1, "1": -1, "true": -1, "yes": -1, "on": -1, "auto": -1, "portable": 0, "avx2": 1}
_ISA_NAMES = {0: "portable", 1: "avx2"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_reason: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
# Where the library and its moments.c are looked for (tests point it at a copy).
_library_dir = Path(__file__).parent


def library_path() -> Path | None:
    """The compiled kernel beside this module, or ``None`` where the install did not build it."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _library_dir / (_STEM + suffix)
        if os.path.lexists(path):
            return path
    return None


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _trust_problem(path: Path) -> str | None:
    """Why ``path`` must not be loaded by this user, or ``None``.

    Trusted: a regular file owned by this user, root or the owner of klmonitor's own files
    beside it, and writable by no one who could not also rewrite those files.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if not hasattr(os, "getuid"):  # Windows: no POSIX owners to compare
        return None
    own = path.parent / "__init__.py"
    ref = os.stat(own if own.exists() else path.parent)
    me = os.getuid()
    if st.st_uid not in (me, 0, ref.st_uid):
        return (
            f"it is owned by {_owner(st.st_uid)}, not by you ({_owner(me)}), root or the owner of "
            f"klmonitor's own files ({_owner(ref.st_uid)}), so it may have been planted"
        )
    loose = st.st_mode & 0o022 & ~ref.st_mode
    if loose:
        who = " and ".join(w for bit, w in ((0o020, "its group"), (0o002, "all users")) if loose & bit)
        return (
            f"it is writable by {who} (mode {stat.filemode(st.st_mode)}), unlike klmonitor's own "
            f"files ({stat.filemode(ref.st_mode)}), so it may have been replaced"
        )
    return None


_host_machine: int | None = None


def _machine_of(path: str) -> int | None:
    """The ELF e_machine of a file, or ``None`` if it is not a readable ELF file."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return None
    machine: int = struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)[0]
    return machine


def _elf_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete ELF shared library for this process, or ``None``.

    ``dlopen`` maps a library's segments from the file; where the file is shorter than its
    headers say, touching the missing pages kills the process with SIGBUS. So every header,
    every loaded segment and the section table must lie inside the file. Files that are not
    ELF pass where the platform does not use ELF (macOS, Windows), and fail elsewhere.
    """
    global _host_machine
    size = os.stat(path).st_size
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as f:
        data = f.read(min(size, 1 << 16))
    if data[:4] != b"\x7fELF":
        if sys.platform.startswith(("linux", "freebsd")):
            return "it is not an ELF shared library"
        return None
    bits64 = struct.calcsize("P") == 8
    if len(data) < 52 or data[4] not in (1, 2) or data[5] not in (1, 2):
        return "its ELF header is cut short or invalid"
    if (data[4] == 2) != bits64:
        return (
            f"it is a {64 if data[4] == 2 else 32}-bit library and this Python is {64 if bits64 else 32}-bit"
        )
    end = "<" if data[5] == 1 else ">"
    if (end == "<") != (sys.byteorder == "little"):
        return "its byte order is not this machine's"
    if bits64:
        if len(data) < 64:
            return "its ELF header is cut short"
        e_type, e_machine = struct.unpack_from(end + "HH", data, 16)
        e_phoff, e_shoff = struct.unpack_from(end + "QQ", data, 32)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from(end + "HHHH", data, 54)
        ph_fmt, ph_min = end + "I4xQ8x8xQ", 56  # p_type, p_offset, p_filesz
    else:
        e_type, e_machine = struct.unpack_from(end + "HH", data, 16)
        e_phoff, e_shoff = struct.unpack_from(end + "II", data, 28)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from(end + "HHHH", data, 42)
        ph_fmt, ph_min = end + "II8xI", 32
    if e_type != 3:
        return f"it is an ELF file of type {e_type}, not a shared library"
    if _host_machine is None:
        _host_machine = _machine_of(os.path.realpath(sys.executable)) or -1
    if _host_machine > 0 and e_machine != _host_machine:
        return f"it is built for ELF machine {e_machine}, and this Python runs on machine {_host_machine}"
    if e_phnum == 0 or e_phentsize < ph_min:
        return "its ELF program headers are missing or invalid"
    if e_phoff + e_phnum * e_phentsize > size or e_shoff + e_shnum * e_shentsize > size:
        return f"it is truncated ({size} bytes, shorter than its ELF headers say)"
    if e_phoff + e_phnum * e_phentsize > len(data):
        with open(path, "rb") as f:
            data = f.read(e_phoff + e_phnum * e_phentsize)
    for k in range(e_phnum):
        p_type, p_offset, p_filesz = struct.unpack_from(ph_fmt, data, e_phoff + k * e_phentsize)
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD
            return f"it is truncated ({size} bytes; a segment ends at byte {p_offset + p_filesz})"
    return None


def _bind(lib: ctypes.CDLL) -> None:
    """Declare the kernel's functions (AttributeError where the library lacks one)."""
    p, i64, f32, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures: dict[str, tuple[list[type], type | None]] = {
        "klm_abi_version": ([], cint),
        "klm_source_sha256": ([], ctypes.c_char_p),
        "klm_select_isa": ([cint], cint),
        "klm_cpu_has_avx2": ([], cint),
        "klm_vector_isa": ([], cint),
        "klm_openmp": ([], cint),
        "klm_sample_shift": ([p, p, cint, p, i64, f32, p], None),
        "klm_token_moments": ([p, p, cint, p, i64, i64, p, f32, f32, p], None),
        "klm_fold": ([p, p, cint, p, i64, f32, f32, cint, p], cint),
        "klm_fold_sums": ([p, p, p], None),
        "klm_vector_size": ([], cint),
        "klm_reads_dtype": ([cint], cint),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res


def _reference_moments(
    logp: np.ndarray, ref: np.ndarray, mask: np.ndarray, clamp: float, threshold: float
) -> np.ndarray:
    """The moments vector of one batch in float64 numpy, as the kernel defines it.

    The self-test's reference, independent of klmonitor's torch paths.

    ``logp`` and ``ref`` hold the inputs' values as float64, ``mask`` is bool. Validity, the
    extreme count and max |l| follow the float32 log-ratio (as the kernel's); the quantities
    follow the float64 one, clamped to +-clamp.
    """
    l32 = ref.astype(np.float32) - logp.astype(np.float32)
    a32 = np.abs(l32.astype(np.float64))
    good = mask & np.isfinite(l32)
    lc = np.clip((ref - logp)[good], -clamp, clamp)
    em1 = np.expm1(lc)
    k2, k3 = 0.5 * lc * lc, em1 - lc
    q = np.stack([-lc, k2, k3, em1 * lc - k3, em1, k2 - k3])
    out = np.zeros(_layout.SIZE, dtype=np.float64)
    out[_layout.COUNT] = n = good.sum()
    out[_layout.MEAN] = q.mean(axis=1)
    out[_layout.M2] = ((q - out[_layout.MEAN][:, None]) ** 2).sum(axis=1)
    out[_layout.TOKENS] = n
    out[_layout.NONFINITE] = (mask & ~np.isfinite(l32)).sum()
    out[_layout.EXTREME] = (a32[good] > threshold).sum()
    out[_layout.MAX_ABS] = a32[good].max()
    return out


def _self_test(lib: ctypes.CDLL) -> str | None:
    """Why the library's numbers differ from a float64 numpy reference on a small batch, or ``None``.

    203 tokens (every branch of the float body's math, masked, NaN and inf tokens, a few with
    |l| above the extreme threshold and above 30), as float32 and, where the body reads it
    directly, bf16; with no clamp and with a clamp of 5, and with no clamp where every large
    |l| is negative (a positive one's e^l would hide their errors): exact counts, and means
    and M2 within 1e-4 of the samples' scale (the kernel agrees to ~1e-6; a broken build is
    off by far more).
    """
    if lib.klm_vector_size() != _layout.SIZE:
        return f"its moments vector has {lib.klm_vector_size()} entries, not {_layout.SIZE}"
    rng = np.random.default_rng(20240611)
    n = 203
    logp = -8.0 * rng.random(n)
    ref = logp + 2.5 * rng.standard_normal(n)
    ref[:40] = logp[:40] + 0.3 * rng.standard_normal(40)  # the series branch
    ref[7], ref[50], logp[90] = np.nan, np.inf, -np.inf
    mask = rng.random(n) < 0.8
    mask[60:64] = True
    checks = [_layout.COUNT, _layout.TOKENS, _layout.NONFINITE, _layout.EXTREME]
    large = {"mixed": [25.0, -24.0, 44.0, -61.0], "negative": [-25.0, -24.0, -44.0, -61.0]}
    runs = [("mixed", float("inf"), 20.0), ("negative", float("inf"), 20.0), ("mixed", 5.0, 5.0)]
    for dtype in (torch.float32, torch.bfloat16):
        if not lib.klm_reads_dtype(_DTYPE_CODES[dtype]):
            continue
        for signs, clamp, threshold in runs:
            ref[60:64] = logp[60:64] + np.array(large[signs])  # above 20, above 30
            lp = torch.from_numpy(logp.astype(np.float32)).to(dtype)
            rp = torch.from_numpy(ref.astype(np.float32)).to(dtype)
            mk = torch.from_numpy(mask)
            lp64, rp64 = lp.double().numpy(), rp.double().numpy()
            want = _reference_moments(lp64, rp64, mask, clamp, threshold)
            got = np.zeros(_layout.SIZE, dtype=np.float64)
            code = _DTYPE_CODES[dtype]
            lib.klm_fold(
                lp.data_ptr(), rp.data_ptr(), code, mk.data_ptr(), n, clamp, threshold, 1, got.ctypes.data
            )
            count = want[_layout.COUNT]
            scale = np.sqrt(want[_layout.MEAN] ** 2 + want[_layout.M2] / count)
            ok = (
                np.array_equal(got[checks], want[checks])
                and abs(got[_layout.MAX_ABS] - want[_layout.MAX_ABS]) <= 1e-6 * want[_layout.MAX_ABS]
                and np.all(np.abs(got[_layout.MEAN] - want[_layout.MEAN]) <= 1e-4 * scale)
                and np.all(np.abs(got[_layout.M2] - want[_layout.M2]) <= 1e-4 * count * scale**2)
            )
            if not ok:
                return (
                    f"it gave wrong numbers on a {dtype} self-test batch ({signs} large |l|, clamp={clamp}) "
                    f"({got.tolist()} vs {want.tolist()})"
                )
    return None


def _open(want: int) -> tuple[ctypes.CDLL | None, str | None]:
    """The checked library, or ``None`` and why not."""
    path = library_path()
    if path is None:
        return None, (
            "it was not built when klmonitor was installed (no working C compiler then). To build "
            "it, reinstall klmonitor where gcc or clang works (set CC to choose one)"
        )
    rebuild = "reinstall klmonitor (or, in a source checkout, run `python setup.py build_ext --inplace`)"
    try:
        why = _trust_problem(path) or _elf_problem(path)
        if why:
            return None, f"{path} is not loaded: {why}. Remove it and {rebuild}"
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            return None, f"{path} could not be loaded ({exc}); {rebuild}"
        try:
            _bind(lib)
        except AttributeError as exc:
            return None, f"{path} is not klmonitor's kernel (it lacks a function: {exc}); {rebuild}"
        abi = lib.klm_abi_version()
        if abi != ABI_VERSION:
            return None, f"{path} has interface version {abi}, this klmonitor needs {ABI_VERSION}; {rebuild}"
        source = path.parent / "moments.c"
        if source.exists():
            built_from = (lib.klm_source_sha256() or b"").decode("ascii", "replace")
            if built_from != hashlib.sha256(source.read_bytes()).hexdigest():
                return None, f"{path} was built from another version of {source} (stale build); {rebuild}"
        isa = lib.klm_select_isa(want)
        if want > isa:
            log.warning(
                "klmonitor: KLMONITOR_NATIVE=avx2, but this CPU or OS lacks AVX2/FMA/F16C; using the portable body."
            )
        why = _self_test(lib)
        if why:
            return None, f"{path} is not used: {why}; {rebuild}"
        return lib, None
    except Exception as exc:  # never let loading the kernel stop training
        return None, f"checking {path} failed ({type(exc).__name__}: {exc}); {rebuild}"


def load() -> ctypes.CDLL | None:
    """The checked kernel library, loaded on first call; ``None`` where it cannot be used.

    The first call that gets ``None`` logs why, once per process (except when
    ``KLMONITOR_NATIVE=0`` asked for it).
    """
    global _lib, _tried, _reason
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        mode = os.environ.get("KLMONITOR_NATIVE", "").strip().lower()
        if mode in _OFF:
            _reason = f"it is turned off by KLMONITOR_NATIVE={os.environ['KLMONITOR_NATIVE']}"
            log.info("klmonitor: the fused CPU kernel %s; using the pure-torch path.", _reason)
        else:
            want = _ISA_WANTED.get(mode)
            if want is None:
                log.warning(
                    "klmonitor: KLMONITOR_NATIVE=%r is not one of 0, 1, auto, portable, avx2; using auto.",
                    mode,
                )
                want = -1
            _lib, _reason = _open(want)
            if _lib is None:
                log.warning(
                    "klmonitor: the fused CPU kernel is not used: %s. KLStats uses its pure-torch path "
                    "(the same numbers, slower on CPU); KLMONITOR_NATIVE=0 silences this message.",
                    _reason,
                )
        _tried = True
        return _lib


def _reset() -> None:
    """Forget the load result so the next :func:`load` checks again (tests)."""
    global _lib, _tried, _reason
    with _lock:
        _lib, _tried, _reason = None, False, None


def available() -> bool:
    """Whether the fused CPU kernel is built, checked and loaded."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why the kernel is not used (``None`` where it is)."""
    load()
    return _reason


def vector_isa() -> str | None:
    """Which body runs: ``"avx2"`` (hand-written intrinsics), ``"portable"``, or ``None``."""
    lib = load()
    return None if lib is None else _ISA_NAMES[lib.klm_vector_isa()]


def select_isa(name: str) -> str | None:
    """Run the ``"portable"`` or ``"avx2"`` body (or ``"auto"``: the best this CPU takes).

    Returns the body now selected (AVX2 only where the CPU has it), or ``None`` without a
    kernel. For tests and benchmarks; ``KLMONITOR_NATIVE=portable`` does the same at load.
    """
    lib = load()
    if lib is None:
        return None
    with _lock:
        return _ISA_NAMES[lib.klm_select_isa(_ISA_WANTED[name])]


def cpu_has_avx2() -> bool:
    """Whether this CPU and OS can run the AVX2 body (whichever body is selected)."""
    lib = load()
    return lib is not None and bool(lib.klm_cpu_has_avx2())


def openmp() -> bool:
    """Whether the kernel splits large batches over OpenMP threads itself (else Python threads)."""
    lib = load()
    return lib is not None and bool(lib.klm_openmp())


def reads_dtype(dtype: torch.dtype) -> bool:
    """Whether :func:`fold` takes inputs of ``dtype`` as they are (no float32 copy).

    float32 always; bf16 and fp16 with the AVX2 body (at any clamp). Other inputs must be
    converted to float32 by the caller.
    """
    lib = load()
    code = _DTYPE_CODES.get(dtype)
    return lib is not None and code is not None and bool(lib.klm_reads_dtype(code))


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_workers
    if _pool is None or _pool_workers < workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="klmonitor")
        _pool_workers = workers
    return _pool


def fold(
    logp: Tensor, ref: Tensor, mask: Tensor | None, clamp: float, threshold: float, acc: np.ndarray
) -> None:
    """Fold contiguous 1-D CPU tensors of one dtype into the moments vector ``acc``, in place.

    ``acc`` is a float64 array in ``klmonitor._layout``'s layout; the dtype must pass
    :func:`reads_dtype` (float32 always does); ``mask`` is a contiguous bool/uint8 tensor or
    ``None``. ``clamp`` (> 0, ``math.inf`` for none) bounds each log-ratio before the
    estimators; values are exact at any clamp (float64 where float32 would overflow).
    ``threshold`` (> 0) is the |log-ratio| above which a valid token counts as extreme
    (callers pass ``min(extreme, clamp)``). One C call does the shift sample, the shifted sums
    (split over torch's thread count from 64K tokens) and Chan's merge.
    """
    lib = load()
    if lib is None:
        raise RuntimeError(f"fold needs the fused CPU kernel, which is not available: {_reason}")
    _check_fold_args(lib, logp, ref, mask, clamp, threshold, acc)
    n = logp.numel()
    workers = max(1, min(torch.get_num_threads(), n // _PARALLEL_FROM))
    mp = mask.data_ptr() if mask is not None else None
    dt = _DTYPE_CODES[logp.dtype]
    if not lib.klm_fold(
        logp.data_ptr(), ref.data_ptr(), dt, mp, n, clamp, threshold, workers, acc.ctypes.data
    ):
        # Built without OpenMP: ctypes releases the GIL, so Python threads split the range.
        _fold_threads(lib, logp, ref, mask, clamp, threshold, workers, acc)


def _check_fold_args(
    lib: ctypes.CDLL,
    logp: Tensor,
    ref: Tensor,
    mask: Tensor | None,
    clamp: float,
    threshold: float,
    acc: np.ndarray,
) -> None:
    """Raise unless :func:`fold`'s arguments keep the C kernel inside its buffers.

    Real checks, not ``assert`` (which ``python -O`` removes): the kernel reads ``n`` elements
    of each input and writes the whole moments vector through raw pointers.
    """
    # Cheap checks only (a few microseconds: this runs on every CPU update).
    for name, t in (("logp", logp), ("ref", ref)):
        if not isinstance(t, Tensor) or not t.is_cpu or not t.is_contiguous():
            raise ValueError(f"fold: {name} must be a contiguous CPU tensor")
    code = _DTYPE_CODES.get(logp.dtype)
    if code is None or ref.dtype != logp.dtype or not lib.klm_reads_dtype(code):
        raise TypeError(
            f"fold: logp and ref must share a dtype the kernel reads (float32; bf16/fp16 with AVX2), "
            f"got {logp.dtype} and {ref.dtype}"
        )
    n = logp.numel()
    if ref.numel() != n:
        raise ValueError(f"fold: logp has {n} elements but ref has {ref.numel()}")
    if mask is not None and (
        not isinstance(mask, Tensor)
        or not mask.is_cpu
        or not mask.is_contiguous()
        or mask.dtype not in _MASK_DTYPES
        or mask.numel() != n
    ):
        raise ValueError(
            f"fold: mask must be None or a contiguous CPU bool/uint8 tensor of {n} elements, got "
            f"{getattr(mask, 'dtype', type(mask).__name__)} of {getattr(mask, 'numel', lambda: '?')()} "
            "elements"
        )
    if not (clamp > 0 and threshold > 0):  # also refuses NaN
        raise ValueError(f"fold: clamp and threshold must be > 0, got {clamp} and {threshold}")
    size = lib.klm_vector_size()
    flags = getattr(acc, "flags", None)
    if (
        not isinstance(acc, np.ndarray)
        or acc.dtype != np.float64
        or not (flags is not None and flags.c_contiguous and flags.writeable)
        or acc.size != size
    ):
        raise ValueError(
            f"fold: acc must be a writable, C-contiguous float64 array of {size} moments, got "
            f"{getattr(acc, 'dtype', type(acc).__name__)} of size {getattr(acc, 'size', '?')}"
        )


def _fold_threads(
    lib: ctypes.CDLL,
    logp: Tensor,
    ref: Tensor,
    mask: Tensor | None,
    clamp: float,
    threshold: float,
    workers: int,
    acc: np.ndarray,
) -> None:
    """:func:`fold`'s work split over ``workers`` Python threads, one C call per slice."""
    dt = _DTYPE_CODES[logp.dtype]
    n = logp.numel()
    lp, rp = logp.data_ptr(), ref.data_ptr()
    mp = mask.data_ptr() if mask is not None else None
    shift = np.zeros(6, dtype=np.float32)
    lib.klm_sample_shift(lp, rp, dt, mp, n, clamp, shift.ctypes.data)
    parts = np.zeros((workers, NOUT), dtype=np.float64)
    bounds = [n * k // workers for k in range(workers + 1)]
    sp = shift.ctypes.data

    def run(k: int) -> None:
        lib.klm_token_moments(
            lp, rp, dt, mp, bounds[k], bounds[k + 1], sp, clamp, threshold, parts[k].ctypes.data
        )

    list(_thread_pool(workers).map(run, range(workers)))
    sums = parts.sum(axis=0)
    sums[15] = parts[:, 15].max()
    lib.klm_fold_sums(acc.ctypes.data, sp, sums.ctypes.data)
