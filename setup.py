"""Build step of klmonitor: the optional fused CPU kernel. The metadata is in pyproject.toml.

``klmonitor/_native/moments.c`` is compiled here, once, when the package is installed
(``pip install .``, ``pip install -e .``, ``pip wheel .``, ``python setup.py build_ext
--inplace``) into ``klmonitor/_native/_klm_moments*.so``, a plain shared library that
``klmonitor._native`` loads with ctypes (no Python C API). Nothing is compiled at run time.

The extension is optional: where no C compiler works, the build prints why and the install
succeeds without it; klmonitor then says so once at first use and runs its pure-torch path,
which gives the same numbers.

No ``-march=native``: the library is built for the baseline of its architecture (x86-64:
SSE2), with its AVX2+FMA+F16C functions compiled for that target alone and chosen at run time
from cpuid (see moments.c), so one binary runs on every CPU of a mixed cluster.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = "klmonitor/_native/moments.c"
# Value-safe for this kernel: it never relies on errno, signed zeros or FP traps, and its
# float block sums are reassociated on purpose (see moments.c).
FLAGS = [
    "-O3",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-ffp-contract=fast",
]


def _baseline_arch() -> list[str]:
    """Pin the baseline target, overriding any -march inherited from Python's own CFLAGS."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-march=x86-64", "-mtune=generic"]
    return []


def _attempts() -> list[tuple[str, list[str], list[str]]]:
    """(label, extra compile args, extra link args), tried in order until one builds.

    With OpenMP the kernel splits large batches over the OpenMP runtime torch itself loads
    (libgomp), sharing its worker threads; without it, klmonitor splits them over Python
    threads (ctypes releases the GIL), a little slower on small batches.
    """
    arch = _baseline_arch()
    out = [("OpenMP", [*arch, "-fopenmp"], ["-fopenmp"]), ("no OpenMP", arch, [])]
    if arch:
        out.append(("default target, no OpenMP", [], []))
    return out


class OptionalBuildExt(build_ext):
    """Build the kernel if a compiler allows; never fail the install because of it."""

    def run(self) -> None:
        """Build, copying in place where asked; on any failure, say why and carry on."""
        try:
            super().run()
        except Exception as exc:  # e.g. no compiler at all, or a read-only source tree
            self._skip(f"{type(exc).__name__}: {exc}")

    def build_extension(self, ext: Extension) -> None:
        """Try :func:`_attempts` in order; if none builds, say why and carry on."""
        errors = []
        base_args = list(ext.extra_compile_args)
        for label, compile_extra, link_extra in _attempts():
            ext.extra_compile_args = [*base_args, *compile_extra]
            ext.extra_link_args = list(link_extra)
            try:
                super().build_extension(ext)
                _write_record(Path(self.get_ext_fullpath(ext.name)))
                return
            except Exception as exc:
                errors.append(f"{label}: {type(exc).__name__}: {exc}")
        self._skip("; ".join(errors))

    def copy_file(self, infile: Any, outfile: Any, *args: Any, **kwargs: Any) -> Any:
        """Replace the library in place atomically (``--inplace``, editable installs).

        Overwriting it would truncate the file under any running process that has it mapped
        (killing it with SIGBUS); a new file renamed over the old leaves that one intact.
        """
        if not str(outfile).endswith(tuple(EXTENSION_SUFFIXES)):
            return super().copy_file(infile, outfile, *args, **kwargs)
        tmp = f"{outfile}.{os.getpid()}.tmp"
        try:
            _, copied = super().copy_file(infile, tmp, *args, **kwargs)
            os.replace(tmp, outfile)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _write_record(Path(outfile))
        return outfile, copied

    def _skip(self, why: str) -> None:
        print(
            "klmonitor: the optional fused CPU kernel (klmonitor/_native/moments.c) was not "
            f"built ({why}). The install continues without it: klmonitor will use its pure-torch "
            "path, which gives the same numbers, more slowly on CPU. To build the kernel, install "
            "a C compiler (gcc or clang; set CC to choose one) and reinstall klmonitor.",
            file=sys.stderr,
        )


def _source_hash() -> str:
    return hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()


def _write_record(library: Path) -> None:
    """Record the built library's sha256 and its source's beside it (``<library>.sha256``).

    klmonitor's loader compares the library's bytes with it before it loads anything (a
    damaged or replaced file is refused), and the source hash with ``moments.c`` (a stale
    build is refused, as is one whose ``moments.c`` is missing). Written to a new file renamed
    over the old, like the library.
    """
    record = library.with_name(library.name + ".sha256")
    text = (
        f"library-sha256 {hashlib.sha256(library.read_bytes()).hexdigest()}\nsource-sha256 {_source_hash()}\n"
    )
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, record)


setup(
    ext_modules=[
        Extension(
            "klmonitor._native._klm_moments",
            sources=[SOURCE],
            extra_compile_args=FLAGS,
            libraries=[] if sys.platform == "win32" else ["m"],  # expm1 (the exact double path)
            define_macros=[("KLM_SOURCE_SHA256", f'"{_source_hash()}"')],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
