"""Pareto analysis of finished runs: gather results, merge seeds, find the front, plot, report, compare.

Modules: ``objectives`` (names -> metric, direction, unit), ``front`` (the non-dominated set),
``gather`` (results.json / W&B -> points), ``aggregate`` (seeds -> mean ± std), ``plots`` (PNG),
``report`` (self-contained HTML), ``compare`` (baseline vs candidate), ``wandb_log``, ``cli``.
Heavy libraries (pandas, matplotlib, plotly, wandb) load only when used.
"""

from .front import pareto_mask
from .objectives import OBJECTIVES, Objective, parse_objectives

__all__ = ["pareto_mask", "OBJECTIVES", "Objective", "parse_objectives"]
