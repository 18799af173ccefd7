"""Rules on a run's course: ``entropy_collapse`` (the policy's entropy falls) and ``kl_acceleration``.

Both compare a window with the run's own history (kept in the rule's state, so a resumed run
decides as an uninterrupted one) and test the change against the windows' standard errors.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from klmonitor._validate import check_int as _check_int
from klmonitor._validate import check_number as _check_number
from klmonitor.alerts.base import _DEFAULT_COOLDOWN, Rule, RuleOptions, ThresholdSpec, Unpack
from klmonitor.alerts.event import _fmt
from klmonitor.summary import KLSummary

__all__ = ["EntropyCollapseRule", "KLAccelerationRule"]


def _pairs(values: Any, what: str) -> list[tuple[float, float]]:
    if not isinstance(values, list) or not all(
        isinstance(p, list | tuple)
        and len(p) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in p)
        for p in values
    ):
        raise ValueError(f"{what} must be a list of [value, stderr] pairs, got {values!r}")
    return [(float(a), float(b)) for a, b in values]


class EntropyCollapseRule(Rule):
    """The policy's entropy falls below a fraction of its early-run level.

    The early-run level is the mean of ``summary.entropy`` over the first ``baseline_windows``
    windows that have it (``Monitor(entropy=True)``, the default). Measures the window's entropy
    as a fraction of that level and fires when it is below ``fraction`` by more than ``min_z``
    standard errors, for ``patience`` windows in a row: the policy has collapsed onto few
    tokens (a reward hack such as repeating one phrase, or mode collapse), which no KL number
    shows directly.

    Args:
        fraction: the share of the early-run entropy below which it has collapsed (default 0.2:
            healthy runs of ``benchmarks/bench_alerts.py`` that moved the policy 1 nat per
            token from the reference went down to 0.3 of it; collapsed ones to below 0.1).
        baseline_windows: the first windows averaged into the early-run level.
        min_z: the fall below ``fraction`` of the level must exceed this many standard errors.
        patience (default 2), cooldown (10), level (warn), stop_training, name: as in
            :class:`Rule`.
    """

    name = "entropy_collapse"
    default_patience = 2
    default_cooldown = _DEFAULT_COOLDOWN
    threshold_spec = ThresholdSpec("fraction", low=0.0, hint=" (of the early-run entropy, e.g. 0.5)")

    def __init__(
        self,
        fraction: float = 0.2,
        *,
        baseline_windows: int = 3,
        min_z: float = 3.0,
        **options: Unpack[RuleOptions],
    ) -> None:
        super().__init__(fraction, **options)
        if self.threshold >= 1.0:
            raise ValueError(f"fraction must be below 1 (a share of the early-run entropy), got {fraction!r}")
        self.baseline_windows = _check_int(baseline_windows, "baseline_windows", low=1)
        self.min_z = _check_number(min_z, "min_z", low=0.0, low_inclusive=True)
        self._baseline: list[float] = []

    @property
    def baseline(self) -> float | None:
        """The early-run entropy, once ``baseline_windows`` windows had one."""
        if len(self._baseline) < self.baseline_windows:
            return None
        return math.fsum(self._baseline) / len(self._baseline)

    def measure(self, summary: KLSummary) -> float | None:
        """The window's entropy as a fraction of the early-run level; ``None`` before it is known."""
        level = self.baseline
        ent = summary.entropy
        if level is None or level <= 0 or ent is None or not math.isfinite(ent.mean):
            return None
        return ent.mean / level

    def triggered(self, value: float, summary: KLSummary) -> bool:
        """Below ``fraction`` of the level by more than ``min_z`` standard errors."""
        level = self.baseline
        ent = summary.entropy
        assert level is not None and ent is not None
        stderr = ent.stderr if math.isfinite(ent.stderr) else 0.0
        return value < self.threshold and (self.threshold * level - ent.mean) > self.min_z * stderr

    def message(self, value: float, summary: KLSummary) -> str:
        """Say how far the entropy fell and what it usually means."""
        ent = summary.entropy
        assert ent is not None
        per = "sequence" if summary.level == "sequence" else "token"
        return (
            f"the policy's entropy fell to {_fmt(ent.mean)} nats per {per} (± {_fmt(ent.stderr)}), "
            f"{value:.0%} of its early-run level {_fmt(self.baseline or math.nan)} (threshold "
            f"{self.threshold:.0%}): the policy has collapsed onto few tokens. Look at the top "
            "sequences and tokens for a reward hack (one phrase repeated, a format exploited), "
            "raise the KL coefficient or add an entropy bonus. (Estimated from the sampled tokens: "
            "with top-k, top-p or a temperature in the sampler it is the processed distribution's.)"
        )

    def observe(self, summary: KLSummary) -> None:  # noqa: D102
        ent = summary.entropy
        if len(self._baseline) < self.baseline_windows and ent is not None and math.isfinite(ent.mean):
            self._baseline.append(float(ent.mean))

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {**super().state_dict(), "baseline": list(self._baseline)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        baseline = state.get("baseline", [])
        if not isinstance(baseline, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in baseline
        ):
            raise ValueError(f"baseline must be a list of finite numbers, got {baseline!r}")
        super().load_state_dict(state)
        self._baseline = [float(x) for x in baseline][: self.baseline_windows]

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self._baseline = []


class KLAccelerationRule(Rule):
    """The KL's growth accelerates: the onset of reward hacking.

    Keeps the k3 mean and its standard error of the last ``2 * span + 1`` windows. With
    ``growth = kl[t] - kl[t - span]`` and ``before = kl[t - span] - kl[t - 2 span]``, it measures
    ``growth / max(before, rel_floor * kl[t - span], abs_floor)`` and fires when that exceeds
    ``threshold`` and the growth is more than ``min_z`` standard errors: the KL now grows
    several times faster than it did and several times its own level within ``span`` windows.
    A run whose KL rises early and levels off (the usual course) is quiet; one that takes off
    (a reward hack found mid-run: 0.4 to 4 nats per token in two windows in
    ``benchmarks/bench_alerts.py``) is not. Healthy runs there reached 4.3x at most (a KL
    going from 0.09 to 0.46 in three windows as the policy found its reward). Silent for the
    first ``2 * span`` windows.

    Args:
        threshold: how many times faster than before (default 5).
        span: windows per slope (default 3).
        rel_floor: the slope before is taken as at least this share of the KL then (default
            1: the KL must grow by more than ``threshold * rel_floor`` times its level in ``span``
            windows, i.e. to six times it by default).
        abs_floor: and at least this many nats (default 0.05).
        min_z: the growth must exceed this many standard errors (default 3).
        patience (default 1), cooldown (10), level (warn), stop_training, name: as in
            :class:`Rule`.
    """

    name = "kl_acceleration"
    default_cooldown = _DEFAULT_COOLDOWN
    threshold_spec = ThresholdSpec(low=1.0, hint=" (times the earlier growth, e.g. 5)")

    def __init__(
        self,
        threshold: float = 5.0,
        *,
        span: int = 3,
        rel_floor: float = 1.0,
        abs_floor: float = 0.05,
        min_z: float = 3.0,
        **options: Unpack[RuleOptions],
    ) -> None:
        super().__init__(threshold, **options)
        self.span = _check_int(span, "span", low=1, hint=" (windows per slope)")
        self.rel_floor = _check_number(rel_floor, "rel_floor", low=0.0, low_inclusive=True)
        self.abs_floor = _check_number(abs_floor, "abs_floor", low=0.0)
        self.min_z = _check_number(min_z, "min_z", low=0.0, low_inclusive=True)
        self._history: deque[tuple[float, float]] = deque(maxlen=2 * self.span)

    def _slopes(self, summary: KLSummary) -> tuple[float, float, float, float] | None:
        if len(self._history) < 2 * self.span:
            return None
        now, se_now = summary.k3.mean, summary.k3.stderr
        mid, se_mid = self._history[self.span]
        first, _ = self._history[0]
        if not all(math.isfinite(x) for x in (now, mid, first)):
            return None
        se = math.sqrt(
            (se_now if math.isfinite(se_now) else 0.0) ** 2 + (se_mid if math.isfinite(se_mid) else 0.0) ** 2
        )
        return now - mid, mid - first, mid, se

    def measure(self, summary: KLSummary) -> float | None:
        """The recent growth over the floored earlier growth; ``None`` until the history is full."""
        slopes = self._slopes(summary)
        if slopes is None:
            return None
        growth, before, mid, _ = slopes
        return growth / max(before, self.rel_floor * mid, self.abs_floor)

    def triggered(self, value: float, summary: KLSummary) -> bool:
        """Faster than ``threshold`` times before, and the growth significant."""
        slopes = self._slopes(summary)
        assert slopes is not None
        growth, _, _, se = slopes
        return value > self.threshold and growth > self.min_z * se

    def message(self, value: float, summary: KLSummary) -> str:
        """Say how the KL's growth changed."""
        slopes = self._slopes(summary)
        assert slopes is not None
        growth, before, mid, _ = slopes
        return (
            f"the KL is accelerating: it grew by {_fmt(growth)} nats per token over the last {self.span} "
            f"windows (to {_fmt(summary.k3.mean)}), {value:.2g}x the growth before ({_fmt(before)}; floored at "
            f"{_fmt(max(self.rel_floor * mid, self.abs_floor))}; threshold {self.threshold:g}x). A KL that "
            "takes off after levelling is the usual onset of reward hacking: look at the top sequences, "
            "check the reward, lower the learning rate or raise the KL coefficient."
        )

    def observe(self, summary: KLSummary) -> None:  # noqa: D102
        if math.isfinite(summary.k3.mean):
            self._history.append((float(summary.k3.mean), float(summary.k3.stderr)))

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            **super().state_dict(),
            "history": [[a, b if math.isfinite(b) else None] for a, b in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        raw = state.get("history", [])
        if not isinstance(raw, list) or not all(isinstance(p, list | tuple) and len(p) == 2 for p in raw):
            raise ValueError(f"history must be a list of [value, stderr] pairs, got {raw!r}")
        history = _pairs([[a, math.nan if b is None else b] for a, b in raw], "history")
        super().load_state_dict(state)
        self._history = deque(history, maxlen=2 * self.span)

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self._history.clear()
