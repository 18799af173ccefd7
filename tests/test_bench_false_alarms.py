"""Smoke run of benchmarks/bench_false_alarms.py: it runs and its JSON is complete.

Rates are not asserted (they belong to benchmarks/README.md); tiny windows keep it short.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_false_alarms.py"


def test_bench_false_alarms_runs_and_reports_every_case() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--windows",
            "2",
            "--seeds",
            "1",
            "--tokens",
            "2048",
            "--max-windows",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    data = json.loads(out.stdout)
    assert data["tokens"] == 2048
    assert len(data["exact"]) == 13 and len(data["out_of_reach"]) == 3
    for row in data["exact"] + data["out_of_reach"]:
        assert row["windows"] == 2 and 0 <= row["triggered"] <= 2 and row["kl"] > 0
    assert {r["sampler"] for r in data["mismatch"]} == {"topk50", "topp0.9", "temp0.7", "shift"}
    assert all(len(r["delays"]) == 1 for r in data["mismatch"])
    assert "exact sampling" in out.stderr
