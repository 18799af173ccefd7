"""The f-divergence family: unbiased, never negative per-token estimators of D_f(p || q).

For a convex ``f`` with ``f(1) = 0``, ``D_f(p || q) = E_q[f(r)]`` with ``r = p(x) / q(x)``, and
``f(r) - f'(1) (r - 1)`` (the gap between ``f`` and its tangent at 1) has the same mean under
``q`` (``E_q[r - 1] = 0``) and is never negative. ``k3`` is this construction for ``f = -log``
and ``kl_pq`` for ``f(r) = r log r``; this module adds the built-ins of the estimator table
(:data:`klmonitor.table.F_DIVERGENCES`) and user-defined ones (:class:`FDivergence`).

Every per-token value is computed in float64 from ``l = log p(x) - log q(x)``, with ``expm1``
where a subtraction would cancel near ``r = 1`` and the table's series for Jensen-Shannon.
:func:`fold` adds a batch's values to a window's ``[count, means, M2s]`` (merged with Chan's
rule, as the KL moments are), on the tokens the KL statistics count.

>>> l = torch.tensor([1e-6, 0.5], dtype=torch.float64)
>>> [f"{v:.6e}" for v in chi2(l).tolist()]
['1.000001e-12', '4.208393e-01']
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from klmonitor import table
from klmonitor._merge import chan

__all__ = ["FDivergence", "chi2", "fold", "hellinger", "js", "resolve", "tv"]

_LOG2 = math.log(2.0)
_SERIES_BELOW = 0.1
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# A token whose log-ratio is above this carries r beyond float64 (e**709.8): as in the KL
# statistics (klmonitor._moments.LOG_MAX), it is counted as non-finite and left out.
_LOG_MAX = 700.0


def _series(lr: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """``l**2 (c2 + l (c3 + ...))`` by Horner's rule."""
    acc = torch.full_like(lr, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * lr + c
    return acc * lr * lr


def chi2(lr: Tensor) -> Tensor:
    """Pearson chi2 per token: ``(r - 1)**2 = expm1(l)**2`` (exact near ``r = 1``)."""
    em1 = torch.expm1(lr)
    return em1 * em1


def hellinger(lr: Tensor) -> Tensor:
    """Squared Hellinger per token: ``(sqrt(r) - 1)**2 = expm1(l / 2)**2``."""
    h = torch.expm1(0.5 * lr)
    return h * h


def tv(lr: Tensor) -> Tensor:
    """Total variation per token: ``|r - 1| / 2`` (the subgradient at 1 is 0)."""
    return 0.5 * torch.expm1(lr).abs()


_JS_SERIES = table.entry("js").series


def js(lr: Tensor) -> Tensor:
    """Jensen-Shannon per token: ``f(r) = (r l - (1 + r) log((1 + r) / 2)) / 2`` (``f'(1) = 0``).

    As ``((1 + r) (log 2 - softplus(l)) + r l) / 2``, which does not overflow for large
    ``|l|``; for ``|l| < 0.1``, where its two terms cancel, the table's series (to ``l**7``:
    the next term is below 1e-10 of the value there).
    """
    r = torch.exp(lr)
    # softplus's default threshold (20) returns l itself above it, dropping log1p(e**-l) ~ 2e-9,
    # which the factor r makes a relative error of 3e-9 at l = 20; above 40 it is below 1e-17.
    direct = 0.5 * torch.addcmul(r * lr, 1.0 + r, _LOG2 - torch.nn.functional.softplus(lr, threshold=40.0))
    small = lr.abs() < _SERIES_BELOW
    return torch.where(small, _series(lr, _JS_SERIES), direct).clamp_min(0.0)


def _from_table() -> dict[str, Callable[[Tensor], Tensor]]:
    """The table's f-divergences by name, each with the function its entry names (in this module)."""
    out: dict[str, Callable[[Tensor], Tensor]] = {}
    for e in table.F_DIVERGENCES:
        module, attr = e.function.split(":")
        if module != __name__ or not callable(globals().get(attr)):
            raise ImportError(
                f"the estimator table's entry {e.name!r} names {e.function}, not a function of {__name__}"
            )
        out[e.name] = globals()[attr]
    return out


#: The built-ins: adding one is an entry in klmonitor.table and its per-token function here.
_BUILTIN = _from_table()


@dataclass(frozen=True)
class FDivergence:
    """A user-defined f-divergence ``D_f(p || q) = E_q[f(r)]``, estimated by ``f(r) - f'(1) (r - 1)``.

    Args:
        name: reported as ``kl/f/<name>/...`` (lower-case letters, digits and ``_``; not a
            built-in's name).
        f: a convex function of the ratio ``r`` (a float64 tensor), written with torch ops,
            with ``f(1) = 0``.
        f_prime_at_1: ``f'(1)``; by autograd when not given (give it when ``f`` is not
            differentiable at 1, e.g. a subgradient).

    The per-token value is computed in float64 as written (no series: a custom ``f`` whose
    formula cancels near ``r = 1`` loses precision there). Checked when made: ``f(1) = 0``,
    convexity and a non-negative estimator on a grid of ratios from ``e**-20`` to ``e**20``,
    an output of the input's shape.

    >>> d = FDivergence("neyman", lambda r: (r - 1) ** 2 / r)  # Neyman chi2(q || p)
    >>> [round(v, 6) for v in d.per_token(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()]
    [0.0, 1.086161]
    """

    name: str
    f: Callable[[Tensor], Tensor] = field(repr=False)
    f_prime_at_1: float | None = None
    _slope: float = field(init=False, repr=False, compare=False, default=0.0)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"FDivergence name must be 1-32 lower-case letters, digits or '_', starting with a "
                f"letter (it becomes the metric name kl/f/<name>/mean), got {self.name!r}"
            )
        if self.name in _BUILTIN or self.name in table.KL_NAMES:
            raise ValueError(
                f"FDivergence name {self.name!r} is a built-in estimator's; pass the string "
                f"{self.name!r} for the built-in, or choose another name"
            )
        if not callable(self.f):
            raise TypeError(
                f"FDivergence f must be callable(r: Tensor) -> Tensor, got {type(self.f).__name__}"
            )
        one = torch.ones(1, dtype=torch.float64, requires_grad=self.f_prime_at_1 is None)
        value = self._call(one)
        if not math.isfinite(value.item()) or abs(value.item()) > 1e-9:
            raise ValueError(
                f"FDivergence {self.name!r}: f(1) = {value.item()!r}; an f-divergence needs f(1) = 0 "
                "(subtract f(1) from your f)"
            )
        if self.f_prime_at_1 is None:
            try:
                (grad,) = torch.autograd.grad(value.sum(), one)
            except RuntimeError as exc:
                raise ValueError(
                    f"FDivergence {self.name!r}: f'(1) could not be taken by autograd ({exc}); "
                    "write f with torch ops or pass f_prime_at_1"
                ) from exc
            slope = float(grad.item())
        else:
            if isinstance(self.f_prime_at_1, bool) or not isinstance(self.f_prime_at_1, int | float):
                raise TypeError(f"f_prime_at_1 must be a number or None, got {self.f_prime_at_1!r}")
            slope = float(self.f_prime_at_1)
        if not math.isfinite(slope):
            raise ValueError(
                f"FDivergence {self.name!r}: f'(1) = {slope}; pass a finite f_prime_at_1 (a subgradient)"
            )
        object.__setattr__(self, "_slope", slope)
        self._check_convex()

    def _call(self, r: Tensor) -> Tensor:
        try:
            out = self.f(r)
        except Exception as exc:
            raise ValueError(
                f"FDivergence {self.name!r}: f failed on a float64 tensor of ratios "
                f"({type(exc).__name__}: {exc}); write f with torch ops, elementwise"
            ) from exc
        if not isinstance(out, Tensor) or out.shape != r.shape:
            raise ValueError(
                f"FDivergence {self.name!r}: f must return a tensor of its input's shape "
                f"{tuple(r.shape)}, got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
            )
        return out.to(torch.float64)

    def _check_convex(self) -> None:
        r = torch.exp(torch.linspace(-20.0, 20.0, 401, dtype=torch.float64))
        with torch.no_grad():
            y = self._call(r)
        ok = torch.isfinite(y)
        r, y = r[ok], y[ok]
        gap = y - self._slope * (r - 1.0)
        scale = 1e-9 * (1.0 + y.abs() + (self._slope * (r - 1.0)).abs())
        if bool((gap < -scale).any()):
            bad = float(r[(gap < -scale).nonzero()[0, 0]])
            raise ValueError(
                f"FDivergence {self.name!r}: f lies below its tangent at 1 at r = {bad:.3g} "
                f"(f'(1) = {self._slope:g}); f must be convex, with the right f'(1)"
            )
        step = r[1:] - r[:-1]
        slopes = (y[1:] - y[:-1]) / step
        # The slopes' rounding: float64 differences of values of f, over small steps of r.
        tol = 1e-9 * slopes.abs() + 64 * 2.0**-52 * (y[1:].abs() + y[:-1].abs()) / step
        falling = slopes[1:] < slopes[:-1] - tol[1:] - tol[:-1]
        if bool(falling.any()):
            bad = float(r[1:-1][falling.nonzero()[0, 0]])
            raise ValueError(f"FDivergence {self.name!r}: f is not convex near r = {bad:.3g}")

    def per_token(self, lr: Tensor) -> Tensor:
        """``f(r) - f'(1) (r - 1)`` for float64 log-ratios ``lr``, at least 0."""
        r = torch.exp(lr)
        return (self._call(r) - self._slope * torch.expm1(lr)).clamp_min(0.0)


Spec = str | FDivergence


def resolve(specs: Sequence[Spec] | None) -> tuple[tuple[str, Callable[[Tensor], Tensor]], ...]:
    """``(name, per-token function)`` of each requested f-divergence, checked.

    Raises:
        ValueError: an unknown name (with the closest built-in), a duplicate, or a bad entry.
    """
    if specs is None:
        return ()
    if isinstance(specs, str | FDivergence):
        specs = [specs]
    out: list[tuple[str, Callable[[Tensor], Tensor]]] = []
    for spec in specs:
        fn: Callable[[Tensor], Tensor]
        if isinstance(spec, FDivergence):
            name, fn = spec.name, spec.per_token
        elif isinstance(spec, str):
            if spec not in _BUILTIN:
                close = difflib.get_close_matches(spec, list(_BUILTIN), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "."
                raise ValueError(
                    f"unknown f-divergence {spec!r}{hint} The built-ins are {list(_BUILTIN)}; "
                    "for another one pass klmonitor.FDivergence(name, f)"
                )
            name, fn = spec, _BUILTIN[spec]
        else:
            raise TypeError(
                f"f_divergences takes built-in names {list(_BUILTIN)} or klmonitor.FDivergence "
                f"entries, got {type(spec).__name__}"
            )
        if name in (n for n, _ in out):
            raise ValueError(f"f-divergence {name!r} is requested twice")
        out.append((name, fn))
    return tuple(out)


def size(n: int) -> int:
    """The state's size for ``n`` f-divergences: a count, ``n`` means and ``n`` M2s."""
    return 1 + 2 * n


def fold(
    acc: Tensor,
    logp: Tensor,
    ref: Tensor,
    valid: Tensor | None,
    clamp: float,
    fdivs: Sequence[tuple[str, Callable[[Tensor], Tensor]]],
    sequence: bool = False,
) -> Tensor:
    """``acc`` (``[count, means, M2s]``) merged with a batch's f-divergence values, on device.

    The tokens are those the KL statistics count: valid, finite, ``l <= 700`` without a
    clamp; log-ratios clamped to ``[-clamp, clamp]`` under one. Token level: statistics over
    tokens; ``sequence``: over rows of ``[B, T]`` inputs (each the sum of its tokens' values),
    a row without such a token not being a sample. Float64, two passes per batch (exact),
    Chan's merge into ``acc``; no host sync.
    """
    q = len(fdivs)
    if sequence:  # blocks of whole rows
        block, lp_all, rp_all, vd_all = max(1, _CHUNK // max(1, logp.shape[-1])), logp, ref, valid
    else:
        block, lp_all, rp_all = _CHUNK, logp.reshape(-1), ref.reshape(-1)
        vd_all = valid.reshape(-1) if valid is not None else None
    for lo in range(0, lp_all.shape[0], block):
        vd = vd_all[lo : lo + block] if vd_all is not None else None
        count, mean, m2 = _chunk(lp_all[lo : lo + block], rp_all[lo : lo + block], vd, clamp, fdivs, sequence)
        n, new_mean, new_m2 = chan(acc[0], acc[1 : 1 + q], acc[1 + q :], count, mean, m2)
        acc = torch.cat([n.reshape(1), new_mean, new_m2])
    return acc


# Tokens per block: float64 temporaries of this size stay in the allocator's pools (fresh
# multi-megabyte buffers cost page faults that took longer than the arithmetic).
_CHUNK = 262_144


def _chunk(
    logp: Tensor,
    ref: Tensor,
    valid: Tensor | None,
    clamp: float,
    fdivs: Sequence[tuple[str, Callable[[Tensor], Tensor]]],
    sequence: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, means, M2s)`` of one block of tokens (or rows), two passes in float64."""
    lr = ref.detach().to(torch.float64) - logp.detach().to(torch.float64)
    ok = torch.isfinite(lr)
    if clamp > _LOG_MAX:
        ok &= lr <= _LOG_MAX
    if valid is not None:
        ok &= valid
    lz = torch.where(ok, lr, 0.0)
    if math.isfinite(clamp):
        lz = lz.clamp(-clamp, clamp)
    # The built-ins are exactly 0 at l = 0, where the tokens left out sit; a custom f(1) is 0
    # only to rounding, so its values there are zeroed.
    vals = torch.stack([fn(lz) if name in _BUILTIN else torch.where(ok, fn(lz), 0.0) for name, fn in fdivs])
    if sequence:
        vals = vals.sum(-1)  # [F, B]
        okd = (ok.sum(-1) > 0).to(torch.float64)  # rows with a token
    else:
        okd = ok.to(torch.float64)
    count = okd.sum()
    mean = vals.sum(-1) / count.clamp_min(1.0)
    dev = (vals - mean[:, None]) * okd
    return count, mean, (dev * dev).sum(-1)
