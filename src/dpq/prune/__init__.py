"""Pruning: keep-masks (:mod:`.masks`), sparsity schedules (:mod:`.schedules`), structured groups and
the physical shrink (:mod:`.structured`), and the callbacks that hold masks while training
(:mod:`.callbacks`)."""

from dpq.prune.callbacks import MaskFreeze, SparsityRamp
from dpq.prune.masks import (
    CRITERIA,
    GRANULARITIES,
    SCOPES,
    Masks,
    apply_masks,
    intersect,
    magnitude_masks,
    score_masks,
)

__all__ = [
    "CRITERIA",
    "GRANULARITIES",
    "SCOPES",
    "MaskFreeze",
    "Masks",
    "SparsityRamp",
    "apply_masks",
    "intersect",
    "magnitude_masks",
    "score_masks",
]
