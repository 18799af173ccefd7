"""klmonitor.alerts as a package: every name the single module had is still importable from it."""

from __future__ import annotations

import importlib
import pickle

import pytest

import klmonitor
from klmonitor import alerts

# klmonitor/alerts.py (0.1.0): its __all__, then the private names other code might import.
OLD_ALL = [
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
    "DEFAULT_DRIFT_THRESHOLD",
    "default_rules",
    "parse_alert_text",
]
OLD_PRIVATE = [
    "_STATE_VERSION",
    "_BUDGET_ESTIMATORS",
    "_TEXT_FORMAT",
    "_TEXT_RE",
    "_DEFAULT_COOLDOWN",
    "_SM_THRESHOLD",
    "_SM_MIN_SAMPLES",
    "_SM_TAIL_FACTOR",
    "_SM_MAX_MEAN_RATIO",
    "_SM_MIN_ABS_MEAN",
    "_LEVELS",
    "_as_level",
    "_float_to_json",
    "_fmt",
    "_TokenCountRule",
    "_per_sample_token_ratio",
    "_largest_ratio_bound",
    "_mismatch_side",
    "_state_int",
]
MODULES = ["event", "base", "drift", "budget", "tokens", "sampling", "initial", "engine"]


def test_every_name_of_the_single_module_is_still_importable() -> None:
    assert set(OLD_ALL) <= set(alerts.__all__)
    for name in OLD_ALL + OLD_PRIVATE:
        assert hasattr(alerts, name), name
    namespace: dict[str, object] = {}
    exec(f"from klmonitor.alerts import {', '.join(OLD_ALL + OLD_PRIVATE)}", namespace)
    assert namespace["DEFAULT_DRIFT_THRESHOLD"] == 2.0 and namespace["_STATE_VERSION"] == 1
    assert (namespace["_DEFAULT_COOLDOWN"], namespace["_SM_THRESHOLD"], namespace["_SM_MIN_SAMPLES"]) == (
        10,
        5.0,
        100,
    )
    assert klmonitor.Alert is alerts.Alert and klmonitor.AlertLevel is alerts.AlertLevel


@pytest.mark.parametrize("module", MODULES)
def test_each_module_s_public_names_are_the_package_s(module: str) -> None:
    mod = importlib.import_module(f"klmonitor.alerts.{module}")
    assert mod.__all__, module
    for name in mod.__all__:
        assert getattr(alerts, name) is getattr(mod, name), (module, name)
        assert name in alerts.__all__, name


def test_rules_and_alerts_pickle() -> None:
    engine = alerts.AlertEngine(alerts.default_rules(max_kl=0.1))
    back = pickle.loads(pickle.dumps(engine))
    assert [repr(r) for r in back.rules] == [repr(r) for r in engine.rules]
    alert = alerts.Alert("drift", 3, alerts.AlertLevel.WARN, 0.5, 0.1, "m")
    assert pickle.loads(pickle.dumps(alert)) == alert
