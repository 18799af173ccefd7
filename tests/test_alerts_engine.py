"""klmonitor.alerts.engine: AlertEngine and default_rules: quiet runs, resume, state, history."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from alert_windows import (
    HIGH,
    LOW,
    engine_factory,
    identical,
    mixed_sequence,
    names,
    past_start,
    run,
    window,
)

from klmonitor.alerts import (
    AlertEngine,
    AlertLevel,
    DriftRule,
    KLBudgetRule,
    SpikeRule,
    default_rules,
)

# -- quiet cases ----------------------------------------------------------------------------


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


# -- state: resume equivalence --------------------------------------------------------------


def test_resume_gives_identical_alerts() -> None:
    seq = mixed_sequence()
    full = engine_factory()
    expected = [[a.to_dict() for a in alerts] for alerts in run(full, seq)]
    fired = {a["rule"] for alerts in expected for a in alerts}
    # kl_acceleration too: the sequence's KL jumps after levelling (its history resumes exactly).
    assert fired == {"drift", "spike", "nonfinite", "sampling_mismatch", "kl_budget", "kl_acceleration"}, (
        fired
    )
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
        "entropy_collapse",
        "kl_acceleration",
        "kl_budget",
    }
    assert state["rules"]["entropy_collapse"]["baseline"] == []  # these windows had no entropy
    assert len(state["rules"]["kl_acceleration"]["history"]) == 5
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


# -- engine ---------------------------------------------------------------------------------


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
        "entropy_collapse",
        "kl_acceleration",
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
        "entropy_collapse": AlertLevel.WARN,
        "kl_acceleration": AlertLevel.WARN,
        "kl_budget": AlertLevel.ERROR,
    }


# -- argument validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: AlertEngine([DriftRule(), DriftRule()]), ValueError, r"unique, got duplicates \['drift'\]"),
        (lambda: AlertEngine([DriftRule(), "spike"]), TypeError, "Rule objects only, got str"),  # type: ignore[list-item]
        (lambda: AlertEngine(DriftRule()), TypeError, "rules must be a list"),  # type: ignore[arg-type]
        (lambda: AlertEngine([], history_size=0), ValueError, "history_size must be an int >= 1"),
        (lambda: default_rules(max_kl=0), ValueError, "max_kl must be > 0"),
    ],
)
def test_argument_validation(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


# A state as AlertEngine.state_dict() of the single-module klmonitor.alerts (0.1.0) wrote it,
# inside a Monitor's or a callback's checkpoint.
OLD_STATE: dict[str, Any] = {
    "version": 1,
    "rules": {
        "drift": {"streak": 1, "cooldown_left": 0},
        "spike": {"streak": 0, "cooldown_left": 2, "history": [0.004, 0.0041, 0.0039, 0.004, 0.0042]},
        "nonfinite": {"streak": 0, "cooldown_left": 0},
        "extreme": {"streak": 0, "cooldown_left": 0},
        "sampling_mismatch": {"streak": 2, "cooldown_left": 0},
        "initial_kl": {"streak": 0, "cooldown_left": 0, "checked": True},
        "rollout_mismatch": {"streak": 0, "cooldown_left": 0},
        "kl_budget": {"streak": 0, "cooldown_left": 7},
    },
    "history": [
        {
            "rule": "kl_budget",
            "step": 40,
            "level": "error",
            "value": 0.41,
            "threshold": 0.3,
            "message": "KL per token (k3 mean) is 0.41, above the budget max_kl = 0.3 (1.4x): ...",
            "stop": False,
        },
        {
            "rule": "nonfinite",
            "step": 45,
            "level": "error",
            "value": "inf",
            "threshold": 0.0,
            "message": "1 of 51 tokens had a NaN or infinite log-ratio",
            "stop": True,
        },
    ],
}


def test_a_state_saved_by_the_single_module_loads_and_decides_on() -> None:
    engine = AlertEngine(default_rules(max_kl=0.3))
    engine.load_state_dict(json.loads(json.dumps(OLD_STATE)))
    state = engine.state_dict()
    # Rules added since (entropy_collapse, kl_acceleration) start fresh; the rest key for key.
    assert set(state["rules"]) - set(OLD_STATE["rules"]) == {"entropy_collapse", "kl_acceleration"}
    state["rules"] = {k: v for k, v in state["rules"].items() if k in OLD_STATE["rules"]}
    assert state == OLD_STATE
    assert [(a.rule, a.step, a.level, a.value) for a in engine.history] == [
        ("kl_budget", 40, AlertLevel.ERROR, 0.41),
        ("nonfinite", 45, AlertLevel.ERROR, math.inf),
    ]
    # The restored counters decide: drift (patience 2) fires on its first drifted window and
    # sampling_mismatch (patience 3) on its first mismatched one, where a fresh engine waits;
    # kl_budget waits out its cooldown, where a fresh engine fires.
    drifted = window(4000, s=1.5)  # KL ~0.8 per token: above max_kl = 0.3 too
    mismatched = window(8000, s=0.3, seed=0, sampler="reference")
    for summary, name in ((drifted, "drift"), (mismatched, "sampling_mismatch")):
        loaded = AlertEngine(default_rules(max_kl=0.3))
        loaded.load_state_dict(json.loads(json.dumps(OLD_STATE)))
        fresh = AlertEngine(past_start(default_rules(max_kl=0.3)))
        for e in (loaded, fresh):
            e.rules[0].threshold = 0.1  # drift: the drifted window (gap ~0.3) is below the default
        got, fresh_got = names(loaded.evaluate(summary, 50)), names(fresh.evaluate(summary, 50))
        assert name in got and name not in fresh_got, (got, fresh_got)
        if summary is drifted:
            assert "kl_budget" not in got and "kl_budget" in fresh_got
