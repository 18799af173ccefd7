"""Every script in examples/ runs as it is (with small settings), in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from klmonitor.report import load_run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, cwd: Path) -> str:
    # No W&B key, and no WANDB_SERVICE left behind by an in-process W&B run of another test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_lightning_rlhf(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    out = _run("lightning_rlhf.py", "--steps", "20", "--batch-size", "16", "--logdir", "logs", cwd=tmp_path)
    assert "final KL per token: k1" in out
    tb = tmp_path / "logs" / "lightning_rlhf" / "version_0"
    data = load_run(tb)
    assert data.scalars["kl/k3/mean"][0].tolist() == [9, 19]  # Lightning's log grid
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*/*.wandb"))


def test_plain_pytorch_loop(tmp_path: Path) -> None:
    out = _run(
        "plain_pytorch_loop.py", "--steps", "160", "--log-every", "20", "--logdir", "logs", cwd=tmp_path
    )
    assert "[kl_budget] (error)" in out  # the policy is pulled hard past its budget (max_kl=0.5)
    data = load_run(tmp_path / "logs" / "plain_loop")
    assert data.scalars["kl/k3/mean"][0].tolist() == [20, 40, 60, 80, 100, 120, 140, 160]
    assert [a.rule for a in data.alerts] == ["kl_budget"]  # healthy otherwise: no other rule speaks


def test_gaussian_experiment(tmp_path: Path) -> None:
    out = _run("gaussian_experiment.py", "--samples", "20000", "--p-mean", "1.0", cwd=tmp_path)
    assert "true KL = 0.5" in out
    for est in ("k1", "k2", "k3"):
        assert f"\n  {est} " in out


def test_fabric_loop(tmp_path: Path) -> None:
    out = _run("fabric_loop.py", "--steps", "40", "--log-every", "10", "--logdir", "logs", cwd=tmp_path)
    assert "final KL per token: k3" in out
    data = load_run(tmp_path / "logs" / "fabric_loop" / "version_0")
    assert data.scalars["kl/k3/mean"][0].tolist() == [10, 20, 30, 40]
    assert data.histograms, "no log-ratio histogram"
    assert list((tmp_path / "logs" / "fabric_loop_csv").rglob("metrics.csv"))


def test_hf_trainer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = _run("hf_trainer.py", "--steps", "4", "--log-every", "2", "--logdir", "logs", cwd=tmp_path)
    assert "final KL per token: k1" in out
    (run,) = (tmp_path / "logs" / "hf_trainer" / "runs").iterdir()  # the Trainer's one TensorBoard run
    data = load_run(run, prefix="train/kl/")  # kl/* beside train/loss, named as the loss is
    assert data.scalars["train/kl/k3/mean"][0].tolist() == [2, 4]


def test_trl_grpo(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    out = _run("trl_grpo.py", "--steps", "4", "--log-every", "2", "--logdir", "logs", cwd=tmp_path)
    assert "final KL per token: k1" in out
    (run,) = (tmp_path / "logs" / "trl_grpo" / "runs").iterdir()  # TRL's own run (train/kl is there)
    data = load_run(run, prefix="train/kl/")
    assert data.scalars["train/kl/k3/mean"][0].tolist() == [2, 4]
    assert data.scalars["train/kl/k3/mean"][1][-1] > 0, "the policy moved away from the reference"
