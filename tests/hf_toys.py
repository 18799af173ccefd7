"""A tiny random GPT-2 and a word-level tokenizer built in code (no downloads), and a TensorBoard reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

WORDS = [f"w{i}" for i in range(13)]


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_model(vocab_size: int = 16, seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_layer=1,
        n_embd=32,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return GPT2LMHeadModel(cfg)


def tiny_training_args(out: Path, max_steps: int, learning_rate: float, **args: Any) -> Any:
    """CPU ``TrainingArguments`` for the tiny model: batch 4, seed 0, no progress bar.

    Logs every 2 steps to TensorBoard and saves no checkpoint, unless ``args`` says otherwise.
    """
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **{"logging_steps": 2, "report_to": ["tensorboard"], "save_strategy": "no", **args},
    )


def read_tensorboard(
    logdir: Path, alerts: str = "kl/alerts"
) -> tuple[dict[str, tuple[list[int], list[float]]], list[tuple[int, str]]]:
    """``({tag: (steps, values)}, [(step, alert text)])`` from every event file under ``logdir``.

    ``alerts``: the tag of klmonitor's alert texts (``train/kl/alerts`` in a Trainer's own run).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, tuple[list[int], list[float]]] = {}
    texts: list[tuple[int, str]] = []
    for run_dir in sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            scalars[tag] = ([e.step for e in events], [e.value for e in events])
        for tag in acc.Tags()["tensors"]:
            if tag.startswith(alerts):
                for e in acc.Tensors(tag):
                    texts.append((e.step, b"".join(e.tensor_proto.string_val).decode()))
    return scalars, sorted(texts)


def reference_window(
    records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]], lo: int, hi: int
) -> dict[str, float]:
    """Float64 numpy k1/k2/k3 mean and std over the tokens of micro-batches of steps ``(lo, hi]``."""
    lr = np.concatenate(
        [
            (ref.double() - logp.double()).numpy()[mask.bool().numpy()]
            for step, logp, ref, mask in records
            if lo < step <= hi
        ]
    )
    k1, k2, k3 = -lr, lr**2 / 2, np.expm1(lr) - lr
    return {
        "kl/k1/mean": k1.mean(),
        "kl/k2/mean": k2.mean(),
        "kl/k3/mean": k3.mean(),
        "kl/k3/std": k3.std(ddof=1),
        "kl/k1/std": k1.std(ddof=1),
        "kl/tokens": float(lr.size),
    }
