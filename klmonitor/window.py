"""One monitoring window: every accumulator, keyed by name, with one reduce and one state.

A :class:`Window` owns the parts a :class:`~klmonitor.Monitor` accumulates between logging
steps: the main KL moments, the f-divergences, the rollout engine's and the policy update's KL
moments (each a :class:`~klmonitor.KLStats`, wrapped in :class:`Moments` or :class:`FMoments`)
and the diagnostics of :mod:`klmonitor.diagnostics`. It reduces them over the ranks of a
``torch.distributed`` job with one ``all_gather`` (and one ``all_reduce`` of the large additive
tables, when there are any), moves the result to the host once, and saves and restores them
under one state, each part under the key it declares.

Every part speaks the protocol of :class:`klmonitor.diagnostics._Accumulator`: ``vector``,
``gathered``/``summed``/``join`` (how the collectives merge it), ``merge_rows``, ``host``,
``reset``, ``load``, ``problem``, ``config``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from klmonitor import _layout as lay
from klmonitor import _moments as mom
from klmonitor import fdiv
from klmonitor._merge import chan_rows
from klmonitor.stats import KLStats

__all__ = ["FMoments", "Moments", "Window", "distributed", "moments_problem"]

# Additive numbers per rank up to which the window's accumulators travel whole in its one
# all_gather (the core statistics, the ratio range, the initial check, the position profile:
# 5 + 2 x buckets numbers) rather than in a second collective, an all_reduce; beyond (top_tokens,
# top_sequences) the all_reduce keeps what a rank receives from growing with the world size.
GATHER_WHOLE = 64


def distributed() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` job, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Moments:
    """A :class:`~klmonitor.KLStats`' moments vector as a window part (merged by Chan's rule, gathered whole)."""

    summed_size = 0

    def __init__(self, stats: KLStats) -> None:
        self.stats = stats
        self.size = lay.SIZE

    def vector(self, device: torch.device) -> Tensor:  # noqa: D102
        return self.stats.summary_vector().to(device)

    def gathered(self, vector: Tensor) -> Tensor:  # noqa: D102
        return vector

    def summed(self, vector: Tensor, rows: Tensor, rank: int) -> Tensor:  # noqa: D102
        return vector[:0]

    def join(self, total: Tensor, rows: Tensor) -> Tensor:  # noqa: D102
        return self.merge_rows(rows)

    def merge_rows(self, rows: Tensor) -> Tensor:  # noqa: D102
        return mom.merge_rows(rows)

    def host(self, merged: Tensor) -> Tensor:  # noqa: D102
        return merged

    def reset(self) -> None:  # noqa: D102
        self.stats.reset()

    def load(self, vector: Tensor) -> None:  # noqa: D102
        self.stats.load_summary_vector(vector)

    def config(self) -> dict[str, int]:  # noqa: D102
        return {"size": self.size}

    def problem(self, values: Any) -> str | None:  # noqa: D102
        return moments_problem(values)


class FMoments(Moments):
    """The f-divergence state ``[count, means, M2s]`` of a :class:`~klmonitor.KLStats` as a window part.

    Loaded after the main moments (``load_summary_vector`` resets the metric, this state too).
    """

    def __init__(self, stats: KLStats) -> None:
        super().__init__(stats)
        self.size = fdiv.size(len(stats.f_divergences))

    def vector(self, device: torch.device) -> Tensor:  # noqa: D102
        vec = self.stats.f_vector()
        assert vec is not None, "FMoments wraps a KLStats with f_divergences"
        return vec.to(device)

    def merge_rows(self, rows: Tensor) -> Tensor:  # noqa: D102
        return chan_rows(rows, len(self.stats.f_divergences))

    def reset(self) -> None:  # noqa: D102
        pass  # reset with the main moments (one KLStats)

    def load(self, vector: Tensor) -> None:  # noqa: D102
        self.stats.load_f_vector(vector)

    def problem(self, values: Any) -> str | None:  # noqa: D102
        size = self.size
        if not isinstance(values, Sequence) or isinstance(values, str | bytes) or len(values) != size:
            return f"is not a list of {size} numbers"
        if any(isinstance(x, bool) or not isinstance(x, int | float) for x in values):
            return "holds values that are not numbers"
        count = float(values[0])
        if not math.isfinite(count) or count < 0 or count != int(count):
            return "has a negative, fractional or non-finite count"
        if any(float(m) < 0 or math.isnan(float(m)) for m in values[1:]):
            return "holds negative or NaN values (every f-divergence estimate is >= 0)"
        return None


def moments_problem(window: Any) -> str | None:
    """Why ``window`` is not a valid saved moments vector, or ``None`` when it is."""
    if window is None:
        return "is missing"
    if not isinstance(window, Sequence) or isinstance(window, str | bytes):
        return f"is a {type(window).__name__}, not a list of {lay.SIZE} numbers"
    if len(window) != lay.SIZE:
        return f"has {len(window)} numbers, not {lay.SIZE}"
    if any(isinstance(x, bool) or not isinstance(x, int | float) for x in window):
        return "holds values that are not numbers"
    if not all(math.isfinite(float(x)) for x in window):
        return "holds NaN or infinite values"
    counts = [window[lay.COUNT], *window[lay.TOKENS : lay.MAX_ABS]]
    if any(float(c) < 0 or float(c) != int(c) for c in counts):
        return "has negative or fractional counts"
    if any(float(m) < 0 for m in window[lay.M2]) or float(window[lay.MAX_ABS]) < 0:
        return "has negative sums of squares"
    if window[lay.COUNT] > window[lay.TOKENS]:
        return "counts more samples than tokens"
    return None


class _Entry:
    __slots__ = ("key", "optional", "part")

    def __init__(self, part: Any, key: str | None, optional: bool) -> None:
        self.part, self.key, self.optional = part, key, optional


class Window:
    """The parts of one monitoring window, in a fixed order (the same on every rank).

    >>> w = Window()
    >>> w.add("main", Moments(KLStats(sync_on_compute=False)), key="window")
    >>> header = torch.zeros(2, dtype=torch.float64)
    >>> rows, values = w.reduce(header)
    >>> len(values["main"])
    17
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def add(self, name: str, part: Any, key: str | None = None, optional: bool = False) -> None:
        """Add a part, reduced and saved after those added before it.

        ``key``: its top-level key in :meth:`state_dict` (``None``: under ``"diagnostics"``, by
        its class name); ``optional``: a state without it loads, the part starting empty (a key
        added by a later klmonitor).
        """
        if name in self._entries:
            raise ValueError(f"the window already has a part {name!r}")
        self._entries[name] = _Entry(part, key, optional)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Any:
        return self._entries[name].part

    def names(self) -> list[str]:
        """The parts' names, in reduce order."""
        return list(self._entries)

    def reset(self) -> None:
        """Empty every part."""
        for entry in self._entries.values():
            entry.part.reset()

    def config(self) -> dict[str, Any]:
        """What the diagnostics were made with, by class name (a checkpoint carries it)."""
        return {type(e.part).__name__: e.part.config() for e in self._entries.values() if e.key is None}

    # -- the reduce ------------------------------------------------------------------------
    def reduce(self, header: Tensor) -> tuple[list[list[float]], dict[str, list[float]]]:
        """Merge every part over all ranks; one ``all_gather`` (and one ``all_reduce``), one host transfer.

        ``header``: a small float64 vector every rank sends every other (e.g. its step and
        batch count). Returns the ranks' headers (as lists of floats) and each part's merged
        window on the host, by name (laid out as its ``host``).
        """
        dev = header.device
        names = list(self._entries)
        parts = [self._entries[n].part for n in names]
        vectors = [p.vector(dev) for p in parts]
        whole = sum(p.summed_size for p in parts) <= GATHER_WHOLE
        small = [header] + [v if whole else p.gathered(v) for p, v in zip(parts, vectors, strict=True)]
        flat = torch.cat([v.reshape(-1) for v in small])
        rank, world = distributed()
        if world > 1:
            gathered = [torch.empty_like(flat) for _ in range(world)]
            torch.distributed.all_gather(gathered, flat)
            rows = torch.stack(gathered)
        else:
            rows = flat.reshape(1, -1)
        pieces = torch.split(rows, [v.numel() for v in small], dim=1)
        if whole:
            host = [p.host(p.merge_rows(r)) for p, r in zip(parts, pieces[1:], strict=True)]
        else:
            shares = [p.summed(v, r, rank) for p, v, r in zip(parts, vectors, pieces[1:], strict=True)]
            total = torch.cat(shares)
            if world > 1:
                torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
            totals = torch.split(total, [s.numel() for s in shares])
            host = [p.host(p.join(t, r)) for p, t, r in zip(parts, totals, pieces[1:], strict=True)]
        out = [pieces[0].reshape(-1), *host]
        values = torch.cat(out).cpu().tolist()  # the window's one host transfer
        split: list[list[float]] = []
        at = 0
        for t in out:
            split.append(values[at : at + t.numel()])
            at += t.numel()
        width = header.numel()
        headers = [split[0][i : i + width] for i in range(0, len(split[0]), width)]
        return headers, dict(zip(names, split[1:], strict=True))

    # -- the state -------------------------------------------------------------------------
    def state_dict(self, device: torch.device) -> dict[str, Any]:
        """Every part's window as plain lists: top-level keys, and ``"diagnostics"`` by class name.

        ``device``: where the parts live (read there, then copied to the host).
        """
        out: dict[str, Any] = {}
        diagnostics: dict[str, list[float]] = {}
        for entry in self._entries.values():
            values = [float(x) for x in entry.part.vector(device).cpu().tolist()]
            if entry.key is None:
                diagnostics[type(entry.part).__name__] = values
            else:
                out[entry.key] = values
        out["diagnostics"] = diagnostics
        return out

    def load_problem(self, state: Mapping[str, Any]) -> tuple[str | None, str | None, dict[str, list[float]]]:
        """Check a saved state before anything is loaded.

        Returns ``(problem of the first required part, problem of the others, values by part
        name)``; a part whose optional key is missing is left out of the values (it starts empty).
        """
        values: dict[str, list[float]] = {}
        first: str | None = None
        diagnostics = state.get("diagnostics", {})
        if not isinstance(diagnostics, Mapping):
            return None, f"diagnostics are a {type(diagnostics).__name__}, not a dict", values
        for i, (name, entry) in enumerate(self._entries.items()):
            if entry.key is None:
                vec = diagnostics.get(type(entry.part).__name__)
                if vec is None:
                    continue  # not saved (an older state, or the part was off): starts empty
                label = f"diagnostics {type(entry.part).__name__}"
                if not isinstance(vec, list) or len(vec) != entry.part.size:
                    return first, f"{label} are not {entry.part.size} numbers", values
                if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vec):
                    return first, f"{label} are not {entry.part.size} numbers", values
            else:
                if entry.key not in state and entry.optional:
                    continue
                vec = state.get(entry.key)
                label = name
            why = entry.part.problem(vec)
            if why is not None:
                if i == 0:
                    return why, None, values
                return first, f"{label} {why}", values
            values[name] = [float(x) for x in (vec or [])]
        return first, None, values

    def load(self, values: Mapping[str, list[float]], device: torch.device) -> None:
        """Load checked values (from :meth:`load_problem`), in the parts' order."""
        for name, entry in self._entries.items():
            if name in values:
                entry.part.load(torch.tensor(values[name], dtype=torch.float64, device=device))
