"""What a task measures: ``task.metrics`` and ``task.primary_metric``, computed with torchmetrics.

Each name here is a metric of the classifier's logits against the labels, computed on the
test split (results.json ``<name>``) and on the validation split (``val_<name>``) after every
stage. Accuracy is always computed (results.json has always carried it); the primary metric
is the one sweeps optimise (``objective.metrics``), the Pareto front and the tables show.

Metrics "of the positive label" (``f1``, ``precision``, ``recall``, binary ``auroc``) follow
scikit-learn's ``average="binary"``: they need a 2-label task, and the positive label is
``task.positive_label`` (a label name or class id; default class 1, the second label).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpq.core.errors import ConfigError


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str  # in axis titles and tables, e.g. "macro F1"
    unit: str  # its range, e.g. "fraction" (0..1) or "-1..1"
    build: Callable[[int, int], Any]  # (num_labels, positive class id) -> a torchmetrics Metric of logits
    sense: str = "max"  # which way is better
    positive: bool = False  # a metric of the positive label: needs a 2-label task


def _positive_prob(logits, positive: int):
    return logits.float().softmax(-1)[:, positive]


def _is_positive(target, positive: int):
    return (target == positive).long()


def _of_positive(metric_cls: str | Callable[[], Any]) -> Callable[[int, int], Any]:
    """A binary torchmetrics metric (a class name, or a class) of the positive label's probability."""

    def build(num_labels: int, positive: int):
        import torchmetrics.classification as tmc
        from torchmetrics.wrappers import LambdaInputTransformer

        metric = getattr(tmc, metric_cls)() if isinstance(metric_cls, str) else metric_cls()
        return LambdaInputTransformer(
            metric,
            transform_pred=functools.partial(_positive_prob, positive=positive),
            transform_target=functools.partial(_is_positive, positive=positive),
        )

    return build


def _multiclass(metric_cls: str, **kw) -> Callable[[int, int], Any]:
    def build(num_labels: int, positive: int):
        import torchmetrics.classification as tmc

        return getattr(tmc, metric_cls)(num_classes=num_labels, **kw)

    return build


def _balanced_accuracy(num_labels: int, positive: int):
    from dpq.core.balanced_accuracy import (
        BalancedAccuracy,
    )  # scikit-learn's, not torchmetrics' macro accuracy

    return BalancedAccuracy(num_classes=num_labels)


def _auroc(num_labels: int, positive: int):
    # NaN, not torchmetrics' 0, where a split leaves AUROC undefined; the macro average skips those classes
    from dpq.core.auroc import DefinedBinaryAUROC, DefinedMacroAUROC

    if num_labels == 2:
        return _of_positive(DefinedBinaryAUROC)(num_labels, positive)
    return DefinedMacroAUROC(num_classes=num_labels)


METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in (
        MetricSpec("accuracy", "accuracy", "fraction", _multiclass("MulticlassAccuracy", average="micro")),
        MetricSpec(
            "balanced_accuracy",
            "balanced accuracy",
            "fraction",
            _balanced_accuracy,
        ),
        MetricSpec(
            "f1", "F1 of the positive label", "fraction", _of_positive("BinaryF1Score"), positive=True
        ),
        MetricSpec(
            "precision",
            "precision of the positive label",
            "fraction",
            _of_positive("BinaryPrecision"),
            positive=True,
        ),
        MetricSpec(
            "recall", "recall of the positive label", "fraction", _of_positive("BinaryRecall"), positive=True
        ),
        MetricSpec("f1_macro", "macro F1", "fraction", _multiclass("MulticlassF1Score", average="macro")),
        MetricSpec("f1_micro", "micro F1", "fraction", _multiclass("MulticlassF1Score", average="micro")),
        MetricSpec(
            "f1_weighted", "weighted F1", "fraction", _multiclass("MulticlassF1Score", average="weighted")
        ),
        MetricSpec(
            "precision_macro",
            "macro precision",
            "fraction",
            _multiclass("MulticlassPrecision", average="macro"),
        ),
        MetricSpec(
            "recall_macro", "macro recall", "fraction", _multiclass("MulticlassRecall", average="macro")
        ),
        MetricSpec("mcc", "Matthews correlation", "-1..1", _multiclass("MulticlassMatthewsCorrCoef")),
        MetricSpec("cohen_kappa", "Cohen's kappa", "-1..1", _multiclass("MulticlassCohenKappa")),
        MetricSpec("auroc", "AUROC (macro one-vs-rest with more than 2 labels)", "fraction", _auroc),
    )
}


def allowed() -> str:
    return f"one of {', '.join(METRICS)}"


def task_metrics(task: dict) -> list[str]:
    """The metrics a run computes for ``task``: accuracy, ``task.metrics``, the primary metric; each once."""
    names = ["accuracy", *(task.get("metrics") or []), primary_metric(task)]
    return list(dict.fromkeys(str(n) for n in names))


def primary_metric(task: dict) -> str:
    return str(task.get("primary_metric") or "accuracy")


def result_names(task: dict) -> list[str]:
    """Keys these metrics have in results.json records: ``<name>`` (test) and ``val_<name>`` (validation)."""
    names = task_metrics(task)
    return [*names, *(f"val_{n}" for n in names)]


def check_names(task: dict) -> None:
    """``task.metrics`` and ``task.primary_metric`` name known metrics (the config alone says so)."""
    metrics = task.get("metrics")
    if metrics is not None and (isinstance(metrics, (str, dict)) or not hasattr(metrics, "__iter__")):
        raise ConfigError("task.metrics", metrics, f"must be a list of metric names, each {allowed()}")
    for i, name in enumerate(metrics or []):
        if name not in METRICS:
            raise ConfigError(f"task.metrics[{i}]", name, f"must be {allowed()}")
    if primary_metric(task) not in METRICS or ("primary_metric" in task and not task["primary_metric"]):
        # null too: train.yaml's objective.metrics reads it as 'val_${task.primary_metric}' ('val_None')
        raise ConfigError("task.primary_metric", task.get("primary_metric"), f"must be {allowed()}")


def check_for_labels(task: dict, label_names: list[str]) -> int:
    """Metrics of the positive label need 2 labels; return the positive class id (``task.positive_label``)."""
    n = len(label_names)
    for name in task_metrics(task):
        if METRICS[name].positive and n != 2:
            key = "task.primary_metric" if name == primary_metric(task) else "task.metrics"
            raise ConfigError(
                key,
                name,
                f"is a metric of the positive label and needs a 2-label task; this task has {n} labels "
                f"({', '.join(label_names[:8])}{', ...' if n > 8 else ''}): use {name}_macro, mcc or balanced_accuracy",
            )
    return positive_index(task, label_names)


def positive_index(task: dict, label_names: list[str]) -> int:
    """Class id of ``task.positive_label`` (a label name, or an id); class 1 when unset."""
    pos = task.get("positive_label")
    if pos is None:
        return 1 if len(label_names) > 1 else 0
    if str(pos) in label_names:
        return label_names.index(str(pos))
    if isinstance(pos, int) and not isinstance(pos, bool) and 0 <= pos < len(label_names):
        return pos
    raise ConfigError(
        "task.positive_label", pos, f"must be one of the task's labels: {', '.join(label_names)}"
    )


def build(names: list[str], num_labels: int, positive: int = 1) -> dict[str, Any]:
    """torchmetrics objects (updated with logits [B, C] and class ids [B]) for ``names``."""
    return {n: METRICS[n].build(num_labels, positive) for n in names}
