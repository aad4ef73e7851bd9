"""Two runs of one seed compared on the same examples: McNemar's test and the paired difference.

Across seeds, :mod:`dpq.pareto.stats` gives a t interval. Within one seed there is one number per
run, and "0.8505 against 0.8590" says nothing of whether nine examples in 1,057 is more than two
models that disagree on eighty examples would give by chance. With the runs' per-example
predictions (:mod:`dpq.predictions`) it does:

* the **discordant pairs**: ``b`` examples only the first run gets right, ``c`` only the second;
* **McNemar's exact test**: under "equally accurate" each discordant example goes either way with
  probability 1/2, so ``min(b, c)`` is binomial(b + c, 1/2); two-sided p-value (scipy's ``binomtest``);
* the **paired difference** of accuracies ``(c - b) / n`` with its Wald interval for matched
  proportions, ``sqrt(b + c - (c - b)^2 / n) / n`` standard error (Agresti, *Categorical Data
  Analysis*, sec. 10.1), adequate at the hundreds of discordant pairs these test splits give.

This describes the test split's sampling of examples, for one trained model each; the seeds'
t interval describes training. Neither replaces the other.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .stats import LEVEL

# results.json's accuracy key -> the split in predictions.npz
SPLIT_OF = {"accuracy": "test", "val_accuracy": "val"}


def paired_accuracy(first: np.ndarray, second: np.ndarray, level: float = LEVEL) -> dict:
    """``second`` minus ``first``: two boolean "correct" arrays over the same examples."""
    from scipy.stats import binomtest, norm

    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape or first.ndim != 1 or not len(first):
        raise ValueError(f"paired arrays must be 1-D and of one length, got {first.shape} and {second.shape}")
    n = len(first)
    b = int((first & ~second).sum())  # only the first right
    c = int((~first & second).sum())  # only the second right
    diff = (c - b) / n
    se = math.sqrt(max(b + c - (c - b) ** 2 / n, 0.0)) / n
    z = float(norm.ppf(0.5 + level / 2))
    p = float(binomtest(min(b, c), b + c, 0.5).pvalue) if b + c else 1.0
    return {
        "n": n,
        "only_first": b,
        "only_second": c,
        "diff": diff,
        "ci_low": diff - z * se,
        "ci_high": diff + z * se,
        "p_mcnemar": p,
        "level": level,
    }


class Predictions:
    """Per-example predictions of the runs in a table, read once per run folder."""

    def __init__(self):
        self._cache: dict[str, dict | None] = {}

    def of(self, run_path) -> dict | None:
        from dpq import predictions

        if not isinstance(run_path, str) or not run_path:
            return None
        if run_path not in self._cache:
            self._cache[run_path] = predictions.load(Path(run_path))
        return self._cache[run_path]

    def correct(self, row, metric: str) -> tuple[np.ndarray | None, str | None]:
        """``row``'s run right or wrong on each example of ``metric``'s split: ``(array, None)``;
        ``(None, None)`` without predictions (or for a metric that is no accuracy); ``(None, why)``
        when the predictions are not that run's (they do not give its recorded ``metric``)."""
        split = SPLIT_OF.get(metric)
        p = self.of(row.get("run_path")) if split else None
        if p is None or f"{split}_pred" not in p:
            return None, None
        from dpq.predictions import reproduces

        right = p[f"{split}_pred"] == p[f"{split}_label"]
        want = row.get(metric)
        if not reproduces(right, want):
            return (
                None,
                f"{row['label']}: its predictions give {metric} {right.mean():.4f}, not the run's {want}",
            )
        return right, None

    def labels(self, row, metric: str) -> str:
        from dpq.predictions import digest

        return digest(self.of(row.get("run_path"))[f"{SPLIT_OF[metric]}_label"])

    def pair(self, first, second, metric: str) -> dict | None:
        """``second`` against ``first`` (rows with ``run_path`` and ``metric``) on the examples of
        ``metric``'s split; None when either run has no predictions or ``metric`` is no accuracy,
        ``{"missing": why}`` when they cannot be paired honestly."""
        got = [self.correct(r, metric) for r in (first, second)]
        why = next((w for _, w in got if w), None)
        if why:
            return {"missing": why}
        if any(c is None for c, _ in got):
            return None
        if self.labels(first, metric) != self.labels(second, metric):
            return {"missing": "the two runs were measured on different examples (their labels differ)"}
        return {"split": SPLIT_OF[metric], **paired_accuracy(got[0][0], got[1][0])}

    def seed_averaged(self, base, cand, metric: str) -> dict | None:
        """Candidate minus baseline over seeds *and* examples: see :func:`seed_averaged`. ``base`` and
        ``cand`` are frames of final runs; used when every seed both share has one run per side with
        predictions that are the run's (else None, or ``{"missing": why}``)."""
        seeds = sorted(set(base["seed"].dropna()) & set(cand["seed"].dropna()))
        if not seeds or SPLIT_OF.get(metric) is None:
            return None
        for side in (base, cand):
            if "prefix_of" in side and side["prefix_of"].notna().any():
                return {
                    "missing": f"{side['label'].iloc[0]} is read off runs' prefixes: no predictions of its own"
                }
        firsts, seconds, digests = [], [], set()
        for seed in seeds:
            pair = []
            for side in (base, cand):
                rows = side[side["seed"] == seed]
                if len(rows) != 1:
                    return {"missing": f"seed {int(seed)} has {len(rows)} runs of {side['label'].iloc[0]}"}
                right, why = self.correct(rows.iloc[0], metric)
                if why:
                    return {"missing": why}
                if right is None:
                    return None
                digests.add(self.labels(rows.iloc[0], metric))
                pair.append(right)
            firsts.append(pair[0])
            seconds.append(pair[1])
        if len(digests) > 1:
            return {"missing": "the runs were measured on different examples (their labels differ)"}
        return {"split": SPLIT_OF[metric], "seeds": [int(s) for s in seeds], **seed_averaged(firsts, seconds)}


def seed_averaged(firsts: list[np.ndarray], seconds: list[np.ndarray], level: float = LEVEL) -> dict:
    """The mean over seeds of ``second - first`` accuracy, with the interval a new test sample would
    give (the trained models held fixed).

    The seeds' t interval holds the test split fixed: every seed is scored on the same examples, so
    how those examples were drawn is in none of its spread. Here the roles swap: per example, the
    difference averaged over the seeds, ``d_i``; the mean of ``d_i`` is the mean paired difference,
    and ``sd(d_i) / sqrt(n)`` its standard error over examples (normal interval)."""
    from scipy.stats import norm

    d = np.mean([np.asarray(s, float) - np.asarray(f, float) for f, s in zip(firsts, seconds)], axis=0)
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    z = float(norm.ppf(0.5 + level / 2))
    mean = float(d.mean())
    return {
        "mean": mean,
        "se": se,
        "ci_low": mean - z * se,
        "ci_high": mean + z * se,
        "n_examples": n,
        "n_seeds": len(firsts),
        "level": level,
    }
