"""Where the KL comes from, and the rollout's ratio range: fixed-size window accumulators on device.

Each accumulator keeps one float64 vector of a fixed size on the tensors' device, updated with
no host sync (no ``.item()``, no boolean indexing, no branch on values), and merged exactly
over ranks in two collectives shared by every accumulator: each says what every rank needs of
every other (:meth:`~_Accumulator.gathered`, small: an ``all_gather``) and what merges by a sum
(:meth:`~_Accumulator.summed`: an ``all_reduce``, whose size does not grow with the world
size), and :meth:`~_Accumulator.join` rebuilds the merged window from the two. At a logging step
:meth:`host` picks the few numbers worth moving to the host and :meth:`read` turns them into
the plain dataclasses of :mod:`klmonitor.summary`.

- :class:`InitialCheck`: the batches fed before the first optimizer step: tokens, those
  differing beyond float rounding, and their summed k1 and k3.
- :class:`RatioRange`: smallest and largest log importance ratio, and tokens outside
  ``[0.5, 2]``, of the rollout engine against the trainer.
- :class:`PositionProfile`: summed k3 and tokens per log-spaced position bucket.
- :class:`TopSequences`: the ``k`` sequences with the largest summed k3 (ids and per-token k3
  of their first ``max_len`` tokens).
- :class:`TopTokens`: summed k3 and count per vocabulary entry; the ``k`` largest are read.
- :class:`EntropyMoments`: count, mean and M2 of ``-log q`` over the sampled tokens (or their
  sums over sequences): the policy's entropy, estimated from the tokens it sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from klmonitor import estimators as est
from klmonitor._merge import chan_rows
from klmonitor._moments import FLOAT32_CLAMP, LOG_MAX
from klmonitor.summary import EstimatorStats, InitialSummary, PositionBucket, TopSequence, TopToken, read_f

__all__ = [
    "EntropyMoments",
    "InitialCheck",
    "PositionProfile",
    "RatioRange",
    "TopSequences",
    "TopTokens",
    "bucket_labels",
    "token_k3",
]

Decode = Callable[[list[int]], str]
_LN2 = math.log(2.0)


def token_k3(logp: Tensor, ref: Tensor, valid: Tensor | None, clamp: float) -> tuple[Tensor, Tensor]:
    """Each token's k3 as the statistics count it, and which tokens count (``ok``).

    k3 of the log-ratio clamped to ``[-clamp, clamp]``, 0 where ``valid`` is False or the
    log-ratio is non-finite (or above 700 without a clamp below it); float64 where float32's exp
    could overflow (a clamp above 30, as by default): exact to |l| = 700.
    """
    lr = est.log_ratio(logp, ref)
    lr = lr.double() if clamp > FLOAT32_CLAMP else lr
    ok = torch.isfinite(lr) if clamp <= LOG_MAX else torch.isfinite(lr) & (lr <= LOG_MAX)
    ok = ok if valid is None else ok & valid
    lz = torch.where(ok, lr, 0.0).clamp(-clamp, clamp)
    return torch.where(ok, est.k3(lz), 0.0), ok


class _Accumulator:
    size: int

    def __init__(self) -> None:
        self._v: Tensor | None = None

    def _zeros(self) -> Tensor:
        return torch.zeros(self.size, dtype=torch.float64)

    def _state(self, device: torch.device) -> Tensor:
        if self._v is None:
            self._v = self._zeros().to(device)
        elif self._v.device != device:
            self._v = self._v.to(device)
        return self._v

    def vector(self, device: torch.device) -> Tensor:
        """This rank's window as a flat float64 vector on ``device``."""
        return self._state(device)

    def writable(self, device: torch.device) -> Tensor:
        """The window's vector on ``device``, for a kernel to add to in place (never shared memory)."""
        v = self._state(device)
        if v.is_shared() or not v.is_contiguous():
            self._v = v = v.clone()
        return v

    def load(self, vector: Tensor) -> None:
        """Replace the window (a resume); ``vector`` as from :meth:`vector`."""
        self._v = vector.detach().to(torch.float64).clone()

    def reset(self) -> None:
        """Start an empty window (keeps the device)."""
        if self._v is not None:
            self._v = self._zeros().to(self._v.device)

    # -- merging over ranks: gathered (all_gather), then summed (all_reduce SUM), then join --
    #: Numbers of :meth:`gathered` and :meth:`summed` (per rank, per window).
    gathered_size: int = 0

    @property
    def summed_size(self) -> int:
        """Length of :meth:`summed`'s vector."""
        return self.size - self.gathered_size

    def gathered(self, vector: Tensor) -> Tensor:
        """What every rank needs of every other rank's window (``all_gather``-ed): here nothing."""
        return vector[:0]

    def summed(self, vector: Tensor, rows: Tensor, rank: int) -> Tensor:
        """This rank's share of the part merged by a sum (``all_reduce``-d): here all of it.

        ``rows``: the ranks' :meth:`gathered` vectors (``[R, gathered_size]``), identical on
        every rank; ``rank``: this rank's row in it.
        """
        return vector

    def join(self, total: Tensor, rows: Tensor) -> Tensor:
        """The merged window (laid out as :meth:`vector`) from the ranks' summed ``total`` and ``rows``."""
        return total

    def merge_rows(self, rows: Tensor) -> Tensor:
        """Merge the windows of several ranks (``[R, size]``) as the collectives do, in one process."""
        gathered = torch.stack([self.gathered(r) for r in rows])
        total = torch.stack([self.summed(r, gathered, i) for i, r in enumerate(rows)]).sum(0)
        return self.join(total, gathered)

    def host(self, merged: Tensor) -> Tensor:
        """What :meth:`read` needs of the merged window (moved to the host with the rest)."""
        return merged

    def config(self) -> dict[str, int]:
        """What the window's vector was made with (a checkpoint carries it)."""
        return {"size": self.size}

    def problem(self, values: Sequence[float]) -> str | None:
        """Why ``values`` (a saved :meth:`vector`) cannot be this window, else ``None``."""
        if len(values) != self.size:
            return f"has {len(values)} numbers, not {self.size}"
        return _not_finite(values, range(self.size))


def _not_finite(values: Sequence[float], where: Sequence[int] | range) -> str | None:
    bad = [i for i in where if not math.isfinite(values[i])]
    return f"holds a non-finite value at index {bad[0]} ({values[bad[0]]})" if bad else None


def _not_counts(values: Sequence[float], where: Sequence[int] | range, high: float = math.inf) -> str | None:
    for i in where:
        x = values[i]
        if not (math.isfinite(x) and x >= 0 and x == int(x) and x <= high):
            top = "" if high == math.inf else f" up to {high:g}"
            return f"holds {x} at index {i}, where a count (an integer >= 0{top}) belongs"
    return None


# A token "differs" when |l| exceeds this many machine epsilons of the log-probs' dtype times the
# larger |log-prob|: two roundings of one value to that dtype differ by at most one unit in the
# last place (at most one epsilon relative), so an exact copy never gets there.
_ROUNDING_EPS = 2.0


class InitialCheck(_Accumulator):
    """Tokens, tokens differing beyond rounding, summed k3 and k1 of the untrained policy's batches.

    Fed by :class:`~klmonitor.Monitor` only before the first optimizer step, so its cost (a few
    float64 ops per token) is paid once per run. Additive: ranks merge by a sum.

    >>> import torch
    >>> c = InitialCheck(); lp = torch.full((100,), -3.0)
    >>> c.update(lp, lp + torch.linspace(-0.1, 0.1, 100), None)  # dropout-like noise
    >>> s = c.read(c.host(c.vector(lp.device)).tolist()); s.tokens, s.differing, round(s.kl, 5)
    (100, 100, 0.0017)
    """

    size = 4

    def update(self, logp: Tensor, ref: Tensor, valid: Tensor | None) -> None:
        """Fold a batch's log-probs (``valid``: the tokens the statistics count, or ``None``)."""
        v = self._state(logp.device)
        lp, rf = logp.detach().double(), ref.detach().double()
        lr = rf - lp
        ok = torch.isfinite(lr) & (lr <= LOG_MAX)  # as the statistics: beyond is non-finite
        ok = ok if valid is None else ok & valid.to(logp.device)
        eps = max(torch.finfo(logp.dtype).eps, torch.finfo(ref.dtype).eps)
        bound = _ROUNDING_EPS * eps * torch.maximum(lp.abs(), rf.abs())
        lz = torch.where(ok, lr, 0.0)
        part = torch.stack(
            [
                ok.sum(dtype=torch.float64),
                ((lz.abs() > bound) & ok).sum(dtype=torch.float64),
                torch.where(ok, est.k3(lz), 0.0).sum(),
                torch.where(ok, -lz, 0.0).sum(),
            ]
        )
        self._v = v + part

    def problem(self, values: Sequence[float]) -> str | None:  # noqa: D102
        bad = super().problem(values) or _not_counts(values, [0, 1])
        if bad is None and (values[1] > values[0] or values[2] < 0):
            bad = f"counts {values[1]} differing of {values[0]} tokens with a k3 sum of {values[2]}"
        return bad

    @staticmethod
    def read(values: Sequence[float]) -> InitialSummary | None:
        """The summary of the merged window; ``None`` when no batch came before the first step."""
        n = int(values[0])
        if n <= 0:
            return None
        return InitialSummary(tokens=n, differing=int(values[1]), kl=values[2] / n, k1=values[3] / n)


# Tokens per block of EntropyMoments.update.
_ENTROPY_BLOCK = 262_144


class EntropyMoments(_Accumulator):
    """``[count, mean, M2]`` of ``-log q(x)`` over the sampled tokens: the policy's entropy.

    Under exact sampling from the policy ``q``, ``E_q[-log q(x)] = H(q)``: the mean over the
    tokens it sampled estimates its per-token entropy (per-sequence at sequence level: the sum
    over a sequence's tokens, whose mean estimates the sequence entropy), with no pass over the
    vocabulary. The tokens are those the KL statistics count (valid, both log-probs finite).
    Merged over ranks by Chan's rule (gathered whole: three numbers). Under top-k, top-p or a
    temperature in the sampler the tokens come from the processed distribution ``q'``: the
    mean is then the cross-entropy ``H(q', q) = H(q') + KL(q' || q)``, not ``H(q)``.

    >>> import torch
    >>> m = EntropyMoments(); m.update(torch.log(torch.tensor([0.5, 0.25, 0.25])), torch.zeros(3), None, False)
    >>> round(m.read(m.host(m.vector(torch.device("cpu"))).tolist()).mean, 6)  # (ln 2 + 2 ln 4) / 3
    1.155245
    """

    size = 3
    gathered_size = 3

    def update(self, logp: Tensor, ref: Tensor, valid: Tensor | None, sequence: bool) -> None:
        """Fold a batch (``valid``: the tokens the statistics count, or ``None``). No host sync.

        In blocks of about 256k tokens (whole rows at sequence level): fresh multi-megabyte
        temporaries cost page faults that took longer than the arithmetic.
        """
        v = self._state(logp.device)
        lp, rf = logp.detach(), ref.detach()
        if lp.dtype in (torch.bfloat16, torch.float16):
            # Summed in float32 at least: a bf16 sum is rounded to bf16 (8 bits: a mean off by
            # ~1e-3 relative, as the kernel's float64 reference showed).
            lp = lp.float()
        if sequence:
            block = max(1, _ENTROPY_BLOCK // max(1, lp.shape[-1]))
        else:
            block = _ENTROPY_BLOCK
            lp, rf = lp.reshape(-1), rf.reshape(-1)
            valid = valid.reshape(-1) if valid is not None else None
        rows = [v]
        for lo in range(0, lp.shape[0], block):
            a, b = lp[lo : lo + block], rf[lo : lo + block]
            # Both finite (an inf or NaN in either makes the sum inf or NaN); abs() < inf is
            # cheaper than isfinite here.
            ok = (a + b).abs_() < math.inf
            if valid is not None:
                ok &= valid[lo : lo + block].to(a.device)
            x = torch.where(ok, a, 0.0)
            if sequence:  # per-sequence sums over the rows with a token
                x = x.sum(-1, dtype=torch.float64)
                ok = ok.any(-1)
            count = torch.count_nonzero(ok).to(torch.float64)
            # Sums in the input's precision (torch's cascade summation: relative error ~1e-7 for
            # float32 blocks), then float64: sum(dtype=float64) would copy the block to float64.
            s1 = x.sum().double()
            s2 = (x * x).sum().double()
            mean = s1 / count.clamp_min(1.0)
            # x holds log q = -(-log q): the mean's sign flips, the spread does not.
            rows.append(torch.stack([count, -mean, (s2 - s1 * mean).clamp_min(0.0)]))
        self._v = chan_rows(torch.stack(rows), 1)

    def gathered(self, vector: Tensor) -> Tensor:  # noqa: D102
        return vector

    def summed(self, vector: Tensor, rows: Tensor, rank: int) -> Tensor:  # noqa: D102
        return vector[:0]

    def join(self, total: Tensor, rows: Tensor) -> Tensor:  # noqa: D102
        return chan_rows(rows, 1)

    def merge_rows(self, rows: Tensor) -> Tensor:  # noqa: D102
        return chan_rows(rows, 1)

    def problem(self, values: Sequence[float]) -> str | None:  # noqa: D102
        bad = super().problem(values) or _not_counts(values, [0])
        if bad is None and values[2] < 0:
            bad = f"has a negative sum of squares ({values[2]})"
        return bad

    @staticmethod
    def read(values: Sequence[float]) -> EstimatorStats | None:
        """The entropy estimate's statistics; ``None`` without tokens."""
        if values[0] <= 0:
            return None
        return read_f(values, ["entropy"])["entropy"]


class RatioRange(_Accumulator):
    """``min l``, ``max l`` and the count of ``|l| > ln 2`` over valid, finite log-ratios ``l``."""

    size = 3

    def _zeros(self) -> Tensor:
        return torch.tensor([math.inf, -math.inf, 0.0], dtype=torch.float64)

    def update(self, lr: Tensor, valid: Tensor) -> None:
        """Fold the log-ratios ``lr`` where ``valid`` (both any shape)."""
        v = self._state(lr.device)
        lo = torch.where(valid, lr, math.inf).amin().double() if lr.numel() else v[0]
        hi = torch.where(valid, lr, -math.inf).amax().double() if lr.numel() else v[1]
        out = ((lr.abs() > _LN2) & valid).sum(dtype=torch.float64)
        self.fold(torch.stack([lo, hi, out]))

    def fold(self, batch: Tensor) -> None:
        """Fold a batch's ``[min l, max l, count]`` (float64, as ``klmonitor._native.ratio_range`` gives)."""
        v = self._state(batch.device)
        self._v = torch.stack([torch.minimum(v[0], batch[0]), torch.maximum(v[1], batch[1]), v[2] + batch[2]])

    gathered_size = 2  # min and max are gathered; the count is summed

    def gathered(self, vector: Tensor) -> Tensor:  # noqa: D102
        return vector[:2]

    def summed(self, vector: Tensor, rows: Tensor, rank: int) -> Tensor:  # noqa: D102
        return vector[2:]

    def join(self, total: Tensor, rows: Tensor) -> Tensor:  # noqa: D102
        return torch.cat([rows[:, 0].amin().reshape(1), rows[:, 1].amax().reshape(1), total])

    def problem(self, values: Sequence[float]) -> str | None:  # noqa: D102
        if len(values) != self.size:
            return f"has {len(values)} numbers, not {self.size}"
        lo, hi = values[0], values[1]
        if math.isnan(lo) or math.isnan(hi) or lo == -math.inf or hi == math.inf:
            return f"has the range ({lo}, {hi}), not a finite one (or the empty (inf, -inf))"
        return _not_counts(values, [2])

    @staticmethod
    def read(values: Sequence[float], tokens: int) -> tuple[float, float, float]:
        """``(ratio min, ratio max, fraction outside [0.5, 2])``; NaN without tokens."""
        if tokens <= 0:
            return math.nan, math.nan, math.nan
        return math.exp(values[0]), math.exp(values[1]), values[2] / tokens


def _top_rows(scores: np.ndarray, counts: np.ndarray, k: int, floor: float) -> np.ndarray:
    """The (at most) ``k`` rows with the largest ``scores`` above ``floor``, best first.

    Among those with ``counts > 0``; equal scores: the first row first. One C call, or numpy
    without the kernel.
    """
    from klmonitor import _native

    if k <= 64:
        got = _native.top_rows(scores, counts, k, floor)
        if got is not None:
            return got
    score = np.where(counts > 0, scores, -math.inf)
    enter = np.flatnonzero(score > floor)
    if enter.size > k:
        enter = enter[np.argsort(-score[enter], kind="stable")[:k]]
    return enter[np.argsort(-score[enter], kind="stable")]


def bucket_labels(buckets: int) -> list[tuple[str, int, int | None]]:
    """``(label, first, last)`` of each position bucket: 0-1, 2-3, 4-7, ..., and an open last one.

    >>> [label for label, _, _ in bucket_labels(5)]
    ['0-1', '2-3', '4-7', '8-15', '16+']
    """
    out: list[tuple[str, int, int | None]] = []
    for b in range(buckets):
        lo = 0 if b == 0 else 1 << b
        hi = (1 << (b + 1)) - 1
        if b == buckets - 1:
            out.append((f"{lo}+", lo, None))
        else:
            out.append((f"{lo}-{hi}", lo, hi))
    return out


class PositionProfile(_Accumulator):
    """Summed k3 and valid tokens per position bucket (the token's index in its row).

    Args:
        buckets: how many buckets: positions 0-1, 2-3, 4-7, ... and the last one open-ended.
    """

    def __init__(self, buckets: int = 12) -> None:
        super().__init__()
        self.buckets = buckets
        self.size = 2 * buckets
        self._index: dict[tuple[int, torch.device], Tensor] = {}

    def _bucket_index(self, length: int, device: torch.device) -> Tensor:
        key = (length, device)
        if key not in self._index:
            pos = torch.arange(length, dtype=torch.float64).clamp_min(1.0)
            idx = torch.floor(torch.log2(pos)).long().clamp_max(self.buckets - 1)
            self._index[key] = idx.to(device)
        return self._index[key]

    def update(self, k3: Tensor, valid: Tensor) -> None:
        """Fold per-token ``k3`` (0 where not valid) and ``valid`` of ``[B, T]`` inputs."""
        v = self._state(k3.device)
        idx = self._bucket_index(k3.shape[1], k3.device)
        sums = torch.zeros(self.buckets, dtype=torch.float64, device=k3.device)
        sums.index_add_(0, idx, k3.sum(0, dtype=torch.float64))
        counts = torch.zeros(self.buckets, dtype=torch.float64, device=k3.device)
        counts.index_add_(0, idx, valid.sum(0, dtype=torch.float64))
        self._v = v + torch.cat([sums, counts])

    def config(self) -> dict[str, int]:  # noqa: D102
        return {"buckets": self.buckets}

    def problem(self, values: Sequence[float]) -> str | None:  # noqa: D102
        return super().problem(values) or _not_counts(values, range(self.buckets, self.size))

    def read(self, values: Sequence[float]) -> list[PositionBucket]:
        """The buckets with at least one token, first position first."""
        out = []
        for b, (label, lo, hi) in enumerate(bucket_labels(self.buckets)):
            n = values[self.buckets + b]
            if n > 0:
                out.append(PositionBucket(label, lo, hi, int(n), values[b] / n))
        return out


# Fields of a TopSequences row before its ids and per-token k3.
_SCORE, _TOKENS, _STEP, _ROW, _RANK, _LEN = range(6)
_F = 6


class TopSequences(_Accumulator):
    """The ``k`` sequences of the window with the largest summed k3.

    Merged over ranks in two phases that ride on the two collectives of the window: the ranks'
    ``k`` scores are gathered (``k`` numbers per rank), every rank picks the same ``k`` winners
    from them, and each rank puts the winners it holds at their place in a ``k`` rows' vector,
    zeros elsewhere, which the sum completes (``x + 0 == x``: exact).

    Args:
        k: how many sequences are kept.
        max_len: token ids and per-token k3 kept per sequence (the first ``max_len``).
    """

    def __init__(self, k: int = 5, max_len: int = 256) -> None:
        super().__init__()
        self.k, self.max_len = k, max_len
        self.width = _F + 2 * max_len
        self.size = k * self.width
        self.gathered_size = k

    @property
    def summed_size(self) -> int:  # noqa: D102
        return self.size

    def _zeros(self) -> Tensor:
        rows = torch.zeros(self.k, self.width, dtype=torch.float64)
        rows[:, _SCORE] = -math.inf
        return rows.reshape(-1)

    def update(
        self,
        k3: Tensor,
        valid: Tensor,
        token_ids: Tensor | None,
        step: int,
        rank: int,
        shown: Tensor | None = None,
    ) -> None:
        """Fold the rows of ``[B, T]`` per-token ``k3`` (0 where not valid).

        ``shown`` (``[B, T]`` bool, e.g. the mask): the tokens whose ids the table keeps; the
        others (padding) get id -1 and are left out of the decoded text.
        """
        self.update_sums(
            k3.sum(1, dtype=torch.float64),
            valid.sum(1, dtype=torch.float64),
            k3.shape[1],
            lambda rows: k3.index_select(0, rows),
            token_ids,
            step,
            rank,
            shown,
        )

    def update_sums(
        self,
        sums: Tensor,
        tokens: Tensor,
        length: int,
        k3_of: Callable[[Tensor], Tensor],
        token_ids: Tensor | None,
        step: int,
        rank: int,
        shown: Tensor | None = None,
    ) -> None:
        """Fold a ``[B, length]`` batch's rows from their k3 ``sums`` and valid ``tokens`` (``[B]``).

        ``k3_of(rows)`` gives the per-token k3 of the rows at the indices ``rows`` (at least
        their first ``max_len`` tokens; only the ``k`` best rows are asked for): the fused
        kernel gives the sums, and the few winning rows are computed again. ``shown``
        (optional, ``[B, length]`` bool, e.g. the mask): which tokens keep their ids (the
        others, padding, get -1 and no text).
        """
        dev = sums.device
        current = self._state(dev).reshape(self.k, self.width)
        b, t = sums.shape[0], length
        if b == 0:
            return
        if dev.type == "cpu":
            self._update_host(current, sums, tokens, length, k3_of, token_ids, step, rank, shown)
            return
        score = torch.where(tokens > 0, sums, -math.inf)
        kb = min(self.k, b)
        best, rows = score.topk(kb)
        keep = min(t, self.max_len)
        kl_rows = torch.zeros(kb, self.max_len, dtype=torch.float64, device=dev)
        kl_rows[:, :keep] = k3_of(rows)[:, :keep].double()
        id_rows = torch.full((kb, self.max_len), -1.0, dtype=torch.float64, device=dev)
        if token_ids is not None:
            id_rows[:, :keep] = token_ids.index_select(0, rows)[:, :keep].double()
            if shown is not None:
                id_rows[:, :keep].masked_fill_(
                    ~shown.index_select(0, rows)[:, :keep].to(dev, torch.bool), -1.0
                )
        meta = torch.stack(
            [
                best,
                tokens.index_select(0, rows),
                torch.full((kb,), float(step), dtype=torch.float64, device=dev),
                rows.double(),
                torch.full((kb,), float(rank), dtype=torch.float64, device=dev),
                torch.full((kb,), float(keep), dtype=torch.float64, device=dev),
            ],
            1,
        )
        candidates = torch.cat([current, torch.cat([meta, id_rows, kl_rows], 1)])
        self._v = self._top(candidates).reshape(-1)

    def update_kernel(
        self,
        sums: Tensor,
        tokens: Tensor,
        logp: Tensor,
        ref: Tensor,
        mask: Tensor | None,
        token_ids: Tensor | None,
        clamp: float,
        step: int,
        rank: int,
    ) -> bool:
        """:meth:`update_sums` in one C call, from the inputs the fused CPU kernel read.

        ``mask``: the tokens the statistics count (their ids are kept, the others get -1).
        False (nothing done) where the C code does not read these inputs.
        """
        from klmonitor import _native

        table = self.writable(sums.device)
        done = _native.top_sequences(
            table, self.k, self.max_len, sums, tokens, logp, ref, mask, token_ids, clamp, step, rank
        )
        return done is not None

    def _update_host(
        self,
        current: Tensor,
        sums: Tensor,
        tokens: Tensor,
        length: int,
        k3_of: Callable[[Tensor], Tensor],
        token_ids: Tensor | None,
        step: int,
        rank: int,
        shown: Tensor | None,
    ) -> None:
        """:meth:`update_sums` on the host, in numpy.

        A few microseconds where torch's ops take tens: only rows whose score beats the
        window's k-th are read again, so once the window holds k rows most batches end after
        one comparison.
        """
        cur = current.numpy()
        sc, cnt = sums.numpy(), tokens.numpy()
        floor = float(cur[:, _SCORE].min())  # -inf while a slot is empty
        enter = _top_rows(sc, cnt, self.k, floor)
        if enter.size == 0:
            return
        kb, keep = enter.size, min(length, self.max_len)
        rows = torch.from_numpy(enter)
        new = np.empty((kb, self.width))
        new[:, _SCORE] = sc[enter]
        new[:, _TOKENS] = cnt[enter]
        new[:, _STEP], new[:, _ROW], new[:, _RANK], new[:, _LEN] = (
            float(step),
            enter,
            float(rank),
            float(keep),
        )
        new[:, _F + keep : _F + self.max_len] = -1.0
        new[:, _F + self.max_len + keep :] = 0.0
        if token_ids is not None and token_ids.is_cpu:
            new[:, _F : _F + keep] = token_ids.numpy()[enter, :keep]
        elif token_ids is not None:
            new[:, _F : _F + keep] = (
                token_ids.index_select(0, rows.to(token_ids.device))[:, :keep].double().cpu().numpy()
            )
        else:
            new[:, _F : _F + keep] = -1.0
        if token_ids is not None and shown is not None:
            if shown.is_cpu:
                kept = shown.numpy()[enter, :keep]
            else:
                kept = shown.index_select(0, rows.to(shown.device))[:, :keep].cpu().numpy()
            np.putmask(new[:, _F : _F + keep], ~kept.astype(bool, copy=False), -1.0)
        new[:, _F + self.max_len : _F + self.max_len + keep] = k3_of(rows)[:, :keep].numpy()
        both = np.concatenate([cur, new])
        # The k best of the window and the new rows; the window's rows first among equals.
        best = np.argsort(-both[:, _SCORE], kind="stable")[: self.k]
        self._v = torch.from_numpy(both[best].reshape(-1))

    def _top(self, candidates: Tensor) -> Tensor:
        return candidates.index_select(0, candidates[:, _SCORE].topk(self.k).indices)

    def gathered(self, vector: Tensor) -> Tensor:  # noqa: D102
        return vector.reshape(self.k, self.width)[:, _SCORE]

    def summed(self, vector: Tensor, rows: Tensor, rank: int) -> Tensor:  # noqa: D102
        # The k largest of the ranks' scores, in the order one topk over every rank's rows gives.
        win = rows.reshape(-1).topk(self.k).indices
        owner, slot = win // self.k, win % self.k
        mine = (owner == rank).reshape(-1, 1)
        picked = vector.reshape(self.k, self.width).index_select(0, slot)
        return torch.where(mine, picked, 0.0).reshape(-1)

    def config(self) -> dict[str, int]:  # noqa: D102
        return {"k": self.k, "max_len": self.max_len}

    def problem(self, values: Sequence[float]) -> str | None:  # noqa: D102
        if len(values) != self.size:
            return f"has {len(values)} numbers, not {self.size}"
        for r in range(self.k):
            at = r * self.width
            row = values[at : at + self.width]
            if row[_SCORE] == -math.inf:
                continue  # an empty slot
            ids = range(_F, _F + self.max_len)
            why = (
                _not_finite(row, range(self.width))
                or _not_counts(row, [_TOKENS, _STEP, _ROW, _RANK])
                or _not_counts(row, [_LEN], high=self.max_len)
                or _not_counts([x + 1 for x in row], ids)  # token ids, -1 where none
            )
            if why is not None:
                return f"row {r} {why}"
        return None

    def read(self, values: Sequence[float], decode: Decode | None, mark: int = 3) -> list[TopSequence]:
        """The kept sequences, largest summed k3 first; ``decode`` renders their text."""
        out = []
        for i in range(self.k):
            row = values[i * self.width : (i + 1) * self.width]
            if not math.isfinite(row[_SCORE]):
                continue
            n, keep = int(row[_TOKENS]), int(row[_LEN])
            ids = [int(x) for x in row[_F : _F + keep]]
            kl = [float(x) for x in row[_F + self.max_len : _F + self.max_len + keep]]
            has_ids = any(x >= 0 for x in ids)
            seq = TopSequence(
                step=int(row[_STEP]),
                rank=int(row[_RANK]),
                row=int(row[_ROW]),
                kl_sum=float(row[_SCORE]),
                kl_mean=float(row[_SCORE]) / n if n else math.nan,
                tokens=n,
                token_ids=ids if has_ids else None,
                token_kl=kl,
            )
            if has_ids and decode is not None:
                seq.text = marked_text(ids, kl, decode, mark)
            out.append(seq)
        return out


def marked_text(ids: Sequence[int], kl: Sequence[float], decode: Decode, mark: int = 3) -> str:
    """``decode``'s text of ``ids`` token by token, the ``mark`` highest-k3 tokens in ``**bold**``.

    >>> marked_text([1, 2, 3], [0.0, 0.9, 0.1], lambda ids: "abc"[ids[0] - 1], mark=1)
    'a**b**c'
    """
    top = {i for i in sorted(range(len(ids)), key=lambda i: -kl[i])[:mark] if kl[i] > 0}
    parts = []
    for i, tok in enumerate(ids):
        if tok < 0:
            continue
        piece = decode([tok])
        parts.append(f"**{piece}**" if i in top and piece.strip() else piece)
    return "".join(parts)


class TopTokens(_Accumulator):
    """Summed k3 and count per vocabulary id (ids outside ``[0, vocab_size)`` are counted apart).

    Args:
        vocab_size: the ids tracked.
        k: how many entries :meth:`read` returns.
    """

    def __init__(self, vocab_size: int, k: int = 5) -> None:
        super().__init__()
        self.vocab_size, self.k = vocab_size, k
        self.size = 2 * vocab_size + 1

    def update(self, k3: Tensor, valid: Tensor, token_ids: Tensor) -> None:
        """Fold per-token ``k3`` (0 where not valid) by ``token_ids`` (same shape)."""
        v = self._state(k3.device)
        ids = token_ids.reshape(-1).to(k3.device)
        inside = (ids >= 0) & (ids < self.vocab_size)
        use = valid.reshape(-1) & inside
        idx = torch.where(use, ids, 0).long()
        sums = v[: self.vocab_size].index_add(0, idx, torch.where(use, k3.reshape(-1).double(), 0.0))
        counts = v[self.vocab_size : -1].index_add(0, idx, use.double())
        outside = v[-1:] + (valid.reshape(-1) & ~inside).sum(dtype=torch.float64)
        self._v = torch.cat([sums, counts, outside])

    def host(self, merged: Tensor) -> Tensor:
        """The ``k`` largest sums with their ids and counts, and the out-of-range count."""
        sums, counts = merged[: self.vocab_size], merged[self.vocab_size : -1]
        k = min(self.k, self.vocab_size)
        best, ids = sums.topk(k)
        return torch.cat([best, ids.double(), counts.index_select(0, ids), merged[-1:]])

    def config(self) -> dict[str, int]:  # noqa: D102
        return {"vocab_size": self.vocab_size, "k": self.k}

    def problem(self, values: Sequence[float]) -> str | None:  # noqa: D102
        return super().problem(values) or _not_counts(values, range(self.vocab_size, self.size))

    def host_size(self) -> int:
        """Length of :meth:`host`'s vector."""
        return 3 * min(self.k, self.vocab_size) + 1

    def read(self, values: Sequence[float], decode: Decode | None) -> tuple[list[TopToken], int]:
        """The entries with a positive count, largest sum first, and the out-of-range count."""
        k = min(self.k, self.vocab_size)
        out = []
        for i in range(k):
            kl, tok, n = values[i], int(values[k + i]), int(values[2 * k + i])
            if n > 0:
                out.append(TopToken(tok, n, kl, kl / n, decode([tok]) if decode is not None else None))
        return out, int(values[3 * k])
