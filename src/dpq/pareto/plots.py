"""The Pareto scatter as a PNG (matplotlib, Agg): one colour per pipeline ordering, the front
as a step line (one per task/model/teacher), error bars for seed spread, teacher / dense / baseline
points marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .front import CONTEXT, step_order
from .objectives import Objective

REFERENCE_STYLE = {
    "teacher": dict(marker="*", s=170, color="black"),
    "dense": dict(marker="D", s=55, color="dimgray"),
}
REFERENCE_LABEL = {"teacher": "teacher", "dense": "dense student (distilled)"}


def use_log(values: pd.Series, mode: str = "auto") -> bool:
    """Log axis when asked, or (auto) when positive values span more than a decade."""
    if mode in ("on", "off"):
        return mode == "on"
    v = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(v) and (v > 0).all() and v.max() / v.min() > 10)


def ordering(points: pd.DataFrame) -> pd.Series:
    """What gets one colour: the pipeline and its stage order (``dpq`` and ``dpq_qat`` share an order
    but differ in how a stage trains, so they are two orderings of the study)."""
    return points["pipeline"].astype(str) + ": " + points["order"].astype(str)


def drawn_as_reference(runs: pd.DataFrame, points: pd.DataFrame, objectives: list[Objective]) -> pd.DataFrame:
    """``runs`` without the points that are a reference marker already: a ``pipeline=dense`` run ends
    at its distillation, so its final point is the dense student (same stages, same numbers) and
    was drawn a second time under the diamond, with a legend entry of its own."""
    refs = points[points["kind"].isin(list(REFERENCE_STYLE))]
    if runs.empty or refs.empty:
        return runs
    cols = ["order", *(o.name for o in objectives)]
    same = runs[cols].apply(tuple, axis=1).isin(set(refs[cols].apply(tuple, axis=1)))
    return runs[~same]


# One front per task/model/teacher (cli.front_table): each its own dash pattern, in the order they appear.
FRONT_DASHES = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]


def front_lines(front: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The front members of each task/model/teacher, with the legend name of its line: a staircase
    through the fronts of two tasks would join points that never competed. The name says the
    context only where the points span several, and then only the columns that tell them apart."""
    cols = [c for c in CONTEXT if c in front]
    if not cols:
        return [("Pareto front", front)]
    groups = [
        (k if isinstance(k, tuple) else (k,), g) for k, g in front.groupby(cols, sort=False, dropna=False)
    ]
    if len(groups) == 1:
        return [("Pareto front", front)]
    differ = [i for i, _ in enumerate(cols) if len({str(k[i]) for k, _ in groups}) > 1]
    return [("Pareto front (" + ", ".join(f"{cols[i]}={k[i]}" for i in differ) + ")", g) for k, g in groups]


def colours(groups: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {g: cmap(i % 10) for i, g in enumerate(groups)}


def figure(
    points: pd.DataFrame,
    objectives: list[Objective],
    baseline: str | None = None,
    title: str | None = None,
    log_x: str = "auto",
    annotate: bool = True,
):
    """A matplotlib Figure: y = the first objective, one panel per other objective.

    ``points`` is the merged table with objective columns and the ``pareto`` flag.
    With two objectives the front is a step line; with three it is a ring around the
    members (a 2-d projection of a 3-d front is not a staircase).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_obj, x_objs = objectives[0], objectives[1:]
    fig, axes = plt.subplots(1, len(x_objs), figsize=(7.5 * len(x_objs), 5.6), squeeze=False)
    runs = drawn_as_reference(points[points["kind"].isin(["final", "stage"])], points, objectives)
    key = ordering(runs)
    groups = list(dict.fromkeys(key))
    cmap = colours(groups)
    for ax, x_obj in zip(axes[0], x_objs):
        for g in groups:
            sub = runs[key == g]
            _errorbars(ax, sub, x_obj, y_obj, cmap[g])
            ax.scatter(sub[x_obj.name], sub[y_obj.name], color=cmap[g], s=40, zorder=3, label=g)
        for kind, style in REFERENCE_STYLE.items():
            sub = points[points["kind"] == kind]
            if len(sub):
                _errorbars(ax, sub, x_obj, y_obj, style["color"])
                ax.scatter(sub[x_obj.name], sub[y_obj.name], zorder=4, label=REFERENCE_LABEL[kind], **style)
        if baseline:
            sub = runs[runs["pipeline"] == baseline]
            if len(sub):
                ax.scatter(
                    sub[x_obj.name],
                    sub[y_obj.name],
                    s=190,
                    facecolors="none",
                    edgecolors="crimson",
                    linewidths=1.6,
                    marker="s",
                    zorder=5,
                    label=f"baseline ({baseline})",
                )
        front = points[points["pareto"]]
        if len(objectives) == 2 and len(front):
            for i, (name, f) in enumerate(front_lines(front)):
                order, where = step_order(f[x_obj.name], x_obj.sense)
                f = f.iloc[order]
                ax.step(
                    f[x_obj.name],
                    f[y_obj.name],
                    where=where,
                    color="black",
                    ls=FRONT_DASHES[i % len(FRONT_DASHES)],
                    lw=1.2,
                    zorder=2,
                    label=name,
                )
        elif len(front):
            ax.scatter(
                front[x_obj.name],
                front[y_obj.name],
                s=130,
                facecolors="none",
                edgecolors="black",
                linewidths=1.4,
                zorder=5,
                label=f"on the {len(objectives)}-objective front",
            )
        if use_log(points[x_obj.name], log_x):
            ax.set_xscale("log")
        ax.set_xlabel(x_obj.title)
        ax.set_ylabel(y_obj.title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    n = int(runs["n_seeds"].max()) if "n_seeds" in runs and len(runs) else 1
    fig.suptitle(
        title
        or f"{y_obj.name} vs {', '.join(o.name for o in x_objs)}"
        + (f" (mean ± std over up to {n} seeds)" if n > 1 else ""),
        fontsize=11,
    )
    fig.tight_layout()
    if annotate:  # after the layout: placing labels needs the axes' final size on the canvas
        refs = points[points["kind"].isin(list(REFERENCE_STYLE))]
        for ax, x_obj in zip(axes[0], x_objs):
            ok = runs[
                np.isfinite(runs[x_obj.name].astype(float)) & np.isfinite(runs[y_obj.name].astype(float))
            ]
            place_labels(
                ax,
                list(ok["label"]),
                list(ok[x_obj.name]),
                list(ok[y_obj.name]),
                avoid=list(zip(refs[x_obj.name], refs[y_obj.name])),
            )
    return fig


# (dx, dy) in points from the marker, and the text's alignment there: beside the point first,
# then further above / below it. Nearby points of a study (dq next to dpq 0.2, several configs
# at one FLOP count) otherwise print their labels on top of each other.
_SLOTS = [
    ((5, 4), "left", "bottom"),
    ((5, -4), "left", "top"),
    ((-5, 4), "right", "bottom"),
    ((-5, -4), "right", "top"),
] + [
    ((sx * 5, sy * k), ha, va)
    for k in (12, 20, 28, 36)
    for sx, ha in ((1, "left"), (-1, "right"))
    for sy, va in ((1, "bottom"), (-1, "top"))
]


def place_labels(
    ax,
    labels: list[str],
    xs: list[float],
    ys: list[float],
    fontsize: float = 7,
    avoid: list[tuple[float, float]] = (),
) -> list:
    """Annotate each point with its label at the first slot where the text overlaps neither an
    earlier label nor a marker and stays inside the axes; where no slot is free, the least
    overlapping one. Labels away from their point get a leader line; ``avoid`` holds further
    markers (data coordinates) to keep clear of. Deterministic: the PNG is the same on every run.

    Hand-written rather than adjustText: that library moves labels iteratively and does not
    guarantee a free slot is used; this greedy search does, and needs no extra dependency."""
    from matplotlib.text import Text

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(np.column_stack([xs, ys])) if len(xs) else np.empty((0, 2))
    half = 3.5 * fig.dpi / 72  # marker half-size in pixels (s=40 points^2 -> ~6.3 pt across)
    marks = np.vstack([pts, ax.transData.transform(np.asarray(avoid, float))]) if len(avoid) else pts
    taken = [(x - half, y - half, x + half, y + half) for x, y in marks]
    placed = []
    order = np.argsort(-pts[:, 1], kind="stable") if len(pts) else []
    for i in order:
        best = None
        for k, ((dx, dy), ha, va) in enumerate(_SLOTS):
            # a label moved away from its point gets a leader line, so it is read with the right point
            leader = dict(arrowstyle="-", color="0.55", lw=0.6, shrinkA=1, shrinkB=3) if k >= 4 else None
            ann = ax.annotate(
                labels[i],
                (xs[i], ys[i]),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=fontsize,
                color="0.25",
                ha=ha,
                va=va,
                arrowprops=leader,
            )
            ann.update_positions(renderer)
            bb = Text.get_window_extent(ann, renderer)  # the text alone, not its leader line
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            cost = sum(_overlap(box, t) for t in taken)
            inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
            cost += 0 if inside else (box[2] - box[0]) * (box[3] - box[1])
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        taken.append(best[2])
        placed.append(best[1])
    return placed


def _overlap(a: tuple, b: tuple) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _errorbars(ax, sub: pd.DataFrame, x_obj: Objective, y_obj: Objective, color) -> None:
    xe, ye = sub.get(f"{x_obj.name}_std"), sub.get(f"{y_obj.name}_std")
    if (xe is not None and (xe > 0).any()) or (ye is not None and (ye > 0).any()):
        ax.errorbar(
            sub[x_obj.name],
            sub[y_obj.name],
            xerr=xe,
            yerr=ye,
            fmt="none",
            ecolor=color,
            elinewidth=1,
            capsize=3,
            alpha=0.7,
            zorder=2,
        )


def write_png(points: pd.DataFrame, objectives: list[Objective], path: Path, **kwargs) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(points, objectives, **kwargs)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)
