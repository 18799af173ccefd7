"""klmonitor without a framework: ``Monitor`` in a plain PyTorch loop.

A per-position categorical policy is pulled towards one token while a KL penalty holds it
near its frozen reference. Each step's log-probs go into ``Monitor.update`` (on device, no
host sync); ``Monitor.step`` ends a window every ``--log-every`` steps: the summary, the
std bands, the custom-scalars layout, the log-ratio histogram and the alerts go to the
``SummaryWriter``, exactly as the Lightning callback sends them.

    python examples/plain_pytorch_loop.py --logdir ./klmonitor_logs
    klmonitor report ./klmonitor_logs --run plain_loop
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

import klmonitor


def report(alert: klmonitor.Alert) -> None:
    print(f"step {alert.step}: [{alert.rule}] ({alert.level.value}) {alert.message}")


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

    writer = SummaryWriter(str(Path(args.logdir) / "plain_loop"))
    monitor = klmonitor.Monitor(log_every_n_steps=args.log_every, sinks=[writer], max_kl=0.5, on_alert=report)
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

        monitor.update(logp, ref_logp, mask)  # detaches; no host sync
        result = monitor.step(step)  # a WindowResult at each window's end, else None
        if result is not None and step % (10 * args.log_every) == 0:
            s = result.summary
            print(f"step {step}: KL per token {s.kl:.4f} ± {2 * s.cv.stderr:.4f} (cv, 2 s.e.), drift {s.drift:.3f}")
        if result is not None and result.stop:
            break
    monitor.flush(step)  # the window still open, if any
    monitor.close()
    writer.close()
    print(f"{len(monitor.alert_history)} alert(s); TensorBoard logs in {Path(args.logdir) / 'plain_loop'}")


if __name__ == "__main__":
    main()
