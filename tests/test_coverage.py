"""±2 standard-error coverage of the exact KL by k1, k3 and cv: a reduced benchmarks/bench_coverage.py.

Categorical policies over a 4096-token vocabulary, 16 contexts x 512 tokens per window, tokens
sampled exactly from the policy; each window's estimates are compared with its exact float64
KL (the mean over its contexts of KL(q || p)). Seeded, so the figures are fixed; the bounds
leave a margin of several binomial standard errors around the figures measured (docstrings).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_coverage as bench  # noqa: E402

SEEDS = 100
SIZE = {"contexts": 16, "draws": 512, "vocab": 4096}


def _run(regime: bench.Regime) -> dict[str, Any]:
    return bench.run_regime(regime, SEEDS, **SIZE)


@pytest.fixture(scope="module")
def small_kl() -> dict[str, Any]:
    return _run(bench.Regime("noise KL 1e-3", "noise", 1e-3))


@pytest.fixture(scope="module")
def large_kl() -> dict[str, Any]:
    return _run(bench.Regime("noise KL 5", "noise", 5.0))


def test_exact_kl_is_the_target(small_kl: dict[str, Any], large_kl: dict[str, Any]) -> None:
    # The calibration hits its target on its own draw; windows' KLs scatter around it.
    assert small_kl["kl_calibration"] == pytest.approx(1e-3, rel=1e-6)
    assert large_kl["kl_calibration"] == pytest.approx(5.0, rel=1e-6)
    assert 0.5e-3 < small_kl["kl"] < 2e-3 and 3 < large_kl["kl"] < 7


def test_near_the_reference_every_estimator_covers(small_kl: dict[str, Any]) -> None:
    # Measured: 0.97 / 0.98 / 0.97 (k1 / k3 / cv). cv is k3 there (lambda ~1, same stderr);
    # k1's stderr is ~30x k3's (its spread is |l|, k3's is l^2 / 2).
    for e in ("k1", "k3", "cv"):
        assert small_kl[e]["coverage"] >= 0.88, (e, small_kl[e])
    assert small_kl["cv_lambda_median"] == pytest.approx(1.0, abs=0.01)
    assert small_kl["cv"]["stderr_over_kl"] <= small_kl["k3"]["stderr_over_kl"] * 1.001
    assert small_kl["k1"]["stderr_over_kl"] > 10 * small_kl["k3"]["stderr_over_kl"]


def test_at_large_kl_cv_covers_where_k3_does_not(large_kl: dict[str, Any]) -> None:
    # Measured: k3 covers 0.57 (r - 1 is heavy-tailed: most windows miss the tokens that
    # carry its mean, and its stderr with them), cv 0.97 (0.93 before it fell back to k1 on
    # |z(r - 1)| > 4), k1 0.97; cv's stderr is k1's, ~10x below k3's.
    assert large_kl["cv"]["coverage"] >= 0.88, large_kl["cv"]
    assert large_kl["k1"]["coverage"] >= 0.88, large_kl["k1"]
    assert large_kl["k3"]["coverage"] <= 0.75, large_kl["k3"]
    se = {e: large_kl[e]["stderr_over_kl"] for e in ("k1", "k3", "cv")}
    assert se["cv"] <= min(se["k1"], se["k3"]) * 1.001
    assert se["cv"] < se["k3"] / 5
    assert large_kl["cv_lambda_median"] < 0.1  # cv leans on k1 far from the reference


def test_benchmark_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    rc = bench.main(
        ["--seeds", "2", "--vocab", "2048", "--contexts", "4", "--draws", "64", "--only", "KL 1,", "--json"]
    )
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == 256 and data["seeds"] == 2
    names = [r["regime"] for r in data["regimes"]]
    assert names and all("KL 1" in n for n in names)
    for row in data["regimes"]:
        for e in ("k1", "k3", "cv"):
            assert 0 <= row[e]["coverage"] <= 1 and row[e]["stderr_over_kl"] > 0
        assert {"ess_median", "extreme_windows", "extreme_mean", "cv_lambda_median"} <= row.keys()


@pytest.mark.parametrize(
    "regime",
    [
        bench.Regime("sharp KL 2", "sharp", 2.0),
        bench.Regime("ptail depth 8", "ptail", None, s=0.1, depth=8.0),
    ],
    ids=["sharp", "ptail"],
)
def test_reference_mass_the_policy_rarely_samples(regime: bench.Regime) -> None:
    # The reference's mass sits on tokens the policy rarely samples (q ~ p^s; q = p e^-8 on a
    # tenth of the tokens): windows that miss them see a mean of r - 1 many standard errors
    # below 0, and lambda (r - 1) carried that into cv with a stderr blind to it. Measured
    # before cv fell back to k1 there: cv covered 0.01 (sharp) and 0.28 (ptail), as k3 does;
    # k1, which does not involve r, 1.0 in both.
    row = _run(regime)
    assert row["k1"]["coverage"] >= 0.9, row["k1"]
    assert row["cv"]["coverage"] >= 0.9, row["cv"]
    assert row["k3"]["coverage"] <= 0.5, row["k3"]
    assert row["r_minus_1_abs_z_gt_6"] >= 0.5  # what the summary shows: r - 1 far from 0
