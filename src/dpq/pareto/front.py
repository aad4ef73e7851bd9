"""The non-dominated set of points for 2 or 3 objectives, each maximised or minimised.

Written by hand (a few lines of numpy) rather than pulled from an optimisation library
(pymoo, paretoset) because the rules on ties, duplicates and missing values must be
exactly those documented here, and the point counts of a sweep (tens to thousands) make
the O(n^2) comparison instant.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .objectives import SENSES

# What a front is one of: points of another task, student or teacher are never compared with each other.
CONTEXT = ("task", "model", "teacher")

_CHUNK = 1024


def pareto_mask(points, senses: Sequence[str]) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    ``points``: array-like (n, k), one column per objective; ``senses``: "max" or
    "min" per column. Point a dominates b when a is at least as good in every
    objective and strictly better in at least one. Hence:

    * ties in some objectives do not dominate: (acc 0.9, 1 GFLOP) and (0.9, 2)
      -> only the cheaper one is on the front, but (0.9, 1) and (0.8, 0.5) both are;
    * exact duplicates do not dominate each other: both copies are on the front;
    * a point with a missing (NaN) value is never on the front and dominates nothing.
    """
    a = np.asarray(points, dtype=float)
    if a.ndim != 2:
        raise ValueError(f"points must be a 2-d array (n points x k objectives), got shape {a.shape}")
    n, k = a.shape
    if len(senses) != k:
        raise ValueError(f"{k} objective columns but {len(senses)} senses")
    bad = [s for s in senses if s not in SENSES]
    if bad:
        raise ValueError(f"senses must be 'max' or 'min', got {bad}")
    if n == 0:
        return np.zeros(0, dtype=bool)
    # Turn everything into minimisation.
    m = np.where(np.array([s == "max" for s in senses]), -a, a)
    valid = ~np.isnan(m).any(axis=1)
    mv = m[valid]
    dominated = np.zeros(len(mv), dtype=bool)
    for start in range(0, len(mv), _CHUNK):  # chunks bound memory at _CHUNK x n x k
        rows = mv[start : start + _CHUNK, None, :]
        # le[i, j]: j is at least as good as i everywhere; lt[i, j]: strictly better somewhere.
        le = (mv[None, :, :] <= rows).all(axis=2)
        lt = (mv[None, :, :] < rows).any(axis=2)
        dominated[start : start + _CHUNK] = (le & lt).any(axis=1)
    mask = np.zeros(n, dtype=bool)
    mask[np.flatnonzero(valid)] = ~dominated
    return mask


def step_order(x, senses_x: str) -> tuple[np.ndarray, str]:
    """Order of front points along x, and the step shape that draws the attainable boundary.

    With x minimised, a point covers every larger x, so the line holds each point's y
    until the next point ("post" step); with x maximised it holds back to the previous one ("pre").
    """
    order = np.argsort(np.asarray(x, dtype=float), kind="stable")
    return order, ("post" if senses_x == "min" else "pre")
