"""The smallest complete RLHF-style LightningModule monitored by klmonitor.

A bigram policy (next-token logits from the previous token) is trained with a KL-penalised
REINFORCE update against a frozen copy of itself. ``training_step`` returns the loss and the
sampled tokens' log-probs under the policy and the reference, with the mask: that is all
KLMonitor needs. Metrics and alerts go to TensorBoard and to W&B (offline).

    python examples/lightning_rlhf.py                  # 200 steps, logs in ./klmonitor_logs
    tensorboard --logdir ./klmonitor_logs              # or: klmonitor report ./klmonitor_logs
    python examples/lightning_rlhf.py --steps 20 --no-wandb
"""

from __future__ import annotations

import argparse
import copy

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from klmonitor import KLMonitor

VOCAB, MAX_LEN, EOS, BOS, TARGET = 12, 10, 0, 12, 5


class Bigram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB + 1, VOCAB)  # previous token (or BOS) -> next-token logits
        with torch.no_grad():
            self.table.weight[:, EOS] += 1.0  # sequences end after ~5 tokens

    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probs [B, T] of `tokens` given the previous token."""
        prev = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], dim=1)
        return self.table(prev).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok = torch.full((batch,), BOS)
        out = []
        for _ in range(MAX_LEN):
            tok = torch.multinomial(self.table(tok).softmax(-1), 1).squeeze(1)
            out.append(tok)
        tokens = torch.stack(out, dim=1)
        is_eos = (tokens == EOS).long()
        mask = (is_eos.cumsum(1) - is_eos) == 0  # valid up to and including the first EOS
        return tokens, mask


class RLHF(pl.LightningModule):
    def __init__(self, kl_coef: float = 0.1, batch_size: int = 64) -> None:
        super().__init__()
        self.policy = Bigram()
        self.reference = copy.deepcopy(self.policy).requires_grad_(False)
        self.kl_coef, self.batch_size = kl_coef, batch_size

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        tokens, mask = self.policy.sample(self.batch_size)
        logp = self.policy.logprobs(tokens)
        with torch.no_grad():
            ref_logp = self.reference.logprobs(tokens)
        m = mask.float()
        reward = ((tokens == TARGET) & mask).float().sum(1)  # more TARGET tokens, more reward
        reward = reward - self.kl_coef * ((logp.detach() - ref_logp) * m).sum(1)
        loss = -((reward - reward.mean()) * (logp * m).sum(1)).mean()
        # KLMonitor reads these keys (detaching them itself).
        return {"loss": loss, "logprobs": logp, "ref_logprobs": ref_logp, "mask": mask}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.policy.parameters(), lr=3e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--logdir", default="./klmonitor_logs")
    parser.add_argument("--no-wandb", action="store_true", help="log to TensorBoard only")
    args = parser.parse_args()

    pl.seed_everything(0)
    loggers: list[pl.loggers.Logger] = [TensorBoardLogger(args.logdir, name="lightning_rlhf")]
    if not args.no_wandb:
        from pytorch_lightning.loggers import WandbLogger  # needs `pip install wandb`

        loggers.append(WandbLogger(project="klmonitor-example", save_dir=args.logdir, offline=True))

    monitor = KLMonitor(log_every_n_steps=10)  # default alert rules; max_kl=... adds a budget
    trainer = pl.Trainer(
        max_steps=args.steps,
        logger=loggers,
        callbacks=[monitor],
        enable_checkpointing=False,
        log_every_n_steps=10,
        accelerator="cpu",
    )
    # The batches are sampled in training_step; the loader only counts steps.
    trainer.fit(RLHF(batch_size=args.batch_size), DataLoader(range(args.steps), batch_size=1))

    s = monitor.last_summary
    if s is not None:
        print(
            f"final KL per token: k1 {s.k1.mean:.4f}  k2 {s.k2.mean:.4f}  k3 {s.k3.mean:.4f}  drift {s.drift:.3f}"
        )
    for alert in monitor.alert_history:
        print(f"alert at step {alert.step}: {alert.rule} ({alert.level.value}): {alert.message}")
    if not args.no_wandb:
        import wandb

        wandb.finish()


if __name__ == "__main__":
    main()
