"""klmonitor.alerts.base: Rule (patience, cooldown, not-applicable windows) and the shared options, validated once."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import Any

import pytest
import torch
from alert_windows import (
    HIGH,
    LOW,
    empty_window,
    fired_at,
    window,
)

from klmonitor import KLStats, KLSummary, alerts
from klmonitor.alerts import (
    AlertEngine,
    AlertLevel,
    DriftRule,
    EntropyCollapseRule,
    ExtremeRule,
    InitialKLRule,
    KLAccelerationRule,
    KLBudgetRule,
    NonFiniteRule,
    RolloutMismatchRule,
    Rule,
    RuleOptions,
    SamplingMismatchRule,
    SpikeRule,
    ThresholdSpec,
    UpdateSizeRule,
)

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover
    from typing_extensions import Unpack


# -- patience, cooldown, not-applicable windows ---------------------------------------------


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


# -- options and argument validation --------------------------------------------------------


def test_rule_options() -> None:
    rule = DriftRule(level="error", name="drift_strict", stop_training=True)
    assert rule.level is AlertLevel.ERROR and rule.name == "drift_strict" and DriftRule.name == "drift"
    assert "DriftRule(" in repr(rule)
    engine = AlertEngine([DriftRule(0.1), DriftRule(0.1, name="drift2", patience=1)])
    alerts = engine.evaluate(window(4000, s=1.5), 7)
    assert [(a.rule, a.stop) for a in alerts] == [("drift2", False)]


def test_base_rule_is_abstract() -> None:
    with pytest.raises(TypeError):
        Rule(1.0)  # type: ignore[abstract]


# -- argument validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: DriftRule(patience=0), ValueError, "patience must be an int >= 1"),
        (lambda: DriftRule(patience=1.5), TypeError, "patience must be an int"),  # type: ignore[arg-type]
        (lambda: DriftRule(cooldown=-1), ValueError, "cooldown must be an int >= 0"),
        (lambda: DriftRule(level="fatal"), ValueError, r"level must be an AlertLevel or one of \('info'"),
        (lambda: DriftRule(stop_training=1), TypeError, "stop_training must be True or False"),  # type: ignore[arg-type]
        (lambda: DriftRule(name=""), ValueError, "name must be a non-empty string"),
        (lambda: DriftRule().evaluate({"kl": 0.1}, 0), TypeError, "summary must be a KLSummary"),  # type: ignore[arg-type]
        (lambda: DriftRule().evaluate(LOW(), -1), ValueError, "step must be an int >= 0"),
        (lambda: DriftRule().evaluate(LOW(), True), TypeError, "step must be an int"),
    ],
)
def test_argument_validation(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


# -- the shared options: validated once, the same for every rule -------------------------------


class TokensBelow(Rule):
    """A rule of one's own, without a constructor: the base's threshold and options."""

    name = "few_tokens"

    def measure(self, summary: KLSummary) -> float | None:
        return float(summary.tokens)


class Windowed(Rule):
    """A rule of one's own with an argument, defaults and a threshold bound (Rule's docstring)."""

    name = "windowed"
    default_patience = 3
    default_level = AlertLevel.INFO
    threshold_spec = ThresholdSpec(low=0.0, hint=" (tokens)")

    def __init__(self, threshold: float = 1.0, *, window: int = 5, **options: Unpack[RuleOptions]) -> None:
        super().__init__(threshold, **options)
        self.window = window

    def measure(self, summary: KLSummary) -> float | None:
        return float(summary.tokens)


# Every rule class, with the positional arguments it needs.
RULES: dict[type[Rule], tuple[float, ...]] = {
    DriftRule: (),
    KLBudgetRule: (0.1,),
    SpikeRule: (),
    NonFiniteRule: (),
    ExtremeRule: (),
    SamplingMismatchRule: (),
    InitialKLRule: (),
    RolloutMismatchRule: (),
    UpdateSizeRule: (0.05,),
    EntropyCollapseRule: (),
    KLAccelerationRule: (),
    TokensBelow: (1.0,),
    Windowed: (),
}

# The defaults each rule had as keyword arguments of its own constructor before the package.
DEFAULTS = {
    DriftRule: (2, 10, AlertLevel.WARN),
    KLBudgetRule: (1, 10, AlertLevel.ERROR),
    SpikeRule: (1, 10, AlertLevel.WARN),
    NonFiniteRule: (1, 10, AlertLevel.ERROR),
    ExtremeRule: (1, 10, AlertLevel.WARN),
    SamplingMismatchRule: (3, 10, AlertLevel.WARN),
    InitialKLRule: (1, 0, AlertLevel.WARN),
    RolloutMismatchRule: (2, 10, AlertLevel.WARN),
    UpdateSizeRule: (1, 10, AlertLevel.WARN),
    EntropyCollapseRule: (2, 10, AlertLevel.WARN),
    KLAccelerationRule: (1, 10, AlertLevel.WARN),
    TokensBelow: (1, 0, AlertLevel.WARN),
    Windowed: (3, 0, AlertLevel.INFO),
}

# (option, bad value, exception, the one message every rule gives)
BAD_OPTIONS = [
    ("patience", 0, ValueError, "patience must be an int >= 1 (consecutive windows before firing), got 0"),
    (
        "patience",
        1.5,
        TypeError,
        "patience must be an int >= 1 (consecutive windows before firing), got float 1.5",
    ),
    (
        "patience",
        None,
        TypeError,
        "patience must be an int >= 1 (consecutive windows before firing), got NoneType None",
    ),
    ("cooldown", -1, ValueError, "cooldown must be an int >= 0 (quiet windows after firing), got -1"),
    ("cooldown", "2", TypeError, "cooldown must be an int >= 0 (quiet windows after firing), got str '2'"),
    (
        "level",
        "fatal",
        ValueError,
        "level must be an AlertLevel or one of ('info', 'warn', 'error'), got 'fatal'",
    ),
    ("level", 2, ValueError, "level must be an AlertLevel or one of ('info', 'warn', 'error'), got 2"),
    ("stop_training", 1, TypeError, "stop_training must be True or False, got 1"),
    ("stop_training", "yes", TypeError, "stop_training must be True or False, got 'yes'"),
    ("name", "", ValueError, "name must be a non-empty string, got ''"),
    ("name", "  ", ValueError, "name must be a non-empty string, got '  '"),
    ("name", 3, ValueError, "name must be a non-empty string, got 3"),
]


def make(cls: type[Rule], **options: Any) -> Rule:
    return cls(*RULES[cls], **options)


def test_the_rule_list_holds_every_rule_class_of_the_package() -> None:
    exported = {
        obj
        for obj in vars(alerts).values()
        if isinstance(obj, type) and issubclass(obj, Rule) and not inspect.isabstract(obj)
    }
    exported.discard(alerts._TokenCountRule)  # the base of nonfinite and extreme
    assert exported == set(RULES) - {TokensBelow, Windowed}
    assert set(DEFAULTS) == set(RULES)


@pytest.mark.parametrize(("option", "value", "exc", "message"), BAD_OPTIONS, ids=lambda x: repr(x)[:20])
@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
def test_a_bad_shared_option_raises_the_same_clear_error_for_every_rule(
    cls: type[Rule], option: str, value: Any, exc: type[Exception], message: str
) -> None:
    if option not in cls.shared_options:
        # A one-shot rule has no patience or cooldown: the option is refused by name.
        assert cls is InitialKLRule and option in ("patience", "cooldown")
        with pytest.raises(
            TypeError, match=rf"^InitialKLRule\(\) does not take '{option}'.*level, stop_training, name\.$"
        ):
            make(cls, **{option: value})
        return
    with pytest.raises(exc) as info:
        make(cls, **{option: value})
    assert str(info.value) == message


@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
def test_shared_options_default_per_rule_and_are_honoured(cls: type[Rule]) -> None:
    patience, cooldown, level = DEFAULTS[cls]
    rule = make(cls)
    assert (rule.patience, rule.cooldown, rule.level, rule.stop_training) == (
        patience,
        cooldown,
        level,
        False,
    )
    assert (cls.default_patience, cls.default_cooldown, cls.default_level) == (patience, cooldown, level)
    assert rule.name == cls.name
    assert make(cls, level=None).level is level  # None: the rule's default
    given: dict[str, Any] = {"level": "ERROR", "stop_training": True, "name": "mine"}
    if "patience" in cls.shared_options:
        given.update(patience=4, cooldown=0)
    rule = make(cls, **given)
    assert (rule.level, rule.stop_training, rule.name) == (AlertLevel.ERROR, True, "mine")
    assert (rule.patience, rule.cooldown) == ((4, 0) if "patience" in given else (1, 0))
    assert cls.name != "mine"  # the class keeps its name


def test_options_reach_the_alert() -> None:
    stats = KLStats()
    stats.update(torch.zeros(3), torch.zeros(3))
    summary = stats.compute()  # 3 tokens: Windowed fires on tokens > threshold
    rule = Windowed(1.0, patience=2, cooldown=1, level="error", stop_training=True, name="w")
    alerts = [rule.evaluate(summary, step) for step in range(6)]
    # patience 2, then a cooldown of 1 window during which the streak keeps counting
    assert [a is not None for a in alerts] == [False, True, False, True, False, True]
    first = alerts[1]
    assert first is not None
    got = (first.rule, first.step, first.level, first.stop, first.value, first.threshold, first.message)
    assert got == ("w", 1, AlertLevel.ERROR, True, 3.0, 1.0, "w: value 3 (threshold 1)")
    assert Windowed(5.0).evaluate(summary, 0) is None


@pytest.mark.parametrize(
    ("make_rule", "message"),
    [
        (
            lambda: DriftRule(patiense=2),
            "DriftRule() got an unexpected keyword argument 'patiense'. Did you mean 'patience'?",
        ),
        (lambda: DriftRule(treshold=1.0), "Did you mean 'threshold'?"),
        (
            lambda: SpikeRule(windw=4),
            "SpikeRule() got an unexpected keyword argument 'windw'. Did you mean 'window'?",
        ),
        (lambda: KLBudgetRule(0.1, estimater="k1"), "Did you mean 'estimator'?"),
        (lambda: Windowed(stop_trainig=True), "Did you mean 'stop_training'?"),
        (
            lambda: NonFiniteRule(colour="red"),
            "It takes threshold, patience, cooldown, level, stop_training, name.",
        ),
        (lambda: InitialKLRule(cooldown=3), "InitialKLRule() does not take 'cooldown'"),
    ],
)
def test_an_unknown_option_names_the_closest_one(make_rule: Any, message: str) -> None:
    with pytest.raises(TypeError) as info:
        make_rule()
    assert message in str(info.value)
    assert "It takes" in str(info.value) or "keyword arguments are" in str(info.value)


def test_threshold_spec_bounds_the_threshold_under_its_own_name() -> None:
    with pytest.raises(ValueError, match=r"^threshold must be > 0.0 \(tokens\), got -1$"):
        Windowed(-1)
    with pytest.raises(TypeError, match=r"^threshold must be a real number, got str 'x'$"):
        TokensBelow("x")  # type: ignore[arg-type]
    assert TokensBelow(-3).threshold == -3.0  # the base: any finite number
    with pytest.raises(ValueError, match=r"^max_kl must be > 0.0 \(the KL budget in nats\), got -2$"):
        KLBudgetRule(-2)
    assert ThresholdSpec(low=0.0, low_inclusive=True).check(0) == 0.0


def test_load_state_dict_refuses_counters_that_would_silence_the_rule() -> None:
    rule = KLBudgetRule(0.1, cooldown=3)
    with pytest.raises(ValueError, match=r"^rule 'kl_budget': streak is -1, not an int >= 0$"):
        rule.load_state_dict({"streak": -1})
    with pytest.raises(ValueError, match=r"^rule 'kl_budget': cooldown_left is 4, not an int >= 0 <= 3$"):
        rule.load_state_dict({"cooldown_left": 4})
    with pytest.raises(ValueError, match="streak is True"):
        rule.load_state_dict({"streak": True})
    rule.load_state_dict({"streak": 2, "cooldown_left": 3})
    assert rule.state_dict() == {"streak": 2, "cooldown_left": 3}


def test_rules_are_configurable_from_a_config_as_lightning_cli_does() -> None:
    # KLMonitor(rules=...) from LightningCLI: jsonargparse reads each rule's constructor,
    # the shared options included (typed by RuleOptions), and refuses one a rule does not take.
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--rules", type=list[Rule])
    rules = [
        {
            "class_path": "klmonitor.alerts.DriftRule",
            "init_args": {"threshold": 0.5, "patience": 3, "level": "error"},
        },
        {"class_path": "klmonitor.alerts.InitialKLRule", "init_args": {"threshold": 0.01, "name": "init"}},
        {"class_path": "klmonitor.alerts.KLBudgetRule", "init_args": {"max_kl": 0.2, "stop_training": True}},
    ]
    cfg = parser.parse_args([f"--rules={json.dumps(rules)}"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    built = instantiate(cfg).rules
    assert [repr(r) for r in built] == [
        "DriftRule(threshold=0.5, patience=3, cooldown=10, level='error', name='drift')",
        "InitialKLRule(threshold=0.01, patience=1, cooldown=0, level='warn', name='init')",
        "KLBudgetRule(threshold=0.2, patience=1, cooldown=10, level='error', name='kl_budget')",
    ]
    assert built[2].stop_training is True
    bad = [{"class_path": "klmonitor.alerts.InitialKLRule", "init_args": {"patience": 3}}]
    with pytest.raises(argparse.ArgumentError, match="patience"):
        parser.parse_args([f"--rules={json.dumps(bad)}"])
