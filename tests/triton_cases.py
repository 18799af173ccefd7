"""Inputs for the fused-kernel tests, and (run as a script) the kernel's results on them.

``python tests/triton_cases.py`` must run with ``TRITON_INTERPRET=1`` (Triton's interpreter
runs the kernel on CPU tensors, but only when set before Triton is imported, hence a separate
process): it prints ``{case: moments vector}`` as JSON for every case of :func:`cases`,
computed by ``klmonitor._triton.fold`` and, for the ``klstats_*`` cases, by
``KLStats(backend="triton")``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

NAN, INF = float("nan"), float("inf")
BLOCK = 1024  # klmonitor._triton.BLOCK, the tile: cases straddle it


def _batch(n: int, seed: int, scale: float = 0.3, density: float | None = 0.8, bad: bool = True):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.empty(n).exponential_(generator=g)
    ref = logp + scale * torch.randn(n, generator=g)
    if bad and n >= 16:
        ref[:: max(1, n // 7)] = NAN
        ref[1 :: max(1, n // 5)] = -INF
        logp[2 :: max(1, n // 9)] = INF
        ref[3 :: max(1, n // 3)] = logp[3 :: max(1, n // 3)] + 25.0
    mask = None if density is None else torch.rand(n, generator=g) < density
    return logp, ref, mask


def cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]]:
    """name -> (logp, ref, mask, clamp), deterministic."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]] = {}
    for n in (1, 37, BLOCK, BLOCK + 1, 5003):
        for density in (None, 0.8, 0.05):
            logp, ref, mask = _batch(n, n, density=density)
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                out[f"n{n}_d{density}_{str(dt)[6:]}"] = (logp.to(dt), ref.to(dt), mask, 20.0)
    logp, ref, mask = _batch(3000, 1)
    out["mixed_f32_bf16"] = (logp, ref.bfloat16(), mask, 20.0)
    for clamp in (0.05, 1.0, 5.0, 30.0):
        logp, ref, mask = _batch(4000, 2, scale=3.0)
        out[f"clamp{clamp}"] = (logp, ref, mask, clamp)
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(6000, generator=g)
    l = torch.cat(
        [
            torch.linspace(-0.2, 0.2, 2000),
            6 * torch.randn(2000, generator=g),
            1e-6 * torch.randn(2000, generator=g),
        ]
    )
    out["wide_and_taylor_boundary"] = (logp, logp + l, None, 20.0)
    rng = np.random.default_rng(0)
    ulp = float(np.spacing(np.float32(4.3)))
    ref = torch.from_numpy((np.float32(4.3) + rng.integers(-3, 4, 5000) * ulp).astype(np.float32))
    out["nearly_constant"] = (torch.full((5000,), -1.0), ref, torch.from_numpy(rng.random(5000) < 0.7), 20.0)
    out["all_masked"] = (torch.zeros(3000), torch.ones(3000), torch.zeros(3000, dtype=torch.bool), 20.0)
    out["all_nonfinite"] = (torch.tensor([NAN, -INF, 0.0]), torch.tensor([0.0, 1.0, INF]), None, 20.0)
    out["single_token"] = (torch.tensor([-1.0]), torch.tensor([-1.5]), torch.tensor([True]), 20.0)
    logp, ref, mask = _batch(6000, 8)
    out["strided_views"] = (logp[::2], ref[1::2], mask[1::2], 20.0)
    return out


#: Target log-ratios of the exactness cases (each also negated): across float32's range
#: (30: the float64 kernel; 88.7: float32's exp overflows) to 700 (r - 1 = 1e304).
EXACT_L = (1e-6, 0.05, 0.3, 1.0, 10.0, 20.0, 29.9, 30.5, 31.0, 40.0, 88.0, 89.0, 100.0, 300.0, 700.0)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
MIXED_N = BLOCK + 300  # two tiles, the second a partial one
ALL_N = 3 * BLOCK + 100  # four tiles


def targets() -> list[float]:
    """0 and the signed targets of ``EXACT_L``."""
    return [0.0, *EXACT_L, *(-t for t in EXACT_L)]


def token(target: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, ref)`` in ``dtype`` with ``ref - logp`` near ``target`` (both <= 0).

    From a base of -1.3 (0 for small ``|target|``, where the base's rounding would swamp
    ``target``, and for ``|target| >= 100``, so that 700 stays 700 in fp16 and bf16: a token
    above 700 counts as non-finite); the realised log-ratio is within 2 % of the target.
    """
    small = abs(target) < (0.01 if dtype == torch.float32 else 1.0)
    base = 0.0 if small or abs(target) >= 100 else -1.3
    pair = (base - target, base) if target >= 0 else (base, base + target)
    logp, ref = (torch.tensor([v], dtype=torch.float64).to(dtype) for v in pair)
    real = ref.double() - logp.double()
    assert abs(real.item() - target) <= 0.02 * abs(target), (target, dtype, real.item())
    return logp, ref


def _ordinary(n: int, seed: int, dtype: torch.dtype, masked: bool):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.empty(n).exponential_(generator=g) - 0.1
    ref = logp + 0.3 * torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.8 if masked else None
    return logp.to(dtype), ref.to(dtype), mask


def exact_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float, float]]:
    """name -> (logp, ref, mask, clamp, threshold), deterministic: the exactness cases.

    ``one_{dtype}_{m|n}_{target}``: one token of log-ratio ``target`` (with a mask: and a
    masked-off token of ``l = 50.5``); ``mixed_{dtype}_{m|n}_{target}``: that token among
    ``MIXED_N`` ordinary tokens, in tile 0 or (every other target) the partial tile 1, so only
    that tile can take the float64 kernel; ``all_{dtype}_{m|n}``: every target at once in
    ``ALL_N`` ordinary tokens, those above 30 in tile 1 only. No clamp, threshold 20.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float, float]] = {}
    inf = float("inf")
    for key, dt in DTYPES.items():
        for masked in (False, True):
            tag = f"{key}_{'m' if masked else 'n'}"
            base_lp, base_rp, base_mask = _ordinary(MIXED_N, 11, dt, masked)
            for i, target in enumerate(targets()):
                at = 500 if i % 2 else BLOCK + 150
                lp, rp = token(target, dt)
                if masked:  # a masked-off token the kernel must ignore (l = 50.5)
                    one = (torch.cat([lp, lp - 50.5]), torch.cat([rp, rp]), torch.tensor([True, False]))
                else:
                    one = (lp, rp, None)
                out[f"one_{tag}_{target:g}"] = (*one, inf, 20.0)
                logp, ref = base_lp.clone(), base_rp.clone()
                logp[at], ref[at] = lp[0], rp[0]
                mask = None
                if base_mask is not None:
                    mask = base_mask.clone()
                    mask[at] = True
                out[f"mixed_{tag}_{target:g}"] = (logp, ref, mask, inf, 20.0)
            logp, ref, mask = _ordinary(ALL_N, 10, dt, masked)
            small_at, big_at = 7, BLOCK + 3  # |l| <= 30 in tile 0, the others in tile 1
            for target in targets():
                lp, rp = token(target, dt)
                if abs(target) <= 30:
                    at, small_at = small_at, small_at + 37
                else:
                    at, big_at = big_at, big_at + 41
                logp[at], ref[at] = lp[0], rp[0]
                if mask is not None:
                    mask[at] = True
            out[f"all_{tag}"] = (logp, ref, mask, inf, 20.0)
    return out


def edge_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float, float]]:
    """name -> (logp, ref, mask, clamp, threshold): overflow, thresholds, and opt-in clamps."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float, float]] = {}
    inf = float("inf")
    # l = +700 (r - 1 = 1e304: squares overflow float64) in every tile, in runs and alone
    logp, ref, mask = _ordinary(ALL_N, 12, torch.float32, True)
    big = torch.tensor([5, 6, 7, BLOCK - 1, BLOCK, 2 * BLOCK + 9, 3 * BLOCK + 99])
    logp[big], mask[big] = -701.0, True
    ref[big] = -1.0
    out["plus700_scattered"] = (logp, ref, mask, inf, 20.0)
    # a whole tile at l = 700 (n e**700 l overflows: means from sums of q / n), then half a tile
    logp, ref, _ = _ordinary(2 * BLOCK, 13, torch.float32, False)
    logp[:BLOCK], ref[:BLOCK] = -701.0, -1.0
    logp[BLOCK : BLOCK + BLOCK // 2], ref[BLOCK : BLOCK + BLOCK // 2] = -701.0, -1.0
    out["plus700_full_tiles"] = (logp, ref, None, inf, 20.0)
    # beyond float64 (l = 750, 1e4): infinite means, never NaN; and l = -800 (r underflows)
    logp, ref, mask = _ordinary(2 * BLOCK, 14, torch.float32, True)
    logp[[3, 500, BLOCK + 1]] = torch.tensor([-751.0, -1e4, -2.0])
    ref[[3, 500, BLOCK + 1]] = torch.tensor([-1.0, -1.0, -802.0])
    mask[[3, 500, BLOCK + 1]] = True
    out["beyond_float64"] = (logp, ref, mask, inf, 20.0)
    # the extreme count next to the threshold: float32 log-ratios within a few ulp of +-20 and
    # +-0.1 (where the float32 rounding of l may cross it), with clamp inf; then clamp = 10
    g = torch.Generator().manual_seed(15)
    n = 2 * BLOCK + 300
    logp = -(torch.rand(n, generator=g) * 3.0 + 0.2)
    for thr in (20.0, 0.1):
        ulp = float(torch.finfo(torch.float32).eps) * thr
        delta = thr + ulp * torch.randint(-6, 7, (n,), generator=g).double()
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
        ref = (logp.double() + sign * delta).float()
        ref[::5] = logp[::5] + 0.2 * torch.randn(n // 5 + 1, generator=g)  # ordinary tokens
        out[f"threshold{thr:g}_clamp_inf"] = (logp, ref, None, inf, thr)
    logp, ref, mask = _ordinary(ALL_N, 16, torch.float32, True)
    ref[::7] = logp[::7] + 14.0 * torch.randn(len(ref[::7]), generator=g)
    out["clamp10"] = (logp, ref, mask, 10.0, 10.0)
    out["clamp10_bf16"] = (logp.bfloat16(), ref.bfloat16(), mask, 10.0, 10.0)
    out["clamp50_threshold20"] = (logp, ref * 4.0, mask, 50.0, 20.0)
    return out


def exact_results(device: str, interpret: bool) -> dict[str, list[float]]:
    """``{case: moments vector}`` of the kernel on the cases of :func:`exact_cases` and
    :func:`edge_cases` on ``device``, and ``plus700_folded_thrice``: that case folded three
    times into one state."""
    from klmonitor import _moments as mom
    from klmonitor import _triton

    dev = torch.device(device)
    result = {}
    for name, case in {**exact_cases(), **edge_cases()}.items():
        logp, ref, mask = (t.to(dev) if t is not None else None for t in case[:3])
        assert _triton.supports(logp, ref, interpret=interpret), name
        acc = _triton.fold(mom.empty(dev), logp, ref, mask, *case[3:], interpret=interpret)
        result[name] = acc.tolist()
    # folding l = 700 batches into a state that already holds them: still no NaN
    logp, ref, mask, clamp, threshold = (
        t.to(dev) if isinstance(t, torch.Tensor) else t for t in edge_cases()["plus700_scattered"]
    )
    acc = mom.empty(dev)
    for _ in range(3):
        acc = _triton.fold(acc, logp, ref, mask, clamp, threshold, interpret=interpret)
    result["plus700_folded_thrice"] = acc.tolist()
    return result


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from klmonitor import KLStats, _triton
    from klmonitor import _moments as mom

    result = {}
    for name, (logp, ref, mask, clamp) in cases().items():
        assert _triton.supports(logp, ref), name
        result[name] = _triton.fold(mom.empty(), logp, ref, mask, clamp, clamp, interpret=True).tolist()
    result.update(exact_results("cpu", interpret=True))
    # empty input: the state is returned as it is
    acc = mom.empty() + 1.0
    result["empty_keeps_state"] = _triton.fold(
        acc, torch.zeros(0), torch.zeros(0), None, 20.0, 20.0, interpret=True
    ).tolist()
    # folding batches one after another into the state
    logp, ref, mask = _batch(7000, 9)
    acc = mom.empty()
    for lo, hi in ((0, 5), (5, 4000), (4000, 4001), (4001, 7000)):
        acc = _triton.fold(acc, logp[lo:hi], ref[lo:hi], mask[lo:hi], INF, 20.0, interpret=True)  # no clamp
    result["folded_batches"] = acc.tolist()
    # KLStats end to end: [B, T] inputs, an int mask, backend="triton" (CPU: the interpreter)
    stats = KLStats(backend="triton")
    stats.update(logp.reshape(7, 1000), ref.reshape(7, 1000), mask.reshape(7, 1000).int())
    result["klstats_triton"] = stats.summary_vector().tolist()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
