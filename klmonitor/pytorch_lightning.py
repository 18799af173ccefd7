"""``KLMonitor`` for the ``pytorch_lightning`` package (also ``klmonitor.KLMonitor``).

>>> from klmonitor.pytorch_lightning import KLMonitor
>>> import pytorch_lightning as pl
>>> isinstance(KLMonitor(max_kl=0.1), pl.Callback)
True
"""

from __future__ import annotations

import pytorch_lightning as pl

from klmonitor._lightning_adapter import LightningAdapter

__all__ = ["KLMonitor"]


class KLMonitor(LightningAdapter, pl.Callback):  # noqa: D101 (the docstring is the shared one)
    __doc__ = LightningAdapter.__doc__
