"""The eager torch path of ``KLStats.update``: aten ops per update and peak live temporaries.

On a GPU without the fused kernel, ``backend="torch"`` is what runs: every aten op is a kernel
launch (plus Python and dispatcher overhead), and every temporary is device memory taken from
the training step. This script counts both, exactly, with a ``TorchDispatchMode``:

* **ops**: every aten op dispatched during one ``update`` (views and in-place ops included;
  the first update of a ``KLStats`` is not counted, since it moves the state and fills caches);
* **peak temporaries**: the largest total size of the tensors created during the ``update``
  that are alive at the same time (storages created by an op and not yet freed; views count
  once, writes into existing storages count nothing), over the inputs' size (``logp``, ``ref``
  and mask bytes). Workspaces reused across chunks count in full.

Usage::

    python benchmarks/bench_eager_ops.py              # 4e6 masked float32 tokens and variants
    python benchmarks/bench_eager_ops.py --json       # the same as JSON
    python benchmarks/bench_eager_ops.py --sizes 1e5  # other sizes

Targets (DESIGN.md, "Performance targets"), at 4M masked float32 tokens: at most 200 aten ops
per update and peak temporaries at most half the inputs' size. They hold with float32 rows
(``clamp`` up to 30). Without a clamp (the default, exact to |l| = 700) the rows are float64,
as float32 would overflow: the same chunks take twice the bytes (bounds ``MAX_OPS_EXACT``,
``MAX_PEAK_OVER_INPUT_EXACT``); halving them instead would double the ops, i.e. the launches
that dominate a small update on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klmonitor
import klmonitor as klm  # noqa: E402

TARGET_TOKENS = 4_000_000
MAX_OPS = 200
MAX_PEAK_OVER_INPUT = 0.5
# Without a clamp (float64 rows): what this checkout measures, as a regression bound.
MAX_OPS_EXACT = 220
MAX_PEAK_OVER_INPUT_EXACT = 1.0


class OpMemoryTracer(TorchDispatchMode):
    """Counts aten ops and tracks the live bytes of storages created while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.live: dict[int, int] = {}  # storage data_ptr -> nbytes, for storages created here
        self.refs: dict[int, list[Any]] = {}  # storage data_ptr -> weakrefs of its tensors
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        refs = self.refs.get(ptr)
        if refs is None or any(r() is not None for r in refs):
            return
        self.current -= self.live.pop(ptr)
        del self.refs[ptr]

    def _track(self, t: torch.Tensor, ptr: int) -> None:
        self.refs[ptr].append(weakref.ref(t, lambda _r, p=ptr: self._release(p)))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.ops[str(func.overloadpacket)] += 1
        flat_in, _ = tree_flatten((args, kwargs))
        in_ptrs = {
            t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor) and t.numel()
        }
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        for t in flat_out:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr in self.live:  # a view or an out= write into a storage created here
                self._track(t, ptr)
            elif ptr not in in_ptrs and nbytes > 0:  # a new storage
                self.live[ptr] = nbytes
                self.refs[ptr] = []
                self._track(t, ptr)
                self.current += nbytes
                self.peak = max(self.peak, self.current)
        return out

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())


def make_inputs(n: int, dtype: torch.dtype, masked: bool, seed: int = 0) -> tuple[Any, Any, Any]:
    """``[n / 1000, 1000]`` log-probs as in bench_stats.py (mask density 0.8)."""
    g = torch.Generator().manual_seed(seed)
    shape = (max(1, n // 1000), min(n, 1000))
    logp = torch.empty(shape).exponential_(1.0, generator=g).neg_()
    ref = torch.empty(shape).normal_(0.0, 0.05, generator=g).add_(logp)
    mask = torch.empty(shape, dtype=torch.bool).bernoulli_(0.8, generator=g) if masked else None
    return logp.to(dtype), ref.to(dtype), mask


def measure(
    n: int,
    dtype: torch.dtype = torch.float32,
    masked: bool = True,
    level: str = "token",
    clamp: float | None = None,
) -> dict[str, Any]:
    """Ops and peak temporaries of one steady-state ``update`` with ``backend="torch"``."""
    logp, ref, mask = make_inputs(n, dtype, masked)
    stats = klm.KLStats(backend="torch", level=level, clamp=clamp)  # type: ignore[arg-type]
    stats.update(logp, ref, mask)  # first update: moves the state, fills constant caches
    with OpMemoryTracer() as tracer:
        stats.update(logp, ref, mask)
    in_bytes = sum(t.numel() * t.element_size() for t in (logp, ref, mask) if t is not None)
    return {
        "tokens": logp.numel(),
        "dtype": str(dtype).removeprefix("torch."),
        "masked": masked,
        "level": level,
        "clamp": clamp,
        "ops": tracer.total_ops,
        "distinct_ops": len(tracer.ops),
        "top_ops": dict(tracer.ops.most_common(8)),
        "all_ops": dict(tracer.ops),
        "peak_temp_bytes": tracer.peak,
        "input_bytes": in_bytes,
        "peak_temp_over_input": tracer.peak / in_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=None, help="comma-separated token counts (default 4e6)")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else [TARGET_TOKENS]
    rows = []
    for n in sizes:
        rows.append(measure(n, torch.float32, True, clamp=20.0))
        rows.append(measure(n, torch.float32, True))
        if n == sizes[-1]:
            rows.append(measure(n, torch.float32, False))
            rows.append(measure(n, torch.bfloat16, True))
            rows.append(measure(n, torch.float32, True, level="sequence"))
    result = {
        "torch": torch.__version__,
        "targets": {"max_ops": MAX_OPS, "max_peak_over_input": MAX_PEAK_OVER_INPUT},
        "bounds_without_clamp": {"max_ops": MAX_OPS_EXACT, "max_peak_over_input": MAX_PEAK_OVER_INPUT_EXACT},
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"KLStats(backend='torch').update, steady state, torch {torch.__version__}")
    print(
        f"{'tokens':>11} {'dtype':>8} {'mask':>5} {'level':>8} {'clamp':>6} {'ops':>5} {'peak MiB':>9} "
        f"{'x input':>8}"
    )
    for r in rows:
        clamp = "none" if r["clamp"] is None else f"{r['clamp']:g}"
        print(
            f"{r['tokens']:>11,} {r['dtype']:>8} {'yes' if r['masked'] else 'no':>5} {r['level']:>8} "
            f"{clamp:>6} {r['ops']:>5} {r['peak_temp_bytes'] / 2**20:>9.1f} {r['peak_temp_over_input']:>8.2f}"
        )
    print(
        f"targets at {TARGET_TOKENS:,} masked float32 tokens (token level, clamp=20 as peers: float32 rows): "
        f"ops <= {MAX_OPS}, peak <= {MAX_PEAK_OVER_INPUT}x the inputs; without a clamp (float64 rows): "
        f"ops <= {MAX_OPS_EXACT}, peak <= {MAX_PEAK_OVER_INPUT_EXACT}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
