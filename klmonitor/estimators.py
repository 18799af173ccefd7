"""Elementwise KL estimators on log-ratios (pure math: no state, no I/O).

Notation (see ``ESTIMATORS.md``): ``q`` is the policy that sampled ``x``, ``p`` the frozen
reference. The log-ratio of a sample is ``l = log p(x) - log q(x)`` (reference minus policy)
and the ratio is ``r = exp(l)``. Each estimator below is a per-sample value whose mean over
samples drawn from ``q`` estimates a divergence:

===========  ==========================  ==============================  =========
name         per-sample value            estimates                       sign
===========  ==========================  ==============================  =========
``k1``       ``-l``                      ``KL(q || p)``, unbiased        any
``k2``       ``l**2 / 2``                ``KL(q || p)``, biased          ``>= 0``
``k3``       ``(r - 1) - l``             ``KL(q || p)``, unbiased        ``>= 0``
``kl_pq``    ``r * l - (r - 1)``         ``KL(p || q)``, unbiased        ``>= 0``
===========  ==========================  ==============================  =========

Numerics: every function computes in float32 at least (bf16/fp16 inputs are upcast) and
keeps float64 inputs in float64. ``k3`` and ``kl_pq`` cancel catastrophically near
``l = 0``, the normal regime of RL fine-tuning, so for ``|l| < 0.1`` they are evaluated with a
Taylor series (``sum_{n>=2} l**n / n!`` and ``sum_{n>=2} (n - 1) l**n / n!``), which keeps full
relative precision down to the smallest ``|l|``. ``exp(l)`` overflows float32 above ``l ~ 88``:
these functions compute in their input's dtype and do not clamp (pass float64 for ``l`` up to
~700); :class:`klmonitor.KLStats` widens to float64 itself where float32 would overflow, and
counts the tokens with a large ``|l|`` (``kl/extreme``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from klmonitor import table

__all__ = [
    "ESTIMATORS",
    "K3_SERIES",
    "KLPQ_SERIES",
    "TAYLOR_BELOW",
    "compute_dtype",
    "horner",
    "k1",
    "k2",
    "k3",
    "kl_pq",
    "log_ratio",
    "ratio_minus_one",
]

#: The estimator names, in the order they are reported (from :mod:`klmonitor.table`).
ESTIMATORS: tuple[str, ...] = table.KL_NAMES

# Below this |l| the Taylor series is used for k3 and kl_pq. With terms up to l**7 the
# truncation error relative to the leading l**2/2 term is below 1e-10 here, and above it
# expm1-based formulas lose less than 1e-6 relative precision in float32.
TAYLOR_BELOW = 0.1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype estimators are computed in for inputs of ``dtype``: float32 at least.

    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_float(x: Tensor) -> Tensor:
    if not torch.is_floating_point(x):
        raise TypeError(
            f"expected a floating-point tensor of log-probs or log-ratios, got dtype {x.dtype}; "
            "pass log-probabilities (e.g. from log_softmax gathered at the sampled tokens), "
            "not token ids or integer scores"
        )
    return x.to(compute_dtype(x.dtype))


def log_ratio(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """The log-ratio ``l = ref_logprobs - logprobs`` in float32 at least.

    Args:
        logprobs: log q(x), the policy's log-probs of the sampled tokens.
        ref_logprobs: log p(x), the reference model's log-probs of the same tokens.

    >>> log_ratio(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0]))
    tensor([-0.5000,  0.0000])
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs has shape {tuple(logprobs.shape)} but ref_logprobs has shape "
            f"{tuple(ref_logprobs.shape)}; both must be the log-probs of the same sampled tokens"
        )
    return _as_float(ref_logprobs) - _as_float(logprobs)


def k1(log_ratio: Tensor) -> Tensor:
    """The naive estimator ``k1 = -l`` of KL(q || p): unbiased, high variance, any sign.

    >>> k1(torch.tensor([0.5, -0.5]))
    tensor([-0.5000,  0.5000])
    """
    return -_as_float(log_ratio)


def k2(log_ratio: Tensor) -> Tensor:
    """The estimator ``k2 = l**2 / 2`` of KL(q || p): never negative, biased as q leaves p.

    Its mean is the f-divergence with ``f(x) = (log x)**2 / 2``, which agrees with KL to second
    order in the distance between the distributions.

    >>> k2(torch.tensor([0.5, -0.5]))
    tensor([0.1250, 0.1250])
    """
    lr = _as_float(log_ratio)
    return 0.5 * lr * lr


def horner(lr: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """``c0 + l*(c1 + l*(c2 + ...))`` by Horner's rule (the series of :func:`k3` and :func:`kl_pq`).

    >>> horner(torch.tensor([2.0]), (1.0, 3.0))
    tensor([7.])
    """
    acc = torch.full_like(lr, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * lr + c
    return acc


def _small_series(lr: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """``l**2 * (c2 + l*(c3 + l*(...)))``, the Taylor branch of k3 and kl_pq."""
    return horner(lr, coeffs) * lr * lr


#: Taylor coefficients of l**n for n = 2..7: 1/n! for k3 and (n-1)/n! for kl_pq, from the
#: estimator table (the kernels evaluate the same series).
K3_SERIES = table.entry("k3").series
KLPQ_SERIES = table.entry("kl_pq").series


def k3(log_ratio: Tensor) -> Tensor:
    """The estimator ``k3 = (r - 1) - l`` of KL(q || p): unbiased and never negative.

    It is ``k1`` plus the zero-mean control variate ``r - 1``; geometrically, the gap between
    ``log`` and its tangent at 1. Evaluated as ``expm1(l) - l``, or a Taylor series for
    ``|l| < 0.1`` where that subtraction would cancel.

    >>> k3(torch.tensor([0.0, 1e-6, 1.0]))
    tensor([0.0000e+00, 5.0000e-13, 7.1828e-01])
    """
    lr = _as_float(log_ratio)
    small = lr.abs() < TAYLOR_BELOW
    series = _small_series(lr, K3_SERIES)
    direct = torch.expm1(lr) - lr
    return torch.where(small, series, direct).clamp_min(0.0)


def kl_pq(log_ratio: Tensor) -> Tensor:
    """The estimator ``r * l - (r - 1)`` of the reverse KL(p || q): unbiased, never negative.

    The gradient of ``k3`` in a loss is, in expectation, the gradient of this direction, so
    logging it beside ``k3`` shows what a ``k3`` penalty really optimises.

    >>> kl_pq(torch.tensor([0.0, 1e-6, 1.0]))
    tensor([0.0000e+00, 5.0000e-13, 1.0000e+00])
    """
    lr = _as_float(log_ratio)
    small = lr.abs() < TAYLOR_BELOW
    series = _small_series(lr, KLPQ_SERIES)
    direct = torch.exp(lr) * lr - torch.expm1(lr)
    return torch.where(small, series, direct).clamp_min(0.0)


def ratio_minus_one(log_ratio: Tensor) -> Tensor:
    """The control variate ``r - 1 = expm1(l)``, whose mean under q is exactly 0.

    ``k3 - k1 == r - 1``; a mean far from 0 in standard errors means the samples were not
    drawn from the policy whose log-probs were given.

    >>> ratio_minus_one(torch.tensor([0.0, 1.0]))
    tensor([0.0000, 1.7183])
    """
    return torch.expm1(_as_float(log_ratio))
