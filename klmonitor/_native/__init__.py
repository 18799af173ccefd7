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

Before anything of the library is loaded, :func:`load` resolves links and checks the file
they reach, its directory and the package's directory: owned by you, root or the owner of
klmonitor's own files and no more writable than they are. It reads the file through one
descriptor (what it checks is what it loads) and compares its sha256 with the digest setup.py
recorded beside it when it built it (``_klm_moments*.so.sha256``, which also holds the hash of
the ``moments.c`` it was built from: a missing or edited ``moments.c`` is a stale build), and
checks it is a complete ELF shared library for this machine. Then a short-lived child process
loads it and runs the self-test (:mod:`._selftest`: a float64 numpy reference, at sizes from 1
token through block boundaries and tails to a batch split over threads, on every body the CPU
runs): a damaged library that crashes or hangs kills only that child. Only then is it loaded
here, its interface version and source hash checked and the self-test run once more. The
child's verdict is kept per (path, sha256) for the process (about 0.4 s, paid once). Any
failure, or ``KLMONITOR_NATIVE=0``, leaves :func:`load` returning ``None`` after one warning
(naming the file and the fix), and KLStats uses its pure-torch path, which gives the same
numbers. ``KLMONITOR_NATIVE=portable`` forces the portable body.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import logging
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from klmonitor import _layout
from klmonitor._native import _selftest

log = logging.getLogger("klmonitor")

#: The interface this module speaks (``klm_abi_version`` in moments.c).
ABI_VERSION = _selftest.ABI_VERSION
#: The build record's suffix: ``_klm_moments*.so.sha256`` holds the library's sha256 and its
#: source's, written by setup.py when it built the library.
DIGEST_SUFFIX = ".sha256"
# No kernel build comes near this; a bigger file is not read.
_MAX_BYTES = 64 << 20
# The child process's self-test takes well under a second; a library that hangs is refused.
_CHILD_TIMEOUT = 120.0
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
# The child process's verdict per (resolved path, sha256) of a library, for this process: None
# (passed) or why not. Checked once however often load() is reset.
_verdicts: dict[tuple[str, str], str | None] = {}
# How long the last child check took, in seconds (tests and benchmarks report it).
_child_seconds: float | None = None
# Where the library and its moments.c are looked for (tests point it at a copy).
_library_dir = Path(__file__).parent


def library_path() -> Path | None:
    """The compiled kernel beside this module, or ``None`` where the install did not build it."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _library_dir / (_STEM + suffix)
        if os.path.lexists(path):
            return path
    return None


def digest_path(library: Path) -> Path:
    """The build record beside ``library``: its sha256 and its source's, written by setup.py."""
    return library.with_name(library.name + DIGEST_SUFFIX)


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


class _Refused(Exception):
    """Why the library is not loaded (a sentence about it, for the warning)."""


def _trust_problem(st: os.stat_result, what: str, ref: os.stat_result) -> str | None:
    """Why the file or directory ``st`` (called ``what`` in the message) is not to be trusted.

    Trusted: owned by this user, root or the owner of klmonitor's own files (``ref``: the
    loader's ``__init__.py``), and writable by no one who could not also rewrite those files
    (whoever can rewrite them already runs code in this process).
    """
    if not hasattr(os, "getuid"):  # Windows: no POSIX owners to compare
        return None
    me = os.getuid()
    if st.st_uid not in (me, 0, ref.st_uid):
        return (
            f"{what} is owned by {_owner(st.st_uid)}, not by you ({_owner(me)}), root or the owner of "
            f"klmonitor's own files ({_owner(ref.st_uid)}), so it may have been planted"
        )
    loose = st.st_mode & 0o022 & ~ref.st_mode
    if loose:
        who = " and ".join(w for bit, w in ((0o020, "its group"), (0o002, "all users")) if loose & bit)
        return (
            f"{what} is writable by {who} (mode {stat.filemode(st.st_mode)}), unlike klmonitor's own "
            f"files ({stat.filemode(ref.st_mode)}), so it may have been replaced"
        )
    return None


def _read_record(path: Path, ref: os.stat_result) -> dict[str, str]:
    """The build record of the library at ``path`` (checked like the library itself)."""
    record = digest_path(path)
    try:
        st = os.lstat(record)
    except FileNotFoundError:
        raise _Refused(
            f"the digest recorded when it was built ({record.name}) is missing beside it, so its "
            "bytes cannot be verified"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise _Refused(f"its build record {record} is not a regular file")
    why = _trust_problem(st, f"its build record {record.name}", ref)
    if why:
        raise _Refused(why)
    with open(record, "rb") as f:
        text = f.read(4096).decode("ascii", "replace")
    fields = dict(line.split(None, 1) for line in text.splitlines() if len(line.split(None, 1)) == 2)
    fields = {k: v.strip() for k, v in fields.items()}
    if len(fields.get("library-sha256", "")) != 64 or len(fields.get("source-sha256", "")) != 64:
        raise _Refused(f"its build record {record.name} is damaged")
    return fields


def _checked_file(path: Path) -> tuple[int, Path, str, str]:
    """Open the library for loading after every check that needs no loading; raise _Refused.

    Returns (an open descriptor of the checked file, its resolved path, its sha256, the
    source's sha256 it was built from). Links are resolved first, and the file they reach and
    its directory are what is checked, read and, later, loaded (through the descriptor, so the
    file checked is the file loaded); nothing of it is mapped or run here.
    """
    pkg = path.parent
    own = pkg / "__init__.py"
    ref = os.stat(own if own.exists() else pkg)
    linked = os.path.islink(path)
    try:
        real = Path(os.path.realpath(path, strict=True))
    except OSError as exc:
        raise _Refused(f"it is a link to a missing or unreadable file ({exc})") from None
    what = f"its link target {real}" if linked else "it"
    st = os.lstat(real)
    if not stat.S_ISREG(st.st_mode):
        raise _Refused(f"{what} is not a regular file")
    for s, name in ((st, what), (os.stat(real.parent), f"its directory {real.parent}")):
        why = _trust_problem(s, name, ref)
        if why:
            raise _Refused(why)
    if real.parent != pkg:
        why = _trust_problem(os.stat(pkg), f"its directory {pkg}", ref)
        if why:
            raise _Refused(why)
    if st.st_size > _MAX_BYTES:
        raise _Refused(f"{what} is {st.st_size} bytes, far more than the kernel")
    record = _read_record(path, ref)
    flags = (
        os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    )
    fd = os.open(real, flags)
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise _Refused(f"{what} was replaced while it was being checked")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(_MAX_BYTES + 1)
        why = _elf_problem(data)  # first: says how a cut or foreign file is damaged
        if why:
            raise _Refused(why)
        digest = hashlib.sha256(data).hexdigest()
        if digest != record["library-sha256"]:
            raise _Refused(
                f"its bytes do not match the digest recorded when it was built (sha256 {digest[:16]}..., "
                f"recorded {record['library-sha256'][:16]}...): it is damaged or was replaced"
            )
        source = pkg / "moments.c"
        if not source.is_file():
            raise _Refused(
                f"the source it was built from ({source}) is missing, so whether it is a stale build "
                "cannot be checked"
            )
        if hashlib.sha256(source.read_bytes()).hexdigest() != record["source-sha256"]:
            raise _Refused(f"it was built from another version of {source} (stale build)")
        return fd, real, digest, record["source-sha256"]
    except BaseException:
        os.close(fd)
        raise


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


def _elf_problem(data: bytes) -> str | None:
    """Why the file holding ``data`` is not a complete ELF shared library for this process.

    ``dlopen`` maps a library's segments from the file; where the file is shorter than its
    headers say, touching the missing pages kills the process with SIGBUS. So every header,
    every loaded segment and the section table must lie inside the file. Files that are not
    ELF pass where the platform does not use ELF (macOS, Windows), and fail elsewhere.
    """
    global _host_machine
    size = len(data)
    if size == 0:
        return "it is empty (0 bytes)"
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
    for k in range(e_phnum):
        p_type, p_offset, p_filesz = struct.unpack_from(ph_fmt, data, e_phoff + k * e_phentsize)
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD
            return f"it is truncated ({size} bytes; a segment ends at byte {p_offset + p_filesz})"
    return None


# The child process of _check_in_child: drop the current directory from sys.path (nothing
# planted there may be imported), load _selftest.py by its path (no klmonitor or torch import),
# and run it on the library at argv[3].
_CHILD = (
    "import sys\n"
    "sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"
    "import importlib.util\n"
    "spec = importlib.util.spec_from_file_location('_klm_selftest', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "sys.exit(module.main(sys.argv[2:]))\n"
)


def _fd_path(fd: int) -> str | None:
    """A path that opens the very file behind ``fd`` (Linux), or ``None``."""
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else None


def _check_in_child(fd: int, real: Path) -> str | None:
    """Load and self-test the library in a short-lived child process: why it failed, or ``None``.

    A damaged library may crash (SIGSEGV, an ld.so assertion) or hang when it is loaded or
    run; here that kills only the child. The child loads the file behind ``fd`` (the bytes
    the parent verified) and self-tests every body this CPU runs.
    """
    global _child_seconds
    via = _fd_path(fd)
    if not sys.executable:
        return "no Python executable is known to run its self-test in a separate process"
    cmd = [
        sys.executable,
        "-c",
        _CHILD,
        str(Path(_selftest.__file__)),
        str(_selftest.layout_path()),
        via or str(real),
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            pass_fds=(fd,) if via else (),
            capture_output=True,
            timeout=_CHILD_TIMEOUT,
            cwd=str(Path(_selftest.__file__).parent),
        )
    except subprocess.TimeoutExpired:
        return f"its self-test did not finish in {_CHILD_TIMEOUT:.0f} s (run in a separate process)"
    except OSError as exc:
        return f"the separate process that self-tests it could not start ({exc})"
    finally:
        _child_seconds = time.perf_counter() - start
    out = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode == 0 and out and out[-1] == "ok":
        return None
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"loading and self-testing it crashed a separate test process ({name})"
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    detail = out[-1] if out else (err[-1] if err else "no output")
    return f"loading and self-testing it failed in a separate test process (exit {proc.returncode}): {detail[:2000]}"


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
        try:
            fd, real, digest, source_sha = _checked_file(path)
        except _Refused as exc:
            return None, f"{path} is not loaded: {exc}. Remove it and {rebuild}"
        try:
            key = (str(real), digest)
            if key not in _verdicts:
                _verdicts[key] = _check_in_child(fd, real)
            why = _verdicts[key]
            if why:
                return None, f"{path} is not used: {why}; {rebuild}"
            lib = ctypes.CDLL(_fd_path(fd) or str(real))
        finally:
            os.close(fd)
        try:
            _selftest.bind(lib)
        except AttributeError as exc:
            return None, f"{path} is not klmonitor's kernel (it lacks a function: {exc}); {rebuild}"
        abi = lib.klm_abi_version()
        if abi != ABI_VERSION:
            return None, f"{path} has interface version {abi}, this klmonitor needs {ABI_VERSION}; {rebuild}"
        if (lib.klm_source_sha256() or b"").decode("ascii", "replace") != source_sha:
            return None, f"{path} was built from another version of moments.c than its record says; {rebuild}"
        isa = lib.klm_select_isa(want)
        if want > isa:
            log.warning(
                "klmonitor: KLMONITOR_NATIVE=avx2, but this CPU or OS lacks AVX2/FMA/F16C; using the portable body."
            )
        why = _selftest.run(lib, _layout)
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


def _reset(verdicts: bool = False) -> None:
    """Forget the load result so the next :func:`load` checks again (tests).

    With ``verdicts``, forget the child processes' verdicts too, so the next load runs one again.
    """
    global _lib, _tried, _reason
    with _lock:
        _lib, _tried, _reason = None, False, None
        if verdicts:
            _verdicts.clear()


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


def _workers(n: int) -> int:
    """Threads a C call over ``n`` tokens splits them over: torch's, one per ``_PARALLEL_FROM`` tokens at most."""
    return max(1, min(torch.get_num_threads(), n // _PARALLEL_FROM))


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
    (split over torch's thread count from 64K tokens) and Chan's merge. Inside
    :func:`diagnosing`, a matching request's diagnostics come from the same pass.
    """
    lib = load()
    if lib is None:
        raise RuntimeError(f"fold needs the fused CPU kernel, which is not available: {_reason}")
    _check_fold_args(lib, logp, ref, mask, clamp, threshold, acc)
    n = logp.numel()
    workers = _workers(n)
    request: Diagnostics | None = getattr(_pending, "request", None)
    if request is not None and not request.done and request.n == n:
        if _fold_diag(lib, request, logp, ref, mask, clamp, threshold, workers, acc):
            request.done = True
            return
    mp = mask.data_ptr() if mask is not None else None
    dt = _DTYPE_CODES[logp.dtype]
    if not lib.klm_fold(
        logp.data_ptr(), ref.data_ptr(), dt, mp, n, clamp, threshold, workers, acc.ctypes.data
    ):
        # Built without OpenMP: ctypes releases the GIL, so Python threads split the range.
        _fold_threads(lib, logp, ref, mask, clamp, threshold, workers, acc)


def token_k3(
    logp: Tensor,
    ref: Tensor,
    mask: Tensor | None,
    clamp: float,
    rows: Tensor | None = None,
    cols: int | None = None,
) -> Tensor:
    """Each token's k3 in float64, as :func:`fold` counts it.

    0 where ``mask`` is False or the log-ratio is not usable, else k3 of the log-ratio clamped
    to ``+-clamp``. ``rows`` (indices into the first dimension of ``[B, T]`` inputs): only
    those rows' first ``cols`` tokens (all ``T`` by default), ``[len(rows), min(cols, T)]``,
    read in place (no copies). For the few rows a top-sequences table shows token by token:
    one C call of microseconds, where torch's float64 ops over the same rows take a few
    hundred. Inputs as :func:`fold`'s (any shape without ``rows``).
    """
    lib = load()
    if lib is None:
        raise RuntimeError(f"token_k3 needs the fused CPU kernel, which is not available: {_reason}")
    logp, ref = logp.contiguous(), ref.contiguous()
    mask = mask.contiguous() if mask is not None else None
    acc = np.zeros(lib.klm_vector_size(), dtype=np.float64)
    _check_fold_args(lib, logp, ref, mask, clamp, 1.0, acc)
    code = _DTYPE_CODES[logp.dtype]
    if rows is None:
        out = torch.empty(logp.shape, dtype=torch.float64)
        mp = mask.data_ptr() if mask is not None else None
        lib.klm_token_k3(logp.data_ptr(), ref.data_ptr(), code, mp, logp.numel(), clamp, out.data_ptr())
        return out
    if logp.dim() != 2:
        raise ValueError(f"token_k3: rows need [B, T] inputs, got {tuple(logp.shape)}")
    b, width = logp.shape
    t = width if cols is None else max(0, min(int(cols), width))
    picked = rows.detach().to("cpu", torch.int64).contiguous().reshape(-1)
    at = picked.numpy()
    if at.size and (at.min() < 0 or at.max() >= b):
        raise ValueError(f"token_k3: rows must be in [0, {b}), got {at.tolist()}")
    out = torch.empty(picked.numel(), t, dtype=torch.float64)
    mp = mask.data_ptr() if mask is not None else None
    lib.klm_rows_k3(logp.data_ptr(), ref.data_ptr(), code, mp, width, t, picked.data_ptr(), picked.numel(), clamp, out.data_ptr())  # fmt: skip
    return out


def top_rows(scores: np.ndarray, counts: np.ndarray, k: int, floor: float) -> np.ndarray | None:
    """The (at most) ``k`` indices with the largest ``scores`` above ``floor``, best first.

    Among those with ``counts > 0``; equal scores: the first index first. ``None`` without the
    kernel. ``scores``, ``counts``: float64 arrays of one length; ``k`` at most 64.
    """
    lib = load()
    if lib is None:
        return None
    s = np.ascontiguousarray(scores, dtype=np.float64)
    c = np.ascontiguousarray(counts, dtype=np.float64)
    if s.shape != c.shape or s.ndim != 1 or not 0 < k <= 64:
        raise ValueError(f"top_rows: scores and counts must be 1-D of one length and 0 < k <= 64, got {s.shape}, {c.shape}, {k}")  # fmt: skip
    out = np.empty(k, dtype=np.int64)
    m = lib.klm_top_rows(s.ctypes.data, c.ctypes.data, s.size, k, float(floor), out.ctypes.data)
    return out[:m]


def top_sequences(
    table: Tensor,
    k: int,
    max_len: int,
    row_sum: Tensor,
    row_count: Tensor,
    logp: Tensor,
    ref: Tensor,
    mask: Tensor | None,
    ids: Tensor | None,
    clamp: float,
    step: int,
    rank: int,
) -> int | None:
    """Update a top-sequences table (``TopSequences``' window) with a ``[B, T]`` batch, in C.

    ``table``: the window's ``k`` rows of ``6 + 2 max_len`` float64 numbers, updated in place;
    ``row_sum``, ``row_count``: the batch's per-row k3 sums and valid tokens (the kernel's);
    ``logp``, ``ref``, ``mask`` as :func:`fold` read them, ``ids`` int64 ``[B, T]`` or ``None``.
    Returns how many of the batch's rows took part, or ``None`` where the inputs are not what
    the C code reads (the caller then does it in numpy).
    """
    lib = load()
    if lib is None or not 0 < k <= 64 or max_len < 1 or logp.dim() != 2 or logp.shape[1] < 1:
        return None
    b, t = logp.shape
    if not (
        all(x.is_cpu and x.is_contiguous() for x in (table, row_sum, row_count, logp, ref))
        and table.dtype == row_sum.dtype == row_count.dtype == torch.float64
        and table.numel() == k * (6 + 2 * max_len)
        and row_sum.numel() == row_count.numel() == b
        and ref.shape == logp.shape
        and logp.dtype == ref.dtype
        and logp.dtype in _DTYPE_CODES
        and lib.klm_reads_dtype(_DTYPE_CODES[logp.dtype])
        and (mask is None or (mask.is_cpu and mask.is_contiguous() and mask.dtype in _MASK_DTYPES and mask.shape == logp.shape))
        and (ids is None or (ids.is_cpu and ids.is_contiguous() and ids.dtype == torch.int64 and ids.shape == logp.shape))
        and clamp > 0
    ):  # fmt: skip
        return None
    scratch = np.empty(2 * table.numel())
    return int(
        lib.klm_top_sequences(
            table.data_ptr(),
            k,
            max_len,
            row_sum.data_ptr(),
            row_count.data_ptr(),
            b,
            t,
            logp.data_ptr(),
            ref.data_ptr(),
            _DTYPE_CODES[logp.dtype],
            mask.data_ptr() if mask is not None else None,
            ids.data_ptr() if ids is not None else None,
            clamp,
            float(step),
            float(rank),
            scratch.ctypes.data,
        )  # fmt: skip
    )


def ratio_range(logp: Tensor, ref: Tensor, mask: Tensor | None) -> Tensor | None:
    """The rollout check's ratio range of a batch in one C pass, or ``None`` where C does not read it.

    ``[min l, max l, count of |l| > ln 2]`` (float64) over the tokens where ``mask`` is true
    (every token for ``None``) and ``l = ref - logp`` is finite, ``l`` in float32 as
    :func:`klmonitor.estimators.log_ratio` takes these inputs (two of float32, bf16 and fp16
    that differ are both widened to float32, exactly); ``inf``, ``-inf``, 0 where no token is
    usable: what :class:`klmonitor.diagnostics.RatioRange` folds. ``None`` (the caller uses
    torch) unless both are CPU tensors of one shape of those dtypes, and ``mask`` a bool or
    uint8 tensor of that shape; non-contiguous ones are copied.
    """
    lib = load()
    if lib is None:
        return None
    if not (
        logp.is_cpu and ref.is_cpu and logp.shape == ref.shape
        and logp.dtype in _DTYPE_CODES and ref.dtype in _DTYPE_CODES
        and (mask is None or (mask.is_cpu and mask.dtype in _MASK_DTYPES and mask.shape == logp.shape))
    ):  # fmt: skip
        return None
    if logp.dtype != ref.dtype:
        logp, ref = logp.float(), ref.float()
    logp, ref = logp.contiguous(), ref.contiguous()
    mask = mask.contiguous() if mask is not None else None
    n = logp.numel()
    out = torch.empty(3, dtype=torch.float64)
    workers = _workers(n)
    mp = mask.data_ptr() if mask is not None else None
    lib.klm_ratio_range(
        logp.data_ptr(), ref.data_ptr(), _DTYPE_CODES[logp.dtype], mp, n, workers, out.data_ptr()
    )
    return out


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


#: Most position buckets the kernel sums in its pass.
MAX_BUCKETS = _selftest.MAX_BUCKETS
_pending = threading.local()


@dataclass
class Diagnostics:
    """Diagnostics the next :func:`fold` of ``n`` tokens on this thread computes in its own pass.

    Each output is a contiguous float64 CPU tensor that the kernel adds to in place (``None``:
    that part off): per row of ``row_len`` tokens, the k3 sum and valid tokens (``row_sum``,
    ``row_count``, ``[n / row_len]``); per position bucket (0-1, 2-3, 4-7, ..., the last open;
    at most :data:`MAX_BUCKETS`) the same (``bucket_sum``, ``bucket_count``); per token id of
    ``ids`` (int64, ``n``) in ``[0, vocab)`` the same (``token_sum``, ``token_count``), and the
    valid tokens with an id outside in ``outside`` (one number). k3 is each token's, as the
    moments use it (clamped; 0 where masked or non-finite; exact in float64 above |l| = 30).
    ``done`` turns true when a fold computed them; where no fold did (another backend took
    the batch), the outputs are untouched. ``scratch`` (optional, with ``ids``): float64 zeros
    the kernel's threads scatter into (a multiple of ``2 * vocab``, one table per thread; left
    zero), kept by the caller across calls so that no call allocates and clears its tables;
    without it each call allocates them.
    ``entropy`` (optional, 3 float64 numbers: count, mean and M2
    of ``-logp``, as :class:`klmonitor.diagnostics.EntropyMoments` keeps them): the batch's
    masked-in tokens with both log-probs finite are merged into it (Chan's rule).
    """

    n: int
    row_len: int = 0
    row_sum: Tensor | None = None
    row_count: Tensor | None = None
    bucket_sum: Tensor | None = None
    bucket_count: Tensor | None = None
    ids: Tensor | None = None
    token_sum: Tensor | None = None
    token_count: Tensor | None = None
    outside: Tensor | None = None
    scratch: Tensor | None = None
    entropy: Tensor | None = None
    done: bool = False

    def _struct(self) -> _selftest.Diag:
        """The ``klm_diag`` of these outputs, after checking each (raise ValueError)."""

        def buf(t: Tensor | None, name: str, size: int, dtype: torch.dtype = torch.float64) -> int | None:
            if t is None:
                return None
            if not (isinstance(t, Tensor) and t.is_cpu and t.is_contiguous() and t.dtype == dtype):
                raise ValueError(f"Diagnostics.{name} must be a contiguous CPU {dtype} tensor")
            if t.numel() != size:
                raise ValueError(f"Diagnostics.{name} has {t.numel()} elements, not {size}")
            return int(t.data_ptr())

        n, row_len = self.n, self.row_len
        if row_len < 0 or (row_len and n % row_len):
            raise ValueError(f"Diagnostics: {n} tokens do not split into rows of {row_len}")
        rows = n // row_len if row_len else 0
        if (self.row_sum is None) != (self.row_count is None) or (self.row_sum is not None and not row_len):
            raise ValueError("Diagnostics: row_sum and row_count go together, with row_len > 0")
        buckets = 0 if self.bucket_sum is None else self.bucket_sum.numel()
        if buckets and not (row_len and buckets <= MAX_BUCKETS and self.bucket_count is not None):
            raise ValueError(
                f"Diagnostics: position buckets need row_len > 0 and at most {MAX_BUCKETS} buckets"
            )
        vocab = 0 if self.token_sum is None else self.token_sum.numel()
        if (self.ids is None) != (self.token_sum is None) or (vocab == 0 and self.ids is not None):
            raise ValueError("Diagnostics: ids and token_sum go together (with token_count and outside)")
        return _selftest.Diag(
            row_len,
            buf(self.row_sum, "row_sum", rows),
            buf(self.row_count, "row_count", rows),
            buckets,
            buf(self.bucket_sum, "bucket_sum", buckets),
            buf(self.bucket_count, "bucket_count", buckets),
            buf(self.ids, "ids", n if self.ids is not None else 0, torch.int64),
            vocab,
            buf(self.token_sum, "token_sum", vocab),
            buf(self.token_count, "token_count", vocab) if self.ids is not None else None,
            buf(self.outside, "outside", 1) if self.ids is not None else None,
            *self._scratch(vocab),
            buf(self.entropy, "entropy", 3),
        )

    def _scratch(self, vocab: int) -> tuple[int | None, int]:
        t = self.scratch
        if t is None or self.ids is None:
            return None, 0
        if not (isinstance(t, Tensor) and t.is_cpu and t.is_contiguous() and t.dtype == torch.float64):
            raise ValueError("Diagnostics.scratch must be a contiguous CPU float64 tensor")
        if t.numel() < 2 * vocab or t.numel() % (2 * vocab):
            raise ValueError(
                f"Diagnostics.scratch has {t.numel()} elements, not a multiple of 2 * vocab = {2 * vocab}"
            )
        return int(t.data_ptr()), t.numel() // (2 * vocab)


@contextmanager
def diagnosing(request: Diagnostics | None) -> Iterator[Diagnostics | None]:
    """Ask the first :func:`fold` of ``request.n`` tokens on this thread, in the block, for ``request``.

    ``None`` asks for nothing; the request's ``done`` says whether a fold computed it.
    """
    before = getattr(_pending, "request", None)
    _pending.request = request
    try:
        yield request
    finally:
        _pending.request = before


def _fold_diag(lib: ctypes.CDLL, request: Diagnostics, logp: Tensor, ref: Tensor, mask: Tensor | None,
               clamp: float, threshold: float, workers: int, acc: np.ndarray) -> bool:  # fmt: skip
    """:func:`fold` with ``request``'s diagnostics in the same pass; False where the kernel refused."""
    d = request._struct()
    mp = mask.data_ptr() if mask is not None else None
    args = (logp.data_ptr(), ref.data_ptr(), _DTYPE_CODES[logp.dtype], mp, logp.numel(), clamp, threshold)
    rc = lib.klm_fold_diag(*args, workers, acc.ctypes.data, ctypes.byref(d))
    if rc == 0:  # built without OpenMP: one thread reads the batch (the diagnostics' sums are shared)
        rc = lib.klm_fold_diag(*args, 1, acc.ctypes.data, ctypes.byref(d))
    return bool(rc == 1)
