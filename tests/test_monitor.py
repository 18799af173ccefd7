"""Monitor, the framework-free core: window schedule, results, alerts, histogram, state, bad input."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from klmonitor import Monitor, WindowResult
from klmonitor.alerts import KLBudgetRule
from klmonitor.monitor import STATE_VERSION, KLMonitorInputError


def _batch(
    g: torch.Generator, shift: float = 0.05, shape: tuple[int, ...] = (4, 16)
) -> tuple[torch.Tensor, ...]:
    logp = -torch.rand(*shape, generator=g) * 4
    ref = logp + shift * torch.randn(*shape, generator=g)
    mask = torch.rand(*shape, generator=g) < 0.8
    return logp, ref, mask


def _reference(batches: list[tuple[torch.Tensor, ...]]) -> dict[str, float]:
    """Float64 numpy statistics of the valid tokens of ``batches`` (independent of klmonitor)."""
    lr = np.concatenate([(r.double() - lp.double()).numpy()[m.numpy()] for lp, r, m in batches])
    k1, k2, k3 = -lr, lr * lr / 2, np.expm1(lr) - lr
    return {
        "tokens": float(lr.size),
        "k1/mean": k1.mean(),
        "k2/mean": k2.mean(),
        "k3/mean": k3.mean(),
        "k3/std": k3.std(ddof=1),
        "k1/std": k1.std(ddof=1),
    }


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((step, metrics))


def test_windows_follow_steps_and_match_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    rec = Recorder()
    mon = Monitor(log_every_n_steps=3, sinks=rec)
    fed: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    results: dict[int, WindowResult] = {}
    for step in range(1, 8):
        for _ in range(2):  # gradient accumulation: two micro-batches per optimizer step
            b = _batch(g)
            fed.setdefault(step, []).append(b)
            mon.update(*b)
            assert mon.step(step - 1) is None or step - 1 in (3, 6)  # micro-batch before the optimizer step
        res = mon.step(step)
        assert mon.step(step) is None  # a second call at the same step does nothing
        if res is not None:
            results[step] = res
    last = mon.flush(7)
    assert sorted(results) == [3, 6] and last is not None and last.step == 7
    assert mon.flush(7) is None  # nothing since
    assert [s for s, _ in rec.calls] == [3, 6, 7]
    for (lo, hi), res in zip(((1, 3), (4, 6), (7, 7)), (results[3], results[6], last), strict=True):
        want = _reference([b for s in range(lo, hi + 1) for b in fed[s]])
        assert res.summary.tokens == want["tokens"]
        for key in ("k1/mean", "k2/mean", "k3/mean", "k3/std", "k1/std"):
            assert res.metrics[f"kl/{key}"] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key
        assert res.metrics == rec.calls[[3, 6, 7].index(res.step)][1]
    assert mon.windows == 3


def test_log_step_labels_the_window_and_its_alerts_but_not_the_schedule() -> None:
    # An adapter whose framework numbers its logs one step earlier (Lightning) passes log_step:
    # the windows still end at optimizer steps 3, 6 and the flush, as without it, with the same
    # statistics; the sinks, WindowResult.step and Alert.step get the adapter's numbers.
    g = torch.Generator().manual_seed(3)
    batches = [_batch(g, shift=0.3) for _ in range(7)]
    runs = {}
    for shifted in (False, True):
        rec = Recorder()
        mon = Monitor(log_every_n_steps=3, sinks=rec, rules=[KLBudgetRule(1e-6, cooldown=0)])
        ended = []
        for step, b in enumerate(batches, start=1):
            mon.update(*b)
            res = mon.step(step, log_step=step - 1) if shifted else mon.step(step)
            if res is not None:
                ended.append(res)
        last = mon.flush(7, log_step=6) if shifted else mon.flush(7)
        assert last is not None
        ended.append(last)
        runs[shifted] = (rec, ended, mon)
    (rec0, plain, mon0), (rec1, shifted_res, mon1) = runs[False], runs[True]
    assert [s for s, _ in rec0.calls] == [3, 6, 7] and [r.step for r in plain] == [3, 6, 7]
    assert [s for s, _ in rec1.calls] == [2, 5, 6] and [r.step for r in shifted_res] == [2, 5, 6]
    assert [r.metrics for r in shifted_res] == [r.metrics for r in plain]
    assert [a.step for a in mon1.alert_history] == [2, 5, 6] and len(mon0.alert_history) == 3
    assert mon1.state_dict()["last_logged_step"] == mon0.state_dict()["last_logged_step"] == 7
    with pytest.raises(ValueError, match="log_step"):
        mon1.step(8, log_step=-1)


def test_alerts_stop_and_on_alert() -> None:
    got: list[Any] = []
    mon = Monitor(log_every_n_steps=1, max_kl=1e-4, stop_on="kl_budget", on_alert=got.append)
    g = torch.Generator().manual_seed(1)
    mon.update(*_batch(g, shift=0.5))
    res = mon.step(1)
    # initial_kl speaks too (a first window far from the reference); kl_budget is the stop rule.
    assert res is not None and res.stop and [a.rule for a in res.alerts] == ["initial_kl", "kl_budget"]
    assert got == res.alerts == mon.alert_history
    quiet = Monitor(log_every_n_steps=1, rules=[KLBudgetRule(10.0)])
    quiet.update(*_batch(g))
    res = quiet.step(1)
    assert res is not None and not res.stop and res.alerts == []


def test_histogram_holds_valid_log_ratios_of_the_window() -> None:
    mon = Monitor(log_every_n_steps=4, histogram_samples=10)
    g = torch.Generator().manual_seed(2)
    seen: set[float] = set()
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.float16):
        logp, ref, mask = _batch(g, shape=(3, 7))
        logp, ref = logp.to(dtype), ref.to(dtype)
        lr = ref.float() - logp.float()
        seen |= {float(v) for v in lr[mask]}
        mon.update(logp, ref.requires_grad_(dtype != torch.bfloat16 and dtype != torch.float16), mask)
    res = mon.flush(3)
    assert res is not None and res.histogram is not None
    assert 0 < res.histogram.size <= 10 and all(float(v) in seen for v in res.histogram)
    off = Monitor(log_every_n_steps=4, histogram=False)
    off.update(*_batch(g))
    flushed = off.flush(1)
    assert flushed is not None and flushed.histogram is None


def test_state_dict_resumes_mid_window_exactly() -> None:
    g = torch.Generator().manual_seed(3)
    batches = [_batch(g) for _ in range(7)]
    whole = Monitor(log_every_n_steps=3, rules=[KLBudgetRule(1e-4, cooldown=1)])
    first = Monitor(log_every_n_steps=3, rules=[KLBudgetRule(1e-4, cooldown=1)])
    out_whole, out_resumed = [], []
    for step, b in enumerate(batches, 1):
        whole.update(*b)
        out_whole.append(whole.step(step))
        if step <= 4:
            first.update(*b)
            out_resumed.append(first.step(step))
    second = Monitor(log_every_n_steps=3, rules=[KLBudgetRule(1e-4, cooldown=1)])
    second.load_state_dict(first.state_dict())
    for step, b in enumerate(batches[4:], 5):
        second.update(*b)
        out_resumed.append(second.step(step))
    for a, b in zip(out_whole, out_resumed, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.metrics == pytest.approx(b.metrics, rel=1e-12) and a.alerts == b.alerts
    assert second.alert_history == whole.alert_history


def _good_state() -> dict[str, Any]:
    mon = Monitor(log_every_n_steps=3)
    mon.update(*_batch(torch.Generator().manual_seed(4)))
    mon.step(1)
    return mon.state_dict()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: ["not", "a", "dict"],
        lambda s: None,
        lambda s: {**s, "version": STATE_VERSION + 97},
        lambda s: {**s, "version": "2"},
        lambda s: {k: v for k, v in s.items() if k != "version"},
        lambda s: {**s, "window": [math.nan] * len(s["window"])},
        lambda s: {**s, "window": [-5.0, *s["window"][1:]]},
        lambda s: {**s, "window": s["window"][:5]},
        lambda s: {**s, "window": "17 numbers"},
        lambda s: {**s, "last_logged_step": -3},
        lambda s: {**s, "windows": 2.5},
        lambda s: {**s, "engine": {"rules": {"drift": {"streak": "many"}}, "history": []}},
        lambda s: {**s, "engine": {"rules": {}, "history": [{"rule": "x"}]}},
        lambda s: {k: v for k, v in s.items() if k != "window"},
    ],
)
def test_bad_checkpoint_state_warns_once_and_starts_fresh(corrupt: Any) -> None:
    state = corrupt(_good_state())
    mon = Monitor(log_every_n_steps=3)
    with pytest.warns(UserWarning, match="checkpoint's monitor state was not loaded"):
        mon.load_state_dict(state)
    g = torch.Generator().manual_seed(5)
    b = _batch(g)
    mon.update(*b)
    res = mon.step(3)  # a fresh window: exactly this batch, finite numbers
    assert res is not None and res.summary.tokens == _reference([b])["tokens"]
    assert res.metrics["kl/k3/mean"] == pytest.approx(_reference([b])["k3/mean"], rel=1e-5)
    assert all(math.isfinite(v) for v in res.metrics.values())
    strict = Monitor(log_every_n_steps=3, strict=True)
    with pytest.raises(KLMonitorInputError, match="not loaded"):
        strict.load_state_dict(state)


def test_version_one_state_of_the_old_callback_loads() -> None:
    state = {**_good_state(), "version": 1}
    mon = Monitor(log_every_n_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.load_state_dict(state)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.zeros(4, device="meta"), torch.zeros(4, device="meta")), "meta"),
        (lambda: (torch.zeros(4).to(torch.float8_e4m3fn), torch.zeros(4).to(torch.float8_e4m3fn)), "float8"),
        (lambda: (torch.zeros(4, dtype=torch.complex64), torch.zeros(4, dtype=torch.complex64)), "dtype"),
        (lambda: (torch.zeros(4, dtype=torch.int64), torch.zeros(4)), "dtype"),
        (lambda: (torch.zeros(4), torch.zeros(5)), "shape"),
        (lambda: ([0.0], torch.zeros(1)), "Tensor"),
    ],
)
def test_bad_input_is_skipped_with_one_warning_and_the_window_intact(make: Any, match: str) -> None:
    g = torch.Generator().manual_seed(6)
    good = _batch(g)
    mon = Monitor(log_every_n_steps=10)
    mon.update(*good)
    with pytest.warns(UserWarning, match=match):
        mon.update(*make())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.update(*make())  # the same kind again: silent
    res = mon.flush(2)
    assert res is not None and res.summary.tokens == _reference([good])["tokens"]
    assert res.metrics["kl/k3/mean"] == pytest.approx(_reference([good])["k3/mean"], rel=1e-5)
    strict = Monitor(strict=True)
    with pytest.raises(KLMonitorInputError, match=match):
        strict.update(*make())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"histogram_samples": 2.5}, TypeError, "histogram_samples"),
        ({"histogram_samples": True}, TypeError, "histogram_samples"),
        ({"histogram_samples": 0}, ValueError, "histogram_samples"),
        ({"histogram": "yes"}, TypeError, "histogram"),
        ({"strict": 1}, TypeError, "strict"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
        ({"log_every_n_steps": 2.0}, TypeError, "log_every_n_steps"),
        ({"alert_history_size": 0}, ValueError, "alert_history_size"),
        ({"prefix": 3}, TypeError, "prefix"),
        ({"max_kl": -1}, ValueError, "max_kl"),
        ({"max_kl": 0.1, "rules": []}, ValueError, "either rules"),
        ({"stop_on": ("nope",)}, ValueError, "stop_on"),
        ({"on_alert": [print, 3]}, TypeError, "on_alert"),
        ({"level": "word"}, ValueError, "level"),
        ({"clamp": 0}, ValueError, "clamp"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"rank": -1}, ValueError, "rank"),
        ({"sinks": [42]}, TypeError, "sinks"),
        ({"wandb_alert_wait_s": math.inf}, ValueError, "wandb_alert_wait_s"),
    ],
)
def test_constructor_validates_every_argument(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Monitor(**kwargs)


def test_only_rank_zero_writes_and_no_sink_goes_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    other = Monitor(log_every_n_steps=1, sinks=rec, rank=1)
    other.update(*_batch(torch.Generator().manual_seed(7)))
    assert other.step(1) is not None and rec.calls == []
    alone = Monitor(log_every_n_steps=1)
    with caplog.at_level(logging.INFO, logger="klmonitor"):
        for step in (1, 2):
            alone.update(*_batch(torch.Generator().manual_seed(step)))
            alone.step(step)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("no sink attached" in line for line in lines) == 1
    assert sum(line.startswith("klmonitor step") for line in lines) == 2


def test_empty_window_warns_and_reset_window_starts_over() -> None:
    mon = Monitor(log_every_n_steps=2)
    mon.update(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    with pytest.warns(UserWarning, match="no valid tokens"):
        res = mon.step(2)
    assert res is not None and res.summary.tokens == 0
    mon.update(*_batch(torch.Generator().manual_seed(8)))
    mon.reset_window()
    assert mon.flush(5) is None  # the batch was dropped with the window
    mon.update(*_batch(torch.Generator().manual_seed(8)))
    assert mon.step(1) is None and mon.step(2) is not None  # schedule restarted at 0


def test_clamp_and_extreme_reach_both_windows_and_the_logs() -> None:
    # Monitor(extreme=, clamp=) configures the main and the rollout statistics alike; the count
    # is logged as kl/extreme and the tokens keep their exact values without a clamp.
    logged: list[dict[str, float]] = []
    mon = Monitor(log_every_n_steps=1, extreme=5.0, sinks=lambda metrics, step: logged.append(metrics))
    assert mon.stats.extreme == mon.rollout_stats.extreme == 5.0
    assert mon.stats.clamp is None and mon.rollout_stats.clamp is None
    logp = torch.zeros(4)
    ref = torch.tensor([0.0, -6.0, 7.0, -40.0])
    mon.update(logp, ref, rollout_logprobs=logp + torch.tensor([0.0, 0.0, 0.0, 6.0]))
    res = mon.step(1)
    assert res is not None
    assert res.summary.extreme == 3 and logged[-1]["kl/extreme"] == 3.0
    assert res.summary.rollout is not None and res.summary.rollout.kl.extreme == 1
    want = (math.expm1(-6.0) + 6.0 + math.expm1(7.0) - 7.0 + math.expm1(-40.0) + 40.0) / 4
    assert res.summary.k3.mean == pytest.approx(want, rel=1e-6)
    clamped = Monitor(log_every_n_steps=1, clamp=10.0, sinks=[])
    assert clamped.stats.clamp == clamped.rollout_stats.clamp == 10.0
