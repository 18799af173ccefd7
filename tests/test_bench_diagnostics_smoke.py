"""Smoke run of benchmarks/bench_diagnostics.py: it runs, its JSON has every row, the floor builds.

No timing is asserted: the figures belong to benchmarks/README.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_diagnostics.py"
ARGS = ["--rows", "32", "--cols", "64", "--rounds", "1", "--repeat", "1", "--batches", "2", "--json"]


def _run(*extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *ARGS, *extra], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def test_rows_and_floor() -> None:
    out = _run()
    assert out["tokens"] == 32 * 64
    rows = {r["config"]: r for r in out["rows"]}
    assert {"base (all off)", "top_tokens=5", "top_sequences=5", "token ids read once"} <= set(rows)
    assert rows["base (all off)"]["extra_vs_base"] == 0.0
    for r in rows.values():
        assert r["ms"] > 0
    if shutil.which("cc") or shutil.which("gcc"):  # the floor is built with the C compiler
        assert rows["floor: inputs read, no table"]["extra_vs_base"] is None
        assert isinstance(rows["floor: + scatter (sum, count)"]["extra_vs_base"], float)


def test_no_floor() -> None:
    rows = {r["config"] for r in _run("--no-floor")["rows"]}
    assert not any(name.startswith("floor") for name in rows)
