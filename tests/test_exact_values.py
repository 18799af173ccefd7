"""No clamp by default: exact per-token values to |l| = 700 on every path (issue 11, item 1).

References are independent of klmonitor: 50-digit mpmath values of the six quantities of the
log-ratio the inputs hold, and exact KL of categorical distributions. Every backend that runs
here is checked: the eager torch path, torch.compile, the native CPU kernel (when built) and, on
a CUDA machine, the same on the GPU with the fused Triton kernel (``auto``). The Triton kernel
under the interpreter is checked by tests/test_gpu_kernel.py.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from klmonitor import KLStats, _native
from klmonitor._layout import MAX_ABS, MEAN, NONFINITE, QUANTITIES, TOKENS

mpmath.mp.dps = 50

# |l| from the normal regime through float32's exp limit (88.7) to near float64's (709.8)
MAGNITUDES = (1e-6, 0.05, 0.3, 1.0, 10.0, 20.0, 29.9, 30.5, 31.0, 40.0, 88.0, 89.0, 100.0, 300.0, 700.0)
L_VALUES = (0.0, *MAGNITUDES, *(-m for m in MAGNITUDES))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _backends() -> list[tuple[str, str]]:
    out = [("torch", "cpu"), ("compile", "cpu")]
    if _native.available():
        out.append(("native", "cpu"))
    if torch.cuda.is_available():
        out += [("auto", "cuda"), ("torch", "cuda"), ("compile", "cuda")]
    return out


BACKENDS = _backends()
IDS = [f"{b}-{d}" for b, d in BACKENDS]


def exact_quantities(l: float) -> list[float]:
    """k1, k2, k3, kl_pq, r - 1, k2 - k3 of one log-ratio, to 50 digits, as floats."""
    x = mpmath.mpf(l)
    em1 = mpmath.expm1(x)
    k3 = em1 - x
    return [float(v) for v in (-x, x * x / 2, k3, em1 * x - k3, em1, x * x / 2 - k3)]


def token_pair(l: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(logp, ref) log-probs (both <= 0) in ``dtype`` whose difference is about ``l``, and the
    log-ratio they hold exactly (the float32 difference of the stored values, as klmonitor
    defines it; for these values it is exact)."""
    a = torch.tensor([-l if l > 0 else 0.0], dtype=torch.float64).to(dtype)
    b = torch.tensor([0.0 if l > 0 else l], dtype=torch.float64).to(dtype)
    held = float(b.float() - a.float())
    assert held == float(b.double() - a.double()), (l, dtype)  # exact in float32
    return a, b, held


def _close(got: float, want: float, rel: float = 1e-4) -> bool:
    if want == 0.0:
        return abs(got) <= 1e-30
    return abs(got - want) <= rel * abs(want)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_per_token_values_match_mpmath_to_700(backend: str, device: str, dtype: torch.dtype) -> None:
    bad = []
    for l in L_VALUES:
        a, b, held = token_pair(l, dtype)
        # four copies of the token: the mean is the token's value, the variance 0
        logp, ref = a.repeat(4).to(device), b.repeat(4).to(device)
        stats = KLStats(backend=backend)  # type: ignore[arg-type]
        stats.update(logp, ref)
        v = stats.summary_vector().double().cpu().numpy()
        assert v[TOKENS] == 4 and v[NONFINITE] == 0, (l, v)
        assert v[MAX_ABS] == pytest.approx(abs(held), rel=1e-7)
        want = exact_quantities(held)
        for name, got, w in zip(QUANTITIES, v[MEAN], want, strict=True):
            if not _close(float(got), w):
                bad.append((l, held, name, float(got), w))
    assert not bad, bad


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("masked", [False, True])
def test_extreme_tokens_mixed_into_a_batch(backend: str, device: str, masked: bool) -> None:
    # Every extreme value among 5,000 ordinary tokens, in one batch: the means match the float64
    # mean of the 50-digit per-token values; no NaN anywhere, even where l = 700 makes the
    # squares (the variances) overflow float64.
    g = torch.Generator().manual_seed(3)
    n = 5000
    logp = -torch.empty(n).exponential_(generator=g)
    ref = logp + 0.2 * torch.randn(n, generator=g)
    where = torch.randperm(n, generator=g)[: len(L_VALUES)]
    for i, l in zip(where.tolist(), L_VALUES, strict=True):
        logp[i], ref[i] = (-l, 0.0) if l > 0 else (0.0, l)
    mask = torch.rand(n, generator=g) < 0.8 if masked else torch.ones(n, dtype=torch.bool)
    mask[where] = True
    held = (ref - logp).double().numpy()
    keep = mask.numpy()
    values = np.array([exact_quantities(float(x)) for x in held[keep]])
    want = values.mean(0)
    stats = KLStats(backend=backend)  # type: ignore[arg-type]
    stats.update(logp.to(device), ref.to(device), mask.to(device) if masked else None)
    s = stats.compute()
    v = stats.summary_vector().double().cpu().numpy()
    assert not np.isnan(v).any(), v
    assert s.tokens == int(keep.sum())
    assert s.extreme == sum(abs(x) > 20 for x in L_VALUES)
    assert s.max_abs_log_ratio == 700.0
    for j, name in enumerate(QUANTITIES):
        got = getattr(s, name).mean
        scale = np.abs(values[:, j]).max() / len(values)  # float64's own limit on the mean
        assert abs(got - want[j]) <= 1e-4 * abs(want[j]) + 1e-12 * scale, (name, got, want[j])
    # the variance of k1 and k2 stays finite and exact; those of the exp-based ones overflow
    for name in ("k1", "k2"):
        j = QUANTITIES.index(name)
        assert getattr(s, name).var == pytest.approx(np.var(values[:, j], ddof=1), rel=1e-4)
    for name in ("k3", "kl_pq", "r_minus_1"):
        var = getattr(s, name).var
        assert var == math.inf or var > 1e300, (name, var)
    assert all(math.isfinite(x) for x in s.to_dict().values())


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_the_issue_example_is_unbiased(backend: str, device: str) -> None:
    # 31 tokens at l = 0 and one at l = -30: k3 mean (e^-30 - 1 + 30) / 32 = 0.906, not the
    # 0.594 a clamp at 20 gives.
    logp = torch.zeros(32, device=device)
    ref = torch.zeros(32, device=device)
    ref[7] = -30.0
    stats = KLStats(backend=backend)  # type: ignore[arg-type]
    stats.update(logp, ref)
    s = stats.compute()
    assert s.k3.mean == pytest.approx((math.exp(-30) + 29) / 32, rel=1e-6)
    assert s.extreme == 1
    clamped = KLStats(backend=backend, clamp=20.0)  # type: ignore[arg-type]
    clamped.update(logp, ref)
    assert clamped.compute().k3.mean == pytest.approx((math.exp(-20) + 19) / 32, rel=1e-6)


# -- exact KL of categorical distributions, heavy tails ----------------------------------------
def _zipf(v: int, s: float = 1.1) -> np.ndarray:
    p = 1.0 / np.arange(1, v + 1) ** s
    return p / p.sum()


def _categorical_case(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(q = the policy, which samples; p = the reference), both over 1,000 tokens."""
    v = 1000
    q = _zipf(v)
    rng = np.random.default_rng(7)
    tail = rng.choice(v, size=60, replace=False)  # spread over frequent and rare tokens
    logp = np.log(q)
    if kind == "p_tiny_where_q_is_not":  # l = -40 on ~10 % of q's mass: a collapsed policy
        tail = np.arange(3, 8)
        logp[tail] -= 40.0
    elif kind == "q_below_p_by_e4":  # q = p e^-4 on some tokens: r = e^4 there
        logp[tail] += 4.0
    elif kind == "mixed_tails":
        logp[tail[:30]] += 4.0
        logp[tail[30:]] -= 25.0
    p = np.exp(logp - np.logaddexp.reduce(logp))
    return q, p


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("kind", ["p_tiny_where_q_is_not", "q_below_p_by_e4", "mixed_tails"])
def test_categorical_heavy_tails_within_4_standard_errors(backend: str, device: str, kind: str) -> None:
    q, p = _categorical_case(kind)
    exact = float(np.sum(q * (np.log(q) - np.log(p))))  # KL(q || p), q sampling
    exact_pq = float(np.sum(p * (np.log(p) - np.log(q))))  # KL(p || q): kl_pq's target
    rng = np.random.default_rng(11)
    tokens = rng.choice(len(q), size=32_768, p=q)
    logq = torch.tensor(np.log(q)[tokens], dtype=torch.float32, device=device)
    logp = torch.tensor(np.log(p)[tokens], dtype=torch.float32, device=device)
    stats = KLStats(backend=backend)  # type: ignore[arg-type]
    stats.update(logq, logp)
    s = stats.compute()
    for name in ("k1", "k3"):
        st = getattr(s, name)
        assert abs(st.mean - exact) <= 4 * st.stderr, (kind, name, st.mean, exact, st.stderr)
    assert abs(s.kl_pq.mean - exact_pq) <= 4 * s.kl_pq.stderr, (kind, s.kl_pq.mean, exact_pq)
    if kind == "p_tiny_where_q_is_not":
        # the clamp the peers use is 20 nats short on every tail token: far outside 4 s.e.
        peers = KLStats(backend=backend, clamp=20.0)  # type: ignore[arg-type]
        peers.update(logq, logp)
        c = peers.compute()
        assert exact - c.k3.mean > 10 * c.k3.stderr, (c.k3.mean, exact)
        assert s.extreme > 0 and c.extreme == s.extreme


SEQUENCE_BACKENDS = [b for b in BACKENDS if b[0] != "native"]  # the native kernel is token level


@pytest.mark.parametrize("backend,device", SEQUENCE_BACKENDS, ids=[f"{b}-{d}" for b, d in SEQUENCE_BACKENDS])
def test_sequence_level_sums_extreme_tokens_exactly(backend: str, device: str) -> None:
    # level="sequence": each row's sum over its tokens, an extreme one among them, against the
    # sums of 50-digit values (the native kernel is token level only).
    g = torch.Generator().manual_seed(5)
    rows, length = 8, 64
    logp = -torch.rand(rows, length, generator=g) * 3
    ref = logp + 0.1 * torch.randn(rows, length, generator=g)
    extremes = (-700.0, -40.0, -30.0, 25.0, 45.0, 90.0, 300.0, 700.0)
    for r, l in enumerate(extremes):
        logp[r, 3 * r], ref[r, 3 * r] = (-l, 0.0) if l > 0 else (0.0, l)
    held = (ref - logp).double().numpy()
    per_row = np.array([np.sum([exact_quantities(float(x)) for x in row], axis=0) for row in held])
    stats = KLStats(level="sequence", backend=backend)  # type: ignore[arg-type]
    stats.update(logp.to(device), ref.to(device))
    s = stats.compute()
    assert s.count == rows and s.extreme == len(extremes)
    assert not np.isnan(stats.summary_vector().double().cpu().numpy()).any()
    for j, name in enumerate(QUANTITIES):
        want = per_row[:, j].mean()
        assert getattr(s, name).mean == pytest.approx(want, rel=1e-4), name
