"""Monitor under faults: steps that go back, failing sinks, threads, wrong-kind checkpoints, copies.

Each test reproduces one fault of issue 20 (it failed before the fix) and checks the fix
against an independent count (tokens fed, steps logged, samples kept).
"""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from klmonitor import Monitor
from klmonitor.alerts import Alert, KLBudgetRule, SpikeRule
from klmonitor.monitor import STATE_VERSION, KLMonitorInputError
from klmonitor.sinks import Sink

ROOT = Path(__file__).resolve().parents[1]


def _batch(n: int = 8, shift: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    logp = -torch.linspace(0.5, 3.0, n)
    return logp, logp + shift


class Steps:
    """A callable sink recording the steps logged and the token counts."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.tokens: list[float] = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.steps.append(step)
        self.tokens.append(metrics["kl/tokens"])


# --------------------------------------------------------------------------------------------
# 2. step counters that go back
# --------------------------------------------------------------------------------------------
def test_epoch_local_step_counter_keeps_monitoring_with_one_warning() -> None:
    rec = Steps()
    mon = Monitor(log_every_n_steps=10, sinks=rec, histogram=False)
    with pytest.warns(UserWarning, match=r"went back from step 30 to step 1") as caught:
        for _epoch in range(3):
            for step in range(1, 31):
                mon.update(*_batch())
                mon.step(step)
    assert rec.steps == [10, 20, 30] * 3
    assert rec.tokens == [80.0] * 9  # 10 steps of 8 tokens each window: nothing lost
    assert sum("went back" in str(w.message) for w in caught) == 1


def test_state_far_ahead_then_steps_from_one_restarts_the_schedule() -> None:
    old = Monitor(log_every_n_steps=50)
    old.reset_window(5000)
    state = old.state_dict()
    assert state["last_logged_step"] == 5000
    rec = Steps()
    mon = Monitor(log_every_n_steps=50, sinks=rec, histogram=False)
    mon.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"went back from step 5000 to step 1.*reset_window"):
        for step in range(1, 201):
            mon.update(*_batch())
            mon.step(step)
    assert rec.steps == [50, 100, 150, 200]
    assert rec.tokens == [400.0] * 4


def test_repeated_step_is_not_a_restart() -> None:
    rec = Steps()
    mon = Monitor(log_every_n_steps=2, sinks=rec, histogram=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in (1, 1, 2, 2, 2, 3, 3, 4):
            mon.update(*_batch())
            mon.step(step)
    assert rec.steps == [2, 4]


def test_step_going_back_is_an_error_under_strict() -> None:
    mon = Monitor(log_every_n_steps=5, strict=True)
    for step in range(1, 6):
        mon.update(*_batch())
        mon.step(step)
    with pytest.raises(KLMonitorInputError, match="went back from step 5 to step 2"):
        mon.step(2)


# --------------------------------------------------------------------------------------------
# 3. failing sinks: every call guarded, whatever the class, also under warnings-as-errors
# --------------------------------------------------------------------------------------------
class RaisingSink(Sink):
    """A user sink whose every method raises."""

    def __init__(self) -> None:
        super().__init__(None)
        self.name = "RaisingSink"

    def setup(self, rule_names: Any) -> None:
        raise RuntimeError("setup broke")

    def log_scalars(self, metrics: Any, step: int) -> None:
        raise RuntimeError("scalars broke")

    def log_histogram(self, values: Any, step: int) -> None:
        raise RuntimeError("histogram broke")

    def log_table(self, name: str, columns: Any, rows: Any, step: int) -> None:
        raise RuntimeError("table broke")

    def log_alert(self, alert: Alert) -> None:
        raise RuntimeError("alert broke")

    def finalize(self) -> None:
        raise RuntimeError("finalize broke")


class RecordingSink(Sink):
    def __init__(self) -> None:
        super().__init__(None)
        self.calls: list[str] = []

    def setup(self, rule_names: Any) -> None:
        self.calls.append("setup")

    def log_scalars(self, metrics: Any, step: int) -> None:
        self.calls.append(f"scalars@{step}")

    def log_histogram(self, values: Any, step: int) -> None:
        self.calls.append(f"histogram@{step}")

    def log_table(self, name: str, columns: Any, rows: Any, step: int) -> None:
        self.calls.append(f"table:{name}@{step}")

    def log_alert(self, alert: Alert) -> None:
        self.calls.append(f"alert:{alert.rule}@{alert.step}")

    def finalize(self) -> None:
        self.calls.append("finalize")


def _run_with_failing_sink() -> tuple[Monitor, RecordingSink, list[Alert], list[Any]]:
    good = RecordingSink()
    fired: list[Alert] = []
    mon = Monitor(
        log_every_n_steps=2,
        sinks=[RaisingSink(), good],
        rules=[KLBudgetRule(0.0001, cooldown=0)],
        on_alert=fired.append,
    )  # the default diagnostics: by_position and top_sequences, one table each per window
    results = []
    for step in (1, 2, 3, 4):
        mon.update(*(t.reshape(2, 4) for t in _batch()))
        results.append(mon.step(step))
    mon.close()
    return mon, good, fired, results


def _assert_delivered(mon: Monitor, good: RecordingSink, fired: list[Alert], results: list[Any]) -> None:
    assert [r.step for r in results if r is not None] == [2, 4]
    assert good.calls == [
        "setup",
        "scalars@2",
        "histogram@2",
        "table:by_position@2",
        "table:top_sequences@2",
        "alert:kl_budget@2",
        "scalars@4",
        "histogram@4",
        "table:by_position@4",
        "table:top_sequences@4",
        "alert:kl_budget@4",
        "finalize",
    ]
    assert [a.step for a in fired] == [2, 4]
    assert mon.windows == 2


def test_user_sink_that_raises_loses_nothing_else() -> None:
    with pytest.warns(UserWarning) as caught:
        mon, good, fired, results = _run_with_failing_sink()
    _assert_delivered(mon, good, fired, results)
    messages = [str(w.message) for w in caught]
    for what in ("setup broke", "scalars broke", "histogram broke", "alert broke"):
        assert sum(what in m for m in messages) == 1, (what, messages)
    for table in ("by_position", "top_sequences"):  # once per kind of failure: per table
        assert sum(f"the {table} table (RuntimeError: table broke)" in m for m in messages) == 1, messages


def test_sink_guard_holds_under_warnings_as_errors(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon, good, fired, results = _run_with_failing_sink()
    _assert_delivered(mon, good, fired, results)
    assert "scalars broke" in caplog.text  # the note went to the log instead


def test_builtin_sink_guard_holds_under_warnings_as_errors(caplog: pytest.LogCaptureFixture) -> None:
    class Dead:
        def log_metrics(self, metrics: Any, step: int) -> None:
            raise OSError("tracker down")

    got: list[int] = []
    mon = Monitor(log_every_n_steps=1, sinks=[Dead(), lambda m, s: got.append(s)], histogram=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in (1, 2):
            mon.update(*_batch())
            assert mon.step(step) is not None
    assert got == [1, 2]
    assert "tracker down" in caplog.text


def test_sink_guard_holds_under_python_W_error(tmp_path: Path) -> None:
    script = tmp_path / "w_error.py"
    script.write_text(
        "import torch\n"
        "from klmonitor import Monitor\n"
        "from klmonitor.sinks import Sink\n"
        "class Bad(Sink):\n"
        "    def log_scalars(self, metrics, step):\n"
        "        raise RuntimeError('boom')\n"
        "class Dead:\n"
        "    def log_metrics(self, metrics, step):\n"
        "        raise OSError('down')\n"
        "got = []\n"
        "mon = Monitor(log_every_n_steps=1, sinks=[Bad(None), Dead(), lambda m, s: got.append(s)])\n"
        "for step in (1, 2, 3):\n"
        "    mon.update(torch.zeros(4), torch.full((4,), 0.1))\n"
        "    mon.step(step)\n"
        "mon.close()\n"
        "assert got == [1, 2, 3], got\n"
        "print('OK')\n"
    )
    env = {"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-W", "error", str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


# --------------------------------------------------------------------------------------------
# 4. threads: a rollout thread updates while the trainer thread steps
# --------------------------------------------------------------------------------------------
def test_threads_count_every_token_exactly() -> None:
    mon = Monitor(log_every_n_steps=1, histogram=True, histogram_samples=64)
    n_batches, sizes = 3000, (1, 7, 64, 5)
    expected = sum(sizes[i % len(sizes)] for i in range(n_batches))
    logged: list[float] = []
    done = threading.Event()

    def rollout() -> None:
        for i in range(n_batches):
            mon.update(*_batch(sizes[i % len(sizes)]))
        done.set()

    def trainer() -> None:
        step = 0
        while not done.is_set():
            step += 1
            res = mon.step(step)
            if res is not None:
                logged.append(res.summary.tokens)
        res = mon.flush(step + 1)
        if res is not None:
            logged.append(res.summary.tokens)

    threads = [threading.Thread(target=rollout), threading.Thread(target=trainer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert len(logged) > 10  # the windows really interleaved with the updates
    assert sum(logged) == expected


# --------------------------------------------------------------------------------------------
# 6. checkpoint states of the wrong kind, out of range, and the histogram ring
# --------------------------------------------------------------------------------------------
def _open_window_state(**kwargs: Any) -> dict[str, Any]:
    mon = Monitor(log_every_n_steps=100, **kwargs)
    for step in range(1, 11):
        mon.update(*(t.reshape(2, 4) for t in _batch()))
        mon.step(step)
    return mon.state_dict()


def test_state_version_is_bumped() -> None:
    assert _open_window_state()["version"] == STATE_VERSION >= 3


@pytest.mark.parametrize(
    ("saved", "loading"),
    [
        ({"level": "token"}, {"level": "sequence"}),
        ({"clamp": 20.0}, {}),
        ({"extreme": 5.0}, {}),
        ({"prefix": "a/"}, {"prefix": "b/"}),
        ({"by_position": True, "position_buckets": 6}, {"by_position": True, "position_buckets": 8}),
        ({"top_tokens": 3, "vocab_size": 50}, {"top_tokens": 3, "vocab_size": 60}),
    ],
)
def test_state_of_another_configuration_is_refused(saved: dict[str, Any], loading: dict[str, Any]) -> None:
    state = _open_window_state(**saved)
    mon = Monitor(log_every_n_steps=100, **loading)
    with pytest.warns(UserWarning, match="was made with") as caught:
        mon.load_state_dict(state)
    assert len([w for w in caught if "klmonitor" in str(w.message)]) == 1
    mon.update(*(t.reshape(2, 4) for t in _batch()))
    res = mon.flush(11)
    assert res is not None and res.summary.count == (2 if mon.level == "sequence" else 8)  # fresh
    strict = Monitor(log_every_n_steps=100, strict=True, **loading)
    with pytest.raises(KLMonitorInputError, match="was made with"):
        strict.load_state_dict(state)


def test_token_state_into_sequence_monitor_is_not_16x_off() -> None:
    state = _open_window_state(level="token")
    mon = Monitor(log_every_n_steps=100, level="sequence")
    with pytest.warns(UserWarning, match="level"):
        mon.load_state_dict(state)
    mon.update(*(t.reshape(2, 4) for t in _batch()))
    assert mon.flush(11).summary.count == 2  # two sequences, not 80 tokens + 2


def test_old_state_without_configuration_still_loads() -> None:
    state = _open_window_state()
    for key in ("config", "histogram"):
        state.pop(key)
    state["version"] = 2
    mon = Monitor(log_every_n_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.load_state_dict(state)
    assert mon.flush(10).summary.tokens == 80


@pytest.mark.parametrize("cooldown_left", [-1, 10**9, math.inf, math.nan, "3", True])
def test_rule_state_out_of_range_is_refused(cooldown_left: Any) -> None:
    def make(strict: bool = False) -> Monitor:
        return Monitor(rules=[KLBudgetRule(0.001, cooldown=3)], log_every_n_steps=1, strict=strict)

    state = make().state_dict()
    state["engine"]["rules"]["kl_budget"]["cooldown_left"] = cooldown_left
    mon = make()
    with pytest.warns(UserWarning, match="alert-engine state"):
        mon.load_state_dict(state)
    mon.update(*_batch())
    assert [a.rule for a in mon.step(1).alerts] == ["kl_budget"]  # the rule still fires
    with pytest.raises(KLMonitorInputError, match="alert-engine state"):
        make(strict=True).load_state_dict(state)


@pytest.mark.parametrize("bad", [math.inf, math.nan, -1])
def test_rule_streak_and_spike_history_out_of_range_is_refused(bad: float) -> None:
    mon = Monitor(rules=[SpikeRule()], log_every_n_steps=1)
    state = mon.state_dict()
    state["engine"]["rules"]["spike"]["history"] = [0.1, bad]
    if bad == -1:
        state["engine"]["rules"]["spike"]["history"] = [0.1]
        state["engine"]["rules"]["spike"]["streak"] = -1
    with pytest.warns(UserWarning, match="alert-engine state"):
        mon.load_state_dict(state)
    assert mon.rules[0].state_dict()["history"] == []


def _diag_monitor(strict: bool = False) -> Monitor:
    return Monitor(
        log_every_n_steps=100,
        by_position=True,
        position_buckets=4,
        top_sequences=2,
        top_sequences_max_len=4,
        top_tokens=2,
        vocab_size=10,
        strict=strict,
    )


def _diag_state() -> dict[str, Any]:
    mon = _diag_monitor()
    for step in range(1, 4):
        logp, ref = (t.reshape(2, 4) for t in _batch())
        mon.update(logp, ref, rollout_logprobs=logp - 0.05, token_ids=torch.arange(8).reshape(2, 4))
        mon.step(step)
    return mon.state_dict()


@pytest.mark.parametrize(
    ("part", "index", "value"),
    [
        ("TopTokens", 12, math.inf),  # a count
        ("TopTokens", 12, -3.0),  # a negative count
        ("TopTokens", 0, math.inf),  # a sum
        ("TopTokens", 20, 0.5),  # the out-of-vocabulary count, fractional
        ("PositionProfile", 5, -1.0),  # a token count
        ("PositionProfile", 0, math.inf),
        ("TopSequences", 1, math.inf),  # a row's token count
        ("TopSequences", 0, math.nan),  # a score
        ("TopSequences", 5, 99.0),  # a kept length above max_len
        ("RatioRange", 2, -1.0),  # tokens outside [0.5, 2]
        ("RatioRange", 0, math.nan),
    ],
)
def test_diagnostics_vectors_out_of_range_are_refused(part: str, index: int, value: float) -> None:
    state = _diag_state()
    state["diagnostics"][part][index] = value
    mon = _diag_monitor()
    with pytest.warns(UserWarning, match=part):
        mon.load_state_dict(state)
    res = mon.flush(4)  # the window starts empty: nothing to flush, nothing raised
    assert res is None
    with pytest.raises(KLMonitorInputError, match=part):
        _diag_monitor(strict=True).load_state_dict(state)


def test_diagnostics_state_round_trips_and_is_accepted_by_strict() -> None:
    state = _diag_state()
    mon = _diag_monitor(strict=True)
    mon.load_state_dict(state)
    assert mon.flush(4).summary.tokens == 24


def test_histogram_ring_survives_a_resume() -> None:
    torch.manual_seed(0)
    batches = [(-torch.rand(16), -torch.rand(16)) for _ in range(10)]

    def run(resume_at: int | None) -> np.ndarray:
        mon = Monitor(log_every_n_steps=10, histogram_samples=100)
        for step, b in enumerate(batches, 1):
            mon.update(*b)
            if step == resume_at:
                state = pickle.loads(pickle.dumps(mon.state_dict()))
                rng = mon._rng.getstate()
                mon = Monitor(log_every_n_steps=10, histogram_samples=100)
                mon.load_state_dict(state)
                mon._rng.setstate(rng)  # the same random offsets as the uninterrupted run
            res = mon.step(step)
        assert res is not None and res.histogram is not None
        return np.sort(res.histogram)

    whole, resumed = run(None), run(5)
    assert whole.size == 100
    np.testing.assert_array_equal(resumed, whole)


# --------------------------------------------------------------------------------------------
# 8. copies and meta masks
# --------------------------------------------------------------------------------------------
def test_monitor_with_summary_writer_can_be_pickled_and_deep_copied(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    got: list[int] = []
    writer = SummaryWriter(str(tmp_path))
    mon = Monitor(log_every_n_steps=1, sinks=[writer, _Appender(got)])
    mon.update(*_batch())
    for clone_fn in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        with pytest.warns(UserWarning, match="TensorBoardSink.*left out"):
            clone = clone_fn(mon)
        assert [type(s).__name__ for s in clone.sinks] == ["CallableSink"]
        assert [type(s).__name__ for s in mon.sinks] == ["TensorBoardSink", "CallableSink"]
        res = clone.step(1)
        assert res is not None and res.summary.tokens == 8
    assert mon.step(1).summary.tokens == 8  # the original is untouched
    writer.close()


class _Appender:
    """A picklable sink (a module-level class)."""

    def __init__(self, out: list[int]) -> None:
        self.out = out

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.out.append(step)


def test_meta_mask_gives_the_documented_value_error() -> None:
    mask = torch.ones(4, dtype=torch.bool, device="meta")
    with pytest.raises(KLMonitorInputError, match="meta") as info:
        Monitor(strict=True).update(torch.zeros(4), torch.zeros(4), mask)
    assert isinstance(info.value.__cause__, ValueError)
    assert not isinstance(info.value.__cause__, NotImplementedError)
