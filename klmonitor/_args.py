"""The :class:`~klmonitor.Monitor` arguments an adapter takes, and keyword checks that name the fix.

One definition of the Monitor's arguments (its own signature) for every adapter: an adapter
passes on each of them it accepts by name (:func:`monitor_kwargs`), a test checks that every
adapter accepts them all (bar those the framework sets, such as ``sinks`` and ``rank``), and a
misspelled keyword is answered with the public class's name and the closest argument
(:func:`check_keywords`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from klmonitor.monitor import Monitor

__all__ = ["MONITOR_ARGS", "check_keywords", "monitor_kwargs"]

#: The Monitor's arguments, in its signature's order, with their defaults.
MONITOR_ARGS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(Monitor.__init__).parameters.items() if name != "self"
}


def monitor_kwargs(values: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """The Monitor's arguments found in ``values`` (e.g. an adapter's ``locals()``), but ``skip``."""
    left_out = set(skip)
    return {name: values[name] for name in MONITOR_ARGS if name in values and name not in left_out}


def check_keywords(owner: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Raise ``TypeError`` for a keyword ``owner`` does not take, with the closest it does.

    >>> check_keywords("klmonitor.lightning.KLMonitor", ["max_kll"], ["max_kl", "prefix"])
    Traceback (most recent call last):
    ...
    TypeError: klmonitor.lightning.KLMonitor() got an unexpected keyword argument 'max_kll'; did you mean 'max_kl'?
    """
    names = list(accepted)
    for key in given:
        if key in names:
            continue
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(names)}"
        raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}{hint}")
