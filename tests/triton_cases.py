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


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from klmonitor import KLStats, _triton
    from klmonitor import _moments as mom

    result = {}
    for name, (logp, ref, mask, clamp) in cases().items():
        assert _triton.supports(logp, ref, clamp), name
        result[name] = _triton.fold(mom.empty(), logp, ref, mask, clamp, interpret=True).tolist()
    # empty input: the state is returned as it is
    acc = mom.empty() + 1.0
    result["empty_keeps_state"] = _triton.fold(
        acc, torch.zeros(0), torch.zeros(0), None, 20.0, interpret=True
    ).tolist()
    # folding batches one after another into the state
    logp, ref, mask = _batch(7000, 9)
    acc = mom.empty()
    for lo, hi in ((0, 5), (5, 4000), (4000, 4001), (4001, 7000)):
        acc = _triton.fold(acc, logp[lo:hi], ref[lo:hi], mask[lo:hi], 20.0, interpret=True)
    result["folded_batches"] = acc.tolist()
    # KLStats end to end: [B, T] inputs, an int mask, backend="triton" (CPU: the interpreter)
    stats = KLStats(backend="triton")
    stats.update(logp.reshape(7, 1000), ref.reshape(7, 1000), mask.reshape(7, 1000).int())
    result["klstats_triton"] = stats.summary_vector().tolist()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
