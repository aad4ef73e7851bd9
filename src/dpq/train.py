"""``python -m dpq.train`` / ``dpq-train``: one compression run, composed by Hydra.

``train(cfg)`` is a plain function (tests call it); ``main`` is the thin ``@hydra.main``
wrapper that turns user mistakes (:class:`ConfigError`) into one message and exit status 2
(a diverged run exits 3, a failed integrity check 4).

``python -m dpq.train resume=<run folder>`` continues a killed run in its folder with the
config it started with (:mod:`dpq.run.resume`); its result equals an uninterrupted run's.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from dpq.core.distributed import process_rank, settle_threads, threads_settled, warnings_on_rank_zero
from dpq.core.errors import ConfigError, IntegrityError, TrainingDiverged
from dpq.core.provenance import capture_git
from dpq.data import labelled, load_task
from dpq.loggers import quiet_libraries
from dpq.models import load_tokenizer, pin_hub_commits, run_hub_commits
from dpq.run import RunContext, Runner, plan, records, validate, validate_data
from dpq.run.overrides import check_command_line, register_help
from dpq.run.resume import (
    check_resume_argument,
    check_resume_overrides,
    check_same_data,
    claim_output_dir,
    load_run_config,
    recorded_hub_commits,
    register_resolvers,
)
from dpq.run.runner import lacking
from dpq.run.validate import check_folders, resolved_config, unused_stage_overrides

register_resolvers()  # conf/hydra/default.yaml: a resumed run keeps its own folder
register_help()  # conf/hydra/help/dpq.yaml: --help lists the groups' options

log = logging.getLogger("dpq")


def train(cfg: DictConfig) -> dict:
    """Validate, load data and models, run every stage in order, write results.json; return it.
    With ``dry_run``: validate and load the data, then return (and print) what would run (:mod:`dpq.run.plan`)."""
    started = time.perf_counter()
    git = capture_git()  # the code that runs is the code at the start, whatever is committed meanwhile
    quiet_libraries()
    cfg_dict = resolved_config(cfg)
    resume_from = cfg_dict.get("resume")
    if resume_from and cfg_dict.get("dry_run"):  # the command line refuses any override beside resume=
        raise ConfigError(
            "dry_run", True, f"cannot be combined with resume={resume_from}, which continues that run"
        )
    if resume_from:  # continue that run: its own resolved config, its own folder, its hub models' commits
        cfg_dict = load_run_config(resume_from)
        pin_hub_commits(cfg_dict, recorded_hub_commits(resume_from))
    elif process_rank()[0] != 0:
        # A DDP rank that Lightning's launcher started during rank 0's first stage, after rank 0 recorded its
        # hub models' commits in the folder they share: the same commits, wherever a branch points by now
        # (under launchers that start every rank at once there is no record yet: each rank resolves its own).
        pin_hub_commits(cfg_dict, recorded_hub_commits(cfg_dict["paths"]["output_dir"]))
    with warnings_on_rank_zero():  # each DDP rank makes these checks again
        stages = validate(cfg_dict)  # config errors surface here, before anything heavy
        check_folders(cfg_dict)  # the run's folder and the caches can be written
        # Bad data (missing file, empty split, missing column, empty text, unknown label) fails here. The data's
        # labels (count, names) complete the task config that the label checks and the models use.
        splits = load_task(cfg_dict["task"])
        cfg_dict["task"] = labelled(cfg_dict["task"], splits)
        validate_data(cfg_dict, splits, stages)
    if cfg_dict.get("dry_run"):  # every check above passed: say what would run, train nothing
        with threads_settled(cfg_dict["trainer"]):  # the stage-cache keys the run will look up (below)
            result = plan.plan(cfg_dict, stages, splits)
        plan.print_plan(result, f"dry run of {cfg_dict['run_name']} ({cfg_dict['pipeline']['name']})")
        return result
    # The threads Lightning's DDP launcher would set when it starts the other ranks, set now: run.json and
    # the stage-cache keys record the threads the stages train with.
    settle_threads(cfg_dict["trainer"])
    tokenizer = load_tokenizer(cfg_dict["teacher"]) if splits.kind == "text" else None
    L.seed_everything(int(cfg_dict["seed"]), workers=True, verbose=False)
    output_dir = Path(cfg_dict["paths"]["output_dir"])
    if resume_from and (done := records.completed(output_dir)) is not None:
        log.info("%s already completed; nothing to resume", output_dir)
        return done
    if resume_from:
        check_same_data(output_dir, splits)  # the examples it started on, or a config error
    else:
        # never write into another run's folder; record what a resume must find again
        claim_output_dir(output_dir, cfg_dict, splits.identity(), run_hub_commits(cfg_dict))
    ctx = RunContext.open(cfg_dict, splits, tokenizer, output_dir, git)
    log.info("task %s from %s: %s", cfg_dict["task"]["name"], splits.source, splits.sizes())
    log.info("pipeline %s: %s", cfg_dict["pipeline"]["name"], " -> ".join(s.name for s in stages))
    runner = Runner(ctx)
    resumed = runner.resume(stages) if resume_from else None
    if resume_from:
        log.info("resuming %s after %s", output_dir, f"stage {resumed!r}" if resumed else "no finished stage")
    try:
        runner.run(stages)
    except (TrainingDiverged, IntegrityError) as e:
        runner.fail(e)  # results.json keeps what the finished stages measured
        ctx.close()
        raise
    try:
        results = runner.finish(started, resumed, bool(resume_from))
    except IntegrityError:  # the saved model does not reproduce the run (results.json says so)
        ctx.close()
        raise
    final = results["final"]
    ctx.close(
        {f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )
    return results


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float | list[float] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        # as typed: iterating the ListConfig would resolve an interpolation inside an override (run_name=${x})
        overrides = OmegaConf.to_container(hc.overrides.task, resolve=False)
        check_resume_overrides(cfg.get("resume"), overrides)
        if not cfg.get("resume"):
            unused_stage_overrides(OmegaConf.to_container(cfg.pipeline, resolve=False), overrides)
        results = train(cfg)
        if results.get("dry_run"):
            return None  # nothing was trained, so there is no objective (Optuna sweeps refuse dry runs)
    except ConfigError as e:
        print(f"dpq: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingDiverged, IntegrityError) as e:
        what = "training diverged" if isinstance(e, TrainingDiverged) else "integrity check failed"
        print(f"dpq: {what}: {e}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:  # one bad trial must not end the sweep or the Optuna study
            worst = worst_values(cfg, hc.sweeper.get("direction"))
            log.error("%s; this trial returns %s to the sweeper (its results.json says why)", what, worst)
            return worst
        sys.exit(3 if isinstance(e, TrainingDiverged) else 4)
    return objective_values(cfg, results, hc.sweeper.get("direction"))


def worst_values(cfg, direction) -> float | list[float]:
    """What a failed trial returns to a sweeper: the worst value of each objective, -inf where higher is
    better (``maximize``, the default) and +inf where lower is. (NaN would fail Optuna's ``tell``, and
    the Optuna sweeper ends the study once a batch's failures pass ``max_failure_rate``.)"""
    n = len((cfg.get("objective") or {}).get("metrics") or ["val_accuracy"])
    dirs = list(direction) if isinstance(direction, (list, tuple, ListConfig)) else [direction] * n
    vals = [float("inf") if str(d).lower() == "minimize" else float("-inf") for d in dirs]
    return vals[0] if len(vals) == 1 else vals


def objective_values(cfg, results: dict, direction=None) -> float | list[float]:
    """What a Hydra sweeper optimises (``objective.metrics`` of the final record): one value, or several
    for a multi-objective Optuna study. A metric the final record lacks (an ONNX Runtime figure when the
    export failed) makes the trial's values the worst (:func:`worst_values`), said in the log."""
    names = (cfg.get("objective") or {}).get("metrics") or ["val_accuracy"]
    final = results["final"]
    missing = [m for m in names if final.get(m) is None]
    if missing:
        worst = worst_values(cfg, direction)
        log.error("%s; this trial returns %s to the sweeper", lacking(missing), worst)
        return worst
    vals = [float(final[m]) for m in names]
    return vals[0] if len(vals) == 1 else vals


def main() -> float | list[float] | None:
    """``python -m dpq.train`` / ``dpq-train``: the command line's ``resume=`` is checked before Hydra
    starts, since Hydra creates the run folder first -- a mistyped resume folder would be made and then
    reported as holding no checkpoints."""
    try:
        check_resume_argument(sys.argv[1:])
        # a mistyped key or option: dpq's message, not Hydra's advice to add it
        check_command_line(sys.argv[1:])
    except ConfigError as e:
        print(f"dpq: config error: {e}", file=sys.stderr)
        sys.exit(2)
    return hydra_main()


if __name__ == "__main__":
    main()
