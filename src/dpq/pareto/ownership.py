"""Which stage ordering owns which stretch of the front, per cost objective (issue 21).

The study's question is not only "which points are on the front" but "which ordering (``dq``,
``dpq``, ``spiral``, ``pd``, ``dpq_qat``, ...) owns it, and where". For each cost objective:

* **segments** -- the final points (seeds merged) that no other final point beats on (primary
  metric, that cost) are walked from the cheapest to the dearest; consecutive front points of one
  ordering form a segment, which that ordering owns;
* **against the baseline** -- every front point's primary metric minus the baseline ordering's
  (``dq``), paired by seed, with its 95% t interval (the baseline configuration of the same
  task/model/teacher; with several, the one at the point's bit width, then the one that shares
  the point's settings where the baselines differ, e.g. their quantizer; the table names it);
* **per seed** -- (first cost only) is every point of the dominated orderings (``dq``, ``dp``)
  beaten, on that seed, by a point of another ordering? Issue 21 asks this on every seed (``dp`` points of a
  study without dp runs: ``--prefix-points dp``, :func:`dpq.pareto.gather.prefix_orderings`). Each
  check names the best point of another ordering at no higher cost, its margin and, when both runs
  left per-example predictions, the two compared on the same examples (:mod:`dpq.pareto.paired`).

Reference points (teacher, dense student records) are left out: the question is about orderings.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .aggregate import add_objectives, merge_seeds
from .compare import _per_seed
from .front import CONTEXT, pareto_mask
from .gather import _show, flat_config, json_safe, shown_settings
from .objectives import OBJECTIVES, Objective
from .paired import Predictions
from .stats import mean_interval

# The costs a front is owned along, when the runs measured them (deployment figures last).
COSTS = ("effective_gflops", "gbops", "latency_ms", "size_mb", "onnx_latency_ms", "onnx_size_mb")
DOMINATED = ("dq", "dp")
# Orderings that compress less than dq and dp do, never counted as beating them: the question (issue 21) is
# whether the orderings that prune and quantize own the front, and a float dense student beats dq on
# accuracy at the same effective GFLOPs (effective GFLOPs do not see bits).
NOT_COMPETING = ("dense", "dq_ptq")


def _finals(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["kind"] == "final"]


# With several baseline configurations, the one that shares these settings with the point.
MATCH_ON = ("bits", "final_sparsity", "granularity", "act_bits")


def _same_settings(
    finals: pd.DataFrame, base: pd.DataFrame, point: pd.Series
) -> tuple[pd.DataFrame, list[str]]:
    """Narrow several baseline configurations to the one that agrees with ``point`` wherever they
    differ from each other and the point has the setting (e.g. ``pipeline.stages.quantize.observer``:
    a point trained with LSQ steps is paired with the ``dq`` that has them too). Returns the rows kept
    and the settings that told the baselines apart."""
    keys = list(dict.fromkeys(base["config_key"]))
    theirs, differ = shown_settings({k: flat_config(base, k) for k in keys})
    mine = flat_config(finals, point["config_key"]) if "config_key" in point else {}
    shared = [n for n in differ if n in mine]
    keep = [k for k in keys if shared and all(theirs[k][n] == _show(mine[n]) for n in shared)]
    return (base[base["config_key"].isin(keep)] if keep else base), differ


def _baseline_rows(
    finals: pd.DataFrame, baseline: str, point: pd.Series
) -> tuple[pd.DataFrame | None, str | None]:
    """The runs of the one baseline configuration to pair ``point`` with: narrowed by
    :data:`MATCH_ON`, then by the settings where the baseline configurations differ."""
    base = finals[finals["pipeline"] == baseline]
    if base.empty:
        return None, f"no {baseline} runs"
    for col in MATCH_ON:
        if base["config_key"].nunique() == 1:
            break
        if col in base and col in point:
            v = point[col]
            same = base[base[col].isna()] if pd.isna(v) else base[base[col].eq(v)]
            if not same.empty:
                base = same
    differ: list[str] = []
    if base["config_key"].nunique() > 1 and "config" in finals:
        base, differ = _same_settings(finals, base, point)
    n = base["config_key"].nunique()
    if n != 1:
        apart = ", ".join(d.removeprefix("pipeline.stages.") for d in differ[:4]) or "nothing recorded"
        return (
            None,
            f"{n} {baseline} configurations fit this point (they differ in {apart}, "
            "and the point does not pick one)",
        )
    return base, None


def paired_delta(base: pd.DataFrame, cand: pd.DataFrame, metric: str) -> dict:
    """Candidate minus baseline ``metric``, paired by seed: mean, std, n, 95% interval (``None``s without pairs)."""
    b, c = _per_seed(base, [metric]), _per_seed(cand, [metric])
    if metric not in b or metric not in c:
        return {"mean": None, "std": None, "n": 0, "ci_low": None, "ci_high": None, "seeds": []}
    common = sorted(set(b.index) & set(c.index) - {-1})
    # a seed on which either side lacks the metric is no pair: ``seeds`` lists the ones the interval is over
    pairs = {s: float(c.loc[s, metric] - b.loc[s, metric]) for s in common}
    pairs = {s: d for s, d in pairs.items() if not math.isnan(d)}
    if not pairs:
        return {"mean": None, "std": None, "n": 0, "ci_low": None, "ci_high": None, "seeds": []}
    stat = {
        k: json_safe(v) if isinstance(v, float) else v for k, v in mean_interval(list(pairs.values())).items()
    }
    return {**stat, "seeds": [int(s) for s in pairs]}


def _segments(front: pd.DataFrame, cost: Objective, primary: Objective) -> list[dict]:
    segs: list[dict] = []
    for _, r in front.iterrows():
        if segs and segs[-1]["ordering"] == r["pipeline"]:
            seg = segs[-1]
        else:
            seg = {
                "ordering": r["pipeline"],
                "order": r["order"],
                "points": [],
                cost.name: [],
                primary.name: [],
            }
            segs.append(seg)
        seg["points"].append(r["label"])
        seg[cost.name].append(json_safe(float(r[cost.name])))
        seg[primary.name].append(json_safe(float(r[primary.name])))
    for seg in segs:
        seg["from"], seg["to"] = seg[cost.name][0], seg[cost.name][-1]
    return segs


def _closest(others: pd.DataFrame, t: pd.Series, primary: Objective, cost: Objective) -> pd.Series | None:
    """The point of ``others`` with the best primary metric among those no costlier than ``t``."""
    cheap = (
        others[others[cost.name] <= t[cost.name]]
        if cost.sense == "min"
        else others[others[cost.name] >= t[cost.name]]
    )
    if cheap.empty:
        return None
    best = cheap[primary.name].idxmax() if primary.sense == "max" else cheap[primary.name].idxmin()
    return cheap.loc[best]


def _closest_entry(
    o: pd.Series, t: pd.Series, primary: Objective, cost: Objective, pairs: Predictions
) -> dict:
    """``o`` and its margin over ``t`` (positive = better): how far a point that is not dominated is
    from being so; with both runs' predictions, also ``paired``: the two on the same examples."""
    margin = float(o[primary.name] - t[primary.name]) * (1 if primary.sense == "max" else -1)
    entry = {
        "point": o["label"],
        primary.name: json_safe(float(o[primary.name])),
        cost.name: json_safe(float(o[cost.name])),
        "margin": json_safe(margin),
    }
    paired = pairs.pair(t, o, primary.metric)
    if paired is not None:
        entry["paired"] = {k: json_safe(v) for k, v in paired.items()}
    return entry


def seedwise_domination(
    finals: pd.DataFrame, primary: Objective, cost: Objective, dominated: tuple[str, ...] = DOMINATED
) -> dict:
    """Per seed: each point of the ``dominated`` orderings, a point of another ordering that beats it,
    and the best point of another ordering at no higher cost (``closest``, with its margin); the
    other orderings are those that prune (not ``dense`` or ``dq_ptq``: :data:`NOT_COMPETING`)."""
    out = []
    pairs = Predictions()
    for seed, runs in finals.dropna(subset=["seed"]).groupby("seed"):
        ok = runs.dropna(subset=[primary.name, cost.name])
        if ok.empty:
            continue
        # One check per point: runs that restored the same prefix from the stage cache repeat its point
        # exactly (e.g. the dp point of a dpq run with min-max and one with LSQ steps).
        targets = ok[ok["pipeline"].isin(dominated)].drop_duplicates(["config_key", primary.name, cost.name])
        others = ok[~ok["pipeline"].isin((*dominated, *NOT_COMPETING))]
        for _, t in targets.iterrows():
            by = None
            for _, o in others.iterrows():
                pts = np.array(
                    [[o[primary.name], o[cost.name]], [t[primary.name], t[cost.name]]], dtype=float
                )
                mask = pareto_mask(pts, [primary.sense, cost.sense])
                if mask[0] and not mask[1]:
                    by = o["label"]
                    break
            out.append(
                {
                    "seed": int(seed),
                    "point": t["label"],
                    "ordering": t["pipeline"],
                    primary.name: json_safe(float(t[primary.name])),
                    cost.name: json_safe(float(t[cost.name])),
                    "dominated_by": by,
                    "closest": None
                    if (o := _closest(others, t, primary, cost)) is None
                    else _closest_entry(o, t, primary, cost, pairs),
                }
            )
    return {
        "objectives": [primary.name, cost.name],
        "orderings": list(dominated),
        # named by the question but without a point here: the answer does not cover them
        "absent": [o for o in dominated if not (finals["pipeline"] == o).any()],
        "checks": out,
        "all_dominated": bool(out) and all(c["dominated_by"] is not None for c in out),
    }


def front_ownership(
    runs: pd.DataFrame,
    primary: Objective,
    costs: list[Objective] | None = None,
    baseline: str | None = "dq",
    dominated: tuple[str, ...] = DOMINATED,
) -> dict:
    """Per task/model/teacher and cost objective: the front's segments, who owns them, and each front
    point's paired difference from ``baseline``; plus the per-seed domination check (first cost)."""
    finals = _finals(runs)
    if costs is None:
        costs = [OBJECTIVES[c] for c in COSTS]
    finals = add_objectives(finals, [primary, *costs])
    contexts = []
    ctx_cols = [c for c in CONTEXT if c in finals]
    groups = finals.groupby(ctx_cols, sort=False, dropna=False) if ctx_cols else [((), finals)]
    for ctx, sub in groups:
        ctx = ctx if isinstance(ctx, tuple) else (ctx,)
        points = merge_seeds(sub)
        several_baselines = sub.loc[sub["pipeline"] == baseline, "config_key"].nunique() > 1
        fronts = []
        measured = [c for c in costs if c.name in sub and sub[c.name].notna().any()]
        for cost in measured:
            pts = points.dropna(subset=[primary.name, cost.name])
            if pts.empty:
                continue
            mask = pareto_mask(
                pts[[primary.name, cost.name]].to_numpy(dtype=float), [primary.sense, cost.sense]
            )
            front = pts[mask].sort_values([cost.name, primary.name], ascending=[cost.sense == "min", False])
            entries = []
            for _, r in front.iterrows():
                entry = {
                    "point": r["label"],
                    "ordering": r["pipeline"],
                    "seeds": r["seeds"],
                    cost.name: json_safe(float(r[cost.name])),
                    primary.name: json_safe(float(r[primary.name])),
                }
                for o in (cost, primary):  # a mean over fewer seeds than the point's (merge_seeds)
                    if f"{o.name}_n" in r and pd.notna(r[f"{o.name}_n"]) and r[f"{o.name}_n"] < r["n_seeds"]:
                        entry[f"{o.name}_n"] = int(r[f"{o.name}_n"])
                if baseline:
                    base, why = _baseline_rows(sub, baseline, r)
                    cand = sub[sub["config_key"] == r["config_key"]]
                    entry["vs_baseline"] = (
                        {"baseline": baseline, **paired_delta(base, cand, primary.metric)}
                        if base is not None
                        else {"baseline": baseline, "missing": why}
                    )
                    if base is not None and several_baselines:  # say which one it was paired with
                        entry["vs_baseline"]["baseline_point"] = str(base["label"].iloc[0])
                entries.append(entry)
            segs = _segments(front, cost, primary)
            fronts.append(
                {
                    "cost": cost.name,
                    "unit": cost.unit,
                    "owners": list(dict.fromkeys(s["ordering"] for s in segs)),
                    "segments": segs,
                    "front": entries,
                }
            )
        contexts.append(
            {
                "context": {k: json_safe(v) for k, v in zip(ctx_cols, ctx)},
                "primary": primary.name,
                "fronts": fronts,
                "domination": seedwise_domination(sub, primary, measured[0], dominated) if measured else None,
            }
        )
    return {"baseline": baseline, "contexts": contexts}


def _fmt_delta(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return (d or {}).get("missing", "no paired seeds")
    vs = f" vs {d['baseline_point']}" if d.get("baseline_point") else ""
    if d.get("ci_low") is None:
        return f"{d['mean']:+.4f} (n={d['n']}){vs}"
    return f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] (n={d['n']}){vs}"


def _fmt_value(entry: dict, name: str, spec: str) -> str:
    """A front point's mean, with the seeds it covers where fewer than the point's (``<name>_n``)."""
    n = entry.get(f"{name}_n")
    return format(entry[name], spec) + (f" ({n} of its seeds)" if n is not None else "")


def _fmt_num(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _fmt_closest(check: dict, primary: str) -> str:
    c = check.get("closest")
    if not c:
        return "none"
    return f"{c['point']}: {c[primary]:.4f} ({c['margin']:+.4f})"


def _paired(check: dict) -> dict | None:
    return (check.get("closest") or {}).get("paired")


def _fmt_paired(check: dict) -> str:
    p = _paired(check)
    if not p:
        return ""
    if "missing" in p:
        return p["missing"]
    return (
        f"{p['only_second']} / {p['only_first']} of {p['n']}: {p['diff']:+.4f} "
        f"[{p['ci_low']:+.4f}, {p['ci_high']:+.4f}], p={p['p_mcnemar']:.2g}"
    )


def _paired_header(dom: dict) -> str | None:
    """The per-example column's header, when some check has one (runs with predictions.npz)."""
    splits = {_paired(c).get("split") for c in dom["checks"] if _paired(c)} - {None}
    if not any(_paired(c) for c in dom["checks"]):
        return None
    where = "/".join(sorted(splits)) or "same"
    return (
        f"that point against this one on the same {where} examples: right only there / only here, "
        "paired Δ [95%], McNemar p"
    )


def markdown(own: dict) -> str:
    """The ownership as Markdown: per context and cost, the segments and each front point against the baseline."""
    lines = ["# Who owns the front", ""]
    base = own.get("baseline")
    for ctx in own["contexts"]:
        lines += [f"## {', '.join(f'{k}={v}' for k, v in ctx['context'].items())}", ""]
        p = ctx["primary"]
        for f in ctx["fronts"]:
            lines += [f"### {p} vs {f['cost']} [{f['unit']}]: owned by {', '.join(f['owners'])}", ""]
            lines += [
                f"| {f['cost']} | ordering | point | {p} | Δ {p} vs {base}, paired [95%] |",
                "|---|---|---|---|---|",
            ]
            for e in f["front"]:
                lines.append(
                    f"| {_fmt_value(e, f['cost'], '.4g')} | {e['ordering']} | {e['point']} | "
                    f"{_fmt_value(e, p, '.4f')} | {_fmt_delta(e.get('vs_baseline'))} |"
                )
            lines.append("")
        dom = ctx.get("domination")
        if dom and dom["checks"]:
            dp, dc = dom["objectives"]
            note = absent_note(dom)
            lines += [
                f"### Per seed: is every {checked(dom)} point dominated on "
                f"({', '.join(dom['objectives'])})? {'yes' if dom['all_dominated'] else 'no'}",
                "",
                *([note, ""] if note else []),
                f"| seed | point | {dp} | {dc} | dominated by "
                f"| best point of another ordering at no higher {dc}: {dp} (margin) |",
                "|---|---|---|---|---|---|",
            ]
            extra = _paired_header(dom)
            if extra:
                lines[-2] += f" {extra} |"
                lines[-1] += "---|"
            lines += [
                f"| {c['seed']} | {c['point']} | {_fmt_num(c.get(dp), '.4f')} | {_fmt_num(c.get(dc), '.4g')} | "
                f"{c['dominated_by'] or '**not dominated**'} | {_fmt_closest(c, dp)} |"
                + (f" {_fmt_paired(c)} |" if extra else "")
                for c in dom["checks"]
            ]
            lines.append("")
    return "\n".join(lines)


def checked(dom: dict) -> str:
    """The orderings the per-seed check covered, e.g. ``dq/dp``."""
    return "/".join(o for o in dom["orderings"] if o not in dom.get("absent", ()))


def absent_note(dom: dict) -> str | None:
    """What the check could not cover, and how a study without such runs gets their points."""
    absent = dom.get("absent") or []
    if not absent:
        return None
    hint = (
        " (`--prefix-points dp` reads the dp points off the dpq runs' recoveries)" if "dp" in absent else ""
    )
    return f"No {'/'.join(absent)} points among these runs: the check covers {checked(dom)} only{hint}."


def html_section(own: dict) -> str:
    """The ownership tables for the HTML report."""
    import html

    esc = html.escape
    out = ['<h2 id="ownership">Who owns the front</h2>']
    base = own.get("baseline")
    for ctx in own["contexts"]:
        p = ctx["primary"]
        out.append(f"<h3>{esc(', '.join(f'{k}={v}' for k, v in ctx['context'].items()))}</h3>")
        for f in ctx["fronts"]:
            out.append(
                f"<h4>{esc(p)} vs {esc(f['cost'])} [{esc(f['unit'])}]: owned by {esc(', '.join(f['owners']))}</h4>"
            )
            rows = "".join(
                f"<tr><td>{esc(_fmt_value(e, f['cost'], '.4g'))}</td><td>{esc(e['ordering'])}</td>"
                f"<td>{esc(e['point'])}</td><td>{esc(_fmt_value(e, p, '.4f'))}</td>"
                f"<td>{esc(_fmt_delta(e.get('vs_baseline')))}</td></tr>"
                for e in f["front"]
            )
            out.append(
                f"<table><thead><tr><th>{esc(f['cost'])}</th><th>ordering</th><th>point</th><th>{esc(p)}</th>"
                f"<th>&Delta; {esc(p)} vs {esc(str(base))}, paired [95%]</th></tr></thead><tbody>{rows}</tbody></table>"
            )
        dom = ctx.get("domination")
        if dom and dom["checks"]:
            verdict = "yes" if dom["all_dominated"] else "no"
            out.append(
                f"<h4>Per seed: is every {esc(checked(dom))} point dominated on "
                f"({esc(', '.join(dom['objectives']))})? {verdict}</h4>"
            )
            if note := absent_note(dom):
                out.append(f"<p>{esc(note)}</p>")
            dp, dc = dom["objectives"]
            extra = _paired_header(dom)
            rows = "".join(
                f"<tr><td>{c['seed']}</td><td>{esc(c['point'])}</td><td>{_fmt_num(c.get(dp), '.4f')}</td>"
                f"<td>{_fmt_num(c.get(dc), '.4g')}</td><td>{esc(c['dominated_by'] or 'not dominated')}</td>"
                f"<td>{esc(_fmt_closest(c, dp))}</td>"
                + (f"<td>{esc(_fmt_paired(c))}</td>" if extra else "")
                + "</tr>"
                for c in dom["checks"]
            )
            out.append(
                f"<table><thead><tr><th>seed</th><th>point</th><th>{esc(dp)}</th><th>{esc(dc)}</th>"
                "<th>dominated by</th>"
                f"<th>best point of another ordering at no higher {esc(dc)}: {esc(dp)} (margin)</th>"
                + (f"<th>{esc(extra)}</th>" if extra else "")
                + f"</tr></thead><tbody>{rows}</tbody></table>"
            )
    if b := own.get("built_by"):
        out.append(
            f"<h3>How this report was built</h3><p>In <code>{esc(b['cwd'])}</code> (relative to this "
            f"report's folder), with the runs it names there:</p><pre>{esc(b['command'])}</pre>"
        )
    return "\n".join(out)
