"""klmonitor.openrlhf: contract tests against OpenRLHF's real Experience, on CPU.

OpenRLHF pins transformers, deepspeed and flash-attn, so these run in their own environment
(.ci/frameworks.sh, OpenRLHF installed --no-deps):
    /work/venvs/openrlhf/bin/python -m pytest tests/test_openrlhf.py
and skip where OpenRLHF is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openrlhf")

from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402

import klmonitor.openrlhf as ko  # noqa: E402
from klmonitor import Monitor  # noqa: E402
from klmonitor.monitor import KLMonitorInputError  # noqa: E402


def _experience(seed: int = 0, b: int = 4, t: int = 12, ref: bool = True, rollout: bool = True) -> Experience:
    g = torch.Generator().manual_seed(seed)
    a = t - 1  # OpenRLHF: action_mask (and the log-probs) cover sequences[:, 1:]
    logp = -torch.rand(b, a, generator=g) * 3
    start = torch.randint(1, a // 2, (b,), generator=g)
    pos = torch.arange(a)[None, :]
    mask = pos >= start[:, None]
    return Experience(
        sequences=torch.randint(0, 40, (b, t), generator=g),
        attention_mask=torch.ones(b, t, dtype=torch.long),
        action_mask=mask,
        action_log_probs=logp,
        base_action_log_probs=logp + 0.3 * torch.randn(b, a, generator=g) if ref else None,
        rollout_log_probs=logp + 0.05 * torch.randn(b, a, generator=g) if rollout else None,
    )


def _reference(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    lr = (ref.double() - logp.double()).numpy()[mask.bool().numpy()]
    k3 = np.expm1(lr) - lr
    return {"k1": float((-lr).mean()), "k3": float(k3.mean()), "k3_std": float(k3.std(ddof=1)), "n": lr.size}


def test_supported_version_is_installed() -> None:
    version = importlib.metadata.version("openrlhf")
    assert ko._check_openrlhf_version(version) is None, (
        f"openrlhf {version} is installed and klmonitor.openrlhf supports openrlhf{ko.SUPPORTED_OPENRLHF}: "
        "update SUPPORTED_OPENRLHF (and the [openrlhf] extra) after checking this file's contracts pass"
    )


def test_experience_contract() -> None:
    """The Experience fields klmonitor.openrlhf reads, and how make_experience fills them."""
    names = {f.name for f in dataclasses.fields(Experience)}
    for name in (ko.POLICY, ko.REFERENCE, ko.ROLLOUT, ko.MASK, ko.SEQUENCES):
        assert name in names, (
            f"OpenRLHF's Experience has no field {name!r} any more (its fields: {sorted(names)}): "
            "klmonitor.openrlhf reads it (rename it there)"
        )
    spec = importlib.util.find_spec("openrlhf.trainer.ppo_utils.experience_maker")
    assert spec is not None and spec.origin
    text = Path(spec.origin).read_text()
    assert "if not args.algo.kl.use_loss:\n                base_action_log_probs = None" in text or (
        "args.algo.kl.use_loss" in text and "base_action_log_probs = None" in text
    ), "OpenRLHF changed when it drops base_action_log_probs: update klmonitor.openrlhf's message and docs"
    gen = Path(importlib.util.find_spec("openrlhf.trainer.ppo_utils.samples_generator").origin).read_text()
    assert "action_mask = action_mask[1:truncate_length]" in gen, (
        "OpenRLHF's action_mask no longer covers sequences[:, 1:]: klmonitor.openrlhf's token ids assume it"
    )


def test_feed_exact() -> None:
    exps = [_experience(s) for s in range(3)]
    mon = Monitor(log_every_n_steps=1, histogram=False)
    for e in exps:
        assert ko.feed(mon, e)
    res = mon.step(1)
    assert res is not None
    cat = {
        k: torch.cat([getattr(e, k) for e in exps], 0) for k in (ko.POLICY, ko.REFERENCE, ko.ROLLOUT, ko.MASK)
    }
    want = _reference(cat[ko.POLICY], cat[ko.REFERENCE], cat[ko.MASK])
    assert res.summary.tokens == want["n"]
    assert res.metrics["kl/k3/mean"] == pytest.approx(want["k3"], rel=1e-5)
    assert res.metrics["kl/k3/std"] == pytest.approx(want["k3_std"], rel=1e-4)
    assert res.metrics["kl/k1/mean"] == pytest.approx(want["k1"], rel=1e-5, abs=1e-7)
    roll = _reference(cat[ko.ROLLOUT], cat[ko.POLICY], cat[ko.MASK])
    assert res.summary.rollout is not None and res.summary.rollout.kl.tokens == want["n"]
    assert res.summary.rollout.kl.k3.mean == pytest.approx(roll["k3"], rel=1e-4)


def test_merged_experiences_feed_the_same() -> None:
    """OpenRLHF's own concat_experiences (zero padding) changes nothing."""
    exps = [_experience(s, t=8 + 3 * s) for s in range(3)]
    a, b = Monitor(histogram=False), Monitor(histogram=False)
    for e in exps:
        ko.feed(a, e)
    ko.feed(b, Experience.concat_experiences(exps, pad_token_id=0))
    ra, rb = a.flush(1), b.flush(1)
    assert ra is not None and rb is not None and ra.summary.tokens == rb.summary.tokens
    assert ra.metrics["kl/k3/mean"] == pytest.approx(rb.metrics["kl/k3/mean"], rel=1e-6)


def test_token_ids_are_the_actions() -> None:
    e = _experience(7, rollout=False)
    mon = Monitor(histogram=False, top_tokens=2, vocab_size=40)
    ko.feed(mon, e)
    res = mon.flush(1)
    assert res is not None and res.summary.top_tokens
    lr = (e.base_action_log_probs.double() - e.action_log_probs.double()).numpy()
    k3 = np.expm1(lr) - lr
    ok = e.action_mask.numpy()
    sums = np.bincount(e.sequences[:, 1:].numpy()[ok], weights=k3[ok], minlength=40)
    assert res.summary.top_tokens[0].token_id == int(np.argmax(sums))


def test_missing_reference_names_use_loss() -> None:
    mon = Monitor(histogram=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert not ko.feed(mon, _experience(1, ref=False))
        assert not ko.feed(mon, _experience(2, ref=False))
    msgs = [str(w.message) for w in seen if "base_action_log_probs" in str(w.message)]
    assert len(msgs) == 1 and "--algo.kl.use_loss" in msgs[0]
    assert mon.flush(1) is not None
    with pytest.raises(KLMonitorInputError, match="use_loss"):
        ko.feed(Monitor(strict=True), _experience(1, ref=False))


def test_not_an_experience() -> None:
    with pytest.raises(TypeError, match="Experience"):
        ko.feed(Monitor(), {"action_log_probs": torch.zeros(1)})
