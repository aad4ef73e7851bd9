"""Baseline vs candidate across seeds: the seed study's claim (e.g. ``dpq`` at 20 % sparsity
costs 1.6 points of accuracy for 20 % fewer GFLOPs than quant-only ``dq``), on any task.

When the two share seeds, the comparison is *paired*: per-seed differences (accuracy) and
ratios (costs), then their mean, standard deviation and 95% t interval across seeds
(:mod:`dpq.pareto.stats`). Otherwise it is *unpaired*: difference / ratio of the means, the
spread propagated from each side's standard deviation (sqrt(s_a^2 + s_b^2) for a difference,
with Welch's 95% interval; relative errors in quadrature for a ratio, without an interval).
"""

from __future__ import annotations

import json
import math

import pandas as pd

from dpq.core.errors import ConfigError
from dpq.metrics import METRICS

from .front import CONTEXT
from .gather import json_safe
from .paired import SPLIT_OF, Predictions
from .stats import difference_interval, mean_interval

SPLIT_NAME = {"test": "test", "val": "validation"}  # for the printed per-example lines

# Differences: accuracy and every other task metric the runs measured (test and validation).
DELTAS = ("accuracy", "val_accuracy", *(f"{p}{m}" for m in METRICS if m != "accuracy" for p in ("", "val_")))
RATIOS = (
    "effective_gflops",
    "dense_gflops",
    "bops",
    "latency_ms_median",
    "size_bytes",
    "peak_memory_bytes",
    "params_nonzero",
    "onnx_latency_ms_median",
    "onnx_size_bytes",
)
SELECTOR_HELP = "a pipeline name, optionally with column=value filters: 'dpq,final_sparsity=0.2,bits=4'"


def _flat(cfg_json: str) -> dict:
    from .report import _flatten

    return _flatten(json.loads(cfg_json)) if isinstance(cfg_json, str) else {}


def select(runs: pd.DataFrame, spec: str, key: str) -> pd.DataFrame:
    """Final points of pipeline ``NAME`` matching every ``column=value`` (or ``dotted.config.key=value``)."""
    parts = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not parts:
        raise ConfigError(key, spec, SELECTOR_HELP)
    name, *filters = parts
    finals = runs[runs["kind"] == "final"]
    known = sorted(dict.fromkeys(finals["pipeline"]))
    if name not in known:
        raise ConfigError(
            key, spec, f"no runs of pipeline {name!r}; pipelines found: {', '.join(known) or 'none'}"
        )
    sel = finals[finals["pipeline"] == name]
    for i, f in enumerate(filters):
        col, sep, want = f.partition("=")
        if not sep:
            raise ConfigError(key, spec, SELECTOR_HELP)
        if col in sel:
            have = sel[col]
        else:
            have = sel["config"].map(lambda c: _flat(c).get(col, _MISSING))  # noqa: B023 (applied at once)
            # a key set to null in every run is a key (filter it with =null); one in no run's config is not
            if have.map(lambda v: v is _MISSING).all():
                raise ConfigError(
                    key,
                    spec,
                    f"{col!r} is neither a column ({', '.join(map(str, sel.columns[:12]))}, ...) "
                    "nor a config key of these runs",
                )
            have = have.map(lambda v: None if v is _MISSING else v)
        match = sel[have.map(lambda v: _equal(v, want))]  # noqa: B023 (applied at once)
        if match.empty:
            values = sorted({str(v) for v in have.dropna()})
            raise ConfigError(
                key,
                spec,
                f"no run matches {f!r}; the {name} runs{' that match the filters before it' if i else ''} "
                f"have {col}: {', '.join(values[:20]) or 'no value'}{' ...' if len(values) > 20 else ''}",
            )
        sel = match
    return sel


_MISSING = object()


def _equal(v, want: str) -> bool:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return want.lower() in ("none", "null", "nan", "")
    if isinstance(v, bool):  # as typed in Hydra and YAML: true/false
        return want.lower() in (("true", "1") if v else ("false", "0"))
    try:
        return float(v) == float(want)
    except (TypeError, ValueError):
        return str(v) == want


def _per_seed(sel: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    cols = [c for c in cols if c in sel]
    return sel.assign(seed=sel["seed"].fillna(-1)).groupby("seed")[cols].mean()


def _stat(values: list[float]) -> dict:
    """Mean, std and the 95% t interval of the mean (``ci_low``/``ci_high``, None for one value)."""
    return {k: json_safe(v) if isinstance(v, float) else v for k, v in mean_interval(values).items()}


def compare_pair(base: pd.DataFrame, cand: pd.DataFrame) -> dict:
    """Deltas and ratios of one candidate configuration against one baseline configuration."""
    cols = [*DELTAS, *RATIOS]
    b, c = _per_seed(base, cols), _per_seed(cand, cols)
    common = sorted((set(b.index) & set(c.index)) - {-1})  # runs without a seed pair with nothing
    out: dict = {
        "pairing": "paired by seed" if common else "unpaired (no common seeds)",
        "seeds": [int(s) for s in common] if common else None,
        "deltas": {},
        "ratios": {},
    }
    for m in cols:
        if m not in b or m not in c:
            continue
        if common:
            diff = (
                (c.loc[common, m] - b.loc[common, m])
                if m in DELTAS
                else (c.loc[common, m] / b.loc[common, m])
            ).dropna()
            stat = _stat(list(diff))
            # A seed on which either side lacks the metric is no pair: said where that leaves out some seeds
            # (none left: n is 0 and the mean None, as for a metric neither side measured).
            if 0 < len(diff) < len(common):
                stat["seeds"] = [int(s) for s in diff.index]
        else:
            mb, mc = b[m].mean(), c[m].mean()
            # a seed without the metric is no value: the spread and n are over the seeds that have it
            sb = b[m].std(ddof=1) if b[m].count() > 1 else 0.0
            sc = c[m].std(ddof=1) if c[m].count() > 1 else 0.0
            if m in DELTAS:
                stat = _json(difference_interval(list(b[m].dropna()), list(c[m].dropna())))
            else:
                r = mc / mb
                stat = {
                    "mean": json_safe(r),
                    "std": json_safe(abs(r) * math.hypot(sb / mb, sc / mc)),
                    "n": int(min(b[m].count(), c[m].count())),
                    "ci_low": None,
                    "ci_high": None,
                }
        (out["deltas"] if m in DELTAS else out["ratios"])[m] = stat
    if common:  # with per-example predictions: the same difference, its spread over the split's examples
        pairs = Predictions()
        examples = {}
        for m in SPLIT_OF:
            got = pairs.seed_averaged(base, cand, m) if m in b and m in c else None
            if got is not None:
                examples[m] = {k: json_safe(v) if isinstance(v, float) else v for k, v in got.items()}
        if examples:
            out["examples"] = examples
    return out


def _side(sel: pd.DataFrame) -> dict:
    r = sel.iloc[0]
    per_seed = _per_seed(sel, ["accuracy"])["accuracy"]
    acc = _stat(list(per_seed))
    if 0 < per_seed.count() < len(per_seed):  # over the seeds that measured it, not every seed listed
        acc["seeds"] = [int(s) for s in per_seed.dropna().index if s != -1]
    return {
        "label": r["label"],
        "pipeline": r["pipeline"],
        "order": r["order"],
        "config_key": r["config_key"],
        "final_sparsity": json_safe(r.get("final_sparsity")),
        "bits": json_safe(r.get("bits")),
        "seeds": sorted(int(s) for s in sel["seed"].dropna().unique()),
        "runs": list(sel["run"]),
        "accuracy": acc,
        **{m: json_safe(sel[m].mean()) for m in RATIOS if m in sel},
    }


def compare(runs: pd.DataFrame, baseline: str, candidate: str) -> list[dict]:
    """Every candidate configuration against the baseline configuration of the same task/model/teacher."""
    base_all = select(runs, baseline, "--baseline")
    cand_all = select(runs, candidate, "--candidate")
    results = []
    ctx_cols = [c for c in CONTEXT if c in runs]
    for ctx, cand_ctx in cand_all.groupby(ctx_cols, sort=False, dropna=False):
        ctx = ctx if isinstance(ctx, tuple) else (ctx,)
        mask = pd.Series(True, index=base_all.index)
        for col, v in zip(ctx_cols, ctx):
            mask &= base_all[col].eq(v) | (base_all[col].isna() & pd.isna(v))
        base = base_all[mask]
        if base.empty:
            continue
        configs = list(dict.fromkeys(base["config_key"]))
        if len(configs) > 1:
            labels = ", ".join(dict.fromkeys(base["label"]))
            raise ConfigError(
                "--baseline",
                baseline,
                f"matches {len(configs)} configurations ({labels}) for "
                f"{dict(zip(ctx_cols, ctx))}; narrow it with filters, {SELECTOR_HELP}",
            )
        for _, cand in cand_ctx.groupby("config_key", sort=False):
            results.append(
                {
                    "context": {k: json_safe(v) for k, v in zip(ctx_cols, ctx)},
                    "baseline": _side(base),
                    "candidate": _side(cand),
                    **compare_pair(base, cand),
                }
            )
    if not results:
        raise ConfigError(
            "--baseline", baseline, f"no baseline run shares a task/model/teacher with {candidate!r}"
        )
    return results


def _json(stat: dict) -> dict:
    return {k: json_safe(v) if isinstance(v, float) else v for k, v in stat.items()}


def fmt(stat: dict | None, digits: int = 4, signed: bool = False, interval: bool = False) -> str:
    """``mean ± std``, with ``interval`` also ``[low, high]`` (the 95% interval of the mean)."""
    if not stat or stat.get("mean") is None:
        return "–"
    m = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    m += f" ± {stat['std']:.{digits}f}" if stat.get("std") else ""
    if interval and stat.get("ci_low") is not None:
        sign = "+" if signed else ""
        m += f" [{stat['ci_low']:{sign}.{digits}f}, {stat['ci_high']:{sign}.{digits}f}]"
    return m


def print_comparison(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="candidate vs baseline (mean ± std across seeds [95% interval of the mean]; "
        "ratios are candidate / baseline)"
    )
    for h in (
        "task",
        "baseline",
        "candidate",
        "pairing",
        "Δ accuracy [95%]",
        "Δ val accuracy [95%]",
        "eff. GFLOPs ×",
        "BOPs ×",
        "latency ×",
        "size ×",
        "peak mem ×",
    ):
        table.add_column(h, justify="left" if h in ("task", "baseline", "candidate", "pairing") else "right")
    for r in results:
        ratios = r["ratios"]
        table.add_row(
            str(r["context"].get("task")),
            r["baseline"]["label"],
            r["candidate"]["label"],
            f"{r['pairing'].split(' (')[0]}, n={r['deltas'].get('accuracy', {}).get('n', 0)}",
            fmt(r["deltas"].get("accuracy"), signed=True, interval=True),
            fmt(r["deltas"].get("val_accuracy"), signed=True, interval=True),
            fmt(ratios.get("effective_gflops"), 3),
            fmt(ratios.get("bops"), 3),
            fmt(ratios.get("latency_ms_median"), 3),
            fmt(ratios.get("size_bytes"), 3),
            fmt(ratios.get("peak_memory_bytes"), 3),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    console.print(table)
    if any(r["ratios"].get("latency_ms_median") is not None for r in results):
        console.print(
            "latency ×: each run timed in its own process (machine state differs between them); "
            "for a speed claim, time the models side by side in one process: bench/latency.py"
        )
    for r in results:  # the spread a new test sample would give (runs with predictions.npz)
        for m, e in (r.get("examples") or {}).items():
            if "missing" in e:
                console.print(f"{r['candidate']['label']}, {m} per example: not paired ({e['missing']})")
                continue
            console.print(
                f"{r['candidate']['label']} - {r['baseline']['label']}, {m} over {e['n_examples']} examples "
                f"x {e['n_seeds']} seeds: {e['mean']:+.4f} [{e['ci_low']:+.4f}, {e['ci_high']:+.4f}] "
                f"(95%, over {SPLIT_NAME.get(e.get('split'), e.get('split'))} samples with the trained models fixed)"
            )
