"""The window (klmonitor.window): every accumulator reduced and saved as one; the policy-update KL."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from klmonitor import KLStats, Monitor
from klmonitor.alerts import UpdateSizeRule, default_rules
from klmonitor.window import Moments, Window, moments_problem


def test_reduce_returns_every_part_by_name_and_one_header_per_rank() -> None:
    stats = KLStats(sync_on_compute=False, f_divergences=["tv"])
    w = Window()
    w.add("main", Moments(stats), key="window")
    stats.update(torch.zeros(5), torch.full((5,), 0.2))
    headers, values = w.reduce(torch.tensor([7.0, 3.0], dtype=torch.float64))
    assert headers == [[7.0, 3.0]]
    assert values["main"] == stats.summary_vector().tolist()
    with pytest.raises(ValueError, match="already"):
        w.add("main", Moments(stats))


def test_state_round_trip_and_problems_name_the_part() -> None:
    mon = Monitor(log_every_n_steps=10, by_position=True, f_divergences=["chi2"], rules=[])
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 8, generator=g)
    mon.update(logp, logp + 0.1, behaviour_logprobs=logp - 0.05, rollout_logprobs=logp + 0.01)
    state = json.loads(json.dumps(mon.state_dict()))
    assert {"window", "f_window", "rollout_window", "update_window", "diagnostics"} <= set(state)
    other = Monitor(log_every_n_steps=10, by_position=True, f_divergences=["chi2"], rules=[])
    other.load_state_dict(state)
    for name in other.window.names():
        a = mon.window[name].vector(torch.device("cpu"))
        b = other.window[name].vector(torch.device("cpu"))
        assert torch.equal(a, b), name
    bad = dict(state, update_window=[1.0, 2.0])
    fresh = Monitor(log_every_n_steps=10, by_position=True, f_divergences=["chi2"], rules=[])
    with pytest.warns(UserWarning, match="policy update has 2 numbers"):
        fresh.load_state_dict(bad)
    assert fresh.stats.summary_vector().sum().item() == 0.0  # nothing half-loaded
    # A state from before the policy-update window (no key) loads, that part empty.
    old = {k: v for k, v in state.items() if k != "update_window"}
    again = Monitor(log_every_n_steps=10, by_position=True, f_divergences=["chi2"], rules=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(old)
    assert again.update_stats.summary_vector().sum().item() == 0.0
    assert again.stats.summary_vector().tolist() == mon.stats.summary_vector().tolist()


def test_moments_problem() -> None:
    assert moments_problem(None) == "is missing"
    assert "numbers" in (moments_problem([0.0] * 3) or "")


# -- the policy update's size: KL(behaviour || current) ------------------------------------
def categorical_update(seed: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    old = rng.dirichlet(np.ones(30))
    new = old * np.exp(step * rng.standard_normal(30))
    return old, new / new.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_kl_covers_the_exact_kl_between_behaviour_and_current(seed: int) -> None:
    old, new = categorical_update(seed, 0.3)
    rng = np.random.default_rng(100 + seed)
    tokens = rng.choice(30, size=(64, 40), p=old)  # sampled by the behaviour policy
    behaviour = torch.tensor(np.log(old)[tokens], dtype=torch.float32)
    current = torch.tensor(np.log(new)[tokens], dtype=torch.float32)
    reference = current - 0.1  # any reference: the update KL does not involve it
    mon = Monitor(log_every_n_steps=1, rules=[])
    mon.update(current, reference, behaviour_logprobs=behaviour)
    res = mon.step(1)
    assert res is not None and res.summary.policy_update is not None
    up = res.summary.policy_update
    exact = float((old * np.log(old / new)).sum())  # KL(behaviour || current)
    assert abs(up.k3.mean - exact) < 4 * up.k3.stderr
    assert abs(up.k1.mean - exact) < 4 * up.k1.stderr
    assert up.tokens == tokens.size
    for key in ("kl/update/k3/mean", "kl/update/k3/stderr", "kl/update/tokens"):
        assert key in res.metrics


def test_update_kl_is_absent_without_behaviour_logprobs_and_rejects_bad_input() -> None:
    mon = Monitor(log_every_n_steps=1, rules=[])
    mon.update(torch.zeros(4), torch.zeros(4))
    res = mon.step(1)
    assert res is not None and res.summary.policy_update is None
    assert not any(k.startswith("kl/update/") for k in res.metrics)
    with pytest.warns(UserWarning, match="behaviour_logprobs were rejected"):
        mon.update(torch.zeros(4), torch.zeros(4), behaviour_logprobs=torch.zeros(3))
    res = mon.step(2)
    assert res is not None and res.summary.tokens == 4 and res.summary.policy_update is None


def test_update_size_rule_fires_on_a_large_update_and_stays_quiet_on_a_small_one() -> None:
    def run(step: float, seed: int) -> list[str]:
        old, new = categorical_update(seed, step)
        rng = np.random.default_rng(seed)
        tokens = rng.choice(30, size=(32, 32), p=old)
        mon = Monitor(log_every_n_steps=1, max_update_kl=0.02)
        cur = torch.tensor(np.log(new)[tokens], dtype=torch.float32)
        mon.update(cur, cur, behaviour_logprobs=torch.tensor(np.log(old)[tokens], dtype=torch.float32))
        res = mon.step(1)
        assert res is not None
        return [a.rule for a in res.alerts]

    exact_small = [
        float((o * np.log(o / n)).sum()) for o, n in (categorical_update(s, 0.05) for s in range(5))
    ]
    exact_large = [
        float((o * np.log(o / n)).sum()) for o, n in (categorical_update(s, 0.6) for s in range(5))
    ]
    assert max(exact_small) < 0.01 and min(exact_large) > 0.05
    assert all("update_size" not in run(0.05, s) for s in range(5))
    assert all("update_size" in run(0.6, s) for s in range(5))
    assert [r.name for r in default_rules(max_update_kl=0.1)][-1] == "update_size"
    with pytest.raises(ValueError, match="max_update_kl"):
        Monitor(rules=[], max_update_kl=0.1)


def test_update_size_rule_needs_significance() -> None:
    rule = UpdateSizeRule(0.05)
    mon = Monitor(log_every_n_steps=1, rules=[rule])
    g = torch.Generator().manual_seed(0)
    # Eight tokens whose update KL is just above the limit, with a large standard error: quiet.
    old = torch.zeros(8)
    new = torch.tensor([0.35, -0.3, 0.4, -0.35, 0.3, -0.4, 0.32, -0.33]) + 0 * torch.rand(8, generator=g)
    mon.update(new, new, behaviour_logprobs=old)
    res = mon.step(1)
    assert res is not None and res.summary.policy_update is not None
    up = res.summary.policy_update
    assert up.k3.mean > 0.05 and up.k3.mean - 0.05 < 2 * up.k3.stderr
    assert res.alerts == []
    assert math.isfinite(UpdateSizeRule(0.05, min_z=0).threshold)
