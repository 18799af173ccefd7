"""Shared test configuration: offline trackers and deterministic, deadline-free hypothesis runs."""

from __future__ import annotations

import os

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
