"""The estimator table (klmonitor.table) drives names, layout and the f family."""

from __future__ import annotations

import importlib
import math

import pytest

from klmonitor import _layout, estimators, summary, table


def test_every_entry_names_a_function_and_its_series_is_taylors() -> None:
    for e in (*table.KL, *table.F_DIVERGENCES):
        module, attr = e.function.split(":")
        fn = getattr(importlib.import_module(module), attr)
        assert callable(fn), e.name
        assert e.family == ("kl" if e in table.KL else "f")
    # k3's series is sum l**n / n!, kl_pq's (n - 1) l**n / n!
    assert table.entry("k3").series == pytest.approx([1 / math.factorial(n) for n in range(2, 8)])
    assert table.entry("kl_pq").series == pytest.approx([(n - 1) / math.factorial(n) for n in range(2, 8)])


def test_the_layout_summary_and_estimators_read_the_table() -> None:
    assert _layout.QUANTITIES[:4] == table.KL_NAMES == estimators.ESTIMATORS == summary.ESTIMATORS
    assert estimators.K3_SERIES == table.entry("k3").series


def test_the_f_family_functions_come_from_the_table() -> None:
    from klmonitor import fdiv

    assert tuple(fdiv._BUILTIN) == table.F_NAMES
    for e in table.F_DIVERGENCES:
        assert fdiv._BUILTIN[e.name].__name__ == e.function.split(":")[1]


def test_unknown_entry() -> None:
    with pytest.raises(KeyError, match="chi2"):
        table.entry("chi3")
