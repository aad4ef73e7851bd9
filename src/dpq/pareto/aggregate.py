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

from .gather import distinct_labels, json_safe, metric_columns
from .objectives import Objective

log = logging.getLogger("dpq.pareto")

GROUP = ["kind", "config_key"]


def add_objectives(df: pd.DataFrame, objectives: list[Objective]) -> pd.DataFrame:
    """Columns named after each objective (and ``<name>_std``, ``<name>_n``), in its unit (metric x scale);
    NaN where missing."""
    df = df.copy()
    for o in objectives:
        df[o.name] = df[o.metric] * o.scale if o.metric in df else float("nan")
        if f"{o.metric}_std" in df:
            df[f"{o.name}_std"] = df[f"{o.metric}_std"] * o.scale
        if f"{o.metric}_n" in df:
            df[f"{o.name}_n"] = df[f"{o.metric}_n"]
    return df


def relabel(df: pd.DataFrame) -> pd.DataFrame:
    """Labels made again after a filter: settings appended to tell configurations apart (see
    :func:`dpq.pareto.gather.distinct_labels`) may no longer be needed among the rows left."""
    if "base_label" in df:
        df = df.assign(label=distinct_labels(df.assign(label=df["base_label"])))
    return df


SEEDS_SYNTAX = "comma-separated integer seeds or ranges, e.g. 42,43,44 or 42-44"


def parse_seeds(spec: str | None) -> list[int] | None:
    """``--seeds 42,43,44`` (or ``42-46``) as a sorted list of ints; ``None`` keeps every seed."""
    if spec is None:
        return None
    seeds: set[int] = set()
    for part in (p.strip() for p in str(spec).split(",")):
        lo, dash, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if dash and lo else (int(part), int(part))
        except ValueError:
            raise ConfigError("--seeds", spec, SEEDS_SYNTAX) from None
        if first > last:  # an empty range dropped its seeds unsaid
            raise ConfigError("--seeds", spec, f"{SEEDS_SYNTAX} (a range runs low-high: {last}-{first})")
        seeds |= set(range(first, last + 1))
    if not seeds:
        raise ConfigError("--seeds", spec, SEEDS_SYNTAX)
    return sorted(seeds)


def keep_seeds(df: pd.DataFrame, seeds: list[int] | None) -> pd.DataFrame:
    """The runs of the listed seeds only (references included), so a report's command keeps
    producing the same report after more seeds land in its input folders. A listed seed that no
    run has is an error: the report would silently rest on fewer seeds than its command says."""
    if seeds is None or df.empty:
        return df
    have = set(df["seed"].dropna().astype(int))
    missing = [s for s in seeds if s not in have]
    if missing:
        raise ConfigError(
            "--seeds",
            ",".join(map(str, seeds)),
            f"no run has seed {', '.join(map(str, missing))}; the runs have seeds "
            f"{', '.join(map(str, sorted(have))) or 'none'}",
        )
    keep = df["seed"].isin(seeds)
    left = df[~keep & (df["kind"] == "final")]
    if not left.empty:
        log.info(
            "--seeds %s leaves out %d run(s) of seeds %s",
            ",".join(map(str, seeds)),
            len(left),
            ", ".join(
                [
                    *map(str, sorted(set(left["seed"].dropna().astype(int)))),
                    *(["none"] if left["seed"].isna().any() else []),
                ]
            ),
        )
    return relabel(df[keep].reset_index(drop=True))


def warn_mixed_hardware(df: pd.DataFrame) -> list[str]:
    """Warn when the final runs come from more than one processor type: the same recipe and seed
    end at other numbers on another CPU (BENCHMARKS.md, "a note on machines"), so differences
    between such runs mix the method with the machine. Returns the distinct machines."""
    if df.empty or "hardware" not in df:
        return []
    finals = df[df["kind"] == "final"] if "kind" in df else df
    counts = finals["hardware"].value_counts()
    unknown = int(finals["hardware"].isna().sum())
    if len(counts) > 1 or (len(counts) and unknown):
        parts = [f"{n} on {hw}" for hw, n in counts.items()]
        if unknown:
            parts.append(f"{unknown} that do not record it (made before dpq recorded the hardware)")
        log.warning(
            "the runs come from more than one machine type (%s): the same run gives other numbers "
            "on another processor, so differences here mix the method with the machine",
            "; ".join(parts),
        )
    return list(counts.index)


def warn_mixed_data(df: pd.DataFrame) -> list[str]:
    """Warn when runs of one task were measured on different examples (another split seed, a subsample,
    copies of train examples dropped, other files): their metrics are not on the same splits, so
    differences and fronts between them compare the data as much as the method. Returns the distinct
    splits of all the final runs."""
    if df.empty or "data" not in df:
        return []
    finals = df[df["kind"] == "final"] if "kind" in df else df
    tasks = finals["task"].fillna("?") if "task" in finals else pd.Series("?", index=finals.index)
    for task, rows in finals.groupby(tasks, sort=False):
        counts = rows["data"].value_counts()
        if len(counts) > 1:
            log.warning(
                "the runs of task %s were measured on different examples (%s): their metrics are not on "
                "the same splits, so differences here mix the method with the data",
                task,
                "; ".join(f"{n} on {d}" for d, n in counts.items()),
            )
        if "data_content" not in rows:
            continue
        # One source, sizes and seed, but other examples: a file edited, a hub dataset's new revision.
        for data, same in rows.groupby("data", sort=False):
            digests = same["data_content"].dropna().value_counts()
            if len(digests) > 1:
                log.warning(
                    "the runs of task %s on %s were measured on different examples although source, sizes and "
                    "split seed agree (content digests %s: the data changed between runs, e.g. a file edited "
                    "in place or a hub dataset's new revision), so differences here mix the method with the data",
                    task,
                    data,
                    ", ".join(f"{d}: {n} run{'s' * (n != 1)}" for d, n in digests.items()),
                )
    return list(dict.fromkeys(finals["data"].dropna()))


def warn_mixed_hub_models(df: pd.DataFrame) -> list[str]:
    """Warn when runs name one teacher and student but loaded their hub models at different commits (the
    branch moved between runs: other weights under one name), so differences mix the method with the weights.
    Runs made before dpq recorded the commits are no evidence. Returns the distinct commits of the final runs."""
    if df.empty or "hub_commits" not in df:
        return []
    finals = df[df["kind"] == "final"] if "kind" in df else df
    names = [c for c in ("teacher", "model") if c in finals]
    for who, rows in finals.groupby(names or (lambda _: "?"), sort=False, dropna=False):
        commits = rows["hub_commits"].dropna().value_counts()
        if len(commits) > 1:
            log.warning(
                "the runs of %s loaded their hub models at different commits (%s): the weights changed under "
                "one name between runs, so differences here mix the method with the models; pin "
                "teacher.revision / model.revision to one commit",
                " / ".join(map(str, who if isinstance(who, tuple) else (who,))),
                "; ".join(f"{n} run{'s' * (n != 1)} with {c}" for c, n in commits.items()),
            )
    return list(dict.fromkeys(finals["hub_commits"].dropna()))


def warn_mixed_code(df: pd.DataFrame) -> list[str]:
    """Warn when the seeds of one configuration ran under different dpq code or library versions (a seed
    re-run after a fix, into the same study folder), and when runs of one seed disagree on the primary
    metric: they are averaged as one seed, so the disagreement shows in no spread. Returns the labels
    of such configurations."""
    if df.empty:
        return []
    finals = df[df["kind"] == "final"] if "kind" in df else df
    flagged = []
    for _, rows in finals.groupby(GROUP, sort=False, dropna=False):
        label = str(rows["label"].iloc[0]) if "label" in rows else "?"
        for col, what in (("code", "dpq commits"), ("versions", "library versions")):
            if col not in rows:
                continue
            seen = rows[col].dropna().value_counts()
            if col == "versions" and not _versions_differ(rows[col].dropna()):
                continue  # only in which libraries they list (runs recorded before dpq listed more)
            if len(seen) > 1:
                flagged.append(label)
                log.warning(
                    "the runs of %s ran under different %s (%s): a change between them may move their numbers, "
                    "and their mean mixes the two; rerun the older ones, or keep them apart",
                    label,
                    what,
                    "; ".join(f"{n} run{'s' * (n != 1)} with {v}" for v, n in seen.items()),
                )
        primary = rows["primary_metric"].iloc[0] if "primary_metric" in rows else "accuracy"
        metric = primary if primary in rows else "accuracy"
        if metric in rows and "seed" in rows:
            for seed, same in rows.groupby("seed", sort=False):
                values = same[metric].dropna().unique()
                if len(values) > 1:
                    flagged.append(label)
                    log.warning(
                        "seed %s of %s has %d runs that disagree on %s (%s): they are averaged as one seed, "
                        "so the spread across seeds does not show it",
                        seed,
                        label,
                        len(same),
                        metric,
                        ", ".join(f"{v:.4g}" for v in values),
                    )
    return list(dict.fromkeys(flagged))


def _versions_differ(listed: pd.Series) -> bool:
    """Whether runs' ``versions`` ("torch 2.13.0, numpy 2.4.6, ...") disagree on a library they all list."""
    parsed = [dict(part.partition(" ")[::2] for part in str(text).split(", ")) for text in listed]
    common = set.intersection(*(set(p) for p in parsed)) if parsed else set()
    return any(len({p[name] for p in parsed}) > 1 for name in common)


def warn_mixed_objective(df: pd.DataFrame) -> list[str]:
    """Warn when the seeds of one configuration were run under different ``objective.weights`` (e.g. by two
    sweeps): they are one configuration, since the weights change no number but ``final.objective``, whose
    mean is then left empty. Returns the labels of such configurations."""
    if df.empty or "objective_weights" not in df:
        return []
    finals = df[df["kind"] == "final"] if "kind" in df else df
    mixed = []
    for _, rows in finals.groupby(GROUP, sort=False, dropna=False):
        weights = rows["objective_weights"].dropna().value_counts()
        if len(weights) > 1:
            mixed.append(rows["label"].iloc[0])
            log.warning(
                "the runs of %s weigh final.objective differently (%s): they are seeds of one configuration "
                "(the weights change no other number), and its objective is not averaged",
                mixed[-1],
                "; ".join(f"{n} run{'s' * (n != 1)} with {w}" for w, n in weights.items()),
            )
    return mixed


# What must agree between two records of one training (losses first: they move in the 7th digit).
SAME_TRAINING = ("val_loss", "loss", "val_accuracy", "accuracy")


def warn_diverging_references(df: pd.DataFrame) -> list[dict]:
    """Teacher and dense-student records of one configuration and seed are the same training,
    shared through the stage cache, so their numbers agree to the last digit -- unless the runs
    computed on different processors, code or library versions (the cache never shares a state
    between those). Then the runs of that seed did not start from the same model and paired
    differences between them mix the method with the machine. Warn, naming the runs of each
    version; return one entry per reference that differs."""
    if df.empty or "kind" not in df:
        return []
    refs = df[df["kind"].isin(("teacher", "dense"))]
    cols = [c for c in SAME_TRAINING if c in refs]
    found = []
    if refs.empty or not cols:
        return found
    for (kind, _, seed), g in refs.groupby(["kind", "config_key", "seed"], sort=True, dropna=False):
        versions = g.groupby(cols, dropna=False, sort=False)["run"].agg(list)
        if len(versions) < 2:
            continue
        entry = {
            "kind": kind,
            "label": g["label"].iloc[0],
            "seed": json_safe(seed),
            "versions": [
                {
                    **dict(zip(cols, map(json_safe, vals if isinstance(vals, tuple) else (vals,)))),
                    "runs": runs,
                }
                for vals, runs in versions.items()
            ],
        }
        found.append(entry)
        log.warning(
            "the %s of seed %s is not one training: %s -- the runs computed on different machines, "
            "code or library versions, so they did not start from the same model",
            entry["label"],
            entry["seed"],
            " against ".join(
                f"{cols[0]} {v[cols[0]]!r} in {len(v['runs'])} run(s) ({', '.join(v['runs'][:2])}"
                f"{', ...' if len(v['runs']) > 2 else ''})"
                for v in entry["versions"]
            ),
        )
    return found


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
    return relabel(df[keep].reset_index(drop=True))


def _seeds_of(df: pd.DataFrame, rows: pd.Series | None = None) -> pd.Series:
    """Per row: the distinct seeds of its configuration (among ``rows`` only, e.g. those that measured a metric)."""
    seed = df["seed"] if rows is None else df["seed"].where(rows)
    keys = [df[c] for c in GROUP]
    return seed.groupby(keys, sort=False, dropna=False).transform(lambda s: s.dropna().nunique())


def _seed_list(s: pd.Series) -> str:
    return ",".join(str(int(v)) for v in sorted(s.dropna().unique())) or "none"


def check_objective_seeds(df: pd.DataFrame, objectives: list[Objective], min_seeds: int = 1) -> pd.DataFrame:
    """The runs of configurations whose every objective was measured on at least ``min_seeds`` seeds.

    :func:`drop_few_seeds` counts a configuration's runs; a metric missing on some of them (an ONNX export
    that failed on one seed, a run made before the metric was recorded) makes the configuration's mean of
    that objective one over fewer seeds, beside means over all of them. ``--min-seeds`` applies to that
    count too; a configuration that never measured an objective stays (it cannot be on the front, and the
    report says so). The configurations left whose objective still covers fewer seeds than their runs are
    named in a warning: their means and spreads are over those seeds only (``<objective>_n`` in the tables).
    ``df`` has the objective columns (:func:`add_objectives`)."""
    if df.empty:
        return df
    df = df.reset_index(drop=True)
    have = _seeds_of(df)
    covered = {o.name: _seeds_of(df, df[o.name].notna()) for o in objectives if o.name in df}
    few = pd.Series(False, index=df.index)
    if min_seeds > 1 and covered:
        few = pd.concat([(c > 0) & (c < min_seeds) for c in covered.values()], axis=1).any(axis=1)
        if few.all():
            most = pd.concat(covered.values(), axis=1).min(axis=1).max()
            raise ConfigError(
                "--min-seeds",
                min_seeds,
                f"no configuration has its objectives measured on that many seeds (the most is {int(most)})",
            )
        dropped = df[few & (df["kind"] == "final")]
        if not dropped.empty:
            names = [
                f"{rows['label'].iloc[0]} ("
                + ", ".join(
                    f"{name} on seeds {_seed_list(rows['seed'].where(rows[name].notna()))}"
                    for name in covered
                    if 0 < covered[name][rows.index[0]] < min_seeds
                )
                + ")"
                for _, rows in dropped.groupby(GROUP, sort=False, dropna=False)
            ]
            log.info(
                "--min-seeds %d leaves out %d configuration(s) whose objectives were measured on fewer seeds: %s",
                min_seeds,
                len(names),
                "; ".join(names),
            )
        df, have = df[~few], have[~few]
        covered = {k: c[~few] for k, c in covered.items()}
    for name, c in covered.items():
        short = df[(c > 0) & (c < have)]
        if short.empty:
            continue
        log.warning(
            "%s was measured on fewer seeds than %d configuration(s) ran: %s; their %s means and spreads are over "
            "those seeds only (%s_n in the tables)",
            name,
            short.groupby(GROUP, sort=False, dropna=False).ngroups,
            "; ".join(
                f"{rows['label'].iloc[0]} (seeds {_seed_list(rows['seed'].where(rows[name].notna()))} "
                f"of {_seed_list(rows['seed'])})"
                for _, rows in short.groupby(GROUP, sort=False, dropna=False)
            ),
            name,
            name,
        )
    return relabel(df.reset_index(drop=True)) if few.any() else df


def merge_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: ``<metric>`` means, ``<metric>_std``, ``n_seeds``, ``seeds``, ``runs``;
    ``<metric>_n`` for a metric some configuration measured on fewer of its seeds than it ran (the mean
    and std are over those only, e.g. an ONNX export that failed on one seed): its seeds that have it."""
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
    # Only where some mean covers fewer seeds than its configuration has, so the tables stay as they were
    # wherever every seed measured everything; a metric a configuration never measured is NaN, not short.
    counts = grouped[metrics].count()
    short = [m for m in metrics if ((counts[m] > 0) & (counts[m] < out["n_seeds"])).any()]
    if short:
        out = out.join(counts[short].add_suffix("_n"))
    if "objective" in metrics and "objective_weights" in df:
        # final.objective under other weights is another quantity: no mean across them (warn_mixed_objective)
        mixed = df.groupby(GROUP, sort=False, dropna=False)["objective_weights"].nunique() > 1
        out.loc[mixed.reindex(out.index, fill_value=False), ["objective", "objective_std"]] = float("nan")
    info_cols = [
        c for c in df.columns if c not in metrics and c not in (*GROUP, "run", "run_path", "run_name", "seed")
    ]
    raw = df.groupby(GROUP, sort=False, dropna=False)
    info = raw[info_cols].first()
    # every machine, split and objective weighting a configuration's seeds ran under
    for col in ("hardware", "data", "data_content", "hub_commits", "code", "versions", "objective_weights"):
        if col in info:
            info[col] = raw[col].agg(lambda s: " | ".join(dict.fromkeys(s.dropna())))
    info["n_runs"] = raw.size()
    # Runs without a seed are merged as one group of their own (counted in n_seeds): listed as "none".
    info["seeds"] = raw["seed"].agg(
        lambda s: ",".join(
            [str(int(v)) for v in sorted(s.dropna().unique())] + (["none"] if s.isna().any() else [])
        )
    )
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
