"""klmonitor.openrlhf: contract tests against OpenRLHF's real Experience, on CPU.

OpenRLHF pins transformers, deepspeed and flash-attn, so these run in their own environment
(.ci/frameworks.sh, OpenRLHF installed --no-deps):
    /work/venvs/openrlhf/bin/python -m pytest tests/test_openrlhf.py
and skip where OpenRLHF is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
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


# -- the trainer mixin on OpenRLHF's real PPOTrainer --------------------------------------------
# OpenRLHF's trainer module imports vLLM, DeepSpeed and flash-attn (through its model and
# launcher modules); those are not installed (GPU-only). Where missing, the narrowest modules
# are faked: the vLLM engine and Ray actor-group launcher (RayActorGroup: the tests' fake
# groups), the DeepSpeed strategy (a type annotation here), the remote experience maker (the
# tests feed its make_experience_batch) and vllm.SamplingParams. ppo_trainer.py (PPOTrainer,
# BasePPOTrainer.train_step/fit/save_logs_and_checkpoints), SamplesGenerator, the KL
# controllers and TensorboardLogger are OpenRLHF's own. Ray's runtime is not started: the
# trainer module's ray.get takes the fake groups' plain lists.
def _trainer_module():
    import sys
    import types

    pytest.importorskip("ray")
    pytest.importorskip("datasets")
    if "openrlhf.trainer.ppo_trainer" in sys.modules:
        return sys.modules["openrlhf.trainer.ppo_trainer"]
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("deepspeed") is None:

        class _Maker:
            def __init__(self, *args: object) -> None:
                self.batches: list[list[Experience]] = []

            def make_experience_batch(self, rollout_samples: object) -> list[Experience]:
                return self.batches.pop(0)

        fakes = {
            "openrlhf.trainer.ray.vllm_engine": {"batch_vllm_engine_call": None, "create_vllm_engines": None},
            "openrlhf.trainer.ray.launcher": {"RayActorGroup": object},
            "openrlhf.utils.deepspeed": {"DeepspeedStrategy": object},
            "openrlhf.trainer.ppo_utils.experience_maker": {"RemoteExperienceMaker": _Maker},
            "vllm": {"SamplingParams": object},
        }
        for name, attrs in fakes.items():
            if name not in sys.modules:
                mod = types.ModuleType(name)
                mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
                mod.__dict__.update(attrs)
                sys.modules[name] = mod
    import openrlhf.trainer.ppo_trainer as pt

    return pt


def _ns(**kw: object) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(**{k: _ns(**v) if isinstance(v, dict) else v for k, v in kw.items()})


class _Group:
    """A Ray actor group's methods as the trainer calls them; save_checkpoint keeps client_states."""

    def __init__(self, saved: dict | None = None) -> None:
        self.saved: dict[int, dict] = {}
        self.resume = saved

    def async_run_method_batch(self, method_name: str, **kw: object) -> list:
        return []

    def async_run_method(self, method_name: str, **kw: object) -> list:
        if method_name == "fit":
            return [{"policy_loss": 0.5, "kl": 0.01}]
        if method_name == "save_checkpoint":
            import copy

            states = copy.deepcopy(kw["client_states"])
            self.saved[int(states["global_step"])] = states
        if method_name == "get_checkpoint_states":
            return [self.resume]
        return []


class _Loader:
    def __len__(self) -> int:
        return 8

    def state_dict(self) -> dict:
        return {"pos": 1}

    def load_state_dict(self, state: dict) -> None:
        pass


def _build(monkeypatch, tmp_path, batches, options, logging_steps=1, save_steps=2, resume=None):  # type: ignore[no-untyped-def]
    pt = _trainer_module()
    tokenizer = _ns(decode=lambda ids, **kw: "text")
    monkeypatch.setattr(pt, "get_tokenizer", lambda *a, **k: tokenizer)
    monkeypatch.setattr(pt, "prepare_datasets", lambda strategy, tok: (_Loader(), None, 10))
    monkeypatch.setattr(pt, "ray", _ns(get=lambda refs: list(refs) if isinstance(refs, list) else refs))
    queue = [(["rollout"], None, 1, i == len(batches) - 1) for i in range(len(batches))]
    calls: list[int] = []

    def generate_samples(self, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        return queue.pop(0) if queue else ([], None, 0, True)

    monkeypatch.setattr(pt.SamplesGenerator, "generate_samples", generate_samples)
    (tmp_path / "ckpt" / "_actor").mkdir(parents=True, exist_ok=True)
    args = _ns(
        eval={"steps": -1, "dataset": None},
        ckpt={"save_steps": save_steps, "load_enable": resume is not None, "path": str(tmp_path / "ckpt")},
        data={"disable_fast_tokenizer": False},
        algo={"kl": {"target": None, "init_coef": 1e-4, "horizon": 1000}, "dynamic_filtering_enable": False},
        logger={
            "wandb": {"key": None, "run_name": "run"},
            "tensorboard_dir": str(tmp_path / "tb"),
            "logging_steps": logging_steps,
        },
        train={"num_episodes": 1, "dynamic_batch_enable": False},
        critic={"freezing_steps": -1},
        ds={"enable_sleep": False},
        rollout={"batch_size": 4, "n_samples_per_prompt": 1},
        vllm={"enable_sleep": False},
    )
    group = _Group(resume)
    cls = ko.trainer_class()
    trainer = cls(
        "model", _ns(args=args), group, None, None, None, None, klmonitor_options=options, do_sample=True
    )
    trainer.experience_maker.batches = [list(b) for b in batches]
    return trainer, group, calls


def _with_info(e: Experience) -> Experience:
    b = e.action_log_probs.shape[0]
    e.info = {"reward": torch.ones(b)}
    e.response_length = e.action_mask.sum(1).float()
    e.truncated = torch.zeros(b)
    return e


def _batches(n: int, seed: int = 0) -> list[list[Experience]]:
    return [
        [_with_info(_experience(seed + 2 * i)), _with_info(_experience(seed + 2 * i + 1))] for i in range(n)
    ]


def _tb(path: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _k3(batches: list[list[Experience]]) -> float:
    es = [e for b in batches for e in b]
    cat = {k: torch.cat([getattr(e, k) for e in es], 0) for k in (ko.POLICY, ko.REFERENCE, ko.MASK)}
    return _reference(cat[ko.POLICY], cat[ko.REFERENCE], cat[ko.MASK])["k3"]


def test_trainer_class_is_openrlhfs() -> None:
    pt = _trainer_module()
    cls = ko.trainer_class()
    assert issubclass(cls, pt.PPOTrainer.__ray_actor_class__) and issubclass(cls, ko.KLMonitorTrainerMixin)
    assert ko.KLMonitorPPOTrainer is cls and cls.__module__ == "klmonitor.openrlhf"
    for hook in ("train_step", "save_logs_and_checkpoints", "init_checkpoint_states", "fit"):
        assert callable(getattr(pt.BasePPOTrainer, hook, None)) or callable(
            getattr(pt.PPOTrainer, hook, None)
        ), f"OpenRLHF's trainer has no {hook} any more: klmonitor.openrlhf's mixin hooks it"


def test_fit_logs_kl_to_tensorboard_and_checkpoints(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    batches = _batches(4)
    trainer, group, _ = _build(monkeypatch, tmp_path, batches, {"histogram": False}, logging_steps=2)
    assert trainer.kl_monitor.log_every_n_steps == 2  # --logger.logging_steps
    trainer.fit()
    scalars = _tb(tmp_path / "tb" / "run")
    got = scalars["train/kl/k3/mean"]
    assert sorted(got) == [2, 4]
    assert got[2] == pytest.approx(_k3(batches[:2]), rel=1e-5)
    assert got[4] == pytest.approx(_k3(batches[2:]), rel=1e-5)
    assert "train/timing/klmonitor" in scalars and "train/policy_loss" in scalars
    assert sorted(group.saved) == [2, 4] and ko.STATE_KEY in group.saved[2]


def test_stop_alert_ends_fit(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    batches = _batches(5)
    options = {"histogram": False, "max_kl": 1e-9, "stop_on": ["kl_budget"]}
    trainer, _, calls = _build(monkeypatch, tmp_path, batches, options)
    trainer.fit()
    assert trainer.kl_stop_requested and trainer.kl_result.stop
    assert len(trainer.experience_maker.batches) == 4  # one step ran, then fit ended
    assert len(calls) == 1


def test_resume_restores_the_open_window(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    batches = _batches(4, seed=10)
    opts = {"histogram": False, "log_every_n_steps": 4}
    first, group, _ = _build(monkeypatch, tmp_path, batches[:2], opts)
    first.fit()
    assert first.kl_result is None  # the window (0, 4] is open at the checkpoint of step 2
    second, _, _ = _build(monkeypatch, tmp_path / "b", batches[2:], opts, resume=group.saved[2])
    second.fit()
    assert second.kl_result is not None and second.kl_result.step == 4
    assert second.kl_result.metrics["kl/k3/mean"] == pytest.approx(_k3(batches), rel=1e-5)
    assert second.kl_result.summary.tokens == sum(int(e.action_mask.sum()) for b in batches for e in b)


def test_resume_without_state_warns(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    states = {"episode": 0, "global_step": 2, "total_consumed_prompts": 2, "data_loader_state_dict": {}}
    trainer, _, _ = _build(monkeypatch, tmp_path, _batches(1), {"histogram": False}, resume=states)
    with pytest.warns(UserWarning, match="without the monitor's state"):
        trainer.fit()


def test_launcher_options() -> None:
    rest, opts = ko.split_args(["--x", "1", "--klmonitor.max_kl=0.2", "--klmonitor.prefix", "kl"])
    assert rest == ["--x", "1"] and opts == {"max_kl": 0.2, "prefix": "kl"}
    with pytest.raises(ValueError, match="needs a value"):
        ko.split_args(["--klmonitor.max_kl"])
    with pytest.raises(SystemExit, match="async"):
        ko.main(["--train.async_enable"])
