"""KLMonitorGRPOTrainer: real trl.GRPOTrainer runs on CPU with a tiny random model and an in-code tokenizer."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("tensorboard")

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from hf_toys import WORDS, read_tensorboard, reference_window, tiny_model, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from klmonitor.alerts import KLBudgetRule  # noqa: E402
from klmonitor.transformers import KLMonitorCallback  # noqa: E402
from klmonitor.trl import SUPPORTED_TRL, KLMonitorGRPOTrainer, _check_trl_version  # noqa: E402

Record = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _prompts() -> Dataset:
    return Dataset.from_dict({"prompt": [" ".join(WORDS[(i + j) % 13] for j in range(3)) for i in range(32)]})


def _reward(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(c.split().count("w3")) for c in completions]


def _token_logps(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The completion tokens' log-probs, by a plain forward pass and log_softmax (float64)."""
    prompt, completion = inputs["prompt_ids"], inputs["completion_ids"]
    ids = torch.cat([prompt, completion], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.double()
    logits = logits[:, prompt.size(1) - 1 : -1]
    return logits.log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)


class Recording(KLMonitorGRPOTrainer):
    """Records, per micro-batch, independently computed policy and reference log-probs."""

    def __init__(
        self, *args: Any, records: list[Record], ref_path: Path, fake_sampler: bool = False, **kw: Any
    ):
        super().__init__(*args, **kw)
        self.records = records
        self.independent_ref = AutoModelForCausalLM.from_pretrained(ref_path).eval()
        self.fake_sampler = fake_sampler
        self.sampler_records: list[Record] = []
        self.stale_records: list[Record] = []
        self.completion_ids: list[torch.Tensor] = []  # beside records, micro-batch by micro-batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        step = self.state.global_step + 1
        policy = _token_logps(model, inputs)
        ref = _token_logps(self.independent_ref, inputs)
        mask = inputs["completion_mask"].bool()
        if model.training:  # evaluation calls compute_loss too
            self.records.append((step, policy, ref, mask))
            self.completion_ids.append(inputs["completion_ids"].clone())
            old = inputs.get("old_per_token_logps")
            if old is not None:  # the generation-time policy's (what the monitor used to feed)
                self.stale_records.append((step, old.detach().double(), ref, mask))
        if self.fake_sampler:  # stand in for vLLM's log-probs of the same tokens
            g = torch.Generator().manual_seed(step)
            sampler = policy.float() + 0.1 * torch.randn(policy.shape, generator=g)
            inputs = {**inputs, "sampling_per_token_logps": sampler}
            # KL(sampler || policy) on the sampler's tokens: log-ratio = policy - sampler.
            self.sampler_records.append((step, sampler.double(), policy, mask))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _config(out: Path, **kw: Any) -> GRPOConfig:
    base: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 6,
        "beta": 0.1,
        "learning_rate": 5e-2,
        "logging_steps": 2,
        "report_to": ["tensorboard"],
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "seed": 0,
        "bf16": False,  # GRPOConfig's default is bf16 autocast; fp32 for exact comparisons
    }
    return GRPOConfig(**{**base, **kw})


def _trainer(
    model_dir: Path, out: Path, records: list[Record], config: dict[str, Any], **kw: Any
) -> Recording:
    return Recording(
        model=str(model_dir),
        reward_funcs=_reward,
        args=_config(out, **config),
        train_dataset=_prompts(),
        records=records,
        ref_path=model_dir,
        **kw,
    )


def _check_windows(
    values: tuple[list[int], list[float]], records: list[Record], bounds: list[int], tag: str
) -> None:
    assert values[0] == bounds[1:], tag
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        want = reference_window(records, lo, hi)[tag]
        assert values[1][i] == pytest.approx(want, rel=2e-4, abs=1e-6), (tag, hi, values[1][i], want)


def test_what_the_integration_relies_on_is_still_in_trl() -> None:
    assert _check_trl_version(trl.__version__) is None, (
        f"trl {trl.__version__} is outside klmonitor.trl.SUPPORTED_TRL ({SUPPORTED_TRL}): run this file, "
        "then widen SUPPORTED_TRL and the [trl] extra in pyproject.toml"
    )
    for name in ("compute_loss", "_compute_loss", "_get_per_token_logps_and_entropies"):
        assert callable(getattr(GRPOTrainer, name, None)), (
            f"trl {trl.__version__}: GRPOTrainer.{name} is gone; klmonitor.trl overrides or calls it"
        )
    params = list(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    assert params[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"], (
        f"trl {trl.__version__} changed _get_per_token_logps_and_entropies's signature to {params}"
    )
    loss_src = inspect.getsource(GRPOTrainer._compute_loss)
    assert loss_src.count("self._get_per_token_logps_and_entropies(") == 1, (
        f"trl {trl.__version__}: _compute_loss no longer computes the policy log-probs with one call of "
        "_get_per_token_logps_and_entropies; klmonitor.trl captures that call"
    )
    gen_src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps", "completion_mask"):
        assert f'output["{key}"]' in gen_src or f'"{key}": ' in gen_src, (
            f"trl {trl.__version__}: GRPOTrainer's inputs no longer carry {key!r}; klmonitor.trl reads it"
        )


def test_kl_reaches_trls_own_run_alerts_and_matches_an_independent_computation(
    model_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # TRL's run: <output_dir>/runs/<date>
    records: list[Record] = []
    trainer = _trainer(
        model_dir,
        tmp_path / "out",
        records,
        {"max_steps": 5},
        kl_monitor={"rules": [KLBudgetRule(1e-9, cooldown=0)]},
    )
    trainer.train()
    runs = sorted({p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")})
    assert len(runs) == 1, runs  # one run: TRL's, holding train/kl and klmonitor's train/kl/*
    scalars, texts = read_tensorboard(runs[0], alerts="train/kl/alerts")
    assert scalars["train/loss"][0] == [2, 4] and scalars["train/kl"][0] == [2, 4, 5]
    for tag in ("kl/k1/mean", "kl/k2/mean", "kl/k3/mean", "kl/k3/std", "kl/tokens"):
        _check_windows(scalars["train/" + tag], records, [0, 2, 4, 5], tag)
    assert reference_window(records, 2, 4)["kl/k3/mean"] > 1e-4, "the policy moved away from the reference"
    assert [s for s, _ in texts] == [2, 4, 5] and all("kl_budget" in t for _, t in texts), texts
    assert trainer.kl_callback.monitor.last_summary.rollout is None, "no vLLM: no rollout log-probs"
    # Evaluation runs compute_loss too; its batches stay out of the training windows.
    history = trainer.state.log_history
    assert [e["step"] for e in history if "kl/k3/mean" in e] == [2, 4, 5]
    assert all("kl" in e for e in history if "kl/k3/mean" in e), "beside TRL's own kl, in its entries"
    evaluated = trainer.evaluate(eval_dataset=_prompts().select(range(2)))
    assert "eval_kl" in evaluated and not any(k.startswith(("kl/", "eval_kl/")) for k in evaluated)
    assert trainer.kl_callback.monitor.state_dict()["batches_in_window"] == 0


def test_stop_rule_stops_grpo(model_dir: Path, tmp_path: Path) -> None:
    records: list[Record] = []
    kl = KLMonitorCallback(max_kl=1e-9, stop_on=["kl_budget"], log_every_n_steps=2)
    trainer = _trainer(
        model_dir, tmp_path / "out", records, {"max_steps": 10, "report_to": []}, kl_monitor=kl
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.kl_callback is kl and [a.step for a in kl.monitor.alert_history] == [2]


def test_resume_keeps_the_alert_state(model_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    def budget() -> dict[str, Any]:  # quiet for one window after firing
        return {"rules": [KLBudgetRule(1e-9, cooldown=1)]}

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb1"))
    full = _trainer(
        model_dir,
        tmp_path / "out",
        [],
        {"max_steps": 4, "save_strategy": "steps", "save_steps": 2},
        kl_monitor=budget(),
    )
    full.train()
    assert [a.step for a in full.kl_callback.monitor.alert_history] == [2]
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (
        json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["klmonitor:kl/"][
            "windows"
        ]
        == 1
    )

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb2"))
    records: list[Record] = []
    resumed = _trainer(model_dir, tmp_path / "out2", records, {"max_steps": 4}, kl_monitor=budget())
    resumed.train(resume_from_checkpoint=str(ckpt))
    # Restored: the history, and the cooldown that keeps the rule quiet at step 4.
    assert [a.step for a in resumed.kl_callback.monitor.alert_history] == [2]
    scalars, texts = read_tensorboard(tmp_path / "tb2", alerts="train/kl/alerts")
    assert texts == []
    _check_windows(scalars["train/kl/k3/mean"], records, [2, 4], "kl/k3/mean")


def test_beta_zero_needs_a_reference(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"beta=0.0.*Set GRPOConfig\(beta=...\) > 0.*kl_ref_model"):
        _trainer(model_dir, tmp_path / "out", [], {"beta": 0.0, "max_steps": 1})
    with pytest.raises(ValueError, match="kl_ref_model is for beta=0.0 only"):
        _trainer(model_dir, tmp_path / "out", [], {"max_steps": 1}, kl_ref_model=str(model_dir))
    with pytest.raises(TypeError, match="kl_monitor must be a KLMonitorCallback"):
        _trainer(model_dir, tmp_path / "out", [], {"max_steps": 1}, kl_monitor=0.1)


def test_beta_zero_with_kl_ref_model_and_the_rollout_check(model_dir: Path, tmp_path: Path) -> None:
    seen: dict[int, dict[str, float]] = {}

    records: list[Record] = []
    trainer = _trainer(
        model_dir,
        tmp_path / "out",
        records,
        {"beta": 0.0, "max_steps": 3, "report_to": [], "logging_steps": 1},
        kl_monitor={"sinks": lambda m, step: seen.__setitem__(step, dict(m))},
        kl_ref_model=str(model_dir),
        fake_sampler=True,
    )
    assert trainer.ref_model is None, "TRL holds no reference at beta=0; klmonitor's is used"
    trainer.train()
    assert sorted(seen) == [1, 2, 3]
    for step in (1, 2, 3):
        want = reference_window(records, step - 1, step)
        assert seen[step]["kl/k3/mean"] == pytest.approx(want["kl/k3/mean"], rel=2e-4, abs=1e-7)
        rollout = reference_window(trainer.sampler_records, step - 1, step)
        for name in ("k1/mean", "k3/mean", "tokens"):
            got = seen[step][f"kl/rollout/{name}"]
            assert got == pytest.approx(rollout[f"kl/{name}"], rel=2e-4, abs=1e-6), (name, step)
    assert seen[3]["kl/rollout/k3/mean"] > 1e-3


def test_top_sequences_decode_the_completions(model_dir: Path, tmp_path: Path) -> None:
    records: list[Record] = []
    trainer = _trainer(
        model_dir,
        tmp_path / "out",
        records,
        {"max_steps": 2, "report_to": []},
        kl_monitor={"log_every_n_steps": 2, "top_sequences": 2, "top_tokens": 3, "vocab_size": 16},
    )
    trainer.train()
    s = trainer.kl_callback.monitor.last_summary
    assert s is not None and len(s.top_sequences) == 2 and s.top_tokens
    top = s.top_sequences[0]
    assert top.token_ids is not None and top.text is not None and top.text.strip()
    assert top.kl_sum >= s.top_sequences[1].kl_sum


def test_default_top_sequences_reach_tensorboard_as_the_tokenizers_text(
    model_dir: Path, tmp_path: Path
) -> None:
    # The defaults (top_sequences=5): TRL's tokenizer decodes the top completions, and the table
    # is a text entry in the Trainer's TensorBoard run at each logging step.
    records: list[Record] = []
    trainer = _trainer(model_dir, tmp_path / "out", records, {"max_steps": 2})
    trainer.train()
    assert trainer.kl_callback.monitor.decode == trainer.processing_class.decode
    (run,) = sorted({p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    (entry,) = acc.Tensors("train/kl/top_sequences/text_summary")
    assert entry.step == 2
    table = b"".join(entry.tensor_proto.string_val).decode()
    first = [c.strip() for c in table.strip().splitlines()[2].split("|")[1:-1]]
    # The completion with the largest summed k3 of the window, from the independent log-probs.
    best: tuple[float, list[int]] = (-float("inf"), [])
    for (_, policy, ref, mask), ids in zip(records, trainer.completion_ids, strict=True):
        lr = ref - policy
        sums = torch.where(mask, torch.expm1(lr) - lr, 0.0).sum(1)
        r = int(sums.argmax())
        if float(sums[r]) > best[0]:
            best = (float(sums[r]), ids[r].tolist())
    assert float(first[3]) == pytest.approx(best[0], rel=1e-3)
    words = trainer.processing_class.convert_ids_to_tokens(best[1])
    assert first[-1].replace("**", "") == "".join(words), (first, words)


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_initial_kl_catches_dropout_left_on_while_scoring(tmp_path: Path, disable_dropout: bool) -> None:
    # A model with dropout 0.1: TRL's default (disable_dropout=True) scores the policy as an
    # exact copy of the reference; disable_dropout=False scores it in train mode, with dropout.
    path = tmp_path / "dropout-gpt2"
    model = tiny_model()
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.1
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    trainer = KLMonitorGRPOTrainer(
        model=str(path),
        reward_funcs=_reward,
        args=_config(
            tmp_path / "out",
            max_steps=4,
            disable_dropout=disable_dropout,
            report_to=[],
            per_device_train_batch_size=8,
            max_completion_length=8,
        ),
        train_dataset=_prompts(),
    )
    trainer.train()
    mon = trainer.kl_callback.monitor
    fired = [a for a in mon.alert_history if a.rule == "initial_kl"]
    if disable_dropout:
        assert fired == []
    else:
        assert len(fired) == 1 and fired[0].step == 2  # the end of the first window
        assert "dropout" in fired[0].message and "disable_dropout=True" in fired[0].message


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_kl_k3_equals_trls_kl_at_every_logging_step(
    model_dir: Path, tmp_path: Path, num_iterations: int, caplog: pytest.LogCaptureFixture
) -> None:
    # One micro-batch per logging step: TRL's kl (a mean of micro-batch token means) and
    # klmonitor's k3 (the window's token mean) measure the same tokens. With num_iterations=2
    # each generation batch is trained on twice, and each pass scores it with that pass's
    # policy: TRL's kl and what klmonitor feeds (not the generation-time old_per_token_logps).
    # use_bias_correction_kl=False: TRL's default (True) logs k3 times the ratio to the
    # generation-time policy, which differs from the plain k3 from the second pass on.
    records: list[Record] = []
    config = {
        "max_steps": 6,
        "logging_steps": 1,
        "num_iterations": num_iterations,
        "learning_rate": 1e-1,
        "use_bias_correction_kl": False,
    }
    trainer = _trainer(model_dir, tmp_path / "out", records, config, kl_monitor={})
    with caplog.at_level(logging.INFO, logger="klmonitor"):
        trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3, 4, 5, 6]
    for entry in logged:
        assert entry["kl/k3/mean"] == pytest.approx(entry["kl"], rel=1e-5, abs=1e-8), entry["step"]
        want = reference_window(records, entry["step"] - 1, entry["step"])["kl/k3/mean"]
        assert entry["kl/k3/mean"] == pytest.approx(want, rel=2e-4, abs=1e-7)
    assert logged[-1]["kl"] > 1e-3, "the policy moved away from the reference"
    if num_iterations == 2:
        # TRL kept the generation-time log-probs; on the second pass they are stale, and the
        # k3 they give differs from TRL's kl (what the monitor used to log).
        assert [s for s, *_ in trainer.stale_records] == [1, 2, 3, 4, 5, 6]
        second = [e for e in logged if e["step"] % 2 == 0]
        stale = [
            reference_window(trainer.stale_records, e["step"] - 1, e["step"])["kl/k3/mean"] for e in second
        ]
        assert any(abs(s - e["kl"]) > 0.05 * e["kl"] for s, e in zip(stale, second, strict=True)), (
            stale,
            [e["kl"] for e in second],
        )
        # Those generation-time log-probs are the behaviour policy's: kl/update/* is the size of
        # the policy update, KL(behaviour || current), the behaviour policy as the sampler.
        assert len(trainer.stale_records) == len(trainer.records)
        update = [
            (step, old, cur, mask)
            for (step, old, _, mask), (_, cur, _, _) in zip(
                trainer.stale_records, trainer.records, strict=True
            )
        ]
        for entry in logged:
            want = reference_window(update, entry["step"] - 1, entry["step"])["kl/k3/mean"]
            assert entry["kl/update/k3/mean"] == pytest.approx(want, rel=2e-4, abs=1e-7), entry["step"]
        assert all(e["kl/update/k3/mean"] > 1e-4 for e in second), "the second pass moved the policy"
    else:
        assert trainer.stale_records == [], "aligned steps: TRL keeps no old_per_token_logps"
        assert not any(k.startswith("kl/update/") for e in logged for k in e)
    told = [r for r in caplog.records if "no sampler log-probs" in r.getMessage()]
    assert len(told) == 1 and told[0].levelno == logging.INFO, "said once, without vLLM"


def test_a_window_length_other_than_trls_logging_steps_is_refused(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"log_every_n_steps=3 .*logging_steps"):
        _trainer(model_dir, tmp_path / "out", [], {"max_steps": 1}, kl_monitor={"log_every_n_steps": 3})
    with pytest.raises(ValueError, match=r"logging_dir"):
        _trainer(model_dir, tmp_path / "out", [], {"max_steps": 1}, kl_monitor={"logging_dir": "x"})
    # The same length as logging_steps (2) is taken: nothing to decide.
    trainer = _trainer(model_dir, tmp_path / "out", [], {"max_steps": 1}, kl_monitor={"log_every_n_steps": 2})
    assert trainer.kl_callback.attached and trainer.kl_callback.log_every_n_steps is None
