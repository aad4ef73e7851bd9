"""Pipeline stages: one module per kind, each registering itself in :data:`STAGES`.

Importing this package imports every module in it, so a new stage kind is one new module
here (plus its YAML); :func:`build_stages` turns ``pipeline.order`` / ``pipeline.stages`` into
checked stage objects.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from dpq.core.errors import ConfigError
from dpq.stages.base import STAGES, KDStageConfig, ModelCheck, Stage, StageConfig, register

__all__ = [
    "STAGES",
    "KDStageConfig",
    "ModelCheck",
    "Stage",
    "StageConfig",
    "build_stages",
    "discover",
    "register",
]


def discover() -> dict[str, type[Stage]]:
    """Import every stage module of this package (``dpq.stages.__path__``); return the registry."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    return STAGES


def build_stages(pipeline: dict[str, Any]) -> list[Stage]:
    """Parse ``pipeline.order`` / ``pipeline.stages`` into stage objects, checking order rules."""
    kinds = discover()
    order, defined = pipeline.get("order"), pipeline.get("stages") or {}
    if not order or not isinstance(order, (list, tuple)):
        raise ConfigError("pipeline.order", order, "must be a non-empty list of stage names")
    if len(set(order)) != len(order):
        dup = next(n for n in order if order.count(n) > 1)
        raise ConfigError(
            "pipeline.order",
            list(order),
            f"stage '{dup}' appears twice; define a second stage under another name",
        )
    stages: list[Stage] = []
    for i, name in enumerate(order):
        if name not in defined:
            raise ConfigError(
                f"pipeline.order[{i}]",
                name,
                f"is not a stage of this pipeline; defined stages: {', '.join(defined)}",
                f"stage kinds: {', '.join(kinds)}",
            )
        raw = dict(defined[name] or {})  # null: validate.check_shapes allows it only outside pipeline.order
        kind = raw.get("kind", name)
        if not isinstance(kind, str) or kind not in kinds:  # a list here was a raw TypeError (unhashable)
            raise ConfigError(
                f"pipeline.stages.{name}.kind", kind, f"unknown stage kind; allowed: {', '.join(kinds)}"
            )
        raw["kind"] = kind
        stages.append(kinds[kind].from_config(name, raw))
    for i, stage in enumerate(stages):
        if i and stages[i - 1].quantizes:
            raise ConfigError(
                "pipeline.order",
                list(order),
                f"stage '{stage.name}' ({stage.kind}) comes after quantization stage '{stages[i - 1].name}'; "
                "quantization must be the last stage"
                + (" (only one quantization stage per pipeline)" if stage.quantizes else ""),
            )
        try:
            stage.check_order(stages[:i])
        except ConfigError as e:
            if e.key != "pipeline.order":
                raise
            # a stage's rule sees the stages before it; the message names the order the user wrote
            raise ConfigError("pipeline.order", list(order), e.allowed) from None
    for i, stage in enumerate(stages):
        stage.check_after(stages[i + 1 :])
    return stages
