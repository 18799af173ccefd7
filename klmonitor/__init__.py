"""klmonitor: KL(policy || reference) monitoring for RL fine-tuning.

The layers, lowest first: :mod:`klmonitor.estimators` (elementwise math),
:class:`klmonitor.KLStats` (streaming on-device statistics), :mod:`klmonitor.alerts`
(decisions), and :class:`klmonitor.KLMonitor` (the PyTorch Lightning callback). Lightning is
imported only when the callback is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from klmonitor import estimators
from klmonitor.stats import EstimatorStats, KLStats, KLSummary

__version__ = "0.1.0"

__all__ = ["EstimatorStats", "KLStats", "KLSummary", "__version__", "estimators"]

if TYPE_CHECKING:  # pragma: no cover
    pass


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import klmonitor` free of Lightning and of the alert machinery.
    raise AttributeError(f"module 'klmonitor' has no attribute {name!r}")
