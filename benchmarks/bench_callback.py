"""KLMonitor's overhead on a small Lightning model's training step, with and without it.

A small GRU policy (vocabulary 64, hidden 128, batch 32 x 64 tokens) does a KL-penalised
policy-gradient step per batch under a real ``pytorch_lightning.Trainer`` on CPU. In one
run, ``KLMonitor`` (windows of 50 steps, histogram on) works on even steps and is off on odd
ones, so with and without alternate step by step; the reported overhead is the ratio of the
median step times. Runs without any monitor, split the same way, show the figure's
resolution, and the time inside the monitor's hook (past the same warm-up; its first call, which
loads the CPU kernel, apart) is reported as a direct measure.

    python benchmarks/bench_callback.py            # ~1-2 minutes on 2 cores
    python benchmarks/bench_callback.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from klmonitor import KLMonitor


class _Steps(Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class GRUPolicy(pl.LightningModule):
    def __init__(self, vocab: int = 64, hidden: int = 128, batch: int = 32, seq: int = 64) -> None:
        super().__init__()
        self.vocab, self.batch, self.seq = vocab, batch, seq
        self.embed = nn.Embedding(vocab, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        # The frozen reference: a copy of the initial policy.
        self.ref = nn.ModuleDict(
            {
                "embed": copy.deepcopy(self.embed),
                "gru": copy.deepcopy(self.gru),
                "head": copy.deepcopy(self.head),
            }
        ).requires_grad_(False)
        self.times: list[float] = []
        self._t0 = 0.0

    def _logits(self, tokens: torch.Tensor, reference: bool) -> torch.Tensor:
        if reference:
            h, _ = self.ref["gru"](self.ref["embed"](tokens))
            return self.ref["head"](h)
        h, _ = self.gru(self.embed(tokens))
        return self.head(h)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Runs after every callback's on_train_batch_end (the module hook is called last).
        self.times.append(time.perf_counter() - self._t0)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            tokens = torch.randint(0, self.vocab, (self.batch, self.seq + 1))
        inp, out = tokens[:, :-1], tokens[:, 1:]
        logp = self._logits(inp, False).log_softmax(-1).gather(-1, out[..., None]).squeeze(-1)
        with torch.no_grad():
            ref = self._logits(inp, True).log_softmax(-1).gather(-1, out[..., None]).squeeze(-1)
        reward = (out == 0).float().sum(-1)
        loss = -((reward - reward.mean()) * logp.sum(-1)).mean() + 0.05 * (logp - ref).mean()
        mask = torch.ones_like(logp, dtype=torch.bool)
        return {"loss": loss, "logprobs": logp, "ref_logprobs": ref, "mask": mask}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[int]:
        return DataLoader(_Steps(10**6), batch_size=1)


#: Steps dropped at the start of each run (an even count, so pairs stay (even, odd)).
WARMUP = 10


class TimedKLMonitor(KLMonitor):
    """KLMonitor that runs on even batches only and records the time spent in its hook.

    Odd batches return from the hook at once, so they are the "without" steps of the same
    run: with and without alternate step by step, and drift in machine load (this VM is
    shared) hits both alike, which separate runs cannot promise.
    """

    hook_times: list[tuple[int, float]] = []  # (batch index, seconds)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % 2:
            return
        t0 = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        TimedKLMonitor.hook_times.append((batch_idx, time.perf_counter() - t0))


def run_once(steps: int, monitor: bool) -> tuple[list[float], list[float]]:
    """One Trainer run; the step times of even and of odd batches (warm-up dropped).

    Element ``j`` of each list is a pair of adjacent steps.
    """
    torch.manual_seed(0)
    model = GRUPolicy()
    # The random tokens are not sampled from the policy, so the sampling-mismatch rule fires,
    # correctly; the alerts are part of what is timed, their log lines are silenced.
    logging.getLogger("klmonitor").setLevel(logging.ERROR)
    callbacks: list[pl.Callback] = [TimedKLMonitor(log_every_n_steps=50)] if monitor else []
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    trainer.fit(model)
    times = model.times[WARMUP:]  # drop warm-up (an even count: pairs stay (even, odd))
    return times[0::2], times[1::2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="monitored runs (and as many control runs)")
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    steps, rounds = (40, 1) if args.quick else (args.steps, args.rounds)
    with_cb: list[float] = []
    without: list[float] = []
    control_even: list[float] = []
    control_odd: list[float] = []
    for _ in range(rounds):
        even, odd = run_once(steps, monitor=True)
        n = min(len(even), len(odd))
        with_cb += even[:n]
        without += odd[:n]
        even, odd = run_once(steps, monitor=False)
        n = min(len(even), len(odd))
        control_even += even[:n]
        control_odd += odd[:n]
    med_with, med_without = statistics.median(with_cb), statistics.median(without)
    overhead = med_with / med_without - 1
    # The mean includes the logging steps (one reduction and logger write per 50 steps).
    mean_overhead = statistics.fmean(with_cb) / statistics.fmean(without) - 1
    # Runs with no monitor at all, split the same way: how far apart even and odd steps are
    # by themselves (the resolution of the paired figure).
    parity = statistics.median(control_even) / statistics.median(control_odd) - 1
    # Adjacent steps share the machine's state: the median of the per-pair differences cancels
    # slow drift that the ratio of medians still carries.
    paired = statistics.median(a - b for a, b in zip(with_cb, without, strict=True)) / med_without
    paired_control = statistics.median(
        a - b for a, b in zip(control_even, control_odd, strict=True)
    ) / statistics.median(control_odd)
    # The direct measure: time inside the hook, past the same warm-up as the step times (the
    # first call loads and self-tests the CPU kernel, once per process: reported apart).
    hook = [t for i, t in TimedKLMonitor.hook_times if i >= WARMUP]
    first_call = TimedKLMonitor.hook_times[0][1]
    hook_fraction = statistics.fmean(hook) / statistics.fmean(without)
    result = {
        "threads": torch.get_num_threads(),
        "steps_per_run": steps,
        "rounds": rounds,
        "median_step_ms_without": med_without * 1e3,
        "median_step_ms_with": med_with * 1e3,
        "overhead_fraction": overhead,
        "mean_step_ms_without": statistics.fmean(without) * 1e3,
        "mean_step_ms_with": statistics.fmean(with_cb) * 1e3,
        "mean_overhead_fraction": mean_overhead,
        "control_even_over_odd": parity,
        "paired_overhead_fraction": paired,
        "paired_control_fraction": paired_control,
        "hook_mean_us": statistics.fmean(hook) * 1e6,
        "hook_median_us": statistics.median(hook) * 1e6,
        "hook_fraction_of_step": hook_fraction,
        "hook_first_call_ms": first_call * 1e3,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"torch threads: {result['threads']}; {rounds} monitored runs of {steps} steps (KLMonitor on "
            "even steps, off on odd ones) and as many runs without it (the parity control)"
        )
        print(f"median step without KLMonitor (odd steps):  {med_without * 1e3:8.3f} ms")
        print(f"median step with KLMonitor (even steps):    {med_with * 1e3:8.3f} ms")
        print(f"overhead of the median step:   {overhead * 100:+.2f} %   (target: under 2 %)")
        print(
            f"mean step {statistics.fmean(without) * 1e3:.3f} -> {statistics.fmean(with_cb) * 1e3:.3f} ms: "
            f"{mean_overhead * 100:+.2f} % (includes the logging steps)"
        )
        print(f"control, no monitor: even / odd median step {parity * 100:+.2f} % (the figure's resolution)")
        print(
            f"median of adjacent-pair differences (with - without): {paired * 100:+.2f} % of the step; "
            f"control {paired_control * 100:+.2f} %"
        )
        print(
            f"time inside KLMonitor's per-step hook: mean {statistics.fmean(hook) * 1e6:.0f} us, median "
            f"{statistics.median(hook) * 1e6:.0f} us = {hook_fraction * 100:.2f} % of the mean step "
            "(the logging steps included)"
        )
        print(f"its first call, which loads and self-tests the CPU kernel once: {first_call * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
