"""Chan's merge (klmonitor._merge): any split of a sample set merges to its float64 statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from klmonitor._merge import chan, chan_rows


def describe(x: np.ndarray) -> torch.Tensor:
    """[count, means, M2s] of the columns of ``x`` ([n, q]), in float64 numpy."""
    n, q = x.shape
    mean = x.mean(0) if n else np.zeros(q)
    m2 = ((x - mean) ** 2).sum(0) if n else np.zeros(q)
    return torch.tensor([float(n), *mean, *m2], dtype=torch.float64)


values = st.lists(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=2), min_size=0, max_size=40
)


@settings(max_examples=200, deadline=None)
@given(values, st.lists(st.integers(0, 40), max_size=5))
def test_any_split_merges_to_the_whole(rows: list[list[float]], cuts: list[int]) -> None:
    x = np.array(rows, dtype=np.float64).reshape(-1, 2)
    bounds = sorted({0, len(x), *(c for c in cuts if c <= len(x))})
    parts = [describe(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)] or [describe(x)]
    got = chan_rows(torch.stack(parts), 2)
    want = describe(x)
    scale = float(np.abs(x).max()) if len(x) else 1.0
    assert got[0].item() == want[0].item()
    assert got[1:3].tolist() == pytest.approx(want[1:3].tolist(), abs=1e-9 * max(scale, 1.0))
    assert got[3:].tolist() == pytest.approx(want[3:].tolist(), rel=1e-7, abs=1e-6 * max(scale, 1.0) ** 2)


def test_empty_sides_leave_the_other_unchanged_even_when_huge() -> None:
    zero = torch.tensor(0.0, dtype=torch.float64)
    big = torch.tensor([1e300], dtype=torch.float64)
    for a, b in (((zero, big * 0, big * 0), (torch.tensor(3.0, dtype=torch.float64), big, big)),):
        n, mean, m2 = chan(*a, *b)
        assert (n.item(), mean.item(), m2.item()) == (3.0, 1e300, 1e300)
        n, mean, m2 = chan(*b, *a)
        assert (n.item(), mean.item(), m2.item()) == (3.0, 1e300, 1e300)


def test_infinite_means_stay_infinite_never_nan() -> None:
    one = torch.tensor(1.0, dtype=torch.float64)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    fin = torch.tensor([2.0], dtype=torch.float64)
    for a, b in (
        ((one, inf, inf), (one, fin, fin)),
        ((one, fin, fin), (one, inf, inf)),
        ((one, inf, inf),) * 2,
    ):
        n, mean, m2 = chan(*a, *b)
        assert n.item() == 2.0 and mean.item() == math.inf and m2.item() == math.inf
