"""Inputs for the Triton kernel's diagnostics tests, and (run as a script) the kernel's results.

``python tests/triton_diag_cases.py`` must run with ``TRITON_INTERPRET=1`` (Triton's
interpreter runs the kernels on CPU tensors, but only when set before Triton is imported,
hence a separate process): it prints, as JSON, ``_triton.fold``'s diagnostics for every case of
:func:`kernel_cases` (and whether the moments equal those of a fold without diagnostics), and
what a ``Monitor(backend="triton")`` makes of :func:`monitor_batches`. The same functions run
the compiled kernels on a CUDA device (``tests/test_triton_diagnostics.py``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

BLOCK = 1024  # klmonitor._triton.BLOCK: cases straddle it
NAN, INF = math.nan, math.inf
VOCAB = 50
OUTPUTS = ("row_sum", "row_count", "bucket_sum", "bucket_count", "token_sum", "token_count", "outside")


def _batch(rows: int, cols: int, seed: int, dtype: torch.dtype = torch.float32, density: float | None = 0.8):
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    logp = -torch.rand(n, generator=g) * 4.0
    ref = logp + torch.randn(n, generator=g)
    near = torch.rand(n, generator=g) < 0.2  # |l| < 0.1: the series branch
    ref[near] = logp[near] + 0.03 * torch.randn(int(near.sum()), generator=g)
    mask = None if density is None else torch.rand(n, generator=g) < density
    ids = torch.randint(-3, VOCAB + 5, (n,), generator=g)  # some outside [0, VOCAB)
    return logp.to(dtype), ref.to(dtype), mask, ids


def _put(logp, ref, mask, at: int, l: float) -> None:
    """Token ``at`` gets the log-ratio ``l`` (nan, +-inf or a number) and is counted."""
    if math.isfinite(l):
        ref[at] = logp[at] + l
    else:
        ref[at] = l
    if mask is not None:
        mask[at] = True


def kernel_cases() -> dict[str, dict[str, Any]]:
    """name -> {logp, ref, mask, ids, row_len, rows, buckets, vocab, clamp, block, group}.

    Deterministic. ``row_len`` 0: no rows (a flat batch: the token table only); ``rows``
    False, ``buckets`` 0 or ``ids`` ``None``: that part off. ``block`` and ``group``: the
    kernels' tile (``_triton.BLOCK``) and tiles per float64 program (``_triton.GROUP``) for the
    case. Most cases run on tiles of 256 tokens: Triton's interpreter runs the kernels' scan
    one token at a time (about 0.4 ms each), so smaller tiles keep the same shapes (rows
    spanning tiles, tiles spanning rows) at a quarter of the tokens; the first cases run at
    the real tile size.
    """
    out: dict[str, dict[str, Any]] = {}

    def case(name, logp, ref, mask, ids, row_len, buckets, clamp=INF, rows=True, block=256, group=64):
        out[name] = {"logp": logp, "ref": ref, "mask": mask, "ids": ids, "row_len": row_len,
                     "rows": rows and row_len > 0, "buckets": buckets, "vocab": VOCAB, "clamp": clamp,
                     "block": block, "group": group}  # fmt: skip

    # at the real tile size: rows longer than a tile (T not a multiple of it), every bucket,
    # NaN and inf, and tiles the float64 kernel redoes (|l| = 45 and 699; l = 800 is beyond
    # 700: not counted), one that it does not (tile 1)
    logp, ref, mask, ids = _batch(2, 1100, 1)
    for at, l in ((5, 45.0), (1100, 3.0), (2100, 699.0), (2150, 800.0), (7, NAN), (8, INF), (9, -INF)):
        _put(logp, ref, mask, at, l)
    case("rows_span_tiles", logp, ref, mask, ids, 1100, 12, block=BLOCK)
    # the token table alone, of a flat batch, a float64 tile among float32 ones
    logp, ref, mask, ids = _batch(1, 2500, 2)
    _put(logp, ref, mask, 1200, -100.0)
    case("tokens_only", logp, ref, mask, ids, 0, 0, block=BLOCK)
    # short rows: a tile spans 85 rows, one row spans two tiles
    logp, ref, mask, ids = _batch(200, 3, 3)
    case("short_rows", logp, ref, mask, ids, 3, 3)
    # bf16 inputs, no mask, 7 buckets (the last open from position 64), one float64 tile
    logp, ref, mask, ids = _batch(3, 200, 4, torch.bfloat16, density=None)
    _put(logp, ref, mask, 500, 45.0)
    case("bf16_no_mask", logp, ref, mask, ids, 200, 7)
    # opt-in clamps: 10 (no float64 kernel), 30 (none either: it runs above 30), 50 (it does,
    # for tile 1; tile 0 stays below 30)
    for clamp, seed in ((10.0, 5), (30.0, 6), (50.0, 7)):
        logp, ref, mask, ids = _batch(2, 200, seed)
        for at, l in ((3, 25.0), (260, 40.0), (261, -35.0), (300, 100.0), (310, 45.0), (350, -60.0)):
            _put(logp, ref, mask, at, l)
        case(f"clamp{clamp:g}", logp, ref, mask, ids, 200, 12, clamp)
    # float64 programs of 2 tiles: the redone tiles 1 and 2 in the first and second program;
    # one row of 768 tokens: positions up to bucket 9 (512-767), 13 buckets
    logp, ref, mask, ids = _batch(1, 768, 8)
    _put(logp, ref, mask, 256 + 10, 50.0)
    _put(logp, ref, mask, 512 + 1, -31.0)
    case("float64_groups", logp, ref, mask, ids, 768, 13, group=2)
    # rows only; buckets only, one (every position)
    logp, ref, mask, ids = _batch(3, 150, 9)
    case("rows_only", logp, ref, mask, None, 150, 0)
    case("one_bucket", logp, ref, mask, None, 150, 1, rows=False)
    # one token; every token masked (nothing added); ids all outside the vocabulary
    logp, ref, mask, ids = _batch(1, 1, 10)
    mask[0] = True
    case("single_token", logp, ref, mask, ids, 1, 2)
    logp, ref, mask, ids = _batch(2, 150, 11)
    case("all_masked", logp, ref, torch.zeros_like(mask), ids, 150, 12)
    case("ids_outside", logp, ref, mask, ids + 1000, 0, 0)
    return out


def outputs(c: dict[str, Any], device: torch.device, fill: float = 0.0):
    """The case's ``Diagnostics`` (outputs filled with ``fill``, on ``device``)."""
    from klmonitor._native import Diagnostics

    n = c["logp"].numel()

    def new(size: int) -> torch.Tensor:
        return torch.full((size,), fill, dtype=torch.float64, device=device)

    d = Diagnostics(n, row_len=c["row_len"])
    if c["rows"]:
        d.row_sum, d.row_count = new(n // c["row_len"]), new(n // c["row_len"])
    if c["buckets"]:
        d.bucket_sum, d.bucket_count = new(c["buckets"]), new(c["buckets"])
    if c["ids"] is not None:
        d.ids = c["ids"].to(device)
        d.token_sum, d.token_count, d.outside = new(c["vocab"]), new(c["vocab"]), new(1)
    return d


def kernel_results(device: str, interpret: bool) -> dict[str, Any]:
    """``{case: {output: list, "moments_unchanged": bool, "done": bool}}`` on ``device``.

    Each case is folded with its diagnostics into outputs filled with 1 (the kernel adds to
    them), and without; the moments of both folds must be equal.
    """
    from klmonitor import _moments as mom
    from klmonitor import _triton

    dev = torch.device(device)
    result: dict[str, Any] = {}
    block, group = _triton.BLOCK, _triton.GROUP
    try:
        for name, c in kernel_cases().items():
            _triton.BLOCK, _triton.GROUP = c["block"], c["group"]
            logp, ref = c["logp"].to(dev), c["ref"].to(dev)
            mask = c["mask"].to(dev) if c["mask"] is not None else None
            d = outputs(c, dev, fill=1.0)
            with_diag = _triton.fold(mom.empty(dev), logp, ref, mask, c["clamp"], 20.0, interpret, diag=d)
            without = _triton.fold(mom.empty(dev), logp, ref, mask, c["clamp"], 20.0, interpret)
            got: dict[str, Any] = {k: getattr(d, k).tolist() for k in OUTPUTS if getattr(d, k) is not None}
            got["done"] = d.done
            got["moments_unchanged"] = bool(torch.equal(with_diag, without))
            result[name] = got
    finally:
        _triton.BLOCK, _triton.GROUP = block, group
    return result


def monitor_batches() -> list[tuple[dict[str, torch.Tensor], float | None]]:
    """``[(Monitor.update's keyword arguments, clamp)]``: a window of two batches without a
    clamp (tokens at |l| = 45, 60 and 800, NaN), then one at a clamp of 10."""
    g = torch.Generator().manual_seed(0)
    out = []
    for (rows, cols), clamp in (((8, 301), None), ((3, 1100), None), ((4, 400), 10.0)):
        lp = -torch.rand(rows, cols, generator=g) * 4
        rf = lp + 0.3 * torch.randn(rows, cols, generator=g)
        rf[0, 7], rf[2, 100], rf[1, 2], rf[2, 9] = lp[0, 7] + 45, lp[2, 100] - 60, NAN, lp[2, 9] + 800
        batch = {
            "logprobs": lp,
            "ref_logprobs": rf,
            "mask": torch.rand(rows, cols, generator=g) < 0.9,
            "token_ids": torch.randint(-2, VOCAB + 2, (rows, cols), generator=g),
        }
        out.append((batch, clamp))
    return out


def monitor_windows(backend: str, device: str) -> list[dict[str, Any]]:
    """What a Monitor on ``backend`` makes of :func:`monitor_batches` on ``device``: per window
    (the batches of one clamp), the position and token vectors before the window ends, the top
    sequences' vector, whether the kernel computed the diagnostics, and the summary's parts."""
    from klmonitor import Monitor

    dev = torch.device(device)
    windows: list[dict[str, Any]] = []
    groups: dict[float | None, list[dict[str, torch.Tensor]]] = {}
    for batch, clamp in monitor_batches():
        groups.setdefault(clamp, []).append({k: v.to(dev) for k, v in batch.items()})
    for clamp, batches in groups.items():
        m = Monitor(
            log_every_n_steps=1, by_position=True, position_rows=None, top_sequences=4, top_tokens=5,
            vocab_size=VOCAB, rules=[], backend=backend, clamp=clamp, histogram=False,
        )  # fmt: skip
        m.reset_window(1)
        asked = []  # the requests the monitor made: `done` where a kernel computed them
        make_request = m._kernel_request

        def spy(*args: Any, make: Any = make_request, into: list[Any] = asked) -> Any:
            into.append(make(*args))
            return into[-1]

        m._kernel_request = spy  # type: ignore[method-assign]
        for batch in batches:
            m.update(**batch)
        done = [r is not None and r.done for r in asked]
        assert m.positions is not None and m.tokens is not None and m.sequences is not None
        vectors = {
            "positions": m.positions.vector(dev).tolist(),
            "tokens": m.tokens.vector(dev).tolist(),
            "sequences": m.sequences.vector(dev).tolist(),
        }
        res = m.step(2)
        assert res is not None
        s = res.summary
        windows.append(
            {
                "clamp": clamp,
                "done": done,
                **vectors,
                "tokens_counted": s.tokens,
                "k3_mean": s.k3.mean,
                "by_position": [[b.label, b.tokens, b.k3_mean] for b in s.by_position or []],
                "top_sequences": [
                    [t.row, t.tokens, t.token_ids, t.kl_sum, t.token_kl] for t in s.top_sequences
                ],
                "top_tokens": [[t.token_id, t.count, t.kl_sum] for t in s.top_tokens],
            }
        )
    return windows


def declined(interpret: bool, device: str = "cpu") -> dict[str, Any]:
    """A request with rows longer than ``_triton.MAX_ROW_LEN`` (lowered to 100 here): not done,
    its outputs untouched, the moments as without it."""
    from klmonitor import _moments as mom
    from klmonitor import _triton

    c = kernel_cases()["rows_only"]  # rows of 150 tokens
    dev = torch.device(device)
    logp, ref, mask = c["logp"].to(dev), c["ref"].to(dev), c["mask"].to(dev)
    d = outputs(c, dev, fill=1.0)
    longest = _triton.MAX_ROW_LEN
    _triton.MAX_ROW_LEN = 100
    try:
        acc = _triton.fold(mom.empty(dev), logp, ref, mask, INF, 20.0, interpret, diag=d)
    finally:
        _triton.MAX_ROW_LEN = longest
    plain = _triton.fold(mom.empty(dev), logp, ref, mask, INF, 20.0, interpret)
    assert d.row_sum is not None and d.row_count is not None
    untouched = bool((d.row_sum == 1).all() and (d.row_count == 1).all())
    return {"done": d.done, "untouched": untouched, "moments_unchanged": bool(torch.equal(acc, plain))}


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    result = {
        "kernel": kernel_results("cpu", interpret=True),
        "monitor": monitor_windows("triton", "cpu"),
        "declined": declined(interpret=True),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
