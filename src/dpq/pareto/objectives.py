"""Objectives a Pareto front can be drawn over, chosen by name.

Each maps a short name to a metric of a results.json record (``final`` or a stage's
``metrics``), the direction that is better, and the unit shown on axes and tables.
Costs are rescaled to readable units (bytes -> MB, BOPs -> GBOPs). Every task metric
(:mod:`dpq.metrics`: ``f1``, ``mcc``, ...) is an objective on the test split (``f1``) and on the
validation split (``val_f1``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpq.core.errors import ConfigError
from dpq.metrics import METRICS

SENSES = ("max", "min")


@dataclass(frozen=True)
class Objective:
    """One axis of the front: ``value = metrics[metric] * scale``; ``sense`` is "max" or "min"."""

    name: str
    metric: str
    sense: str
    unit: str
    scale: float = 1.0
    label: str = ""

    @property
    def title(self) -> str:
        """Axis title, e.g. ``effective GFLOPs [GFLOPs, lower is better]``."""
        better = "higher" if self.sense == "max" else "lower"
        return f"{self.label or self.name} [{self.unit}, {better} is better]"

    @property
    def is_cost(self) -> bool:
        """What a model costs (compute, time, memory, size), not how well it does: the axes a front is owned
        along, never the quality it is owned by."""
        return self.unit in COST_UNITS

    @property
    def is_quality(self) -> bool:
        """How well a model does (a task metric, a loss, ONNX Runtime's accuracy): what a front is owned by.
        Sparsity is neither: it describes the model, and a front "owned" by it would rank the most pruned."""
        return not self.is_cost and self.name != "sparsity"

    def with_sense(self, sense: str) -> Objective:
        return Objective(self.name, self.metric, sense, self.unit, self.scale, self.label)


COST_UNITS = frozenset({"GFLOPs", "GBOPs", "ms", "MB", "parameters"})

OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("accuracy", "accuracy", "max", "fraction", label="test accuracy"),
        Objective("val_accuracy", "val_accuracy", "max", "fraction", label="validation accuracy"),
        Objective("loss", "loss", "min", "nats", label="test loss"),
        Objective("val_loss", "val_loss", "min", "nats", label="validation loss"),
        Objective("effective_gflops", "effective_gflops", "min", "GFLOPs", label="effective GFLOPs"),
        Objective("dense_gflops", "dense_gflops", "min", "GFLOPs", label="dense GFLOPs"),
        # Named apart from the recorded counts (bops, dense_bops): a scaled objective column must not
        # replace its metric's column, or each pass that adds the objectives scales it again.
        Objective("gbops", "bops", "min", "GBOPs", 1e-9, label="bit operations"),
        Objective("dense_gbops", "dense_bops", "min", "GBOPs", 1e-9, label="dense bit operations"),
        Objective("latency_ms", "latency_ms_median", "min", "ms", label="median latency"),
        Objective("latency_p90_ms", "latency_ms_p90", "min", "ms", label="p90 latency"),
        Objective("size_mb", "size_bytes", "min", "MB", 1e-6, label="size"),
        Objective("peak_memory_mb", "peak_memory_bytes", "min", "MB", 1e-6, label="peak inference memory"),
        Objective("params", "params_total", "min", "parameters", label="parameters"),
        Objective("nonzero_params", "params_nonzero", "min", "parameters", label="non-zero parameters"),
        Objective("sparsity", "sparsity", "max", "fraction", label="sparsity"),
        # The deployed artifact (model/model.onnx) as ONNX Runtime runs it: final points only.
        Objective(
            "onnx_latency_ms", "onnx_latency_ms_median", "min", "ms", label="ONNX Runtime median latency"
        ),
        Objective("onnx_size_mb", "onnx_size_bytes", "min", "MB", 1e-6, label="ONNX file size"),
        Objective("onnx_accuracy", "onnx_accuracy", "max", "fraction", label="ONNX Runtime test accuracy"),
        Objective(
            "onnx_val_accuracy",
            "onnx_val_accuracy",
            "max",
            "fraction",
            label="ONNX Runtime validation accuracy",
        ),
        *(
            Objective(f"{prefix}{m.name}", f"{prefix}{m.name}", m.sense, m.unit, label=f"{split} {m.label}")
            for m in METRICS.values()
            if m.name != "accuracy"
            for prefix, split in (("", "test"), ("val_", "validation"))
        ),
    )
}


# Names people type for an objective whose column is named after its unit (the recorded metric keeps its own).
ALIASES = {"bops": "gbops", "dense_bops": "dense_gbops"}


def allowed() -> str:
    return (
        "one of "
        + ", ".join(OBJECTIVES)
        + f" ({', '.join(f'{a} = {n}' for a, n in ALIASES.items())}; optionally NAME:max or NAME:min; "
        "the dpq.pareto command also takes primary: the runs' task.primary_metric)"
    )


def parse_objectives(specs: list[str] | tuple[str, ...], key: str = "--objectives") -> list[Objective]:
    """``["accuracy", "size_mb:min"]`` -> objectives; 2 or 3 of them, each named once.

    A ``:max``/``:min`` suffix overrides the registry's direction.
    """
    out: list[Objective] = []
    for spec in specs:
        name, _, sense = str(spec).partition(":")
        name = ALIASES.get(name, name)
        if name not in OBJECTIVES:
            raise ConfigError(key, spec, allowed())
        obj = OBJECTIVES[name]
        if sense:
            if sense not in SENSES:
                raise ConfigError(key, spec, "the direction after ':' must be max or min")
            obj = obj.with_sense(sense)
        if any(o.name == obj.name for o in out):
            raise ConfigError(key, spec, "each objective may be named once")
        out.append(obj)
    if not 2 <= len(out) <= 3:
        raise ConfigError(key, list(specs), "give two or three objectives, e.g. accuracy effective_gflops")
    return out
