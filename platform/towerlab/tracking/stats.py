"""The statistics of a sweep comparison, as pure functions of numbers: each configuration's mean and Student t 95%
interval over its seeds, a ranking, pairwise Welch's t-tests with Holm's correction over all pairs, and which
configurations are not significantly different from the best ("tied with the best").

Why these: replicates of one configuration differ by seed only, so their spread is the noise a difference between
configurations has to exceed; variances differ between configurations (a loss can be less stable than another), hence
Welch rather than Student's pooled test; and a sweep makes many pairwise comparisons at once, hence a family-wise
correction. scipy has the tests and t quantiles but no Holm (its `false_discovery_control` is Benjamini-Hochberg, a
false discovery rate, not a family-wise error), and statsmodels is not a dependency: Holm's step-down is written here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

ALPHA = 0.05
LEVEL = 0.95


@dataclass
class ConfigStat:
    key: str  # the configuration's identity
    values: list[float]  # the metric of each of its runs (one per seed)
    n: int = 0
    mean: float = math.nan
    low: float | None = None  # the 95% interval; None when n < 2 (no spread to estimate)
    high: float | None = None
    rank: int = 0  # 1 = best
    mark: str = ""  # "best", "tied with best", "worse", "not tested" (n < 2, or no spread on either side)
    p_vs_best: float | None = None  # the Holm-adjusted p of the pair with the best


@dataclass
class Pair:
    a: str
    b: str
    p: float | None  # Welch's two-sided p; None when either side has n < 2 or no variance at all
    p_holm: float | None = None
    significant: bool = False


@dataclass
class Result:
    configs: list[ConfigStat]  # ranked, best first
    pairs: list[Pair] = field(default_factory=list)
    alpha: float = ALPHA
    tested: int = 0  # K: pairs with a p-value (the Holm family)

    def note(self) -> str:
        return (f"Welch's t, Holm-corrected over {self.tested} pairs, alpha {self.alpha:g}; "
                f"intervals: Student t {LEVEL:.0%} over seeds (none for n=1)")


def interval(values: list[float], level: float = LEVEL) -> tuple[float | None, float | None]:
    """Student t interval of the mean: mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n); (None, None) for n < 2."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None, None
    half = stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: sorted ascending, the i-th (from 0) of m is
    multiplied by (m - i), capped at 1 and made non-decreasing along the order (a later step cannot be more
    significant than an earlier one). Rejecting where adjusted p < alpha is Holm's procedure at family-wise alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for step, i in enumerate(order):
        running = max(running, min(1.0, (m - step) * pvalues[i]))
        out[i] = running
    return out


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided p of Welch's t-test (scipy), or None when it is undefined (a side with n < 2, or both constant)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    if np.var(a) == 0 and np.var(b) == 0:  # no spread to weigh the difference by: scipy would say p=0 (t = inf)
        return None
    with warnings.catch_warnings():  # (near-)constant samples: scipy warns, and answers nan where t is undefined
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return None if math.isnan(p) else p


def compare(groups: dict[str, list[float]], mode: str = "max", alpha: float = ALPHA) -> Result:
    """Rank the configurations `groups` (key -> metric values over seeds) by mean, best first, and test them."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    configs = []
    for key, values in groups.items():
        low, high = interval(values)
        configs.append(ConfigStat(key, list(values), len(values), float(np.mean(values)), low, high))
    configs.sort(key=lambda c: -c.mean if mode == "max" else c.mean)
    for rank, c in enumerate(configs, 1):
        c.rank = rank
    pairs = [Pair(a.key, b.key, welch(a.values, b.values)) for a, b in combinations(configs, 2)]
    tested = [p for p in pairs if p.p is not None]
    for pair, adjusted in zip(tested, holm([p.p for p in tested])):
        pair.p_holm = adjusted
        pair.significant = adjusted < alpha
    result = Result(configs, pairs, alpha, len(tested))
    if configs:
        best = configs[0]
        best.mark = "best"
        with_best = {p.b: p for p in pairs if p.a == best.key}  # pairs keep the ranking's order: best is always a
        for c in configs[1:]:
            pair = with_best[c.key]
            c.p_vs_best = pair.p_holm
            c.mark = "not tested" if pair.p is None else ("worse" if pair.significant else "tied with best")
    return result


def tied_with_best(result: Result) -> list[str]:
    return [c.key for c in result.configs if c.mark == "tied with best"]
