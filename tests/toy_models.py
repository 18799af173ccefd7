"""A tiny RL fine-tune for callback tests: a per-position categorical policy and its reference.

The data of step ``s`` depends only on ``seed``, ``s`` and the parameters, so a run resumed
from a checkpoint sees exactly the batches an uninterrupted run sees. Each step's inputs
are recorded (on CPU, float64) so tests can recompute every logged number independently.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Steps(Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _ToyPolicyBody:
    """Policy logits per position; the reference is the initial (uniform-ish) logits.

    The body of :class:`ToyPolicy` (a ``pytorch_lightning`` module) and of
    :func:`lightning_toy_policy`'s class (a ``lightning.pytorch`` module).

    Args:
        lr: learning rate; 0 keeps the policy equal to the reference (KL exactly 0).
        pull: reward weight for token 0 (drives drift away from the reference).
        mask_p: probability a token is masked out (1 = all masked).
        bad: None, "nan" (NaN log-prob at one token), "int" (integer log-probs), "shape"
            (mismatched reference shape) or "missing" (no ref key), applied on every step.
        output: "dict" (default) or "tensor" (return only the loss).
        manual: manual optimisation instead of automatic.
        log_reward: ``self.log("reward", ...)`` every step, as users do (Lightning's own grid).
    """

    def __init__(
        self,
        vocab: int = 12,
        seq: int = 10,
        batch: int = 16,
        lr: float = 0.5,
        pull: float = 1.0,
        mask_p: float = 0.2,
        seed: int = 0,
        bad: str | None = None,
        output: str = "dict",
        manual: bool = False,
        record: bool = True,
        log_reward: bool = False,
    ) -> None:
        super().__init__()  # the LightningModule's
        g = torch.Generator().manual_seed(seed)
        init = 0.3 * torch.randn(seq, vocab, generator=g)
        self.logits = nn.Parameter(init.clone())
        self.register_buffer("ref_logits", init.clone())
        self.vocab, self.seq, self.batch = vocab, seq, batch
        self.lr, self.pull, self.mask_p, self.seed = lr, pull, mask_p, seed
        self.bad, self.output = bad, output
        self.automatic_optimization = not manual
        self.record = record
        self.log_reward = log_reward
        self.seen: list[dict[str, Any]] = []

    def _data(self, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Seeded by the step (and the micro-batch within it), never by a running counter, so a
        # resumed run draws exactly what an uninterrupted one draws.
        micro = batch_idx % self.trainer.accumulate_grad_batches
        g = torch.Generator().manual_seed(self.seed * 100_003 + int(self.global_step) * 64 + micro)
        with torch.no_grad():
            probs = self.logits.softmax(-1)
            tokens = torch.multinomial(probs, self.batch, replacement=True, generator=g).T  # [B, T]
            mask = torch.rand(self.batch, self.seq, generator=g) >= self.mask_p
        pos = torch.arange(self.seq)
        logp = self.logits.log_softmax(-1)[pos, tokens]
        ref = self.ref_logits.log_softmax(-1)[pos, tokens]
        return tokens, logp, ref, mask

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        tokens, logp, ref, mask = self._data(batch_idx)
        reward = self.pull * (tokens == 0).float().sum(-1)
        adv = reward - reward.mean()
        if self.log_reward:
            self.log("reward", reward.mean())
        loss = -(adv * (logp * mask).sum(-1)).mean() + 1e-3 * (logp * mask).sum() / mask.sum().clamp_min(1)
        if self.record:
            self.seen.append(
                {
                    "step": int(self.global_step),
                    "logp": logp.detach().double().clone(),
                    "ref": ref.detach().double().clone(),
                    "mask": mask.clone(),
                }
            )
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            opt.step()  # type: ignore[union-attr]
        if self.output == "tensor":
            return loss
        out: dict[str, Any] = {"loss": loss, "logprobs": logp, "ref_logprobs": ref, "mask": mask}
        if self.bad == "nan":
            bad = ref.detach().clone()
            bad[0, 0] = float("nan")
            bad[1, 1] = float("-inf")
            out["ref_logprobs"] = bad
            out["mask"] = torch.ones_like(mask)
        elif self.bad == "int":
            out["logprobs"] = tokens
        elif self.bad == "shape":
            out["ref_logprobs"] = ref[:, :-1]
        elif self.bad == "missing":
            del out["ref_logprobs"]
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[int]:
        return DataLoader(Steps(100_000), batch_size=1)


class ToyPolicy(_ToyPolicyBody, pl.LightningModule):  # type: ignore[misc]
    __doc__ = _ToyPolicyBody.__doc__


def lightning_toy_policy() -> type:
    """:class:`ToyPolicy` for the unified ``lightning`` package."""
    import lightning.pytorch as L

    class LToyPolicy(_ToyPolicyBody, L.LightningModule):  # type: ignore[misc]
        pass

    return LToyPolicy


def make_trainer(
    tmp_path: Any,
    steps: int,
    loggers: Any = None,
    callbacks: Any = None,
    package: str = "pytorch_lightning",
    **kw: Any,
) -> Any:
    """A quiet CPU Trainer for tests (of ``package``: ``pytorch_lightning`` or ``lightning``)."""
    trainer_cls = (
        pl.Trainer if package == "pytorch_lightning" else __import__("lightning.pytorch").pytorch.Trainer
    )
    return trainer_cls(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=loggers if loggers is not None else False,
        callbacks=callbacks or [],
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        log_every_n_steps=kw.pop("log_every_n_steps", 5),
        **kw,
    )


def window_reference(seen: list[dict[str, Any]], lo: int, hi: int) -> dict[str, float]:
    """Float64 statistics of the tokens recorded at steps lo <= step < hi (independent of klmonitor)."""
    import numpy as np

    ls = []
    for rec in seen:
        if lo <= rec["step"] < hi:
            m = rec["mask"].numpy().astype(bool)
            ls.append((rec["ref"].numpy() - rec["logp"].numpy())[m])
    lr = np.concatenate(ls) if ls else np.zeros(0)
    k1 = -lr
    k2 = lr * lr / 2
    k3 = np.expm1(lr) - lr
    out = {"tokens": float(lr.size)}
    for name, v in (("k1", k1), ("k2", k2), ("k3", k3)):
        out[f"{name}/mean"] = float(v.mean()) if v.size else float("nan")
        out[f"{name}/std"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    out["drift_k2_k3"] = float((k2.mean() - k3.mean()) / k3.mean()) if v.size and k3.mean() > 0 else 0.0
    return out
