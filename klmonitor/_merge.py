"""Chan's parallel merge of (count, means, M2s), the one merge every window part uses.

Two sets of samples, each described by its count, the means of its per-sample quantities and
their M2 (sums of squared deviations from the mean), merge exactly into the description of
their union (Chan, Golub and LeVeque, 1979), in any order: chunks of a batch, the batches of a
window, the ranks of a job. The main moments vector (:mod:`klmonitor._moments`) and the
f-divergence state (:mod:`klmonitor.fdiv`) both merge with :func:`chan`; the fused kernels
(C and Triton) implement the same rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chan", "chan_rows"]


def chan(
    count_a: Tensor, mean_a: Tensor, m2_a: Tensor, count_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, M2)`` of the union of two sample sets (either may be empty).

    Exact in float64. An empty side leaves the other unchanged (also when a mean is huge or
    infinite); a side whose mean is infinite (a divergence such as chi2 beyond float64's range)
    makes the union's mean and M2 infinite, never NaN.

    >>> n, m, s = chan(torch.tensor(2.0), torch.tensor([1.0]), torch.tensor([2.0]),
    ...                torch.tensor(2.0), torch.tensor([3.0]), torch.tensor([2.0]))
    >>> n.item(), m.tolist(), s.tolist()
    (4.0, [2.0], [8.0])
    """
    n = count_a + count_b
    inv = 1.0 / n.clamp_min(1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b * inv)
    # delta * (delta * f), not (delta * delta) * f: a delta near 1e300 (tokens of l in the
    # hundreds) must not overflow before the weight scales it.
    m2 = m2_a + m2_b + delta * (delta * (count_a * count_b * inv))
    # An infinite mean (inf - inf or inf * 0 would give NaN above) makes the union's mean it.
    inf_a, inf_b = torch.isinf(mean_a), torch.isinf(mean_b)
    mean = torch.where(inf_a, torch.where(inf_b, mean_a + mean_b, mean_a), torch.where(inf_b, mean_b, mean))
    # An empty side leaves the other as it is (no inf * 0 = NaN from its delta).
    mean = torch.where(count_b == 0, mean_a, torch.where(count_a == 0, mean_b, mean))
    m2 = torch.where(count_b == 0, m2_a, torch.where(count_a == 0, m2_b, m2))
    # A mean beyond float64 has an infinite spread.
    m2 = torch.where(torch.isinf(mean), torch.full_like(m2, torch.inf), m2)
    return n, mean, m2


def chan_rows(rows: Tensor, q: int) -> Tensor:
    """Merge the ``[count, q means, q M2s]`` vectors stacked in ``rows`` (``[R, 1 + 2q]``)."""
    rows = rows.reshape(-1, 1 + 2 * q)
    n, mean, m2 = rows[0, 0], rows[0, 1 : 1 + q], rows[0, 1 + q :]
    for r in range(1, rows.shape[0]):
        row = rows[r]
        n, mean, m2 = chan(n, mean, m2, row[0], row[1 : 1 + q], row[1 + q :])
    return torch.cat([n.reshape(1), mean, m2])
