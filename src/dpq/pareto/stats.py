"""How sure a difference across seeds is: the mean with a 95% interval, not the mean alone.

With three seeds and a seed-to-seed spread of most of an accuracy point, a mean difference of a
few tenths says little; a claim such as "within one point of the baseline" holds only when the
whole interval lies above -1 point. Paired differences (candidate minus baseline on the same
seed) get Student's t interval on their mean, with n - 1 degrees of freedom; unpaired ones
Welch's interval for a difference of means. The t quantile comes from scipy (a dependency of
scikit-learn, which dpq requires).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

LEVEL = 0.95


def t_quantile(df: float, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def mean_interval(values: Sequence[float], level: float = LEVEL) -> dict:
    """``mean``, ``std`` (n - 1), ``n`` and the t interval ``ci_low``/``ci_high`` of the mean
    (None with fewer than two values: one seed bounds nothing)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    out = {
        "mean": statistics.fmean(xs) if xs else None,
        "std": statistics.stdev(xs) if n > 1 else 0.0,
        "n": n,
        "ci_low": None,
        "ci_high": None,
        "level": level,
    }
    if n > 1:
        half = t_quantile(n - 1, level) * out["std"] / math.sqrt(n)
        out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    return out


def difference_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict:
    """Unpaired: mean(b) - mean(a) with Welch's interval (None unless both sides have two values)."""
    xa, xb = mean_interval(a, level), mean_interval(b, level)
    out = {
        "mean": None,
        "std": 0.0,
        "n": min(xa["n"], xb["n"]),
        "ci_low": None,
        "ci_high": None,
        "level": level,
    }
    if xa["mean"] is None or xb["mean"] is None:
        return out
    out["mean"] = xb["mean"] - xa["mean"]
    out["std"] = math.hypot(xa["std"], xb["std"])
    if xa["n"] > 1 and xb["n"] > 1:
        va, vb = xa["std"] ** 2 / xa["n"], xb["std"] ** 2 / xb["n"]
        se = math.sqrt(va + vb)
        if se == 0:
            out["ci_low"] = out["ci_high"] = out["mean"]
        else:
            df = (va + vb) ** 2 / (va**2 / (xa["n"] - 1) + vb**2 / (xb["n"] - 1))
            half = t_quantile(df, level) * se
            out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    return out


def verdict(stat: dict, threshold: float) -> str:
    """Whether the interval says the quantity is >= ``threshold``: ``met`` (all of it is),
    ``missed`` (none of it is) or ``unresolved`` (it straddles the threshold, or there is no interval)."""
    lo, hi = stat.get("ci_low"), stat.get("ci_high")
    if lo is None or hi is None:
        return "unresolved"
    if lo >= threshold:
        return "met"
    return "missed" if hi < threshold else "unresolved"
