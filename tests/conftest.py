"""Shared test configuration: offline trackers and deterministic, deadline-free hypothesis runs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# No test may reach a tracker's servers.
os.environ.setdefault("WANDB_MODE", "offline")

# The first KLStats call loads and self-tests the native kernel: no per-example
# deadline. `derandomize` keeps CI runs reproducible; set HYPOTHESIS_PROFILE=explore locally
# to search with fresh seeds and more examples.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Torch's intra-op thread pool spins; on a small machine shared with other jobs, multi-threaded
# elementwise ops ran 100x slower than single-threaded ones. Tests that need several threads
# (the native kernel's split) set them locally.
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("KLMONITOR_TEST_THREADS", "1")))


@pytest.fixture(params=["avx2", "portable"])
def body(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with each vector body of the fused CPU kernel (AVX2 only where the CPU has it)."""
    from klmonitor import _native

    if not _native.available():
        pytest.skip(f"native kernel unavailable: {_native.unavailable_reason()}")
    if request.param == "avx2" and not _native.cpu_has_avx2():
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    before = _native.vector_isa()
    assert _native.select_isa(request.param) == request.param
    try:
        yield request.param
    finally:
        _native.select_isa(before or "auto")
