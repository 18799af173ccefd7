"""initial_kl: the untrained policy against the reference, token by token, through Monitor.

The rule reads only the batches fed before the first optimizer step (``summary.initial``), so
training inside the first window cannot trip it, and it asks that a share of tokens differ
beyond float rounding, so one heavy token can neither raise nor hide it. Planted faults are
real ones: a tiny transformers GPT-2 scored in train mode (dropout), at a temperature, shifted
by one token; exact copies in float32, bf16 and fp16 stay quiet.
"""

from __future__ import annotations

import copy

import pytest
import torch
from sampling_sim import window

from klmonitor import Monitor
from klmonitor.alerts import AlertEngine, InitialKLRule, default_rules

transformers = pytest.importorskip("transformers")


def _gpt2(
    dropout: float = 0.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A reference and an exact copy of it as the policy (both in eval mode)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=1000,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=None,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    reference = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LM-like peaked next-token distributions (random init is ~uniform)
        reference.transformer.wte.weight.mul_(10.0)
    return copy.deepcopy(reference).to(dtype), reference.to(dtype)


def _logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


_IDS = torch.randint(1, 1000, (64, 32), generator=torch.Generator().manual_seed(0))


def _run(
    first: list[tuple[torch.Tensor, torch.Tensor]], later: int = 4, every: int = 5, **kw: object
) -> Monitor:
    """Feed ``first`` before the first optimizer step, then ``later`` steps of a policy far away."""
    mon = Monitor(log_every_n_steps=every, **kw)  # type: ignore[arg-type]
    for logp, ref in first:
        mon.update(logp, ref)
        mon.step(0)  # micro-batches of gradient accumulation: no optimizer step yet
    mon.step(1)  # the first optimizer step, on those batches
    g = torch.Generator().manual_seed(1)
    for step in range(2, later + 2):
        lp = torch.randn(64, 31, generator=g) - 3
        mon.update(lp, lp - 1.0 + 0.5 * torch.randn(64, 31, generator=g))  # KL ~0.5: training moved it
        mon.step(step)
    mon.flush(later + 1)
    return mon


def _initial_alerts(mon: Monitor) -> list:
    return [a for a in mon.alert_history if a.rule == "initial_kl"]


# -- quiet: exact copies, whatever happens after the first step ------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_copy_is_quiet_though_training_moves_the_policy_in_the_first_window(dtype: torch.dtype) -> None:
    policy, reference = _gpt2(dtype=dtype)
    logp, ref = _logprobs(policy, _IDS), _logprobs(reference, _IDS)
    for cast in (False, True):  # log-probs handed over in float32, or in the model's dtype
        pair = (logp.to(dtype), ref.to(dtype)) if cast else (logp, ref)
        mon = _run([pair])
        assert _initial_alerts(mon) == []
        first = mon.engine.history  # the first window's KL was ~0.5: the old rule fired here
        assert all(a.rule != "initial_kl" for a in first)
        init = [r for r in mon.rules if r.name == "initial_kl"][0]
        assert init.checked  # decided once, quietly


def test_bf16_copy_scored_with_other_kernel_shapes_is_quiet() -> None:
    # The policy scored in two halves, the reference in one batch: other GEMM shapes, possibly
    # other rounding; the tokens stay within float rounding or far below the KL threshold.
    policy, reference = _gpt2(dtype=torch.bfloat16)
    logp = torch.cat([_logprobs(policy, _IDS[:32]), _logprobs(policy, _IDS[32:])])
    ref = _logprobs(reference, _IDS)
    mon = _run([(logp.bfloat16(), ref.bfloat16())])
    assert _initial_alerts(mon) == []
    assert mon.engine.history == [] or all(a.rule != "initial_kl" for a in mon.engine.history)


def test_float32_kernel_noise_on_every_token_is_below_the_threshold() -> None:
    # Other kernels, TF32 or batch shapes change float32 log-probs by ~1e-6 relative on most
    # tokens: they differ beyond rounding, but their KL (~1e-12) is nothing.
    lp = torch.randn(4096, generator=torch.Generator().manual_seed(2)) - 4
    noisy = lp * (1 + 1e-6 * torch.randn(4096, generator=torch.Generator().manual_seed(3)))
    mon = _run([(lp, noisy)])
    summary_initial = mon.last_summary
    assert _initial_alerts(mon) == []
    assert summary_initial is not None


# -- fires: the usual bugs, at the end of the first window, once -----------------------------


@pytest.mark.parametrize("dropout", [0.1, 0.001])
def test_dropout_while_scoring_fires(dropout: float) -> None:
    policy, reference = _gpt2(dropout)
    policy.train()  # TRL's disable_dropout=False: the policy is scored in train mode
    torch.manual_seed(5)
    logp, ref = _logprobs(policy, _IDS), _logprobs(reference, _IDS)
    seen: list = []
    mon = _run([(logp, ref)], on_alert=seen.append)
    alerts = _initial_alerts(mon)
    assert len(alerts) == 1 and seen[0].rule == "initial_kl"
    assert alerts[0].step == 5  # reported at the end of the first window
    if dropout == 0.001:  # dropout-like differences down to a KL of ~5e-4 on most tokens
        assert 2.5e-4 < alerts[0].value < 2e-3
    msg = alerts[0].message
    for words in (
        "dropout",
        "disable_dropout",
        "temperature",
        "one-token shift",
        "wrong checkpoint",
        "initial_kl",
    ):
        assert words in msg
    assert "% of 1984 tokens" in msg


def test_dropout_fires_with_one_heavy_token_in_the_batch() -> None:
    # One token at l = -9 makes the mean's standard error huge; a mean-only test then sees
    # nothing (z ~1). The share of tokens that differ does not care.
    policy, reference = _gpt2(0.001)
    policy.train()
    torch.manual_seed(5)
    logp, ref = _logprobs(policy, _IDS), _logprobs(reference, _IDS)
    ref[3, 7] = logp[3, 7] - 9.0
    mon = _run([(logp, ref)])
    assert len(_initial_alerts(mon)) == 1
    # ... and one heavy token in an exact copy is not "most tokens differ".
    lp = _logprobs(reference, _IDS)
    rf = lp.clone()
    rf[3, 7] -= 9.0
    assert _initial_alerts(_run([(lp, rf)])) == []


@pytest.mark.parametrize("case", ["temperature", "shift", "other_weights"])
def test_scoring_mismatches_fire(case: str) -> None:
    policy, reference = _gpt2()
    if case == "temperature":
        with torch.no_grad():
            logits = policy(_IDS).logits[:, :-1].float() / 0.7
        logp = logits.log_softmax(-1).gather(-1, _IDS[:, 1:, None]).squeeze(-1)
        ref = _logprobs(reference, _IDS)
    elif case == "shift":
        logp = _logprobs(policy, _IDS)
        ref = _logprobs(reference, _IDS).roll(1, dims=1)
    else:
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * p.std() * torch.randn_like(p))
        logp, ref = _logprobs(policy, _IDS), _logprobs(reference, _IDS)
    mon = _run([(logp, ref)])
    assert len(_initial_alerts(mon)) == 1, (case, mon.alert_history)


def test_a_bf16_copy_of_the_reference_is_rounding_not_a_bug() -> None:
    # The reference in bf16, the policy in float32: every token differs, but by bf16's
    # numerics (KL ~1.5e-5 here), far below the threshold: quiet.
    policy, reference = _gpt2()
    mon = Monitor(log_every_n_steps=1)
    mon.update(_logprobs(policy, _IDS), _logprobs(reference.to(torch.bfloat16), _IDS))
    res = mon.step(1)
    assert res is not None and res.summary.initial is not None
    assert res.summary.initial.share > 0.9 and res.summary.initial.kl < 1e-4
    assert [a.rule for a in res.alerts] == []


def test_gradient_accumulation_and_several_micro_batches_all_count() -> None:
    policy, reference = _gpt2(0.1)
    policy.train()
    torch.manual_seed(5)
    pairs = [
        (_logprobs(policy, _IDS[i : i + 16]), _logprobs(reference, _IDS[i : i + 16])) for i in (0, 16, 32, 48)
    ]
    mon = Monitor(log_every_n_steps=2)
    for lp, rf in pairs:
        mon.update(lp, rf)
        mon.step(0)
    mon.step(1)
    mon.update(*pairs[0])  # after the first optimizer step: not the untrained policy
    res = mon.step(2)
    assert res is not None and res.summary.initial is not None
    assert res.summary.initial.tokens == 64 * 31
    assert res.summary.tokens == 64 * 31 + 16 * 31
    assert "kl/initial/differing_share" in res.metrics and res.metrics["kl/initial/tokens"] == 64 * 31
    # Later windows carry no initial part.
    mon.update(*pairs[0])
    res = mon.step(4)
    assert res is not None and res.summary.initial is None and "kl/initial/tokens" not in res.metrics


def test_sequence_level_monitor_checks_tokens() -> None:
    policy, reference = _gpt2(0.1)
    policy.train()
    torch.manual_seed(5)
    mon = _run([(_logprobs(policy, _IDS), _logprobs(reference, _IDS))], level="sequence")
    alerts = _initial_alerts(mon)
    assert len(alerts) == 1 and "of 1984 tokens" in alerts[0].message


def test_masked_tokens_are_left_out() -> None:
    lp = torch.full((64, 31), -3.0)
    ref = lp - 0.3  # every token differs ...
    mask = torch.zeros(64, 31, dtype=torch.bool)  # ... but none is counted
    mask[:, :2] = True
    ref[:, :2] = lp[:, :2]
    mon = Monitor(log_every_n_steps=1)
    mon.update(lp, ref, mask)
    res = mon.step(1)
    assert res is not None and res.summary.initial is not None
    assert (res.summary.initial.tokens, res.summary.initial.differing) == (128, 0)
    assert [a.rule for a in res.alerts] == []


# -- a resumed run is past its start ---------------------------------------------------------


def test_resumed_run_does_not_check() -> None:
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(512, generator=g) - 3
    far = lp - 0.3 * torch.randn(512, generator=g).abs()
    mon = Monitor(log_every_n_steps=2)
    mon.update(lp, lp)
    mon.step(1)
    state = mon.state_dict()
    resumed = Monitor(log_every_n_steps=2)
    resumed.load_state_dict(state)
    resumed.update(lp, far)  # the trained policy's first batch after the resume
    res = resumed.step(2)
    assert (
        res is not None
        and res.summary.initial is None
        and res.alerts == []
        or all(a.rule != "initial_kl" for a in res.alerts)
    )
    # A schedule restarted at a later step (HF resume without state) is past the start too.
    mon = Monitor(log_every_n_steps=2)
    mon.reset_window(100)
    mon.update(lp, far)
    res = mon.step(102)
    assert res is not None and res.summary.initial is None


def test_rule_state_arguments_and_engine() -> None:
    rule = InitialKLRule()
    assert rule.state_dict() == {"streak": 0, "cooldown_left": 0, "checked": False}
    fresh = InitialKLRule()
    fresh.load_state_dict({**rule.state_dict(), "checked": True})
    assert fresh.checked
    fresh.reset()
    assert not fresh.checked
    engine = AlertEngine(default_rules())
    engine.load_state_dict(
        {"version": 1, "rules": {"drift": {"streak": 0, "cooldown_left": 0}}, "history": []}
    )
    assert [r for r in engine.rules if r.name == "initial_kl"][0].checked  # an old checkpoint: past start
    with pytest.raises(ValueError, match="threshold"):
        InitialKLRule(threshold=0)
    with pytest.raises(ValueError, match="min_share"):
        InitialKLRule(min_share=1.5)
    with pytest.raises(ValueError, match="min_tokens"):
        InitialKLRule(min_tokens=0)
    assert InitialKLRule().threshold == 2.5e-4


def test_too_few_tokens_before_the_first_step_skip_the_check() -> None:
    lp = torch.full((8,), -2.0)
    mon = _run([(lp, lp - 1.0)])  # 8 tokens, all far apart: too few to judge
    assert _initial_alerts(mon) == []


def test_categorical_exact_copy_in_any_dtype_then_a_drifting_policy() -> None:
    w = window("noise", 0.0, seed=0)  # policy == reference
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert _initial_alerts(_run([(w.logq.to(dtype), w.logp.to(dtype))])) == []
