"""Magnitude masks and the two Lightning callbacks that own them.

* :class:`SparsityRamp` -- the ``prune`` stage: gradual magnitude pruning along a polynomial
  ramp, masks recomputed every ``update_every`` optimizer steps and re-applied after every step.
* :class:`MaskFreeze` -- ``recover`` and every later stage: masks fixed, re-applied after
  every optimizer step, so no pruned weight comes back.

Written by hand rather than on ``torch.nn.utils.prune`` (which Lightning's ``ModelPruning``
wraps) because that reparametrisation renames state-dict keys (``weight_orig``/``weight_mask``),
breaking ``save_pretrained``, and prunes a fraction *of the remaining* weights per call, which
compounds cumulative ramp targets. Here weights stay plain parameters and masks are boolean
tensors kept in the callback's ``state_dict`` under a per-stage ``state_key``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn

from dpq.schedules import polynomial_sparsity, ramp_progress

Masks = dict[str, torch.Tensor]  # module name -> bool keep-mask with the weight's shape

SCOPES = ("layer", "global")


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


@torch.no_grad()
def magnitude_masks(model: nn.Module, names: list[str], sparsity: float, previous: Masks | None = None,
                    scope: str = "layer") -> Masks:
    """Keep-masks that zero the ``sparsity`` fraction of smallest-|w| weights.

    Already-pruned weights (``previous``) rank below everything else, so masks only grow
    sparser (a pruned weight never returns within a ramp). ``scope="layer"`` gives every
    layer the same sparsity; ``"global"`` uses one threshold across all layers.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: must be one of {SCOPES}")
    scores = {}
    for n in names:
        s = weight_of(model, n).detach().abs().float()
        if previous is not None and n in previous:
            s = torch.where(previous[n].to(s.device), s, torch.full_like(s, -1.0))
        scores[n] = s
    masks: Masks = {}
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        keep = _keep_largest(flat, int(round(sparsity * flat.numel())))
        offset = 0
        for n, s in scores.items():
            masks[n] = keep[offset: offset + s.numel()].view_as(s)
            offset += s.numel()
        return masks
    for n, s in scores.items():
        masks[n] = _keep_largest(s, int(round(sparsity * s.numel())))
    return masks


def _keep_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask that drops exactly the ``k`` lowest scores.

    A k-th value threshold is O(n) (a mask update touches millions of weights); a full sort
    is used only when ties at the threshold would make the count inexact.
    """
    flat = scores.flatten()
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    thr = torch.kthvalue(flat, k).values
    keep = flat > thr
    if int((~keep).sum()) != k:
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep.view_as(scores)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    for n, m in masks.items():
        w = weight_of(model, n)
        w.mul_(m.to(device=w.device, dtype=w.dtype))


def mask_sparsity(masks: Masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(1, total)


def intersect(a: Masks | None, b: Masks) -> Masks:
    if not a:
        return dict(b)
    out = dict(a)
    for n, m in b.items():
        out[n] = out[n] & m if n in out else m
    return out


class _MaskCallback(L.Callback):
    """Shared: re-apply masks after every optimizer step; zero masked gradients before it."""

    def __init__(self, name: str, masks: Masks | None = None):
        self.name = name
        self.masks: Masks = {k: v.clone() for k, v in (masks or {}).items()}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def _model(self, pl_module: L.LightningModule) -> nn.Module:
        return pl_module.model

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Keeps Adam moments of pruned weights at zero, so the re-applied mask is not fighting them.
        model = self._model(pl_module)
        for n, m in self.masks.items():
            g = weight_of(model, n).grad
            if g is not None:
                g.mul_(m.to(device=g.device, dtype=g.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        apply_masks(self._model(pl_module), self.masks)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.cpu() for k, v in self.masks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])


class MaskFreeze(_MaskCallback):
    """Hold fixed masks for a whole stage (``recover``, ``quantize``, or any stage after ``prune``)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        apply_masks(self._model(pl_module), self.masks)

    def on_train_end(self, trainer, pl_module) -> None:
        apply_masks(self._model(pl_module), self.masks)


class SparsityRamp(_MaskCallback):
    """Gradual magnitude pruning: sparsity follows :func:`polynomial_sparsity` over the stage.

    The target at optimizer step t is a pure function of ``t / total_steps``: ``initial`` at
    the first step, ``final`` from ``ramp_end`` of the stage to its end. Masks are
    recomputed every ``update_every`` steps (and exactly at the start and end), and applied
    after every step. ``frozen`` masks from an earlier prune stage are kept (intersected).
    """

    def __init__(self, name: str, targets: list[str], initial: float, final: float, exponent: float = 3.0,
                 update_every: int = 10, ramp_end: float = 1.0, scope: str = "layer", frozen: Masks | None = None):
        super().__init__(name, frozen)
        if not targets:
            raise ValueError("SparsityRamp needs at least one target module")
        self.targets, self.initial, self.final = list(targets), float(initial), float(final)
        self.exponent, self.update_every, self.ramp_end, self.scope = float(exponent), int(update_every), float(ramp_end), scope
        self.total_steps = 0
        self.history: list[tuple[int, float]] = []  # (step, target sparsity) at each mask update

    def target_at(self, step: int) -> float:
        return polynomial_sparsity(ramp_progress(step, self.total_steps, self.ramp_end), self.initial, self.final, self.exponent)

    def _update(self, pl_module, step: int) -> None:
        target = self.target_at(step)
        self.masks = magnitude_masks(self._model(pl_module), self.targets, target, previous=self.masks, scope=self.scope)
        apply_masks(self._model(pl_module), self.masks)
        self.history.append((step, target))

    def on_train_start(self, trainer, pl_module) -> None:
        self.total_steps = int(trainer.estimated_stepping_batches)
        if not math.isfinite(self.total_steps) or self.total_steps <= 0:
            raise ValueError("the prune stage needs a finite number of training steps (set epochs or max_steps)")
        self._update(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        if step % self.update_every == 0 or step >= self.total_steps:
            self._update(pl_module, step)
        else:
            apply_masks(self._model(pl_module), self.masks)

    def on_train_end(self, trainer, pl_module) -> None:
        # The stage ends at the final target exactly, even if the last step was not an update step.
        if self.history and self.history[-1] == (trainer.global_step, self.final):
            return
        target = self.target_at(self.total_steps)
        self.masks = magnitude_masks(self._model(pl_module), self.targets, target, previous=self.masks, scope=self.scope)
        apply_masks(self._model(pl_module), self.masks)
        self.history.append((trainer.global_step, target))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "total_steps": self.total_steps, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.total_steps = int(state_dict.get("total_steps", 0))
        self.history = [tuple(h) for h in state_dict.get("history", [])]
