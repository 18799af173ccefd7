"""Alert rules: decisions from a window's :class:`~klmonitor.stats.KLSummary` (no I/O).

A :class:`Rule` turns a summary into a number (:meth:`Rule.measure`), compares it with its
threshold (:meth:`Rule.triggered`) and fires an :class:`Alert` once the condition has held for
``patience`` consecutive windows, then stays quiet for ``cooldown`` windows so a lasting
condition does not raise a storm. An :class:`AlertEngine` evaluates a list of rules on each
summary and keeps a bounded history. Everything is decided from the (rank-synced) summary, so
every rank of a distributed job decides the same; speaking is left to the caller.

The default rules (:func:`default_rules`):

=====================  ===============================================  =========  ========
name                   fires when                                       threshold  level
=====================  ===============================================  =========  ========
``drift``              ``|(k2 - k3) / k3| > threshold``, and the paired  2.0        warn
                       gap is ``> min_z`` standard errors
``spike``              the KL jumps ``> threshold`` robust standard      6          warn
                       deviations above its recent running mean
``nonfinite``          NaN/inf log-ratios (and mask values other than 0  0          error
                       or 1) counted ``> threshold``
``extreme``            tokens with |l| > ``extreme`` counted ``> thr.``  0          warn
``sampling_mismatch``  the mean of ``r`` is off 1 by ``> threshold``     5          warn
                       standard errors (low side: also beyond what the
                       tail past the window's largest ``r`` can hide),
                       or is ``>= max_mean_ratio`` (20); 3 windows
``initial_kl``         before the first optimizer step, >= 1 % of the    2.5e-4     warn
                       tokens differ beyond float rounding and their
                       per-token KL is above ``threshold``; once per run
``rollout_mismatch``   KL(rollout || trainer) per token ``> threshold``  0.01       warn
                       and ``> min_z`` standard errors; 2 windows
``kl_budget``          the chosen estimator's mean ``> max_kl``          user's     error
``update_size``        KL(behaviour || current) per token (k3) above     user's     warn
                       ``max_update_kl`` by ``> min_z`` (2) s.e.
=====================  ===============================================  =========  ========

The package, one module per part (everything is importable from ``klmonitor.alerts``):

- :mod:`klmonitor.alerts.event`: :class:`AlertLevel`, :class:`Alert` and its one text form
  (:meth:`Alert.text`, :func:`parse_alert_text`);
- :mod:`klmonitor.alerts.base`: :class:`Rule` and the options every rule shares
  (:class:`RuleOptions`: patience, cooldown, level, stop_training, name), validated once;
- the rule families: :mod:`~klmonitor.alerts.drift` (:class:`DriftRule`),
  :mod:`~klmonitor.alerts.budget` (:class:`KLBudgetRule`, :class:`SpikeRule`),
  :mod:`~klmonitor.alerts.tokens` (:class:`NonFiniteRule`, :class:`ExtremeRule`),
  :mod:`~klmonitor.alerts.sampling` (:class:`SamplingMismatchRule`,
  :class:`RolloutMismatchRule`), :mod:`~klmonitor.alerts.initial` (:class:`InitialKLRule`),
  :mod:`~klmonitor.alerts.update` (:class:`UpdateSizeRule`), :mod:`~klmonitor.alerts.trend`
  (:class:`EntropyCollapseRule`, :class:`KLAccelerationRule`);
- :mod:`klmonitor.alerts.engine`: :class:`AlertEngine` and :func:`default_rules`.
"""

from __future__ import annotations

from klmonitor.alerts.base import (
    SHARED_OPTIONS,
    OneShotRuleOptions,
    Rule,
    RuleOptions,
    ThresholdSpec,
)
from klmonitor.alerts.budget import KLBudgetRule, SpikeRule
from klmonitor.alerts.drift import DEFAULT_DRIFT_THRESHOLD, DriftRule
from klmonitor.alerts.engine import AlertEngine, default_rules
from klmonitor.alerts.event import Alert, AlertLevel, parse_alert_text
from klmonitor.alerts.initial import InitialKLRule
from klmonitor.alerts.sampling import RolloutMismatchRule, SamplingMismatchRule
from klmonitor.alerts.tokens import ExtremeRule, NonFiniteRule
from klmonitor.alerts.trend import EntropyCollapseRule, KLAccelerationRule
from klmonitor.alerts.update import UpdateSizeRule

# The private names the single-module klmonitor.alerts had, still importable from here.
# isort: off
from klmonitor.alerts.base import _DEFAULT_COOLDOWN as _DEFAULT_COOLDOWN
from klmonitor.alerts.base import _state_int as _state_int
from klmonitor.alerts.budget import _BUDGET_ESTIMATORS as _BUDGET_ESTIMATORS
from klmonitor.alerts.engine import _STATE_VERSION as _STATE_VERSION
from klmonitor.alerts.event import _LEVELS as _LEVELS
from klmonitor.alerts.event import _TEXT_FORMAT as _TEXT_FORMAT
from klmonitor.alerts.event import _TEXT_RE as _TEXT_RE
from klmonitor.alerts.event import _as_level as _as_level
from klmonitor.alerts.event import _float_to_json as _float_to_json
from klmonitor.alerts.event import _fmt as _fmt
from klmonitor.alerts.sampling import _SM_MAX_MEAN_RATIO as _SM_MAX_MEAN_RATIO
from klmonitor.alerts.sampling import _SM_MIN_ABS_MEAN as _SM_MIN_ABS_MEAN
from klmonitor.alerts.sampling import _SM_MIN_SAMPLES as _SM_MIN_SAMPLES
from klmonitor.alerts.sampling import _SM_TAIL_FACTOR as _SM_TAIL_FACTOR
from klmonitor.alerts.sampling import _SM_THRESHOLD as _SM_THRESHOLD
from klmonitor.alerts.sampling import _largest_ratio_bound as _largest_ratio_bound
from klmonitor.alerts.sampling import _mismatch_side as _mismatch_side
from klmonitor.alerts.sampling import _per_sample_token_ratio as _per_sample_token_ratio
from klmonitor.alerts.tokens import _TokenCountRule as _TokenCountRule
# isort: on

__all__ = [
    "Alert",
    "AlertEngine",
    "AlertLevel",
    "DriftRule",
    "ExtremeRule",
    "InitialKLRule",
    "KLBudgetRule",
    "NonFiniteRule",
    "Rule",
    "SamplingMismatchRule",
    "RolloutMismatchRule",
    "SpikeRule",
    "UpdateSizeRule",
    "EntropyCollapseRule",
    "KLAccelerationRule",
    "DEFAULT_DRIFT_THRESHOLD",
    "default_rules",
    "parse_alert_text",
    # new with the package: what a rule of one's own needs
    "OneShotRuleOptions",
    "RuleOptions",
    "SHARED_OPTIONS",
    "ThresholdSpec",
]
