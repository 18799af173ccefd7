"""``KLMonitor`` for the unified ``lightning`` package (``lightning.pytorch``).

>>> from klmonitor.lightning import KLMonitor
>>> import lightning.pytorch as pl
>>> isinstance(KLMonitor(max_kl=0.1), pl.Callback)
True
"""

from __future__ import annotations

import lightning.pytorch as pl

from klmonitor._lightning_adapter import LightningAdapter

__all__ = ["KLMonitor"]


class KLMonitor(LightningAdapter, pl.Callback):  # noqa: D101 (the docstring is the shared one)
    __doc__ = LightningAdapter.__doc__
