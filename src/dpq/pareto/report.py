"""A self-contained HTML report: interactive Pareto plot (hover shows each point's config) and tables.

The plot is plotly with plotly.js inlined (``include_plotlyjs=True``, ~5 MB): the page
opens offline, in any browser, from a file or a W&B Html panel, with zoom, pan, legend
toggles and hover for free. A hand-written SVG chart would be smaller but would re-implement
axes, log scales, error bars and tooltips; plotly is the maintained way to get them.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from dpq.metrics import METRICS

from .front import step_order
from .gather import CONDITION_KEYS, CONVENTION_KEYS, json_safe
from .objectives import Objective
from .plots import REFERENCE_LABEL, colours, front_lines, ordering, use_log

PLOT_ID = "pareto-plot"
# plotly's names for the dash patterns of plots.FRONT_DASHES, one per task/model/teacher front
FRONT_DASHES = ["dash", "dot", "dashdot", "longdashdot"]
REFERENCE_SYMBOL = {"teacher": ("star", 16, "black"), "dense": ("diamond", 11, "dimgray")}
# Shown in the tables next to the chosen objectives (when measured): accuracy, the other task metrics, costs.
TABLE_METRICS = [
    ("accuracy", "accuracy", 1.0, "{:.4f}"),
    *((m.replace("_", " "), m, 1.0, "{:.4f}") for m in METRICS if m != "accuracy"),
    ("effective GFLOPs", "effective_gflops", 1.0, "{:.4g}"),
    ("GBOPs", "bops", 1e-9, "{:.4g}"),
    ("size MB", "size_bytes", 1e-6, "{:.4g}"),
    ("peak mem MB", "peak_memory_bytes", 1e-6, "{:.4g}"),
    ("latency ms", "latency_ms_median", 1.0, "{:.3g}"),
    ("ORT latency ms", "onnx_latency_ms_median", 1.0, "{:.3g}"),
    ("ONNX MB", "onnx_size_bytes", 1e-6, "{:.4g}"),
    ("ORT agreement", "onnx_agreement", 1.0, "{:.4f}"),
    ("non-zero params", "params_nonzero", 1.0, "{:,.0f}"),
]


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


def config_differences(points: pd.DataFrame) -> list[dict]:
    """Per point, its values of the config entries that differ between the runs (what a hover should show).

    "Differ" is judged among the runs' own points (final or stage), not the references,
    whose configs are shorter by construction; a key only some configs have (a stage
    that others skip) differs when it takes two values. The ordering is shown apart.
    """
    flat = [_flatten(json.loads(c)) if isinstance(c, str) else {} for c in points.get("config", [])]
    own = [f for f, k in zip(flat, points["kind"]) if k in ("final", "stage")]
    basis = own if len(own) > 1 else flat
    keys = sorted({k for f in basis for k in f} - {"pipeline.order"})
    varying = [
        k
        for k in keys
        if len({json.dumps(f[k], default=str) for f in basis if k in f}) > 1
        or (k == "pipeline.name" and len(basis) > 1)
    ]
    return [{k: f[k] for k in varying if k in f} for f in flat]


def _pm(mean, std, fmt: str = "{:.4g}") -> str:
    if mean is None or pd.isna(mean):
        return "–"
    s = fmt.format(mean)
    return s + (f" ± {fmt.format(std)}" if std is not None and not pd.isna(std) and std > 0 else "")


def _objective(row: pd.Series, o: Objective) -> str:
    """``mean ± std`` of an objective, with its seed count where fewer seeds measured it than the point has."""
    n = row.get(f"{o.name}_n")
    short = n is not None and pd.notna(n) and n < row.get("n_seeds", n)
    return _pm(row.get(o.name), row.get(o.name + "_std")) + (f" (n={int(n)})" if short else "")


def _hover(row: pd.Series, objectives: list[Objective], diff: dict) -> str:
    ref = row["kind"] in ("teacher", "dense")
    lines = [
        f"<b>{html.escape(str(row['label']))}</b>",
        html.escape(f"reference: {row['order']}" if ref else f"{row['pipeline']}: {row['order']}"),
    ]
    lines.append(
        html.escape(
            f"{row.get('task')}: {row.get('model') if not ref or row['kind'] == 'dense' else ''}"
            f" ← {row.get('teacher')}".replace(":  ←", ": ←")
        )
    )
    lines.append(f"seeds: {html.escape(str(row.get('seeds', '')))} (n={row.get('n_seeds', 1)})")
    for o in objectives:
        lines.append(f"{o.name}: {_pm(row.get(o.name), row.get(o.name + '_std'))} {html.escape(o.unit)}")
    if row.get("pareto"):
        lines.append("<b>on the Pareto front</b>")
    for k, v in list(diff.items())[:14]:
        lines.append(html.escape(f"{k} = {v}"))
    runs = str(row.get("runs", "")).split("; ")
    lines.append(
        "runs: " + html.escape(", ".join(runs[:4]) + (f" (+{len(runs) - 4})" if len(runs) > 4 else ""))
    )
    return "<br>".join(lines)


def plotly_figure(
    points: pd.DataFrame,
    objectives: list[Objective],
    baseline: str | None = None,
    title: str = "",
    log_x: str = "auto",
):
    """The same picture as the PNG, interactive."""
    import matplotlib.colors as mcolors
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    y_obj, x_objs = objectives[0], objectives[1:]
    fig = make_subplots(rows=1, cols=len(x_objs), horizontal_spacing=0.09)
    hover = [_hover(r, objectives, d) for (_, r), d in zip(points.iterrows(), config_differences(points))]
    points = points.assign(_hover=hover)
    runs = points[points["kind"].isin(["final", "stage"])]
    key = ordering(runs)
    groups = list(dict.fromkeys(key))
    cmap = {g: mcolors.to_hex(c) for g, c in colours(groups).items()}

    def vals(sub: pd.DataFrame, col: str) -> list:
        return [json_safe(v) for v in sub[col]] if col in sub else [None] * len(sub)

    def err(sub: pd.DataFrame, obj: Objective) -> dict:
        std = vals(sub, obj.name + "_std")
        return dict(type="data", array=std, visible=any(v for v in std if v))

    for col, x_obj in enumerate(x_objs, start=1):
        first = col == 1
        for g in groups:
            sub = runs[key == g]
            fig.add_trace(
                go.Scatter(
                    x=vals(sub, x_obj.name),
                    y=vals(sub, y_obj.name),
                    mode="markers",
                    legendgroup=g,
                    showlegend=first,
                    name=g,
                    marker=dict(color=cmap[g], size=10),
                    error_x=err(sub, x_obj),
                    error_y=err(sub, y_obj),
                    hovertext=list(sub["_hover"]),
                    hoverinfo="text",
                    customdata=list(sub["label"]),
                ),
                row=1,
                col=col,
            )
        for kind, (symbol, size, color) in REFERENCE_SYMBOL.items():
            sub = points[points["kind"] == kind]
            if len(sub):
                fig.add_trace(
                    go.Scatter(
                        x=vals(sub, x_obj.name),
                        y=vals(sub, y_obj.name),
                        mode="markers",
                        name=REFERENCE_LABEL[kind],
                        legendgroup=kind,
                        showlegend=first,
                        marker=dict(symbol=symbol, size=size, color=color),
                        error_x=err(sub, x_obj),
                        error_y=err(sub, y_obj),
                        hovertext=list(sub["_hover"]),
                        hoverinfo="text",
                        customdata=list(sub["label"]),
                    ),
                    row=1,
                    col=col,
                )
        sub = runs[runs["pipeline"] == baseline] if baseline else runs.iloc[:0]
        if len(sub):
            fig.add_trace(
                go.Scatter(
                    x=vals(sub, x_obj.name),
                    y=vals(sub, y_obj.name),
                    mode="markers",
                    name=f"baseline ({baseline})",
                    legendgroup="baseline",
                    showlegend=first,
                    hoverinfo="skip",
                    marker=dict(symbol="square-open", size=20, color="crimson", line=dict(width=2)),
                ),
                row=1,
                col=col,
            )
        front = points[points["pareto"]]
        if len(front) and len(objectives) == 2:
            for i, (name, f) in enumerate(front_lines(front)):  # one per task/model/teacher
                order, where = step_order(f[x_obj.name], x_obj.sense)
                f = f.iloc[order]
                fig.add_trace(
                    go.Scatter(
                        x=vals(f, x_obj.name),
                        y=vals(f, y_obj.name),
                        mode="lines",
                        name=name,
                        legendgroup=f"front{i or ''}",
                        showlegend=first,
                        hoverinfo="skip",
                        line=dict(
                            color="black",
                            dash=FRONT_DASHES[i % len(FRONT_DASHES)],
                            width=1.5,
                            shape="hv" if where == "post" else "vh",
                        ),
                    ),
                    row=1,
                    col=col,
                )
        elif len(front):
            fig.add_trace(
                go.Scatter(
                    x=vals(front, x_obj.name),
                    y=vals(front, y_obj.name),
                    mode="markers",
                    legendgroup="front",
                    name=f"on the {len(objectives)}-objective front",
                    showlegend=first,
                    hoverinfo="skip",
                    marker=dict(symbol="circle-open", size=20, color="black", line=dict(width=2)),
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(
            title_text=x_obj.title,
            type="log" if use_log(points[x_obj.name], log_x) else "linear",
            row=1,
            col=col,
        )
        fig.update_yaxes(title_text=y_obj.title, row=1, col=col)
    fig.update_layout(
        title=title,
        template="plotly_white",
        height=620,
        hoverlabel=dict(align="left"),
        legend=dict(orientation="h", y=-0.18),
    )
    return fig


def _table(df: pd.DataFrame, table_id: str) -> str:
    return df.to_html(index=False, table_id=table_id, classes="data", na_rep="–", escape=True, border=0)


def points_table(points: pd.DataFrame, objectives: list[Objective]) -> pd.DataFrame:
    """Merged points, formatted mean ± std, front members first."""
    rows = []
    for _, r in points.sort_values(["pareto", objectives[0].name], ascending=False).iterrows():
        row = {
            "front": "✓" if r["pareto"] else "",
            "point": r["label"],
            "kind": r["kind"],
            "ordering": r["order"],
            "sparsity": json_safe(r.get("final_sparsity")),
            "bits": "float" if pd.isna(r.get("bits")) else int(r["bits"]),
            "seeds": f"{r.get('seeds', '')} (n={r.get('n_seeds', 1)})",
        }
        for o in objectives:
            row[f"{o.name} [{o.unit}]"] = _objective(r, o)
        for head, metric, scale, fmt in TABLE_METRICS:
            if metric in r and not any(o.metric == metric for o in objectives):
                std = r.get(metric + "_std")
                row[head] = _pm(
                    r[metric] * scale if pd.notna(r[metric]) else None,
                    std * scale if std is not None and pd.notna(std) else None,
                    fmt,
                )
        row["runs"] = r.get("runs", "")
        rows.append(row)
    return pd.DataFrame(rows)


def runs_table(runs: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """Every run (its final point), with whether its configuration is on the front."""
    on_front = set(points.loc[points["pareto"] & (points["kind"] == "final"), "config_key"])
    rows = []
    for _, r in runs[runs["kind"] == "final"].iterrows():
        row = {
            "run": r["run"],
            "run name": r.get("run_name"),
            "pipeline": r["pipeline"],
            "ordering": r["order"],
            "seed": json_safe(r.get("seed")),
            "sparsity": json_safe(r.get("final_sparsity")),
            "bits": "float" if pd.isna(r.get("bits")) else int(r["bits"]),
        }
        for head, metric, scale, fmt in TABLE_METRICS:
            if metric in r and pd.notna(r[metric]):
                row[head] = fmt.format(r[metric] * scale)
        row["on front"] = "✓" if r["config_key"] in on_front else ""
        rows.append(row)
    return pd.DataFrame(rows)


def conditions(runs: pd.DataFrame) -> dict[str, str]:
    """Measuring conditions as stated by the runs (several values are listed, not hidden)."""
    out = {}
    for k in ("hardware", "data", "hub_commits", *CONDITION_KEYS, *CONVENTION_KEYS):
        if k in runs:
            vals = [str(json_safe(v)) for v in dict.fromkeys(runs[k].dropna())]
            if vals:
                out[k] = " | ".join(vals)
    return out


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table.data{border-collapse:collapse;font-size:12px}
table.data th,table.data td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;white-space:nowrap}
table.data th{background:#f4f4f4;position:sticky;top:0}
dl{font-size:12px}dt{font-weight:600}dd{margin:0 0 6px 12px}
"""


def write_html(
    points: pd.DataFrame,
    runs: pd.DataFrame,
    objectives: list[Objective],
    path: Path,
    baseline: str | None = None,
    title: str = "dpq Pareto report",
    log_x: str = "auto",
    sections: str = "",
) -> Path:
    """One HTML file, no network needed: plot (plotly.js inline), merged points, every run, conditions."""
    fig = plotly_figure(points, objectives, baseline=baseline, title=title, log_x=log_x)
    plot = fig.to_html(
        full_html=False,
        include_plotlyjs=True,
        div_id=PLOT_ID,
        config={"displaylogo": False, "responsive": True},
    )
    n_front = int(points["pareto"].sum())
    senses = ", ".join(f"{o.name} ({o.sense})" for o in objectives)
    cond = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in conditions(runs).items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p id="summary">{int((runs["kind"] == "final").sum())} runs, {len(points)} points after merging seeds;
objectives: {html.escape(senses)}; {n_front} point(s) on the front. Error bars: standard deviation across seeds.
Hover a point for its configuration.</p>
{plot}
<h2>Points (merged over seeds)</h2>
{_table(points_table(points, objectives), "points")}
{sections}
<h2>Runs</h2>
{_table(runs_table(runs, points), "runs")}
<h2>Measurement conditions</h2>
<dl id="conditions">{cond}</dl>
</body></html>
"""
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)
