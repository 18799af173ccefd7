"""``klmonitor demo``: a small, real RL fine-tune on CPU, monitored by :class:`~klmonitor.KLMonitor`.

The policy is a tiny GRU language model over 16 tokens (token 0 ends a sequence, so
sequences have different lengths and the mask is real). The reference is a frozen deep copy
of the initial policy. The reward is 1 for a sequence that contains the target token, which
the reference rarely emits, so the policy is pulled away from the reference. The update is
REINFORCE with a batch-mean baseline on the KL-penalised reward
``reward - kl_coef * sum_t (log q - log p)``, the classic RLHF objective, run by a
``pytorch_lightning.Trainer``. As the policy learns to emit the target token, per-token KL
grows past the run's KL budget (``max_kl``, 0.1 nats per token by default) and the monitor's
``kl_budget`` rule fires; the k2-k3 gap opens as it goes.
"""

from __future__ import annotations

import copy
import logging
import math
import netrc
import os
import shlex
import textwrap
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from klmonitor.stats import KLSummary

if TYPE_CHECKING:  # pragma: no cover
    from klmonitor.alerts import Alert

__all__ = ["DemoRLHF", "DemoResult", "TinyPolicy", "decode_tokens", "format_result", "reward_fn", "run_demo"]

LoggerName = Literal["tensorboard", "wandb", "csv"]
LOGGERS: tuple[str, ...] = ("tensorboard", "wandb", "csv")

VOCAB = 16
"""Tokens of the toy language; token :data:`EOS` ends a sequence."""
EOS = 0
TARGET = 3
"""The token the reward asks for (the reference emits it rarely)."""
MAX_LEN = 16
HIDDEN = 32


def decode_tokens(ids: list[int]) -> str:
    """The toy language's text: tokens as letters, :data:`TARGET` as ``D``, :data:`EOS` as ``.``.

    >>> decode_tokens([1, 3, 0])
    'bD.'
    """
    return "".join("." if i == EOS else ("D" if i == TARGET else "abcdefghijklmnop"[i]) for i in ids)


class TinyPolicy(nn.Module):
    """A one-layer GRU language model over :data:`VOCAB` tokens with a start token.

    Args:
        vocab: number of output tokens (token ``eos`` ends a sequence).
        hidden: embedding and GRU width.
        eos: id of the end token.
        target: id of the token the demo rewards; its initial logit is lowered so the
            reference rarely emits it.

    >>> pol = TinyPolicy()
    >>> tokens, mask = pol.sample(4, max_len=8, generator=torch.Generator().manual_seed(0))
    >>> tokens.shape, mask.dtype, pol.token_logprobs(tokens).shape
    (torch.Size([4, 8]), torch.bool, torch.Size([4, 8]))
    """

    def __init__(
        self, vocab: int = VOCAB, hidden: int = HIDDEN, eos: int = EOS, target: int = TARGET
    ) -> None:
        super().__init__()
        self.vocab, self.eos, self.bos = vocab, eos, vocab  # the start token is one past the vocabulary
        self.embed = nn.Embedding(vocab + 1, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        with torch.no_grad():
            # A "pretrained" shape: sequences end after ~6 tokens on average; the target is rare.
            self.head.bias.zero_()
            self.head.bias[eos] = 0.8
            self.head.bias[target] = -1.0

    def forward(self, inputs: Tensor) -> Tensor:
        """Next-token logits ``[B, T, vocab]`` for input tokens ``[B, T]``."""
        out, _ = self.rnn(self.embed(inputs))
        logits: Tensor = self.head(out)
        return logits

    @torch.no_grad()
    def sample(
        self, batch: int, max_len: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Sample ``batch`` sequences of at most ``max_len`` tokens.

        Returns:
            ``(tokens, mask)``, both ``[batch, max_len]``: the mask is True up to and
            including each sequence's end token (a sequence that never ends is cut at
            ``max_len``); positions after it hold ``eos`` and are masked out.
        """
        device = self.head.weight.device
        x = torch.full((batch, 1), self.bos, dtype=torch.long, device=device)
        h: Tensor | None = None
        steps = []
        for _ in range(max_len):
            out, h = self.rnn(self.embed(x), h)
            probs = self.head(out[:, -1]).softmax(-1)
            x = torch.multinomial(probs, 1, generator=generator)
            steps.append(x)
        tokens = torch.cat(steps, dim=1)
        is_eos = tokens == self.eos
        ended_before = is_eos.long().cumsum(1) - is_eos.long()  # end tokens strictly before t
        mask = ended_before == 0
        return tokens.masked_fill(~mask, self.eos), mask

    def token_logprobs(self, tokens: Tensor) -> Tensor:
        """Log-probs ``[B, T]`` of ``tokens`` given their prefixes (teacher forcing)."""
        start = torch.full_like(tokens[:, :1], self.bos)
        logits = self(torch.cat([start, tokens[:, :-1]], dim=1))
        return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def reward_fn(tokens: Tensor, mask: Tensor, target: int = TARGET, eos: int = EOS) -> Tensor:
    """1.0 for each sequence that contains ``target`` before its end, else 0.0.

    >>> reward_fn(torch.tensor([[3, 0, 3], [1, 2, 0]]), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())
    tensor([1., 0.])
    """
    hit = (tokens == target) & mask & (tokens != eos)
    return hit.any(dim=1).float()


@dataclass
class DemoResult:
    """What a demo run produced.

    Attributes:
        steps: optimizer steps run.
        kl_coef: the KL penalty coefficient.
        seed: the seed.
        logger: ``"tensorboard"``, ``"wandb"`` or ``"csv"``.
        logdir: the ``--logdir`` given (the root a dashboard is opened on).
        run_dir: where this run's files are (e.g. ``logdir/demo/version_0``).
        wall_s: seconds spent in ``Trainer.fit``.
        summary: the last logged window's :class:`~klmonitor.KLSummary`.
        alerts: the alerts the monitor fired, oldest first.
        rewards: the mean reward of each step's batch.
        history: ``(step, summary)`` of every logged window, oldest first.
        wandb_offline: the W&B run was written offline (to upload with ``wandb sync``).
    """

    steps: int
    kl_coef: float
    seed: int
    logger: str
    logdir: Path
    run_dir: Path
    wall_s: float
    summary: KLSummary | None
    alerts: list[Alert] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    history: list[tuple[int, KLSummary]] = field(default_factory=list)
    wandb_offline: bool = False

    @property
    def fired(self) -> list[str]:
        """Names of the rules that fired, in order of first firing, without repeats."""
        return list(dict.fromkeys(a.rule for a in self.alerts))

    def __str__(self) -> str:
        return format_result(self)


class DemoRLHF(pl.LightningModule):
    """KL-penalised REINFORCE on :class:`TinyPolicy` against its frozen initial copy.

    ``training_step`` samples a batch from the current policy (no grad), scores it, and
    returns the loss with the sampled tokens' log-probs under the policy (with grad) and the
    reference (no grad) and the mask, as :class:`~klmonitor.KLMonitor` expects.

    Args:
        kl_coef: weight of the KL penalty (k1 summed over each sequence) in the reward.
        lr: Adam learning rate.
        batch_size: sequences sampled per step.
        max_len: longest sequence.
        seed: seed of the sampler.
    """

    def __init__(self, kl_coef: float, lr: float, batch_size: int, max_len: int, seed: int) -> None:
        super().__init__()
        self.kl_coef, self.lr, self.batch_size, self.max_len = kl_coef, lr, batch_size, max_len
        self.policy = TinyPolicy()
        self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.gen = torch.Generator().manual_seed(seed)
        self.rewards: list[float] = []

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """One policy-gradient step on a freshly sampled batch."""
        tokens, mask = self.policy.sample(self.batch_size, self.max_len, generator=self.gen)
        logp = self.policy.token_logprobs(tokens)
        with torch.no_grad():
            ref_logp = self.reference.token_logprobs(tokens)
        m = mask.to(logp.dtype)
        reward = reward_fn(tokens, mask)
        kl_seq = ((logp.detach() - ref_logp) * m).sum(1)
        shaped = reward - self.kl_coef * kl_seq
        advantage = shaped - shaped.mean()
        loss = -(advantage * (logp * m).sum(1)).mean()
        mean_reward = reward.mean()
        self.rewards.append(float(mean_reward))  # a CPU demo: one tiny sync per step is fine
        self.log("reward", mean_reward, prog_bar=True, on_step=True, on_epoch=False)
        return {"loss": loss, "logprobs": logp, "ref_logprobs": ref_logp, "mask": mask, "token_ids": tokens}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the policy only (the reference is frozen)."""
        return torch.optim.Adam(self.policy.parameters(), lr=self.lr)


class _Steps(Dataset[int]):
    """Dummy indices: one item per step."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _History(pl.Callback):
    """Keeps every summary the monitor logs (placed after it in the callback list)."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.summaries: list[tuple[int, KLSummary]] = []

    def _take(self, trainer: pl.Trainer) -> None:
        s = self.monitor.last_summary
        if s is not None and (not self.summaries or self.summaries[-1][1] is not s):
            # the step the window was logged at (Lightning's grid, as in TensorBoard)
            step = self.monitor._log_step
            self.summaries.append((int(trainer.global_step) if step is None else step, s))

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._take(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take(trainer)


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


def _make_logger(logger: str, logdir: Path) -> tuple[Any, bool]:
    """The Lightning logger, and whether it is a W&B logger running offline."""
    if logger == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        return TensorBoardLogger(str(logdir), name="demo"), False
    if logger == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(str(logdir), name="demo"), False
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise ValueError("--logger wandb needs the wandb package: pip install 'klmonitor[wandb]'") from exc
    from pytorch_lightning.loggers import WandbLogger

    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not _wandb_has_key()
    if offline:
        os.environ["WANDB_MODE"] = "offline"
    return WandbLogger(project="klmonitor-demo", save_dir=str(logdir), offline=offline), offline


def _run_dir(logger: Any, logdir: Path) -> Path:
    try:
        if type(logger).__name__ == "WandbLogger":
            return Path(logger.experiment.dir).parent
        return Path(logger.log_dir)
    except Exception:  # a logger without a directory: report the root
        return logdir


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up banner (GPU/TPU availability) and its dataloader hints."""
    names = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            # The frozen reference is in eval mode on purpose.
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
            # Lightning's pytree shim on newer torch; not ours to fix.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_demo(
    steps: int = 300,
    kl_coef: float = 0.1,
    seed: int = 0,
    logdir: str | os.PathLike[str] = "./klmonitor_logs",
    logger: str = "tensorboard",
    batch_size: int = 64,
    lr: float = 1e-3,
    max_len: int = MAX_LEN,
    log_every_n_steps: int = 10,
    max_kl: float | None = 0.1,
    progress_bar: bool = True,
) -> DemoResult:
    """Fine-tune a tiny policy with a KL-penalised policy gradient, monitored by KLMonitor.

    With the defaults (about 10 s of training on two CPU cores, 20 s with start-up) the
    policy drifts to a per-token KL of about 0.2 and passes the KL budget of 0.1 nats per
    token, and the ``kl_budget`` alert fires.

    Args:
        steps: optimizer steps (``Trainer(max_steps=steps)``).
        kl_coef: weight of the KL penalty in the reward; larger keeps the policy closer.
        seed: seeds the model initialisation and the sampler; a rerun with the same seed
            gives the same run (training uses one CPU thread).
        logdir: root directory of the logs (the run goes to ``logdir/demo/version_N`` for
            TensorBoard and CSV, ``logdir/wandb/...`` for W&B).
        logger: ``"tensorboard"``, ``"wandb"`` (offline unless an API key is configured) or
            ``"csv"``.
        batch_size: sequences sampled per step.
        lr: Adam learning rate.
        max_len: longest sequence (sequences that never emit the end token are cut here).
        log_every_n_steps: steps per monitoring window (the Trainer's and the monitor's).
        max_kl: the KL budget per token for the monitor's ``kl_budget`` rule (``None``: none).
        progress_bar: show Lightning's progress bar (with the reward and the KL).

    Returns:
        A :class:`DemoResult`; ``str(result)`` is the summary table.

    Raises:
        ValueError: an argument out of range or an unknown logger.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(kl_coef, int | float) or not math.isfinite(kl_coef) or kl_coef < 0:
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    if logger not in LOGGERS:
        raise ValueError(f"logger must be one of {', '.join(LOGGERS)}; got {logger!r}")
    if batch_size < 1 or max_len < 1 or log_every_n_steps < 1:
        raise ValueError("batch_size, max_len and log_every_n_steps must be positive integers")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")

    root = Path(logdir)
    threads = torch.get_num_threads()
    # The model is tiny: one thread is fastest, and on a busy machine several threads
    # waiting for each other make every step many times slower.
    torch.set_num_threads(1)
    # wandb and Lightning's WandbLogger change WANDB_* variables (WANDB_MODE, WANDB_SERVICE)
    # process-wide; put them back so later runs and child processes start clean.
    wandb_env = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
    try:
        return _run(
            steps=steps,
            kl_coef=float(kl_coef),
            seed=seed,
            root=root,
            logger=logger,
            batch_size=batch_size,
            lr=lr,
            max_len=max_len,
            log_every_n_steps=log_every_n_steps,
            max_kl=max_kl,
            progress_bar=progress_bar,
        )
    finally:
        torch.set_num_threads(threads)
        if logger == "wandb":
            for key in [k for k in os.environ if k.startswith("WANDB_")]:
                if key not in wandb_env:
                    del os.environ[key]
            os.environ.update(wandb_env)


def _run(
    *,
    steps: int,
    kl_coef: float,
    seed: int,
    root: Path,
    logger: str,
    batch_size: int,
    lr: float,
    max_len: int,
    log_every_n_steps: int,
    max_kl: float | None,
    progress_bar: bool,
) -> DemoResult:
    from klmonitor.pytorch_lightning import KLMonitor

    with _quiet_lightning():
        pl.seed_everything(seed, verbose=False)
        module = DemoRLHF(kl_coef, lr, batch_size, max_len, seed)
        monitor = KLMonitor(log_every_n_steps=log_every_n_steps, max_kl=max_kl, decode=decode_tokens)
        history = _History(monitor)
        lg, offline = _make_logger(logger, root)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            max_epochs=1,
            logger=lg,
            callbacks=[monitor, history],
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
            log_every_n_steps=log_every_n_steps,
        )
        # The data are sampled inside training_step; the loader only counts the steps.
        loader: DataLoader[int] = DataLoader(_Steps(steps), batch_size=1)
        t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        wall = time.perf_counter() - t0
        run_dir = _run_dir(lg, root)
        if logger == "wandb":
            lg.experiment.finish()
    return DemoResult(
        steps=int(trainer.global_step),
        kl_coef=kl_coef,
        seed=seed,
        logger=logger,
        logdir=root,
        run_dir=run_dir,
        wall_s=wall,
        summary=monitor.last_summary,
        alerts=list(monitor.alert_history),
        rewards=module.rewards,
        history=history.summaries,
        wandb_offline=offline,
    )


def _fmt(x: float, width: int = 9) -> str:
    return f"{x:{width}.4f}" if math.isfinite(x) else f"{'n/a':>{width}}"


def format_result(result: DemoResult) -> str:
    """The demo's summary table and the commands that open its dashboard."""
    lines = [
        f"klmonitor demo: {result.steps} steps, kl_coef {result.kl_coef:g}, seed {result.seed}, "
        f"{result.wall_s:.1f} s of training"
    ]
    if result.rewards:
        k = max(1, min(10, len(result.rewards) // 5))
        start = sum(result.rewards[:k]) / k
        end = sum(result.rewards[-k:]) / k
        lines.append(f"reward (sequences containing token {TARGET}): {start:.2f} -> {end:.2f}")
    if result.history and result.history[0][1].count > 0:
        step, first = result.history[0]
        lines.append(
            f"KL per token (cv): {first.kl:.2g} at step {step} (the policy starts as a copy of the "
            f"reference) -> {result.history[-1][1].kl:.2g} at step {result.history[-1][0]}"
        )
    s = result.summary
    lines.append("")
    if s is None or s.count == 0:
        lines.append("no KL window was logged")
    else:
        lines.append(f"final window ({s.tokens} tokens), KL(policy || reference) per token:")
        lines.append(f"  {'estimator':<10}{'mean':>9}  {'± std':>9}")
        for name in ("k1", "k2", "k3", "cv"):
            st = s.estimator(name)
            lines.append(f"  {name:<10}{_fmt(st.mean)}  {_fmt(st.std)}")
        lines.append(f"  {'drift':<10}{_fmt(s.drift)}  (k2 - k3) / k3, {s.drift_z:.1f} standard errors")
    lines.append("")
    if result.alerts:
        lines.append(f"alerts fired ({len(result.alerts)}):")
        for a in result.alerts:
            lines.append(
                f"  step {a.step:>5}  {a.rule:<18} {a.level.value:<5}  value {a.value:.3g} "
                f"(threshold {a.threshold:.3g})"
            )
        text = f"first alert: {result.alerts[0].message}"
        lines.extend(textwrap.wrap(text, width=100, subsequent_indent="  "))
    else:
        lines.append("alerts fired: none")
    lines.append("")
    where = shlex.quote(str(result.logdir))
    if result.logger == "tensorboard":
        lines.append(f"logs: {result.run_dir}")
        lines.append(f"open the dashboard:  tensorboard --logdir {where}")
        lines.append(f"render a PNG report: klmonitor report {where}")
    elif result.logger == "csv":
        lines.append(f"metrics: {result.run_dir / 'metrics.csv'}")
    else:
        lines.append(f"W&B run files: {result.run_dir}")
        if result.wandb_offline:
            lines.append(f"upload it:  wandb sync {shlex.quote(str(result.run_dir))}")
    return "\n".join(lines)
