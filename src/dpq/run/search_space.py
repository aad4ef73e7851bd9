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
from difflib import get_close_matches
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
    blocks, complete = _stage_blocks(config)
    for key in wanted:
        stage, setting = key.split(".", 3)[2], key.split(".", 3)[3]
        if stage not in blocks and not complete:
            continue  # a pipeline of the study could not be composed here: its first trial says what it lacks
        if stage not in blocks:
            near = get_close_matches(stage, list(blocks), n=1)
            raise ConfigError(
                f"stage_params.{key}",
                wanted[key],
                f"names stage {stage!r}, which no pipeline of this study has"
                + (f" (did you mean pipeline.stages.{near[0]}.{setting}?)" if near else "")
                + f"; stages: {', '.join(sorted(blocks))} (else it would never be sampled)",
            )
        node: Any = blocks[stage]
        for part in setting.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING:
            have = sorted(k for k in blocks[stage] if k != "kind")
            near = get_close_matches(setting, have, n=1)
            raise ConfigError(
                f"stage_params.{key}",
                wanted[key],
                f"stage {stage!r} has no setting {setting!r}"
                + (f" (did you mean pipeline.stages.{stage}.{near[0]}?)" if near else "")
                + f"; its settings: {', '.join(have)} (a setting its YAML lacks is added with "
                f"+pipeline.stages.{stage}.{setting}=<value> on the command line)",
            )


_MISSING = object()


def _stage_blocks(config: DictConfig) -> tuple[dict[str, dict], bool]:
    """Stage name -> its settings (unresolved), over the pipelines the study can run: the config's own and
    each one ``hydra.sweeper.params.pipeline`` chooses from (composed as a trial would be); and whether every
    one of those pipelines could be composed."""
    blocks = dict(OmegaConf.to_container(config.pipeline.stages, resolve=False))
    spec = (config.hydra.sweeper.get("params") or {}).get("pipeline")
    if spec is None:
        return blocks, True
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    complete = True
    try:
        sweep = OverridesParser.create().parse_override(f"pipeline={spec}").value()
        names = [str(v) for v in getattr(sweep, "list", None) or [sweep]]
    except Exception:  # noqa: BLE001 - a syntax the sweeper itself reports
        return blocks, False
    for name in names:
        try:
            cfg = compose(config_name=config.hydra.job.config_name, overrides=[f"pipeline={name}"])
        except Exception:  # noqa: BLE001 - an unknown pipeline, or no Hydra to compose with here
            complete = False
            continue
        for stage, block in OmegaConf.to_container(cfg.pipeline.stages, resolve=False).items():
            blocks.setdefault(stage, block)
    return blocks, complete


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
