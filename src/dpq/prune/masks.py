"""Keep-masks: which weights a score ranking prunes (per layer, globally, or N:M), applied in place.

Masks are boolean tensors with the weight's shape (True = kept), by module name. Weights stay
plain parameters; :mod:`dpq.prune.callbacks` holds the masks during training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn

from dpq.prune import structured

log = logging.getLogger(__name__)

Masks = dict[str, torch.Tensor]  # module name -> bool keep-mask with the weight's shape

SCOPES = ("layer", "global")
CRITERIA = ("magnitude", "taylor", "movement", "obs")  # obs: second order (oBERT), dpq.prune.obs
GRANULARITIES = ("unstructured", "n:m", *structured.KINDS)  # structured kinds combine with + (heads+neurons)


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


@torch.no_grad()
def score_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float],
    previous: Masks | None = None,
    scope: str = "layer",
    n_m: tuple[int, int] | None = None,
) -> Masks:
    """Keep-masks that zero the ``sparsity`` fraction of lowest-scoring weights.

    Already-pruned weights (``previous``) rank below everything else (-inf, so this holds for
    signed scores such as movement too) and stay pruned, so masks only grow sparser (a pruned
    weight never returns within a ramp). ``scope="layer"`` ranks each layer on its own, with
    ``sparsity`` either one float or a per-layer mapping; ``"global"`` uses one threshold
    across all layers (one float only). With ``n_m=(N, M)`` only the M-N lowest scores of each
    group of M consecutive input weights may be pruned, so at sparsity (M-N)/M every group
    keeps exactly N weights (2:4 = at most 2 non-zeros in every 4).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: must be one of {SCOPES}")
    per_layer = isinstance(sparsity, Mapping)
    if per_layer and scope == "global":
        raise ValueError("per-layer sparsities need scope='layer'")
    ranked: dict[str, torch.Tensor] = {}
    for n, s in scores.items():
        s = s.detach().float()
        if previous is not None and n in previous:
            s = torch.where(previous[n].to(s.device), s, torch.full_like(s, -math.inf))
        if n_m is not None:
            s = torch.where(nm_candidates(s, n_m, n), s, torch.full_like(s, math.inf))
        ranked[n] = s
    masks: Masks = {}
    if scope == "global":
        flat = torch.cat([s.flatten() for s in ranked.values()])
        keep = _keep_largest(flat, int(round(float(sparsity) * flat.numel())))
        offset = 0
        for n, s in ranked.items():
            masks[n] = keep[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
    else:
        for n, s in ranked.items():
            sp = float(sparsity[n]) if per_layer else float(sparsity)
            masks[n] = _keep_largest(s, int(round(sp * s.numel())))
    if previous is not None:  # a group with more than M-N earlier zeros must not get them back
        masks = {n: m & previous[n].to(m.device) if n in previous else m for n, m in masks.items()}
    if scope == "global":
        _warn_emptied(masks, previous)
    return masks


def _warn_emptied(masks: Masks, previous: Masks | None) -> None:
    """One global threshold may prune a whole layer (its output becomes its bias): say so once, when it happens."""
    emptied = [
        n
        for n, m in masks.items()
        if m.numel()
        and not bool(m.any())
        and (previous is None or n not in previous or bool(previous[n].any()))
    ]
    if emptied:
        log.warning(
            "global sparsity pruned every weight of %d layer(s): %s (their outputs are now their biases; "
            "a lower target or scope=layer keeps them)",
            len(emptied),
            ", ".join(emptied),
        )


def nm_candidates(scores: torch.Tensor, n_m: tuple[int, int], name: str = "") -> torch.Tensor:
    """Bool mask of the M-N lowest scores in each group of M consecutive weights along the input dim."""
    n, m = n_m
    if scores.dim() != 2 or scores.shape[1] % m:
        raise ValueError(
            f"{name}: N:M pruning groups {m} consecutive input weights, but the weight has shape "
            f"{tuple(scores.shape)} (in_features must be divisible by {m})"
        )
    groups = scores.reshape(-1, m)
    idx = torch.topk(groups, m - n, dim=1, largest=False).indices
    cand = torch.zeros_like(groups, dtype=torch.bool)
    cand.scatter_(1, idx, True)
    return cand.view_as(scores)


@torch.no_grad()
def magnitude_masks(
    model: nn.Module,
    names: list[str],
    sparsity: float | Mapping[str, float],
    previous: Masks | None = None,
    scope: str = "layer",
    n_m: tuple[int, int] | None = None,
) -> Masks:
    """:func:`score_masks` with |w| as the score: prune the smallest-magnitude weights."""
    return score_masks({n: weight_of(model, n).detach().abs() for n in names}, sparsity, previous, scope, n_m)


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
    """Masks kept by both ``a`` and ``b``; a shared name lands on ``b``'s device (masks restored from a
    snapshot are on the CPU, a ramp's on its weights' device)."""
    if not a:
        return dict(b)
    out = dict(a)
    for n, m in b.items():
        out[n] = out[n].to(m.device) & m if n in out else m
    return out
