"""AUROC that is undefined where it is undefined (:mod:`dpq.metrics` ``auroc``).

torchmetrics scores a one-vs-rest class with no positive example (or no negative one) as 0 and, with
``average="macro"``, averages that 0 in: a small validation split that lacks one of many labels reads
as a model far worse than it is. scikit-learn refuses such a split. Here the macro average is taken
over the classes the targets make defined (at least one example in and one out, as ``BalancedAccuracy``
takes the classes present), and a split where no class is defined (a binary split of one label) gives
NaN with a warning, not a number. A module of its own, importable by name, so the metrics pickle for
DDP's spawned processes.
"""

from __future__ import annotations

import logging

import torch
from torchmetrics.classification import BinaryAUROC, MulticlassAUROC
from torchmetrics.utilities.data import dim_zero_cat

log = logging.getLogger(__name__)


def _undefined(what: str, device) -> torch.Tensor:
    log.warning("AUROC is undefined: %s; it is reported as NaN", what)
    return torch.tensor(float("nan"), device=device)


class DefinedBinaryAUROC(BinaryAUROC):
    """Binary AUROC; NaN (warned) when the targets hold only one of the two classes."""

    def compute(self) -> torch.Tensor:
        if self.thresholds is None:
            target = dim_zero_cat(self.target)
            positives = int((target == 1).sum())
            if positives == 0 or positives == target.numel():
                return _undefined(
                    f"the split has {positives} positive and {target.numel() - positives} negative examples",
                    target.device,
                )
        return super().compute()


class DefinedMacroAUROC(MulticlassAUROC):
    """Macro one-vs-rest AUROC over the classes with at least one target example in and one out."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes=num_classes, average="none", thresholds=None, **kwargs)

    def compute(self) -> torch.Tensor:
        per_class = super().compute()
        target = dim_zero_cat(self.target).long()
        target = target[(target >= 0) & (target < self.num_classes)]
        support = torch.bincount(target, minlength=self.num_classes)
        defined = (support > 0) & (support < target.numel())
        if not bool(defined.any()):
            return _undefined(
                f"no class of {self.num_classes} has examples both in and out of it", per_class.device
            )
        return per_class[defined.to(per_class.device)].float().mean()
