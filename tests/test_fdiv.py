"""The f-divergence family (klmonitor.fdiv, KLStats/Monitor(f_divergences=...)).

References are independent of klmonitor's code: 50-digit mpmath values of each f at
``r = e**l``, exact f-divergences of categorical distributions (``sum q f(p / q)``), and float64
numpy statistics of the per-token values.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from klmonitor import FDivergence, KLStats, Monitor, fdiv, table

BUILTINS = table.F_NAMES


def exact_f(name: str, l: float) -> mpmath.mpf:
    """``f(r) - f'(1) (r - 1)`` at ``r = e**l``, to 50 digits (f'(1) = 0 for every built-in)."""
    with mpmath.workdps(50):
        x = mpmath.mpf(l)
        r = mpmath.e**x
        if name == "chi2":
            return (r - 1) ** 2
        if name == "hellinger":
            return (mpmath.sqrt(r) - 1) ** 2
        if name == "tv":
            return abs(r - 1) / 2
        if name == "js":
            return (r * x - (1 + r) * mpmath.log((1 + r) / 2)) / 2
    raise AssertionError(name)


def f_of_ratio(name: str, r: np.ndarray) -> np.ndarray:
    """The built-in's f(r) in float64 numpy (for exact categorical divergences)."""
    if name == "chi2":
        return (r - 1) ** 2
    if name == "hellinger":
        return (np.sqrt(r) - 1) ** 2
    if name == "tv":
        return np.abs(r - 1) / 2
    if name == "js":
        return 0.5 * (r * np.log(r) - (1 + r) * np.log((1 + r) / 2))
    raise AssertionError(name)


LOG_RATIOS = np.concatenate(
    [-np.logspace(-6, math.log10(30), 60), np.logspace(-6, math.log10(30), 60), [0.0]]
)


# -- the table's series ---------------------------------------------------------------------
def test_js_series_matches_the_taylor_expansion() -> None:
    # The table's coefficients against mpmath's Taylor expansion of f(e**l) at 0.
    def js(x: mpmath.mpf) -> mpmath.mpf:
        r = mpmath.e**x
        return (r * x - (1 + r) * mpmath.log((1 + r) / 2)) / 2

    with mpmath.workdps(40):
        coeffs = mpmath.taylor(js, 0, 11)
    series = table.entry("js").series
    for n, c in enumerate(series, start=2):
        assert c == pytest.approx(float(coeffs[n]), rel=1e-12), n


# -- exact per token ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTINS)
def test_per_token_values_are_exact(name: str) -> None:
    fn = getattr(fdiv, name)
    got = fn(torch.tensor(LOG_RATIOS, dtype=torch.float64)).tolist()
    for l, g in zip(LOG_RATIOS, got, strict=True):
        e = float(exact_f(name, float(l)))
        if e == 0:
            assert g == 0, (l, g)
        else:
            assert g == pytest.approx(e, rel=1e-6, abs=0), (name, l)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", BUILTINS)
def test_window_of_one_value_is_exact_through_klstats(name: str, dtype: torch.dtype) -> None:
    # Log-probs in the input dtype; the log-ratio is their difference (exact in float64).
    for l in (1e-6, -3e-4, 0.05, -0.7, 2.0, -12.0, 30.0):
        logp = torch.full((5,), -40.0, dtype=dtype)
        ref = (logp.double() + l).to(dtype)
        true_l = float(ref.double()[0] - logp.double()[0])
        s = KLStats(f_divergences=[name])
        s.update(logp, ref)
        st = s.compute().f[name]
        assert st.mean == pytest.approx(float(exact_f(name, true_l)), rel=1e-6, abs=0), l
        assert st.var == pytest.approx(0.0, abs=1e-12 * max(1.0, st.mean**2))


# -- unbiased: within 4 standard errors of exact categorical values ------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_means_cover_exact_categorical_divergences(seed: int, level: str) -> None:
    rng = np.random.default_rng(seed)
    vocab = 40
    q = rng.dirichlet(np.ones(vocab))
    # The reference: the policy tilted token by token (ratios within about e**+-1.5, as in RL
    # fine-tuning). chi2's per-token values are (r - 1)**2: where the ratio is unbounded (a
    # token the policy nearly never samples but the reference likes), its sample mean misses the
    # unsampled tail and no standard error covers it (see the table's note).
    p = q * np.exp(0.5 * rng.standard_normal(vocab))
    p /= p.sum()
    tokens = rng.choice(vocab, size=(400, 25), p=q)
    logp = torch.tensor(np.log(q)[tokens], dtype=torch.float32)
    ref = torch.tensor(np.log(p)[tokens], dtype=torch.float32)
    custom = FDivergence("reverse_kl", lambda r: r * torch.log(r))  # f'(1) = 1: kl_pq
    s = KLStats(level=level, f_divergences=[*BUILTINS, custom])
    s.update(logp, ref)
    summary = s.compute()
    length = tokens.shape[1] if level == "sequence" else 1  # a sequence sums its tokens' values
    for name in (*BUILTINS, "reverse_kl"):
        fr = f_of_ratio(name, p / q) if name != "reverse_kl" else (p / q) * np.log(p / q)
        exact = length * float((q * fr).sum())
        st = summary.f[name]
        assert abs(st.mean - exact) < 4 * st.stderr, (name, st.mean, exact, st.stderr)
    # The custom entry is kl_pq's construction: the same per-token values, the same tokens.
    assert summary.f["reverse_kl"].mean == pytest.approx(summary.kl_pq.mean, rel=1e-5)


# -- the same tokens as the KL statistics --------------------------------------------------------
def numpy_stats(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.var(ddof=1))


def test_masks_nonfinite_and_huge_ratios_are_left_out_as_for_kl() -> None:
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(6, 30, generator=g) * 5
    ref = logp + 0.3 * torch.randn(6, 30, generator=g)
    ref[0, 0] = float("nan")
    ref[1, 1] = float("inf")
    ref[2, 2] = logp[2, 2] + 800.0  # above +700: counted as non-finite without a clamp
    mask = (torch.rand(6, 30, generator=g) < 0.7).float()
    mask[3, 3] = 0.5  # not 0/1: left out (counted in nonfinite)
    s = KLStats(f_divergences=list(BUILTINS))
    s.update(logp, ref, mask)
    summary = s.compute()
    lr = (ref.double() - logp.double()).numpy()
    ok = np.isfinite(lr) & (lr <= 700) & (mask.numpy() == 1)
    assert summary.tokens == int(ok.sum())
    for name in BUILTINS:
        vals = np.array([float(exact_f(name, x)) for x in lr[ok]])
        mean, var = numpy_stats(vals)
        assert summary.f[name].mean == pytest.approx(mean, rel=1e-9)
        assert summary.f[name].var == pytest.approx(var, rel=1e-6)


def test_clamp_applies_to_the_family() -> None:
    logp = torch.zeros(4)
    ref = torch.tensor([-30.0, 30.0, 0.5, -0.5])
    s = KLStats(clamp=5.0, f_divergences=["tv", "chi2"])
    s.update(logp, ref)
    summary = s.compute()
    clamped = np.clip(ref.numpy().astype(np.float64), -5, 5)
    for name in ("tv", "chi2"):
        expected = np.mean([float(exact_f(name, x)) for x in clamped])
        assert summary.f[name].mean == pytest.approx(expected, rel=1e-9)


def test_sequence_level_sums_rows_and_skips_empty_rows() -> None:
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(7, 12, generator=g) * 4
    ref = logp + 0.4 * torch.randn(7, 12, generator=g)
    mask = torch.rand(7, 12, generator=g) < 0.8
    mask[2] = False  # no sample
    s = KLStats(level="sequence", f_divergences=["hellinger", "js"])
    s.update(logp, ref, mask)
    summary = s.compute()
    lr = (ref.double() - logp.double()).numpy()
    m = mask.numpy()
    rows = [r for r in range(7) if m[r].any()]
    assert summary.count == len(rows) == 6
    for name in ("hellinger", "js"):
        sums = np.array([sum(float(exact_f(name, x)) for x in lr[r][m[r]]) for r in rows])
        mean, var = numpy_stats(sums)
        assert summary.f[name].mean == pytest.approx(mean, rel=1e-9)
        assert summary.f[name].var == pytest.approx(var, rel=1e-9)


def test_batches_merge_exactly_in_any_split() -> None:
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(5000, generator=g) * 6
    ref = logp + torch.randn(5000, generator=g)
    whole = KLStats(f_divergences=list(BUILTINS))
    whole.update(logp, ref)
    parts = KLStats(f_divergences=list(BUILTINS))
    for lo, hi in ((0, 1), (1, 1), (1, 700), (700, 5000)):  # an empty batch among them
        parts.update(logp[lo:hi], ref[lo:hi])
    a, b = whole.compute().f, parts.compute().f
    for name in BUILTINS:
        assert b[name].mean == pytest.approx(a[name].mean, rel=1e-12)
        assert b[name].var == pytest.approx(a[name].var, rel=1e-10)


def test_chi2_beyond_float64_is_infinite_not_nan() -> None:
    s = KLStats(f_divergences=["chi2", "tv"])
    s.update(torch.zeros(3), torch.tensor([0.1, 400.0, -0.2]))  # (e**400 - 1)**2 overflows float64
    s.update(torch.zeros(2), torch.tensor([0.3, 0.2]))
    f = s.compute().f
    assert f["chi2"].mean == math.inf
    assert math.isfinite(f["tv"].mean)
    assert "kl/f/chi2/mean" not in s.compute().to_dict()  # undefined values are left out of the logs
    assert "kl/f/tv/mean" in s.compute().to_dict()


def test_off_by_default_and_logged_names() -> None:
    s = KLStats()
    s.update(torch.zeros(3), torch.full((3,), 0.1))
    assert s.compute().f == {} and s.f_vector() is None
    assert not any("/f/" in k for k in s.compute().to_dict())
    s = KLStats(f_divergences=["chi2"])
    s.update(torch.zeros(3), torch.tensor([0.1, 0.2, 0.3]))
    d = s.compute().to_dict()
    assert {"kl/f/chi2/mean", "kl/f/chi2/std", "kl/f/chi2/stderr"} <= set(d)
    assert "f_divergences=['chi2']" in repr(s)


# -- custom entries ------------------------------------------------------------------------------
def test_custom_entry_equals_the_builtin_it_rewrites() -> None:
    mine = FDivergence("pearson", lambda r: (r - 1) ** 2)
    assert mine.per_token(torch.tensor([0.0], dtype=torch.float64)).item() == 0.0
    g = torch.Generator().manual_seed(11)
    logp = -torch.rand(2000, generator=g) * 5
    ref = logp + 0.5 * torch.randn(2000, generator=g)
    s = KLStats(f_divergences=["chi2", mine])
    s.update(logp, ref)
    f = s.compute().f
    assert f["pearson"].mean == pytest.approx(f["chi2"].mean, rel=1e-9)


def test_custom_entry_takes_f_prime_by_autograd_or_given() -> None:
    kl = FDivergence("reverse_kl", lambda r: r * torch.log(r))  # f'(1) = 1: kl_pq's construction
    l = torch.tensor([0.7, -1.3], dtype=torch.float64)
    r = torch.exp(l)
    assert kl.per_token(l).tolist() == pytest.approx((r * l - (r - 1)).tolist(), rel=1e-12)
    tv = FDivergence("my_tv", lambda r: (r - 1).abs() / 2, f_prime_at_1=0.0)
    assert tv.per_token(l).tolist() == pytest.approx(fdiv.tv(l).tolist(), rel=1e-12)
    # At a kink autograd gives torch's subgradient (0 for abs at 0): a valid tangent.
    kink = FDivergence("kink", lambda r: (r - 1).abs())
    assert kink.per_token(l).tolist() == pytest.approx((2 * fdiv.tv(l)).tolist(), rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "Bad Name", "f": lambda r: (r - 1) ** 2}, ValueError, "lower-case"),
        ({"name": "chi2", "f": lambda r: (r - 1) ** 2}, ValueError, "built-in"),
        ({"name": "k3", "f": lambda r: (r - 1) ** 2}, ValueError, "built-in"),
        ({"name": "shifted", "f": lambda r: (r - 1) ** 2 + 1}, ValueError, "f\\(1\\) = 0"),
        ({"name": "concave", "f": lambda r: -((r - 1) ** 2)}, ValueError, "convex|tangent"),
        ({"name": "sq_log", "f": lambda r: torch.log(r) ** 2 / 2}, ValueError, "not convex near r"),
        ({"name": "wrong_slope", "f": lambda r: (r - 1) ** 2, "f_prime_at_1": 3.0}, ValueError, "tangent"),
        ({"name": "scalar", "f": lambda r: ((r - 1) ** 2).sum()}, ValueError, "shape"),
        ({"name": "numpy", "f": lambda r: np.square(r.numpy() - 1)}, ValueError, "torch ops"),
        ({"name": "not_fn", "f": 3}, TypeError, "callable"),
    ],
)
def test_bad_custom_entries_say_what_to_fix(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        FDivergence(**kwargs)


def test_resolve_names_the_fix() -> None:
    with pytest.raises(ValueError, match="did you mean 'hellinger'"):
        KLStats(f_divergences=["helinger"])
    with pytest.raises(ValueError, match="twice"):
        KLStats(f_divergences=["js", "js"])
    with pytest.raises(TypeError, match="FDivergence"):
        KLStats(f_divergences=[3])
    assert KLStats(f_divergences="tv").f_divergences == ("tv",)


# -- torchmetrics contract: state, casts, compute groups -----------------------------------------
def test_state_is_float64_saved_and_loaded() -> None:
    s = KLStats(f_divergences=["chi2", "js"])
    s.persistent(True)
    s.update(torch.zeros(4), torch.tensor([0.1, 0.2, -0.3, 0.05]))
    s.half()  # a module cast keeps the state float64
    assert s.f_vector().dtype == torch.float64
    sd = s.state_dict()
    assert "_f" in sd
    t = KLStats(f_divergences=["chi2", "js"])
    t.load_state_dict(sd)
    assert t.compute().f == s.compute().f
    sd["_f"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="_f"):
        KLStats(f_divergences=["chi2", "js"]).load_state_dict(sd)


def test_metrics_with_other_f_divergences_never_share_a_compute_group() -> None:
    from torchmetrics import MetricCollection

    coll = MetricCollection({"plain": KLStats(), "chi": KLStats(f_divergences=["chi2"])})
    coll.update(torch.zeros(3), torch.full((3,), 0.2))
    coll.update(torch.zeros(3), torch.full((3,), 0.4))
    out = coll.compute()
    assert out["chi"].f["chi2"].mean == pytest.approx(math.expm1(0.2) ** 2 / 2 + math.expm1(0.4) ** 2 / 2)
    assert out["plain"].f == {}
    with pytest.raises(ValueError, match="f-divergences"):
        KLStats().merge_state(KLStats(f_divergences=["tv"]))


# -- Monitor: logs, checkpoint --------------------------------------------------------------------
def feed(mon: Monitor, steps: range, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for step in steps:
        logp = -torch.rand(4, 16, generator=g) * 3
        mon.update(logp, logp + 0.2 * torch.randn(4, 16, generator=g))
        mon.step(step)


def test_monitor_logs_the_family() -> None:
    logged: list[dict] = []
    mon = Monitor(log_every_n_steps=2, sinks=lambda m, step: logged.append(m), f_divergences=["chi2", "tv"])
    feed(mon, range(1, 5))
    assert len(logged) == 2
    for m in logged:
        assert {"kl/f/chi2/mean", "kl/f/chi2/stderr", "kl/f/tv/mean", "kl/f/tv/std"} <= set(m)
    assert mon.last_summary is not None and set(mon.last_summary.f) == {"chi2", "tv"}


def test_monitor_checkpoint_resumes_the_open_window_exactly() -> None:
    a = Monitor(log_every_n_steps=4, f_divergences=["js", "hellinger"], rules=[])
    feed(a, range(1, 3))
    state = json.loads(json.dumps(a.state_dict()))  # plain values
    b = Monitor(log_every_n_steps=4, f_divergences=["js", "hellinger"], rules=[])
    b.load_state_dict(state)
    feed(a, range(3, 5), seed=9)
    feed(b, range(3, 5), seed=9)
    assert a.last_summary is not None and b.last_summary is not None
    for name in ("js", "hellinger"):
        assert b.last_summary.f[name].mean == pytest.approx(a.last_summary.f[name].mean, rel=1e-12)
        assert b.last_summary.f[name].var == pytest.approx(a.last_summary.f[name].var, rel=1e-12)


def test_checkpoint_of_other_f_divergences_is_refused_with_a_reason() -> None:
    a = Monitor(log_every_n_steps=4, f_divergences=["js"], rules=[])
    feed(a, range(1, 3))
    b = Monitor(log_every_n_steps=4, f_divergences=["tv"], rules=[])
    with pytest.warns(UserWarning, match="f_divergences=\\['js'\\]"):
        b.load_state_dict(a.state_dict())
    assert b.stats.f_vector().tolist() == [0.0, 0.0, 0.0]
    # A state saved before the family existed (no key) loads into a monitor without it.
    old = Monitor(log_every_n_steps=4, rules=[])
    feed(old, range(1, 3))
    state = old.state_dict()
    del state["config"]["f_divergences"]
    assert "f_window" not in state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Monitor(log_every_n_steps=4, rules=[]).load_state_dict(state)


def test_corrupt_f_window_is_not_loaded() -> None:
    a = Monitor(log_every_n_steps=4, f_divergences=["chi2"], rules=[])
    feed(a, range(1, 3))
    state = a.state_dict()
    state["f_window"] = [2.5, -1.0, 0.0]
    b = Monitor(log_every_n_steps=4, f_divergences=["chi2"], rules=[])
    with pytest.warns(UserWarning, match="f-divergences"):
        b.load_state_dict(state)
    assert b.stats.f_vector().tolist() == [0.0, 0.0, 0.0]


def test_adapters_accept_f_divergences() -> None:
    from klmonitor.lightning import KLMonitor as LightningKLMonitor
    from klmonitor.pytorch_lightning import KLMonitor as PLKLMonitor

    for cls in (LightningKLMonitor, PLKLMonitor):
        cb = cls(f_divergences=["chi2"])
        assert cb.monitor.stats.f_divergences == ("chi2",)
    pytest.importorskip("transformers")
    from klmonitor.transformers import KLMonitorCallback

    assert KLMonitorCallback(f_divergences=["js"]).monitor.stats.f_divergences == ("js",)


# -- DDP: exact over 2 gloo processes --------------------------------------------------------------
WORLD = 2


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for rows, cols in ((5, 20), (3, 7)) if rank == 0 else ((6, 11),):
        logp = -torch.rand(rows, cols, generator=g) * 6
        ref = logp + (0.3 + rank) * torch.randn(rows, cols, generator=g)
        mask = torch.rand(rows, cols, generator=g) < 0.8
        out.append((logp, ref, mask))
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = {}
        for level in ("token", "sequence"):
            stats = KLStats(level=level, f_divergences=list(BUILTINS))
            mon = Monitor(log_every_n_steps=1, level=level, f_divergences=list(BUILTINS), rules=[])
            for b in _batches(rank):
                stats.update(*b)
                mon.update(*b, behaviour_logprobs=b[0] - 0.1 * b[1].abs().sqrt())
            mon.step(1)
            assert mon.last_summary is not None
            up = mon.last_summary.policy_update
            assert up is not None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f = stats.compute().f
            result[level] = {
                "klstats": {k: [v.mean, v.var] for k, v in f.items()},
                "monitor": {k: [v.mean, v.var] for k, v in mon.last_summary.f.items()},
                "update": [up.k3.mean, up.k3.var, up.tokens],
            }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("fdiv_ddp")
    ctx = mp.start_processes(
        _worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 180 s")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ddp_equals_one_process_over_the_union(ddp_results: list[dict], level: str) -> None:
    alone = KLStats(level=level, f_divergences=list(BUILTINS))
    for rank in range(WORLD):
        for b in _batches(rank):
            alone.update(*b)
    expected = alone.compute().f
    for rank in range(WORLD):
        for source in ("klstats", "monitor"):
            got = ddp_results[rank][level][source]
            assert set(got) == set(BUILTINS)
            for name in BUILTINS:
                assert got[name][0] == pytest.approx(expected[name].mean, rel=1e-12), (rank, source, name)
                assert got[name][1] == pytest.approx(expected[name].var, rel=1e-10), (rank, source, name)
    if level == "token":  # the policy update's window merges over the ranks too
        up = KLStats()
        for rank in range(WORLD):
            for logp, ref, mask in _batches(rank):
                up.update(logp - 0.1 * ref.abs().sqrt(), logp, mask)
        k3 = up.compute().k3
        for rank in range(WORLD):
            mean, var, tokens = ddp_results[rank][level]["update"]
            assert mean == pytest.approx(k3.mean, rel=1e-6) and var == pytest.approx(k3.var, rel=1e-5)
            assert tokens == up.compute().tokens
