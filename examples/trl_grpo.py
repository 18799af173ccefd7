"""klmonitor with TRL's GRPOTrainer: KLMonitorGRPOTrainer instead of GRPOTrainer, nothing else.

A tiny randomly initialised GPT-2 and a tokenizer built in code are saved to a temporary
folder (GRPOTrainer loads its model and reference from a path; nothing is downloaded), then
tuned with GRPO to write one word often. ``KLMonitorGRPOTrainer`` feeds every micro-batch's
completion log-probs (policy, and the reference TRL computes when ``beta > 0``) to a
``KLMonitorCallback``: k1/k2/k3 with their spread, drift, alerts, in TRL's own log beside its
``kl`` and ``reward`` (every ``report_to`` tracker; TensorBoard as ``train/kl/...``).

    python examples/trl_grpo.py --logdir ./klmonitor_logs
    klmonitor report ./klmonitor_logs/trl_grpo/runs/<run> --prefix train/kl/
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from trl import GRPOConfig

from klmonitor.trl import KLMonitorGRPOTrainer

WORDS = [f"w{i}" for i in range(13)]
TARGET = "w3"  # the word the reward asks for


def save_tiny_model(path: Path) -> None:
    """A 1-layer GPT-2 with random weights and a word-level tokenizer, as a model folder."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    cfg = GPT2Config(
        vocab_size=len(vocab),
        n_positions=32,
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
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)


def reward_target_word(completions: list[str], **kwargs: object) -> list[float]:
    return [float(c.split().count(TARGET)) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--logdir", default="./klmonitor_logs")
    parser.add_argument(
        "--beta", type=float, default=0.04, help="TRL's KL coefficient; > 0 for reference log-probs"
    )
    parser.add_argument("--max-kl", type=float, default=0.5)
    args = parser.parse_args()

    prompts = Dataset.from_dict(
        {"prompt": [" ".join(WORDS[(i + j) % 13] for j in range(3)) for i in range(64)]}
    )
    with tempfile.TemporaryDirectory() as model_dir:
        save_tiny_model(Path(model_dir))
        trainer = KLMonitorGRPOTrainer(
            model=model_dir,
            reward_funcs=reward_target_word,
            args=GRPOConfig(
                output_dir=str(Path(args.logdir) / "trl_grpo"),
                beta=args.beta,
                max_steps=args.steps,
                per_device_train_batch_size=8,
                num_generations=8,
                max_completion_length=8,
                learning_rate=1e-2,
                logging_steps=args.log_every,
                report_to=["tensorboard"],
                save_strategy="no",
                use_cpu=True,
                bf16=False,
                disable_tqdm=True,
            ),
            train_dataset=prompts,
            kl_monitor={"max_kl": args.max_kl},  # KLMonitorCallback's arguments
        )
        trainer.train()

    summary = trainer.kl_callback.monitor.last_summary
    assert summary is not None
    print(
        f"final KL per token: k1 {summary.k1.mean:.4f}  k2 {summary.k2.mean:.4f}  "
        f"k3 {summary.k3.mean:.4f} ± {summary.k3.stderr:.4f}  ({summary.tokens} tokens)"
    )
    for alert in trainer.kl_callback.monitor.alert_history:
        print(f"[{alert.rule}] ({alert.level.value}) step {alert.step}: {alert.message}")
    last = [e for e in trainer.state.log_history if "kl/k3/mean" in e and "kl" in e][-1]
    print(f"step {last['step']}: TRL's kl {last['kl']:.4f}, klmonitor's kl/k3/mean {last['kl/k3/mean']:.4f}")
    runs = sorted({str(p.parent) for p in (Path(args.logdir) / "trl_grpo").rglob("events.out.tfevents.*")})
    print(f"TensorBoard run (TRL's, kl/* under train/kl/): {runs[-1] if runs else None}")


if __name__ == "__main__":
    main()
