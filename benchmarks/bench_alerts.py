"""Every default alert rule on real training runs: clean runs stay quiet, planted faults are caught.

Each scenario trains a tiny GRU language model (vocabulary 256, LM-like Zipf-shaped next-token
distributions) on CPU with a KL-penalised policy gradient (REINFORCE with a batch-mean
baseline on ``reward - kl_coef * sum_t (log q - log p)``) against its frozen initial copy, as
``klmonitor demo`` does, and feeds every step to a :class:`klmonitor.Monitor` with all the
default rules. The sampler is a separate copy of the policy that samples token by token (as
an inference engine does) and returns its own log-probs of the sampled tokens, which go to
the monitor as ``rollout_logprobs``; the trainer scores the sequences in one teacher-forced
pass, as trainers do.

- **Clean runs**: windows of 1 to 50 steps, slow and fast learning, per-token KL from ~0 to
  above 1, bf16 scoring on both sides. No rule may fire.
- **Planted faults**, each with the rule expected to catch it: dropout on while scoring,
  top-k 50 / top-p 0.9 / temperature 0.7 in the sampler only, a one-token shift of the
  reference log-probs, the wrong reference checkpoint, a learning-rate spike, a vocabulary
  mismatch giving ``-inf``, a runaway KL (no penalty, a reward that pays for leaving the
  reference), rollout log-probs from stale weights. Also, the sampling check's blind spot:
  the same truncated samplers *without* the sampler's log-probs.

The table per rule gives false alarms per 1000 clean windows, the detection rate of the
faults it is expected to catch and the windows it took. ``--json`` prints
``{"scenarios": [{"name", "kind", "expects", "fired": {rule: first window or null}, "windows"}]}``.
``--quick`` runs fewer windows (under 10 minutes on 2 cores); the default is the full set.
Figures are in benchmarks/README.md and the README's alert table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT)]  # this checkout's klmonitor, not an installed one

from klmonitor import Monitor  # noqa: E402
from klmonitor.alerts import default_rules  # noqa: E402

VOCAB = 256
HIDDEN = 32
EOS = 0
RULES = [r.name for r in default_rules()]


class Policy(nn.Module):
    """A one-layer GRU language model with a start token, LM-like peaked next-token distributions."""

    def __init__(self, seed: int, dropout: float = 0.0, vocab: int = VOCAB) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.bos = vocab, vocab
        self.embed = nn.Embedding(vocab + 1, HIDDEN)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.GRU(HIDDEN, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            # Zipf-shaped unigram prior in a random order (token EOS ends ~1 in 12 steps).
            rank = torch.randperm(vocab, generator=g).double() + 1
            bias = -1.1 * rank.log()
            bias[EOS] = math.log(1 / 12) + bias.logsumexp(0)
            self.head.bias.copy_(bias.float())
            self.head.weight.mul_(3.0)

    def logits(self, inputs: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out, h = self.rnn(self.drop(self.embed(inputs)), h)
        return self.head(out), h

    def token_logprobs(self, tokens: Tensor) -> Tensor:
        """Teacher-forced log-probs ``[B, T]`` of ``tokens`` (the trainer's scoring)."""
        start = torch.full_like(tokens[:, :1], self.bos)
        logits, _ = self.logits(torch.cat([start, tokens[:, :-1]], dim=1))
        return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def process(logits: Tensor, sampler: str) -> Tensor:
    """The sampler's processed log-probs (temperature, top-k or top-p), as an inference engine applies them."""
    logits = logits.float()
    if sampler == "temp0.7":
        return (logits / 0.7).log_softmax(-1)
    lp = logits.log_softmax(-1)
    if sampler == "topk50":
        kth = lp.topk(50, dim=-1).values[..., -1:]
        return lp.masked_fill(lp < kth, -math.inf).log_softmax(-1)
    if sampler == "topp0.9":
        srt, idx = lp.sort(-1, descending=True)
        cum = srt.exp().cumsum(-1)
        drop = (cum - srt.exp()) > 0.9  # keep the smallest prefix holding 90 %
        return lp.masked_fill(drop.scatter(-1, idx, drop), -math.inf).log_softmax(-1)
    return lp


@torch.no_grad()
def sample(
    model: Policy, batch: int, max_len: int, sampler: str, g: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``(tokens, mask, rollout log-probs)`` sampled token by token, as an inference engine does."""
    was = model.training
    model.eval()
    x = torch.full((batch, 1), model.bos, dtype=torch.long)
    h = None
    toks, lps = [], []
    for _ in range(max_len):
        logits, h = model.logits(x, h)
        lp = process(logits[:, -1], sampler)
        x = torch.multinomial(lp.exp(), 1, generator=g)
        toks.append(x)
        lps.append(lp.gather(-1, x))
    model.train(was)
    tokens = torch.cat(toks, 1)
    is_eos = tokens == EOS
    mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    return tokens.masked_fill(~mask, EOS), mask, torch.cat(lps, 1).masked_fill(~mask, 0.0)


@dataclass
class Scenario:
    """One training run: its knobs, the fault planted (if any) and the rule expected to catch it."""

    name: str
    kind: str  # "clean" or "fault"
    expects: str | None
    every: int = 5  # log_every_n_steps
    windows: int = 30
    lr: float = 3e-3
    kl_coef: float = 0.05
    reward: str = "target"  # "target": sequences holding a rare token; "far": pays for log p - log q
    sampler: str = "exact"
    rollout: bool = True  # hand the sampler's log-probs to the monitor
    dropout: float = 0.0  # dropout while the policy is scored (train mode)
    shift: bool = False  # reference log-probs shifted by one token
    wrong_ref: bool = False  # the reference is another checkpoint
    lr_spike_at: float | None = None  # fraction of the run where the LR is multiplied by 100 for 3 steps
    ref_vocab: int | None = None  # the reference knows fewer tokens: -inf for the others
    stale: int = 0  # sampler weights refreshed every `stale` steps (0: every step)
    bf16: bool = False  # both sides scored in bf16
    fault_at: float = 0.0  # fraction of the run the fault starts at (for windows-to-detect)
    # From fault_at on (when set): the reward becomes `hack_reward`, the KL penalty 0 and the
    # learning rate `hack_lr` times larger: a reward hack found mid-run.
    hack_reward: str | None = None
    hack_lr: float = 1.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def scenarios(quick: bool) -> list[Scenario]:
    w = 12 if quick else 30
    clean = [
        Scenario("clean_w1_slow", "clean", None, every=1, windows=3 * w, lr=1e-3),
        Scenario("clean_w5_kl0", "clean", None, every=5, windows=w, lr=1e-5, note="KL ~0"),
        Scenario(
            "clean_w5_fast_kl1", "clean", None, every=5, windows=w, lr=1e-2, kl_coef=0.02, note="KL above 1"
        ),
        Scenario("clean_w10_moderate", "clean", None, every=10, windows=w, lr=3e-3),
        Scenario("clean_w50_slow", "clean", None, every=50, windows=max(6, w // 3), lr=1e-3),
        Scenario("clean_w5_bf16", "clean", None, every=5, windows=w, lr=3e-3, bf16=True),
        Scenario("clean_w20_fast", "clean", None, every=20, windows=max(8, w // 2), lr=1e-2, kl_coef=0.02),
    ]
    fw = max(8, w // 2)
    faults = [
        Scenario("dropout_scoring", "fault", "initial_kl", windows=fw, dropout=0.1),
        Scenario("topk50_sampler", "fault", "rollout_mismatch", windows=fw, sampler="topk50"),
        Scenario("topp0.9_sampler", "fault", "rollout_mismatch", windows=fw, sampler="topp0.9"),
        Scenario("temp0.7_sampler", "fault", "rollout_mismatch", windows=fw, sampler="temp0.7"),
        Scenario("one_token_shift", "fault", "initial_kl", windows=fw, shift=True),
        Scenario("wrong_reference", "fault", "initial_kl", windows=fw, wrong_ref=True),
        Scenario("lr_spike", "fault", "spike", windows=w, lr=1e-3, lr_spike_at=0.5, fault_at=0.5),
        Scenario("vocab_mismatch_inf", "fault", "nonfinite", windows=fw, ref_vocab=VOCAB - 16),
        # No KL penalty and a reward for the rare tokens: the policy leaves the reference's
        # support (mean r collapses to ~0.01), which sampling_mismatch sees in every seed and
        # drift (k2 > 3 k3) in most.
        Scenario("runaway_kl", "fault", "sampling_mismatch", windows=w, lr=3e-2, kl_coef=0.0, reward="far"),
        Scenario("stale_rollout_weights", "fault", "rollout_mismatch", windows=fw, lr=1e-2, stale=10),
        # A reward hack found mid-run: from the third of the run on, one token pays at every
        # position and the KL penalty is gone; the policy collapses onto it.
        Scenario(
            "entropy_collapse",
            "fault",
            "entropy_collapse",
            windows=w,
            fault_at=1 / 3,
            hack_reward="one_token",
            hack_lr=3.0,
        ),
        # A healthy run until its middle, then the runaway's reward without a penalty: the KL,
        # levelled by then, takes off.
        Scenario(
            "reward_hack_midrun",
            "fault",
            "kl_acceleration",
            windows=w,
            fault_at=0.5,
            hack_reward="far",
            hack_lr=3.0,
        ),
        # The sampling check's blind spot: truncation without the sampler's log-probs. Near the
        # reference E[r] = 1 whatever the sampler, so the check waits for the policy to move,
        # or never sees it. No rule is promised here: the figures document what is seen.
        Scenario("topk50_no_rollout", "fault", None, windows=fw, sampler="topk50", rollout=False),
        Scenario("topp0.9_no_rollout", "fault", None, windows=fw, sampler="topp0.9", rollout=False),
        Scenario("temp0.7_no_rollout", "fault", None, windows=fw, sampler="temp0.7", rollout=False),
    ]
    return clean + faults


def reward_fn(tokens: Tensor, mask: Tensor, logp: Tensor, ref: Tensor, kind: str) -> Tensor:
    if kind == "one_token":  # one token pays at every position: collapse onto it
        return ((tokens == 1) & (mask > 0)).sum(1).float()
    if kind == "far":  # a large reward for the rare tokens and no KL penalty: a runaway
        return 10.0 * ((tokens >= 1) & (tokens <= 8) & (mask > 0)).sum(1).float()
    # Sequences holding any of tokens 1..8 (rare under the reference's Zipf prior order).
    return ((tokens >= 1) & (tokens <= 8) & (mask > 0)).any(1).float()


def run(sc: Scenario, seed: int = 0, batch: int = 32, max_len: int = 16) -> dict[str, Any]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    policy = Policy(seed, dropout=sc.dropout)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    if sc.wrong_ref:
        reference = Policy(seed + 1).requires_grad_(False).eval()
    sampler_model = copy.deepcopy(policy)
    opt = torch.optim.Adam(policy.parameters(), lr=sc.lr)
    fired: dict[str, int | None] = dict.fromkeys(RULES)
    count: dict[str, int] = dict.fromkeys(RULES, 0)
    mon = Monitor(log_every_n_steps=sc.every, sinks=[], histogram=False)
    steps = sc.every * sc.windows
    spike = None if sc.lr_spike_at is None else int(sc.lr_spike_at * steps)
    hack_from = int(sc.fault_at * steps) if sc.hack_reward is not None else None
    dtype = torch.bfloat16 if sc.bf16 else torch.float32
    ref_bf16 = copy.deepcopy(reference).to(dtype) if sc.bf16 else reference
    values: list[tuple[float, float]] = []
    for step in range(1, steps + 1):
        if sc.stale == 0 or step % sc.stale == 1:
            sampler_model.load_state_dict(policy.state_dict())
        tokens, mask, rollout = sample(sampler_model, batch, max_len, sc.sampler, g)
        policy.train()
        if sc.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logp = policy.token_logprobs(tokens)
        else:
            logp = policy.token_logprobs(tokens)
        with torch.no_grad():
            ref = ref_bf16.token_logprobs(tokens) if sc.bf16 else reference.token_logprobs(tokens)
            if sc.ref_vocab is not None:
                ref = ref.masked_fill(tokens >= sc.ref_vocab, -math.inf)
            if sc.shift:
                ref = ref.roll(1, dims=1)
        m = mask.float()
        safe_ref = torch.where(torch.isfinite(ref), ref, logp.detach())
        hacking = hack_from is not None and step > hack_from
        r = reward_fn(tokens, m, logp, safe_ref, sc.hack_reward if hacking else sc.reward)  # type: ignore[arg-type]
        kl_coef = 0.0 if hacking else sc.kl_coef
        shaped = r - kl_coef * ((logp.detach() - safe_ref) * m).sum(1)
        loss = -((shaped - shaped.mean()) * (logp * m).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = sc.lr * (100.0 if spike is not None and spike <= step < spike + 3 else 1.0)
            group["lr"] *= sc.hack_lr if hacking else 1.0
        opt.step()
        mon.update(logp.detach(), ref, mask, rollout_logprobs=rollout if sc.rollout else None)
        res = mon.step(step)
        if res is not None:
            window = step // sc.every
            ent = res.summary.entropy
            values.append((res.summary.k3.mean, res.summary.drift, ent.mean if ent is not None else math.nan))
            for a in res.alerts:
                count[a.rule] = count.get(a.rule, 0) + 1
                if fired.get(a.rule) is None:
                    fired[a.rule] = window
    onset = int(sc.fault_at * sc.windows) + 1 if sc.kind == "fault" else None
    kl = [v[0] for v in values]
    return {
        "name": sc.name,
        "seed": seed,
        "kind": sc.kind,
        "expects": sc.expects,
        "fired": fired,
        "alerts": count,
        "windows": sc.windows,
        "every": sc.every,
        "onset_window": onset,
        "kl_first": kl[0] if kl else math.nan,
        "kl_last": kl[-1] if kl else math.nan,
        "kl_max": max(kl) if kl else math.nan,
        "drift_max": max((v[1] for v in values if math.isfinite(v[1])), default=math.nan),
        "entropy_first": values[0][2] if values else math.nan,
        "entropy_last": values[-1][2] if values else math.nan,
        "kl_by_window": kl,
        "entropy_by_window": [v[2] for v in values],
        "messages": {a.rule: a.message for a in mon.alert_history},
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'scenario':<22}{'seed':>5}{'every':>6}{'wins':>5}{'KL 1st':>8}{'KL max':>8}{'drift':>7}"
        "  expects -> fired (first window)"
    ]
    for r in results:
        got = {k: v for k, v in r["fired"].items() if v is not None}
        lines.append(
            f"{r['name']:<22}{r['seed']:>5}{r['every']:>6}{r['windows']:>5}{r['kl_first']:>8.2g}"
            f"{r['kl_max']:>8.2g}{r['drift_max']:>7.2g}  {r['expects'] or '-'} -> {got or 'nothing'}"
        )
    lines.append("")
    clean_windows = sum(r["windows"] for r in results if r["kind"] == "clean")
    runs = len({(r["name"], r["seed"]) for r in results if r["kind"] == "clean"})
    lines.append(
        f"{'rule':<20}{'false alarms':>14}{'detected':>10}{'windows to detect':>19}"
        f"   (false alarms per 1000 of {clean_windows} windows of {runs} clean runs)"
    )
    for rule in RULES:
        fa = sum(r["alerts"][rule] for r in results if r["kind"] == "clean")
        exp = [r for r in results if r["expects"] == rule]
        hit = [r for r in exp if r["fired"][rule] is not None]
        delay = sorted(r["fired"][rule] - r["onset_window"] + 1 for r in hit)
        span = "-" if not delay else f"{delay[0]}" if delay[0] == delay[-1] else f"{delay[0]}-{delay[-1]}"
        lines.append(
            f"{rule:<20}{1000 * fa / max(clean_windows, 1):>14.1f}"
            f"{f'{len(hit)}/{len(exp)}' if exp else '-':>10}{span:>19}"
        )
    blind = [r for r in results if r["kind"] == "fault" and r["expects"] is None]
    if blind:
        lines.append("")
        lines.append("blind spot (truncated sampling, no rollout log-probs): first window each rule fired")
        for r in blind:
            got = {k: v for k, v in r["fired"].items() if v is not None}
            lines.append(f"  {r['name']:<22} seed {r['seed']}: {got or 'nothing'} in {r['windows']} windows")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer windows per run (under 10 minutes on 2 cores)"
    )
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--only", nargs="*", default=None, help="run only these scenarios")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per scenario (default 3; --quick 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    t0 = time.perf_counter()
    seeds = args.seeds or (2 if args.quick else 3)
    for sc in scenarios(args.quick):
        if args.only and sc.name not in args.only:
            continue
        for seed in range(seeds):
            t = time.perf_counter()
            results.append(run(sc, seed=seed))
            if not args.json:
                print(f"  {sc.name} seed {seed}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if args.json:
        keep = ("name", "seed", "kind", "expects", "fired", "windows")
        print(json.dumps({"scenarios": [{k: r[k] for k in keep} for r in results]}, indent=1))
    else:
        print(table(results))
        print(f"\n{len(results)} runs in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
