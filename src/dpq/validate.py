"""Check a whole run configuration before anything is loaded or trained.

Every problem is a :class:`~dpq.errors.ConfigError` naming the key, the bad value and what is
allowed. Data availability (an online-only task without network) is checked right after,
when the task is loaded -- still before any training.
"""

from __future__ import annotations

from typing import Any

from dpq.errors import ConfigError
from dpq.stages import STAGES, Stage

TASK_KINDS = ("text", "features")
LOGGERS = ("wandb", "csv", "tensorboard", "none")


def build_stages(pipeline: dict[str, Any]) -> list[Stage]:
    """Parse ``pipeline.order`` / ``pipeline.stages`` into stage objects, checking order rules."""
    order, defined = pipeline.get("order"), pipeline.get("stages") or {}
    if not order or not isinstance(order, (list, tuple)):
        raise ConfigError("pipeline.order", order, "must be a non-empty list of stage names")
    if len(set(order)) != len(order):
        dup = next(n for n in order if order.count(n) > 1)
        raise ConfigError("pipeline.order", list(order), f"stage '{dup}' appears twice; define a second stage under another name")
    stages: list[Stage] = []
    for i, name in enumerate(order):
        if name not in defined:
            raise ConfigError(f"pipeline.order[{i}]", name,
                              f"is not a stage of this pipeline; defined stages: {', '.join(defined)}",
                              f"stage kinds: {', '.join(STAGES)}")
        raw = dict(defined[name] or {})
        kind = raw.get("kind", name)
        if kind not in STAGES:
            raise ConfigError(f"pipeline.stages.{name}.kind", kind, f"unknown stage kind; allowed: {', '.join(STAGES)}")
        raw["kind"] = kind
        stages.append(STAGES[kind].from_config(name, raw))
    for i, stage in enumerate(stages):
        if i and stages[i - 1].kind == "quantize":
            raise ConfigError("pipeline.order", list(order),
                              f"stage '{stage.name}' ({stage.kind}) comes after quantize '{stages[i - 1].name}'; "
                              "quantization must be the last stage")
        stage.check_order(stages[:i])
    return stages


def validate(cfg: dict[str, Any]) -> list[Stage]:
    """Validate the resolved run config; return the pipeline's stages."""
    task = cfg["task"]
    if task.get("kind") not in TASK_KINDS:
        raise ConfigError("task.kind", task.get("kind"), f"must be one of {', '.join(TASK_KINDS)}")
    for key in ("model", "teacher"):
        arch = cfg[key].get("arch")
        want = "hf" if task["kind"] == "text" else "mlp"
        if arch != want:
            raise ConfigError(f"{key}", cfg[key].get("name"),
                              f"is a {arch} model but task '{task['name']}' ({task['kind']}) needs an {want} model")
    if int(task.get("num_labels", 0)) < 2:
        raise ConfigError("task.num_labels", task.get("num_labels"), "must be >= 2")
    stages = build_stages(cfg["pipeline"])
    for stage in stages:
        feats = stage.cfg.feature_kd() if hasattr(stage.cfg, "feature_kd") else None
        if feats is not None and feats.active and task["kind"] != "text":
            raise ConfigError(f"{stage.key}.hidden", feats.hidden, "hidden/attention/relation distillation needs "
                              f"Hugging Face encoders (a text task); task '{task['name']}' is {task['kind']}")
    if cfg["model"].get("init") == "from_teacher" and cfg["teacher"].get("arch") != cfg["model"].get("arch"):
        raise ConfigError("model.init", "from_teacher", "needs a teacher of the same architecture")
    accel = cfg["trainer"].get("accelerator")
    if accel in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator", accel, "no CUDA GPU is visible on this machine; use trainer=cpu")
    device = cfg.get("cost", {}).get("device", "cpu")
    if device not in ("cpu", "cuda", "auto"):
        raise ConfigError("cost.device", device, "must be one of cpu, cuda, auto")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("cost.device", device, "no CUDA GPU is visible on this machine; use cpu or auto")
    kind = (cfg.get("logger") or {}).get("kind", "none")
    if kind not in LOGGERS:
        raise ConfigError("logger.kind", kind, f"must be one of {', '.join(LOGGERS)}")
    return stages
