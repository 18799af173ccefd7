"""Constructor-argument checks shared by every public class (plain Python).

Each check returns the value in its canonical type or raises ``TypeError`` (wrong type) or
``ValueError`` (right type, wrong value) with a message naming the argument, what was expected
and what was received.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def is_real(x: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_number(
    x: Any, arg: str, *, low: float | None = None, low_inclusive: bool = False, hint: str = ""
) -> float:
    """``x`` as a finite float, ``> low`` (or ``>= low``); else TypeError/ValueError naming it.

    >>> check_number(2, "threshold", low=0.0)
    2.0
    """
    if not is_real(x):
        raise TypeError(f"{arg} must be a real number{hint}, got {type(x).__name__} {x!r}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{arg} must be finite{hint}, got {x!r}")
    if low is not None and (value < low if low_inclusive else value <= low):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{arg} must be {op} {low}{hint}, got {x!r}")
    return value


def check_int(x: Any, arg: str, *, low: int, hint: str = "") -> int:
    """``x`` as an int ``>= low`` (a bool or a float such as ``2.5`` or ``2.0`` is refused).

    >>> check_int(3, "patience", low=1)
    3
    """
    if not isinstance(x, numbers.Integral) or isinstance(x, bool):
        raise TypeError(f"{arg} must be an int >= {low}{hint}, got {type(x).__name__} {x!r}")
    if int(x) < low:
        raise ValueError(f"{arg} must be an int >= {low}{hint}, got {x!r}")
    return int(x)


def check_bool(x: Any, arg: str) -> bool:
    """``x`` if it is ``True`` or ``False`` (``1``, ``"yes"`` or ``None`` are refused)."""
    if not isinstance(x, bool):
        raise TypeError(f"{arg} must be True or False, got {type(x).__name__} {x!r}")
    return x


def check_str(x: Any, arg: str, *, allow_empty: bool = False) -> str:
    """``x`` if it is a string (non-empty unless ``allow_empty``)."""
    if not isinstance(x, str):
        raise TypeError(f"{arg} must be a str, got {type(x).__name__} {x!r}")
    if not x and not allow_empty:
        raise ValueError(f"{arg} must be a non-empty str, got {x!r}")
    return x


def check_choice(x: Any, arg: str, choices: Sequence[T]) -> T:
    """``x`` if it is one of ``choices``."""
    if x not in choices:
        raise ValueError(f"{arg} must be one of {tuple(choices)}, got {x!r}")
    chosen: T = x
    return chosen


def check_callables(x: Any, arg: str, signature: str) -> list[Callable[..., Any]]:
    """``None``, a callable, or a sequence of callables, as a list."""
    if x is None:
        return []
    if callable(x):
        return [x]
    if isinstance(x, str | bytes) or not isinstance(x, Sequence):
        raise TypeError(f"{arg} must be a callable {signature} or a list of them, got {type(x).__name__}")
    bad = [c for c in x if not callable(c)]
    if bad:
        raise TypeError(f"{arg} must be a callable {signature} or a list of them, got {bad[0]!r} in the list")
    return list(x)


def version_in(version: str, supported: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    """Whether ``version``'s major.minor lies in ``[lo, hi)`` (an unparsable version does not).

    >>> version_in("1.16.2", ((1, 16), (1, 17))), version_in("1.17.0.dev0", ((1, 16), (1, 17)))
    (True, False)
    """
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    lo, hi = supported
    return lo <= major_minor < hi
