"""Put Pareto tables and plots on W&B: one run's stages (called by ``dpq.train``), or a whole report.

Every function here is best effort for its caller: ``dpq.train`` wraps the call so a tracker
problem never fails a finished run; the CLI reports the failure and still writes its files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

RUN_OBJECTIVES = ("primary", "effective_gflops")  # primary: the run's task.primary_metric


def is_wandb_logger(logger) -> bool:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        return False
    return isinstance(logger, WandbLogger)


def _table(df: pd.DataFrame):
    import wandb

    from .gather import json_safe

    clean = df.astype(object).map(json_safe) if hasattr(df, "map") else df
    return wandb.Table(columns=[str(c) for c in clean.columns], data=clean.values.tolist())


def run_points(results: dict, run_dir: str):
    """One run's stage records as points (the run's own trajectory), with the front over them."""
    from .aggregate import add_objectives
    from .front import pareto_mask
    from .gather import to_frame
    from .objectives import parse_objectives

    task = (results.get("config") or {}).get("task") or {}
    primary = task.get("primary_metric") or "accuracy"
    objectives = parse_objectives([primary if o == "primary" else o for o in RUN_OBJECTIVES])
    pts = add_objectives(to_frame([(results, run_dir)], stages=True), objectives)
    pts["n_seeds"] = 1
    pts["seeds"] = pts["seed"].astype(str)
    pts["runs"] = pts["run"]
    pts["pareto"] = pareto_mask(pts[[o.name for o in objectives]].to_numpy(), [o.sense for o in objectives])
    return pts, objectives


def log_run(logger, results: dict, results_path: Path) -> bool:
    """On a W&B logger: final metrics, this run's per-stage table with its front, the plot, and results.json.

    results.json is uploaded so that ``python -m dpq.pareto <sweep id>`` can rebuild every point
    of the run (teacher and dense references included) from W&B alone. Returns whether it logged.
    """
    if not is_wandb_logger(logger):
        return False
    import matplotlib.pyplot as plt
    import wandb

    from dpq.metrics import result_names

    from .plots import figure

    results_path = Path(results_path)
    task = (results.get("config") or {}).get("task") or {}
    run = logger.experiment
    pts, objectives = run_points(results, str(results_path.parent))
    cols = [
        "stage",
        "role",
        "label",
        "pareto",
        *result_names(task),  # accuracy, the task's metrics, then their validation values
        "sparsity",
        "effective_gflops",
        "dense_gflops",
        "bops",
        "size_bytes",
        "peak_memory_bytes",
        "latency_ms_median",
        "latency_ms_p90",
        "params_nonzero",
    ]  # (the ONNX export's figures belong to the final model, not to a stage: logged as final/onnx_*)
    table = pts
    fig = figure(pts, objectives, title=f"{results.get('run_name')}: after each stage")
    try:
        final = {
            f"final/{k}": v
            for k, v in results["final"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        run.log(
            {
                **final,
                "pareto/stages": _table(table[[c for c in cols if c in table]]),
                "pareto/plot": wandb.Image(fig),
            }
        )
        run.summary.update(final)
        run.save(str(results_path), base_path=str(results_path.parent), policy="now")
    finally:
        plt.close(fig)
    return True


def log_report(
    points: pd.DataFrame,
    runs: pd.DataFrame,
    png: Path,
    html: Path,
    project: str,
    entity: str | None,
    name: str,
    config: dict,
    out_dir: Path,
) -> str:
    """A W&B run (job_type ``pareto``) holding the merged points, every run, the PNG and the HTML report.

    Online when credentials exist and WANDB_MODE is not offline; otherwise offline in ``out_dir``.
    Returns the mode used.
    """
    import wandb

    from .gather import wandb_online

    mode = "online" if wandb_online() else "offline"
    run = wandb.init(
        project=project,
        entity=entity,
        job_type="pareto",
        name=name,
        dir=str(out_dir),
        mode=mode,
        config=config,
        settings=wandb.Settings(silent=True),
    )
    try:
        drop = [c for c in ("config",) if c in points]
        run.log(
            {
                "pareto/points": _table(points.drop(columns=drop)),
                "pareto/runs": _table(runs.drop(columns=[c for c in ("config",) if c in runs])),
                "pareto/plot": wandb.Image(str(png)),
                "pareto/report": wandb.Html(Path(html).read_text(encoding="utf-8"), inject=False),
            }
        )
    finally:
        run.finish()
    return mode


def wandb_dir_of(out_dir: Path) -> list[str]:
    """The offline W&B run folders a report left in ``out_dir`` (for messages and tests)."""
    base = Path(out_dir) / "wandb"
    return sorted(str(p) for p in base.glob("offline-run-*")) if base.exists() else []
