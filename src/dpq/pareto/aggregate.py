"""Merge the points of several seeds of one configuration into mean +- standard deviation.

Rows with the same ``kind`` and ``config_key`` (see :mod:`dpq.pareto.gather`) are one
configuration. Runs that repeat the same seed (e.g. a quant-only run launched once per
value of an unused pruning knob) are averaged first, so ``n_seeds`` counts independent
seeds and the standard deviation (ddof=1; 0 for a single seed) is across seeds only.
"""

from __future__ import annotations

import logging

import pandas as pd

from dpq.core.errors import ConfigError

from .gather import distinct_labels, metric_columns
from .objectives import Objective

log = logging.getLogger("dpq.pareto")

GROUP = ["kind", "config_key"]


def add_objectives(df: pd.DataFrame, objectives: list[Objective]) -> pd.DataFrame:
    """Columns named after each objective (and ``<name>_std``), in its unit (metric x scale); NaN where missing."""
    df = df.copy()
    for o in objectives:
        df[o.name] = df[o.metric] * o.scale if o.metric in df else float("nan")
        if f"{o.metric}_std" in df:
            df[f"{o.name}_std"] = df[f"{o.metric}_std"] * o.scale
    return df


def drop_few_seeds(df: pd.DataFrame, min_seeds: int) -> pd.DataFrame:
    """The runs of configurations measured on at least ``min_seeds`` distinct seeds.

    A mean over one seed and a mean over three are not the same kind of evidence: a one-seed
    variant can land on the front by luck beside three-seed means. ``--min-seeds 3`` keeps the
    front, the ownership and the per-seed domination check to configurations with every seed.
    The teacher and dense-student references count like any configuration.
    """
    if min_seeds < 1:
        raise ConfigError("--min-seeds", min_seeds, "must be a positive number of seeds")
    if df.empty or min_seeds == 1:
        return df
    n = df.groupby(GROUP, sort=False, dropna=False)["seed"].transform(lambda s: s.dropna().nunique())
    keep = n >= min_seeds
    if not keep.any():
        raise ConfigError(
            "--min-seeds", min_seeds, f"no configuration has that many seeds (the most is {int(n.max())})"
        )
    dropped = df[~keep & (df["kind"] == "final")]
    if not dropped.empty:
        names = dropped.groupby(GROUP, sort=False, dropna=False).agg(
            label=("label", "first"),
            seeds=("seed", lambda s: ",".join(map(str, sorted(s.dropna().unique())))),
        )
        log.info(
            "--min-seeds %d leaves out %d configuration(s): %s",
            min_seeds,
            len(names),
            "; ".join(f"{r.label} (seeds {r.seeds or 'none'})" for r in names.itertuples()),
        )
    kept = df[keep].reset_index(drop=True)
    if "base_label" in kept:  # settings appended to tell configurations apart may no longer be needed
        kept["label"] = distinct_labels(kept.assign(label=kept["base_label"]))
    return kept


def merge_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: ``<metric>`` means, ``<metric>_std``, ``n_seeds``, ``seeds``, ``runs``."""
    if df.empty:
        return df
    metrics = metric_columns(df)
    seed = df["seed"].fillna(-1)
    per_seed = df.assign(_seed=seed).groupby([*GROUP, "_seed"], sort=False, dropna=False)
    means = per_seed[metrics].mean().reset_index()
    grouped = means.groupby(GROUP, sort=False, dropna=False)
    out = grouped[metrics].mean()
    std = grouped[metrics].std(ddof=1).fillna(0.0)
    out = out.join(std.add_suffix("_std"))
    out["n_seeds"] = grouped.size()
    info_cols = [c for c in df.columns if c not in metrics and c not in (*GROUP, "run", "run_name", "seed")]
    raw = df.groupby(GROUP, sort=False, dropna=False)
    info = raw[info_cols].first()
    info["n_runs"] = raw.size()
    info["seeds"] = raw["seed"].agg(lambda s: ",".join(str(int(v)) for v in sorted(s.dropna().unique())))
    info["runs"] = raw["run"].agg(lambda s: "; ".join(dict.fromkeys(s)))
    merged = info.join(out).reset_index()
    front = [
        c
        for c in (
            "kind",
            "label",
            "pipeline",
            "order",
            "final_sparsity",
            "granularity",
            "bits",
            "act_bits",
            "n_seeds",
            "seeds",
        )
        if c in merged
    ]
    return merged[front + [c for c in merged.columns if c not in front]]
