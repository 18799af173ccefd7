"""Benchmark: ``KLStats.update + compute`` against the eager code peers write, and the memory floor.

Timed variants, on the same inputs (policy and reference log-probs plus a bool mask of density
~0.8), interleaved round by round so that noise from a shared machine hits all of them alike;
each reports the median over rounds (and the best round):

* ``naive``: the straightforward eager code of peer libraries (TRL's ``masked_mean`` /
  ``masked_var``): each quantity computed separately, then its masked mean and variance, plus
  the count of non-finite tokens and the largest |log-ratio|. It reports the same numbers as
  ``KLStats`` and the script checks that they agree (and that KLStats matches float64).
* ``ours``: ``KLStats()`` as users construct it: ``reset(); update(logp, ref, mask); compute()``.
* ``floor``: one read of the inputs, ``logp.sum()``, ``ref.sum()`` and a uint8 read of the
  mask: nothing that looks at every token can be much faster.
* ``floor*``: the same with ``mask.sum()``, which on a bool tensor is not one read (torch
  materialises an int64 copy first); reported for reference.

Before every timed call a preamble runs, untimed (see :class:`Preamble`): by default a
multi-threaded torch op reading 128 MiB, as in a training step (cold caches, torch's OpenMP
workers still spinning); at one size also "idle" (cold caches, cores free).

Then memory: the resident set size (RSS) before and after thousands of updates (the window's
state is a fixed-size vector, so it must stay flat), and the peak RSS above the steady state
during one call (its temporaries), read from ``/proc/self/status`` after resetting the peak
through ``/proc/self/clear_refs`` (Linux).

Usage::

    python benchmarks/bench_stats.py            # full run (about 1.5 min on 2 cores)
    python benchmarks/bench_stats.py --quick    # small sizes, about 15 s (the CI smoke run)
    python benchmarks/bench_stats.py --json     # machine-readable results on stdout

Timings are never asserted; the script only fails when the naive code and KLStats disagree.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import klmonitor as klm
from klmonitor import _native

QUANTITIES = ("k1", "k2", "k3", "kl_pq", "r_minus_1", "k2_minus_k3")
MASK_DENSITY = 0.8
LOG_RATIO_STD = 0.05  # per-token |log-ratio| of 1e-3..1e-1, the usual regime of RL fine-tuning
# A policy far from its reference: most |log-ratios| exceed 0.34, where the kernel's fast path
# (no range reduction in exp) stops, so this row times its general path.
WIDE_LOG_RATIO_STD = 1.0
ROW_LEN = 1000  # inputs are [B, T] with T = 1000 (B = tokens / 1000)
TARGET_TOKENS = 4_000_000
EVICT_MIB = 128  # read before each timed call: 4x the 32 MiB L3 of the project's machine

FULL = {
    "sizes": [10_000, 100_000, 1_000_000, 4_000_000, 10_000_000],
    "extra_at": 4_000_000,  # bf16 inputs and backend="torch" rows
    "budget_s": 3.0,  # time per row spent on timed rounds (all three variants)
    "min_rounds": 7,
    "max_rounds": 100,
    "steady_tokens": 100_000,
    "steady_updates": 2000,
    "steady_backends": ["auto", "torch"],
    "steady_updates_torch": 500,  # the pure-torch path is slower; 500 updates show the trend
    "peak_tokens": 4_000_000,
}
QUICK = {
    "sizes": [10_000, 100_000, 1_000_000],
    "extra_at": 100_000,
    "budget_s": 0.25,
    "min_rounds": 3,
    "max_rounds": 20,
    "steady_tokens": 10_000,
    "steady_updates": 200,
    "steady_backends": ["auto"],
    "peak_tokens": 1_000_000,
}


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- inputs ---------------------------------------------------------------------------------
def make_inputs(
    n: int, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = LOG_RATIO_STD
) -> tuple[Any, Any, Any]:
    """Policy and reference log-probs of ``n`` sampled tokens, ``[n / 1000, 1000]``, and a mask.

    Log-probs are ``-Exponential(1)`` (typical sampled-token log-probs); the reference differs
    by ``N(0, std)`` per token. Built in place so that making them leaves no temporaries.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (max(1, n // ROW_LEN), min(n, ROW_LEN))
    logp = torch.empty(shape).exponential_(1.0, generator=g).neg_()
    ref = torch.empty(shape).normal_(0.0, std, generator=g).add_(logp)
    mask = torch.empty(shape, dtype=torch.bool).bernoulli_(MASK_DENSITY, generator=g)
    return logp.to(dtype), ref.to(dtype), mask


def input_bytes(logp: Any, ref: Any, mask: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (logp, ref, mask))


# -- the naive baseline: what peers write ---------------------------------------------------
def masked_mean(values: Any, mask: Any) -> Any:
    """TRL's ``masked_mean``."""
    return (values * mask).sum() / mask.sum()


def masked_var(values: Any, mask: Any, unbiased: bool = True) -> Any:
    """TRL's ``masked_var`` (sample variance with Bessel's correction)."""
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("the mask has no valid token")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def naive_kl_stats(logprobs: Any, ref_logprobs: Any, mask: Any, dtype: torch.dtype = torch.float32) -> dict:
    """The same numbers KLStats reports, in plain eager torch: each quantity on its own."""
    log_ratio = ref_logprobs.to(dtype) - logprobs.to(dtype)
    k1 = -log_ratio
    k2 = log_ratio**2 / 2
    k3 = torch.exp(log_ratio) - 1 - log_ratio
    kl_pq = torch.exp(log_ratio) * log_ratio - (torch.exp(log_ratio) - 1)
    r_minus_1 = torch.exp(log_ratio) - 1
    k2_minus_k3 = k2 - k3
    values = []
    for q in (k1, k2, k3, kl_pq, r_minus_1, k2_minus_k3):
        values.append(masked_mean(q, mask))
        values.append(masked_var(q, mask))
    tokens = mask.sum()
    nonfinite = (~torch.isfinite(log_ratio) & mask).sum()
    max_abs = (log_ratio.abs() * mask).max()
    host = torch.stack([v.double() for v in [*values, tokens, nonfinite, max_abs]]).tolist()
    out: dict[str, Any] = {
        name: {"mean": host[2 * i], "var": host[2 * i + 1]} for i, name in enumerate(QUANTITIES)
    }
    out.update(tokens=int(host[12]), nonfinite=int(host[13]), max_abs_log_ratio=host[14])
    return out


# -- ours and the floor ---------------------------------------------------------------------
def ours_kl_stats(stats: klm.KLStats, logp: Any, ref: Any, mask: Any) -> klm.KLSummary:
    stats.reset()
    stats.update(logp, ref, mask)
    return stats.compute()


def summary_values(s: klm.KLSummary) -> dict:
    out: dict[str, Any] = {q: {"mean": getattr(s, q).mean, "var": getattr(s, q).var} for q in QUANTITIES}
    out.update(tokens=s.tokens, nonfinite=s.nonfinite, max_abs_log_ratio=s.max_abs_log_ratio)
    return out


def floor_read(logp: Any, ref: Any, mask: Any) -> float:
    """One read of every input, and nothing else: the memory floor.

    The mask's bytes are summed as uint8 (the total wraps, which does not matter here): a pure
    read. ``mask.sum()`` on a bool tensor is not one: torch first materialises an int64 copy
    (8 bytes written per token), 3-4x slower than reading the mask; see :func:`floor_masksum`.
    """
    return float(logp.sum()) + float(ref.sum()) + float(mask.view(torch.uint8).sum(dtype=torch.uint8))


def floor_masksum(logp: Any, ref: Any, mask: Any) -> float:
    """The floor written literally, ``logp.sum(), ref.sum(), mask.sum()`` (reported, not used)."""
    return float(logp.sum()) + float(ref.sum()) + float(mask.sum())


# -- agreement ------------------------------------------------------------------------------
# Naive float32 code loses precision where k3 = exp(l) - 1 - l and k2 - k3 cancel (|l| << 1,
# and systematically so when bf16 inputs quantise l); KLStats uses Taylor series there. So
# KLStats is held to float64 truth tightly, and the naive code to KLStats more loosely: a tenth
# of a standard error is still far below anything a user could see in the numbers.
NAIVE_VS_OURS = {"mean_se": 0.1, "mean_rel": 1e-3, "var_rel": 1e-3}
OURS_VS_FLOAT64 = {"mean_se": 0.01, "mean_rel": 1e-4, "var_rel": 1e-4}


def disagreement(a: dict, b: dict, mean_se: float, mean_rel: float, var_rel: float) -> dict[str, float]:
    """How far result ``a`` is from ``b``, in tolerance units (<= 1 means they agree).

    Means: ``mean_se`` standard errors or ``mean_rel`` relative, whichever is larger (a mean
    near 0, like k1's, is judged on the statistical scale). Variances: ``var_rel`` relative.
    Counts: exact. Max |log-ratio|: 1e-6 relative.
    """
    n = max(b["tokens"], 1)
    out = {}
    for q in QUANTITIES:
        ma, mb, va, vb = a[q]["mean"], b[q]["mean"], a[q]["var"], b[q]["var"]
        tol_mean = max(mean_se * math.sqrt(max(vb, 0.0) / n), mean_rel * abs(mb), 1e-30)
        out[f"{q}/mean"] = abs(ma - mb) / tol_mean
        out[f"{q}/var"] = abs(va - vb) / max(var_rel * abs(vb), 1e-30)
    out["tokens"] = 0.0 if a["tokens"] == b["tokens"] else math.inf
    out["nonfinite"] = 0.0 if a["nonfinite"] == b["nonfinite"] else math.inf
    mx_a, mx_b = a["max_abs_log_ratio"], b["max_abs_log_ratio"]
    out["max_abs_log_ratio"] = abs(mx_a - mx_b) / max(1e-6 * abs(mx_b), 1e-30)
    return out


def check_agreement(what: str, a: dict, b: dict, tol: dict) -> dict:
    gap = disagreement(a, b, **tol)
    worst = max(gap, key=lambda k: gap[k])
    if not gap[worst] <= 1.0:
        raise AssertionError(f"{what}: {worst} off by {gap[worst]:.3g} x tolerance {tol}\n{a}\n{b}")
    return {"max_in_tolerance_units": gap[worst], "worst": worst, "tolerance": tol, "per_value": gap}


def error_vs_float64(values: dict, truth: dict) -> dict[str, float]:
    """Error of each mean in standard errors, and of each variance relative, vs float64."""
    n = max(truth["tokens"], 1)
    out = {}
    for q in QUANTITIES:
        se = math.sqrt(max(truth[q]["var"], 0.0) / n)
        out[f"{q}/mean_in_se"] = abs(values[q]["mean"] - truth[q]["mean"]) / se if se > 0 else 0.0
        out[f"{q}/var_rel"] = abs(values[q]["var"] / truth[q]["var"] - 1) if truth[q]["var"] else 0.0
    return out


# -- timing ---------------------------------------------------------------------------------
class Preamble:
    """What runs, untimed, before every timed call: the state each call starts from.

    ``"torch-op"`` (the default): a multi-threaded torch op that reads 128 MiB, as the ops
    that produce the log-probs would in a CPU training step. The CPU caches no longer hold the
    inputs (a 4e6-token input is 34 MiB, about this machine's 32 MiB L3; without eviction
    whichever variant runs after another that read the same inputs finds them cached), and
    torch's OpenMP workers are still spin-waiting for more work, as they are right after any
    torch op: code that runs its own threads then competes with them for the cores.

    ``"idle"``: the same read by numpy (one thread, no OpenMP), then 20 ms of sleep so that
    torch's OpenMP workers go to sleep: caches cold, cores free.

    ``"none"``: nothing (``--warm-cache``): inputs may be served from cache.
    """

    def __init__(self, kind: str, mib: int = EVICT_MIB) -> None:
        self.kind = kind
        self.buffer = torch.ones(mib * 2**20 // 4) if kind != "none" else None
        self.array = self.buffer.numpy() if self.buffer is not None else None

    def __call__(self) -> None:
        if self.kind == "torch-op":
            self.buffer.sum()
        elif self.kind == "idle":
            self.array.sum()
            time.sleep(0.02)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    budget_s: float,
    lo: int,
    hi: int,
    preamble: Callable[[], None] = lambda: None,
) -> dict:
    """Median seconds per call of each function, rounds interleaved in rotating order.

    ``preamble()`` runs, untimed, before every timed call.
    """
    names = list(fns)
    warm = {}
    for name in names:  # warm-up: two calls each, the second timed to size the run
        fns[name]()
        preamble()
        t0 = time.perf_counter()
        fns[name]()
        warm[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    preamble()
    per_round = sum(warm.values()) + len(names) * (time.perf_counter() - t0)
    rounds = int(min(hi, max(lo, budget_s / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    try:
        for r in range(rounds):
            # A loaded machine can make calls 10-100x slower: stop at 3x the budget, so that a
            # smoke run stays short (the rounds actually run are reported).
            if r > 0 and time.perf_counter() - start > 3 * budget_s:
                rounds = r
                break
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                fn = fns[name]
                preamble()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return {
        "rounds": rounds,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "min_s": {k: min(v) for k, v in times.items()},
        "all_s": times,
    }


def native_used(backend: str, logp: Any) -> bool:
    """Whether KLStats runs its fused C kernel on these inputs (the rule in its docstring)."""
    return (
        backend in ("auto", "native")
        and logp.device.type == "cpu"
        and logp.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and _native.available()
    )


def bench_row(
    n: int, dtype: torch.dtype, backend: str, cfg: dict, preamble: Preamble, std: float = LOG_RATIO_STD
) -> dict:
    label = {torch.float32: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    label += "" if backend == "auto" else f" backend={backend}"
    label += "" if std == LOG_RATIO_STD else f" std={std:g}"
    log(f"  {n:>10,} tokens, {label}, before each call: {preamble.kind} ...")
    logp, ref, mask = make_inputs(n, dtype, std=std)
    stats = klm.KLStats() if backend == "auto" else klm.KLStats(backend=backend)

    # Correctness first, outside the timings: both against each other and against float64.
    naive = naive_kl_stats(logp, ref, mask)
    ours = summary_values(ours_kl_stats(stats, logp, ref, mask))
    truth = naive_kl_stats(logp, ref, mask, dtype=torch.float64)
    agreement = check_agreement(f"naive vs KLStats at {n} tokens ({label})", naive, ours, NAIVE_VS_OURS)
    accuracy = check_agreement(f"KLStats vs float64 at {n} tokens ({label})", ours, truth, OURS_VS_FLOAT64)

    timing = time_interleaved(
        {
            "naive": lambda: naive_kl_stats(logp, ref, mask),
            "ours": lambda: ours_kl_stats(stats, logp, ref, mask),
            "floor": lambda: floor_read(logp, ref, mask),
            "floor_masksum": lambda: floor_masksum(logp, ref, mask),
        },
        cfg["budget_s"],
        cfg["min_rounds"],
        cfg["max_rounds"],
        preamble,
    )
    med, best = timing["median_s"], timing["min_s"]
    nbytes = input_bytes(logp, ref, mask)
    return {
        "label": label,
        "before_each_call": preamble.kind,
        "tokens": n,
        "valid_tokens": ours["tokens"],
        "dtype": label.split()[0],
        "backend": backend,
        "native_used": native_used(backend, logp),
        "input_bytes": nbytes,
        "rounds": timing["rounds"],
        "naive_ms": med["naive"] * 1e3,
        "ours_ms": med["ours"] * 1e3,
        "floor_ms": med["floor"] * 1e3,
        "naive_over_ours": med["naive"] / med["ours"],
        "ours_over_floor": med["ours"] / med["floor"],
        "naive_ms_min": best["naive"] * 1e3,
        "ours_ms_min": best["ours"] * 1e3,
        "floor_ms_min": best["floor"] * 1e3,
        "naive_over_ours_min": best["naive"] / best["ours"],
        "ours_over_floor_min": best["ours"] / best["floor"],
        "floor_masksum_ms": med["floor_masksum"] * 1e3,
        "ours_over_floor_masksum": med["ours"] / med["floor_masksum"],
        "ours_gb_per_s": nbytes / med["ours"] / 1e9,
        "floor_gb_per_s": nbytes / med["floor"] / 1e9,
        "ours_ms_quartiles": [q * 1e3 for q in statistics.quantiles(timing["all_s"]["ours"], n=4)]
        if timing["rounds"] > 1
        else None,
        "agreement": agreement,
        "ours_vs_float64": accuracy,
        "error_vs_float64": {"naive": error_vs_float64(naive, truth), "ours": error_vs_float64(ours, truth)},
        "values": {"naive": naive, "ours": ours, "float64": truth},
    }


def fixed_overhead_us(cfg: dict) -> dict:
    """Per-call cost at 16 tokens, where the work is nothing and only fixed overhead is left."""
    logp, ref, mask = make_inputs(16)
    stats = klm.KLStats()
    timing = time_interleaved(
        {
            "naive": lambda: naive_kl_stats(logp, ref, mask),
            "ours": lambda: ours_kl_stats(stats, logp, ref, mask),
            "ours_update_only": lambda: stats.update(logp, ref, mask),
            "ours_reset_only": stats.reset,
            "floor": lambda: floor_read(logp, ref, mask),
        },
        cfg["budget_s"],
        max(cfg["min_rounds"], 50),
        2000,
    )
    return {k: v * 1e6 for k, v in timing["median_s"].items()}


# -- memory ---------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    return peak_rss_mib()  # no /proc: the peak is the best we have


def peak_rss_mib() -> float:
    kib = _proc_status_kib("VmHWM")
    if kib is None:  # ru_maxrss is KiB on Linux, bytes on macOS
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = kib // 1024 if sys.platform == "darwin" else kib
    return kib / 1024


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that RSS is live memory.

    Without it, pages freed by an earlier variant stay resident and a later variant's
    temporaries reuse them unseen by the peak.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def steady_memory(n: int, updates: int, backend: str) -> dict:
    """RSS before and after ``updates`` updates of ``n`` tokens into one window (no reset).

    A ``compute`` every 100 updates, as at logging steps. Flat RSS means no per-step growth.
    """
    log(f"  steady state: {updates} updates of {n:,} tokens, backend={backend} ...")
    logp, ref, mask = make_inputs(n)
    stats = klm.KLStats() if backend == "auto" else klm.KLStats(backend=backend)
    for _ in range(20):  # warm-up: allocator pools, thread pool, kernel
        stats.update(logp, ref, mask)
    stats.compute()
    stats.reset()
    trim_heap()
    before = rss_mib()
    peak_reset = reset_peak_rss()
    checkpoints = []
    t0 = time.perf_counter()
    for i in range(1, updates + 1):
        stats.update(logp, ref, mask)
        if i % 100 == 0:
            stats.compute()
        if i % max(1, updates // 4) == 0:
            trim_heap()
            checkpoints.append({"update": i, "rss_mib": rss_mib()})
    elapsed = time.perf_counter() - t0
    summary = stats.compute()
    trim_heap()
    after = rss_mib()
    return {
        "backend": backend,
        "tokens_per_update": n,
        "updates": updates,
        "window_tokens": summary.tokens,
        "rss_before_mib": before,
        "rss_after_mib": after,
        "rss_growth_mib": after - before,
        "rss_growth_per_update_kib": (after - before) * 1024 / updates,
        "peak_above_before_mib": peak_rss_mib() - before if peak_reset else None,
        "rss_checkpoints": checkpoints,
        "ms_per_update": elapsed / updates * 1e3,
        "state_bytes": stats.summary_vector().numel() * stats.summary_vector().element_size(),
    }


def _peak_of(call: Callable[[], Any], repeats: int = 5) -> float | None:
    """Peak RSS above the steady state during one call (after two warm-up calls), MiB.

    The median over ``repeats`` calls, each measured from a trimmed heap and a reset peak.
    """
    call()
    call()
    peaks = []
    for _ in range(repeats):
        trim_heap()
        before = rss_mib()
        if not reset_peak_rss():
            return None
        call()
        peaks.append(peak_rss_mib() - before)
    return statistics.median(peaks)


def peak_per_call(n: int) -> list[dict]:
    """Peak RSS above the steady state during one call: the call's temporaries."""
    log(f"  peak temporaries of one call at {n:,} tokens ...")
    rows = []
    for name, dtype, backend in (
        ("naive float32", torch.float32, None),
        ("ours float32", torch.float32, "auto"),
        ("ours bf16", torch.bfloat16, "auto"),
        ("ours float32 backend=torch", torch.float32, "torch"),
    ):
        logp, ref, mask = make_inputs(n, dtype)
        if backend is None:
            peak = _peak_of(functools.partial(naive_kl_stats, logp, ref, mask))
        else:
            stats = klm.KLStats(backend=backend)
            peak = _peak_of(functools.partial(ours_kl_stats, stats, logp, ref, mask))
        nbytes = input_bytes(logp, ref, mask)
        rows.append(
            {
                "variant": name,
                "tokens": n,
                "input_mib": nbytes / 2**20,
                "peak_temp_mib": peak,
                "peak_temp_over_input": peak * 2**20 / nbytes if peak is not None else None,
            }
        )
        del logp, ref, mask
        gc.collect()
    return rows


# -- report ---------------------------------------------------------------------------------
def meta(quick: bool) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "quick": quick,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "klmonitor": getattr(klm, "__version__", None),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "native_available": _native.available(),
        "native_vector_isa": _native.vector_isa(),
        "mask_density": MASK_DENSITY,
        "log_ratio_std": LOG_RATIO_STD,
        "wide_log_ratio_std": WIDE_LOG_RATIO_STD,
        "row_len": ROW_LEN,
        "load_average_at_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def format_table(result: dict) -> str:
    m = result["meta"]
    load = f"load average {m['load_average_at_start']} -> {m.get('load_average_at_end')}"
    lines = [
        f"klmonitor KLStats.update + compute  |  torch {m['torch']}, {m['torch_threads']} threads "
        f"({m['cpu_count']} CPUs: {m['cpu']}), native kernel: {'yes (' + str(m.get('native_vector_isa')) + ')' if m['native_available'] else 'NO'}",
        f"inputs: [B, {m['row_len']}] log-probs, bool mask (density {m['mask_density']}), "
        f"log-ratio ~ N(0, {m['log_ratio_std']}) (rows marked std=: N(0, std)); median ms over "
        f"interleaved rounds; {load}",
        "before each call: torch-op = a 2-thread torch read of 128 MiB (cold caches, OpenMP workers "
        "spinning); idle = numpy read + 20 ms sleep (cold caches, cores free)",
        "floor = logp.sum() + ref.sum() + a uint8 read of the mask; floor* = with mask.sum() "
        "(bool -> int64 copy)",
        "",
        f"{'tokens':>11} {'inputs':<21} {'before':<8} {'naive ms':>9} {'ours ms':>8} {'floor ms':>8} "
        f"{'floor* ms':>9} {'naive/ours':>10} {'ours/floor':>10} {'ours/floor*':>11} {'rounds':>6}  "
        f"{'best: naive/ours':>16} {'ours/floor':>10}",
    ]
    busy = [x for x in (m["load_average_at_start"], m.get("load_average_at_end")) if x]
    if any(x[0] > 0.5 * (m["cpu_count"] or 1) for x in busy):
        lines.insert(4, "WARNING: the machine was busy (load average above half its CPUs): timings are noisy")
    for r in result["rows"]:
        lines.append(
            f"{r['tokens']:>11,} {r['label']:<21} {r['before_each_call']:<8} {r['naive_ms']:>9.3f} "
            f"{r['ours_ms']:>8.3f} {r['floor_ms']:>8.3f} {r['floor_masksum_ms']:>9.3f} "
            f"{r['naive_over_ours']:>9.1f}x {r['ours_over_floor']:>9.2f}x "
            f"{r['ours_over_floor_masksum']:>10.2f}x {r['rounds']:>6}  "
            f"{r['naive_over_ours_min']:>15.1f}x {r['ours_over_floor_min']:>9.2f}x"
        )
    lines.append("")
    for t in result.get("targets") or []:
        lines.append(
            f"target at {t['tokens']:,} float32 tokens, before each call {t['before_each_call']}: "
            f"naive/ours {t['naive_over_ours']:.1f}x (want >= 10: {'met' if t['naive_over_ours'] >= 10 else 'NOT met'}); "
            f"ours/floor {t['ours_over_floor']:.2f}x, ours/floor* {t['ours_over_floor_masksum']:.2f}x "
            f"(want <= 3: {'met' if t['ours_over_floor'] <= 3 else 'NOT met'} / "
            f"{'met' if t['ours_over_floor_masksum'] <= 3 else 'NOT met'})"
        )
    o = result["fixed_overhead_us"]
    lines += [
        f"fixed cost per call at 16 tokens (us): ours update+compute {o['ours']:.0f} "
        f"(update {o['ours_update_only']:.0f}, reset {o['ours_reset_only']:.0f}, so compute about "
        f"{o['ours'] - o['ours_update_only'] - o['ours_reset_only']:.0f}), naive {o['naive']:.0f}, "
        f"floor {o['floor']:.0f}",
        "agreement (naive vs ours, worst value in tolerance units, <= 1 passes): "
        + ", ".join(f"{r['agreement']['max_in_tolerance_units']:.2g}" for r in result["rows"]),
        "",
        "memory",
    ]
    for st in result["memory"]["steady"]:
        peak = st["peak_above_before_mib"]
        lines.append(
            f"  {st['updates']} updates x {st['tokens_per_update']:,} tokens (backend={st['backend']}): "
            f"RSS {st['rss_before_mib']:.1f} -> {st['rss_after_mib']:.1f} MiB "
            f"({st['rss_growth_per_update_kib']:+.3f} KiB/update), peak above start "
            + (f"{peak:.1f} MiB" if peak is not None else "n/a")
            + f", state {st['state_bytes']} bytes"
        )
    for p in result["memory"]["peak_per_call"]:
        if p["peak_temp_mib"] is None:
            lines.append(f"  {p['variant']:<28} peak temporaries: n/a (cannot reset the peak here)")
        else:
            lines.append(
                f"  {p['variant']:<28} peak temporaries at {p['tokens']:,} tokens: "
                f"{p['peak_temp_mib']:7.1f} MiB ({p['peak_temp_over_input']:.2f}x the "
                f"{p['input_mib']:.1f} MiB of inputs)"
            )
    return "\n".join(lines)


def run(quick: bool, sizes: list[int] | None = None, warm_cache: bool = False) -> dict:
    cfg = dict(QUICK if quick else FULL)
    if sizes:
        cfg["sizes"] = sizes
    torch.manual_seed(0)
    result: dict[str, Any] = {"meta": meta(quick), "rows": []}
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native kernel: {_native.available()}")
    load = _loadavg()
    if load and load[0] > 0.5 * (os.cpu_count() or 1):
        log(
            f"warning: load average {load[0]} on {os.cpu_count()} CPUs: other processes compete for "
            "the cores and torch's threaded ops slow down by up to 100x; timings will be noisy"
        )
    main = Preamble("none" if warm_cache else "torch-op")
    rows = result["rows"]
    for n in cfg["sizes"]:
        rows.append(bench_row(n, torch.float32, "auto", cfg, main))
        if n == cfg["extra_at"]:
            rows.append(bench_row(n, torch.float32, "auto", cfg, main, std=WIDE_LOG_RATIO_STD))
            rows.append(bench_row(n, torch.bfloat16, "auto", cfg, main))
            rows.append(bench_row(n, torch.float32, "torch", cfg, main))
            if not warm_cache:
                rows.append(bench_row(n, torch.float32, "auto", cfg, Preamble("idle")))
    del main
    result["targets"] = [
        {
            "tokens": TARGET_TOKENS,
            "before_each_call": r["before_each_call"],
            "naive_over_ours": r["naive_over_ours"],
            "ours_over_floor": r["ours_over_floor"],
            "ours_over_floor_masksum": r["ours_over_floor_masksum"],
            "naive_over_ours_min": r["naive_over_ours_min"],
            "ours_over_floor_min": r["ours_over_floor_min"],
            "want_naive_over_ours_at_least": 10.0,
            "want_ours_over_floor_at_most": 3.0,
        }
        for r in rows
        if r["tokens"] == TARGET_TOKENS and r["label"] == "float32"
    ]
    result["fixed_overhead_us"] = fixed_overhead_us(cfg)
    result["memory"] = {
        "peak_reset_supported": reset_peak_rss(),
        "steady": [
            steady_memory(
                cfg["steady_tokens"],
                cfg.get(f"steady_updates_{b}", cfg["steady_updates"]),
                b,
            )
            for b in cfg["steady_backends"]
        ],
        "peak_per_call": peak_per_call(cfg["peak_tokens"]),
    }
    result["meta"]["load_average_at_end"] = _loadavg()
    return result


def parse_sizes(text: str) -> list[int]:
    """``"1e5,4e6"`` -> ``[100000, 4000000]`` (the ``--sizes`` option of the benchmarks)."""
    return [int(float(x)) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--sizes", type=parse_sizes, help="token counts, e.g. 1e5,4e6")
    parser.add_argument("--save", metavar="PATH", help="also write the JSON results to PATH")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="run nothing between timed calls (inputs may then be served from the CPU caches)",
    )
    args = parser.parse_args(argv)
    result = run(args.quick, args.sizes, args.warm_cache)
    if args.save:
        with open(args.save, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
