"""The native kernel's loader against damaged, planted and subtly wrong libraries (issue 20).

Every case runs in one child process (tests/test_native.py's runner), so a library that crashes
the process that loads it cannot take this test down with it: each case must end with training
on the torch path's numbers after one message, or with the kernel used and agreeing with it,
never with a crash, a hang, or foreign code run in the training process.

Controls show each fault is real: the crashing libraries kill a process that loads and runs
them directly, and the libraries wrong at some sizes pass the loader's former self-test (one
203-token batch).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_native import (
    _RUNNER,
    AS_ROOT,
    LIB,
    NATIVE_DIR,
    NOT_USED,
    ROOT,
    _compiler,
    _nobody,
    _same,
    _summary,
)
from test_native import _native_copy as native_copy
from test_stats import BACKEND_RTOL, assert_summaries_match

from klmonitor import _native
from klmonitor._native import _selftest

needs_cc = pytest.mark.skipif(_compiler() is None, reason="no C compiler to build test libraries")


def _setup_flags() -> list[str]:
    """setup.py's compile flags (its FLAGS list, its baseline -march and OpenMP), read from it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    flags: list[str] = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "FLAGS" for t in node.targets)
    )
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-march=x86-64", "-mtune=generic"]
    return [*flags, "-fopenmp"]


def _build(out: Path, source: str) -> bytes:
    """Compile ``source`` (C text that may #include moments.c) as setup.py compiles moments.c."""
    src = out.with_suffix(".c")
    src.write_text(source)
    digest = hashlib.sha256((NATIVE_DIR / "moments.c").read_bytes()).hexdigest()
    cmd = [
        _compiler() or "cc", *_setup_flags(), "-shared", "-fPIC", f'-DKLM_SOURCE_SHA256="{digest}"',
        "-o", str(out), str(src), "-lm",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    except subprocess.CalledProcessError:  # a compiler without OpenMP: as setup.py's fallback
        subprocess.run([c for c in cmd if c != "-fopenmp"], check=True, capture_output=True, timeout=300)
    return out.read_bytes()


# moments.c with its klm_fold (what klmonitor calls for every batch) wrapped by a fault, or
# klm_token_moments (each slice of a split) wrapped by one.
_WRAP_FOLD = """
#include <signal.h>
#define klm_fold klm_fold_real
#include "{source}"
#undef klm_fold
int klm_fold(const void* logp, const void* ref, int dtype, const uint8_t* mask, int64_t n,
             float clamp, float threshold, int nthreads, double* acc) {{
    {before}
    int r = klm_fold_real(logp, ref, dtype, mask, n, clamp, threshold, nthreads, acc);
    {after}
    return r;
}}
"""
_CRASH_ON_LOAD = """
#include <signal.h>
#include "{source}"
__attribute__((constructor)) static void crash(void) {{ raise(SIGSEGV); }}
"""


def _wrong_in_split(source: str) -> str:
    """moments.c whose later slices of a split (lo > 0) add 0.01 to each token's shifted k2."""
    head = "void klm_token_moments(const void* logp"
    assert source.count(head) == 1
    out = source.replace(head, "static void token_moments_true(const void* logp")
    wrapper = """
void klm_token_moments(const void* logp, const void* ref, int dtype, const uint8_t* mask,
                       int64_t lo, int64_t hi, const float* shift, float clamp, float threshold,
                       double* out) {
    token_moments_true(logp, ref, dtype, mask, lo, hi, shift, clamp, threshold, out);
    if (lo > 0) out[1] += 0.01 * (double)(hi - lo);
}
"""
    marker = "/* The moments-vector layout of klmonitor/_layout.py"
    assert out.count(marker) == 1
    return out.replace(marker, wrapper + marker)


def _flipped(data: bytes, offset: int, width: int = 64) -> bytes:
    out = bytearray(data)
    for k in range(offset, min(offset + width, len(out))):
        out[k] ^= 0xFF
    return bytes(out)


# Offsets (fractions of the file) where 64 bytes are inverted: headers, code, data, tables.
_CORRUPT_AT = [0.002, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]

# Runs a library directly, as the former loader did in the training process: load it, then
# run the self-test on it with each body; the exit status says whether that process survived.
_DIRECT = textwrap.dedent(
    """
    import ctypes, sys
    sys.path.insert(0, sys.argv[1])
    import _selftest
    lib = ctypes.CDLL(sys.argv[2])
    _selftest.bind(lib)
    layout = _selftest._load_layout(str(_selftest.layout_path()))
    print([lib.klm_select_isa(isa) is None or _selftest.run(lib, layout) for isa in (0, 1)])
    """
)


def _run_directly(lib: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _DIRECT, str(NATIVE_DIR), str(lib)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _cases(root: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    assert LIB is not None
    good = LIB.read_bytes()
    cases: list[dict[str, Any]] = []
    expect: dict[str, dict[str, Any]] = {}

    def add(name: str, d: Path, use: bool | None, why: str = "", **kw: Any) -> None:
        cases.append({"name": name, "dir": str(d), "env": kw.pop("env", {}), **kw.pop("case", {})})
        expect[name] = {"use": use, "why": why, **kw}

    add("intact", native_copy(root, "intact", good), True)
    # Bytes damaged after the build: the recorded digest refuses them before anything is loaded.
    for frac in _CORRUPT_AT:
        off = int(frac * len(good))
        add(f"corrupt_{off}", native_copy(root, f"corrupt_{off}", _flipped(good, off), good), False, "digest")
    # The same damage with a record that matches it (a broken build, or record and library
    # damaged alike): the child process meets it; it may crash there, never here.
    for frac in _CORRUPT_AT:
        off = int(frac * len(good))
        add(
            f"corrupt_recorded_{off}", native_copy(root, f"corrupt_recorded_{off}", _flipped(good, off)), None
        )
    add("record_missing", native_copy(root, "record_missing", good), False, "is missing beside it")
    os.unlink(Path(cases[-1]["dir"]) / (LIB.name + _native.DIGEST_SUFFIX))
    add(
        "record_of_other_bytes",
        native_copy(root, "record_of_other_bytes", good, good + b"\0"),
        False,
        "digest",
    )
    d = native_copy(root, "source_missing", good)
    os.unlink(d / "moments.c")
    add("source_missing", d, False, "is missing, so whether it is a stale build")
    # Directories writable by others, and (as root) owned by another user.
    for mode, who in ((0o777, "its group and all users"), (0o775, "its group (mode")):
        d = native_copy(root, f"dir_writable_{mode:o}", good)
        os.chmod(d, mode)
        add(f"dir_writable_{mode:o}", d, False, f"its directory {d} is writable by {who}")
    if AS_ROOT:
        d = native_copy(root, "dir_other_owner", good)
        os.chown(d, _nobody(), -1)
        add("dir_other_owner", d, False, "its directory")
    # Links: to an intact copy in a safe directory (used: the file reached passes every check);
    # to a library planted in a world-writable directory, and to a planted library whose bytes
    # are not the recorded ones: refused before they are loaded (their constructor never runs).
    safe = root / "safe"
    safe.mkdir()
    (safe / "copy.so").write_bytes(good)
    d = native_copy(root, "link_to_intact", None)
    os.symlink(safe / "copy.so", d / LIB.name)
    (d / (LIB.name + _native.DIGEST_SUFFIX)).write_text(_record(good))
    add("link_to_intact", d, True)
    if _compiler() is not None:
        plant_c = """
#include <stdio.h>
#include <stdlib.h>
#include "{source}"
__attribute__((constructor)) static void planted(void) {{
    const char* path = getenv("KLM_TEST_MARKER");
    FILE* f = path ? fopen(path, "w") : NULL;
    if (f) {{ fputs("planted code ran", f); fclose(f); }}
}}
"""
        plant = _build(root / "plant.so", plant_c.format(source=NATIVE_DIR / "moments.c"))
        shared = root / "shared"
        shared.mkdir()
        os.chmod(shared, 0o1777)
        (shared / "plant.so").write_bytes(plant)
        d = native_copy(root, "link_into_shared_dir", None)
        os.symlink(shared / "plant.so", d / LIB.name)
        (d / (LIB.name + _native.DIGEST_SUFFIX)).write_text(_record(plant))
        env = {"KLM_TEST_MARKER": str(root / "ran_shared")}
        add(
            "link_into_shared_dir",
            d,
            False,
            "shared is writable by its group and all users",
            env=env,
            marker=root / "ran_shared",
        )
        (safe / "plant.so").write_bytes(plant)
        d = native_copy(root, "link_to_other_bytes", None)
        os.symlink(safe / "plant.so", d / LIB.name)
        (d / (LIB.name + _native.DIGEST_SUFFIX)).write_text(_record(good))
        env = {"KLM_TEST_MARKER": str(root / "ran_other_bytes")}
        add("link_to_other_bytes", d, False, "digest", env=env, marker=root / "ran_other_bytes")
        # Libraries that crash or hang, each with a record that matches it.
        src = NATIVE_DIR / "moments.c"
        faults = {
            "crash_on_load": (_CRASH_ON_LOAD.format(source=src), "crashed a separate test process (SIGSEGV)"),
            "crash_above_1000_tokens": (
                _WRAP_FOLD.format(source=src, before="if (n > 1000) raise(SIGSEGV);", after=""),
                "crashed a separate test process (SIGSEGV)",
            ),
            "hang_at_513_tokens": (
                _WRAP_FOLD.format(
                    source=src, before='if (n == 513) for (;;) __asm__ volatile("");', after=""
                ),
                "did not finish in 20 s",
            ),
            # Wrong only above one block of 512 tokens, or only in the slices of a split: the
            # former self-test (one batch of 203 tokens, one thread) passed both.
            "wrong_above_512_tokens": (
                _WRAP_FOLD.format(source=src, before="", after="if (n > 512) acc[2] += 0.01;"),
                "wrong numbers on a 513-token float32",
            ),
            "wrong_in_split": (_wrong_in_split(src.read_text()), "wrong numbers on a 140001-token float32"),
        }
        for name, (text, why) in faults.items():
            lib = _build(root / f"{name}.so", text)
            case = {"timeout": 20.0} if name.startswith("hang") else {}
            add(name, native_copy(root, name, lib), False, why, case=case, control=str(root / f"{name}.so"))
    return cases, expect


def _record(lib: bytes) -> str:
    source = hashlib.sha256((NATIVE_DIR / "moments.c").read_bytes()).hexdigest()
    return f"library-sha256 {hashlib.sha256(lib).hexdigest()}\nsource-sha256 {source}\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if LIB is None or not _native.available():
        pytest.skip(f"native kernel unavailable: {_native.unavailable_reason()}")
    root = tmp_path_factory.mktemp("loader")
    os.chmod(root, 0o755)
    cases, expect = _cases(root)
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout)
    return {"results": {r["name"]: r for r in out["results"]}, "expect": expect}


def _check(got: dict[str, Any], want: dict[str, Any]) -> None:
    refused = [m for m in got["messages"] if NOT_USED in m]
    use = got["available"] if want["use"] is None else want["use"]
    assert got["available"] is use, got["reason"]
    for dtype in ("float32", "bfloat16"):
        auto, plain = got[f"auto_{dtype}"], got[f"torch_{dtype}"]
        if use:
            assert_summaries_match(_summary(auto), _summary(plain), rtol=BACKEND_RTOL)
        else:
            assert _same(auto, plain), dtype  # the torch path ran: bit for bit its numbers
    if use:
        assert got["reason"] is None and refused == []
    else:
        assert want["why"] in got["reason"], got["reason"]
        assert len(refused) == 1 and want["why"] in refused[0], got["messages"]
        assert "pure-torch path" in refused[0]
    if "marker" in want:
        assert not want["marker"].exists(), "a planted library's constructor ran"


BASIC = [
    "intact", "record_missing", "record_of_other_bytes", "source_missing", "dir_writable_777",
    "dir_writable_775", "dir_other_owner", "link_to_intact", "link_into_shared_dir", "link_to_other_bytes",
]  # fmt: skip
FAULTY = [
    "crash_on_load",
    "crash_above_1000_tokens",
    "hang_at_513_tokens",
    "wrong_above_512_tokens",
    "wrong_in_split",
]


@pytest.mark.parametrize("case", BASIC + FAULTY)
def test_loader_fault_ends_on_the_torch_path_or_a_checked_kernel(case: str, results: dict[str, Any]) -> None:
    if case not in results["expect"]:
        pytest.skip("needs root (files of another uid) or a C compiler (test libraries)")
    _check(results["results"][case], results["expect"][case])


@needs_cc
@pytest.mark.parametrize("case", FAULTY)
def test_faulty_libraries_are_real_faults(case: str, results: dict[str, Any]) -> None:
    # Controls: loaded and run directly (as the former loader did, in the training process),
    # the crashing ones kill the process, the hanging one does not finish, and the wrong ones
    # pass the former self-test (one 203-token batch, one thread) yet fail the current one.
    lib = Path(results["expect"][case]["control"])
    if case.startswith("hang"):
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(
                [sys.executable, "-c", _DIRECT, str(NATIVE_DIR), str(lib)], capture_output=True, timeout=20
            )
        return
    run = _run_directly(lib)
    if case.startswith("crash"):
        assert run.returncode < 0, (run.returncode, run.stdout, run.stderr[-2000:])
        return
    assert run.returncode == 0 and run.stdout.count("wrong numbers") == 2, run.stdout
    old = subprocess.run(
        [sys.executable, "-c", _FORMER_SELF_TEST, str(NATIVE_DIR), str(lib)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert old.returncode == 0 and old.stdout.strip() == "None", (old.stdout, old.stderr[-2000:])


# The former self-test: the 203-token batch alone, one thread, float32 and bf16.
_FORMER_SELF_TEST = textwrap.dedent(
    """
    import ctypes, sys
    sys.path.insert(0, sys.argv[1])
    import _selftest
    lib = ctypes.CDLL(sys.argv[2])
    _selftest.bind(lib)
    _selftest.SIZES = ()
    print(_selftest.run(lib, _selftest._load_layout(str(_selftest.layout_path()))))
    """
)


def test_corrupted_libraries_never_crash_training(results: dict[str, Any]) -> None:
    # 16 places in the library, 64 bytes inverted at each. Against the intact build's record
    # every copy is refused before it is loaded. With a record that matches the damage, the
    # child process meets it: refused (often after crashing the child) or, where the damage
    # missed everything that runs, used with the torch path's numbers. Training always ends.
    got, expect = results["results"], results["expect"]
    names = [n for n in expect if n.startswith("corrupt_")]
    assert len(names) == 2 * len(_CORRUPT_AT)
    for name in names:
        _check(got[name], expect[name])
    crashed = [n for n in names if "crashed a separate test process" in (got[n]["reason"] or "")]
    assert crashed, "no corruption crashed the child: the crash path went untested"


def test_corruptions_that_crash_kill_a_process_that_loads_them(
    results: dict[str, Any], tmp_path: Path
) -> None:
    # Control for the test above: each corruption the loader saw crash its child also kills a
    # process that loads and self-tests it directly, as the former loader did in training.
    assert LIB is not None
    good = LIB.read_bytes()
    got = results["results"]
    crashed = [n for n in got if n.startswith("corrupt_recorded_") and "crashed" in (got[n]["reason"] or "")]
    assert crashed
    for name in crashed:
        path = tmp_path / f"{name}.so"
        path.write_bytes(_flipped(good, int(name.rsplit("_", 1)[1])))
        run = _run_directly(path)
        assert run.returncode != 0, name


def test_verdict_is_cached_per_path_and_digest(results: dict[str, Any]) -> None:
    # The child runs once per (path, sha256) in a process: the intact case paid for it.
    intact = results["results"]["intact"]
    assert intact["child_seconds"] is not None and 0 < intact["child_seconds"] < 60
    code = textwrap.dedent(
        """
        import json
        from klmonitor import _native
        calls = []
        real = _native._check_in_child
        _native._check_in_child = lambda *a: calls.append(1) or real(*a)
        first = _native.available()
        for _ in range(3):
            _native._reset()
            _native.available()
        _native._reset(verdicts=True)
        again = _native.available()
        print(json.dumps([first, again, len(calls)]))
        """
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == [True, True, 2]


def test_self_test_sizes_cover_tails_blocks_and_the_split() -> None:
    assert {1, 7, 8, 511, 512, 513, 4097} <= set(_selftest.SIZES)
    assert max(_selftest.SIZES) >= 2 * _native._PARALLEL_FROM  # the loader splits from here


def test_setup_writes_the_build_record() -> None:
    # The worktree's build (setup.py build_ext --inplace) left the record beside the library.
    assert LIB is not None
    record = dict(
        line.split() for line in (LIB.parent / (LIB.name + _native.DIGEST_SUFFIX)).read_text().splitlines()
    )
    assert record["library-sha256"] == hashlib.sha256(LIB.read_bytes()).hexdigest()
    assert record["source-sha256"] == hashlib.sha256((NATIVE_DIR / "moments.c").read_bytes()).hexdigest()
