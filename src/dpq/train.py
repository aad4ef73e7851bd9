"""``python -m dpq.train`` / ``dpq-train``: one compression run, composed by Hydra.

``train(cfg)`` is a plain function (tests call it); ``main`` is the thin ``@hydra.main``
wrapper that turns user mistakes (:class:`ConfigError`) into one message and exit status 2
(a diverged run exits 3, a failed integrity check 4).

``python -m dpq.train resume=<run folder>`` continues a killed run in its folder with the
config it started with (:mod:`dpq.resume`); its result equals an uninterrupted run's.
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
from dpq import snapshot
from dpq.errors import ConfigError, IntegrityError, TrainingDiverged
from dpq.loggers import build_logger, finish
from dpq.models import load_tokenizer
from dpq.pipeline import RunState
from dpq.resume import barrier, check_resume_overrides, claim_output_dir, is_global_zero, load_run_config, register_resolvers
from dpq.results import git_info, library_versions, print_table, write_json_atomic
from dpq.validate import validate, validate_data

register_resolvers()  # conf/hydra/default.yaml: a resumed run keeps its own folder

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
    resume_from = cfg_dict.get("resume")
    if resume_from:  # continue that run: its own resolved config, its own folder
        cfg_dict = load_run_config(resume_from)
        cfg = OmegaConf.create(cfg_dict)
        if not (cfg_dict.get("checkpoint") or {}).get("enabled", True):
            raise ConfigError("resume", resume_from, "that run was started with checkpoint.enabled=false and saved no "
                              "state to resume from; start it again")
    stages = validate(cfg_dict)  # config errors surface here, before anything heavy
    task = cfg_dict["task"]
    splits = load_task(task)  # an unavailable dataset (offline, online-only task) fails here
    validate_data(cfg_dict, splits)
    tokenizer = load_tokenizer(cfg_dict["teacher"]) if splits.kind == "text" else None
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    data = ClassificationDataModule(splits, tokenizer, max_length=int(task.get("max_length") or 128),
                                    batch_size=int(task["batch_size"]), eval_batch_size=int(task["eval_batch_size"]),
                                    group_by_length=bool(task.get("group_by_length", True)))
    output_dir = Path(cfg_dict["paths"]["output_dir"])
    if resume_from:
        done = _completed(output_dir)
        if done is not None:
            log.info("%s already completed; nothing to resume", output_dir)
            return done
    else:
        claim_output_dir(output_dir, cfg_dict)  # never write into another run's folder
    output_dir.mkdir(parents=True, exist_ok=True)
    logger = build_logger(cfg_dict["logger"], output_dir, cfg_dict["run_name"], cfg_dict)
    log.info("task %s from %s: %s", task["name"], splits.source, splits.sizes())
    log.info("pipeline %s: %s", cfg_dict["pipeline"]["name"], " -> ".join(s.name for s in stages))

    run = RunState(cfg_dict, cfg.trainer, data, tokenizer, logger, output_dir)
    resumed = None
    if resume_from:
        snap = snapshot.latest(run.checkpoints, [s.name for s in stages])
        if snap is not None:
            run.load_snapshot(snap)  # run.run continues after this snapshot's stage
            resumed = snap.stage
        log.info("resuming %s after %s", output_dir, f"stage {resumed!r}" if resumed else "no finished stage")
    try:
        run.run(stages)
    except (TrainingDiverged, IntegrityError) as e:
        # Keep what the finished stages measured, marked as such, then stop; the newest snapshot is the last good state.
        status = "diverged" if isinstance(e, TrainingDiverged) else "integrity_failed"
        if is_global_zero():
            write_json_atomic(output_dir / "results.json", {
                "status": status, "error": str(e), "stages": run.records, "config": cfg_dict,
                "last_good_checkpoint": str(run.last_snapshot.directory) if run.last_snapshot else None})
        finish(logger)
        raise

    model, role = run.final_model
    model_dir = None
    final = dict(run.records[-1]["metrics"])
    weights = (cfg_dict.get("objective") or {}).get("weights") or {}
    if weights:  # the scalarised objective a Bayesian sweep optimises (sweeps/pareto_bayes.yaml)
        final["objective"] = float(sum(float(w) * float(final[k]) for k, w in weights.items()))
    writer = is_global_zero()  # DDP: every rank holds the same model; rank 0 writes the run folder
    if cfg_dict.get("save_model", True):
        from dpq.checkpoints import save_model

        model_dir = output_dir / "model"
        if writer:
            snapshot.write_dir_atomic(model_dir, lambda d: save_model(model, d, tokenizer))
        barrier()  # DDP: the other ranks reload what rank 0 wrote
    integrity_error = None
    if model_dir is not None and cfg_dict.get("integrity", True):  # every rank: under DDP evaluation is collective
        integrity_error = _check_reload(run, model_dir, role, final, float(cfg_dict.get("integrity_tolerance", 1e-3)))
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
        "resumed_after": resumed if resume_from else None,
        "config": cfg_dict,
    }
    if integrity_error is not None:
        results.update(status="integrity_failed", error=str(integrity_error))
        if writer:
            write_json_atomic(output_dir / "results.json", results)
        finish(logger)
        raise integrity_error
    if writer:
        write_json_atomic(output_dir / "results.json", results)
    print_table(run.records, title=f"dpq {cfg_dict['run_name']} -> {output_dir / 'results.json'}")
    summary = {f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    try:  # W&B: final metrics, this run's stage table with its Pareto front, the plot, results.json
        from dpq.pareto.wandb_log import log_run

        log_run(logger, results, output_dir / "results.json")
    except Exception as e:  # a tracker problem never fails a finished run
        log.warning("W&B Pareto logging failed: %s", e)
    finish(logger, summary)
    return results


def _completed(output_dir: Path) -> dict | None:
    """results.json of a run that already finished, else None."""
    import json

    try:
        results = json.loads((output_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("status") == "completed" else None


def _check_reload(run: RunState, model_dir: Path, role: str, final: dict, tolerance: float) -> IntegrityError | None:
    """Reload the exported model from disk and re-evaluate it; ``final`` gets ``reload_accuracy`` and ``reload_loss``."""
    from dpq.checkpoints import load_model
    from dpq.integrity import check_reload

    spec = run.model_spec if role == "student" else run.teacher_spec
    reloaded = run.evaluate(load_model(spec, run.task_dict, model_dir), "reload")
    final.update(reload_accuracy=reloaded["accuracy"], reload_val_accuracy=reloaded["val_accuracy"], reload_loss=reloaded["loss"])
    try:
        check_reload(final, reloaded, tolerance)
    except IntegrityError as e:
        return e
    return None


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> float | list[float] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        check_resume_overrides(cfg.get("resume"), list(HydraConfig.get().overrides.task))
        results = train(cfg)
    except ConfigError as e:
        print(f"dpq: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"dpq: training diverged: {e}", file=sys.stderr)
        sys.exit(3)
    except IntegrityError as e:
        print(f"dpq: integrity check failed: {e}", file=sys.stderr)
        sys.exit(4)
    # What a Hydra sweeper optimises: one value, or several for a multi-objective Optuna study.
    vals = [float(results["final"][m]) for m in (cfg.get("objective") or {}).get("metrics") or ["accuracy"]]
    return vals[0] if len(vals) == 1 else vals


if __name__ == "__main__":
    main()
