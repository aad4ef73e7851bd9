"""Checks between stages (``integrity: true``, the default): a stage never silently damages the model.

* :func:`check_finite` -- no NaN/Inf anywhere in the weights (a diverged stage stops the run
  before its snapshot is written, so the last good checkpoint stays the newest one);
* :func:`check_masks_hold` -- every pruned weight is still exactly zero;
* :func:`check_sparsity_kept` -- no layer's sparsity dropped during a stage (layers whose size
  changed, i.e. were physically shrunk, are compared only through their masks);
* :func:`check_reload` -- the exported model, reloaded from disk, reproduces the final metrics.
"""

from __future__ import annotations

import torch
from torch import nn

from dpq.core.errors import IntegrityError, TrainingDiverged
from dpq.core.nn import dense_weight


@torch.no_grad()
def check_finite(model: nn.Module, stage: str, last_good: str | None = None) -> None:
    """Raise :class:`TrainingDiverged` naming the first tensor holding NaN/Inf."""
    for name, t in model.state_dict().items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            keep = f"; the last good checkpoint is {last_good}" if last_good else ""
            raise TrainingDiverged(
                f"after stage '{stage}': {bad} NaN/Inf values in {name}{keep}; lower the stage's lr "
                "or check the data"
            )


@torch.no_grad()
def layer_sparsity(model: nn.Module, names) -> dict[str, tuple[int, int]]:
    """(zeros, total) of each named layer's weight, for the layers that exist."""
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        if n in mods:
            w = dense_weight(mods[n])
            out[n] = (int((w == 0).sum()), w.numel())
    return out


def check_sparsity_kept(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], stage: str
) -> None:
    """Raise :class:`IntegrityError` if a layer of the same size has fewer zero weights than before."""
    for n, (z0, total0) in before.items():
        if n not in after:
            continue
        z1, total1 = after[n]
        if total1 == total0 and z1 < z0:
            raise IntegrityError(
                f"stage '{stage}' lowered the sparsity of {n} from {z0 / total0:.4f} to {z1 / total1:.4f} "
                f"({z0 - z1} pruned weights came back)"
            )


@torch.no_grad()
def check_masks_hold(model: nn.Module, masks: dict[str, torch.Tensor] | None, stage: str) -> None:
    """Raise :class:`IntegrityError` if a weight the masks prune is not exactly zero."""
    mods = dict(model.named_modules())
    for n, keep in (masks or {}).items():
        if n not in mods:
            continue
        w = dense_weight(mods[n])
        if tuple(w.shape) != tuple(keep.shape):
            continue  # physically shrunk since: the shrink re-maps masks it keeps
        revived = int((w[~keep.to(w.device)] != 0).sum())
        if revived:
            raise IntegrityError(f"after stage '{stage}': {revived} pruned weights of {n} are non-zero")


def check_reload(final: dict, reloaded: dict, tolerance: float) -> None:
    """Raise :class:`IntegrityError` if the reloaded model's accuracy or loss differs beyond ``tolerance``."""
    for key in ("accuracy", "val_accuracy"):
        if abs(final[key] - reloaded[key]) > tolerance:
            raise IntegrityError(
                f"the saved model reloads with {key} {reloaded[key]:.6f}, the run measured {final[key]:.6f} "
                f"(tolerance {tolerance}); the exported model is not the trained one"
            )
    if abs(final["loss"] - reloaded["loss"]) > max(tolerance, 1e-6) * max(1.0, abs(final["loss"])):
        raise IntegrityError(
            f"the saved model reloads with loss {reloaded['loss']:.6f}, the run measured {final['loss']:.6f}"
        )
