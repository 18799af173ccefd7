"""KLSummary and the metric names it is logged under (plain Python: no torch).

A :class:`KLSummary` is what one window of log-probs says about KL(policy || reference): the
statistics of the four estimators, the control variate ``r - 1``, the k2-k3 drift and the
token diagnostics, as plain Python numbers. :meth:`KLSummary.to_dict` gives the names they are
logged under; every sink, the alert rules and ``klmonitor report`` use these, so the names are
defined here once. Importing this module pulls in neither torch nor the native kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from klmonitor import _layout as lay
from klmonitor import table

__all__ = [
    "ESTIMATORS",
    "REPORTED",
    "EstimatorStats",
    "InitialSummary",
    "KLSummary",
    "Level",
    "LEVELS",
    "BAND_SE",
    "band_names",
    "metric_name",
    "stderr_bands",
]

#: The estimator names, in the order they are reported.
ESTIMATORS: tuple[str, ...] = table.KL_NAMES

Level = Literal["token", "sequence"]
#: The statistics levels: over tokens, or over sequences (sums of their tokens' values).
LEVELS: tuple[Level, ...] = ("token", "sequence")

#: Everything reported per estimator: the four estimators and the control-variate estimate ``cv``.
REPORTED: tuple[str, ...] = (*ESTIMATORS, "cv")

#: Estimators drawn with bands (TensorBoard margin charts); the f-divergences logged get theirs too.
BAND_ESTIMATORS: tuple[str, ...] = ("k1", "k3")
#: Half-width of the dashboards' bands around a window mean, in standard errors of the mean (about
#: a 95 % interval): TensorBoard's margin charts and ``klmonitor report`` draw the same bands.
BAND_SE = 2.0


def metric_name(prefix: str, name: str) -> str:
    """The logged name of metric ``name`` under ``prefix``.

    >>> metric_name("kl/", "k3/mean")
    'kl/k3/mean'
    """
    return f"{prefix}{name}"


def band_names(prefix: str, estimator: str) -> tuple[str, str]:
    """The lower and upper band names of ``estimator`` (mean - std, mean + std)."""
    return metric_name(prefix, f"band/{estimator}_lower"), metric_name(prefix, f"band/{estimator}_upper")


def bands(
    metrics: dict[str, float], prefix: str, estimators: Sequence[str] = BAND_ESTIMATORS
) -> dict[str, float]:
    """Mean ± std of ``estimators`` from logged ``metrics`` (missing std: no band).

    >>> bands({"kl/k3/mean": 1.0, "kl/k3/std": 0.5}, "kl/")
    {'kl/band/k3_lower': 0.5, 'kl/band/k3_upper': 1.5}
    """
    out: dict[str, float] = {}
    for est in estimators:
        mean, std = (
            metrics.get(metric_name(prefix, f"{est}/mean")),
            metrics.get(metric_name(prefix, f"{est}/std")),
        )
        if mean is not None and std is not None:
            lower, upper = band_names(prefix, est)
            out[lower], out[upper] = mean - std, mean + std
    return out


def _never_negative(estimator: str) -> bool:
    """Whether every per-sample value of ``estimator`` is ``>= 0`` (``f/<name>``: any f-divergence)."""
    if estimator.startswith("f/"):
        return True  # f(r) - f'(1)(r - 1) >= 0 for every convex f, the built-ins' and a user's
    name = estimator.rsplit("/", 1)[-1]
    try:
        return table.entry(name).nonnegative
    except KeyError:
        return False  # cv (k1 + lambda (r - 1)) and anything unknown: any sign


def stderr_bands(
    metrics: dict[str, float],
    prefix: str,
    estimators: Sequence[str] = BAND_ESTIMATORS,
    width: float = BAND_SE,
) -> dict[str, float]:
    """Mean ± ``width`` standard errors of the mean of ``estimators`` (no logged stderr: no band).

    The band is where the window's true mean plausibly lies (about 95 % for ``width=2``), the
    same bands ``klmonitor report`` draws; a never-negative estimator's (``k3``, ``k2``,
    ``kl_pq``, every ``f/<name>``) lower edge is cut at 0. Names come from :func:`band_names`
    (``f/chi2`` gives ``kl/band/f/chi2_lower``).

    >>> stderr_bands({"kl/k3/mean": 0.5, "kl/k3/stderr": 0.125, "kl/k1/mean": 0.5, "kl/k1/stderr": 0.5}, "kl/")
    {'kl/band/k1_lower': -0.5, 'kl/band/k1_upper': 1.5, 'kl/band/k3_lower': 0.25, 'kl/band/k3_upper': 0.75}
    >>> stderr_bands({"kl/k3/mean": 0.01, "kl/k3/stderr": 0.02}, "kl/")["kl/band/k3_lower"]
    0.0
    """
    out: dict[str, float] = {}
    for est in estimators:
        mean, se = (
            metrics.get(metric_name(prefix, f"{est}/mean")),
            metrics.get(metric_name(prefix, f"{est}/stderr")),
        )
        if mean is None or se is None:
            continue
        lower, upper = band_names(prefix, est)
        low = mean - width * se
        out[lower] = max(low, 0.0) if _never_negative(est) else low
        out[upper] = mean + width * se
    return out


@dataclass
class EstimatorStats:
    """Mean and spread of one per-sample quantity over a window.

    ``var`` is the sample variance with Bessel's correction (as ``torch.var``); ``stderr`` is
    ``std / sqrt(n)``. With fewer than two samples ``var``, ``std`` and ``stderr`` are NaN.
    """

    mean: float
    var: float
    std: float
    stderr: float

    @property
    def z(self) -> float:
        """``mean / stderr``: how many standard errors the mean is from 0."""
        if self.stderr > 0:
            return self.mean / self.stderr
        if self.mean == 0 or math.isnan(self.stderr):
            return 0.0 if self.mean == 0 else math.nan
        return math.copysign(math.inf, self.mean)


@dataclass
class KLSummary:
    """What one window of log-probs says about KL(policy || reference).

    Attributes:
        level: ``"token"`` (statistics over tokens) or ``"sequence"`` (over sequences, each
            the sum of its tokens' values).
        count: the samples the statistics are over (tokens, or sequences).
        tokens: valid, finite tokens counted.
        sequences: sequences with at least one valid token (``None`` at token level).
        k1, k2, k3, kl_pq: :class:`EstimatorStats` of the estimators (``kl_pq`` estimates
            the reverse KL(reference || policy)).
        cv: the control-variate estimate ``k1 + lambda (r - 1)`` with the variance-minimising
            ``lambda`` estimated from the window's own moments (``cv_lambda``): unbiased up to
            O(1/n), its standard error never above k1's or k3's (k1's when it falls back to
            k1, below), and the one whose ±2 standard errors cover the exact KL at their
            nominal rate where k3's do not (KL of several nats, sharpened policies;
            ``benchmarks/bench_coverage.py``). Its mean is the headline :attr:`kl`.
        cv_lambda: the ``lambda`` used by ``cv`` (1 makes ``cv`` equal k3, 0 equal k1); 1 when
            the window cannot resolve it (fewer than three samples, ``r`` constant, or the
            covariance below float rounding, as when the policy is at the reference); 0 when
            the mean of ``r - 1`` is more than 4 standard errors from 0 (``cv`` is then k1:
            the window has not sampled ``r``'s distribution, or not from the policy).
        r_minus_1: the control variate ``r - 1``; its mean is 0 when the samples come from
            the policy, so ``r_minus_1.z`` far from 0 flags a sampling mismatch.
        k2_minus_k3: the paired difference ``k2 - k3``, for the significance of ``drift``.
        drift: ``(mean k2 - mean k3) / mean k3``, the relative gap; 0 when the KL is 0.
        drift_z: ``k2_minus_k3.z``: the gap in standard errors.
        ess: importance-sampling effective sample size ``(sum r)**2 / (n sum r**2)`` over
            tokens, a fraction in (0, 1]; NaN without samples, at sequence level, or when
            every ratio of the window underflows float32 (all log-ratios below about -16.6).
        nonfinite: valid tokens whose log-ratio was NaN or +-inf, or above +700 without a clamp
            (``e**l`` at float64's limit), kept out of the stats; and mask values other than 0/1.
        extreme: valid tokens whose finite |log-ratio| exceeded ``KLStats(extreme=...)`` (20
            nats by default; with a clamp below it, every clamped token). They count in the
            estimates with their exact values (clamped values under an opt-in clamp).
        max_abs_log_ratio: the largest finite |log-ratio| seen.
        rollout: KL(rollout engine || trainer), when the window had rollout log-probs.
        initial: the untrained policy against the reference (:class:`InitialSummary`), in the
            window holding the batches fed before the first optimizer step of a run.
        policy_update: the size of the policy update, KL(behaviour || current policy), when the
            window had the behaviour policy's log-probs (``Monitor.update(behaviour_logprobs=)``):
            the tokens were sampled by the behaviour policy (the one that generated the batch,
            e.g. PPO's old policy), so the estimators with it as the sampler and the current
            policy as the reference estimate how far this update moved the policy (PPO's
            ``approx_kl``, with its variance; ``kl/update/...``).
        entropy: the policy's entropy estimated from the tokens it sampled: the mean of
            ``-log q(x)`` (per token; per sequence at sequence level), with its spread and
            standard error (``kl/entropy/...``; :class:`~klmonitor.Monitor` only). Unbiased
            under exact sampling; with top-k, top-p or a temperature in the sampler it is the
            cross-entropy of the processed distribution against the policy. ``None`` without
            tokens. The reference's cross-entropy is ``entropy.mean + k1.mean``.
        f: the requested f-divergences (``KLStats(f_divergences=...)``), by name:
            :class:`EstimatorStats` of ``f(r) - f'(1) (r - 1)`` over the same tokens (or
            sequences) as the KL estimators; empty when none was requested.

    >>> import torch; from klmonitor import KLStats
    >>> s = KLStats(); s.update(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.1, -1.9, -0.5]))
    >>> summary = s.compute()
    >>> summary.tokens, round(summary.k3.mean, 5)
    (3, 0.00334)
    """

    level: str
    count: int
    tokens: int
    sequences: int | None
    k1: EstimatorStats
    k2: EstimatorStats
    k3: EstimatorStats
    kl_pq: EstimatorStats
    cv: EstimatorStats
    cv_lambda: float
    r_minus_1: EstimatorStats
    k2_minus_k3: EstimatorStats
    drift: float
    drift_z: float
    ess: float
    nonfinite: int
    extreme: int
    max_abs_log_ratio: float
    rollout: RolloutSummary | None = None
    initial: InitialSummary | None = None
    by_position: list[PositionBucket] | None = None
    top_sequences: list[TopSequence] = field(default_factory=list)
    top_tokens: list[TopToken] = field(default_factory=list)
    f: dict[str, EstimatorStats] = field(default_factory=dict)
    policy_update: KLSummary | None = None
    entropy: EstimatorStats | None = None

    @property
    def kl(self) -> float:
        """The headline KL estimate: the mean of ``cv`` (k3 near the reference, leaning on k1 far from it).

        ``cv`` has the smallest standard error of the unbiased estimators and honest error bars
        at large KL, where k3's ±2 standard errors cover the exact KL far less than 95 % of the
        time. ``k3.mean`` (never negative) is still logged beside it.
        """
        return self.cv.mean

    def estimator(self, name: str) -> EstimatorStats:
        """The statistics of estimator ``name`` (``k1``, ``k2``, ``k3``, ``kl_pq``, ``cv``)."""
        if name not in REPORTED:
            raise ValueError(f"unknown estimator {name!r}; expected one of {REPORTED}")
        stats: EstimatorStats = getattr(self, name)
        return stats

    def to_dict(self, prefix: str = "kl/") -> dict[str, float]:
        """Flat ``{metric name: value}`` as logged.

        Values that are undefined for this window (NaN or infinite, e.g. a variance of fewer
        than two samples) are left out rather than logged as NaN.

        >>> import torch; from klmonitor import KLStats
        >>> s = KLStats(); s.update(torch.zeros(4), torch.full((4,), 0.1))
        >>> sorted(s.compute().to_dict())[:3]
        ['kl/cv/lambda', 'kl/cv/mean', 'kl/cv/rel_std']
        """
        out: dict[str, float] = {}
        kl = self.kl
        for name in REPORTED:
            st = self.estimator(name)
            out[f"{prefix}{name}/mean"] = st.mean
            out[f"{prefix}{name}/std"] = st.std
            out[f"{prefix}{name}/var"] = st.var
            out[f"{prefix}{name}/stderr"] = st.stderr
            if kl > 0:
                out[f"{prefix}{name}/rel_std"] = st.std / kl
        out[f"{prefix}cv/lambda"] = self.cv_lambda
        out[f"{prefix}r_minus_1/mean"] = self.r_minus_1.mean
        out[f"{prefix}r_minus_1/stderr"] = self.r_minus_1.stderr
        out[f"{prefix}r_minus_1/z"] = self.r_minus_1.z
        out[f"{prefix}drift_k2_k3"] = self.drift
        out[f"{prefix}drift_z"] = self.drift_z
        out[f"{prefix}ess_fraction"] = self.ess
        out[f"{prefix}tokens"] = float(self.tokens)
        if self.sequences is not None:
            out[f"{prefix}sequences"] = float(self.sequences)
        out[f"{prefix}nonfinite"] = float(self.nonfinite)
        out[f"{prefix}extreme"] = float(self.extreme)
        out[f"{prefix}max_abs_log_ratio"] = self.max_abs_log_ratio
        if self.rollout is not None:
            out.update(self.rollout.to_dict(f"{prefix}rollout/"))
        if self.initial is not None:
            out.update(self.initial.to_dict(f"{prefix}initial/"))
        if self.entropy is not None:
            out[f"{prefix}entropy/mean"] = self.entropy.mean
            out[f"{prefix}entropy/std"] = self.entropy.std
            out[f"{prefix}entropy/stderr"] = self.entropy.stderr
        if self.policy_update is not None:
            up = self.policy_update
            for name in (*ESTIMATORS, "cv"):
                st = up.estimator(name)
                out[f"{prefix}update/{name}/mean"] = st.mean
                out[f"{prefix}update/{name}/std"] = st.std
                out[f"{prefix}update/{name}/stderr"] = st.stderr
            out[f"{prefix}update/tokens"] = float(up.tokens)
            out[f"{prefix}update/nonfinite"] = float(up.nonfinite)
        for name, st in self.f.items():
            out[f"{prefix}f/{name}/mean"] = st.mean
            out[f"{prefix}f/{name}/std"] = st.std
            out[f"{prefix}f/{name}/stderr"] = st.stderr
        for bucket in self.by_position or []:
            out[f"{prefix}by_position/{bucket.label}/k3"] = bucket.k3_mean
            out[f"{prefix}by_position/{bucket.label}/tokens"] = float(bucket.tokens)
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}

    @classmethod
    def from_vector(cls, vec: Sequence[float], level: str) -> KLSummary:
        """Build a summary from a (host) moments vector; see ``klmonitor._moments``."""
        v = [float(x) for x in vec]
        n = v[lay.COUNT]
        stats = [_moment_stats(n, v[lay.MEAN.start + i], v[lay.M2.start + i]) for i in range(lay.NQ)]
        k1, k2, k3, kl_pq, rm1, diff = stats
        cv, cv_lambda = _control_variate(k1, k3, rm1, n)
        if n == 0:
            drift = math.nan
        elif k3.mean > 0:
            drift = diff.mean / k3.mean
        else:
            drift = 0.0
        # ESS from the mean and M2 of r - 1 (sum r = n (1 + m), sum r^2 = n (1 + m)^2 + M2).
        # Token level only: a sequence's sum of r_t - 1 is not its importance weight. NaN when
        # every ratio of the window underflows float32 (r - 1 rounds to -1: all l < ~-16.6).
        # As 1 / (1 + cv**2), cv = std(r) / mean(r): no overflow when a token of l ~ 700 makes
        # M2 infinite (ESS -> 0, as one token then carries all the weight).
        m, m2 = rm1.mean, v[lay.M2.start + 4]
        if level == "token" and n > 0 and 1 + m > 0:
            r_cv = math.sqrt(m2 / n) / (1 + m)
            ess = 1.0 / (1.0 + r_cv * r_cv)
        else:
            ess = math.nan
        return cls(
            level=level,
            count=int(n),
            tokens=int(v[lay.TOKENS]),
            sequences=int(n) if level == "sequence" else None,
            k1=k1,
            k2=k2,
            k3=k3,
            kl_pq=kl_pq,
            cv=cv,
            cv_lambda=cv_lambda,
            r_minus_1=rm1,
            k2_minus_k3=diff,
            drift=drift,
            drift_z=diff.z,
            ess=ess,
            nonfinite=int(v[lay.NONFINITE]),
            extreme=int(v[lay.EXTREME]),
            max_abs_log_ratio=v[lay.MAX_ABS],
        )


def _moment_stats(n: float, mean: float, m2: float) -> EstimatorStats:
    """Mean, variance (Bessel), std and standard error from a count, a mean and an M2."""
    mean = mean if n > 0 else math.nan
    var = m2 / (n - 1) if n > 1 else math.nan
    std = math.sqrt(var) if var >= 0 else math.nan
    stderr = std / math.sqrt(n) if n > 1 else math.nan
    return EstimatorStats(mean, var, std, stderr)


def read_f(vec: Sequence[float], names: Sequence[str]) -> dict[str, EstimatorStats]:
    """``{name: EstimatorStats}`` from an f-divergence state ``[count, means, M2s]`` (host numbers).

    >>> read_f([4.0, 0.5, 3.0], ["chi2"])["chi2"].var
    1.0
    """
    q = len(names)
    if len(vec) != 1 + 2 * q:
        raise ValueError(f"an f-divergence state of {q} entries has {1 + 2 * q} numbers, got {len(vec)}")
    n = float(vec[0])
    return {name: _moment_stats(n, float(vec[1 + i]), float(vec[1 + q + i])) for i, name in enumerate(names)}


# Below this share of Var(k1) + Var(r - 1), the covariance of k3 and r - 1 is float rounding
# (float32 per-token values: about 1e-7 relative each) and cv stays k3.
_CV_ROUNDING = 1e-6
# Beyond this many standard errors from 0, the window's mean of r - 1 (0 under the policy)
# says the window has not sampled r's distribution, and cv falls back to k1 (lambda 0).
_CV_MAX_Z = 4.0
# Below this 1 - corr(k3, r - 1)**2 the residual variance is float rounding (see _control_variate).
_CV_COLLINEAR = 1e-6


def _control_variate(
    k1: EstimatorStats, k3: EstimatorStats, rm1: EstimatorStats, n: float
) -> tuple[EstimatorStats, float]:
    """``cv = k1 + lambda (r - 1)`` with ``lambda = -Cov(k1, r - 1) / Var(r - 1)`` from the moments.

    Written as ``k3 + mu (r - 1)``, ``mu = lambda - 1 = -Cov(k3, r - 1) / Var(r - 1)``: near
    p = q, Cov(k3, r - 1) is third order and the residual variance ``Var(k3) - Cov**2 / Var(r - 1)``
    loses nothing to cancellation, where ``Var(k1) - Cov(k1, r - 1)**2 / Var(r - 1)`` would
    subtract two nearly equal numbers. The covariance follows from the variances already kept
    (``k3 = k1 + (r - 1)``): ``Cov(k3, r - 1) = (Var(k3) + Var(r - 1) - Var(k1)) / 2``.

    When the window's mean of ``r - 1`` is more than ``_CV_MAX_Z`` standard errors from 0,
    ``cv`` is k1 (``lambda = 0``). Under the policy that mean is 0; this far from it, the
    reference's mass sits on tokens the window has not sampled (a sharpened policy, tokens
    the policy has given up) or the tokens were not sampled from the policy, and
    ``lambda (r - 1)`` would carry that error into the estimate with a standard error blind
    to it (``benchmarks/bench_coverage.py``: cv covered the exact KL in 0.36 of the windows
    of a policy sharpened to KL 2, k1 in all of them). k1's values do not involve ``r``.
    """
    a, b, c = k1.var, rm1.var, k3.var
    cov = 0.5 * (c + b - a)
    if not (n > 2 and math.isfinite(a + b + c) and b > 0 and abs(cov) > _CV_ROUNDING * (a + b)):
        return EstimatorStats(k3.mean, k3.var, k3.std, k3.stderr), 1.0
    mu = -cov / b
    # k3 almost a linear function of r - 1 (a window carried by a few tokens with a large
    # positive l, where k3 ~ r - 1): the residual c - cov**2 / b is the difference of two nearly
    # equal numbers (up to ~1e21 for l = 25) that the moments (float32 per-token values) do not
    # resolve, and the best lambda tends to 0 anyway: k1 is the estimate.
    if abs(rm1.z) > _CV_MAX_Z or (c > 0 and 1.0 - cov * cov / (b * c) < _CV_COLLINEAR):
        return EstimatorStats(k1.mean, k1.var, k1.std, k1.stderr), 0.0
    # The least-squares residual can round below 0 or above the two it improves on.
    var = min(max(c - cov * cov / b, 0.0), a, c)
    std = math.sqrt(var)
    return EstimatorStats(k3.mean + mu * rm1.mean, var, std, std / math.sqrt(n)), 1.0 + mu


@dataclass
class RolloutSummary:
    """The rollout engine against the trainer: KL(rollout || trainer policy) and the ratios.

    The tokens were sampled by the rollout engine (vLLM, SGLang, HF generate), so the same
    estimators with the rollout as the sampling policy and the trainer as the reference
    estimate KL(rollout || trainer); ``r = pi_trainer / pi_rollout`` is the importance ratio
    an off-policy correction would use.

    Attributes:
        kl: the estimators' statistics (``kl.k3.mean`` is the headline), as a :class:`KLSummary`.
        ratio_mean, ratio_min, ratio_max: the mean, smallest and largest ratio over the tokens.
        ratio_outside: the fraction of tokens whose ratio is outside ``[0.5, 2]``.
    """

    kl: KLSummary
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    ratio_outside: float

    def to_dict(self, prefix: str) -> dict[str, float]:
        """Flat ``{name: value}`` under ``prefix`` (``kl/rollout/``), NaN entries included."""
        out: dict[str, float] = {}
        for name in ESTIMATORS:
            st = self.kl.estimator(name)
            out[f"{prefix}{name}/mean"] = st.mean
            out[f"{prefix}{name}/std"] = st.std
            out[f"{prefix}{name}/stderr"] = st.stderr
        out[f"{prefix}tokens"] = float(self.kl.tokens)
        out[f"{prefix}nonfinite"] = float(self.kl.nonfinite)
        out[f"{prefix}ratio/mean"] = self.ratio_mean
        out[f"{prefix}ratio/min"] = self.ratio_min
        out[f"{prefix}ratio/max"] = self.ratio_max
        out[f"{prefix}ratio/outside"] = self.ratio_outside
        return out


@dataclass
class InitialSummary:
    """The batches scored before the first optimizer step: the untrained policy against the reference.

    When the policy starts as a copy of the reference, every token's log-ratio is 0 up to the
    rounding of the log-probs' dtype; a share of tokens beyond that says the two sides are not
    computed alike (dropout on for one, a temperature, a shift, other weights).

    Attributes:
        tokens: valid, finite tokens scored before the first optimizer step (all ranks).
        differing: those whose ``|log-ratio|`` exceeds the rounding bound: twice the dtype's
            machine epsilon times the larger ``|log-prob|`` (the coarser dtype of the two sides).
        kl: their mean k3 (nats per token).
        k1: their mean k1.
    """

    tokens: int
    differing: int
    kl: float
    k1: float

    @property
    def share(self) -> float:
        """``differing / tokens`` (NaN without tokens)."""
        return self.differing / self.tokens if self.tokens else math.nan

    def to_dict(self, prefix: str) -> dict[str, float]:
        """Flat ``{name: value}`` under ``prefix`` (``kl/initial/``)."""
        return {
            f"{prefix}tokens": float(self.tokens),
            f"{prefix}differing_share": self.share,
            f"{prefix}k3/mean": self.kl,
            f"{prefix}k1/mean": self.k1,
        }


@dataclass
class PositionBucket:
    """Mean k3 of the tokens at positions ``start..end`` (``end`` ``None``: and beyond)."""

    label: str
    start: int
    end: int | None
    tokens: int
    k3_mean: float


@dataclass
class TopSequence:
    """One of the window's sequences with the largest summed k3.

    Attributes:
        step: the optimizer-step count when its batch was fed (``trainer.global_step`` in
            ``training_step``; the number of :meth:`Monitor.step` calls' steps so far).
        rank: the process that saw it.
        row: its row in that batch.
        kl_sum: its summed k3 (the sequence's KL estimate).
        kl_mean: ``kl_sum / tokens``.
        tokens: its valid tokens.
        token_ids: its token ids (the first ``max_len``), when ids were given.
        token_kl: each kept token's k3 (0 for masked tokens).
        text: the decoded text with the highest-KL tokens in ``**bold**``, when ``decode`` was given.
    """

    step: int
    rank: int
    row: int
    kl_sum: float
    kl_mean: float
    tokens: int
    token_ids: list[int] | None = None
    token_kl: list[float] = field(default_factory=list)
    text: str | None = None


@dataclass
class TopToken:
    """A vocabulary entry and the k3 it contributed in the window."""

    token_id: int
    count: int
    kl_sum: float
    kl_mean: float
    text: str | None = None
