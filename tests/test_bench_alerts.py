"""A reduced benchmarks/bench_alerts.py: real training runs, clean ones quiet, planted faults caught.

The full figures (several seeds, longer runs) are in benchmarks/README.md; here a few runs with
fewer windows check that each default rule still does its job on a real run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_alerts.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_alerts", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_alerts"] = mod
    spec.loader.exec_module(mod)
    return mod


def _scenario(bench: ModuleType, name: str, windows: int) -> object:
    by_name = {sc.name: sc for sc in bench.scenarios(quick=True)}
    return dataclasses.replace(by_name[name], windows=windows)


@pytest.mark.parametrize(("name", "windows"), [("clean_w5_fast_kl1", 8), ("clean_w1_slow", 20)])
def test_clean_runs_stay_quiet(bench: ModuleType, name: str, windows: int) -> None:
    res = bench.run(_scenario(bench, name, windows), seed=0)
    assert {k: v for k, v in res["fired"].items() if v is not None} == {}, res["messages"]
    if name == "clean_w5_fast_kl1":
        # A healthy run far from the reference (0.87 nats per token in 8 windows, 1.2 in the
        # benchmark's 30), where the drift rule's old default of 0.1 fired.
        assert res["kl_max"] > 0.5


@pytest.mark.parametrize(
    ("name", "windows", "within"),
    [
        ("dropout_scoring", 2, 1),
        ("topk50_sampler", 3, 2),
        ("vocab_mismatch_inf", 2, 1),
        ("runaway_kl", 6, 5),
        ("lr_spike", 12, 8),
        ("stale_rollout_weights", 3, 3),
        ("entropy_collapse", 12, 9),  # the hack starts in window 5
        ("reward_hack_midrun", 12, 9),  # ... in window 7
    ],
)
def test_planted_faults_are_caught_by_their_rule(
    bench: ModuleType, name: str, windows: int, within: int
) -> None:
    sc = _scenario(bench, name, windows)
    res = bench.run(sc, seed=0)
    first = res["fired"][sc.expects]  # type: ignore[attr-defined]
    assert first is not None and first <= within, res["fired"]


def test_json_output(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--json", "--seeds", "1", "--only", "vocab_mismatch_inf"]) == 0
    got = json.loads(capsys.readouterr().out)
    (sc,) = got["scenarios"]
    assert {"name", "kind", "expects", "fired", "windows"} <= set(sc)
    assert sc["kind"] == "fault" and sc["expects"] == "nonfinite" and sc["fired"]["nonfinite"] == 1
    assert set(sc["fired"]) == set(bench.RULES)
