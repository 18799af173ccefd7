"""The estimator table: every per-token estimator klmonitor computes, declared once.

Each :class:`Entry` names an estimator, its per-token formula in the log-ratio
``l = log p(x) - log q(x)`` (reference minus policy, ``r = e**l``), the divergence its mean
estimates, the function that computes it, and the Taylor coefficients used where the formula
cancels near ``r = 1``. The state layout (:mod:`klmonitor._layout`), :class:`~klmonitor.KLSummary`,
the metric names, the dashboards, ``klmonitor report`` and ``klmonitor reproduce`` read this
table; adding an f-divergence is one entry in :data:`F_DIVERGENCES` and its function in
:mod:`klmonitor.fdiv`.

Plain Python: importing it pulls in neither torch nor the native kernel.

>>> [e.name for e in KL]
['k1', 'k2', 'k3', 'kl_pq']
>>> entry("chi2").estimates
'Pearson chi2(p || q) = sum (p - q)**2 / q'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["F_DIVERGENCES", "F_NAMES", "KL", "KL_NAMES", "Entry", "entry"]


@dataclass(frozen=True)
class Entry:
    """One estimator of the table.

    Attributes:
        name: the name it is reported under (``kl/<name>/...`` for the KL family,
            ``kl/f/<name>/...`` for the f-divergences).
        formula: the per-token value in ``l`` and ``r = e**l``.
        estimates: the divergence its mean over tokens sampled from the policy estimates.
        function: ``"module:attribute"`` of the function computing it from ``l``.
        series: Taylor coefficients of ``l**2, l**3, ...`` used for ``|l| < 0.1`` where the
            formula cancels (empty: the formula is exact everywhere, e.g. ``expm1(l)**2``).
        unbiased: whether the mean is an unbiased estimate of ``estimates``.
        nonnegative: whether every per-token value is ``>= 0``.
        family: ``"kl"`` (the fixed set the kernels compute) or ``"f"`` (opt-in, torch path).
        note: what a user should know about it.
    """

    name: str
    formula: str
    estimates: str
    function: str
    series: tuple[float, ...] = ()
    unbiased: bool = True
    nonnegative: bool = True
    family: Literal["kl", "f"] = "kl"
    note: str = ""


#: The KL estimators, in the order they are reported (the kernels' fixed set).
KL: tuple[Entry, ...] = (
    Entry(
        "k1",
        "-l",
        "KL(q || p)",
        "klmonitor.estimators:k1",
        nonnegative=False,
        note="the naive estimator: unbiased, high variance, any sign",
    ),
    Entry(
        "k2",
        "l**2 / 2",
        "KL(q || p)",
        "klmonitor.estimators:k2",
        unbiased=False,
        note="biased as q leaves p (its mean is the f-divergence of (log r)**2 / 2)",
    ),
    Entry(
        "k3",
        "(r - 1) - l",
        "KL(q || p)",
        "klmonitor.estimators:k3",
        series=(1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040),
        note="k1 plus the control variate r - 1: unbiased and never negative",
    ),
    Entry(
        "kl_pq",
        "r l - (r - 1)",
        "KL(p || q)",
        "klmonitor.estimators:kl_pq",
        series=(1 / 2, 1 / 3, 1 / 8, 1 / 30, 1 / 144, 1 / 840),
        note="the reverse direction, the one a k3 penalty's gradient optimises",
    ),
)

#: The seed's f-divergence family: for a convex f with f(1) = 0, ``f(r) - f'(1) (r - 1)`` is an
#: unbiased, never negative estimator of ``D_f(p || q) = E_q[f(r)]``. Opt-in by name.
F_DIVERGENCES: tuple[Entry, ...] = (
    Entry(
        "chi2",
        "(r - 1)**2",
        "Pearson chi2(p || q) = sum (p - q)**2 / q",
        "klmonitor.fdiv:chi2",
        family="f",
        note="the importance-sampling variance: ESS = 1 / (1 + chi2); heavy-tailed far from p = q",
    ),
    Entry(
        "hellinger",
        "(sqrt(r) - 1)**2",
        "squared Hellinger sum (sqrt(p) - sqrt(q))**2, in [0, 2]",
        "klmonitor.fdiv:hellinger",
        family="f",
        note="twice the 1/2-normalised convention H**2 = 1 - sum sqrt(p q), which lies in [0, 1]",
    ),
    Entry(
        "js",
        "(r l - (1 + r) log((1 + r) / 2)) / 2",
        "Jensen-Shannon divergence, in [0, log 2]",
        "klmonitor.fdiv:js",
        series=(1 / 8, 1 / 16, 1 / 64, 1 / 384, 1 / 2304, 1 / 11520),
        family="f",
        note="bounded and symmetric; f'(1) = 0, so the per-token value is f(r) itself",
    ),
    Entry(
        "tv",
        "|r - 1| / 2",
        "total variation sum |p - q| / 2, in [0, 1]",
        "klmonitor.fdiv:tv",
        family="f",
        note="f is not differentiable at 1; the subgradient 0 is used",
    ),
)

#: The KL estimators' names, in report order.
KL_NAMES: tuple[str, ...] = tuple(e.name for e in KL)
#: The built-in f-divergences' names.
F_NAMES: tuple[str, ...] = tuple(e.name for e in F_DIVERGENCES)


def entry(name: str) -> Entry:
    """The table's entry called ``name``.

    Raises:
        KeyError: no such entry (the message lists the table's names).
    """
    for e in (*KL, *F_DIVERGENCES):
        if e.name == name:
            return e
    raise KeyError(f"no estimator {name!r} in klmonitor's table; it has {[*KL_NAMES, *F_NAMES]}")
