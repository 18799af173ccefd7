"""Benchmark: memory over a long monitoring run (no per-step growth, bounded history).

Three phases, each a long run at a realistic batch (``--tokens`` float32 tokens per step,
default 4096 as ``[4, 1024]`` with ~80% of the tokens valid), logging every ``--every`` steps:

* ``core``: ``KLStats.update`` every step; at a logging step ``compute`` + ``reset`` and
  ``AlertEngine.evaluate`` with the default rules plus a rule that fires on every window
  (so the alert history fills up and must stay at its bound).
* ``callback``: ``KLMonitor``'s own hooks (``on_train_batch_end`` / ``on_train_end``)
  driven by a minimal stand-in for the Trainer, with the log-ratio histogram on, a logger
  that receives every window, an always-firing rule, and a missing-key output every 97 steps
  (the warn-once path).
* ``trainer``: a real ``pytorch_lightning.Trainer`` on a tiny module, run twice with the same
  settings, without and with ``KLMonitor``, so Lightning's own memory use is separated from
  the monitor's (``--trainer-steps``; 0 skips it).

The resident set size (RSS, from ``/proc/self/statm``) is printed every ``--report-every``
steps; growth is measured from the first report after warm-up (``--warmup`` steps) to the
end. Nothing is asserted: the numbers are for benchmarks/README.md.

Usage::

    python benchmarks/bench_long_run.py                       # 100k steps per phase (minutes)
    python benchmarks/bench_long_run.py --steps 20000 --trainer-steps 2000   # a quick run
    python benchmarks/bench_long_run.py --json                # machine-readable results
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

import klmonitor as klm
from klmonitor.alerts import AlertEngine, KLBudgetRule, default_rules

ROW_LEN = 1024
LOG_RATIO_STD = 0.05  # per-token |log-ratio| of 1e-3..1e-1, the usual regime of RL fine-tuning


def rss_mib() -> float:
    """The current resident set size in MiB (Linux); the peak elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def make_batches(
    tokens: int, count: int = 8, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A few [B, 1024] float32 batches (80% of the tokens valid) cycled through the run."""
    g = torch.Generator().manual_seed(seed)
    rows = max(1, tokens // ROW_LEN)
    out = []
    for _ in range(count):
        logp = -torch.rand(rows, ROW_LEN, generator=g) * 8
        # log-ratio N(-s**2/2, s**2): E[r] = 1, as when the tokens are sampled from the policy
        ref = logp + LOG_RATIO_STD * torch.randn(rows, ROW_LEN, generator=g) - LOG_RATIO_STD**2 / 2
        mask = torch.rand(rows, ROW_LEN, generator=g) < 0.8
        out.append((logp, ref, mask))
    return out


class Tracker:
    """Samples RSS at report points and prints them."""

    def __init__(self, phase: str, steps: int, report_every: int, warmup: int, quiet: bool) -> None:
        self.phase, self.steps, self.report_every, self.warmup, self.quiet = (
            phase,
            steps,
            report_every,
            warmup,
            quiet,
        )
        self.samples: list[dict[str, float]] = []
        self.t0 = time.perf_counter()
        self.base: float | None = None
        self.sampling_s = 0.0  # time spent measuring, left out of the per-step time

    def due(self, step: int) -> bool:
        return (
            step == self.warmup
            or step == self.steps
            or (step > self.warmup and step % self.report_every == 0)
        )

    def sample(self, step: int) -> None:
        t = time.perf_counter()
        gc.collect()
        now = rss_mib()
        if step >= self.warmup and self.base is None:
            self.base = now
        growth = now - self.base if self.base is not None else 0.0
        self.samples.append({"step": step, "rss_mib": round(now, 2), "growth_mib": round(growth, 2)})
        if not self.quiet:
            print(
                f"  {self.phase:>8} step {step:>7}: RSS {now:8.1f} MiB  growth since warm-up {growth:+7.2f} MiB"
                f"  ({time.perf_counter() - self.t0:6.1f} s)",
                flush=True,
            )
        self.sampling_s += time.perf_counter() - t

    def result(self, **extra: Any) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t0 - self.sampling_s
        first = next(s for s in self.samples if s["step"] >= self.warmup)
        last = self.samples[-1]
        span = max(1, last["step"] - first["step"])
        growth = last["rss_mib"] - first["rss_mib"]
        return {
            "phase": self.phase,
            "steps": self.steps,
            "seconds": round(elapsed, 2),
            "us_per_step": round(1e6 * elapsed / max(1, self.steps), 1),
            "rss_warm_mib": first["rss_mib"],
            "rss_end_mib": last["rss_mib"],
            "growth_mib": round(growth, 2),
            "growth_bytes_per_step": round(growth * 2**20 / span, 2),
            "samples": self.samples,
            **extra,
        }


def phase_core(args: argparse.Namespace) -> dict[str, Any]:
    batches = make_batches(args.tokens)
    stats = klm.KLStats()
    engine = AlertEngine(
        [*default_rules(max_kl=0.05), KLBudgetRule(1e-9, cooldown=0, name="always")], args.history
    )
    tr = Tracker("core", args.steps, args.report_every, args.warmup, args.json)
    windows = 0
    for step in range(1, args.steps + 1):
        logp, ref, mask = batches[step % len(batches)]
        stats.update(logp, ref, mask)
        if step % args.every == 0:
            engine.evaluate(stats.compute(), step)
            stats.reset()
            windows += 1
        if tr.due(step):
            tr.sample(step)
    return tr.result(windows=windows, alert_history=len(engine.history), history_bound=args.history)


class _CountingLogger:
    def __init__(self) -> None:
        self.windows = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.windows += 1


def phase_callback(args: argparse.Namespace) -> dict[str, Any]:
    batches = make_batches(args.tokens, seed=1)
    logger = _CountingLogger()
    trainer = SimpleNamespace(
        global_step=0,
        is_global_zero=True,
        global_rank=0,
        loggers=[logger],
        world_size=1,
        should_stop=False,
        log_every_n_steps=args.every,
    )
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda *a, **k: None)
    mon = klm.KLMonitor(
        log_every_n_steps=args.every,
        rules=[*default_rules(max_kl=0.05), KLBudgetRule(1e-9, cooldown=0, name="always")],
        alert_history_size=args.history,
    )
    mon.setup(trainer, module, "fit")  # type: ignore[arg-type]
    outputs = [
        {"loss": torch.tensor(0.0), "logprobs": lp, "ref_logprobs": rp, "mask": m} for lp, rp, m in batches
    ]
    bad = {"loss": torch.tensor(0.0), "logprobs": batches[0][0]}
    tr = Tracker("callback", args.steps, args.report_every, args.warmup, args.json)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, args.steps + 1):
            trainer.global_step = step - 1  # Lightning's order: batch start, optimizer step, batch end
            mon.on_train_batch_start(trainer, module, None, step)  # type: ignore[arg-type]
            trainer.global_step = step
            out = bad if step % 97 == 0 else outputs[step % len(outputs)]
            mon.on_train_batch_end(trainer, module, out, None, step)  # type: ignore[arg-type]
            if tr.due(step):
                tr.sample(step)
        mon.on_train_end(trainer, module)  # type: ignore[arg-type]
    return tr.result(
        windows=logger.windows,
        alert_history=len(mon.alert_history),
        history_bound=args.history,
        warned_kinds=len(mon.monitor.warned),
    )


def phase_trainer(args: argparse.Namespace) -> list[dict[str, Any]]:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import Logger
    from torch import nn
    from torch.utils.data import DataLoader

    batches = make_batches(args.tokens, seed=2)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(()))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            logp, ref, mask = batches[batch_idx % len(batches)]
            lp = logp + self.bias
            loss = -(lp * mask).sum() / mask.sum()
            return {"loss": loss, "logprobs": lp, "ref_logprobs": ref, "mask": mask}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-6)

        def train_dataloader(self) -> DataLoader[int]:
            return DataLoader(range(args.trainer_steps), batch_size=None)

    class MemLogger(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.windows = 0

        @property
        def name(self) -> str:
            return "mem"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *a: Any, **k: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.windows += 1

    results = []
    for with_monitor in (False, True):
        tr = Tracker(
            "trainer+" if with_monitor else "trainer",
            args.trainer_steps,
            max(1, args.report_every // 10),
            max(1, args.warmup // 10),
            args.json,
        )

        class Sampler(pl.Callback):
            def __init__(self, tracker: Tracker) -> None:
                self.tracker = tracker

            def on_train_batch_end(
                self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
            ) -> None:
                if self.tracker.due(trainer.global_step):
                    self.tracker.sample(trainer.global_step)

        logger = MemLogger()
        callbacks: list[pl.Callback] = []
        mon = None
        if with_monitor:
            mon = klm.KLMonitor(
                log_every_n_steps=args.every,
                rules=[*default_rules(max_kl=0.05), KLBudgetRule(1e-9, cooldown=0, name="always")],
                alert_history_size=args.history,
            )
            callbacks.append(mon)
        callbacks.append(Sampler(tr))
        trainer = pl.Trainer(
            max_steps=args.trainer_steps,
            accelerator="cpu",
            devices=1,
            logger=[logger],
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=args.every,
            default_root_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "klmonitor-bench-long-run"),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Tiny())
        results.append(
            tr.result(
                monitor=with_monitor,
                windows=logger.windows,
                alert_history=len(mon.alert_history) if mon else 0,
                history_bound=args.history,
            )
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="steps of the core and callback phases")
    parser.add_argument(
        "--trainer-steps", type=int, default=10_000, help="steps of each Trainer run (0: skip)"
    )
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (rows of 1024)")
    parser.add_argument("--every", type=int, default=50, help="steps per logging window")
    parser.add_argument("--history", type=int, default=1000, help="alert history bound")
    parser.add_argument("--report-every", type=int, default=10_000, help="steps between RSS reports")
    parser.add_argument("--warmup", type=int, default=5_000, help="steps before the baseline RSS")
    parser.add_argument("--phases", default="core,callback,trainer", help="comma-separated subset to run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a report")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.report_every < 1:
        parser.error("--steps, --every and --report-every must be >= 1")
    args.warmup = min(args.warmup, args.steps)
    torch.set_num_threads(args.threads)
    # Alerts fire every window by design (to fill the history); keep them and Lightning quiet.
    for name in (
        "klmonitor",
        "pytorch_lightning",
        "pytorch_lightning.utilities.rank_zero",
        "lightning.pytorch",
        "lightning.pytorch.utilities.rank_zero",
        "lightning_fabric",
    ):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    runners: dict[str, Callable[[argparse.Namespace], Any]] = {
        "core": phase_core,
        "callback": phase_callback,
        "trainer": phase_trainer,
    }
    unknown = [p for p in phases if p not in runners]
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; choose from {sorted(runners)}")
    if args.trainer_steps <= 0 and "trainer" in phases:
        phases.remove("trainer")

    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "klmonitor": klm.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "tokens_per_step": max(1, args.tokens // ROW_LEN) * ROW_LEN,
        "every": args.every,
        "warmup": args.warmup,
        "rss_start_mib": round(rss_mib(), 2),
    }
    if not args.json:
        print(f"klmonitor long-run memory benchmark: {meta}", flush=True)
    results: list[dict[str, Any]] = []
    for phase in phases:
        got = runners[phase](args)
        results.extend(got if isinstance(got, list) else [got])
    meta["peak_rss_mib"] = round(peak_rss_mib(), 2)

    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return 0
    print()
    print(
        f"{'phase':>9} {'steps':>8} {'us/step':>9} {'RSS warm':>10} {'RSS end':>10} {'growth':>9} "
        f"{'B/step':>8} {'windows':>8} {'history':>8}"
    )
    for r in results:
        print(
            f"{r['phase']:>9} {r['steps']:>8} {r['us_per_step']:>9.1f} {r['rss_warm_mib']:>10.1f} "
            f"{r['rss_end_mib']:>10.1f} {r['growth_mib']:>+9.2f} {r['growth_bytes_per_step']:>8.2f} "
            f"{r['windows']:>8} {r['alert_history']:>4}/{r['history_bound']}"
        )
    print(f"peak RSS {meta['peak_rss_mib']:.1f} MiB (RSS in MiB; growth from the warm-up sample to the end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
