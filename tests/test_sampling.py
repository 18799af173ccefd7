"""The sampling check at any KL and the drift message's sampling cause (initial_kl: test_initial_kl.py).

Windows of ~32K tokens from LM-like categorical distributions (``sampling_sim``: Zipf-shaped
references over 1000 tokens) sampled exactly, or with top-k, top-p, a temperature or a
one-token shift; and a real (tiny, random) transformers GPT-2 sampled with ``generate``.
The false-alarm *rates* are measured by ``benchmarks/bench_false_alarms.py``; here each case
is a fixed set of seeds.
"""

from __future__ import annotations

import pytest
import torch
from sampling_sim import window

from klmonitor import KLStats, KLSummary
from klmonitor.alerts import (
    AlertEngine,
    DriftRule,
    SamplingMismatchRule,
)

# -- exact sampling stays quiet, at per-token KL from 1e-6 to 4 nats ---------------------------

EXACT = [
    ("noise", 0.002),  # KL ~2e-6
    ("noise", 0.3),  # KL ~0.04
    ("noise", 1.0),  # KL ~0.46
    ("noise", 2.5),  # KL ~2.5, ess ~0.01: r's right tail is heavy
    ("sharp", 2.0),  # KL ~0.87: a lower-entropy policy
    ("tail", 0.1),  # q = p e^-4 on 10 % of the tokens (r = 55 there): a tail a window samples
    ("tail", 0.3),
    ("boost", 6.0),  # p tiny where q is not (reward hacking): KL ~1.4
    ("boost", 8.0),  # KL ~4.4
]


@pytest.mark.parametrize(("family", "s"), EXACT)
def test_exact_sampling_is_quiet_at_any_kl(family: str, s: float) -> None:
    windows = [window(family, s, seed=seed) for seed in range(3)]
    rule = SamplingMismatchRule(patience=1, cooldown=0)
    for w in windows:
        summary = w.summary
        assert rule.side(summary) == 0, (w.kl, summary.r_minus_1.z)
        assert rule.evaluate(summary, 0) is None
        # The tails are sampled: KLStats' k3 (and k1) are within 4 standard errors of the
        # exact KL of the categoricals (the window's own contexts, float64).
        for est in (summary.k3, summary.k1):
            assert abs(est.mean - w.kl) < 4 * est.stderr + 1e-9, (est, w.kl)
    assert 1e-6 < windows[0].kl < 5  # the range the test claims


def test_heavy_right_tail_is_what_fools_a_plain_z_test() -> None:
    # Tiny windows of a far-off policy miss r's right tail: z is very negative, yet the rule
    # sees that a few samples at the window's largest ratio would close the gap.
    w = window("noise", 2.5, seed=15, tokens=512, draws=8)  # KL ~2.5, 512 tokens
    assert w.summary.r_minus_1.z < -6
    assert SamplingMismatchRule(patience=1).side(w.summary) == 0


# -- mismatched sampling fires within 3 windows ------------------------------------------------

MISMATCH_POLICIES = [("noise", 0.3), ("noise", 1.0), ("sharp", 2.0), ("tail", 0.1), ("boost", 6.0)]


@pytest.mark.parametrize("sampler", ["topk50", "topp0.9", "temp0.7", "shift"])
@pytest.mark.parametrize(("family", "s"), MISMATCH_POLICIES)
def test_mismatched_sampling_fires_within_three_windows(sampler: str, family: str, s: float) -> None:
    rule = SamplingMismatchRule()
    alerts = [rule.evaluate(window(family, s, sampler, seed=seed).summary, seed) for seed in range(3)]
    assert alerts[:2] == [None, None]  # patience 3
    alert = alerts[2]
    assert alert is not None and alert.rule == "sampling_mismatch"
    if sampler == "shift":  # log-probs of other tokens: r far too high on average
        assert alert.value > 0 and "shifted by one" in alert.message
    else:  # the sampler never (or rarely) emits the policy's unlikely tokens
        assert alert.value < -6 and "top-k" in alert.message and "generate(do_sample=True)" in alert.message


def test_mismatch_of_a_far_off_policy_fires_where_the_old_gate_was_blind() -> None:
    # KL ~1.7 and k1 inflated by the truncation: the former rule ignored z < 0 above KL 0.1.
    w = window("noise", 2.0, "topk50", seed=0)
    assert w.summary.k1.mean > 1.1 * w.summary.k3.mean > 1.0
    assert w.mean_r < 0.6  # the exact E[r] under the sampler
    assert SamplingMismatchRule(patience=1).side(w.summary) == -1


def test_shift_far_from_the_reference_fires_through_the_mean_of_r() -> None:
    # At KL ~1.4 r's tail makes z small (about 1 to 3); the mean of r is still far above
    # anything an exact sampler gives (Markov: P(mean r >= 20) <= 1/20 per window).
    w = window("sharp", 3.0, "shift", seed=0)
    z, mean_r = w.summary.r_minus_1.z, 1 + w.summary.r_minus_1.mean
    assert z < 6 and mean_r >= 20, (z, mean_r)
    alert = SamplingMismatchRule(patience=1).evaluate(w.summary, 0)
    assert alert is not None and "shifted by one" in alert.message


def test_mismatch_near_the_reference_is_below_materiality() -> None:
    # At KL ~5e-3 top-k moves k3 - k1 by ~1e-3 nats: not significant in 32K tokens.
    w = window("noise", 0.1, "topk50", seed=0)
    assert abs(w.summary.r_minus_1.mean) < 3e-3
    assert SamplingMismatchRule(patience=1).side(w.summary) == 0


# -- what no test on the samples can tell apart ------------------------------------------------


def test_tail_too_rare_to_sample_is_told_apart_only_when_sampled() -> None:
    # q = p e^-8 on ~3 % of the reference's mass: about one token in 100,000 from that tail,
    # each with r = e^8. A window that happened to sample one is quiet; one that did not is
    # indistinguishable from a sampler that never emits those tokens, and fires, saying so.
    windows = [window("tail", 0.03, seed=seed, depth=8.0) for seed in range(6)]
    seen = [w for w in windows if w.summary.max_abs_log_ratio > 7.5]
    unseen = [w for w in windows if w.summary.max_abs_log_ratio < 2]
    assert seen and unseen
    rule = SamplingMismatchRule(patience=1, cooldown=0)
    assert all(rule.side(w.summary) == 0 for w in seen)
    for w in unseen:
        alert = rule.evaluate(w.summary, 0)
        assert alert is not None and alert.value < -6
        missing = -w.summary.r_minus_1.mean
        assert 0.02 < missing < 0.04  # the reference's mass on the unseen tail
        assert f"{missing:.0%}" in alert.message and "cannot tell" in alert.message
        assert "k1 does not" in alert.message  # which estimate to trust meanwhile


# -- a real transformers GPT-2, sampled with generate() ----------------------------------------


def _gpt2_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=None
    )
    cfg.pad_token_id = 0
    reference = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LM-like peaked next-token distributions (random init is ~uniform)
        reference.transformer.wte.weight.mul_(10.0)
    policy = transformers.GPT2LMHeadModel(cfg).eval()
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():  # a policy some way from the reference (per-token KL ~0.1)
        for p in policy.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    return policy, reference


def _token_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # the full softmax, as a trainer scores
        logits = model(ids).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _gpt2_windows(top_k: int | None, n: int = 3) -> list[KLSummary]:
    policy, reference = _gpt2_pair()
    out = []
    for w in range(n):
        prompt = torch.randint(1, 1000, (128, 1), generator=torch.Generator().manual_seed(w))
        torch.manual_seed(100 + w)
        extra = {} if top_k is None else {"top_k": top_k}
        ids = policy.generate(  # type: ignore[operator]
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            max_new_tokens=63,
            min_new_tokens=63,
            **extra,
        )
        stats = KLStats()
        stats.update(_token_logprobs(policy, ids), _token_logprobs(reference, ids))
        out.append(stats.compute())
    return out


def test_gpt2_generate_defaults_fire_and_top_k_0_is_quiet() -> None:
    # generate(do_sample=True) applies top_k=50 by default; the trainer scores with the full
    # softmax. The run: z of -47 to -204 and k1 2-4.5x k3, and no alert.
    engine = AlertEngine([SamplingMismatchRule(), DriftRule()])
    defaults = _gpt2_windows(top_k=None)
    assert all(s.k1.mean > 2 * s.k3.mean for s in defaults)
    fired = [engine.evaluate(s, step) for step, s in enumerate(defaults)]
    assert [a.rule for a in fired[2]] == ["sampling_mismatch"]
    assert "top_k=50 by default" in fired[2][0].message
    exact = _gpt2_windows(top_k=0)
    rule = SamplingMismatchRule(patience=1, cooldown=0)
    assert all(abs(s.r_minus_1.z) < 4 and rule.side(s) == 0 for s in exact), [s.r_minus_1.z for s in exact]
    assert [rule.evaluate(s, i) for i, s in enumerate(exact)] == [None] * 3


# -- the drift alert names a sampling cause ----------------------------------------------------


def test_drift_message_blames_sampling_when_k1_and_k3_disagree() -> None:
    rule = DriftRule(0.1, patience=1)  # the mechanism, at the old threshold (the default is 2.0)
    bad = window("noise", 2.0, "temp0.7", seed=0).summary  # drifted, and sampled at T = 0.7
    alert = rule.evaluate(bad, 0)
    assert alert is not None
    assert "not a learning-rate signal" in alert.message and "k1 and k3 disagree" in alert.message
    honest = window("noise", 2.0, seed=0).summary
    alert = DriftRule(0.1, patience=1).evaluate(honest, 0)
    assert alert is not None
    assert "learning rate" in alert.message and "k1 and k3 disagree" not in alert.message


@pytest.mark.parametrize(("sampler", "fires"), [("exact", False), ("topk50", True), ("temp0.7", True)])
def test_sequence_level_windows(sampler: str, fires: bool) -> None:
    # The same tokens as 1024 sequences of 32: E[sum of r_t - 1] is 0 per sequence too.
    rule = SamplingMismatchRule()
    alerts = []
    for seed in range(3):
        w = window("noise", 1.0, sampler, seed=seed)
        stats = KLStats(level="sequence")
        stats.update(w.logq.reshape(-1, 32), w.logp.reshape(-1, 32))
        alerts.append(rule.evaluate(stats.compute(), seed))
    assert (alerts[2] is not None) is fires and alerts[:2] == [None, None]
