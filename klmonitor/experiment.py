"""The Gaussian experiment of Schulman's note, computed with KLStats; and the note's figure.

``q = N(0, 1)`` is the policy that draws the samples; the reference is ``p = N(mu, 1)``. For
equal variances both directions of KL are ``mu**2 / 2`` in closed form, and so are three of the
f-divergences of the estimator table (:data:`CLOSED_FORMS`): Pearson ``chi2(p || q) =
e**(mu**2) - 1``, the squared Hellinger distance ``sum (sqrt(p) - sqrt(q))**2 = 2 (1 -
e**(-mu**2 / 8))`` and total variation ``2 Phi(mu / 2) - 1``. Each estimator's bias and
standard deviation are reported relative to the true value of what it estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from klmonitor import table
from klmonitor.stats import KLStats
from klmonitor.summary import REPORTED

__all__ = ["CLOSED_FORMS", "Record", "format_table", "gaussian_experiment", "plot_estimators"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

#: The f-divergences between N(mu, 1) and N(0, 1) in closed form, by the table's names.
CLOSED_FORMS: dict[str, Callable[[float], float]] = {
    "chi2": lambda mu: math.expm1(mu * mu),
    "hellinger": lambda mu: -2.0 * math.expm1(-mu * mu / 8.0),
    "tv": lambda mu: math.erf(abs(mu) / (2.0 * math.sqrt(2.0))),
}


@dataclass
class Record:
    """One estimator's bias and standard deviation in one setting, divided by the true value.

    ``true_kl`` is the setting's KL (``mu**2 / 2``); ``target`` names what the estimator
    estimates (``"kl"``, or the f-divergence's name) and ``true_value`` its exact value, which
    ``bias`` and ``std`` are divided by.
    """

    p_mean: float
    true_kl: float
    estimator: str
    bias: float
    std: float
    target: str = "kl"
    true_value: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.true_value):
            self.true_value = self.true_kl

    def to_dict(self) -> dict[str, float | str]:
        """The record as a JSON-ready dict."""
        return asdict(self)


def gaussian_experiment(
    p_means: tuple[float, ...] = (0.1, 1.0),
    samples: int = 10_000_000,
    seed: int = 0,
    chunk: int = 1_000_000,
    f_divergences: Sequence[str] = tuple(CLOSED_FORMS),
) -> list[Record]:
    """Bias and std of every estimator, each divided by the true value of what it estimates.

    The KL estimators k1, k2, k3, kl_pq and the control-variate estimate cv (true value
    ``mu**2 / 2``), then each of ``f_divergences`` against its closed form.

    Args:
        p_means: means of the reference ``p = N(mu, 1)``; the policy is ``q = N(0, 1)``.
        samples: samples drawn from ``q`` per setting.
        seed: seed of the sampler (results are reproducible).
        chunk: samples per ``KLStats.update`` (the window is streamed).
        f_divergences: f-divergences of :data:`CLOSED_FORMS` to add (default: all of them).

    >>> recs = gaussian_experiment(p_means=(1.0,), samples=200_000)
    >>> [r.estimator for r in recs]
    ['k1', 'k2', 'k3', 'kl_pq', 'cv', 'chi2', 'hellinger', 'tv']
    >>> 0.2 < recs[1].bias < 0.3  # k2 overestimates KL by about a quarter at mu = 1
    True
    """
    if samples < 2:
        raise ValueError(f"samples must be at least 2, got {samples}")
    unknown = [f for f in f_divergences if f not in CLOSED_FORMS]
    if unknown:
        raise ValueError(f"no Gaussian closed form for {unknown}; the experiment has {list(CLOSED_FORMS)}")
    records: list[Record] = []
    for mu in p_means:
        if mu == 0:
            raise ValueError("p_mean 0 gives a true KL of 0, which cannot normalise bias and std")
        gen = torch.Generator().manual_seed(seed)
        stats = KLStats(f_divergences=list(f_divergences) or None)
        for lo in range(0, samples, chunk):
            x = torch.randn(min(chunk, samples - lo), generator=gen)
            logq = -0.5 * x * x - _HALF_LOG_2PI
            logp = -0.5 * (x - mu) ** 2 - _HALF_LOG_2PI
            stats.update(logq, logp)
        summary = stats.compute()
        true_kl = mu * mu / 2  # KL(q||p) = KL(p||q) for equal variances
        for name in REPORTED:
            st = summary.estimator(name)
            records.append(Record(mu, true_kl, name, (st.mean - true_kl) / true_kl, st.std / true_kl))
        for name in f_divergences:
            st, true = summary.f[name], CLOSED_FORMS[name](mu)
            records.append(Record(mu, true_kl, name, (st.mean - true) / true, st.std / true, name, true))
    return records


def format_table(records: list[Record]) -> str:
    """A plain-text table, one block per setting."""
    lines: list[str] = []
    for mu in dict.fromkeys(r.p_mean for r in records):
        rows = [r for r in records if r.p_mean == mu]
        lines.append(f"q = N(0, 1), p = N({mu:g}, 1), true KL = {rows[0].true_kl:.6g}")
        lines.append(f"  {'estimator':<10}{'bias/true':>12}{'std/true':>12}")
        for r in rows:
            note = {
                "kl_pq": "  (estimates KL(p||q))",
                "cv": "  (k1 + lambda (r - 1), lambda from the samples)",
            }.get(r.estimator, "")
            if r.target != "kl":
                note = f"  ({table.entry(r.target).estimates.split(',')[0]}: true {r.true_value:.6g})"
            lines.append(f"  {r.estimator:<10}{r.bias:>12.4f}{r.std:>12.4f}{note}")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_estimators(path: str | Path, f_divergences: Sequence[str] = ()) -> Path:
    """Draw the note's figure: k1, k2 and k3 as functions of the ratio ``r = p(x) / q(x)``.

    With ``f_divergences`` (names of the table's f family), their per-token estimators are drawn
    beside (dashed). Needs matplotlib (``pip install "klmonitor[plot]"``). Returns the path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            'the figure needs matplotlib: pip install "klmonitor[plot]" (or pip install matplotlib)'
        ) from exc
    from klmonitor import estimators as est
    from klmonitor import fdiv

    for name in f_divergences:
        if name not in table.F_NAMES:
            raise ValueError(f"unknown f-divergence {name!r}; the table has {list(table.F_NAMES)}")
    r = torch.linspace(0.02, 4.0, 800, dtype=torch.float64)
    lr = torch.log(r)
    fig, ax = plt.subplots(figsize=(10.0, 4.8), dpi=120)
    for name, fn in (("k1", est.k1), ("k2", est.k2), ("k3", est.k3)):
        e = table.entry(name)
        ax.plot(r.numpy(), fn(lr).numpy(), linewidth=2.0, label=f"{name} = {e.formula}")
    for name in f_divergences:
        values = getattr(fdiv, name)(lr)
        ax.plot(
            r.numpy(),
            values.numpy(),
            linestyle="--",
            linewidth=1.6,
            label=f"{name} = {table.entry(name).formula}",
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlim(0.0, 4.0)
    ax.set_ylim(-1.5, 3.0)
    ax.set_xlabel("r = p(x) / q(x)   (l = log r)")
    ax.set_ylabel("per-sample value")
    ax.set_title("Per-sample estimators of KL(q || p)" + (" and f-divergences" if f_divergences else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
