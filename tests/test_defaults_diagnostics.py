"""by_position and top_sequences on by default (issue 23): every adapter gets them, each sink
receives what it can show (read back from its own files), and the top sequences are decoded
with the tokenizer where the adapter knows it (the Hugging Face Trainer's ``processing_class``).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from tb_files import events, texts
from torch.utils.tensorboard import SummaryWriter

from klmonitor import Monitor
from klmonitor.sinks import Sink

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VOCAB = [f"t{i}_" for i in range(20)]  # token i decodes to "t<i>_": the text shows the ids' order


def _decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def _batches(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """[4, 16] batches; row 2 of step 3 (in the second window of 2 steps) is far off the reference."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(1, steps + 1):
        logp = -torch.rand(4, 16, generator=g, dtype=torch.float64) * 3
        ref = logp + 0.05 * torch.randn(4, 16, generator=g, dtype=torch.float64)
        if step == 3:
            ref[2] = logp[2] + 1.5
        out.append(
            {
                "logprobs": logp,
                "ref_logprobs": ref,
                "mask": torch.rand(4, 16, generator=g) < 0.9,
                "token_ids": torch.randint(0, len(VOCAB), (4, 16), generator=g),
            }
        )
    return out


def _k3_rows(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Each row's summed k3 over its valid tokens, float64 numpy (the independent reference)."""
    lr = (batch["ref_logprobs"] - batch["logprobs"]).numpy()
    k3 = np.expm1(lr) - lr
    return np.where(batch["mask"].numpy(), k3, 0.0).sum(1)


def _top_row(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int, list[int]]:
    """(batch index, row, token ids) of the row with the largest summed k3 among ``batches``;
    the ids of its masked-out tokens left out (the table shows the tokens the KL counts)."""
    scores = [(s, b, r) for b, batch in enumerate(batches) for r, s in enumerate(_k3_rows(batch))]
    _, b, r = max(scores)
    return b, r, batches[b]["token_ids"][r][batches[b]["mask"][r]].tolist()


def _rows(markdown: str) -> list[list[str]]:
    """The data rows of a Markdown table, as cells (header and rule left out)."""
    lines = [ln for ln in markdown.strip().splitlines() if ln.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines[2:]]


class Recording(Sink):
    """A user sink that keeps every call."""

    def __init__(self) -> None:
        super().__init__(None)
        self.scalars: list[dict[str, float]] = []
        self.tables: list[tuple[str, int, list[str], list[list[Any]]]] = []
        self.histograms: list[int] = []

    def log_scalars(self, metrics: Any, step: int) -> None:
        self.scalars.append(dict(metrics))

    def log_histogram(self, values: Any, step: int) -> None:
        self.histograms.append(step)

    def log_table(self, name: str, columns: Any, rows: Any, step: int) -> None:
        self.tables.append((name, step, list(columns), [list(r) for r in rows]))


# --------------------------------------------------------------------------------------------
# the defaults, in the Monitor and every adapter
# --------------------------------------------------------------------------------------------
def _on(mon: Monitor) -> tuple[int | None, int | None]:
    return (
        mon.positions.buckets if mon.positions is not None else None,
        mon.sequences.k if mon.sequences is not None else None,
    )


def test_monitor_has_them_on_and_takes_them_off() -> None:
    assert _on(Monitor()) == (12, 5)
    assert _on(Monitor(by_position=False, top_sequences=0)) == (None, None)
    assert _on(Monitor(top_sequences=2, position_buckets=4)) == (4, 2)


def _adapters() -> list[Any]:
    out = []
    for package in ("lightning", "pytorch_lightning"):
        out.append(pytest.param(f"klmonitor.{package}", id=package))
    out += [
        pytest.param("klmonitor.transformers", id="transformers"),
        pytest.param("klmonitor.trl", id="trl"),
        pytest.param("klmonitor.verl", id="verl"),
        pytest.param("klmonitor.openrlhf", id="openrlhf"),
    ]
    return out


def _adapter_monitor(module: str, **kw: Any) -> Monitor:
    """The Monitor each adapter builds from the user's options ``kw`` (nothing given: its defaults)."""
    if module in ("klmonitor.lightning", "klmonitor.pytorch_lightning"):
        pytest.importorskip(module.split(".")[1])
        cls = __import__(module, fromlist=["KLMonitor"]).KLMonitor
        return cls(**kw).monitor
    if module == "klmonitor.transformers":
        pytest.importorskip("transformers")
        from klmonitor.transformers import KLMonitorCallback

        return KLMonitorCallback(**kw).monitor
    if module == "klmonitor.trl":
        pytest.importorskip("trl")
        from klmonitor.trl import _as_callback

        return _as_callback(kw or None).monitor
    if module == "klmonitor.verl":
        from klmonitor.verl import _monitor_options

        config = SimpleNamespace(trainer={"klmonitor": kw} if kw else {})
        return Monitor(**_monitor_options(config))
    from klmonitor.openrlhf import split_args

    # The launcher's --klmonitor.KEY VALUE options, parsed as the launcher parses them.
    argv = [x for k, v in kw.items() for x in (f"--klmonitor.{k}", json.dumps(v))]
    _, options = split_args(argv)
    return Monitor(**options)


@pytest.mark.parametrize("module", _adapters())
def test_every_adapter_gets_the_defaults_and_lets_the_user_turn_them_off(module: str) -> None:
    assert _on(_adapter_monitor(module)) == (12, 5)
    assert _on(_adapter_monitor(module, by_position=False, top_sequences=0)) == (None, None)


# --------------------------------------------------------------------------------------------
# what each sink gets by default
# --------------------------------------------------------------------------------------------
def test_tensorboard_gets_the_position_scalars_and_one_text_per_table_and_window(tmp_path: Path) -> None:
    batches = _batches(6)
    writer = SummaryWriter(str(tmp_path))
    mon = Monitor(log_every_n_steps=2, sinks=writer, decode=_decode, rules=[])
    for step, b in enumerate(batches, start=1):
        mon.update(**b)
        mon.step(step)
    mon.close()
    writer.close()
    acc = events(tmp_path)
    scalars = set(acc.Tags()["scalars"])
    # 16 positions: buckets 0-1, 2-3, 4-7, 8-15, each a k3 mean and a token count per window.
    buckets = ("0-1", "2-3", "4-7", "8-15")
    assert {t for t in scalars if "by_position" in t} == {
        f"kl/by_position/{b}/{x}" for b in buckets for x in ("k3", "tokens")
    }
    for b, (lo, hi) in zip(buckets, [(0, 2), (2, 4), (4, 8), (8, 16)], strict=True):
        got = [e.value for e in acc.Scalars(f"kl/by_position/{b}/k3")]
        want = []
        for w in range(3):
            lr = torch.cat(
                [
                    (x["ref_logprobs"] - x["logprobs"])[:, lo:hi][x["mask"][:, lo:hi]]
                    for x in batches[2 * w : 2 * w + 2]
                ]
            )
            want.append(float((torch.expm1(lr) - lr).mean()))
        assert got == pytest.approx(want, rel=1e-5), b
    # One text entry per table and window; one histogram per window; nothing else added.
    assert sorted(acc.Tags()["tensors"]) == sorted(
        ["kl/by_position/text_summary", "kl/top_sequences/text_summary", "custom_scalars__config__"]
    )
    for tag in ("kl/by_position", "kl/top_sequences"):
        assert [e.step for e in acc.Tensors(f"{tag}/text_summary")] == [2, 4, 6], tag
    assert [e.step for e in acc.Histograms("kl/log_ratio")] == [2, 4, 6]
    # The window (2, 4] holds the planted row: first, with its text (ids decoded in order).
    table = _rows(texts(acc, "kl/top_sequences")[1])
    assert len(table) == 5
    b, r, ids = _top_row(batches[2:4])
    assert (b, r) == (0, 2)
    step, rank, row = table[0][:3]
    assert (step, rank, row) == ("2", "0", "2")  # the step count when it was fed: 2 steps done
    assert table[0][-1].replace("**", "") == _decode(ids)
    assert table[0][-1].count("**") == 6  # its three highest-KL tokens in bold


def test_wandb_offline_gets_a_table_per_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for key in [k for k in __import__("os").environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    from klmonitor._readers import wandb_records

    wandb.teardown()
    batches = _batches(4)
    run = wandb.init(project="klmonitor-test")
    try:
        mon = Monitor(log_every_n_steps=2, sinks=run, decode=_decode, rules=[])
        for step, b in enumerate(batches, start=1):
            mon.update(**b)
            mon.step(step)
        mon.close()
        run_dir = Path(run.dir).parent
    finally:
        wandb.finish()
    (run_file,) = list(tmp_path.rglob("run-*.wandb"))
    tables: dict[str, list[tuple[int, str]]] = {}
    for rec in wandb_records(run_file):
        if rec.get("type") != "history":
            continue
        item = rec["history"]["item"]
        for name in ("kl/by_position", "kl/top_sequences"):
            if item.get(f"{name}._type") == "table-file":
                tables.setdefault(name, []).append((int(item["trainer/global_step"]), item[f"{name}.path"]))
    assert {n: [s for s, _ in v] for n, v in tables.items()} == {
        "kl/by_position": [2, 4],
        "kl/top_sequences": [2, 4],
    }
    saved = json.loads((run_dir / "files" / tables["kl/top_sequences"][1][1]).read_text())
    assert saved["columns"][-1] == "text" and len(saved["data"]) == 5
    _, _, ids = _top_row(batches[2:4])
    assert saved["data"][0][-1].replace("**", "") == _decode(ids)
    # The report's reader takes the position scalars, not the tables' own fields as scalars.
    from klmonitor._readers import read_wandb

    data = read_wandb(run_file)
    assert "kl/by_position/0-1/k3" in data.scalars
    assert not [t for t in data.scalars if "." in t.rsplit("/", 1)[-1]], sorted(data.scalars)


def test_flat_inputs_and_turned_off_log_none_of_them() -> None:
    flat, off = Recording(), Recording()
    batches = _batches(2)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # nothing to say about [N] inputs
        mon = Monitor(log_every_n_steps=2, sinks=flat)
        for step, b in enumerate(batches, start=1):
            mon.update(**{k: v.reshape(-1) for k, v in b.items()})
            mon.step(step)
    both = Monitor(log_every_n_steps=2, sinks=off, by_position=False, top_sequences=0, decode=_decode)
    for step, b in enumerate(batches, start=1):
        both.update(**b)
        both.step(step)
    for sink in (flat, off):
        assert len(sink.scalars) == 1 and not any("by_position" in k for k in sink.scalars[0])
        assert sink.tables == [] and sink.histograms == [2]


def test_each_window_logs_one_table_of_each_and_the_console_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = Recording()
    mon = Monitor(log_every_n_steps=2, sinks=sink, decode=_decode, rules=[])
    batches = _batches(4)
    for step, b in enumerate(batches, start=1):
        mon.update(**b)
        mon.step(step)
    assert [(n, s) for n, s, _, _ in sink.tables] == [
        ("by_position", 2),
        ("top_sequences", 2),
        ("by_position", 4),
        ("top_sequences", 4),
    ]
    assert all(len(rows) == 5 for n, _, _, rows in sink.tables if n == "top_sequences")
    # The Python log (no sink): one line per window, whatever the diagnostics.
    with caplog.at_level("INFO", logger="klmonitor"):
        alone = Monitor(log_every_n_steps=2, rules=[])
        for step, b in enumerate(batches, start=1):
            alone.update(**b)
            alone.step(step)
    lines = [r.getMessage() for r in caplog.records if r.name == "klmonitor"]
    assert len([ln for ln in lines if ln.startswith("klmonitor step")]) == 2
    assert not any("by_position" in ln or "top_sequences" in ln for ln in lines)


# --------------------------------------------------------------------------------------------
# the Hugging Face Trainer: its tokenizer decodes the top sequences
# --------------------------------------------------------------------------------------------
def _hf_dataset(n: int = 32, length: int = 10) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 16, (length,), generator=g)
        keep = int(torch.randint(5, length + 1, (1,), generator=g))
        att = (torch.arange(length) < keep).long()
        rows.append({"input_ids": ids.masked_fill(att == 0, 0), "attention_mask": att})
    return rows


def _hf_train(out: Path, attach_kwargs: dict[str, Any] | None, callback: Any = None, **args: Any) -> Any:
    pytest.importorskip("transformers")
    from hf_toys import tiny_model, tiny_tokenizer, tiny_training_args
    from transformers import Trainer

    from klmonitor.transformers import attach

    class KLTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            ids, att = inputs["input_ids"], inputs["attention_mask"]
            logp = model(input_ids=ids, attention_mask=att).logits[:, :-1].log_softmax(-1)
            logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            with torch.no_grad():
                ref = self.ref(input_ids=ids, attention_mask=att).logits[:, :-1].log_softmax(-1)
                ref = ref.gather(-1, ids[:, 1:, None]).squeeze(-1)
            mask = att[:, 1:]
            if model.training:
                self.kl.monitor.update(logp, ref, mask, token_ids=ids[:, 1:])
                self.seen.append(
                    (self.state.global_step + 1, logp.detach().double(), ref.double(), mask, ids[:, 1:])
                )
            return -(logp * mask).sum() / mask.sum()

    model = tiny_model()
    targs = tiny_training_args(out, 4, 5e-2, **args)
    trainer = KLTrainer(
        model=model,
        args=targs,
        train_dataset=_hf_dataset(),
        processing_class=tiny_tokenizer(),
        callbacks=[callback] if callback is not None else None,
    )
    trainer.ref, trainer.seen = copy.deepcopy(model).eval(), []
    trainer.kl = callback if callback is not None else attach(trainer, **(attach_kwargs or {}))
    trainer.train()
    return trainer


def _hf_top_ids(trainer: Any, lo: int, hi: int) -> list[int]:
    """The token ids of the window's row with the largest summed k3 (float64 numpy)."""
    best: tuple[float, list[int]] = (-np.inf, [])
    for step, logp, ref, mask, ids in trainer.seen:
        if lo < step <= hi:
            lr = (ref - logp).numpy()
            sums = np.where(mask.bool().numpy(), np.expm1(lr) - lr, 0.0).sum(1)
            r = int(np.argmax(sums))
            if sums[r] > best[0]:
                best = (float(sums[r]), ids[r].tolist())
    return best[1]


def _hf_top_text(trainer: Any, lo: int, hi: int) -> str:
    """The words of the window's top row, from the tokenizer's vocabulary (not ``decode``)."""
    return "".join(trainer.processing_class.convert_ids_to_tokens(_hf_top_ids(trainer, lo, hi)))


def test_hf_attach_decodes_with_the_trainers_processing_class(tmp_path: Path) -> None:
    trainer = _hf_train(tmp_path / "out", {})
    assert trainer.kl.monitor.decode == trainer.processing_class.decode
    (run,) = sorted({p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")})
    acc = events(run)
    logged = texts(acc, "train/kl/top_sequences")
    assert [e.step for e in acc.Tensors("train/kl/top_sequences/text_summary")] == [2, 4]
    for i, (lo, hi) in enumerate([(0, 2), (2, 4)]):
        text = _rows(logged[i])[0][-1]
        assert text.replace("**", "") == _hf_top_text(trainer, lo, hi), (hi, text)
        assert re.search(r"\*\*w\d+\*\*", text), "the highest-KL tokens are bold"
    # The position profile went through the Trainer's log, beside the loss.
    assert any(k.startswith("kl/by_position/") for k in trainer.state.log_history[0])


def test_hf_callback_decodes_and_a_users_decode_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from klmonitor.transformers import KLMonitorCallback

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = _hf_train(tmp_path / "out", None, callback=KLMonitorCallback())
    assert trainer.kl.monitor.decode == trainer.processing_class.decode  # adopted at train begin
    text = _rows(texts(events(tmp_path / "tb"), "kl/top_sequences")[0])[0][-1]
    assert text.replace("**", "") == _hf_top_text(trainer, 0, 2)

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb_user"))
    mine = KLMonitorCallback(decode=lambda ids: "<" + ",".join(map(str, ids)) + ">")
    trainer = _hf_train(tmp_path / "out_user", None, callback=mine)
    assert mine.monitor.decode != trainer.processing_class.decode
    text = _rows(texts(events(tmp_path / "tb_user"), "kl/top_sequences")[0])[0][-1]
    assert text.replace("**", "") == "".join(f"<{i}>" for i in _hf_top_ids(trainer, 0, 2)), text
