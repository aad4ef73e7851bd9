"""Recipes chosen on the validation split by the report itself (``--choose KEY --choose-on val_accuracy``).

A study trains variants of one recipe (a QAT observer, a criterion, a learning rate) and may
report on the test split only the variant a researcher would have picked without seeing it. Done by
hand, that rule is easy to bend: every variant lands in the report folder and the front, the
ownership and the per-seed domination check take the best of them on test. Here, among final-point
configurations that differ *only* in the named settings, the one with the best mean of a validation
objective over the seeds they share is kept and the others are left out of everything downstream;
the choice and every variant's score are recorded in the report.

Not a library feature elsewhere: W&B sweeps and Hydra sweepers pick a best run of a sweep, not one
variant per group of otherwise-equal configurations across seeds, in a report built from run folders.
"""

from __future__ import annotations

import json
import logging

import pandas as pd

from dpq.core.errors import ConfigError

from .aggregate import relabel
from .gather import flat_config, json_safe
from .objectives import OBJECTIVES, Objective

log = logging.getLogger("dpq.pareto")

VALIDATION_PREFIXES = ("val_", "onnx_val_")


def validation_objective(name: str) -> Objective:
    """The objective ``--choose-on`` names; only a validation one (choosing on test biases what is reported)."""
    allowed = [n for n, o in OBJECTIVES.items() if o.metric.startswith(VALIDATION_PREFIXES)]
    if name not in allowed:
        raise ConfigError(
            "--choose-on",
            name,
            "a validation objective, one of " + ", ".join(allowed) + " (a variant chosen on the test "
            "split makes the test numbers it reports optimistic)",
        )
    return OBJECTIVES[name]


def parse_keys(spec: str | None) -> list[str]:
    """``--choose quantize.observer,prune.criterion`` -> the setting names (suffixes of dotted config keys)."""
    if spec is None:
        return []
    keys = [k.strip() for k in str(spec).split(",") if k.strip()]
    if not keys:
        raise ConfigError("--choose", spec, "comma-separated settings, e.g. quantize.observer")
    return keys


def _matches(key: str, spec: str) -> bool:
    return key == spec or key.endswith("." + spec)


def choose(df: pd.DataFrame, keys: list[str], objective: Objective) -> tuple[pd.DataFrame, list[dict]]:
    """Keep, per group of final configurations equal except in ``keys``, the variant with the best
    mean ``objective`` over the seeds the variants share; drop the other variants' runs.

    Ties go to the variant whose runs come first in the inputs (list the incumbent first). Teacher
    and dense-student references are never dropped. Returns the runs left and one record per
    group with more than one variant."""
    if not keys or df.empty:
        return df, []
    finals = df[df["kind"] == "final"]
    settings = {ck: flat_config(finals, ck) for ck in dict.fromkeys(finals["config_key"])}
    every = set().union(*(s.keys() for s in settings.values())) if settings else set()
    for spec in keys:
        if not any(_matches(k, spec) for k in every):
            last = spec.rsplit(".", 1)[-1]
            near = sorted(k for k in every if last in k.rsplit(".", 1)[-1])[:5]
            raise ConfigError(
                "--choose",
                spec,
                "no run has a setting of that name"
                + (f"; settings of the runs with that ending: {', '.join(near)}" if near else "")
                + " (a dotted config key or its last parts, e.g. quantize.observer)",
            )
    if objective.metric not in df:
        raise ConfigError("--choose-on", objective.name, f"no run records {objective.metric!r}")
    groups: dict[str, list[str]] = {}
    chosen_by: dict[str, dict] = {}
    for ck in dict.fromkeys(finals["config_key"]):  # input order: ties go to the first
        rest = {k: v for k, v in settings[ck].items() if not any(_matches(k, s) for s in keys)}
        groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(ck)
        chosen_by[ck] = {k: v for k, v in settings[ck].items() if any(_matches(k, s) for s in keys)}
    records, drop, kept = [], set(), set()
    for variants in groups.values():
        if len(variants) < 2:
            continue
        rows = finals[finals["config_key"].isin(variants)]
        per_seed = rows.groupby(["config_key", "seed"])[objective.metric].mean()
        # a variant whose runs carry no seed has no rows here (groupby drops NaN keys): no shared seed
        seed_sets = [
            set(per_seed.loc[ck].dropna().index) if ck in per_seed.index.get_level_values(0) else set()
            for ck in variants
        ]
        shared = sorted(set.intersection(*seed_sets))
        labels = {ck: rows.loc[rows["config_key"] == ck, "label"].iloc[0] for ck in variants}
        if not shared:
            raise ConfigError(
                "--choose",
                ",".join(keys),
                f"the variants {' and '.join(map(repr, labels.values()))} share no seed with "
                f"{objective.metric}: a choice must compare them on the same seeds",
            )
        scores = {ck: float(per_seed.loc[ck].loc[shared].mean()) for ck in variants}
        best = (max if objective.sense == "max" else min)(variants, key=lambda ck: scores[ck])
        drop |= set(variants) - {best}
        kept.add(best)
        record = {
            "on": objective.name,
            "seeds": [json_safe(s) for s in shared],
            "kept": labels[best],
            "variants": [
                {
                    "label": labels[ck],
                    "settings": {k: json_safe(v) for k, v in chosen_by[ck].items()},
                    objective.name: scores[ck],
                    "kept": ck == best,
                }
                for ck in variants
            ],
        }
        records.append(record)
        log.info(
            "chose %s on %s (mean over seeds %s): %s",
            _settings_text(chosen_by[best]),
            objective.name,
            ",".join(map(str, record["seeds"])),
            "; ".join(f"{_settings_text(chosen_by[ck])} {scores[ck]:.4f}" for ck in variants),
        )
    if not records:
        log.warning(
            "--choose %s: no final configurations differ only in those settings; nothing was chosen",
            ",".join(keys),
        )
        return df, records
    keep = ~((df["kind"] == "final") & df["config_key"].isin(drop))
    df = df[keep].reset_index(drop=True)
    # The kept variant says what was chosen in its label (its rivals, which told it apart, are gone).
    said = (
        df["config_key"].where(df["kind"] == "final").map({ck: _settings_text(chosen_by[ck]) for ck in kept})
    )
    if "base_label" in df:
        df["base_label"] = df["base_label"].where(
            said.isna(), df["base_label"] + " (" + said.fillna("") + ")"
        )
    return relabel(df), records


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k.removeprefix('pipeline.stages.')}={v}" for k, v in settings.items())


def markdown(records: list[dict]) -> str:
    """The choices as a Markdown section (put before the ownership tables)."""
    if not records:
        return ""
    on = records[0]["on"]
    lines = [
        f"# Variants chosen on {on}",
        "",
        "Per group of configurations equal but in the chosen settings, only the kept variant is in the "
        "front, the ownership and the domination check below.",
        "",
        f"| variant | settings | {on} (mean over shared seeds) | seeds | kept |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        for v in r["variants"]:
            lines.append(
                f"| {v['label']} | {_settings_text(v['settings'])} | {v[on]:.4f} | "
                f"{','.join(map(str, r['seeds']))} | {'**yes**' if v['kept'] else 'no'} |"
            )
    return "\n".join(lines + ["", ""])
