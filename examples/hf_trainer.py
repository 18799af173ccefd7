"""klmonitor in a Hugging Face ``Trainer``: ``attach(trainer)``, and a custom ``compute_loss`` feeds it.

A tiny randomly initialised GPT-2 (a tokenizer built in code: nothing is downloaded) is tuned
with REINFORCE to write one word often, under a KL penalty to its frozen initial copy. In
``compute_loss`` the policy samples completions, scores them under itself and the reference,
and passes the sampled tokens' log-probs to ``kl.monitor.update`` (on device, no host sync).
``attach(trainer)`` ends a window at each of the Trainer's logging steps and adds the ``kl/*``
numbers to the Trainer's own log: every ``report_to`` integration writes them beside the loss
(TensorBoard as ``train/kl/...``), ``trainer.state.log_history`` has them, and an alert is
raised when the KL passes ``max_kl``.

    python examples/hf_trainer.py --logdir ./klmonitor_logs
    klmonitor report ./klmonitor_logs/hf_trainer/runs/<run> --prefix train/kl/
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer, TrainingArguments

from klmonitor.transformers import KLMonitorCallback, attach

WORDS = [f"w{i}" for i in range(13)]
TARGET = "w3"  # the word the reward asks for


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_model(vocab_size: int) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=vocab_size,
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
    return GPT2LMHeadModel(cfg)


def completion_logps(model: torch.nn.Module, seqs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Log-probs of the tokens after the prompt, ``[B, T]``."""
    logits = model(input_ids=seqs, attention_mask=torch.ones_like(seqs)).logits[:, prompt_len - 1 : -1]
    return logits.log_softmax(-1).gather(-1, seqs[:, prompt_len:, None]).squeeze(-1)


class ReinforceTrainer(Trainer):
    """REINFORCE with a KL penalty; every micro-batch's log-probs go to the KL monitor."""

    def __init__(
        self,
        *args: Any,
        ref_model: torch.nn.Module,
        max_kl: float,
        kl_coef: float,
        target: int,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        # kl/* through the Trainer's own log, at its logging steps, beside the loss.
        self.kl: KLMonitorCallback = attach(self, max_kl=max_kl)
        self.ref_model, self.kl_coef, self.target = ref_model, kl_coef, target

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        prompts = inputs["input_ids"]
        with torch.no_grad():
            seqs = self.accelerator.unwrap_model(model).generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                max_new_tokens=8,
                min_new_tokens=8,
                pad_token_id=0,
            )
            ref_logp = completion_logps(self.ref_model, seqs, prompts.size(1))
        logp = completion_logps(model, seqs, prompts.size(1))

        if model.training:  # the Trainer's evaluation calls compute_loss too
            self.kl.monitor.update(logp, ref_logp)  # the one line klmonitor needs

        completion = seqs[:, prompts.size(1) :]
        reward = (completion == self.target).float().sum(1)
        reward = reward - self.kl_coef * (logp.detach() - ref_logp).sum(1)
        advantage = reward - reward.mean()
        return -(advantage * logp.sum(1)).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--logdir", default="./klmonitor_logs")
    parser.add_argument("--max-kl", type=float, default=0.5)
    parser.add_argument("--kl-coef", type=float, default=0.1)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    prompts = [
        tokenizer(" ".join(WORDS[(i + j) % 13] for j in range(3)), return_tensors="pt") for i in range(64)
    ]
    dataset = [{"input_ids": p["input_ids"][0]} for p in prompts]

    trainer = ReinforceTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(Path(args.logdir) / "hf_trainer"),
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=1e-2,
            logging_steps=args.log_every,
            report_to=["tensorboard"],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=dataset,
        ref_model=ref_model,
        max_kl=args.max_kl,
        kl_coef=args.kl_coef,
        target=tokenizer.convert_tokens_to_ids(TARGET),
    )
    trainer.train()

    kl = trainer.kl
    summary = kl.monitor.last_summary
    assert summary is not None
    print(
        f"final KL per token: k1 {summary.k1.mean:.4f}  k2 {summary.k2.mean:.4f}  "
        f"k3 {summary.k3.mean:.4f} ± {summary.k3.stderr:.4f}  ({summary.tokens} tokens)"
    )
    for alert in kl.monitor.alert_history:
        print(f"[{alert.rule}] ({alert.level.value}) step {alert.step}: {alert.message}")
    logged = [e["step"] for e in trainer.state.log_history if "kl/k3/mean" in e]
    print(f"kl/* in trainer.state.log_history at steps {logged}")
    runs = sorted({str(p.parent) for p in (Path(args.logdir) / "hf_trainer").rglob("events.out.tfevents.*")})
    print(f"TensorBoard run (the Trainer's, kl/* under train/kl/): {runs[-1] if runs else None}")


if __name__ == "__main__":
    main()
