"""Check a whole run configuration before anything is loaded or trained.

Every problem is a :class:`~dpq.core.errors.ConfigError` naming the key, the bad value and what
is allowed. The run's own keys (task, metrics, models, trainer, devices, cost, checkpointing,
objective) are checked here; each stage checks its own parameters, its place in the order and
its fit to the model (:mod:`dpq.stages`). Then the task's data is loaded and checked
(:func:`dpq.data.load_task`: availability, files, columns, labels) and :func:`validate_data`
checks it against the config. What depends on the task's labels (their count, positive-label
metrics, trained heads, the models' modules: :func:`check_labels`) is checked before the data
when the config states ``task.num_labels``, and again with the data's count and names after it
-- all of it before any model is loaded or trained.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError

from dpq import metrics as task_metrics
from dpq.core import devices
from dpq.core.distributed import trainer_world_size
from dpq.core.errors import ConfigError
from dpq.data.labels import INTEGER_LABELS
from dpq.data.overlap import POLICIES as OVERLAP_POLICIES
from dpq.data.sources import check_hub
from dpq.models import skeleton
from dpq.run.plan import limited_batches
from dpq.stages import ModelCheck, Stage, build_stages
from dpq.stages.prune import warn_idle_ramps

TASK_KINDS = ("text", "features", "image")
# Which model architectures can read each task kind's inputs.
ARCHES_FOR_KIND = {"text": ("hf",), "features": ("mlp",), "image": ("cnn", "mlp")}
LOGGERS = ("wandb", "csv", "tensorboard", "none")
WANDB_MODES = ("auto", "online", "offline")  # conf/logger/wandb.yaml; dpq.loggers resolves auto

log = logging.getLogger(__name__)
# The keys dpq reads at the top of the run config and in its small blocks (tests/test_config_errors.py
# checks them against the composed defaults): anything else, added with '+', would be silently ignored.
# paths stays open: keys of one's own there (a data folder, say) feed interpolations.
RUN_KEYS = {
    "": (
        "checkpoint", "cost", "dry_run", "export", "integrity", "integrity_tolerance", "logger", "model",
        "objective", "paths", "pipeline", "resume", "run_name", "save_model", "seed", "stage_cache",
        "stage_params", "task", "teacher", "trainer", "hydra",
    ),
    "cost": ("batch_size", "device", "latency_process", "repeats", "seq_len", "warmup"),
    "stage_cache": ("dir", "enabled"),
    "objective": ("metrics", "weights"),
    "logger": ("kind", "project", "entity", "group", "tags", "mode", "init_timeout"),  # conf/logger/wandb.yaml
    "pipeline": ("name", "order", "stages"),
}  # fmt: skip
# What dpq.data reads of a task (conf/task/_base.yaml and the kind-specific keys; offline / online are the
# keys before local files existed, which dpq.data.tasks refuses with what to write instead), and what
# dpq.models reads of a model or teacher: a misspelt `+task.max_lenght=32` would otherwise run at 64.
RUN_KEYS["task"] = (
    "batch_size", "embedded", "eval_batch_size", "features_column", "files", "group_by_length", "hub",
    "image_column", "image_shape", "integer_labels", "kind", "label_column", "label_names", "max_length", "metrics",
    "name",
    "normalize", "num_features", "num_labels", "offline", "online", "overlap", "positive_label",
    "primary_metric", "source", "split", "subsample", "text_column", "text_pair_column",
)  # fmt: skip
RUN_KEYS["task.split"] = ("validation", "test", "seed")
RUN_KEYS["model"] = RUN_KEYS["teacher"] = (
    "arch", "base_config", "channels", "config", "dropout", "embedded", "fine_tuned", "hidden", "init",
    "layers", "model_type", "name", "pool", "pretrained", "prune_targets", "quant_targets", "revision",
    "tokenizer",
)  # fmt: skip


# The config's blocks and lists, and whether null stands for "the defaults" there. A block given a scalar on
# the command line (``cost=5``, ``pipeline.stages.prune=0.5`` for ``...prune.final_sparsity=0.5``) is
# refused here, before any check reads inside it, instead of failing with a Python traceback. Blocks read
# key by key are no null: ``cost=null`` failed as the first stage was measured, and ``checkpoint=null``,
# ``export=null``, ``stage_cache=null`` read as "off" but kept each key's built-in default (checkpoints on).
SHAPES: dict[str, tuple[type, bool]] = {
    "task": (dict, False), "model": (dict, False), "teacher": (dict, False), "pipeline": (dict, False),
    "pipeline.stages": (dict, False), "trainer": (dict, True), "paths": (dict, True), "logger": (dict, True),
    "cost": (dict, False), "export": (dict, False), "checkpoint": (dict, False), "stage_cache": (dict, False),
    "objective": (dict, False), "objective.weights": (dict, True), "objective.metrics": (list, True),
    "task.split": (dict, True), "task.embedded": (dict, True), "task.files": (dict, True),
    "task.normalize": (dict, True), "task.label_names": (list, True), "task.metrics": (list, True),
    "model.config": (dict, True), "teacher.config": (dict, True), "stage_params": (dict, True),
}  # fmt: skip
# What a block or list holds where "settings" would not say it, and an example.
SHAPE_EXAMPLES = {
    "objective.weights": (
        "metric: weight pairs",
        "objective.weights={val_accuracy:1.0,effective_gflops:-0.1}",
    ),
    "objective.metrics": ("metric names", "objective.metrics=[val_accuracy,effective_gflops]"),
    "model.config": ("model config fields", "model.config.hidden_size=<value>"),
    "teacher.config": ("model config fields", "teacher.config.hidden_size=<value>"),
    "task.label_names": ("class names in id order", "task.label_names=[negative,positive]"),
    "task.metrics": ("metric names", "task.metrics=[accuracy,f1]"),
    "stage_params": (
        "stage settings and their sweeps",
        "'+stage_params={pipeline.stages.quantize.bits:\"choice(4,8)\"}'",
    ),
    "cost": ("cost settings", "cost.repeats=10"),
    "export": ("export settings", "export.onnx=false to skip the export"),
    "checkpoint": ("checkpoint settings", "checkpoint.enabled=false to turn checkpoints off"),
    "stage_cache": ("stage cache settings", "stage_cache.enabled=false to turn the stage cache off"),
    "objective": ("objective settings", "objective.metrics=[val_accuracy]"),
}


def check_shapes(cfg: dict[str, Any]) -> None:
    """Every block a mapping and every list a list (or null where that means the defaults); each stage
    under ``pipeline.stages`` a mapping of its settings (null, its kind's defaults, only for a stage outside
    ``pipeline.order``: in the order, null reads as "no such stage" and would run the kind's defaults)."""
    # a deleted block (~trainer) was a KeyError, after the data had loaded
    for block in ("task", "model", "teacher", "pipeline", "trainer"):
        if block not in cfg:
            raise ConfigError(block, None, f"is missing: the run needs its {block} block (see conf/{block}/)")
    stages = cfg.get("pipeline", {}).get("stages") if isinstance(cfg.get("pipeline"), dict) else None
    names = list(stages) if isinstance(stages, dict) else []
    order = cfg["pipeline"].get("order") if isinstance(cfg.get("pipeline"), dict) else None
    ordered = set(order) if isinstance(order, (list, tuple)) else set()
    # a stage in the order is no null: it would run with its kind's dataclass defaults, not the preset's
    shapes = {**SHAPES, **{f"pipeline.stages.{n}": (dict, n not in ordered) for n in names}}
    for key, (kind, null_ok) in shapes.items():
        node, found = cfg, True
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                found = False
                break
        if not found or (node is None and null_ok) or isinstance(node, kind):
            continue
        what, example = SHAPE_EXAMPLES.get(key, ("settings", f"{key}.<setting>=<value>"))
        if key.startswith("pipeline.stages.") and key.split(".")[2] in ordered:
            example += f" (to drop the stage, leave it out of pipeline.order {list(order)})"
        allowed = [a for a in RUN_KEYS.get(key, ()) if a not in ("hydra", "offline", "online")]
        raise ConfigError(
            key,
            node,
            ("must be a list of " if kind is list else "must be a block of ")
            + what
            + (f" ({', '.join(allowed)})" if allowed else "")
            + (", or null for the defaults" if null_ok else "")
            + f"; e.g. {example}",
        )


def validate(cfg: dict[str, Any]) -> list[Stage]:
    """Validate the resolved run config; return the pipeline's stages. Checks that need the task's labels
    run here only when the config states ``task.num_labels`` (:func:`validate_data` runs them with the data's)."""
    check_shapes(cfg)
    task = cfg["task"]
    if task.get("kind") not in TASK_KINDS:
        raise ConfigError("task.kind", task.get("kind"), f"must be one of {', '.join(TASK_KINDS)}")
    for key in ("model", "teacher"):
        arch = cfg[key].get("arch")
        want = ARCHES_FOR_KIND[task["kind"]]
        if arch not in want:
            raise ConfigError(
                f"{key}",
                cfg[key].get("name"),
                f"is an arch={arch} model but task '{task['name']}' ({task['kind']}) needs arch={' or '.join(want)}",
            )
    task_metrics.check_names(task)
    stages = build_stages(cfg["pipeline"])
    check_unused_stages(cfg["pipeline"])
    if cfg["model"].get("init") == "from_teacher" and cfg["teacher"].get("arch") != cfg["model"].get("arch"):
        raise ConfigError("model.init", "from_teacher", "needs a teacher of the same architecture")
    devices.check_devices(cfg)
    check_objective(cfg)
    kind = (cfg.get("logger") or {}).get("kind", "none")
    if kind not in LOGGERS:
        raise ConfigError("logger.kind", kind, f"must be one of {', '.join(LOGGERS)}")
    mode = (cfg.get("logger") or {}).get("mode", "auto")
    if kind == "wandb" and mode not in WANDB_MODES:  # else W&B's own error comes after the run has started
        raise ConfigError("logger.mode", mode, f"must be one of {', '.join(WANDB_MODES)}")
    check_logger_values(cfg.get("logger") or {})
    check_known_keys(cfg)
    check_run_keys(cfg)
    check_trainer(cfg.get("trainer") or {})
    check_export(cfg, stages)
    warn_unused_flops_target(cfg, stages)
    warn_obs_checkpoints(cfg, stages)
    warn_idle_ramps(stages)
    warn_unused_feature_settings(stages)
    if task.get("num_labels") is not None:  # else the data says how many (dpq.data.labelled)
        check_labels(cfg, stages)
    return stages


def check_unused_stages(pipeline: dict[str, Any]) -> None:
    """Stages defined but not in ``pipeline.order`` are kept (a preset defines them all, and a multirun
    over ``pipeline=dq,dpq`` sets the prune stage for both), but each must still be a stage: a typo such as
    ``+pipeline.stages.prun.final_sparsity=0.8`` would otherwise add a stage nobody runs and leave the real
    one at its default. Their values are checked as a running stage's are."""
    from difflib import get_close_matches

    from dpq.stages import discover

    kinds = discover()
    order = list(pipeline.get("order") or [])
    for name, raw in (pipeline.get("stages") or {}).items():
        if name in order or raw is None:
            continue
        kind = dict(raw).get("kind", name)
        if not isinstance(kind, str) or kind not in kinds:
            near = get_close_matches(str(name), [*order, *kinds], n=1)
            raise ConfigError(
                f"pipeline.stages.{name}",
                dict(raw),
                f"is not a stage of pipeline.order {order} and names no stage kind"
                + (f" (did you mean pipeline.stages.{near[0]}?)" if near else ""),
                f"stage kinds: {', '.join(kinds)}; a new stage needs its kind (+pipeline.stages.{name}.kind=...)",
            )
        kinds[kind].from_config(name, {**dict(raw), "kind": kind})


def unresolved(cfg: DictConfig, key: str):
    """``key``'s value as written (an interpolation such as ``${task.name}-s${seed}``)."""
    node = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def resolved_config(cfg: DictConfig) -> dict:
    """The composed config as plain data, every interpolation resolved."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except InterpolationKeyError as e:  # a typo in ${...}, or task=_base: the defaults the tasks start from
        why = str(e.msg).splitlines()[0]
        missing = m.group(1) if (m := re.search(r"key '([^']+)' not found", why)) else ""
        group = missing.split(".")[0]
        base = group in ("task", "model", "teacher", "pipeline") and "name" not in (cfg.get(group) or {})
        raise ConfigError(
            str(e.full_key),
            unresolved(cfg, str(e.full_key)),
            f"refers to a key the composed config lacks ({why})"
            + (
                f"; a config group option such as {group}=_base holds the defaults the others start from and is "
                "not one to choose"
                if base
                else ""
            ),
        ) from None
    except InterpolationResolutionError as e:  # ${oc.env:VAR} unset, an unknown resolver, ...
        raise ConfigError(
            str(e.full_key),
            unresolved(cfg, str(e.full_key)),
            f"cannot be resolved: {str(e.msg).splitlines()[0]}",
        ) from None


def settings_read(pipeline: dict[str, Any]) -> tuple[list[str], set[str]]:
    """``(order, read)`` of an unresolved pipeline config: the stages it runs, and the ``stage.key`` settings of
    stages outside the order that a stage in the order reads through an interpolation (the spiral's
    final_sparsity is ``${..prune.final_sparsity}``): setting those has an effect too."""
    order = list(pipeline.get("order") or [])
    read: set[str] = set()

    def scan(v):
        if isinstance(v, dict):
            for x in v.values():
                scan(x)
        elif isinstance(v, list):
            for x in v:
                scan(x)
        elif isinstance(v, str):
            read.update(re.findall(r"\$\{\.*(?:pipeline\.stages\.)?([\w]+\.[\w.]+)\}", v))

    stages = pipeline.get("stages")
    for name in order:
        scan(stages.get(name) if isinstance(stages, dict) else None)  # not a block: validate says so
    return order, read


def stage_setting_used(order: list[str], read: set[str], setting: str) -> bool:
    """Whether ``setting`` (``<stage>.<key>...``, the part after ``pipeline.stages.``) changes a run whose
    pipeline runs ``order`` and reads ``read`` (:func:`settings_read`)."""
    stage = setting.split(".", 1)[0]
    return stage in order or any(
        setting == r or setting.startswith(r + ".") or r.startswith(setting + ".")  # a whole block set
        for r in read
    )


def unused_stage_overrides(pipeline: dict[str, Any], overrides: list[str]) -> list[str]:
    """Command-line overrides of stages that are not in ``pipeline.order``: they change nothing in this run
    (``pipeline=dq_ptq pipeline.stages.quantize.bits=8`` quantizes with the ptq stage's bits). Logged as a
    warning, not an error: a multirun over ``pipeline=dq,dpq`` sets the prune stage for both."""
    order, read = settings_read(pipeline)
    out = []
    for o in overrides:
        m = re.match(r"^[+~]*pipeline\.stages\.(([^.=]+)[^=]*)", o)
        if m and not stage_setting_used(order, read, m.group(1)):
            out.append(
                f"{o.lstrip('+~')} has no effect: stage '{m.group(2)}' is not in pipeline.order {order} "
                f"(pipeline {pipeline.get('name')})"
            )
    for msg in out:
        log.warning(msg)
    return out


def warn_obs_checkpoints(cfg: dict[str, Any], stages: list[Stage]) -> str | None:
    """An OBS prune stage is checkpointed only at its mask updates (the gradients gathered for the next
    one are too large for a checkpoint, see SparsityRamp.pending_state): say so when
    ``checkpoint.every_n_steps`` never or rarely meets them, since a killed run then resumes from further back."""
    ck = cfg.get("checkpoint") or {}
    n = int(ck.get("every_n_steps") or 0)
    if not ck.get("enabled", True) or n <= 0:
        return None
    for s in stages:
        if s.kind == "prune" and getattr(s.cfg, "criterion", None) == "obs" and n % int(s.cfg.update_every):
            msg = (
                f"checkpoint.every_n_steps={n} is not a multiple of pipeline.stages.{s.name}.update_every="
                f"{s.cfg.update_every}: with criterion=obs only steps that are both are checkpointed in that stage"
            )
            log.warning(msg)
            return msg
    return None


def warn_unused_flops_target(cfg: dict[str, Any], stages: list[Stage]) -> str | None:
    """Say so when ``prune.flops_target`` is set but only a spiral prunes: its rounds prune to
    ``spiral.final_sparsity`` (a FLOPs budget cannot be split into per-round fractions), so the run
    lands at another cost than a dpq run of the same config would. Not an error: a study may mean
    it (experiment=far_hn33 sets the spiral's fraction to about the same GFLOPs)."""
    target = ((cfg["pipeline"].get("stages") or {}).get("prune") or {}).get("flops_target")
    spirals = [s for s in stages if s.kind == "spiral"]
    if target is None or not spirals or any(s.kind == "prune" for s in stages):
        return None
    msg = (
        f"pipeline.stages.prune.flops_target={target} is not used: no prune stage runs in "
        f"{cfg['pipeline'].get('name')}; the spiral's rounds prune to "
        f"pipeline.stages.{spirals[0].name}.final_sparsity={spirals[0].cfg.final_sparsity} instead "
        "(set it for a comparable cost; the Pareto report places the run by its measured GFLOPs)"
    )
    log.warning(msg)
    return msg


def check_logger_values(logger: dict[str, Any]) -> None:
    """W&B's names and tags as W&B takes them: tags=baseline became 8 one-letter tags, project=[a, b] a list
    for a name, and init_timeout=abc failed once the run's folder was claimed."""
    for k in ("project", "entity", "group", "name", "job_type", "notes"):
        v = logger.get(k)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"logger.{k}", v, "must be a string or null")
    tags = logger.get("tags")
    if tags is not None and (
        not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags)
    ):
        raise ConfigError("logger.tags", tags, "must be a list of strings, e.g. [baseline, epyc]")
    t = logger.get("init_timeout")
    if t is not None and (
        isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0
    ):
        raise ConfigError("logger.init_timeout", t, "must be a number of seconds > 0")


def check_labels(cfg: dict[str, Any], stages: list[Stage]) -> None:
    """What depends on the task's labels: their count, metrics of a positive label, and the models
    (trained heads must predict the task's labels; every stage against the student's modules)."""
    task = cfg["task"]
    n = task["num_labels"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:  # 2.5 and 'abc' were raw tracebacks
        raise ConfigError("task.num_labels", n, "must be an integer >= 2")
    task_metrics.check_for_labels(
        task, [str(n) for n in task.get("label_names") or range(task["num_labels"])]
    )
    check_models(cfg, stages)


# ---- numbers and switches of the run itself --------------------------------------------------
def _int(key: str, v: Any, low: int, what: str = "") -> None:
    # an integer as typed: 200.0 passed here, then skipped the checks that look for an int (the position
    # tables) or failed where it was used (opset_version=17.0 in the ONNX export, after training)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(key, v, f"must be an integer >= {low}{what}")


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(key, v, "must be true or false")


def check_known_keys(cfg: dict[str, Any]) -> None:
    """No key dpq would not read: ``+sed=43`` or ``+cost.batchsize=8`` must not run at the defaults."""
    from difflib import get_close_matches

    for block, allowed in RUN_KEYS.items():
        node = cfg
        for part in block.split(".") if block else ():  # "task.split": a block inside a block
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        for k in node:
            if k not in allowed:
                near = get_close_matches(str(k), allowed, n=1)
                raise ConfigError(
                    f"{block}.{k}" if block else str(k),
                    node[k],
                    f"is not a {'run' if not block else block} setting"
                    + (f" (did you mean {block + '.' if block else ''}{near[0]}?)" if near else "")
                    + f"; allowed: {', '.join(a for a in allowed if a not in ('hydra', 'offline', 'online'))}",
                )


def check_run_keys(cfg: dict[str, Any]) -> None:
    """Seed, batch sizes, cost conditions, checkpointing and integrity switches."""
    _int("seed", cfg.get("seed"), 0)
    if not isinstance(cfg.get("run_name"), str) or not cfg["run_name"].strip():
        raise ConfigError(
            "run_name", cfg.get("run_name"), "must be a non-empty string (it names the run folder)"
        )
    name = cfg["pipeline"].get("name")  # null became the string 'None' in run names and reports
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            "pipeline.name",
            name,
            "must be a non-empty string (it names the ordering in run names and reports)",
        )
    task = cfg["task"]
    for k in ("batch_size", "eval_batch_size"):
        _int(f"task.{k}", task.get(k), 1)
    if task.get("subsample") is not None:
        _int("task.subsample", task["subsample"], 1, " or null (all examples)")
    if (
        isinstance(task.get("split"), dict) and "seed" in task["split"]
    ):  # numpy's generators take no None or < 0
        _int("task.split.seed", task["split"]["seed"], 0)
    check_hub(task.get("hub"))  # read only when the hub is used: checked here, before any network
    if task.get("overlap", "warn") not in OVERLAP_POLICIES:  # dpq.data.overlap says it again with the data
        raise ConfigError("task.overlap", task["overlap"], f"must be one of {', '.join(OVERLAP_POLICIES)}")
    if (
        "ids" if task.get("integer_labels") is None else task["integer_labels"]  # false is no choice
    ) not in INTEGER_LABELS:  # dpq.data.labels says it again with the data
        raise ConfigError(
            "task.integer_labels", task["integer_labels"], f"must be one of {', '.join(INTEGER_LABELS)}"
        )
    if task.get("kind") == "text":  # null ran at 128 tokens unsaid, unchecked against the position tables
        if task.get("max_length") is None:
            raise ConfigError(
                "task.max_length",
                None,
                "a text task cuts its examples at a number of tokens: set one (the default is 64; a run says "
                "how many training texts fill it)",
            )
        _int("task.max_length", task["max_length"], 1, " (tokens per example)")
    c = cfg.get("cost") or {}
    for k, low in (("batch_size", 1), ("seq_len", 1), ("warmup", 0), ("repeats", 1)):
        if k not in c:  # ~cost.repeats passed every check, then failed after the first stage trained
            raise ConfigError(f"cost.{k}", None, f"is missing: cost needs an integer >= {low} here")
        _int(f"cost.{k}", c[k], low)
    from dpq.latency_process import CHOICES

    if c.get("latency_process", "separate") not in CHOICES:
        raise ConfigError(
            "cost.latency_process",
            c["latency_process"],
            f"must be one of {', '.join(CHOICES)} (where latency is timed: a fresh process, or the run's own)",
        )
    ck = cfg.get("checkpoint") or {}
    for k in ("enabled",):
        if k in ck:
            _bool(f"checkpoint.{k}", ck[k])
    for k, low, what in (
        ("every_n_steps", 0, " (0: only a snapshot after each stage)"),
        ("keep", 1, ""),
        ("keep_snapshots", 0, " (0: keep all)"),
    ):
        if k in ck:
            _int(f"checkpoint.{k}", ck[k], low, what)
    unknown = sorted(set(ck) - {"enabled", "every_n_steps", "keep", "keep_snapshots"})
    if unknown:
        raise ConfigError(
            f"checkpoint.{unknown[0]}",
            ck[unknown[0]],
            "is not a checkpoint setting; allowed: enabled, every_n_steps, keep, keep_snapshots",
        )
    for k in ("integrity", "save_model", "dry_run"):
        if k in cfg:
            _bool(k, cfg[k])
    if "enabled" in (cfg.get("stage_cache") or {}):
        _bool("stage_cache.enabled", cfg["stage_cache"]["enabled"])
    if "group_by_length" in task:
        _bool("task.group_by_length", task["group_by_length"])
    tol = cfg.get("integrity_tolerance", 0.0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:
        raise ConfigError(
            "integrity_tolerance",
            tol,
            "must be a number in [0, 1] (largest accuracy difference allowed "
            "between the run and its reloaded model)",
        )


# ---- the export to ONNX Runtime -------------------------------------------------------------------
def check_export(cfg: dict[str, Any], stages: list[Stage]) -> None:
    """``export`` keys, and quantization that ONNX Runtime's kernels can hold exactly.

    ``per_group`` codes (any bits) and 4-bit (and 2/3-bit) codes are exported as ``MatMulNBits``, whose
    block size is a power of two >= 16: a ``per_group`` quantization must use such a group, or its
    trained codes could not be exported as they are -- found out now rather than after training.
    """
    from dataclasses import fields

    from dpq.export.onnx import OnnxOptions, max_positions

    ex = cfg.get("export") or {}
    allowed = ["onnx", *(f.name for f in fields(OnnxOptions))]
    unknown = sorted(set(ex) - set(allowed))
    if unknown:
        raise ConfigError(
            f"export.{unknown[0]}", ex[unknown[0]], f"is not an export setting; allowed: {', '.join(allowed)}"
        )
    for k in ("onnx", "fuse", "fuse_attention", "compact"):  # compact='no' was a true string
        if k in ex:
            _bool(f"export.{k}", ex[k])
    if "threads" in ex and ex["threads"] != "auto":
        _int("export.threads", ex["threads"], 1, " or auto (the threads PyTorch's latency is timed with)")
    if "opset" in ex:
        _int("export.opset", ex["opset"], 17, " (the fused BERT operators need opset 17 or newer)")
    max_positions(ex.get("max_positions"), cfg["task"], cfg.get("cost") or {})  # auto | int >= 1 | null
    from dpq.export.onnx import NBITS_COMPUTE

    if ex.get("nbits_compute", "float") not in NBITS_COMPUTE:
        raise ConfigError(
            "export.nbits_compute",
            ex["nbits_compute"],
            "must be float (4-bit layers computed on float activations, exact), int8 (MatMulNBits "
            "quantizes activations per block: not exact) or int8_matmul (the codes run by ONNX Runtime's "
            "integer kernels with dynamic uint8 activations: not exact)",
        )
    if not ex.get("onnx") or not cfg.get("save_model", True):  # the runner exports the saved model only
        return
    for stage in stages:
        opts = stage.cfg
        if not stage.quantizes:
            continue
        gran = getattr(opts, "granularity", None)
        act_bits, act_range = getattr(opts, "act_bits", None), getattr(opts, "act_range", None)
        if act_bits and act_range == "observed":
            log.warning(
                "%s.act_range=observed: the ONNX export quantizes activations per batch (dynamic), not with the "
                "trained static range; onnx_accuracy and onnx_agreement measure the difference",
                stage.key,
            )
        elif act_bits and gran == "per_group":
            log.warning(
                "%s: per_group weights with act_bits=%s export as MatMulNBits on float activations (the "
                "activation quantization is not in the ONNX model); onnx_agreement measures the difference",
                stage.key,
                act_bits,
            )
        elif (
            not act_bits
            and gran != "per_group"
            and getattr(opts, "bits", 4) > 4
            and getattr(opts, "backend", "packed") == "packed"
        ):
            # Why not MatMulNBits bits=8 here: exact, but 0.60x / 0.94x the speed of ONNX Runtime fp32 at
            # batch 1 / 32 on the default student (bench/weight_only_export.py, BENCHMARKS 2026-12-06).
            log.warning(
                "%s: %s-bit %s weight-only codes export to ONNX Runtime's integer kernels, which round the "
                "activations to uint8 on the fly (the model computes on float activations); onnx_agreement "
                "measures the difference. granularity=per_group exports them exactly (MatMulNBits bits=8), "
                "slower than float",
                stage.key,
                opts.bits,
                gran,
            )
        if gran != "per_group":
            continue
        if ex.get("nbits_compute") == "int8_matmul":  # a group as wide as a layer's row is one per channel
            log.warning(
                "export.nbits_compute=int8_matmul runs codes with one scale per output channel on ONNX Runtime's "
                "integer kernels; %s.granularity=per_group layers with more than one group (group_size=%s) "
                "stay MatMulNBits on float activations. granularity=per_channel runs them all there",
                stage.key,
                opts.group_size,
            )
        g = opts.group_size
        if g < 16 or g & (g - 1):
            raise ConfigError(
                f"{stage.key}.group_size",
                g,
                f"{opts.bits}-bit codes export to ONNX Runtime's MatMulNBits, "
                "whose blocks are powers of two >= 16 (16, 32, 64, 128, ...); choose one, or set "
                "export.onnx=false",
            )


# ---- the Lightning Trainer ---------------------------------------------------------------------
def check_trainer(trainer: dict[str, Any]) -> None:
    """Build the ``trainer`` config once (no fit), so a bad argument fails now with Lightning's own reason."""
    accel = trainer.get("accelerator", "auto")
    if accel not in devices.ACCELERATORS:
        raise ConfigError("trainer.accelerator", accel, f"must be one of {', '.join(devices.ACCELERATORS)}")
    for k in ("max_epochs", "max_steps"):
        if k in trainer:
            raise ConfigError(
                f"trainer.{k}",
                trainer[k],
                "training length is set per stage (pipeline.stages.<name>.epochs, "
                "pipeline.stages.<name>.max_steps); each stage's Trainer would override this",
            )
    for k in ("callbacks", "plugins"):  # replaced by the stage's own when each Trainer is built: never used
        if trainer.get(k):
            raise ConfigError(
                f"trainer.{k}",
                trainer[k],
                "is built by dpq for each stage (its stage callbacks, progress bar, checkpoints), which would "
                "replace these without a word; a stage's own behaviour is set in pipeline.stages.<name>",
            )
    check_trainer_numbers(trainer)
    if trainer.get("strategy") is not None or "_target_" not in trainer:
        check_trainer_arguments(trainer)
        if "_target_" not in trainer:
            return
        # Distributed launchers set up process groups when built: the other values (precision, clipping,
        # limits; ddp_cpu with 16-mixed trained at bf16-mixed unsaid) are checked on one process's Trainer
        trainer = {**trainer, "strategy": "auto", "devices": 1, "num_nodes": 1}
    import hydra
    import lightning as L

    kw = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[],
    )
    try:
        built = hydra.utils.instantiate(trainer, **kw)
    except Exception as e:  # Lightning's message names the argument and what it accepts
        err = e.__cause__ or e
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        m = re.search(r"unexpected keyword argument '(\w+)'", msg)
        if m:
            raise ConfigError(
                f"trainer.{m.group(1)}",
                trainer.get(m.group(1)),
                "is not a lightning.Trainer argument (see `python -m dpq.train --cfg job` for the trainer group)",
            ) from None
        hit = next((k for k in trainer if k != "_target_" and re.search(rf"\b{k}\b", msg)), None)
        key = f"trainer.{hit}" if hit else "trainer"
        raise ConfigError(
            key, trainer.get(hit) if hit else {k: v for k, v in trainer.items() if k != "_target_"}, msg
        ) from None
    if not isinstance(built, L.Trainer):
        raise ConfigError("trainer._target_", trainer.get("_target_"), "must build a lightning Trainer")
    check_precision(trainer.get("precision"), built)


def check_trainer_numbers(trainer: dict[str, Any]) -> None:
    """Values a Lightning Trainer accepts when built and mishandles later: ``accumulate_grad_batches=0``
    failed at the first step (ZeroDivisionError); a negative ``gradient_clip_val`` clipped nothing, silently
    (Lightning skips clipping at values <= 0)."""
    acc = trainer.get("accumulate_grad_batches")
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, int) or acc < 1):
        raise ConfigError(
            "trainer.accumulate_grad_batches",
            acc,
            "must be an integer >= 1 (one optimizer step per that many batches)",
        )
    det = trainer.get("deterministic")  # Lightning takes any other string as "not deterministic"
    if det is not None and not isinstance(det, bool) and det != "warn":
        raise ConfigError("trainer.deterministic", det, "must be true, false, warn or null")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0
    ):
        raise ConfigError(
            "trainer.gradient_clip_val",
            clip,
            "must be a number >= 0 (0 or null: no clipping; a negative one clips nothing)",
        )


def check_precision(asked: Any, built) -> None:
    """The precision a run records is the one it trains at. Lightning replaces ``16-mixed`` on CPU with
    ``bf16-mixed`` (a warning at every stage), while the run's config, results.json and stage-cache key
    would keep ``16-mixed``."""
    import warnings

    from lightning.fabric.connector import _convert_precision_to_unified_args

    if asked is None:
        return
    with warnings.catch_warnings():  # precision=16 "is supported for historical reasons": said by Lightning
        warnings.simplefilter("ignore")
        try:
            unified = _convert_precision_to_unified_args(asked)
        except Exception:  # Lightning refused it when the trainer was built
            return
    if built.precision != unified:
        raise ConfigError(
            "trainer.precision",
            asked,
            f"Lightning would train at {built.precision} instead on this accelerator (fp16 AMP needs CUDA); set "
            f"trainer.precision={built.precision}, so that the run records the precision it trains at",
        )


def check_trainer_arguments(trainer: dict[str, Any]) -> None:
    """A trainer that is not built up front (a distributed strategy): at least every key must be a
    ``lightning.Trainer`` argument, as the built one's would be."""
    import inspect

    import lightning as L

    allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for k in trainer:
        if k != "_target_" and k not in allowed:
            raise ConfigError(
                f"trainer.{k}",
                trainer[k],
                "is not a lightning.Trainer argument (see `python -m dpq.train --cfg job` for the trainer group)",
            )


# ---- models: every stage against the model it will see ----------------------------------------------
def check_models(cfg: dict[str, Any], stages: list[Stage]) -> None:
    """Before anything trains, each stage checks itself against the task, the devices and the student's
    modules (a weightless skeleton: its selectors, targets, per-layer overrides, N:M groups)."""
    task, model, teacher_spec = cfg["task"], cfg["model"], cfg["teacher"]
    from_teacher = model.get("init") == "from_teacher"
    # A pretrained Hugging Face student of its own reads the data the teacher's tokenizer wrote.
    own_student = model.get("arch") == teacher_spec.get("arch") == "hf" and model.get("init") == "pretrained"
    student = teacher = None
    # A fine-tuned head must fit the task's labels; config overrides must be the model's settings.
    # (text tasks: its vocabulary is the one the data is tokenized with, and its positions bound the inputs)
    text = task.get("kind") == "text"
    if from_teacher or teacher_spec.get("fine_tuned") or own_student or teacher_spec.get("config") or text:
        teacher = skeleton(teacher_spec, task, "teacher")
    tokens = teacher_tokens(teacher_spec, teacher) if text else None
    if not all(s.trains_teacher for s in stages):
        student = skeleton(model, task, "model", teacher=teacher if from_teacher else None)
        if text:
            check_student_vocabulary(model, student, tokens)
        if own_student and student is not None and teacher is not None:
            # (a larger vocabulary whose first ids are the teacher's is fine: vocabulary_mismatch says which)
            if (differ := vocabulary_mismatch(model, teacher_spec)) is not None:
                raise ConfigError(  # other tokens at the same ids (cased vs uncased, another language): noise
                    "model.pretrained",
                    model.get("pretrained"),
                    f"has a vocabulary whose ids mean other tokens ({differ}); dpq tokenizes the "
                    "data once, with the teacher's tokenizer, so the student must share it",
                )
    check = ModelCheck(
        task=task,
        model_spec=cfg["model"],
        student=student,
        model_device=devices.trainer_device(cfg.get("trainer") or {}),
        latency_device=devices.latency_device(cfg.get("cost") or {}),
        tokens=tokens,
    )
    for stage in stages:
        stage.check_model(check)
    if text:
        check_positions(cfg, {"teacher": teacher, "model": student})
    check_feature_kd(cfg, stages, student, teacher)


def teacher_tokens(spec: dict[str, Any], teacher) -> int | None:
    """How many token ids the data can hold: the length of the teacher's tokenizer, which tokenizes it (an
    embedding table may have more rows: ModernBERT 50368 for 50280 tokens), else its ``vocab_size``."""
    from dpq.models.hf import load_tokenizer, vocab_size

    try:
        return len(load_tokenizer(spec, "teacher"))
    except Exception:  # noqa: BLE001 - not loadable here (offline, no tokenizer saved): the config's count
        return vocab_size(teacher)


def check_student_vocabulary(spec: dict[str, Any], student, theirs: int | None) -> None:
    """dpq tokenizes the data once, with the teacher's tokenizer: a student with fewer embedding rows than
    its ``theirs`` token ids would fail with an IndexError at its first batch, after the teacher trained."""
    from dpq.models.hf import vocab_size

    ours = vocab_size(student)
    if ours is None or theirs is None or ours >= theirs:
        return
    pretrained = spec.get("init", "pretrained") == "pretrained"
    raise ConfigError(
        "model.pretrained" if pretrained else "model.config.vocab_size",
        spec.get("pretrained") if pretrained else ours,
        f"gives the student a {ours}-token vocabulary and the teacher's has {theirs}; dpq tokenizes the data "
        "once, with the teacher's tokenizer, so the student needs at least as many (the same tokens)",
    )


def vocabulary_mismatch(model: dict[str, Any], teacher: dict[str, Any]) -> str | None:
    """How the student's own tokenizer maps tokens differently from the teacher's (``"12 of 30522 tokens
    differ"``); None when they agree or either cannot be loaded here (a folder without a tokenizer, offline)."""
    from dpq.models.hf import load_tokenizer

    try:
        mine, theirs = (
            load_tokenizer(model, "model").get_vocab(),
            load_tokenizer(teacher, "teacher").get_vocab(),
        )
    except Exception:  # noqa: BLE001 - the student's tokenizer is optional: nothing to compare
        return None
    if mine == theirs:
        return None
    differ = [token for token, i in theirs.items() if mine.get(token) != i]
    if not differ:  # every id the teacher's tokenizer writes means the same token to the student
        return None
    return f"{len(differ)} of {len(theirs)} tokens differ, e.g. {differ[0]!r}"


def check_positions(cfg: dict[str, Any], models: dict[str, Any]) -> None:
    """A text input no longer than each model's position table: the training batches (``task.max_length``)
    and the inputs cost is measured with (``cost.seq_len``, after every stage). A longer one fails inside
    the model's embeddings, after the stages before it trained."""
    longest = {
        "task.max_length": cfg["task"].get("max_length"),
        "cost.seq_len": (cfg.get("cost") or {}).get("seq_len"),
    }
    for key, model in models.items():
        n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if not isinstance(n, int):
            continue  # not known here (offline), or no learned position table
        for module in model.modules():  # RoBERTa-style: positions count from padding_idx + 1
            pad = getattr(module, "padding_idx", None)
            if hasattr(module, "position_embeddings") and isinstance(pad, int):
                n -= pad + 1
                break
        for k, v in longest.items():
            if isinstance(v, int) and not isinstance(v, bool) and v > n:
                raise ConfigError(
                    k,
                    v,
                    f"is longer than the {n} positions of the {key} ({cfg[key].get('name')}: "
                    f"max_position_embeddings={model.config.max_position_embeddings}); at most {n}",
                )


def _kd_entries(stages: list[Stage]) -> list[tuple]:
    """(stage, key of its settings, settings, whose model teaches: the pipeline's teacher or a spiral mode)
    for every stage that distils, a spiral's rounds as they will run."""
    from dpq.stages.base import KDStageConfig
    from dpq.stages.spiral import SpiralStage

    entries = []
    for s in stages:
        if isinstance(s.cfg, KDStageConfig):
            entries.append((s, s.key, s.cfg, "pipeline"))
        elif isinstance(s, SpiralStage):
            for sub in s.round_stages(0, s.cfg.initial_sparsity, s.cfg.targets()[0]):
                entries.append((s, f"{s.key}.{sub.kind}", sub.cfg, s.cfg.teacher_mode))
    return entries


def warn_unused_feature_settings(stages: list[Stage]) -> list[str]:
    """``layer_map`` / ``hidden_kind`` set where every feature term's weight is 0: plain logit KD runs."""
    out = []
    for _, key, c, _ in _kd_entries(stages):
        unused = {"layer_map": c.layer_map, "hidden_kind": c.hidden_kind if c.hidden_kind != "mse" else None}
        unused = {k: v for k, v in unused.items() if v is not None}
        if unused and not c.feature_kd().active:
            out.append(
                f"{', '.join(f'{key}.{k}={v}' for k, v in unused.items())} has no effect: {key}.hidden, "
                ".attention and .relation are all 0 (logit KD only)"
            )
    for msg in out:
        log.warning(msg)
    return out


def check_feature_kd(cfg: dict[str, Any], stages: list[Stage], student, teacher) -> None:
    """Hidden/attention/relation distillation (a stage's ``hidden``, ``attention``, ``relation``; a spiral's
    rounds too) needs one teacher model, and its ``layer_map`` one teacher layer per student layer (after any
    ``drop_layers``): said here, not when the stage sets up after the teacher trained."""
    from dpq.distill.features import resolve_layer_map

    entries = _kd_entries(stages)
    kd = [e for e in entries if e[2].feature_kd().active]
    if not kd:
        return
    said = {k: getattr(kd[0][2], k) for k in ("hidden", "attention", "relation")}
    if (both := next((e for e in kd if e[3] == "both"), None)) is not None:
        raise ConfigError(
            f"{both[1]}.hidden",
            {k: getattr(both[2], k) for k in ("hidden", "attention", "relation")},
            f"hidden/attention/relation distillation needs a single teacher model, and {both[0].key}."
            "teacher_mode=both teaches with an ensemble (previous round and original); use previous or original",
        )
    t_stage = next((s for s in stages if s.trains_teacher), None)
    pipeline_kd = [e for e in kd if e[3] != "previous"]
    if pipeline_kd and t_stage is not None and getattr(t_stage.cfg, "ensemble", None):
        raise ConfigError(
            f"{pipeline_kd[0][1]}.hidden",
            said,
            f"hidden/attention/relation distillation needs a single teacher model ({t_stage.key}.ensemble is set)",
        )
    if teacher is None and pipeline_kd:
        teacher = skeleton(cfg["teacher"], cfg["task"], "teacher")
    n_t = getattr(getattr(teacher, "config", None), "num_hidden_layers", None)
    n_s = getattr(getattr(student, "config", None), "num_hidden_layers", None)
    if n_s is None or (n_t is None and pipeline_kd):
        return  # not known here (offline, or not a Hugging Face encoder: check_model says so)
    for s in stages:
        d = getattr(s.cfg, "drop_layers", None) if s.kind == "prune" else None
        for _, key, c, who in (e for e in kd if e[0] is s):
            if c.layer_map is None or (s.kind == "prune" and d is not None):
                continue  # a prune stage's own map after its drop is checked by that stage (check_depth)
            try:  # a spiral's "previous" teacher is the student as it entered the round: its depth
                resolve_layer_map(c.layer_map, n_s, n_s if who == "previous" else n_t)
            except ValueError as e:  # its message starts "layer_map=[...]: ", which the error says already
                why = str(e).split(": ", 1)[-1] if str(e).startswith("layer_map=") else str(e)
                raise ConfigError(f"{key}.layer_map", c.layer_map, why) from None
        if d is not None:
            n_s -= d if isinstance(d, int) else len(d)


# ---- the objective a sweep optimises -------------------------------------------------------------
# Quality metrics of results.json's ``final``, as measured on the test split; each also exists as
# ``val_<name>`` on the validation split. Only the ``val_`` form may be optimised. Besides these,
# the task's own metrics (``task.metrics``: f1, mcc, ...) and the exported model's quality in ONNX
# Runtime (``onnx_accuracy`` / ``onnx_val_accuracy``, ``onnx_agreement`` / ``onnx_val_agreement``).
QUALITY_METRICS = ("accuracy", "loss")
ONNX_QUALITY = ("onnx_accuracy", "onnx_agreement")
# The exported model's cost as ONNX Runtime measures it (dpq.export.evaluate): split-independent.
ONNX_COSTS = ("onnx_latency_ms_median", "onnx_latency_ms_p90", "onnx_size_bytes")
SELECTION_RULE = (
    "models are selected on the validation split only (the test split is reported, never optimised)"
)


def cost_metrics() -> list[str]:
    """Cost figures a sweep may optimise: they do not depend on the split."""
    from dpq.cost import UNITS

    return sorted({*(k for k in UNITS if not k.endswith(("_convention", "_method"))), *ONNX_COSTS})


def quality_metrics(task: dict[str, Any] | None = None) -> list[str]:
    """Test-split names of the quality metrics a run's final record has: accuracy and loss, the
    task's metrics (every registered one when ``task`` is None: a sweep file does not name its
    task), the exported model's."""
    names = task_metrics.task_metrics(task) if task is not None else list(task_metrics.METRICS)
    return list(dict.fromkeys((*QUALITY_METRICS, *names, *ONNX_QUALITY)))


def _val(name: str) -> str:
    # onnx_accuracy -> onnx_val_accuracy (dpq.export.evaluate's spelling); accuracy -> val_accuracy
    return f"onnx_val_{name[5:]}" if name.startswith("onnx_") else f"val_{name}"


def objective_sense(name: str) -> str | None:
    """Which way a sweep objective is better: ``maximize`` (validation quality, the weighted ``objective``)
    or ``minimize`` (losses, costs); None where either can be meant (``sparsity``) or the name is unknown."""
    if name == "objective":
        return "maximize"
    if name == "sparsity":
        return None
    if name in cost_metrics():
        return "minimize"
    base = name.removeprefix("onnx_val_").removeprefix("val_")
    if base == "loss":
        return "minimize"
    if base in ("accuracy", "agreement"):
        return "maximize"
    metric = task_metrics.METRICS.get(base)
    return None if metric is None else ("maximize" if metric.sense == "max" else "minimize")


def objective_problem(name: str, spelled: str = "{}", task: dict[str, Any] | None = None) -> str | None:
    """Why ``name`` cannot be a sweep objective (a test-split metric, or not a final metric), else
    None. ``spelled`` formats the names suggested instead (``"final/{}"`` for a W&B sweep)."""
    costs, quality = cost_metrics(), quality_metrics(task)
    if name in costs or name in {_val(q) for q in quality}:
        return None
    if name in quality:
        return f"is measured on the test split; {SELECTION_RULE}: use {spelled.format(_val(name))!r}"
    allowed = [spelled.format(m) for m in (*(_val(q) for q in quality), *costs)]
    return f"must be a validation or cost metric of the final record: {', '.join(allowed)}"


def check_objective(cfg: dict[str, Any]) -> None:
    """Sweep objectives (``objective.metrics``, returned to Hydra sweepers, and the keys of
    ``objective.weights``, whose sum is ``final.objective``) name validation or cost metrics of
    results.json's ``final``: a test metric would tune on the test split, and a typo would fail
    only after training."""
    obj = cfg.get("objective") or {}
    weights = obj.get("weights") or {}
    exported = bool((cfg.get("export") or {}).get("onnx")) and bool(cfg.get("save_model", True))
    for m in obj.get("metrics") or []:
        if not isinstance(m, str):  # a list or block here was a raw TypeError (unhashable)
            raise ConfigError(
                "objective.metrics", m, "must be metric names, e.g. [val_accuracy, effective_gflops]"
            )
        if m == "objective":  # the weighted sum, checked through its weights below
            if not weights:
                raise ConfigError(
                    "objective.metrics",
                    m,
                    "is the weighted sum of objective.weights, which names no metric: set "
                    "objective.weights.<metric>=<weight> or return a metric itself",
                )
            continue
        if (why := objective_problem(m, task=cfg["task"])) is not None:
            raise ConfigError("objective.metrics", m, why)
        if m.startswith("onnx_") and not exported:
            raise ConfigError(
                "objective.metrics", m, "is measured on the ONNX export: needs export.onnx=true"
            )
    for k, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"objective.weights.{k}", w, "must be a finite number (the metric's weight)")
        if (why := objective_problem(k, task=cfg["task"])) is not None:
            raise ConfigError(f"objective.weights.{k}", w, f"{k!r} {why}")
        if k.startswith("onnx_") and not exported:
            raise ConfigError(
                f"objective.weights.{k}", w, f"{k!r} is measured on the ONNX export: needs export.onnx=true"
            )


def check_wandb_sweep(sweep: dict[str, Any], source: str) -> None:
    """A W&B sweep file (``sweeps/*.yaml``) optimises a validation or cost metric: its
    ``metric.name`` is ``final/<metric>`` and every swept ``objective.weights.<metric>`` obeys
    :func:`objective_problem`."""
    name = str((sweep.get("metric") or {}).get("name", ""))
    metric = name.removeprefix("final/")
    if not name.startswith("final/"):
        raise ConfigError(f"{source}: metric.name", name, "must be final/<metric of results.json's final>")
    if metric != "objective" and (why := objective_problem(metric, "final/{}")):
        raise ConfigError(f"{source}: metric.name", name, why)
    goal, sense = (sweep.get("metric") or {}).get("goal"), objective_sense(metric)
    if goal is not None and sense is not None and str(goal).lower() != sense:
        raise ConfigError(
            f"{source}: metric.goal",
            goal,
            f"{name} is better {'higher' if sense == 'maximize' else 'lower'}: {sense} it",
        )
    for key, spec in (sweep.get("parameters") or {}).items():
        if key.startswith("objective.weights.") and (why := objective_problem(key.split(".", 2)[2])):
            raise ConfigError(f"{source}: parameters.{key}", spec, f"{key.split('.', 2)[2]!r} {why}")


def validate_data(cfg: dict[str, Any], splits, stages: list[Stage] | None = None) -> None:
    """Columns and shapes the task config promises are what the loaded data has; with ``stages``, the
    checks that need the labels, on the data's (``cfg``'s task labelled by :func:`dpq.data.labelled`)."""
    task = cfg["task"]
    need = {"text": ["text", "label"], "features": ["features", "label"]}.get(splits.kind, ["label"])
    for split in ("train", "validation", "test"):
        ds = getattr(splits, split)
        missing = [c for c in need if c not in ds.column_names]
        if missing:
            raise ConfigError(
                "task",
                task["name"],
                f"its {split} split lacks the column(s) {missing}; it has {ds.column_names}",
            )
    if splits.kind == "features" and len(splits.train):
        width = len(splits.train[0]["features"])
        if int(task.get("num_features") or 0) != width:
            raise ConfigError(
                "task.num_features", task.get("num_features"), f"the data has {width} features per example"
            )
        for split in ("train", "validation", "test"):  # a row of another width fails in the batch collate
            if (row := _first_of_other_width(getattr(splits, split), width)) is not None:
                raise ConfigError(
                    "task",
                    task["name"],
                    f"row {row[0] + 1} of its {split} split has {row[1]} features, the others {width}: every "
                    "example needs the same number",
                )
    check_batch_limits(cfg, splits)
    if stages is not None:
        check_labels(cfg, stages)
        warn_one_label_splits(task, splits)


def _first_of_other_width(ds, width: int) -> tuple[int, int] | None:
    """(row, its width) of the first ``features`` row whose length is not ``width``, read through Arrow."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.with_format("arrow")["features"]
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        return None  # fixed-size lists: one width by type
    lengths = pc.fill_null(col.value_lengths(), 0).to_numpy(zero_copy_only=False)  # a null row: none
    bad = np.flatnonzero(lengths != width)
    return (int(bad[0]), int(lengths[bad[0]])) if len(bad) else None


# trainer key -> the split it limits and the task's batch size for it
LIMITED_SPLITS = {
    "limit_train_batches": ("train", "batch_size"),
    "limit_val_batches": ("validation", "eval_batch_size"),
    "limit_test_batches": ("test", "eval_batch_size"),
}


def check_batch_limits(cfg: dict[str, Any], splits) -> None:
    """A ``trainer.limit_*_batches`` that leaves no batch of its split fails now, naming the key. Lightning
    took 0 as "skip": with no training batch the run finished with every stage untrained and its prune
    ramps never stepped (sparsity 0), and with no validation or test batch it failed with an IndexError
    after the first stage's training. A fraction under one batch failed there too, in Lightning's words."""
    trainer = cfg["trainer"]
    world = trainer_world_size(trainer)
    for key, (split, size_key) in LIMITED_SPLITS.items():
        limit, n = trainer.get(key), len(getattr(splits, split))
        if limit is None or isinstance(limit, bool) or not n:  # an empty split is the data checks' error
            continue
        batch = int(cfg["task"][size_key])
        full = limited_batches(n, batch, world, None)
        if limited_batches(n, batch, world, limit) > 0:
            continue
        least = 1 if isinstance(limit, int) else math.ceil(1e4 / full) / 1e4  # the fraction that keeps one
        why = (
            "every stage trains on it (with none, each would end untrained)"
            if split == "train"
            else "every stage is measured on it"
        )
        raise ConfigError(
            f"trainer.{key}",
            limit,
            f"leaves no {'training' if split == 'train' else split} batch (the split has {full} per epoch"
            f"{' in each of its processes' if world > 1 else ''}: {n} examples, task.{size_key}={batch}); "
            f"{why}: use at least {least}, or 1.0 for all",
        )


def check_folders(cfg: dict[str, Any]) -> None:
    """The folders a run writes (its own, the caches) can be made and written, or a config error names the key
    before anything loads; a read-only shared cache otherwise failed with a traceback as the first stage began."""
    folders = [("paths.output_dir", cfg["paths"]["output_dir"], "")]
    cache = cfg["paths"].get("cache_dir")
    folders.append(("paths.cache_dir", cache, " (default $DPQ_CACHE_DIR, else ~/.cache/dpq)"))
    sc = cfg.get("stage_cache") or {}
    if sc.get("enabled"):
        folders.append(("stage_cache.dir", sc.get("dir"), " (or stage_cache.enabled=false)"))
    for key, folder, hint in folders:
        if not isinstance(folder, str) or not folder.strip():  # null made ./None, "" the working folder
            raise ConfigError(key, folder, f"must be a folder path{hint}")
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise ConfigError(
                key, str(folder), f"cannot be made a writable folder ({e.strerror}); choose another{hint}"
            ) from None


def warn_one_label_splits(task: dict[str, Any], splits) -> None:
    """A validation or test split whose examples all carry one label scores nothing but how often the model
    predicts it: accuracy rewards a constant guess, and the metrics that compare classes are undefined there
    (torchmetrics returns 0, or -1 for mcc, with a UserWarning per evaluation). Said once, before training."""
    import warnings

    names = [str(n) for n in task.get("label_names") or range(int(task["num_labels"]))]
    comparing = [m for m in task_metrics.task_metrics(task) if m not in ("accuracy", "loss")]
    for split in ("validation", "test"):
        ds = getattr(splits, split)
        if len(ds) == 0 or len(labels := set(ds["label"])) != 1:
            continue
        only = next(iter(labels))
        label = names[only] if isinstance(only, int) and 0 <= only < len(names) else only
        log.warning(
            "task %s: every one of the %d %s examples has the label %r, so its accuracy is how often the "
            "model predicts that label%s%s",
            task["name"],
            len(ds),
            split,
            label,
            f", and {', '.join(comparing)} are undefined on it" if comparing else "",
            " (model selection and sweeps read validation)" if split == "validation" else "",
        )
        # said here once; torchmetrics would repeat it at every evaluation
        warnings.filterwarnings("ignore", message=r"No (positive|negative) samples in targets")
