"""KLStats on a CUDA device: speed against the eager code and the memory floor, achieved
bandwidth as a fraction of the device's peak, no host sync in ``update``, and no recompiles as
batch shapes change (DESIGN.md, "Performance targets"; issue "Performance", the CUDA part).

    python benchmarks/bench_cuda.py                # a CUDA device: ~1-3 min, most of it compiling
    python benchmarks/bench_cuda.py --json         # the results as JSON on stdout
    python benchmarks/bench_cuda.py --device cpu --backends torch,triton --quick   # the logic, on CPU

Per size (float32 ``[B, 1000]`` log-probs, bool mask of density 0.8, as ``bench_stats.py``):
the eager code peers write (``naive``), ``KLStats`` with each backend (``triton``: the fused
Triton kernel, the default on GPU; ``torch``: the eager fallback, in-place ops on bounded
chunks; ``compile``: the torch path of ``_moments.token_chunk`` through ``torch.compile`` with
dynamic shapes, one fused pass), and one read of the inputs (``floor``). Before every timed
call a 256 MiB buffer is written on the device, so the inputs are not served from L2.

Bandwidth: input bytes (9 per float32 token) over ``update + compute`` time, against the
device's copy bandwidth measured here (``dst.copy_(src)`` of 1 GiB: 2 bytes moved per byte)
and, where the device is in ``NOMINAL_PEAK``, its datasheet figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klmonitor
import bench_stats as bs  # noqa: E402  (the naive code, the floor, agreement and timing helpers)

import klmonitor as klm  # noqa: E402

# Datasheet memory bandwidth (bytes/s), matched as a substring of the device's name.
NOMINAL_PEAK = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM5 (HBM3)
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,  # 40 GB
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "A10G": 0.6e12,
    "RTX 4090": 1.008e12,
}
SHAPES = [(3, 1000), (7, 333), (64, 512), (17, 2048), (5, 4097), (128, 1000), (1, 65537)]


def nominal_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in NOMINAL_PEAK.items():
        if key in name:
            return name, peak
    return name, None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes per second moved by a device-to-device copy (read + write), median of 10."""
    src = torch.ones(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / statistics.median(times)


class Evict:
    """Untimed before each call: write a buffer larger than the device's last-level cache."""

    def __init__(self, device: torch.device, mib: int) -> None:
        self.device = device
        self.cpu = bs.Preamble("torch-op") if device.type == "cpu" else None
        self.buffer = torch.empty(mib * 2**20 // 4, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.cpu is not None:
            self.cpu()
        elif self.buffer is not None:
            self.buffer.fill_(1.0)
            sync(self.device)


def inputs(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, Any]:
    logp, ref, mask = bs.make_inputs(n, dtype)
    return logp.to(device), ref.to(device), mask.to(device)


def bench_size(
    n: int, dtype: torch.dtype, device: torch.device, backends: list[str], cfg: dict, evict: Evict
) -> dict:
    label = {torch.float32: "float32", torch.bfloat16: "bf16"}[dtype]
    bs.log(f"  {n:>12,} tokens, {label} on {device} ...")
    logp, ref, mask = inputs(n, dtype, device)
    truth = bs.naive_kl_stats(logp, ref, mask, dtype=torch.float64)
    stats = {b: klm.KLStats(backend=b) for b in backends}
    agreement = {}
    for b, s in stats.items():
        ours = bs.summary_values(bs.ours_kl_stats(s, logp, ref, mask))
        agreement[b] = bs.check_agreement(
            f"{b} vs float64 at {n} ({label})", ours, truth, bs.OURS_VS_FLOAT64
        )["max_in_tolerance_units"]
    fns = {
        "naive": lambda: bs.naive_kl_stats(logp, ref, mask),
        "floor": lambda: bs.floor_read(logp, ref, mask),
    }
    for b, s in stats.items():
        fns[b] = lambda s=s: bs.ours_kl_stats(s, logp, ref, mask)
    timing = bs.time_interleaved(fns, cfg["budget_s"], cfg["min_rounds"], cfg["max_rounds"], evict)
    med = timing["median_s"]
    nbytes = bs.input_bytes(logp, ref, mask)
    row: dict[str, Any] = {
        "tokens": n,
        "dtype": label,
        "input_bytes": nbytes,
        "rounds": timing["rounds"],
        "naive_ms": med["naive"] * 1e3,
        "floor_ms": med["floor"] * 1e3,
        "floor_gb_per_s": nbytes / med["floor"] / 1e9,
        "agreement_vs_float64": agreement,
        "backends": {},
    }
    for b in backends:
        row["backends"][b] = {
            "ms": med[b] * 1e3,
            "naive_over_ours": med["naive"] / med[b],
            "ours_over_floor": med[b] / med["floor"],
            "gb_per_s": nbytes / med[b] / 1e9,
        }
    return row


def sync_check(device: torch.device, backends: list[str]) -> dict[str, str]:
    """``update`` under ``torch.cuda.set_sync_debug_mode("error")`` over changing shapes."""
    if device.type != "cuda":
        return {b: "not checked (not a CUDA device)" for b in backends}
    out = {}
    for b in backends:
        s = klm.KLStats(backend=b)
        logp, ref, mask = inputs(4096, torch.float32, device)
        s.update(logp, ref, mask)  # first call: lazy set-up (compile) outside the check
        sync(device)
        try:
            torch.cuda.set_sync_debug_mode("error")
            for shape in SHAPES:
                g = torch.Generator(device=device).manual_seed(0)
                lp = -torch.rand(shape, device=device, generator=g)
                s.update(lp, lp + 0.05, torch.rand(shape, device=device, generator=g) < 0.8)
                s.update(lp, lp + 0.05)
            out[b] = f"ok: no host sync over {2 * len(SHAPES)} updates"
        except RuntimeError as exc:
            out[b] = f"SYNC: {exc}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out


def recompile_check(device: torch.device) -> dict:
    """Graphs compiled by ``backend="compile"`` over the SHAPES, with and without a mask."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    s = klm.KLStats(backend="compile")
    t0 = time.perf_counter()
    for i, shape in enumerate(SHAPES):
        lp = -torch.rand(shape, device=device)
        s.update(lp, lp + 0.05, torch.rand(shape, device=device) < 0.8)
        s.update(lp, lp + 0.05)
        if i == 0:
            first_s = time.perf_counter() - t0
    s.compute()
    return {
        "shapes": [list(x) for x in SHAPES],
        "updates": 2 * len(SHAPES),
        "graphs_compiled": int(counters["stats"]["unique_graphs"]),
        "first_shape_s": first_s,
        "all_shapes_s": time.perf_counter() - t0,
    }


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py: no CUDA device here (use --device cpu to run the logic on CPU)")
    backends = args.backends.split(",")
    cfg = (
        {"budget_s": 0.5, "min_rounds": 3, "max_rounds": 20}
        if args.quick
        else {
            "budget_s": 3.0,
            "min_rounds": 7,
            "max_rounds": 200,
        }
    )
    sizes = args.sizes or (
        [10_000, 100_000]
        if args.quick
        else bs.FULL["sizes"] + ([100_000_000] if device.type == "cuda" else [])
    )
    name, nominal = nominal_peak(device)
    evict = Evict(device, 256 if device.type == "cuda" else bs.EVICT_MIB)
    result: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "backends": backends,
        "copy_gb_per_s": copy_bandwidth(device, 64 if args.quick else 1024) / 1e9,
        "nominal_gb_per_s": nominal / 1e9 if nominal else None,
        "rows": [],
    }
    for n in sizes:
        result["rows"].append(bench_size(n, torch.float32, device, backends, cfg, evict))
    target = bs.TARGET_TOKENS if bs.TARGET_TOKENS in sizes else sizes[-1]
    result["rows"].append(bench_size(target, torch.bfloat16, device, backends, cfg, evict))
    result["sync"] = sync_check(device, backends)
    if "compile" in backends:
        result["recompiles"] = recompile_check(device)
    return result


def format_table(r: dict) -> str:
    nominal = f"{r['nominal_gb_per_s']:.0f} GB/s nominal" if r["nominal_gb_per_s"] else "nominal peak unknown"
    lines = [
        f"klmonitor KLStats on {r['device']} | torch {r['torch']} | copy bandwidth "
        f"{r['copy_gb_per_s']:.0f} GB/s measured, {nominal}",
        "median ms of update + compute (host copy included) over interleaved rounds; cache evicted before each call",
        "",
        f"{'tokens':>12} {'dtype':<8} {'backend':<8} {'naive ms':>9} {'ours ms':>9} {'floor ms':>9} "
        f"{'naive/ours':>10} {'ours/floor':>10} {'GB/s':>8} {'of copy':>8} {'of nominal':>10}",
    ]
    for row in r["rows"]:
        for b, v in row["backends"].items():
            of_copy = v["gb_per_s"] / r["copy_gb_per_s"]
            of_nom = f"{v['gb_per_s'] / r['nominal_gb_per_s']:.1%}" if r["nominal_gb_per_s"] else "n/a"
            lines.append(
                f"{row['tokens']:>12,} {row['dtype']:<8} {b:<8} {row['naive_ms']:>9.3f} {v['ms']:>9.3f} "
                f"{row['floor_ms']:>9.3f} {v['naive_over_ours']:>9.1f}x {v['ours_over_floor']:>9.2f}x "
                f"{v['gb_per_s']:>8.1f} {of_copy:>8.1%} {of_nom:>10}"
            )
    lines.append("")
    for b, msg in r["sync"].items():
        lines.append(f"host syncs in update, backend={b}: {msg}")
    if "recompiles" in r:
        rc = r["recompiles"]
        lines.append(
            f"backend=compile over {len(rc['shapes'])} shapes x (mask, no mask): {rc['graphs_compiled']} graphs "
            f"compiled; first shape {rc['first_shape_s']:.1f} s, all {rc['all_shapes_s']:.1f} s"
        )
    worst = max(max(row["agreement_vs_float64"].values()) for row in r["rows"])
    lines.append(f"agreement with float64 (worst, in tolerance units, <= 1 passes): {worst:.3g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to run the logic on CPU")
    ap.add_argument("--backends", default="torch,triton,compile", help="KLStats backends, comma-separated")
    ap.add_argument("--sizes", type=bs.parse_sizes, help="token counts, e.g. 1e6,1e8")
    ap.add_argument("--quick", action="store_true", help="small sizes and few rounds (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
