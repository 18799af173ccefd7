"""Monitor in a real Lightning Fabric run: fabric.loggers as sinks, fabric.global_rank as the rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from tb_files import events, texts

from klmonitor import Monitor
from klmonitor.alerts import parse_alert_text

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_fabric_run_logs_to_every_fabric_logger(tmp_path: Path) -> None:
    fabric = Fabric(
        accelerator="cpu",
        devices=1,
        loggers=[TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv")],
    )
    fabric.launch()
    fabric.seed_everything(0)
    policy = torch.nn.Linear(1, 6 * 5, bias=False)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    policy, opt = fabric.setup(policy, opt)
    ref_logits = policy(torch.ones(1, 1)).detach().reshape(6, 5).clone()
    monitor = Monitor(log_every_n_steps=4, sinks=fabric.loggers, rank=fabric.global_rank, max_kl=1e-4)
    seen: dict[int, list[np.ndarray]] = {}
    pos = torch.arange(6)
    for step in range(1, 11):
        logits = policy(torch.ones(1, 1)).reshape(6, 5)
        tokens = torch.multinomial(logits.softmax(-1).detach(), 32, replacement=True).T
        logp = logits.log_softmax(-1)[pos, tokens]
        ref = ref_logits.log_softmax(-1)[pos, tokens]
        loss = -(((tokens == 0).float().sum(1) - 1.0) * logp.sum(1)).mean()
        opt.zero_grad()
        fabric.backward(loss)
        opt.step()
        monitor.update(logp, ref)
        seen.setdefault((step - 1) // 4, []).append((ref.double() - logp.detach().double()).numpy().ravel())
        monitor.step(step)
    monitor.flush(10)
    monitor.close()
    for logger in fabric.loggers:
        logger.finalize("success")

    acc = events(tmp_path / "tb")
    k3 = {e.step: e.value for e in acc.Scalars("kl/k3/mean")}
    assert sorted(k3) == [4, 8, 10]
    for window, step in enumerate((4, 8, 10)):
        lr = np.concatenate(seen[window])
        assert k3[step] == pytest.approx(float(np.mean(np.expm1(lr) - lr)), rel=1e-5)
    assert acc.Tags()["histograms"] == ["kl/log_ratio"] and acc.PluginTagToContent("custom_scalars")
    assert [parse_alert_text(t)[0] for t in texts(acc, "kl/alerts")] == [
        a.rule for a in monitor.alert_history
    ]  # type: ignore[index]
    assert "kl_budget" in [a.rule for a in monitor.alert_history]
    csv_text = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "kl/k3/mean" in csv_text.splitlines()[0]
