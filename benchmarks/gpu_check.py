"""Everything the fused GPU path promises, checked on one CUDA device in one run (~5 min).

    python benchmarks/gpu_check.py --out gpu_check.json     # on a machine with a CUDA GPU

Parts (each in its own subprocess with a timeout, so one failure does not hide the others;
the exit status is 1 if any part failed):

1. **tests**: ``tests/test_gpu_kernel.py`` (the kernel against float64 on the GPU, no host
   sync, no recompiles across batch shapes; the interpreter tests too) and every test named
   ``*cuda*`` in the suite.
2. **compile**: the fused kernel's first-use cost (both mask variants) in a fresh process.
3. **lightning**: a real Lightning run (a small causal transformer policy against its frozen
   copy, ``KLMonitor(log_every_n_steps=10)``) with ``torch.cuda.set_sync_debug_mode("error")``
   on every step except the monitor's logging steps: any host sync in a training step, the
   monitor's ``on_train_batch_end`` included, raises and fails the part.
4. **bench**: ``benchmarks/bench_cuda.py`` at 1M, 16M and 64M tokens, eager (``torch``) vs
   fused (``triton``) vs naive, against the device's measured copy bandwidth (target: the
   fused path at >= 70 % of it from 16M tokens).
5. **share**: the monitor's share of a transformer training step (target < 0.5 %): the same
   Lightning run timed with and without ``KLMonitor``, alternating, and the time of the
   ``KLStats.update`` calls themselves.
6. **diag**: what each diagnostic adds, computed in the fused kernels' pass, at 16M masked
   float32 tokens (``[16384, 1024]``, token ids of a 50,257 vocabulary; target: each at most
   +10 %): ``Monitor.update`` with every diagnostic off against ``by_position`` (all rows),
   ``top_sequences=5``, ``top_tokens=5`` and all three, and the bare kernel launches
   (``_triton.fold`` with and without each part of ``Diagnostics``), interleaved round by
   round (median); the first use of the kernels with diagnostics (their compile); and the
   kernel's diagnostics against the eager torch path's on the same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# A small causal LM trained with a KL-penalised policy-gradient loss; shared by parts 3 and 5.
MODEL = textwrap.dedent(
    """
    import copy, time, warnings
    import torch, pytorch_lightning as pl
    from torch import nn
    from klmonitor import KLMonitor

    VOCAB, SEQ, BATCH, EVERY = 32000, 512, 16, 10
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore")

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 512)
            layer = nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.head = nn.Linear(512, VOCAB)
            self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

        def logprobs(self, tokens):
            h = self.body(self.emb(tokens[:, :-1]), mask=self.causal[: SEQ - 1, : SEQ - 1], is_causal=True)
            return self.head(h).log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)

    class RL(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.policy = LM()
            self.reference = copy.deepcopy(self.policy).requires_grad_(False)

        def training_step(self, batch, idx):
            tokens, mask = batch
            logp = self.policy.logprobs(tokens)
            with torch.no_grad():
                ref = self.reference.logprobs(tokens)
            adv = torch.randn_like(logp)
            kl = (ref - logp).exp() - (ref - logp) - 1
            loss = ((-(adv * logp) + 0.05 * kl) * mask).sum() / mask.numel()
            return {"loss": loss, "logprobs": logp, "ref_logprobs": ref, "mask": mask}

        def configure_optimizers(self):
            return torch.optim.AdamW(self.policy.parameters(), lr=1e-4, foreach=True)

        def train_dataloader(self):
            # batches made on the device: no host-to-device copy inside the guarded steps
            g = torch.Generator().manual_seed(0)
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            data = [
                (
                    torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(dev),
                    (torch.rand(BATCH, SEQ - 1, generator=g) < 0.9).to(dev),
                )
                for _ in range(8)
            ]
            return torch.utils.data.DataLoader(data * 100, batch_size=None)

    def trainer(steps, callbacks):
        return pl.Trainer(
            max_steps=steps, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
            log_every_n_steps=EVERY,
        )
    """
)

LIGHTNING = MODEL + textwrap.dedent(
    """
    import json, traceback

    class SyncGuard(pl.Callback):
        # "error" from each step's start to the end of its batch hooks, except logging steps.
        def on_train_batch_start(self, trainer, module, batch, idx):
            logging_step = (trainer.global_step + 1) % EVERY == 0
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("default" if logging_step else "error")
            self.checked = getattr(self, "checked", 0) + (0 if logging_step else 1)

    class SyncGuardEnd(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            torch.cuda.set_sync_debug_mode("default")

    guard = SyncGuard()
    monitor = KLMonitor(log_every_n_steps=EVERY, histogram=False)
    result = {"steps": 40}
    try:
        trainer(40, [guard, monitor, SyncGuardEnd()]).fit(RL())
        result.update(ok=True, guarded_steps=guard.checked)
    except Exception as exc:
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the same with the monitor's histogram sample on (the default)
    guard2 = SyncGuard()
    try:
        trainer(20, [guard2, KLMonitor(log_every_n_steps=EVERY), SyncGuardEnd()]).fit(RL())
        result["histogram_on_ok"] = True
    except Exception as exc:
        result["histogram_on_ok"] = False
        result["histogram_on_error"] = f"{type(exc).__name__}: {exc}"
        result["histogram_on_traceback"] = traceback.format_exc()[-3000:]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(json.dumps(result))
    """
)

SHARE = MODEL + textwrap.dedent(
    """
    import json, statistics
    from klmonitor import KLStats

    class Clock(pl.Callback):
        def __init__(self, skip):
            self.skip, self.t0, self.steps = skip, None, 0
        def on_train_batch_start(self, trainer, module, batch, idx):
            if trainer.global_step == self.skip and self.t0 is None:
                torch.cuda.synchronize(); self.t0 = time.perf_counter()
        def on_train_end(self, trainer, module):
            torch.cuda.synchronize()
            self.per_step = (time.perf_counter() - self.t0) / (trainer.global_step - self.skip)

    steps, skip = 60, 10
    times = {"with": [], "without": []}
    for rnd in range(3):
        for kind in ("without", "with"):
            torch.manual_seed(0)
            clock = Clock(skip)
            cbs = [clock] + ([KLMonitor(log_every_n_steps=EVERY)] if kind == "with" else [])
            trainer(steps, cbs).fit(RL())
            times[kind].append(clock.per_step)
    step_s = statistics.median(times["without"])
    with_s = statistics.median(times["with"])
    # the update itself, on one step's tensors (CUDA events, no sync inside)
    dev = torch.device("cuda")
    logp = -torch.rand(BATCH, SEQ - 1, device=dev) * 5
    ref, mask = logp + 0.05 * torch.randn_like(logp), torch.rand(BATCH, SEQ - 1, device=dev) < 0.9
    s = KLStats()
    for _ in range(20):
        s.update(logp, ref, mask)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(200):
        s.update(logp, ref, mask)
    end.record(); torch.cuda.synchronize()
    update_s = start.elapsed_time(end) / 1e3 / 200
    t0 = time.perf_counter()
    for _ in range(200):
        s.update(logp, ref, mask)
    host_s = (time.perf_counter() - t0) / 200  # launch overhead on the host (GPU runs async)
    torch.cuda.synchronize()
    print(json.dumps({
        "tokens_per_step": BATCH * (SEQ - 1), "step_ms_without": step_s * 1e3, "step_ms_with": with_s * 1e3,
        "share_end_to_end": (with_s - step_s) / step_s, "rounds": times,
        "update_gpu_ms": update_s * 1e3, "update_host_ms": host_s * 1e3,
        "share_of_update": max(update_s, host_s) / step_s,
    }))
    """
)

# Part 6. Runs on any device: `python -c "$DIAG" cpu 8 256 3` under TRITON_INTERPRET=1 is the
# smoke run of its logic on a CPU (rows, row length, rounds).
DIAG = textwrap.dedent(
    """
    import json, statistics, sys, time
    import torch
    from klmonitor import Monitor, _triton
    from klmonitor import _moments as mom
    from klmonitor._native import Diagnostics

    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    B, T = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (16384, 1024)
    ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 7
    VOCAB, REPS = 50257, (20 if device == "cuda" else 1)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    interpret = not cuda  # CPU tensors: Triton's interpreter (TRITON_INTERPRET=1)
    FUSED = "auto" if cuda else "triton"  # the backend whose kernels compute the diagnostics
    g = torch.Generator(device=dev).manual_seed(0)
    logp = -torch.rand(B, T, device=dev, generator=g) * 5
    ref = logp + 0.3 * torch.randn(B, T, device=dev, generator=g)
    ref[0, 3] = logp[0, 3] + 45.0  # one tile for the float64 kernel, as in a real batch now and then
    mask = torch.rand(B, T, device=dev, generator=g) < 0.9
    ids = torch.randint(0, VOCAB, (B, T), device=dev, generator=g)

    def per_call_ms(fn):
        # device time between events around REPS calls (host time where there is no device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(REPS):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / REPS
        t0 = time.perf_counter()
        for _ in range(REPS):
            fn()
        return (time.perf_counter() - t0) * 1e3 / REPS

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # -- Monitor.update with each diagnostic, from the kernels' pass ---------------------------
    OFF = dict(by_position=False, top_sequences=0, top_tokens=0, entropy=False)
    CONFIGS = {
        "off": OFF,
        "by_position": {**OFF, "by_position": True, "position_rows": None},
        "top_sequences=5": {**OFF, "top_sequences": 5},
        "top_tokens=5": {**OFF, "top_tokens": 5, "vocab_size": VOCAB},
        "all three": {**OFF, "by_position": True, "position_rows": None, "top_sequences": 5,
                      "top_tokens": 5, "vocab_size": VOCAB},
    }

    def monitor(cfg, backend=FUSED):
        m = Monitor(log_every_n_steps=10**9, rules=[], histogram=False, backend=backend, **cfg)
        m.reset_window(1)  # past the first optimizer step: no initial_kl check
        return m

    result = {"tokens": B * T, "device": device}
    t0 = time.perf_counter()
    first = monitor(CONFIGS["all three"])
    first.update(logp, ref, mask, token_ids=ids)  # compiles the kernels with diagnostics
    sync()
    result["first_update_with_diagnostics_s"] = time.perf_counter() - t0
    monitors = {name: monitor(cfg) for name, cfg in CONFIGS.items()}
    for m in monitors.values():  # warm-up
        m.update(logp, ref, mask, token_ids=ids)
    sync()
    times = {name: [] for name in CONFIGS}
    host = {name: [] for name in CONFIGS}
    for _ in range(ROUNDS):
        for name, m in monitors.items():
            times[name].append(per_call_ms(lambda m=m: m.update(logp, ref, mask, token_ids=ids)))
            sync()
            t0 = time.perf_counter()
            m.update(logp, ref, mask, token_ids=ids)
            host[name].append((time.perf_counter() - t0) * 1e3)  # launches only (the GPU runs async)
            sync()
    base = statistics.median(times["off"])
    result["update_ms"] = {k: statistics.median(v) for k, v in times.items()}
    result["update_host_ms"] = {k: statistics.median(v) for k, v in host.items()}
    result["update_overhead"] = {k: statistics.median(v) / base - 1 for k, v in times.items() if k != "off"}

    # -- the bare launches: _triton.fold with each part of Diagnostics -------------------------
    flat_lp, flat_ref, flat_mask = logp.reshape(-1), ref.reshape(-1), mask.reshape(-1)
    ids64 = ids.reshape(-1).to(torch.int64)
    z = lambda k: torch.zeros(k, dtype=torch.float64, device=dev)
    parts = {
        "off": None,
        "rows": Diagnostics(B * T, row_len=T, row_sum=z(B), row_count=z(B)),
        "buckets": Diagnostics(B * T, row_len=T, bucket_sum=z(12), bucket_count=z(12)),
        "tokens": Diagnostics(B * T, ids=ids64, token_sum=z(VOCAB), token_count=z(VOCAB), outside=z(1)),
        "all": Diagnostics(B * T, row_len=T, row_sum=z(B), row_count=z(B), bucket_sum=z(12),
                           bucket_count=z(12), ids=ids64, token_sum=z(VOCAB), token_count=z(VOCAB),
                           outside=z(1)),
    }
    acc = mom.empty(dev)

    def launch(d):
        _triton.fold(acc, flat_lp, flat_ref, flat_mask, float("inf"), 20.0, interpret, diag=d)

    for d in parts.values():  # compiles each variant
        launch(d)
    sync()
    kt = {name: [] for name in parts}
    for _ in range(ROUNDS):
        for name, d in parts.items():
            kt[name].append(per_call_ms(lambda d=d: launch(d)))
    kbase = statistics.median(kt["off"])
    result["fold_ms"] = {k: statistics.median(v) for k, v in kt.items()}
    result["fold_overhead"] = {k: statistics.median(v) / kbase - 1 for k, v in kt.items() if k != "off"}

    # -- the kernel's diagnostics against the eager torch path's, on one batch -----------------
    fused, eager = monitor(CONFIGS["all three"]), monitor(CONFIGS["all three"], backend="torch")
    for m in (fused, eager):
        m.update(logp, ref, mask, token_ids=ids)
    agree = {}
    for part in ("positions", "tokens"):
        a, b = getattr(fused, part).vector(dev).cpu(), getattr(eager, part).vector(dev).cpu()
        rel = ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()
        agree[part] = {"max_rel_diff": rel, "ok": rel < 1e-5}
    sa, sb = fused.sequences.vector(dev).cpu(), eager.sequences.vector(dev).cpu()
    agree["sequences"] = {"ok": bool(torch.allclose(sa, sb, rtol=1e-5, atol=1e-9))}
    result["agree_with_torch_path"] = agree
    result["ok"] = all(v["ok"] for v in agree.values())
    result["meets_10pct"] = {k: v <= 0.10 for k, v in result["update_overhead"].items()}
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)
    """
)

COMPILE = textwrap.dedent(
    """
    import json, time, torch
    t0 = time.perf_counter()
    from klmonitor import _triton
    import_s = time.perf_counter() - t0
    first = _triton.compile_seconds("cuda")
    again = _triton.compile_seconds("cuda")
    print(json.dumps({"import_s": import_s, "first_use_s": first, "warm_s": again,
                      "triton": __import__("triton").__version__}))
    """
)


def _run(cmd: list[str], timeout: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        return {"ok": False, "error": f"timed out after {timeout} s", "stdout": str(exc.stdout)[-2000:]}
    out: dict[str, Any] = {"ok": proc.returncode == 0, "seconds": time.perf_counter() - t0}
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        out["result"] = json.loads(last)
    except ValueError:
        out["stdout_tail"] = proc.stdout[-3000:]
    if proc.returncode != 0:
        out["stderr_tail"] = proc.stderr[-4000:]
    return out


def _python(code: str, timeout: int) -> dict[str, Any]:
    return _run([sys.executable, "-c", code], timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here too")
    ap.add_argument(
        "--skip", default="", help="comma-separated parts to skip (tests,compile,lightning,bench,share,diag)"
    )
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    import torch

    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device here", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    parts = {
        "tests": lambda: _run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/test_gpu_kernel.py",
                "tests/test_torch_path.py",
                "tests/test_exact_values.py",
                "tests/test_triton_diagnostics.py",
            ],
            600,
        ),
        "tests_cuda_named": lambda: _run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-k", "cuda"], 400
        ),
        "compile": lambda: _python(COMPILE, 300),
        "lightning": lambda: _python(LIGHTNING, 400),
        "bench": lambda: _run(
            [
                sys.executable,
                "benchmarks/bench_cuda.py",
                "--backends",
                "torch,triton",
                "--sizes",
                "1e6,16e6,64e6",
                "--json",
            ],
            500,
        ),
        "share": lambda: _python(SHARE, 400),
        "diag": lambda: _python(DIAG, 400),
    }
    for name, fn in parts.items():
        if name.split("_")[0] in skip:
            continue
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        report[name] = fn()
        print(f"[gpu_check] {name}: {'ok' if report[name]['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
        if args.out:  # after each part: what was measured survives a run cut short
            Path(args.out).write_text(json.dumps(report, indent=1))
    bench = report.get("bench", {}).get("result")
    if bench:
        copy = bench["copy_gb_per_s"]
        report["bandwidth_of_copy"] = {
            f"{row['tokens']}:{row['dtype']}:{b}": v["gb_per_s"] / copy
            for row in bench["rows"]
            for b, v in row["backends"].items()
        }
    share = report.get("share", {}).get("result")
    if share:
        report["share_summary"] = {
            k: share[k] for k in ("share_end_to_end", "share_of_update", "step_ms_without")
        }
    diag = report.get("diag", {}).get("result")
    if diag:
        report["diag_summary"] = {
            "update_overhead": diag["update_overhead"],
            "fold_overhead": diag["fold_overhead"],
            "meets_10pct": diag["meets_10pct"],
        }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    ok = all(v.get("ok", True) for v in report.values() if isinstance(v, dict) and "ok" in v)
    lightning = report.get("lightning", {}).get("result") or {}
    ok = ok and lightning.get("ok", "lightning" in skip)
    print(f"[gpu_check] {'ALL OK' if ok else 'SOME PARTS FAILED'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
