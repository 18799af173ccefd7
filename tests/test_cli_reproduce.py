"""``klmonitor reproduce``: the Gaussian experiment of ESTIMATORS.md, in-process and as a script."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klmonitor.cli import main

KEYS = {"p_mean", "true_kl", "estimator", "bias", "std", "target", "true_value"}
# The f-divergences between N(mu, 1) and N(0, 1), written here from their integrals' closed forms.
CLOSED = {
    "chi2": lambda mu: math.exp(mu**2) - 1,
    "hellinger": lambda mu: 2 * (1 - math.exp(-(mu**2) / 8)),
    "tv": lambda mu: 2 * (0.5 * (1 + math.erf(mu / 2 / math.sqrt(2)))) - 1,
}


def _check_records(records: list[dict], samples: int) -> None:
    assert isinstance(records, list) and records
    for rec in records:
        assert set(rec) == KEYS
        assert isinstance(rec["estimator"], str)
        for key in KEYS - {"estimator", "target"}:
            assert isinstance(rec[key], float) and math.isfinite(rec[key]), (key, rec)
        assert rec["true_kl"] == pytest.approx(rec["p_mean"] ** 2 / 2)
        assert rec["std"] > 0
        if rec["target"] == "kl":
            assert rec["true_value"] == rec["true_kl"]
        else:
            assert rec["target"] == rec["estimator"]
            assert rec["true_value"] == pytest.approx(CLOSED[rec["target"]](rec["p_mean"]), rel=1e-12)
    by = {(r["p_mean"], r["estimator"]): r for r in records}
    assert {m for m, _ in by} == {0.1, 1.0}
    assert {e for _, e in by} >= {"k1", "k2", "k3", "chi2", "hellinger", "tv"}
    se = {key: r["std"] / math.sqrt(samples) for key, r in by.items()}  # normalised stderr
    for mu in (0.1, 1.0):
        for name in ("k1", "k3", "chi2", "hellinger", "tv"):  # unbiased
            assert abs(by[mu, name]["bias"]) <= 5 * se[mu, name], (mu, name, by[mu, name])
    # k2 overestimates: l = mu x - mu^2 / 2, so E[k2] = (mu^2 + mu^4 / 4) / 2 against
    # KL = mu^2 / 2, a normalised bias of mu^2 / 4: 0.25 at mu = 1, 0.0025 at mu = 0.1.
    assert by[1.0, "k2"]["bias"] == pytest.approx(0.25, abs=5 * se[1.0, "k2"])
    assert by[0.1, "k2"]["bias"] == pytest.approx(0.0025, abs=5 * se[0.1, "k2"])
    # The variances: k1 is far noisier than k3 when p is near q (the point of the note).
    assert by[0.1, "k1"]["std"] > 5 * by[0.1, "k3"]["std"]
    # cv: unbiased, and at p = N(1, 1) its best lambda = 1 / (e - 1) gives std/KL of about 1.29
    # (k3: 1.70); the closed form: Var(k1 + lam (r - 1)) with Var(k1) = mu^2, Var(r) = e^(mu^2) - 1,
    # Cov(k1, r) = -mu^2, so the minimum is mu^2 - mu^4 / (e^(mu^2) - 1), over KL = mu^2 / 2.
    for mu in (0.1, 1.0):
        assert abs(by[mu, "cv"]["bias"]) <= 5 * se[mu, "k3"], by[mu, "cv"]
        best = math.sqrt(mu**2 - mu**4 / math.expm1(mu**2)) / (mu**2 / 2)
        assert by[mu, "cv"]["std"] == pytest.approx(best, rel=0.05), (mu, by[mu, "cv"], best)
        assert by[mu, "cv"]["std"] <= by[mu, "k3"]["std"] * (1 + 1e-9)


def test_reproduce_json_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["reproduce", "--json", "--samples", "200000"])
    out = capsys.readouterr().out
    assert code in (0, None)
    _check_records(json.loads(out), 200_000)


def test_reproduce_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--samples", "1000", "--p-mean", "0.5"]) in (0, None)
    out = capsys.readouterr().out
    assert "N(0.5, 1)" in out
    for name in ("k1", "k2", "k3", "chi2", "hellinger", "tv"):
        assert name in out
    assert f"true {CLOSED['chi2'](0.5):.6g}" in out


@pytest.mark.parametrize("family", [[], ["chi2", "js"]])
def test_reproduce_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str], family: list[str]) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "estimators.png"
    argv = ["reproduce", "--samples", "1000", "--p-mean", "1", "--plot", str(out)]
    assert main([*argv, *(["--plot-f", *family] if family else [])]) in (0, None)
    assert f"wrote {out}" in capsys.readouterr().err
    with Image.open(out) as img:
        assert img.size[0] > 600 and img.size[1] > 300
        colours = len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0))
    assert colours > 50  # curves drawn, not a blank canvas


def test_reproduce_plot_unwritable_path_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    code = main(["reproduce", "--samples", "100", "--p-mean", "1", "--plot", str(tmp_path / "no" / "x.png")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


@pytest.mark.parametrize(
    "argv", [["--samples", "1"], ["--samples", "0"], ["--samples", "-5"], ["--p-mean", "0"]]
)
def test_invalid_arguments_give_one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code = main(["reproduce", "--json", *argv])
    captured = capsys.readouterr()
    assert code not in (0, None)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def _console_script() -> list[str]:
    beside = Path(sys.executable).with_name("klmonitor")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("klmonitor")
    if found is None:
        pytest.skip("the klmonitor console script is not installed")
    return [found]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*_console_script(), *args], capture_output=True, text=True, timeout=180, env=env)


def test_console_script_reproduce_json() -> None:
    proc = _run(["reproduce", "--json", "--samples", "100000"])
    assert proc.returncode == 0, proc.stderr
    _check_records(json.loads(proc.stdout), 100_000)


def test_console_script_invalid_samples_exits_nonzero_without_traceback() -> None:
    proc = _run(["reproduce", "--samples", "1"])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "samples" in lines[0] and "Traceback" not in proc.stderr
