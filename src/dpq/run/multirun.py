"""Check every job of a Hydra grid multirun before the first one trains.

Hydra's basic sweeper composes each job's config up front (a mistyped group option fails at once), but
dpq's own checks (ranges, stage order, export settings: :func:`dpq.run.validate.validate`) ran only as
each job started, so ``final_sparsity=0.3,1.5`` trained the whole first job before refusing the second.
Hydra has no hook that hands a callback the job list, so :class:`ValidateJobsFirst` expands the sweep as
the basic sweeper does (its own ``split_arguments``), composes each job with Hydra's compose API, and
validates it; the first bad job ends the multirun with the job's overrides and the usual one-line
message. Optuna (and other) sweepers sample their jobs as they go: only their fixed overrides are known
up front, and the first trial checks those.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from dpq.core.errors import ConfigError

log = logging.getLogger(__name__)


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every job the basic sweeper will launch, in its order; None for other sweepers."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]  # as BasicSweeper._parse_config
    # as typed: iterating the ListConfig would resolve an interpolation inside an override (run_name=${x})
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    from hydra.core.global_hydra import GlobalHydra

    # with the config loader, as BasicSweeper parses them: glob() needs it to list a group's options
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    overrides = OverridesParser.create(config_loader=loader).parse_overrides([*params, *task])
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def check_job(config_name: str, overrides: list[str]) -> None:
    """Compose one job's config and run dpq's config checks on it (no data, no model)."""
    from hydra import compose

    from dpq.run.validate import resolved_config, validate

    cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "<the job's folder>"  # ${hydra:runtime.output_dir} exists only inside the job
    cfg_dict = resolved_config(cfg)
    if not cfg_dict.get("resume"):
        validate(cfg_dict)


def check_sweeper(config: DictConfig) -> None:
    """An Optuna study (a sweeper with ``direction``) has one direction per ``objective.metrics`` entry and at
    least one trial. Otherwise the sweeper finds out only from a finished trial's return value (every trial
    trains, then fails in the sweeper: "Return value must be float-castable"), or after no trial at all
    ("No trials are completed yet")."""
    from dpq.run import search_space

    search_space.check(config)  # stage_params: Optuna's conditional settings
    sweeper = config.hydra.sweeper
    if "direction" not in sweeper:
        return
    if config.get("dry_run"):
        raise ConfigError(
            "dry_run",
            True,
            "trains nothing, so an Optuna study's trials would return no objective values to learn from; "
            "dry-run one trial without -m (the study's fixed overrides and one value of each searched key)",
        )
    direction = sweeper.direction
    dirs = [str(d) for d in direction] if isinstance(direction, ListConfig) else [str(direction)]
    try:
        metrics = OmegaConf.to_container(config.objective.metrics, resolve=True) or ["val_accuracy"]
    except Exception:  # an interpolation only a job resolves: the job checks its objective itself
        return
    bad = [d for d in dirs if d.lower() not in ("maximize", "minimize")]
    if bad:
        raise ConfigError("hydra.sweeper.direction", dirs, "each direction must be maximize or minimize")
    if len(dirs) != len(metrics):
        raise ConfigError(
            "hydra.sweeper.direction",
            dirs,
            f"needs one direction per objective.metrics entry ({metrics}: {len(metrics)}); dpq.train returns "
            "one value per metric, in order",
        )
    from dpq.run.validate import objective_sense

    for i, (m, d) in enumerate(zip(metrics, dirs, strict=True)):
        if (sense := objective_sense(str(m))) is not None and d.lower() != sense:
            raise ConfigError(
                f"hydra.sweeper.direction[{i}]",
                d,
                f"objective.metrics[{i}]={m!r} is better {'higher' if sense == 'maximize' else 'lower'}: "
                f"{sense} it (the study would search for the worst {m})",
            )
    n = sweeper.get("n_trials")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError("hydra.sweeper.n_trials", n, "must be an integer >= 1")


class ValidateJobsFirst(Callback):
    """``hydra.callbacks`` entry (``conf/hydra/default.yaml``): every grid job checked before any trains, and
    an Optuna study's objectives against its directions."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweeper(config)
        except ConfigError as e:
            print(f"dpq: config error: {e}", file=sys.stderr)
            print("dpq: no trial was started", file=sys.stderr)
            sys.exit(2)
        # Any exception is said and stops the multirun here: Hydra turns a callback's exception into a
        # warning and launches the jobs anyway (a glob() sweep once went unchecked that way).
        try:
            jobs = sweep_jobs(config)
        except Exception as e:  # noqa: BLE001 - a sweep Hydra's parser refuses: said before any job
            print(
                f"dpq: the multirun's overrides could not be expanded: {type(e).__name__}: {e}",
                file=sys.stderr,
            )
            print("dpq: no job was started", file=sys.stderr)
            sys.exit(2)
        if not jobs or len(jobs) < 2:  # one job checks itself as it starts
            return
        from dpq.loggers import quiet_libraries

        quiet_libraries()  # each check builds a Trainer once; its banners would repeat per job
        name = config.hydra.job.config_name
        for i, job in enumerate(jobs):
            try:
                check_job(name, job)
            except Exception as e:  # noqa: BLE001 - a ConfigError, or a job Hydra cannot compose
                said = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
                print(f"dpq: config error in multirun job #{i} ({' '.join(job)}): {said}", file=sys.stderr)
                print(f"dpq: none of the {len(jobs)} jobs was started", file=sys.stderr)
                sys.exit(2)
        log.info("checked the configs of all %d jobs", len(jobs))
