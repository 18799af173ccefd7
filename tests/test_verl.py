"""klmonitor.verl: contract tests against real verl objects (DataProto, the V1 trainer), on CPU.

verl pins transformers<5.11, so these run in their own environment (.ci/frameworks.sh):
    /work/venvs/verl/bin/python -m pytest tests/test_verl.py
and skip where verl is not installed.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")

from verl import DataProto  # noqa: E402

import klmonitor.verl as kv  # noqa: E402
from klmonitor import Monitor  # noqa: E402
from klmonitor.monitor import KLMonitorInputError  # noqa: E402


def _reference(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Float64 numpy k1/k3 mean and std over the masked tokens (KL(p || ref), p sampled)."""
    lr = (ref.double() - logp.double()).numpy()[mask.bool().numpy()]
    k3 = np.expm1(lr) - lr
    return {"k1": float((-lr).mean()), "k3": float(k3.mean()), "k3_std": float(k3.std(ddof=1)), "n": lr.size}


def _batch(seed: int = 0, b: int = 6, t: int = 9, rollout: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 3
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()  # verl's response_mask: int 0/1
    out = {
        "old_log_probs": logp,
        "ref_log_prob": logp + 0.3 * torch.randn(b, t, generator=g),
        "response_mask": mask,
        "responses": torch.randint(0, 50, (b, t), generator=g),
    }
    if rollout:
        out["rollout_log_probs"] = logp + 0.05 * torch.randn(b, t, generator=g)
    return out


def test_supported_version_is_installed() -> None:
    assert kv._check_verl_version(verl.__version__) is None, (
        f"verl {verl.__version__} is installed and klmonitor.verl says it supports verl{kv.SUPPORTED_VERL}: "
        "update SUPPORTED_VERL (and the [verl] extra) after checking this file's contracts pass"
    )


def test_dataproto_contract() -> None:
    """DataProto keeps its tensors in .batch (a TensorDict) and non-tensors in .non_tensor_batch."""
    sig = inspect.signature(DataProto.from_dict)
    assert "tensors" in sig.parameters, f"DataProto.from_dict's signature moved: {sig}"
    proto = DataProto.from_dict(tensors=_batch())
    assert hasattr(proto, "batch") and hasattr(proto, "non_tensor_batch"), (
        "verl's DataProto no longer has .batch and .non_tensor_batch: klmonitor.verl._fields reads them"
    )
    assert set(_batch()) <= set(proto.batch.keys())


def test_field_names_in_verl_sources() -> None:
    """The names klmonitor.verl reads are the ones verl's trainers write (read from their source)."""
    for module in ("verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.trainer_base"):
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{module} is gone from verl {verl.__version__}"
        text = Path(spec.origin).read_text()
        for name in (kv.POLICY, kv.REFERENCE, kv.ROLLOUT, kv.MASK, kv.RESPONSES):
            assert f'"{name}"' in text, (
                f"verl {verl.__version__}'s {module} no longer names the batch field {name!r}: "
                "klmonitor.verl reads it (rename it there)"
            )
    config = Path(importlib.util.find_spec("verl.trainer").origin).parent / "config"
    text = "\n".join(p.read_text() for p in config.rglob("*.yaml"))
    for key in (
        "use_kl_loss",
        "use_kl_in_reward",
        "calculate_log_probs",
        "trainer_mode",
        "default_local_dir",
    ):
        assert f"{key}:" in text, f"verl's trainer config no longer has {key!r}: klmonitor.verl names it"


def test_feed_dataproto_exact() -> None:
    records = [_batch(seed) for seed in range(3)]
    mon = Monitor(log_every_n_steps=1, histogram=False)
    for rec in records:
        assert kv.feed(mon, DataProto.from_dict(tensors=rec))
    res = mon.step(1)
    assert res is not None
    logp = torch.cat([r["old_log_probs"] for r in records], 1)
    ref = torch.cat([r["ref_log_prob"] for r in records], 1)
    mask = torch.cat([r["response_mask"] for r in records], 1)
    want = _reference(logp, ref, mask)
    assert res.summary.tokens == want["n"]
    assert res.metrics["kl/k3/mean"] == pytest.approx(want["k3"], rel=1e-5)
    assert res.metrics["kl/k3/std"] == pytest.approx(want["k3_std"], rel=1e-4)
    assert res.metrics["kl/k1/mean"] == pytest.approx(want["k1"], rel=1e-5, abs=1e-7)
    # KL(rollout || trainer): the sampler's log-probs against the trainer's policy's
    roll = torch.cat([r["rollout_log_probs"] for r in records], 1)
    want_roll = _reference(roll, logp, mask)
    rollout = res.summary.rollout
    assert rollout is not None and rollout.kl.tokens == want["n"]
    assert rollout.kl.k3.mean == pytest.approx(want_roll["k3"], rel=1e-4)


def test_feed_jagged_tensordict_equals_padded() -> None:
    """verl's V1 trainer keeps jagged tensors in its TransferQueue: fed as-is, same numbers."""
    from tensordict import TensorDict

    rec = _batch(5, rollout=False)
    lengths = rec["response_mask"].sum(1).tolist()

    def jag(t: torch.Tensor) -> torch.Tensor:
        return torch.nested.as_nested_tensor(
            [row[:n] for row, n in zip(t, lengths, strict=True)], layout=torch.jagged
        )

    td = TensorDict({k: jag(v) for k, v in rec.items()}, batch_size=[len(lengths)])
    a, b = Monitor(histogram=False), Monitor(histogram=False)
    assert kv.feed(a, td) and kv.feed(b, DataProto.from_dict(tensors=rec))
    ra, rb = a.flush(1), b.flush(1)
    assert ra is not None and rb is not None
    assert ra.summary.tokens == rb.summary.tokens == sum(lengths)
    assert ra.metrics["kl/k3/mean"] == pytest.approx(rb.metrics["kl/k3/mean"], rel=1e-6)


def test_bypass_mode_same_tensor_is_not_a_rollout() -> None:
    """Rollout-correction bypass mode: old_log_probs *is* rollout_log_probs: no KL(rollout || trainer)."""
    rec = _batch(1, rollout=False)
    proto = DataProto.from_dict(tensors=rec)
    proto.batch["rollout_log_probs"] = proto.batch["old_log_probs"]
    mon = Monitor(histogram=False)
    assert kv.feed(mon, proto)
    res = mon.flush(1)
    assert res is not None
    assert res.summary.rollout is None or res.summary.rollout.kl.tokens == 0
    # an equal-valued copy is a real comparison (and measures exactly 0)
    proto.batch["rollout_log_probs"] = proto.batch["old_log_probs"].clone()
    assert kv.feed(mon, proto)
    res = mon.flush(2)
    assert res is not None and res.summary.rollout is not None
    assert res.summary.rollout.kl.tokens == int(rec["response_mask"].sum())
    assert res.summary.rollout.kl.k3.mean == 0.0


def test_token_ids_reach_top_tokens() -> None:
    rec = _batch(2, rollout=False)
    mon = Monitor(histogram=False, top_tokens=3, vocab_size=50)
    assert kv.feed(mon, DataProto.from_dict(tensors=rec))
    res = mon.flush(1)
    assert res is not None and res.summary.top_tokens, "responses did not reach the monitor as token ids"
    lr = (rec["ref_log_prob"].double() - rec["old_log_probs"].double()).numpy()
    k3 = np.expm1(lr) - lr
    ok = rec["response_mask"].bool().numpy()
    sums = np.bincount(rec["responses"].numpy()[ok], weights=k3[ok], minlength=50)
    top = res.summary.top_tokens[0]
    assert top.token_id == int(np.argmax(sums))


def test_missing_reference_warns_once_and_skips(caplog: pytest.LogCaptureFixture) -> None:
    rec = _batch(3)
    del rec["ref_log_prob"]
    mon = Monitor(histogram=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert not kv.feed(mon, DataProto.from_dict(tensors=rec))
        assert not kv.feed(mon, DataProto.from_dict(tensors=rec))
    msgs = [str(w.message) for w in seen if "ref_log_prob" in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in seen]
    assert "actor_rollout_ref.actor.use_kl_loss=True" in msgs[0]
    assert "algorithm.use_kl_in_reward=True" in msgs[0]
    assert mon.flush(1) is not None  # the skipped batches belong to the window
    strict = Monitor(histogram=False, strict=True)
    with pytest.raises(KLMonitorInputError, match="use_kl_loss"):
        kv.feed(strict, DataProto.from_dict(tensors=rec))


def test_feed_rejects_what_is_not_a_batch() -> None:
    with pytest.raises(TypeError, match="DataProto"):
        kv.feed(Monitor(), [1, 2, 3])
    rec = _batch(4)
    del rec["old_log_probs"]
    with pytest.raises(KLMonitorInputError, match="old_log_probs"):
        kv.feed(Monitor(strict=True), rec)


# -- the V1 trainer ------------------------------------------------------------------------

try:
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls
    from verl.trainer.ppo.v1 import trainer_base as _tb

    _TRAINER_ERROR = ""
except ImportError as exc:  # verl's [verl-core] dependencies missing
    _TRAINER_ERROR = f"verl's V1 trainer does not import here ({exc}); install verl's trainer dependencies"

needs_trainer = pytest.mark.skipif(bool(_TRAINER_ERROR), reason=_TRAINER_ERROR)


@needs_trainer
def test_trainer_contract() -> None:
    """The V1 methods the klmonitor trainer overrides or calls, with the signatures it relies on."""
    base = _tb.PPOTrainer
    for name, params in {
        "step": ["self", "metrics", "timing_raw"],
        "_save_checkpoint": ["self"],
        "_load_checkpoint": ["self"],
        "__init__": ["self", "config"],
    }.items():
        assert hasattr(base, name), (
            f"verl's V1 PPOTrainer has no {name}() any more: klmonitor.verl overrides it"
        )
        got = list(inspect.signature(getattr(base, name)).parameters)
        assert got == params, (
            f"verl's PPOTrainer.{name} signature moved: {got}, klmonitor.verl expects {params}"
        )
    src = inspect.getsource(base.fit)
    assert "self.step(metrics, self.timing_raw)" in src and "self.logger.log(data=metrics" in src, (
        "verl's PPOTrainer.fit no longer logs the dict that step() fills: klmonitor's kl/* would not reach Tracking"
    )
    assert "self._save_checkpoint()" in src, "verl's fit no longer calls _save_checkpoint()"
    init_src = inspect.getsource(base.__init__)
    assert "self.trainer_mode = self.config.trainer.v1.trainer_mode" in init_src
    import transfer_queue as tq

    got = list(inspect.signature(tq.kv_batch_get).parameters)
    assert {"keys", "partition_id", "select_fields"} <= set(got), f"transfer_queue.kv_batch_get moved: {got}"


@needs_trainer
def test_register_and_pick_by_name() -> None:
    cls = kv.register()
    assert get_trainer_cls("klmonitor") is cls
    assert kv.register() is cls  # idempotent (Ray may run the setup hook more than once)
    assert issubclass(cls, PPOTrainerSync) and issubclass(cls, kv.KLMonitorTrainerMixin)
    assert cls.__name__ == "KLMonitorPPOTrainerSync" and kv.KLMonitorPPOTrainerSync is cls


class _Workers:
    """Stands in for verl's actor worker group: checkpoints are the workers' business."""

    def __init__(self) -> None:
        self.saved: list[str] = []

    def save_checkpoint(self, local_path: str, *args: Any, **kwargs: Any) -> None:
        self.saved.append(local_path)

    def load_checkpoint(self, local_path: str, **kwargs: Any) -> None:
        self.saved.append("load:" + local_path)


class _Loader:
    def state_dict(self) -> dict[str, int]:
        return {"pos": 1}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        pass


def _config(tmp_path: Path, **klmonitor: Any) -> Any:
    from omegaconf import OmegaConf

    cfg_path = Path(importlib.util.find_spec("verl.trainer").origin).parent / "config"
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(cfg_path), version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=[
                "trainer.v1.trainer_mode=klmonitor",
                "algorithm.adv_estimator=grpo",
                "actor_rollout_ref.actor.use_kl_loss=True",
                "actor_rollout_ref.rollout.calculate_log_probs=True",
                f"trainer.default_local_dir={tmp_path}",
                "trainer.save_freq=1",
            ]
            + [f"+trainer.klmonitor.{k}={v}" for k, v in klmonitor.items()],
        )
    OmegaConf.set_struct(cfg, True)
    return cfg


def _trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: dict[str, Any], **kl: Any) -> Any:
    """The registered trainer, built by verl's own __init__; its transfer layer faked at kv_batch_get."""
    from tensordict import TensorDict
    from transfer_queue import KVBatchMeta

    cls = kv.register()
    cfg = _config(tmp_path, **kl)
    monkeypatch.setattr(_tb.PPOTrainer, "_build_replay_buffer", lambda self: None)
    trainer = get_trainer_cls(cfg.trainer.v1.trainer_mode)(config=cfg)
    assert isinstance(trainer, cls)

    def parent_step(self: Any, metrics: dict, timing_raw: dict) -> Any:  # verl's pipeline, done
        rec = _batch(100 + self.global_steps)
        keys = [f"k{self.global_steps}_{i}" for i in range(len(rec["response_mask"]))]
        store["steps"].append(rec)
        store["td"] = TensorDict(rec, batch_size=[len(keys)])
        metrics["actor/pg_loss"] = 0.5
        return KVBatchMeta(partition_id="train", keys=keys, tags=[{} for _ in keys])

    def kv_batch_get(keys: list[str], partition_id: str, select_fields: list[str]) -> Any:
        store["asked"].append(list(select_fields))
        return store["td"].select(*select_fields)

    monkeypatch.setattr(PPOTrainerSync, "step", parent_step)
    import transfer_queue as tq

    monkeypatch.setattr(tq, "kv_batch_get", kv_batch_get)
    trainer.actor_rollout_wg = _Workers()
    trainer.train_dataloader = _Loader()
    return trainer


@needs_trainer
def test_trainer_step_merges_kl_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store: dict[str, Any] = {"steps": [], "asked": []}
    trainer = _trainer(tmp_path, monkeypatch, store, log_every_n_steps=2, histogram=False)
    assert trainer.trainer_mode == "sync", (
        "the trainer must keep verl's sync mode (replay buffer, checkpoints)"
    )
    assert trainer.kl_monitor.log_every_n_steps == 2
    logged = []
    for step in (1, 2):
        trainer.global_steps = step
        metrics: dict[str, Any] = {}
        timing: dict[str, float] = {}
        trainer.step(metrics, timing)
        logged.append(metrics)
        assert metrics["actor/pg_loss"] == 0.5 and "klmonitor" in timing
    assert not any(k.startswith("kl/") for k in logged[0])  # window (0, 2] not ended yet
    assert set(store["asked"][0]) == {
        "old_log_probs",
        "response_mask",
        "responses",
        "ref_log_prob",
        "rollout_log_probs",
    }
    steps = store["steps"]
    want = _reference(
        torch.cat([r["old_log_probs"] for r in steps], 1),
        torch.cat([r["ref_log_prob"] for r in steps], 1),
        torch.cat([r["response_mask"] for r in steps], 1),
    )
    assert logged[1]["kl/k3/mean"] == pytest.approx(want["k3"], rel=1e-5)
    assert logged[1]["kl/tokens"] == want["n"]
    assert "kl/rollout/k3/mean" in logged[1]


@needs_trainer
def test_trainer_checkpoint_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store: dict[str, Any] = {"steps": [], "asked": []}
    trainer = _trainer(tmp_path, monkeypatch, store, log_every_n_steps=4, histogram=False)
    for step in (1, 2, 3):
        trainer.global_steps = step
        trainer.step({}, {})
    trainer._save_checkpoint()  # verl's own save, workers faked
    folder = tmp_path / "global_step_3"
    assert (folder / kv.STATE_FILE).exists() and (folder / "data.pt").exists()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    saved = json.loads((folder / kv.STATE_FILE).read_text())
    assert saved["step_seen"] == 3 and saved["batches_in_window"] == 3

    resumed = _trainer(tmp_path, monkeypatch, store, log_every_n_steps=4, histogram=False)
    resumed._load_checkpoint()  # verl's own resume (auto: the latest checkpoint)
    assert resumed.global_steps == 3
    resumed.global_steps = 4
    metrics: dict[str, Any] = {}
    resumed.step(metrics, {})
    steps = store["steps"]
    assert len(steps) == 4
    want = _reference(
        torch.cat([r["old_log_probs"] for r in steps], 1),
        torch.cat([r["ref_log_prob"] for r in steps], 1),
        torch.cat([r["response_mask"] for r in steps], 1),
    )
    # the window (0, 4] spans the restart: the three saved steps and the resumed one
    assert metrics["kl/tokens"] == want["n"]
    assert metrics["kl/k3/mean"] == pytest.approx(want["k3"], rel=1e-5)


@needs_trainer
def test_trainer_resume_without_state_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "global_step_2").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    trainer = _trainer(tmp_path, monkeypatch, {"steps": [], "asked": []})
    with caplog.at_level(logging.WARNING, logger="klmonitor"):
        trainer._load_checkpoint()
    assert trainer.global_steps == 2
    assert any(kv.STATE_FILE in r.getMessage() for r in caplog.records)


def test_bad_monitor_options_are_named() -> None:
    cfg = SimpleNamespace(trainer={"klmonitor": [1, 2]})
    with pytest.raises(TypeError, match=r"trainer.klmonitor"):
        kv._monitor_options(cfg)
    assert kv._monitor_options(SimpleNamespace(trainer={}))["log_every_n_steps"] == 1
