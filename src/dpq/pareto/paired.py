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

    def pair(self, first, second, metric: str) -> dict | None:
        """``second`` against ``first`` (rows with ``run_path`` and ``metric``) on the examples of
        ``metric``'s split; None when either run has no predictions or ``metric`` is no accuracy,
        ``{"missing": why}`` when they cannot be paired honestly."""
        from dpq.predictions import digest

        split = SPLIT_OF.get(metric)
        if split is None:
            return None
        preds = [self.of(r.get("run_path")) for r in (first, second)]
        if any(p is None or f"{split}_pred" not in p for p in preds):
            return None
        for r, p in zip((first, second), preds):
            n = len(p[f"{split}_label"])
            got = float((p[f"{split}_pred"] == p[f"{split}_label"]).mean())
            want = r.get(metric)
            if (
                want is None
                or (isinstance(want, float) and math.isnan(want))
                or abs(got - float(want)) * n >= 0.5
            ):
                return {
                    "missing": f"{r['label']}: its predictions give {metric} {got:.4f}, not the run's {want}"
                }
        if digest(preds[0][f"{split}_label"]) != digest(preds[1][f"{split}_label"]):
            return {"missing": "the two runs were measured on different examples (their labels differ)"}
        return {
            "split": split,
            **paired_accuracy(
                preds[0][f"{split}_pred"] == preds[0][f"{split}_label"],
                preds[1][f"{split}_pred"] == preds[1][f"{split}_label"],
            ),
        }
