"""The comparison's statistics against independent computations: numpy means, scipy's own t interval and Welch
test, Holm's procedure on a worked example, and a hand-made sweep where two configurations clearly differ and two
clearly tie."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from towerlab.tracking import stats


def test_interval_is_students_t_over_seeds():
    x = [0.81, 0.84, 0.80, 0.86]
    low, high = stats.interval(x)
    expected = sps.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
    assert (low, high) == pytest.approx(expected, rel=1e-12)
    assert stats.interval([0.5]) == (None, None)  # one seed: no spread to estimate


def test_holm_on_a_worked_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> kept monotone at 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_two_clearly_differ_and_two_clearly_tie():
    groups = {"a": [0.90, 0.91, 0.92], "b": [0.89, 0.915, 0.905], "c": [0.50, 0.52, 0.51], "d": [0.7]}
    r = stats.compare(groups, "max")
    assert [c.key for c in r.configs] == ["a", "b", "d", "c"]
    for c in r.configs:
        assert c.mean == pytest.approx(np.mean(groups[c.key])) and c.n == len(groups[c.key])
    assert {c.key: c.mark for c in r.configs} == {"a": "best", "b": "tied with best", "c": "worse",
                                                  "d": "not tested"}
    assert stats.tied_with_best(r) == ["b"]
    assert r.tested == 3  # d (n=1) is in no tested pair; a-b, a-c, b-c are
    raw = {(p.a, p.b): p for p in r.pairs}
    ac = raw[("a", "c")]
    assert ac.p == pytest.approx(sps.ttest_ind(groups["a"], groups["c"], equal_var=False).pvalue)
    ps = [raw[k].p for k in [("a", "b"), ("a", "c"), ("b", "c")]]
    assert [raw[k].p_holm for k in [("a", "b"), ("a", "c"), ("b", "c")]] == pytest.approx(stats.holm(ps))
    assert ac.significant and not raw[("a", "b")].significant
    assert "Holm-corrected over 3 pairs, alpha 0.05" in r.note()


def test_constant_replicates_are_not_tested_rather_than_guessed():
    r = stats.compare({"a": [0.9, 0.9], "b": [0.8, 0.8]}, "max")
    assert r.tested == 0 and r.configs[1].mark == "not tested" and r.pairs[0].p is None


def test_min_mode_ranks_the_smallest_first():
    r = stats.compare({"hi": [2.0, 2.1], "lo": [1.0, 1.1]}, "min")
    assert [c.key for c in r.configs] == ["lo", "hi"]
