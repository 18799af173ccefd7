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

__all__ = [
    "Alert",
    "AlertLevel",
    "EstimatorStats",
    "KLMonitor",
    "KLStats",
    "KLSummary",
    "__version__",
    "alerts",
    "estimators",
]

if TYPE_CHECKING:  # pragma: no cover
    from klmonitor import alerts
    from klmonitor.alerts import Alert, AlertLevel
    from klmonitor.callback import KLMonitor


def __getattr__(name: str) -> Any:
    # Lazy: `import klmonitor` stays free of Lightning until the callback is used.
    if name == "KLMonitor":
        from klmonitor.callback import KLMonitor

        return KLMonitor
    if name in ("Alert", "AlertLevel", "alerts"):
        import klmonitor.alerts as alerts_module

        return alerts_module if name == "alerts" else getattr(alerts_module, name)
    raise AttributeError(f"module 'klmonitor' has no attribute {name!r}")
