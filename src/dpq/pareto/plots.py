"""The Pareto scatter as a PNG (matplotlib, Agg): one colour per pipeline ordering, the front
as a step line, error bars for seed spread, teacher / dense / baseline points marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .front import step_order
from .objectives import Objective

REFERENCE_STYLE = {"teacher": dict(marker="*", s=170, color="black"), "dense": dict(marker="D", s=55, color="dimgray")}
REFERENCE_LABEL = {"teacher": "teacher", "dense": "dense student (distilled)"}


def use_log(values: pd.Series, mode: str = "auto") -> bool:
    """Log axis when asked, or (auto) when positive values span more than a decade."""
    if mode in ("on", "off"):
        return mode == "on"
    v = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(v) and (v > 0).all() and v.max() / v.min() > 10)


def colours(groups: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {g: cmap(i % 10) for i, g in enumerate(groups)}


def figure(points: pd.DataFrame, objectives: list[Objective], baseline: str | None = None,
           title: str | None = None, log_x: str = "auto", annotate: bool = True):
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
    runs = points[points["kind"].isin(["final", "stage"])]
    groups = list(dict.fromkeys(runs["order"]))
    cmap = colours(groups)
    for ax, x_obj in zip(axes[0], x_objs):
        for g in groups:
            sub = runs[runs["order"] == g]
            name = ", ".join(dict.fromkeys(sub["pipeline"]))
            _errorbars(ax, sub, x_obj, y_obj, cmap[g])
            ax.scatter(sub[x_obj.name], sub[y_obj.name], color=cmap[g], s=40, zorder=3, label=f"{name}: {g}")
        for kind, style in REFERENCE_STYLE.items():
            sub = points[points["kind"] == kind]
            if len(sub):
                _errorbars(ax, sub, x_obj, y_obj, style["color"])
                ax.scatter(sub[x_obj.name], sub[y_obj.name], zorder=4, label=REFERENCE_LABEL[kind], **style)
        if baseline:
            sub = runs[runs["pipeline"] == baseline]
            if len(sub):
                ax.scatter(sub[x_obj.name], sub[y_obj.name], s=190, facecolors="none", edgecolors="crimson",
                           linewidths=1.6, marker="s", zorder=5, label=f"baseline ({baseline})")
        front = points[points["pareto"]]
        if len(objectives) == 2 and len(front):
            order, where = step_order(front[x_obj.name], x_obj.sense)
            f = front.iloc[order]
            ax.step(f[x_obj.name], f[y_obj.name], where=where, color="black", ls="--", lw=1.2, zorder=2,
                    label="Pareto front")
        elif len(front):
            ax.scatter(front[x_obj.name], front[y_obj.name], s=130, facecolors="none", edgecolors="black",
                       linewidths=1.4, zorder=5, label=f"on the {len(objectives)}-objective front")
        if annotate:
            for _, r in runs.iterrows():
                if np.isfinite(r[x_obj.name]) and np.isfinite(r[y_obj.name]):
                    ax.annotate(r["label"], (r[x_obj.name], r[y_obj.name]), xytext=(4, 4),
                                textcoords="offset points", fontsize=7, color="0.25")
        if use_log(points[x_obj.name], log_x):
            ax.set_xscale("log")
        ax.set_xlabel(x_obj.title)
        ax.set_ylabel(y_obj.title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    n = int(runs["n_seeds"].max()) if "n_seeds" in runs and len(runs) else 1
    fig.suptitle(title or f"{y_obj.name} vs {', '.join(o.name for o in x_objs)}"
                 + (f" (mean ± std over up to {n} seeds)" if n > 1 else ""), fontsize=11)
    fig.tight_layout()
    return fig


def _errorbars(ax, sub: pd.DataFrame, x_obj: Objective, y_obj: Objective, color) -> None:
    xe, ye = sub.get(f"{x_obj.name}_std"), sub.get(f"{y_obj.name}_std")
    if (xe is not None and (xe > 0).any()) or (ye is not None and (ye > 0).any()):
        ax.errorbar(sub[x_obj.name], sub[y_obj.name], xerr=xe, yerr=ye, fmt="none", ecolor=color,
                    elinewidth=1, capsize=3, alpha=0.7, zorder=2)


def write_png(points: pd.DataFrame, objectives: list[Objective], path: Path, **kwargs) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(points, objectives, **kwargs)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)
