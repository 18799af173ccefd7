"""Reliability: hostile inputs, failing trackers, resumption and long runs.

* KLStats under hypothesis: every shape, dtype, mask form and value (huge log-ratios, NaN,
  +-inf) gives consistent counts, finite logged values and the statistics of the finite,
  valid tokens only (an independent float64 numpy reference); shape/dtype errors raise
  ``ValueError``/``TypeError`` with a message naming the problem and leave the window intact.
* KLMonitor in a real Trainer fed random bad outputs (seeded): training finishes, each kind
  of problem warns once, every logged scalar is finite, non-finite tokens are counted;
  ``strict=True`` raises naming the problem.
* Failing trackers (W&B alert API, W&B disabled, a logger that raises) never stop training
  and never starve the other loggers.
* Resuming from a checkpoint (mid-window, or exactly on a logging step) alerts and logs like
  an uninterrupted run.
* Long runs keep memory flat and the alert history bounded.
"""

from __future__ import annotations

import gc
import math
import os
import random
import re
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from toy_models import ToyPolicy, make_trainer

from klmonitor import KLMonitor, KLStats
from klmonitor.alerts import AlertEngine, DriftRule, KLBudgetRule, SpikeRule, default_rules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning.*")

QUANTITIES = ("k1", "k2", "k3", "kl_pq", "r_minus_1", "k2_minus_k3")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CLAMP = 20.0


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _events(logdir: Path) -> EventAccumulator:
    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no event files under {logdir}"
    acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _all_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    acc = _events(logdir)
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("klmonitor")]


def _rss_mib() -> float:
    """Resident set size now, from /proc/self/statm (Linux), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def np_quantities(l: np.ndarray) -> dict[str, np.ndarray]:
    """The six per-sample quantities of float64 log-ratios (Taylor series near 0)."""
    small = np.abs(l) < 1e-2
    fact = [math.factorial(n) for n in range(11)]
    em1 = np.expm1(l)
    k2 = 0.5 * l * l
    k3 = np.where(small, sum(l**n / fact[n] for n in range(2, 11)), em1 - l)
    kl_pq = np.where(small, sum((n - 1) * l**n / fact[n] for n in range(2, 11)), np.exp(l) * l - em1)
    diff = np.where(small, -sum(l**n / fact[n] for n in range(3, 11)), k2 - k3)
    return {"k1": -l, "k2": k2, "k3": k3, "kl_pq": kl_pq, "r_minus_1": em1, "k2_minus_k3": diff}


def reference(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None, level: str) -> dict[str, Any]:
    """What KLStats must report, from the inputs as float64 (independent of klmonitor)."""
    lr = ref.double().numpy() - logp.double().numpy()
    valid = np.ones(lr.shape, bool) if mask is None else mask.double().numpy() != 0
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(lr)
    good = valid & finite
    lz = np.where(good, lr, 0.0)
    q = np_quantities(np.clip(lz, -CLAMP, CLAMP))
    if level == "token":
        samples = {k: v[good] for k, v in q.items()}
    else:
        rows = good.any(-1)
        samples = {k: (v * good).sum(-1)[rows] for k, v in q.items()}
    return {
        "valid": int(valid.sum()),
        "tokens": int(good.sum()),
        "nonfinite": int((valid & ~finite).sum()),
        "extreme": int((np.abs(lz) > CLAMP).sum()),
        "max_abs": float(np.abs(lz).max()) if lz.size else 0.0,
        "count": int(samples["k1"].size),
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------
# 1. KLStats under hypothesis
# --------------------------------------------------------------------------------------------
# How a token's (logp, ref) pair is made; "huge" log-ratios are about +-1e4 (clamped and
# counted), "+inf"/"-inf"/"nan" give non-finite log-ratios (counted and kept out).
TOKEN_KINDS = (
    "normal",
    "normal",
    "normal",
    "equal",
    "huge_pos",
    "huge_neg",
    "nan",
    "pos_inf_ref",
    "neg_inf_ref",
    "neg_inf_logp",
    "neg_inf_both",
)
MASK_FORMS = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32)


@st.composite
def hostile_batches(draw: Any) -> dict[str, Any]:
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):
        shape: tuple[int, ...] = (draw(st.integers(0, 6)), draw(st.integers(0, 9)))
        level = draw(st.sampled_from(("token", "sequence")))
    else:
        shape = (draw(st.integers(0, 48)),)
        level = "token"
    n = math.prod(shape)
    kinds = draw(st.lists(st.sampled_from(TOKEN_KINDS), min_size=n, max_size=n))
    base = draw(st.lists(st.floats(-12.0, 0.0), min_size=n, max_size=n))
    delta = draw(st.lists(st.floats(-3.0, 3.0), min_size=n, max_size=n))
    logp, ref = [], []
    for kind, b, d in zip(kinds, base, delta, strict=True):
        lp, rp = b, b + d
        if kind == "equal":
            rp = lp
        elif kind == "huge_pos":
            lp = -1e4
        elif kind == "huge_neg":
            rp = -1e4
        elif kind == "nan":
            rp = math.nan
        elif kind == "pos_inf_ref":
            rp = math.inf
        elif kind == "neg_inf_ref":
            rp = -math.inf
        elif kind == "neg_inf_logp":
            lp = -math.inf
        elif kind == "neg_inf_both":
            lp = rp = -math.inf
        logp.append(lp)
        ref.append(rp)
    logp_t = torch.tensor(logp, dtype=torch.float64).reshape(shape).to(dtype)
    ref_t = torch.tensor(ref, dtype=torch.float64).reshape(shape).to(dtype)
    mask_kind = draw(st.sampled_from(("none", "all", "empty", "random")))
    mask: torch.Tensor | None = None
    if mask_kind != "none":
        if mask_kind == "random":
            bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        else:
            bits = [mask_kind == "all"] * n
        mask = torch.tensor(bits, dtype=torch.bool).reshape(shape).to(draw(st.sampled_from(MASK_FORMS)))
    return {"logp": logp_t, "ref": ref_t, "mask": mask, "level": level}


def _assert_matches_reference(s: Any, want: dict[str, Any], dtype: torch.dtype) -> None:
    assert s.tokens == want["tokens"]
    assert s.nonfinite == want["nonfinite"]
    assert s.tokens + s.nonfinite == want["valid"]
    assert s.extreme == want["extreme"]
    assert s.count == want["count"]
    assert s.max_abs_log_ratio == pytest.approx(want["max_abs"], rel=1e-6, abs=1e-30)
    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    for name in QUANTITIES:
        got = getattr(s, name)
        x = want["samples"][name]
        if x.size == 0:
            assert math.isnan(got.mean)
            continue
        scale = float(np.abs(x).max())
        assert abs(got.mean - x.mean()) <= rtol * scale + 1e-30, (name, got.mean, x.mean())
        if x.size > 1:
            assert abs(got.var - x.var(ddof=1)) <= 4 * rtol * scale * scale + 1e-30, (name, got.var)
        else:
            assert math.isnan(got.var)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@settings(max_examples=80)
@given(batch=hostile_batches())
def test_property_hostile_inputs_give_the_statistics_of_the_finite_valid_tokens(
    backend: str, batch: dict[str, Any]
) -> None:
    logp, ref, mask, level = batch["logp"], batch["ref"], batch["mask"], batch["level"]
    stats = KLStats(level=level, backend=backend, clamp=CLAMP)
    stats.update(logp, ref, mask)
    s = stats.compute()
    want = reference(logp, ref, mask, level)
    _assert_matches_reference(s, want, logp.dtype)
    d = s.to_dict()
    assert all(math.isfinite(v) for v in d.values()), d
    assert d["kl/tokens"] == want["tokens"] and d["kl/nonfinite"] == want["nonfinite"]
    assert d["kl/extreme"] == want["extreme"]
    assert ("kl/k3/mean" in d) == (want["count"] > 0)
    assert ("kl/k3/std" in d) == (want["count"] > 1)
    if want["count"]:
        assert s.k2.mean >= 0 and s.k3.mean >= 0 and s.kl_pq.mean >= 0
    # Streaming the same tokens in two updates gives the same window.
    if logp.dim() == 1 and logp.numel() > 1 and level == "token":
        half = logp.numel() // 2
        split = KLStats(backend=backend, clamp=CLAMP)
        for sl in (slice(0, half), slice(half, None)):
            split.update(logp[sl], ref[sl], None if mask is None else mask[sl])
        _assert_matches_reference(split.compute(), want, logp.dtype)


BAD_DTYPES = (torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64)


@st.composite
def invalid_updates(draw: Any) -> tuple[str, dict[str, Any], type[Exception], list[str]]:
    """A bad ``update`` call: (level, kwargs, the exception type, fragments its message must hold)."""
    n = draw(st.integers(1, 6))
    t = draw(st.integers(1, 6))
    good = torch.zeros(n, t)
    case = draw(
        st.sampled_from(
            ("int_logp", "int_ref", "shape", "mask_shape", "mask_type", "not_tensor", "scalar", "seq_1d")
        )
    )
    if case in ("int_logp", "int_ref"):
        dtype = draw(st.sampled_from(BAD_DTYPES))
        bad = torch.zeros(n, t, dtype=dtype)
        which = "logprobs" if case == "int_logp" else "ref_logprobs"
        kwargs = {"logprobs": good, "ref_logprobs": good, which: bad}
        return "token", kwargs, TypeError, [which, str(dtype), "floating-point"]
    if case == "shape":
        other = (n, t + draw(st.integers(1, 3)))
        ref = torch.zeros(other)
        return "token", {"logprobs": good, "ref_logprobs": ref}, ValueError, [str((n, t)), str(other)]
    if case == "mask_shape":
        mask = torch.ones(n + draw(st.integers(1, 3)), t, dtype=torch.bool)
        return (
            "token",
            {"logprobs": good, "ref_logprobs": good, "mask": mask},
            ValueError,
            ["mask", str(tuple(mask.shape)), str((n, t))],
        )
    if case == "mask_type":
        mask = draw(st.sampled_from((np.ones((n, t)), [[1] * t] * n, 1)))
        return "token", {"logprobs": good, "ref_logprobs": good, "mask": mask}, TypeError, ["mask"]
    if case == "not_tensor":
        which = draw(st.sampled_from(("logprobs", "ref_logprobs")))
        value = draw(st.sampled_from((np.zeros((n, t)), [[0.0] * t] * n, 0.5, None)))
        kwargs = {"logprobs": good, "ref_logprobs": good, which: value}
        return "token", kwargs, TypeError, [which, "torch.Tensor"]
    if case == "scalar":
        return (
            "token",
            {"logprobs": torch.tensor(-1.0), "ref_logprobs": torch.tensor(-1.0)},
            ValueError,
            ["scalar"],
        )
    flat = torch.zeros(n * t)
    return "sequence", {"logprobs": flat, "ref_logprobs": flat}, ValueError, ["level='sequence'", "[B, T]"]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@settings(max_examples=40)
@given(bad=invalid_updates())
def test_property_invalid_update_raises_clearly_and_leaves_the_window_intact(
    backend: str, bad: tuple[str, dict[str, Any], type[Exception], list[str]]
) -> None:
    level, kwargs, exc_type, fragments = bad
    stats = KLStats(level=level, backend=backend)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.0]])
    ref = logp + torch.tensor([[0.1, -0.2, 0.0], [0.05, 0.3, -0.1]])
    stats.update(logp, ref)
    before = stats.compute()
    with pytest.raises(exc_type) as info:
        stats.update(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    after = stats.compute()
    assert after == before, "a rejected update must not change the window"


# --------------------------------------------------------------------------------------------
# 2. KLMonitor fed random bad outputs in a real Trainer
# --------------------------------------------------------------------------------------------
# accepted: counted (possibly with non-finite tokens) | rejected: warned once per kind, skipped
CHAOS_KINDS = {
    "nan": "accepted",
    "inf": "accepted",
    "all_masked": "accepted",
    "float_mask": "accepted",
    "no_mask": "accepted",
    "bf16": "accepted",
    "empty": "accepted",
    "shape": "rejected",
    "mask_shape": "rejected",
    "int": "rejected",
    "missing": "rejected",
    "list": "rejected",
}
# the warning each rejected kind must produce (and the strict-mode message)
CHAOS_MESSAGES = {
    "shape": r"ref_logprobs has shape",
    "mask_shape": r"mask has shape",
    "int": r"dtype torch\.int64",
    "missing": r"has no \['ref_logprobs'\]",
    "list": r"must be a torch\.Tensor",
}
# warn-once kinds: the same kind of problem (e.g. any rejected ValueError) warns once
WARNING_CLASSES = {
    "update:ValueError": r"rejected: (ref_logprobs|mask|logprobs) has shape",
    "update:TypeError": r"rejected: .*(dtype|must be a torch\.Tensor)",
    "missing-keys": r"has no \[",
    "empty-window": r"no valid tokens in the window",
}


def corrupt(kind: str, out: dict[str, Any]) -> dict[str, Any]:
    """Apply one kind of bad output to a ToyPolicy training_step output."""
    logp, ref, mask = out["logprobs"], out["ref_logprobs"], out["mask"]
    if kind == "nan":
        bad = ref.detach().clone()
        bad[0, 0] = math.nan
        out["ref_logprobs"] = bad
    elif kind == "inf":
        bad = logp.detach().clone()
        bad[0, 1] = -math.inf  # log-ratio +inf
        bad[1, 2] = math.inf  # log-ratio -inf
        out["logprobs"] = bad
        out["mask"] = torch.ones_like(mask)
    elif kind == "all_masked":
        out["mask"] = torch.zeros_like(mask)
    elif kind == "float_mask":
        out["mask"] = mask.float()
    elif kind == "no_mask":
        del out["mask"]
    elif kind == "bf16":
        out["logprobs"], out["ref_logprobs"] = logp.bfloat16(), ref.bfloat16()
    elif kind == "empty":
        out["logprobs"], out["ref_logprobs"], out["mask"] = logp[:0], ref[:0], mask[:0]
    elif kind == "shape":
        out["ref_logprobs"] = ref[:, :-1]
    elif kind == "mask_shape":
        out["mask"] = mask[:-1]
    elif kind == "int":
        out["logprobs"] = torch.zeros(logp.shape, dtype=torch.int64)
    elif kind == "missing":
        del out["ref_logprobs"]
    elif kind == "list":
        out["logprobs"] = logp.detach().tolist()
    return out


class ChaosPolicy(ToyPolicy):
    """ToyPolicy whose output is, on each step with probability ``p_bad``, a random bad kind.

    The choice is seeded by (chaos_seed, step), so a run is reproducible. ``fed`` records what
    the monitor was given on accepted steps (the bad values included).
    """

    def __init__(self, chaos_seed: int, p_bad: float = 0.5, kinds: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(record=False, **kw)
        self.chaos_seed, self.p_bad = chaos_seed, p_bad
        self.kinds = kinds or tuple(CHAOS_KINDS)
        self.fed: list[dict[str, Any]] = []
        self.kinds_seen: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        rng = random.Random(self.chaos_seed * 1_000_003 + int(self.global_step))
        kind = rng.choice(self.kinds) if rng.random() < self.p_bad else "ok"
        self.kinds_seen.append(kind)
        out = corrupt(kind, out)
        if CHAOS_KINDS.get(kind, "accepted") == "accepted":
            mask = out.get("mask")
            self.fed.append(
                {
                    "step": int(self.global_step),
                    "logp": out["logprobs"].detach().clone(),
                    "ref": out["ref_logprobs"].detach().clone(),
                    "mask": None if mask is None else mask.clone(),
                }
            )
        return out


def _window_reference(fed: list[dict[str, Any]], lo: int, hi: int) -> dict[str, Any]:
    lrs, nonfinite = [], 0
    for rec in fed:
        if lo <= rec["step"] < hi:
            want = reference(rec["logp"], rec["ref"], rec["mask"], "token")
            nonfinite += want["nonfinite"]
            lrs.append(-want["samples"]["k1"])  # the finite, valid log-ratios
    lr = np.concatenate(lrs) if lrs else np.zeros(0)
    return {"tokens": lr.size, "nonfinite": nonfinite, "k3": np_quantities(lr)["k3"]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bad_outputs_training_finishes_warns_once_per_kind(tmp_path: Path, seed: int) -> None:
    steps, every = 36, 3
    model = ChaosPolicy(seed, p_bad=0.6, lr=0.5)
    mon = KLMonitor(log_every_n_steps=every)
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, steps, loggers=[tb], callbacks=[mon])
        trainer.fit(model)
    assert trainer.global_step == steps
    seen = Counter(model.kinds_seen)
    assert sum(n for k, n in seen.items() if k != "ok") >= steps // 3, seen

    # each kind of problem warns once at most; each rejected kind that happened is named
    messages = _ours(caught)
    classes = Counter()
    for msg in messages:
        matched = [c for c, pattern in WARNING_CLASSES.items() if re.search(pattern, msg)]
        assert len(matched) == 1, msg
        classes[matched[0]] += 1
    assert all(n == 1 for n in classes.values()), messages
    if seen["missing"]:
        assert classes["missing-keys"] == 1
    if seen["int"] or seen["list"]:
        assert classes["update:TypeError"] == 1
    if seen["shape"] or seen["mask_shape"]:
        assert classes["update:ValueError"] == 1

    # every window logged, every scalar finite, the window statistics those of the accepted steps
    scalars = _all_scalars(Path(tb.log_dir))
    # the window (hi - every, hi] is logged at hi - 1: Lightning's step for its last batch
    assert sorted(scalars["kl/tokens"]) == list(range(every - 1, steps, every))
    assert all(math.isfinite(v) for series in scalars.values() for v in series.values())
    for hi in range(every, steps + 1, every):
        want = _window_reference(model.fed, hi - every, hi)
        assert scalars["kl/tokens"][hi - 1] == want["tokens"], hi
        assert scalars["kl/nonfinite"][hi - 1] == want["nonfinite"], hi
        if want["tokens"]:
            assert scalars["kl/k3/mean"][hi - 1] == pytest.approx(want["k3"].mean(), rel=2e-3, abs=1e-7), hi
        else:
            assert "kl/k3/mean" not in scalars or hi - 1 not in scalars["kl/k3/mean"]
    if seen["nan"] or seen["inf"]:
        assert sum(scalars["kl/nonfinite"].values()) > 0
        assert "nonfinite" in {a.rule for a in mon.alert_history}


STRICT_CASES = {
    **CHAOS_MESSAGES,
    "nan": r"NaN or infinite",
    "inf": r"NaN or infinite",
    "all_masked": r"no valid tokens",
}


@pytest.mark.parametrize("kind", sorted(STRICT_CASES))
def test_strict_raises_naming_the_problem(tmp_path: Path, kind: str) -> None:
    mon = KLMonitor(log_every_n_steps=2, strict=True)
    model = ChaosPolicy(0, p_bad=1.0, kinds=(kind,))
    with pytest.raises((ValueError, TypeError), match=STRICT_CASES[kind]) as info:
        make_trainer(tmp_path, 4, callbacks=[mon]).fit(model)
    assert str(info.value).startswith("klmonitor")


def test_strict_raises_when_extract_fails(tmp_path: Path) -> None:
    def extract(outputs: Any, batch: Any, module: Any) -> Any:
        return outputs["logprobs"], outputs["ref_logprobs"]  # two values, not three

    mon = KLMonitor(log_every_n_steps=2, strict=True, extract=extract)
    with pytest.raises(ValueError, match=r"extract\(outputs, batch, pl_module\) failed"):
        make_trainer(tmp_path, 2, callbacks=[mon]).fit(ToyPolicy())
    lenient = KLMonitor(log_every_n_steps=2, extract=extract)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, 6, callbacks=[lenient])
        trainer.fit(ToyPolicy())
    assert trainer.global_step == 6
    ours = _ours(caught)
    assert sum("extract" in m for m in ours) == 1, ours


# --------------------------------------------------------------------------------------------
# 3. failing trackers
# --------------------------------------------------------------------------------------------
class FlakyLogger(Logger):
    """A logger whose ``log_metrics`` raises on every other call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.received: list[int] = []

    @property
    def name(self) -> str:
        return "flaky"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls += 1
        if self.calls % 2 == 0:
            raise ConnectionError("tracker unreachable")
        self.received.append(int(step or 0))


class DyingLogger(FlakyLogger):
    """A logger whose tracker dies mid-run: from then on ``log_metrics`` and ``experiment`` raise."""

    def __init__(self) -> None:
        super().__init__()
        self.dead = False

    @property
    def experiment(self) -> Any:
        if self.dead:
            raise ConnectionError("tracker is gone")
        return SimpleNamespace(flush=lambda: None)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.dead = True
        raise ConnectionError("tracker is gone")


def test_flaky_logger_and_broken_tensorboard_extras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = FlakyLogger()
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tb.experiment, "add_histogram", broken)
    monkeypatch.setattr(tb.experiment, "add_text", broken)
    mon = KLMonitor(log_every_n_steps=2, rules=[KLBudgetRule(1e-9, cooldown=0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, 12, loggers=[flaky, tb], callbacks=[mon])
        trainer.fit(ToyPolicy(lr=1.0))
    assert trainer.global_step == 12
    ours = _ours(caught)
    assert sum("tracker unreachable" in m for m in ours) == 1, ours
    assert sum("log a histogram" in m for m in ours) == 1, ours
    assert sum("log an alert" in m for m in ours) == 1, ours
    # add_text also carries the default diagnostics' tables: one warning per table.
    assert sum("log the by_position table" in m for m in ours) == 1, ours
    assert sum("log the top_sequences table" in m for m in ours) == 1, ours
    assert len(ours) == 5, ours
    assert flaky.received == [1, 5, 9]  # the calls that got through
    assert sorted(_all_scalars(Path(tb.log_dir))["kl/k3/mean"]) == [1, 3, 5, 7, 9, 11]
    assert len(mon.alert_history) == 6


def test_tracker_dying_mid_run_does_not_kill_training(tmp_path: Path) -> None:
    dying = DyingLogger()
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    mon = KLMonitor(log_every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, 6, loggers=[tb, dying], callbacks=[mon])
        trainer.fit(ToyPolicy())
    assert trainer.global_step == 6
    assert sum("tracker is gone" in m for m in _ours(caught)) >= 1
    assert sorted(_all_scalars(Path(tb.log_dir))["kl/k3/mean"]) == [1, 3, 5]


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield wandb
    wandb.finish()


def test_wandb_alert_api_raising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wandb_env: Any) -> None:
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="klmonitor-test")
    run = logger.experiment
    attempts: list[dict[str, Any]] = []

    def alert(**kwargs: Any) -> None:
        attempts.append(kwargs)
        raise RuntimeError("alert API: 503 Service Unavailable")

    monkeypatch.setattr(run, "alert", alert)
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    mon = KLMonitor(log_every_n_steps=2, rules=[KLBudgetRule(1e-9, cooldown=0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, 8, loggers=[logger, tb], callbacks=[mon])
        trainer.fit(ToyPolicy(lr=1.0))
    assert trainer.global_step == 8
    assert len(attempts) == 4 and attempts[0]["level"] == "ERROR"
    ours = _ours(caught)
    assert sum("503" in m for m in ours) == 1, ours
    assert len(ours) == 1, ours
    acc = _events(Path(tb.log_dir))
    assert sorted(e.step for e in acc.Scalars("kl/k3/mean")) == [1, 3, 5, 7]
    alert_tag = next(t for t in acc.Tags()["tensors"] if t.startswith("kl/alerts"))
    assert len(acc.Tensors(alert_tag)) == 4  # TensorBoard still got every alert
    assert run.summary["kl/k3/mean"] == pytest.approx(
        _all_scalars(Path(tb.log_dir))["kl/k3/mean"][7], rel=1e-6
    )


def test_wandb_disabled_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wandb_env: Any) -> None:
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(save_dir=str(tmp_path), project="klmonitor-test")
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    mon = KLMonitor(log_every_n_steps=2, rules=[KLBudgetRule(1e-9, cooldown=0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, 8, loggers=[logger, tb], callbacks=[mon])
        trainer.fit(ToyPolicy(lr=1.0))
    assert trainer.global_step == 8
    ours = _ours(caught)
    # disabled is the user's choice, not a failure: the W&B sink's calls are no-ops, no warning
    assert ours == [], ours
    assert [sink.kind for sink in mon.monitor.sinks] == ["wandb", "tensorboard"]
    assert sorted(_all_scalars(Path(tb.log_dir))["kl/k3/mean"]) == [1, 3, 5, 7]
    assert len(mon.alert_history) == 4


# --------------------------------------------------------------------------------------------
# 4. resume
# --------------------------------------------------------------------------------------------
def _resumable_run(
    root: Path, every: int, steps: int, save_at: int | None, ckpt: str | None
) -> tuple[Any, Path]:
    model = ToyPolicy(lr=2.0, pull=3.0, batch=32)
    # Short cooldowns, patience and a spike history: rule state a resume must carry over.
    rules = [
        DriftRule(cooldown=2),
        SpikeRule(threshold=1.5, min_history=3, window=5, cooldown=1),
        KLBudgetRule(0.05, patience=2, cooldown=3),
    ]
    mon = KLMonitor(log_every_n_steps=every, rules=rules)
    tb = TensorBoardLogger(str(root), name="tb", version=0)
    callbacks: list[Any] = [mon]
    if save_at is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=save_at, save_top_k=-1)
        )
    trainer = make_trainer(
        root, steps, loggers=[tb], callbacks=callbacks, enable_checkpointing=save_at is not None
    )
    trainer.fit(model, ckpt_path=ckpt)
    return mon, Path(tb.log_dir)


@pytest.mark.parametrize(
    ("every", "save_at", "steps"),
    [
        (3, 10, 33),  # a 3-step window, checkpoint one step into a window
        (5, 15, 40),  # checkpoint exactly on a logging step (the window just closed)
        (7, 20, 42),  # a 7-step window, checkpoint six steps into a window
    ],
)
def test_resume_matches_uninterrupted_run(tmp_path: Path, every: int, save_at: int, steps: int) -> None:
    full, full_dir = _resumable_run(tmp_path / "full", every, steps, None, None)
    _resumable_run(tmp_path / "part", every, save_at, save_at, None)
    ckpts = sorted((tmp_path / "part" / "ckpt").glob("*.ckpt"))
    assert len(ckpts) == 1
    resumed, resumed_dir = _resumable_run(tmp_path / "part", every, steps, None, str(ckpts[0]))

    # alerts on both sides of the checkpoint: the history is restored and the rules carry on
    # (a window ending at optimizer step s is logged, and alerted, at s - 1)
    assert any(a.step < save_at for a in full.alert_history), "no alert before the checkpoint"
    assert any(a.step >= save_at for a in full.alert_history), "no alert after the checkpoint"
    assert [a.to_dict() for a in resumed.alert_history] == [a.to_dict() for a in full.alert_history]
    a, b = _all_scalars(full_dir), _all_scalars(resumed_dir)
    after = [s - 1 for s in range(every, steps + 1, every) if s > save_at]
    if steps % every:
        after.append(steps - 1)  # the flushed last window
    for tag, series in a.items():
        if tag.startswith("kl/initial/"):  # the untrained policy's check: the first window only
            assert sorted(series) == [every - 1] and b[tag] == series, tag
            continue
        assert [s for s in sorted(series) if s >= save_at] == after, tag
        for step in after:
            assert b[tag][step] == pytest.approx(series[step], rel=1e-9, abs=1e-12), (tag, step)


# --------------------------------------------------------------------------------------------
# 5. long runs: flat memory, bounded history
# --------------------------------------------------------------------------------------------
def test_long_run_core_loop_memory_is_flat() -> None:
    steps, every, history = 20_000, 50, 100
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(8, 64, generator=g) * 5
    ref = logp + 0.05 * torch.randn(8, 64, generator=g)
    mask = torch.rand(8, 64, generator=g) > 0.2
    stats = KLStats()
    engine = AlertEngine(
        [*default_rules(max_kl=0.05), KLBudgetRule(1e-9, cooldown=0, name="always")], history
    )
    rss: dict[int, float] = {}
    for step in range(1, steps + 1):
        stats.update(logp, ref, mask)
        if step % every == 0:
            engine.evaluate(stats.compute(), step)
            stats.reset()
        if step in (2_000, steps):
            gc.collect()
            rss[step] = _rss_mib()
    growth = rss[steps] - rss[2_000]
    assert growth < 20, f"RSS grew {growth:.1f} MiB over {steps - 2000} steps"
    assert len(engine.history) == history  # 400 windows fired, the oldest dropped
    assert engine.history[-1].step == steps
    assert stats.summary_vector().numel() == 17


class _FakeLogger:
    def __init__(self) -> None:
        self.windows = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.windows += 1


def test_long_run_callback_hooks_memory_is_flat() -> None:
    # The callback's own hooks, driven directly (a Trainer's overhead would dominate): the
    # window, histogram buffer, alert history and warn-once set must not grow.
    steps, every, history = 12_000, 50, 50
    logger = _FakeLogger()
    trainer = SimpleNamespace(
        global_step=0,
        global_rank=0,
        is_global_zero=True,
        loggers=[logger],
        world_size=1,
        should_stop=False,
        log_every_n_steps=every,
    )
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda *a, **k: None)
    mon = KLMonitor(
        log_every_n_steps=every,
        rules=[KLBudgetRule(1e-9, cooldown=0)],
        alert_history_size=history,
        histogram_samples=1024,
    )
    mon.setup(trainer, module, "fit")  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(8, 64, generator=g) * 5
    outputs = {
        "loss": torch.tensor(0.0),
        "logprobs": logp,
        "ref_logprobs": logp + 0.05 * torch.randn(8, 64, generator=g),
        "mask": torch.rand(8, 64, generator=g) > 0.2,
    }
    bad = {"loss": torch.tensor(0.0), "logprobs": logp}  # missing key: warned once
    rss: dict[int, float] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, steps + 1):
            trainer.global_step = step
            mon.on_train_batch_end(trainer, module, bad if step % 97 == 0 else outputs, None, step)  # type: ignore[arg-type]
            if step in (2_000, steps):
                gc.collect()
                rss[step] = _rss_mib()
        mon.on_train_end(trainer, module)  # type: ignore[arg-type]
    growth = rss[steps] - rss[2_000]
    assert growth < 20, f"RSS grew {growth:.1f} MiB over {steps - 2000} steps"
    assert logger.windows == steps // every
    assert len(mon.alert_history) == history
    assert len(_ours(caught)) == 1 and len(mon.monitor.warned) == 1
