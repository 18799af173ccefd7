"""klmonitor: KL(policy || reference) monitoring for RL fine-tuning.

The layers, lowest first: :mod:`klmonitor.estimators` (elementwise math),
:class:`klmonitor.KLStats` (streaming on-device statistics), :mod:`klmonitor.alerts`
(decisions), :mod:`klmonitor.sinks` (where numbers go), :class:`klmonitor.Monitor` (the
framework-free product), and one thin adapter per framework: :mod:`klmonitor.lightning`,
:mod:`klmonitor.pytorch_lightning` (also ``klmonitor.KLMonitor``) and
:mod:`klmonitor.transformers`. Everything is imported on first use, so ``import klmonitor``
pulls in no framework.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "AlertLevel",
    "EstimatorStats",
    "FDivergence",
    "KLMonitor",
    "KLStats",
    "KLSummary",
    "Monitor",
    "WindowResult",
    "__version__",
    "alerts",
    "estimators",
    "sinks",
    "table",
]

if TYPE_CHECKING:  # pragma: no cover
    from klmonitor import alerts, estimators, sinks, table
    from klmonitor.alerts import Alert, AlertLevel
    from klmonitor.fdiv import FDivergence
    from klmonitor.monitor import Monitor, WindowResult
    from klmonitor.pytorch_lightning import KLMonitor
    from klmonitor.stats import KLStats
    from klmonitor.summary import EstimatorStats, KLSummary

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "Alert": ("klmonitor.alerts", "Alert"),
    "AlertLevel": ("klmonitor.alerts", "AlertLevel"),
    "EstimatorStats": ("klmonitor.summary", "EstimatorStats"),
    "FDivergence": ("klmonitor.fdiv", "FDivergence"),
    "KLMonitor": ("klmonitor.pytorch_lightning", "KLMonitor"),
    "KLStats": ("klmonitor.stats", "KLStats"),
    "KLSummary": ("klmonitor.summary", "KLSummary"),
    "Monitor": ("klmonitor.monitor", "Monitor"),
    "WindowResult": ("klmonitor.monitor", "WindowResult"),
    "alerts": ("klmonitor.alerts", None),
    "estimators": ("klmonitor.estimators", None),
    "sinks": ("klmonitor.sinks", None),
    "table": ("klmonitor.table", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'klmonitor' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)


def __dir__() -> list[str]:
    return sorted(__all__)
