"""One rank of a 2-process (gloo, CPU) transformers.Trainer run with KLMonitorCallback; see test_transformers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from test_transformers import Record, _train

from klmonitor.transformers import KLMonitorCallback

if __name__ == "__main__":
    out = Path(sys.argv[1])
    seen: dict[int, dict[str, float]] = {}
    kl = KLMonitorCallback(
        sinks=lambda metrics, step: seen.__setitem__(step, dict(metrics)),
        max_kl=1e-9,
        stop_on=["kl_budget"],
        log_every_n_steps=3,
    )
    records: list[Record] = []
    trainer = _train(out / "run", kl, records, max_steps=10, report_to=[])
    torch.save(
        {
            "records": records,
            "seen": seen,
            "alerts": [[a.rule, a.step] for a in kl.monitor.alert_history],
            "global_step": trainer.state.global_step,
            "world_size": torch.distributed.get_world_size(),
        },
        out / f"rank{os.environ['RANK']}.pt",
    )
    # Tear the gloo process group down before the interpreter does: left to exit, its threads
    # are destroyed while joinable now and then ("terminate called without an active
    # exception", SIGABRT) on a loaded machine.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
