"""The layout of a window's moments vector (plain Python: no torch).

A moments vector is ``SIZE`` float64 numbers: the sample count, the mean and M2 (sum of
squared deviations) of each of the six per-sample quantities, then the token diagnostics.
:mod:`klmonitor._moments` fills and merges it (on device), the native kernel writes it, and
:class:`klmonitor.summary.KLSummary` reads it on the host.
"""

from __future__ import annotations

from klmonitor.table import KL_NAMES

#: The six per-sample quantities, in layout order: the table's KL estimators, then the control
#: variate and the paired k2 - k3 difference (the kernels compute exactly these six).
QUANTITIES: tuple[str, ...] = (*KL_NAMES, "r_minus_1", "k2_minus_k3")
assert len(QUANTITIES) == 6, "the fused kernels write six quantities; a new estimator goes in the f family"
NQ = len(QUANTITIES)
COUNT = 0
MEAN = slice(1, 1 + NQ)
M2 = slice(1 + NQ, 1 + 2 * NQ)
TOKENS = 1 + 2 * NQ
NONFINITE = TOKENS + 1
EXTREME = TOKENS + 2  # valid tokens with |l| above the extreme threshold
MAX_ABS = TOKENS + 3
SIZE = TOKENS + 4
