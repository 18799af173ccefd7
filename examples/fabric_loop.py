"""klmonitor with Lightning Fabric: ``Monitor`` fed by your loop, writing to ``fabric.loggers``.

The policy of ``plain_pytorch_loop.py`` (a per-position categorical pulled towards one token
under a KL penalty), trained with Fabric. The monitor writes to every logger Fabric has
(TensorBoard and CSV here) from global rank 0 only; under a multi-process strategy each rank
calls ``update`` and ``step`` alike and the window is reduced over all ranks.

    python examples/fabric_loop.py --logdir ./klmonitor_logs
    klmonitor report ./klmonitor_logs --run fabric_loop
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

import klmonitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--logdir", default="./klmonitor_logs")
    parser.add_argument("--kl-coef", type=float, default=0.2)
    parser.add_argument("--max-kl", type=float, default=None, help="stop when the KL exceeds this")
    args = parser.parse_args()

    loggers = [
        TensorBoardLogger(args.logdir, name="fabric_loop"),
        CSVLogger(args.logdir, name="fabric_loop_csv"),
    ]
    fabric = Fabric(accelerator="cpu", devices=1, loggers=loggers)
    fabric.launch()
    fabric.seed_everything(0)

    seq, vocab, batch, target = 8, 10, 128, 3
    ref_logits = 0.5 * torch.randn(seq, vocab)
    policy = torch.nn.Linear(1, seq * vocab, bias=False)  # one weight per (position, token)
    with torch.no_grad():
        policy.weight.copy_(ref_logits.reshape(-1, 1))
    opt = torch.optim.Adam(policy.parameters(), lr=0.01)
    policy, opt = fabric.setup(policy, opt)

    monitor = klmonitor.Monitor(
        log_every_n_steps=args.log_every,
        sinks=fabric.loggers,
        rank=fabric.global_rank,
        max_kl=args.max_kl,
        stop_on=("kl_budget",) if args.max_kl is not None else (),
    )
    pos = torch.arange(seq)
    step = 0
    for step in range(1, args.steps + 1):
        logits = policy(torch.ones(1, 1)).reshape(seq, vocab)
        with torch.no_grad():
            tokens = torch.multinomial(logits.softmax(-1), batch, replacement=True).T  # [B, T]
        logp = logits.log_softmax(-1)[pos, tokens]
        ref_logp = ref_logits.log_softmax(-1)[pos, tokens]
        reward = (tokens == target).float().sum(1) - args.kl_coef * (logp.detach() - ref_logp).sum(1)
        loss = -((reward - reward.mean()) * logp.sum(1)).mean()
        opt.zero_grad()
        fabric.backward(loss)
        opt.step()

        monitor.update(logp, ref_logp)
        result = monitor.step(step)
        if result is not None and result.stop:
            fabric.print(f"stopping at step {step}: {[a.rule for a in result.alerts]}")
            break
    monitor.flush(step)
    monitor.close()
    for logger in fabric.loggers:
        logger.finalize("success")
    s = monitor.last_summary
    if s is not None:
        fabric.print(
            f"final KL per token: k3 {s.kl:.4f} ± {s.k3.stderr:.4f}; {len(monitor.alert_history)} alert(s)"
        )


if __name__ == "__main__":
    main()
