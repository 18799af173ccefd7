"""klmonitor without Lightning: KLStats and the alert rules in a plain PyTorch loop.

A per-position categorical policy is pulled towards one token while a KL penalty holds it
near its frozen reference. Each step's log-probs go into ``KLStats`` (on device, no host
sync); every ``--log-every`` steps the window's summary is written to TensorBoard with a
``SummaryWriter``, checked by ``AlertEngine(default_rules())``, and reset.

    python examples/plain_pytorch_loop.py --logdir ./klmonitor_logs
    klmonitor report ./klmonitor_logs --run plain_loop
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from klmonitor import KLStats
from klmonitor.alerts import AlertEngine, default_rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--logdir", default="./klmonitor_logs")
    parser.add_argument("--kl-coef", type=float, default=0.2)
    args = parser.parse_args()

    torch.manual_seed(0)
    seq, vocab, batch, target = 8, 10, 128, 3
    ref_logits = 0.5 * torch.randn(seq, vocab)
    logits = ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.01)

    stats = KLStats()
    engine = AlertEngine(default_rules(max_kl=0.5))
    writer = SummaryWriter(str(Path(args.logdir) / "plain_loop"))
    pos = torch.arange(seq)
    for step in range(1, args.steps + 1):
        with torch.no_grad():
            tokens = torch.multinomial(logits.softmax(-1), batch, replacement=True).T  # [B, T]
        logp = logits.log_softmax(-1)[pos, tokens]  # [B, T], with grad
        ref_logp = ref_logits.log_softmax(-1)[pos, tokens]
        mask = torch.rand(batch, seq) < 0.9  # e.g. padding
        reward = ((tokens == target) & mask).float().sum(1)
        reward = reward - args.kl_coef * ((logp.detach() - ref_logp) * mask).sum(1)
        loss = -((reward - reward.mean()) * (logp * mask).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

        stats.update(logp, ref_logp, mask)  # detaches; no host sync
        if step % args.log_every == 0:
            summary = stats.compute()  # the only host transfer of the window
            stats.reset()
            for name, value in summary.to_dict().items():
                writer.add_scalar(name, value, step)
            for alert in engine.evaluate(summary, step):
                print(f"step {step}: [{alert.rule}] ({alert.level.value}) {alert.message}")
                text = f"**{alert.rule}** ({alert.level.value}) at step {alert.step}: {alert.message}"
                writer.add_text("kl/alerts", text, alert.step)  # `klmonitor report` shows these
            if step % (10 * args.log_every) == 0:
                print(
                    f"step {step}: KL per token {summary.kl:.4f} ± {summary.k3.stderr:.4f}, drift {summary.drift:.3f}"
                )
    writer.close()
    print(f"{len(engine.history)} alert(s); TensorBoard logs in {Path(args.logdir) / 'plain_loop'}")


if __name__ == "__main__":
    main()
