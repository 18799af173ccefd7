"""Alert rules and engine, on KLSummary objects computed by KLStats from sampled categoricals."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import pytest
import torch

from klmonitor import KLStats, KLSummary
from klmonitor.alerts import (
    Alert,
    AlertEngine,
    AlertLevel,
    DriftRule,
    ExtremeRule,
    InitialKLRule,
    KLBudgetRule,
    NonFiniteRule,
    Rule,
    SamplingMismatchRule,
    SpikeRule,
    default_rules,
)

# -- data: real windows from categorical policies ------------------------------------------


@functools.cache
def window(
    n: int = 2000,
    *,
    vocab: int = 32,
    sig: float = 2.0,
    mode: str = "noise",
    s: float = 0.0,
    seed: int = 0,
    sampler: str = "policy",
    level: str = "token",
    seq_len: int = 8,
) -> KLSummary:
    """One window of ``n`` tokens, each from its own context (as pooled LM tokens are).

    Per context the reference has logits ``z_p ~ N(0, sig^2)`` over ``vocab`` tokens and the
    policy ``z_p + s * N(0, 1)`` (``mode="noise"``) or ``s * z_p`` (``"sharp"``: a lower
    entropy policy, as RL fine-tuning produces). Tokens are drawn from the policy
    (``sampler="policy"``) or, for a mismatch, from the reference (``"reference"``) or the
    policy at temperature T (``"temperature:T"``), while the log-probs given are always the
    policy's at temperature 1 and the reference's, in float32.
    """
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn(n, vocab, generator=g, dtype=torch.float64) * sig
    if mode == "noise":
        zq = zp + s * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    elif mode == "sharp":
        zq = zp * s
    else:
        raise AssertionError(mode)
    lq, lp = zq.log_softmax(-1), zp.log_softmax(-1)
    if sampler == "policy":
        src = lq
    elif sampler == "reference":
        src = lp
    elif sampler.startswith("temperature:"):
        src = (zq / float(sampler.split(":")[1])).log_softmax(-1)
    else:
        raise AssertionError(sampler)
    x = torch.multinomial(src.exp(), 1, generator=g)
    logq = lq.gather(-1, x).squeeze(-1).float()
    logp = lp.gather(-1, x).squeeze(-1).float()
    stats = KLStats(level=level)  # type: ignore[arg-type]
    if level == "sequence":
        stats.update(logq.reshape(-1, seq_len), logp.reshape(-1, seq_len))
    else:
        stats.update(logq, logp)
    return stats.compute()


def from_logprobs(logq: torch.Tensor, logp: torch.Tensor, **kwargs: Any) -> KLSummary:
    stats = KLStats(**kwargs)
    stats.update(logq, logp)
    return stats.compute()


@functools.cache
def identical(n: int = 2000, seed: int = 0, rounding_noise: bool = False) -> KLSummary:
    """Policy == reference: KL exactly 0, or float32 rounding noise only (KL ~1e-14)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(n, 32, generator=g, dtype=torch.float64).log_softmax(-1)[:, 0]
    logq = logp + 1e-7 * torch.randn(n, generator=g, dtype=torch.float64) if rounding_noise else logp
    return from_logprobs(logq.float(), logp.float())


def empty_window() -> KLSummary:
    return from_logprobs(torch.zeros(0), torch.zeros(0))


LOW = functools.partial(window, 2000, s=0.1)  # per-token KL ~0.004
HIGH = functools.partial(window, 2000, s=1.0)  # per-token KL ~0.4


def names(alerts: list[Alert]) -> list[str]:
    return [a.rule for a in alerts]


def past_start(rules: list[Rule]) -> list[Rule]:
    """``rules`` as in a run past its first window: the one-off ``initial_kl`` check is done."""
    for rule in rules:
        if isinstance(rule, InitialKLRule):
            rule.restore_missing()
    return rules


def run(engine: AlertEngine, summaries: list[KLSummary], start: int = 0) -> list[list[Alert]]:
    return [engine.evaluate(s, step) for step, s in enumerate(summaries, start)]


# -- quiet cases ------------------------------------------------------------------------------


def test_close_to_reference_stays_quiet() -> None:
    zero = [identical(seed=i) for i in range(6)]
    rounding = [identical(seed=i, rounding_noise=True) for i in range(6)]
    tiny = [window(s=1e-3, seed=i) for i in range(8)]
    assert all(s.kl == 0 and s.drift == 0 and s.r_minus_1.z == 0 for s in zero)
    assert all(0 <= s.kl < 1e-12 for s in rounding)
    assert all(1e-8 < s.kl < 1e-6 for s in tiny)
    engine = AlertEngine(default_rules(max_kl=0.1))
    # Exact zeros, then float32 rounding noise, then KL ~1e-7: no rule speaks, the spike rule
    # included (its history goes from exactly 0 to 1e-7).
    assert run(engine, zero + rounding + tiny + zero) == [[]] * 26
    assert engine.history == []


def test_moderate_policy_stays_quiet() -> None:
    summaries = [window(4000, s=0.3, seed=i) for i in range(6)]  # KL ~0.04, drift ~0.02
    assert all(0.02 < s.kl < 0.06 and abs(s.drift) < 0.05 for s in summaries)
    assert run(AlertEngine(past_start(default_rules(max_kl=0.1))), summaries) == [[]] * 6
    # initial_kl judges only the batches a Monitor saw before the first optimizer step
    # (summary.initial); a first window of a moved policy is not its business.
    assert run(AlertEngine(default_rules(max_kl=0.1)), summaries) == [[]] * 6


# -- drift -----------------------------------------------------------------------------------


def test_drift_default_is_quiet_on_a_far_policy_and_fires_when_k2_triples_k3() -> None:
    # KL ~0.8 per token (k2 ~30% above k3): a healthy run can get there; the default (2.0,
    # measured on real runs by benchmarks/bench_alerts.py) stays quiet.
    far = [window(4000, s=1.5, seed=i) for i in range(3)]
    rule = DriftRule()
    assert rule.threshold == 2.0
    assert [rule.evaluate(s, step) for step, s in enumerate(far)] == [None] * 3
    # A runaway: logit noise of 10 (KL ~4 nats per token) puts k2 at three times k3.
    runaway = [window(4000, s=10.0, seed=i) for i in range(2)]
    assert all(s.drift > 2.0 and s.drift_z > 3 for s in runaway), [(s.kl, s.drift) for s in runaway]
    alerts = [rule.evaluate(s, step) for step, s in enumerate(runaway, 3)]
    assert alerts[0] is None and alerts[1] is not None and alerts[1].threshold == 2.0


def test_drift_fires_for_a_drifted_policy_after_patience() -> None:
    summaries = [window(4000, s=1.5, seed=i) for i in range(3)]
    for s in summaries:  # KL ~0.8 per token: k2 is ~30% above k3, many standard errors
        assert s.kl > 0.5 and s.drift > 0.2 and s.drift_z > 5, (s.kl, s.drift, s.drift_z)
    rule = DriftRule(threshold=0.1)
    alerts = [rule.evaluate(s, step) for step, s in enumerate(summaries)]
    assert alerts[0] is None  # patience 2
    alert = alerts[1]
    assert alert is not None and alerts[2] is None  # then cooldown
    assert (alert.rule, alert.step, alert.level) == ("drift", 1, AlertLevel.WARN)
    assert alert.value == pytest.approx(summaries[1].drift) and alert.threshold == 0.1
    assert "k2 and k3 disagree by" in alert.message and "learning rate" in alert.message


def test_drift_of_a_sharpened_policy_is_negative_and_fires() -> None:
    s = window(4000, mode="sharp", s=2.0)
    assert s.drift < -0.1 and s.drift_z < -3
    alert = DriftRule(0.1, patience=1).evaluate(s, 0)
    assert alert is not None and "k2 is below k3" in alert.message


def test_drift_needs_significance() -> None:
    s = window(4000, s=1.5)
    assert DriftRule(patience=1, min_z=1e6).evaluate(s, 0) is None
    assert DriftRule(patience=1).evaluate(empty_window(), 0) is None


# -- nonfinite and extreme -------------------------------------------------------------------


def test_nonfinite_fires_on_nan_and_inf() -> None:
    logq = torch.full((100,), -2.0)
    logp = logq.clone()
    logp[:3] = -math.inf
    logp[3:5] = math.nan
    s = from_logprobs(logq, logp)
    assert s.nonfinite == 5 and s.tokens == 95
    alerts = AlertEngine(default_rules()).evaluate(s, 12)
    assert names(alerts) == ["nonfinite"]
    (alert,) = alerts
    assert alert.level is AlertLevel.ERROR and alert.value == 5
    assert "5 of 100 tokens" in alert.message and "excluded" in alert.message
    assert "zero probability" in alert.message and "NaN" in alert.message
    assert NonFiniteRule(threshold=5).evaluate(s, 0) is None


def test_extreme_fires_on_huge_log_ratios_whose_values_stay_exact() -> None:
    logq = torch.full((100,), -1.0)
    logp = logq.clone()
    logp[:2] = -51.0  # |log-ratio| 50 > the extreme threshold 20
    s = from_logprobs(logq, logp)
    assert s.extreme == 2 and s.max_abs_log_ratio == pytest.approx(50.0)
    assert s.k3.mean == pytest.approx(2 * 49.0 / 100, rel=1e-6)  # k3 = 50 - 1 + e^-50, unclamped
    alerts = AlertEngine([ExtremeRule(), NonFiniteRule()]).evaluate(s, 3)
    assert names(alerts) == ["extreme"]
    assert alerts[0].level is AlertLevel.WARN and "max_abs_log_ratio = 50" in alerts[0].message
    assert "exact values" in alerts[0].message and "extreme=" in alerts[0].message
    # with the peers' clamp opted in, the clamped tokens are counted and the message says so
    clamped = from_logprobs(logq, logp, clamp=20.0)
    assert clamped.extreme == 2 and clamped.k3.mean < s.k3.mean
    assert "clamped" in ExtremeRule().evaluate(clamped, 3).message


# -- spike -----------------------------------------------------------------------------------


def test_spike_after_stable_history() -> None:
    stable = [window(s=0.1, seed=i) for i in range(8)]
    spike = window(s=1.0, seed=99)
    rule = SpikeRule()
    assert [rule.evaluate(s, i) for i, s in enumerate(stable)] == [None] * 8
    assert len(rule.history) == 8
    alert = rule.evaluate(spike, 8)
    assert alert is not None and alert.rule == "spike" and alert.value > 6
    assert "KL (k3) jumped to" in alert.message and "recent mean" in alert.message


def test_spike_needs_history_and_ignores_drops_and_nonfinite() -> None:
    rule = SpikeRule(min_history=3)
    high, low = window(s=1.0), window(s=0.1)
    assert [rule.evaluate(s, i) for i, s in enumerate([low, low, high])] == [None] * 3  # 2 < 3 values
    rule.reset()
    assert [rule.evaluate(s, i) for i, s in enumerate([high] * 4 + [low])] == [None] * 5  # a drop
    before = rule.history
    rule.evaluate(empty_window(), 9)  # KL NaN: not applicable, not recorded
    assert rule.history == before


def test_spike_history_is_bounded() -> None:
    rule = SpikeRule(window=4, min_history=2)
    for i in range(10):
        rule.evaluate(window(s=0.1, seed=i), i)
    assert len(rule.history) == 4 and len(rule.state_dict()["history"]) == 4


# -- kl budget -------------------------------------------------------------------------------


def test_kl_budget() -> None:
    rule = KLBudgetRule(max_kl=0.1, stop_training=True)
    assert rule.evaluate(LOW(), 0) is None
    alert = rule.evaluate(HIGH(), 1)
    assert alert is not None and alert.level is AlertLevel.ERROR and alert.stop
    assert alert.value == pytest.approx(HIGH().k3.mean) and alert.threshold == rule.max_kl == 0.1
    assert "above the budget" in alert.message
    k1 = KLBudgetRule(0.1, estimator="k1", cooldown=0).evaluate(HIGH(), 1)
    assert k1 is not None and k1.value == pytest.approx(HIGH().k1.mean)
    assert KLBudgetRule(0.1).evaluate(empty_window(), 0) is None
    assert "kl_budget" not in names(AlertEngine(default_rules()).evaluate(HIGH(), 0))


# -- sampling mismatch -----------------------------------------------------------------------


def test_sampling_mismatch_quiet_for_honest_samples_close_to_reference() -> None:
    rule = SamplingMismatchRule()
    summaries = [window(8000, s=s, seed=i) for s in (1e-3, 0.1, 0.3) for i in range(3)]
    assert all(abs(s.r_minus_1.z) < 4 for s in summaries)
    assert [rule.evaluate(s, i) for i, s in enumerate(summaries)] == [None] * 9


@pytest.mark.parametrize(
    ("n", "kwargs"),
    [
        (4000, {"mode": "sharp", "s": 3.0, "vocab": 64}),  # KL ~0.5, ess ~0.1
        (300, {"mode": "sharp", "s": 3.0, "vocab": 8}),  # KL ~0.5 in 300 tokens
        (4000, {"mode": "noise", "s": 2.0, "vocab": 64, "sig": 1.0}),  # KL ~1.5, ess ~0.02
        (4000, {"mode": "noise", "s": 3.0, "vocab": 64, "sig": 1.0}),  # KL ~2.9, ess ~0.001
        (4000, {"mode": "sharp", "s": 3.0, "vocab": 64, "level": "sequence"}),
    ],
)
def test_sampling_mismatch_quiet_for_honest_samples_under_large_drift(n: int, kwargs: dict[str, Any]) -> None:
    summaries = [window(n, seed=seed, **kwargs) for seed in range(8)]
    zs = [s.r_minus_1.z for s in summaries]
    # The honest samples often miss part of r's heavy right tail, so z leans negative...
    assert min(zs) < -2, zs
    assert max(zs) < 4, zs  # (the positive side stays honest)
    # ...and the rule, which allows for the tail beyond the window's largest ratio, stays
    # quiet, also with patience 1 and no cooldown, at any KL (no gate on the KL or the ESS).
    rule = SamplingMismatchRule(patience=1, cooldown=0)
    assert [rule.evaluate(s, i) for i, s in enumerate(summaries)] == [None] * 8
    assert all(alert == [] for alert in run(AlertEngine([SamplingMismatchRule()]), summaries))


def test_sampling_mismatch_cannot_see_a_tail_no_window_samples() -> None:
    # The policy is the reference at temperature 1/8: about half the reference's mass sits on
    # tokens the policy gives e^-10 or less, which 4000 samples never contain. Such windows
    # look exactly like top-k sampling (mean r ~0.5 with no large r to explain it) and fire,
    # with a message that says so and names the estimate to trust (k1).
    summaries = [window(4000, seed=seed, mode="sharp", s=8.0, vocab=64) for seed in range(8)]
    rule = SamplingMismatchRule(patience=1, cooldown=0)
    fired = [a for a in (rule.evaluate(s, i) for i, s in enumerate(summaries)) if a is not None]
    assert fired
    for alert in fired:
        assert "cannot tell that from truncated sampling" in alert.message and "k1 does not" in alert.message


@pytest.mark.parametrize(
    ("sampler", "s", "sign"),
    [
        ("reference", 0.3, 1),  # the batch was sampled from the reference model
        ("reference", 1.0, 1),  # ... also far from the reference (KL ~0.4)
        ("temperature:0.5", 0.3, -1),  # the sampler ran at temperature 0.5, log-probs at 1
    ],
)
def test_sampling_mismatch_fires_for_samples_from_another_distribution(
    sampler: str, s: float, sign: int
) -> None:
    summaries = [window(8000, s=s, seed=seed, sampler=sampler) for seed in range(3)]
    assert all(sign * x.r_minus_1.z > 8 for x in summaries), [x.r_minus_1.z for x in summaries]
    rule = SamplingMismatchRule()
    alerts = [rule.evaluate(x, i) for i, x in enumerate(summaries)]
    assert alerts[:2] == [None, None]  # patience 3
    alert = alerts[2]
    assert alert is not None and alert.rule == "sampling_mismatch" and alert.level is AlertLevel.WARN
    assert alert.value == pytest.approx(summaries[2].r_minus_1.z)
    assert "stale log-probs" in alert.message and "standard errors" in alert.message


def test_sampling_mismatch_guards() -> None:
    s = window(8000, s=0.3, sampler="reference")
    assert SamplingMismatchRule(patience=1, min_samples=10_000).evaluate(s, 0) is None
    assert SamplingMismatchRule(patience=1, min_abs_mean=1.0).evaluate(s, 0) is None
    neg = window(8000, s=0.3, sampler="temperature:0.5")
    assert SamplingMismatchRule(patience=1).evaluate(neg, 0) is not None
    # The low side needs a deficit of mean(r) beyond tail_factor samples at the largest ratio.
    bound = -neg.r_minus_1.mean * neg.count / math.exp(neg.max_abs_log_ratio)
    assert SamplingMismatchRule(patience=1, tail_factor=0.9 * bound).side(neg) == -1
    assert SamplingMismatchRule(patience=1, tail_factor=1.1 * bound).side(neg) == 0
    # The high side fires on mean(r) >= max_mean_ratio even when z is small.
    pos = window(8000, s=0.3, sampler="reference")
    mean_r = 1 + pos.r_minus_1.mean
    assert SamplingMismatchRule(pos.r_minus_1.z + 1, patience=1, max_mean_ratio=mean_r).side(pos) == 1
    assert SamplingMismatchRule(pos.r_minus_1.z + 1, patience=1, max_mean_ratio=mean_r + 0.01).side(pos) == 0


# -- patience, cooldown, not-applicable windows -----------------------------------------------


def fired_at(rule: Rule, summaries: list[KLSummary]) -> list[int]:
    return [i for i, s in enumerate(summaries) if rule.evaluate(s, i) is not None]


def test_patience_counts_consecutive_windows() -> None:
    h, lo = HIGH(), LOW()
    rule = KLBudgetRule(0.1, patience=3, cooldown=0)
    assert fired_at(rule, [h, h, lo, h, h, h, h, h, h, h]) == [5, 8]


def test_cooldown_prevents_alert_storms() -> None:
    rule = KLBudgetRule(0.1, patience=1, cooldown=2)
    assert fired_at(rule, [HIGH()] * 8) == [0, 3, 6]
    rule = KLBudgetRule(0.1, patience=2, cooldown=3)
    # The streak keeps counting during the cooldown: it fires again as soon as it ends.
    assert fired_at(rule, [HIGH()] * 10) == [1, 5, 9]


def test_not_applicable_window_resets_the_streak() -> None:
    rule = KLBudgetRule(0.1, patience=2, cooldown=0)
    assert fired_at(rule, [HIGH(), empty_window(), HIGH(), HIGH()]) == [3]


def test_reset_forgets_streak_and_cooldown() -> None:
    rule = KLBudgetRule(0.1, patience=2, cooldown=5)
    fired_at(rule, [HIGH()] * 3)
    assert rule.state_dict() == {"streak": 1, "cooldown_left": 4}
    rule.reset()
    assert rule.state_dict() == {"streak": 0, "cooldown_left": 0}


# -- state: resume equivalence -----------------------------------------------------------------


def mixed_sequence() -> list[KLSummary]:
    """Quiet, drifted, spiking, broken and mismatched windows, in an order that exercises
    patience, cooldown and the spike history."""
    low = [window(s=0.1, seed=i) for i in range(7)]
    nan = from_logprobs(torch.tensor([-1.0] * 50 + [math.nan]), torch.full((51,), -1.0))
    mism = [window(4000, s=0.3, seed=i, sampler="reference") for i in range(4)]
    drift = [window(4000, s=1.5, seed=i) for i in range(5)]
    return low + [HIGH(), nan] + mism + low[:3] + drift + [empty_window()] + drift[:3] + low[:4]


def engine_factory() -> AlertEngine:
    rules = default_rules(max_kl=0.3)
    for rule in rules:
        rule.cooldown = 2  # more firings in a short sequence
        if isinstance(rule, DriftRule):
            rule.threshold = 0.1  # the drifted windows (KL ~0.8) are below the default
    return AlertEngine(rules, history_size=50)


def test_resume_gives_identical_alerts() -> None:
    seq = mixed_sequence()
    full = engine_factory()
    expected = [[a.to_dict() for a in alerts] for alerts in run(full, seq)]
    fired = {a["rule"] for alerts in expected for a in alerts}
    assert fired == {"drift", "spike", "nonfinite", "sampling_mismatch", "kl_budget"}, fired
    for split in (1, 8, 12, 16, 21, 26):
        first = engine_factory()
        head = [[a.to_dict() for a in alerts] for alerts in run(first, seq[:split])]
        state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
        resumed = engine_factory()
        resumed.load_state_dict(state)
        tail = [[a.to_dict() for a in alerts] for alerts in run(resumed, seq[split:], start=split)]
        assert head + tail == expected, split
        assert resumed.state_dict() == full.state_dict()


def test_state_dict_layout() -> None:
    engine = AlertEngine(default_rules(max_kl=0.1))
    run(engine, [LOW()] * 3 + [HIGH()] * 2)
    state = engine.state_dict()
    assert state["version"] == 1
    assert set(state["rules"]) == {
        "drift",
        "spike",
        "nonfinite",
        "extreme",
        "sampling_mismatch",
        "initial_kl",
        "rollout_mismatch",
        "kl_budget",
    }
    # No window held the untrained policy's batches (summary.initial): nothing checked yet.
    assert state["rules"]["initial_kl"] == {"streak": 0, "cooldown_left": 0, "checked": False}
    assert state["rules"]["spike"]["history"] == pytest.approx([LOW().k3.mean] * 3 + [HIGH().k3.mean] * 2)
    assert [a["rule"] for a in state["history"]] == ["kl_budget"]  # drift at KL 0.4: below 1.0


def test_load_state_dict_is_tolerant() -> None:
    engine = AlertEngine([KLBudgetRule(0.1, patience=2, cooldown=0), SpikeRule()])
    engine.load_state_dict({})  # nothing: fresh rules, no history
    assert engine.history == [] and engine.rules[1].state_dict()["history"] == []
    engine.load_state_dict({"rules": {"kl_budget": {"streak": 1}, "old_rule": {"streak": 9}}})
    assert engine.rules[0].state_dict() == {"streak": 1, "cooldown_left": 0}
    assert names(engine.evaluate(HIGH(), 0)) == ["kl_budget"]  # the restored streak counts
    # A rule absent from the state is reset.
    engine.load_state_dict({"version": 1, "rules": {"spike": {}}, "history": []})
    assert engine.rules[0].state_dict() == {"streak": 0, "cooldown_left": 0}
    with pytest.raises(TypeError, match="state must be a dict"):
        engine.load_state_dict([])  # type: ignore[arg-type]


# -- engine ------------------------------------------------------------------------------------


def test_engine_history_is_bounded() -> None:
    engine = AlertEngine([KLBudgetRule(0.1, cooldown=0)], history_size=3)
    run(engine, [HIGH()] * 5)
    assert [a.step for a in engine.history] == [2, 3, 4]
    small = AlertEngine([KLBudgetRule(0.1, cooldown=0)], history_size=2)
    small.load_state_dict(engine.state_dict())
    assert [a.step for a in small.history] == [3, 4]
    engine.history.clear()  # a copy: the engine's history is untouched
    assert len(engine.history) == 3
    engine.reset()
    assert engine.history == []


def test_default_rules() -> None:
    assert [r.name for r in default_rules()] == [
        "drift",
        "spike",
        "nonfinite",
        "extreme",
        "sampling_mismatch",
        "initial_kl",
        "rollout_mismatch",
    ]
    rules = default_rules(max_kl=0.2)
    budget = rules[-1]
    assert isinstance(budget, KLBudgetRule) and budget.max_kl == 0.2 and budget.estimator == "k3"
    assert {r.name: r.level for r in rules} == {
        "drift": AlertLevel.WARN,
        "spike": AlertLevel.WARN,
        "nonfinite": AlertLevel.ERROR,
        "extreme": AlertLevel.WARN,
        "sampling_mismatch": AlertLevel.WARN,
        "initial_kl": AlertLevel.WARN,
        "rollout_mismatch": AlertLevel.WARN,
        "kl_budget": AlertLevel.ERROR,
    }


def test_rule_options() -> None:
    rule = DriftRule(level="error", name="drift_strict", stop_training=True)
    assert rule.level is AlertLevel.ERROR and rule.name == "drift_strict" and DriftRule.name == "drift"
    assert "DriftRule(" in repr(rule)
    engine = AlertEngine([DriftRule(0.1), DriftRule(0.1, name="drift2", patience=1)])
    alerts = engine.evaluate(window(4000, s=1.5), 7)
    assert [(a.rule, a.stop) for a in alerts] == [("drift2", False)]


# -- Alert -------------------------------------------------------------------------------------


def test_alert_dict_round_trip() -> None:
    alert = Alert("sampling_mismatch", 42, AlertLevel.WARN, math.inf, 6.0, "msg", stop=True)
    d = alert.to_dict()
    assert d == {
        "rule": "sampling_mismatch",
        "step": 42,
        "level": "warn",
        "value": "inf",
        "threshold": 6.0,
        "message": "msg",
        "stop": True,
    }
    json.dumps(d, allow_nan=False)
    assert Alert.from_dict(json.loads(json.dumps(d))) == alert
    nan = Alert("x", 0, "info", math.nan, -math.inf, "")  # type: ignore[arg-type]
    back = Alert.from_dict(nan.to_dict())
    assert math.isnan(back.value) and back.threshold == -math.inf and back.level is AlertLevel.INFO
    assert Alert.from_dict({"rule": "r", "step": 1, "level": "error"}).stop is False
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['level'\]"):
        Alert.from_dict({"rule": "r", "step": 1})
    with pytest.raises(ValueError, match="level"):
        Alert.from_dict({"rule": "r", "step": 1, "level": "fatal"})


# -- argument validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: DriftRule(0), ValueError, "threshold must be > 0"),
        (lambda: DriftRule(math.nan), ValueError, "threshold must be finite"),
        (lambda: DriftRule("0.1"), TypeError, "threshold must be a real number"),  # type: ignore[arg-type]
        (lambda: DriftRule(True), TypeError, "threshold must be a real number"),
        (lambda: DriftRule(min_z=-1), ValueError, "min_z must be >= 0"),
        (lambda: DriftRule(patience=0), ValueError, "patience must be an int >= 1"),
        (lambda: DriftRule(patience=1.5), TypeError, "patience must be an int"),  # type: ignore[arg-type]
        (lambda: DriftRule(cooldown=-1), ValueError, "cooldown must be an int >= 0"),
        (lambda: DriftRule(level="fatal"), ValueError, r"level must be an AlertLevel or one of \('info'"),
        (lambda: DriftRule(stop_training=1), TypeError, "stop_training must be True or False"),  # type: ignore[arg-type]
        (lambda: DriftRule(name=""), ValueError, "name must be a non-empty string"),
        (lambda: KLBudgetRule(0), ValueError, "max_kl must be > 0"),
        (lambda: KLBudgetRule(-1.0), ValueError, "max_kl must be > 0"),
        (lambda: KLBudgetRule(0.1, estimator="k4"), ValueError, "estimator must be one of"),
        (lambda: SpikeRule(window=1), ValueError, "window must be an int >= 2"),
        (lambda: SpikeRule(min_history=1), ValueError, "min_history must be an int >= 2"),
        (
            lambda: SpikeRule(window=5, min_history=6),
            ValueError,
            r"min_history \(6\) must be <= window \(5\)",
        ),
        (lambda: SpikeRule(rel_floor=-0.1), ValueError, "rel_floor must be >= 0"),
        (lambda: SpikeRule(abs_floor=0), ValueError, "abs_floor must be > 0"),
        (lambda: NonFiniteRule(-1), ValueError, "threshold must be >= 0"),
        (lambda: ExtremeRule(-1), ValueError, "threshold must be >= 0"),
        (lambda: SamplingMismatchRule(0), ValueError, "threshold must be > 0"),
        (lambda: SamplingMismatchRule(min_samples=1), ValueError, "min_samples must be an int >= 2"),
        (lambda: SamplingMismatchRule(tail_factor=-1), ValueError, "tail_factor must be >= 0"),
        (lambda: SamplingMismatchRule(max_mean_ratio=1), ValueError, "max_mean_ratio must be > 1"),
        (lambda: InitialKLRule(0), ValueError, "threshold must be > 0"),
        (lambda: SamplingMismatchRule(min_abs_mean=-1), ValueError, "min_abs_mean must be >= 0"),
        (lambda: AlertEngine([DriftRule(), DriftRule()]), ValueError, r"unique, got duplicates \['drift'\]"),
        (lambda: AlertEngine([DriftRule(), "spike"]), TypeError, "Rule objects only, got str"),  # type: ignore[list-item]
        (lambda: AlertEngine(DriftRule()), TypeError, "rules must be a list"),  # type: ignore[arg-type]
        (lambda: AlertEngine([], history_size=0), ValueError, "history_size must be an int >= 1"),
        (lambda: default_rules(max_kl=0), ValueError, "max_kl must be > 0"),
        (lambda: DriftRule().evaluate({"kl": 0.1}, 0), TypeError, "summary must be a KLSummary"),  # type: ignore[arg-type]
        (lambda: DriftRule().evaluate(LOW(), -1), ValueError, "step must be an int >= 0"),
        (lambda: DriftRule().evaluate(LOW(), True), TypeError, "step must be an int"),
    ],
)
def test_argument_validation(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


def test_base_rule_is_abstract() -> None:
    with pytest.raises(TypeError):
        Rule(1.0)  # type: ignore[abstract]
