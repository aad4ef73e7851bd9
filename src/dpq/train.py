"""``python -m dpq.train`` / ``dpq-train``: one compression run, composed by Hydra.

``train(cfg)`` is a plain function (tests call it); ``main`` is the thin ``@hydra.main``
wrapper that turns user mistakes (:class:`ConfigError`) into one message and exit status 2.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from dpq.data import ClassificationDataModule, load_task
from dpq.errors import ConfigError, TrainingDiverged
from dpq.loggers import build_logger, finish
from dpq.models import load_tokenizer
from dpq.pipeline import RunState
from dpq.results import git_info, library_versions, print_table, write_json_atomic
from dpq.validate import validate

log = logging.getLogger("dpq")


def quiet_libraries() -> None:
    """Every stage builds a Trainer; its per-fit banners ("GPU available", tips) would repeat five times."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)


def train(cfg: DictConfig) -> dict:
    """Validate, load data and models, run every stage in order, write results.json; return it."""
    started = time.perf_counter()
    quiet_libraries()
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    stages = validate(cfg_dict)  # config errors surface here, before anything heavy
    task = cfg_dict["task"]
    splits = load_task(task)  # an unavailable dataset (offline, online-only task) fails here
    tokenizer = load_tokenizer(cfg_dict["teacher"]) if splits.kind == "text" else None
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    data = ClassificationDataModule(splits, tokenizer, max_length=int(task.get("max_length") or 128),
                                    batch_size=int(task["batch_size"]), eval_batch_size=int(task["eval_batch_size"]),
                                    group_by_length=bool(task.get("group_by_length", True)))
    output_dir = Path(cfg_dict["paths"]["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    logger = build_logger(cfg_dict["logger"], output_dir, cfg_dict["run_name"], cfg_dict)
    log.info("task %s from %s: %s", task["name"], splits.source, splits.sizes())
    log.info("pipeline %s: %s", cfg_dict["pipeline"]["name"], " -> ".join(s.name for s in stages))

    run = RunState(cfg_dict, cfg.trainer, data, tokenizer, logger, output_dir)
    try:
        run.run(stages)
    except TrainingDiverged as e:
        # Keep what the finished stages measured, marked as such, then stop.
        write_json_atomic(output_dir / "results.json", {"status": "diverged", "error": str(e), "stages": run.records,
                                                        "config": cfg_dict})
        finish(logger)
        raise

    model, role = run.final_model
    model_dir = None
    if cfg_dict.get("save_model", True):
        from dpq.checkpoints import save_model

        model_dir = save_model(model, output_dir / "model", tokenizer)
    final = dict(run.records[-1]["metrics"])
    results = {
        "status": "completed",
        "run_name": cfg_dict["run_name"],
        "pipeline": cfg_dict["pipeline"]["name"],
        "order": [s.name for s in stages],
        "task": {"name": task["name"], "source": splits.source, "sizes": splits.sizes()},
        "seed": int(cfg.seed),
        "git": git_info(),
        "versions": library_versions(),
        "cost_conditions": {**cfg_dict["cost"], "flops_convention": final.get("flops_convention"),
                            "latency_device": final.get("device"), "threads": final.get("threads")},
        "stages": run.records,
        # Spiral runs: the state after each round (its last record), so the trajectory is one list.
        "rounds": [r for i, r in enumerate(run.records) if "round" in r
                   and (i + 1 == len(run.records) or run.records[i + 1].get("round") != r["round"])],
        "final": {"stage": run.records[-1]["stage"], "model": role, "quantized": run.quantized, **final},
        "model_dir": str(model_dir) if model_dir else None,
        "wall_time_s": time.perf_counter() - started,
        "config": cfg_dict,
    }
    write_json_atomic(output_dir / "results.json", results)
    print_table(run.records, title=f"dpq {cfg_dict['run_name']} -> {output_dir / 'results.json'}")
    summary = {f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    finish(logger, summary)
    return results


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    except ConfigError as e:
        print(f"dpq: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"dpq: training diverged: {e}", file=sys.stderr)
        sys.exit(3)
    return results["final"]["accuracy"]  # the value an Optuna sweeper optimises


if __name__ == "__main__":
    main()
