"""scikit-learn's balanced accuracy as a torchmetrics metric (:mod:`dpq.metrics` ``balanced_accuracy``).

torchmetrics' ``MulticlassAccuracy(average="macro")`` also averages in a class that is only predicted
(recall 0), which a small split of many labels often has; ``balanced_accuracy_score`` averages the recall
of the classes the targets hold. torchmetrics has no such average, so it is written here (a module of
its own, importable by name, so the metric pickles for DDP's spawned processes).
"""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassStatScores


class BalancedAccuracy(MulticlassStatScores):
    """Mean recall over the classes with at least one target example (0 when there are none)."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes=num_classes, average="none", **kwargs)

    def compute(self) -> torch.Tensor:
        tp, _, _, fn = self._final_state()
        support = tp + fn
        held = support > 0
        if not bool(held.any()):
            return torch.tensor(0.0, device=tp.device)
        return (tp[held].float() / support[held]).mean()
