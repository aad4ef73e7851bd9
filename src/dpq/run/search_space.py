"""Optuna studies sample a stage's settings only for the trials whose pipeline runs that stage.

A study over ``pipeline: choice(dpq, dp, spiral)`` with ``pipeline.stages.quantize.bits: choice(4, 8)`` in
``hydra.sweeper.params`` samples bits for every trial, dp's too, which has no quantize stage: such a trial
differs from another only in a setting nothing reads, and the sampler learns an effect of bits from trials in
which it had none. Optuna's answer is a define-by-run space (a parameter is suggested only where it applies);
the Hydra Optuna sweeper's hook for it is ``hydra.sweeper.custom_search_space``, a function it calls for each
trial after sampling ``params``. :func:`stage_params` is that function: it samples each entry of the config's
``stage_params`` (Hydra's sweep syntax, as in ``params``) when the trial's pipeline runs the stage (or reads
the setting through an interpolation, as the spiral reads ``prune.final_sparsity``), and leaves it out
otherwise. dpq.pareto and the trial's folder name then show only settings that took effect.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpq.core.errors import ConfigError

HOOK = "dpq.run.search_space.stage_params"  # the value of hydra.sweeper.custom_search_space
SETTING = re.compile(r"^pipeline\.stages\.([\w-]+)\.[\w.-]+$")


def distribution(key: str, spec: Any):
    """The Optuna distribution of one ``stage_params`` entry, parsed as the sweeper parses ``params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    where = f"stage_params.{key}"
    if not isinstance(key, str) or not SETTING.match(key):
        raise ConfigError(
            "stage_params",
            key,
            "keys are stage settings, pipeline.stages.<stage>.<setting> (e.g. pipeline.stages.quantize.bits)",
        )
    try:
        override = OverridesParser.create().parse_override(f"{key}={spec}")
        if not override.is_sweep_override():
            raise ValueError("a single value")
        return create_optuna_distribution_from_override(override)
    except Exception as e:
        raise ConfigError(
            where,
            spec,
            "must be a sweep in Hydra's Optuna syntax: choice(4, 8), interval(0.1, 0.9), int(interval(1, 4)), "
            f"range(1, 5) or tag(log, interval(1e-5, 1e-3)) ({type(e).__name__}: {e})",
        ) from None


def check(config: DictConfig) -> None:
    """``stage_params`` is for an Optuna study that names :data:`HOOK` as its ``custom_search_space``; each entry
    is a stage setting with a sweep that parses, and none is also a ``hydra.sweeper.params`` entry."""
    wanted = config.get("stage_params")
    if wanted is None:
        return
    if not isinstance(wanted, DictConfig):
        raise ConfigError(
            "stage_params", wanted, "must be a mapping of pipeline.stages.<stage>.<setting> to a sweep"
        )
    if not wanted:
        return
    sweeper = config.hydra.sweeper
    if "custom_search_space" not in sweeper:
        raise ConfigError(
            "stage_params",
            OmegaConf.to_container(wanted),
            "is sampled by Optuna studies only (hydra/sweeper=optuna with hydra.sweeper.custom_search_space="
            f"{HOOK}); a grid multirun lists the values on the command line",
        )
    if sweeper.get("custom_search_space") != HOOK:
        raise ConfigError(
            "hydra.sweeper.custom_search_space",
            sweeper.get("custom_search_space"),
            f"must be {HOOK} for stage_params to be sampled (else they would be ignored)",
        )
    both = sorted(set(wanted) & set(sweeper.get("params") or {}))
    if both:
        raise ConfigError(
            f"stage_params.{both[0]}",
            wanted[both[0]],
            "is also in hydra.sweeper.params; sample it in one place",
        )
    for key, spec in wanted.items():
        distribution(key, spec)


def _trial_pipeline(config: DictConfig, trial) -> dict:
    """The unresolved pipeline config of the job this trial will launch: its overrides composed as the
    launcher composes them (the trial's sampled params, then the fixed ones), user config folders included."""
    from hydra import compose

    overrides = [f"{k}={v}" for k, v in {**trial.params, **trial.user_attrs}.items()]
    cfg = compose(config_name=config.hydra.job.config_name, overrides=overrides)
    return OmegaConf.to_container(cfg.pipeline, resolve=False)


def stage_params(config: DictConfig, trial, pipeline: dict | None = None) -> None:
    """``hydra.sweeper.custom_search_space``: suggest each ``stage_params`` entry to ``trial`` when the trial's
    pipeline runs its stage. An entry fixed on the command line (a plain ``key=value``) is the sweeper's."""
    from dpq.run.validate import settings_read, stage_setting_used

    wanted = config.get("stage_params") or {}
    todo = {k: v for k, v in wanted.items() if k not in trial.user_attrs and k not in trial.params}
    if not todo:
        return
    order, read = settings_read(pipeline if pipeline is not None else _trial_pipeline(config, trial))
    for key, spec in todo.items():
        if stage_setting_used(order, read, key.split(".", 2)[2]):
            # trial._suggest, as the sweeper samples its own params: any distribution the syntax gives
            trial._suggest(key, distribution(key, spec))
