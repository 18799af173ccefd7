"""Smoke run of the benchmark script: it runs, its JSON is complete, naive and ours agree.

No timing is asserted: timings belong to benchmarks/README.md, not to tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_stats.py"
QUANTITIES = ("k1", "k2", "k3", "kl_pq", "r_minus_1", "k2_minus_k3")
ROW_KEYS = {
    "label",
    "before_each_call",
    "tokens",
    "valid_tokens",
    "dtype",
    "backend",
    "native_used",
    "rounds",
    "naive_ms",
    "ours_ms",
    "floor_ms",
    "naive_over_ours",
    "ours_over_floor",
    "floor_masksum_ms",
    "ours_over_floor_masksum",
    "agreement",
    "ours_vs_float64",
    "values",
}


@pytest.fixture(scope="module")
def result() -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def test_top_level_keys(result: dict) -> None:
    assert {"meta", "rows", "targets", "fixed_overhead_us", "memory"} <= set(result)
    meta = result["meta"]
    assert meta["quick"] is True
    assert isinstance(meta["native_available"], bool)
    assert meta["torch_threads"] >= 1
    # --quick stops below the 4M-token target size; the key is there, empty.
    assert result["targets"] == []


def test_rows_cover_sizes_and_variants(result: dict) -> None:
    rows = result["rows"]
    assert {r["tokens"] for r in rows} >= {10_000, 100_000, 1_000_000}
    variants = {(r["label"], r["before_each_call"]) for r in rows}
    assert {
        ("float32", "torch-op"),
        ("bf16", "torch-op"),
        ("float32 backend=torch", "torch-op"),
        ("float32", "idle"),
    } <= variants
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        for key in (
            "naive_ms",
            "ours_ms",
            "floor_ms",
            "floor_masksum_ms",
            "naive_over_ours",
            "ours_over_floor",
        ):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        assert row["valid_tokens"] == row["values"]["ours"]["tokens"]
        # The mask density is 0.8.
        assert 0.7 * row["tokens"] < row["valid_tokens"] < 0.9 * row["tokens"]


def _assert_close(a: dict, b: dict, mean_se: float, mean_rel: float, var_rel: float) -> None:
    n = b["tokens"]
    for q in QUANTITIES:
        se = math.sqrt(b[q]["var"] / n)
        tol = max(mean_se * se, mean_rel * abs(b[q]["mean"]))
        assert abs(a[q]["mean"] - b[q]["mean"]) <= tol, (q, a[q], b[q])
        assert a[q]["var"] == pytest.approx(b[q]["var"], rel=var_rel), (q, a[q], b[q])
    assert a["tokens"] == b["tokens"]
    assert a["nonfinite"] == b["nonfinite"] == 0
    assert a["max_abs_log_ratio"] == pytest.approx(b["max_abs_log_ratio"], rel=1e-6)


def test_naive_and_ours_agree(result: dict) -> None:
    for row in result["rows"]:
        values = row["values"]
        _assert_close(values["naive"], values["ours"], mean_se=0.1, mean_rel=1e-3, var_rel=1e-3)
        assert row["agreement"]["max_in_tolerance_units"] <= 1.0


def test_ours_matches_float64(result: dict) -> None:
    for row in result["rows"]:
        values = row["values"]
        _assert_close(values["ours"], values["float64"], mean_se=0.01, mean_rel=1e-4, var_rel=1e-4)


def test_memory_section(result: dict) -> None:
    memory = result["memory"]
    assert memory["steady"], "no steady-state memory measurement"
    for s in memory["steady"]:
        assert {"rss_before_mib", "rss_after_mib", "rss_growth_mib", "updates", "state_bytes"} <= set(s)
        assert s["window_tokens"] > 0
    variants = {p["variant"] for p in memory["peak_per_call"]}
    assert {"naive float32", "ours float32", "ours bf16", "ours float32 backend=torch"} <= variants
    overhead = result["fixed_overhead_us"]
    assert {"naive", "ours", "ours_update_only", "floor"} <= set(overhead)


def test_cuda_benchmark_logic_runs_on_cpu() -> None:
    # bench_cuda.py is for a GPU; --device cpu runs the same code paths (timing, bandwidth,
    # agreement with float64, the report) so it cannot rot on CPU-only CI.
    script = SCRIPT.with_name("bench_cuda.py")
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--backends", "torch", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout)
    assert out["device"] == "cpu" and out["copy_gb_per_s"] > 0
    assert [(r["tokens"], r["dtype"]) for r in out["rows"]] == [
        (10_000, "float32"),
        (100_000, "float32"),
        (100_000, "bf16"),
    ]
    for row in out["rows"]:
        ours = row["backends"]["torch"]
        assert ours["ms"] > 0 and ours["gb_per_s"] > 0
        assert ours["naive_over_ours"] == pytest.approx(row["naive_ms"] / ours["ms"])
        assert row["agreement_vs_float64"]["torch"] <= 1.0
    assert out["sync"]["torch"].startswith("not checked")


def test_collective_benchmark_counts_bytes_that_do_not_grow_with_the_vocabulary_times_ranks() -> None:
    # bench_collective.py in a real 2-process gloo run, small vocabulary: the per-rank sizes it
    # records are those the configuration gives, and the issue-26 bound holds: with every
    # diagnostic on, a rank receives the additive table once plus the small gather per rank.
    from klmonitor._layout import SIZE

    script = SCRIPT.with_name("bench_collective.py")
    vocab = 1000
    proc = subprocess.run(
        [sys.executable, str(script), "--vocab", str(vocab), "--worlds", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout)
    got = out["measured"]["2"]
    name = f"top_tokens=10 (vocab {vocab:,})"
    table = 8 * (2 * vocab + 1)
    # header, three moments vectors (main, rollout, update), ratio min and max, the entropy's 3
    small = 8 * (2 + 3 * SIZE + 2 + 3)
    assert got[name]["after"]["calls"] == ["all_gather", "all_reduce"]
    assert got[name]["after"]["gathered"] == small
    assert got[name]["after"]["summed"] == table + 8 * (1 + 4)  # + ratio count, initial check
    assert got[name]["before"]["calls"] == ["all_gather"]
    assert got[name]["before"]["gathered"] == table + small + 8 * (1 + 4)
    assert got["core statistics"]["after"]["calls"] == ["all_gather"]
    every = got["all diagnostics"]["after"]
    seq_rows = 8 * 5 * (6 + 2 * 256)
    assert every["result_bytes"] <= table + seq_rows + 2 * 4096
    assert got["all diagnostics"]["before"]["result_bytes"] >= 2 * table
    # Scaled: after, the growth from 8 to 1024 ranks is the small gather only.
    scaled = out["scaled"]["all diagnostics"]
    grow = scaled["1024"]["after"]["result_bytes"] - scaled["8"]["after"]["result_bytes"]
    assert grow == (1024 - 8) * every["gathered"] and every["gathered"] <= 512


def test_fdiv_benchmark_runs_and_checks_its_numbers() -> None:
    script = SCRIPT.with_name("bench_fdiv.py")
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--rows",
            "32",
            "--cols",
            "40",
            "--rounds",
            "1",
            "--repeat",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["tokens"] == 32 * 40
    configs = {r["config"] for r in out["rows"]}
    assert configs == {"floor", "base", "chi2", "hellinger", "js", "tv", "all four", "naive chi2"}
    for r in out["rows"]:
        assert r["ms"] > 0 and r["over_floor"] > 0
    assert all(err < 1e-9 for err in out["mean_rel_error_vs_float64"].values())
