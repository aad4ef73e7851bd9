"""Second-order unstructured pruning of the Optimal BERT Surgeon (oBERT).

Kurtic et al. 2022, "The Optimal BERT Surgeon: Scalable and Accurate Second-Order Pruning
for Large Language Models" (arXiv:2203.07259). Standalone: depends on torch only.

Pieces
------
* :class:`BlockFisherInverse` -- per named weight tensor, the inverse of the block-diagonal
  empirical Fisher ``F = damp*I + (1/m) sum_i g_i g_i^T`` (blocks of ``block_size``
  consecutive weights of the row-major flattened tensor; the last block of a tensor is
  zero-padded), built gradient by gradient with the Sherman-Morrison (rank-1 Woodbury) update

      F_k^-1 = F_{k-1}^-1 - (F_{k-1}^-1 g)(F_{k-1}^-1 g)^T / (m + g^T F_{k-1}^-1 g),
      F_0^-1 = I / damp,

  vectorised over all blocks of a tensor (``[num_blocks, B, B]``). ``m`` (``num_grads``) must
  be known up front, because each rank-1 term carries the weight ``1/m``.
* :func:`obs_saliency` -- ``rho_q = w_q^2 / (2 [F^-1]_qq)`` (lower = pruned first).
* :func:`select_masks` -- bool keep-masks with exactly ``round(s*n)`` pruned weights per layer
  (``scope="layer"``) or over all layers (``scope="global"``), ties broken by position; weights
  a previous keep-mask pruned stay pruned and count towards the target.
* :func:`obs_update` -- the block-wise multi-weight OBS update. For the set S of pruned
  weights of a block, ``dw = -F^-1[:, S] ([F^-1]_SS)^-1 w_S``; pruned weights are then set to
  exactly 0.0. ``method="none"`` prunes without update (criterion only) and
  ``method="independent"`` sums the single-weight updates ``-F^-1[:, q] w_q / [F^-1]_qq``
  (what the SparseML reference implementation applies) for comparison.
* :func:`obert_prune` -- saliency + selection + update in one call.

Memory: ``num_blocks * B * B`` elements per tensor, i.e. about ``numel * B`` (plus padding):
5.3M weights (dpq's default 3-layer MiniLM student encoder) take 5.3M*50*4 B = 1.06 GB at the
paper's B=50 in float32, 5.3M*32*4 B = 0.68 GB at this module's default B=32, and twice that
in float64. See :meth:`BlockFisherInverse.memory_estimate`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ObsOptions:
    """How the ``obs`` criterion of :class:`dpq.prune.callbacks.SparsityRamp` estimates the Fisher.

    Before every mask update the raw gradients of the last ``num_grads`` training steps (at most
    the steps since the previous update) build the block-diagonal inverse; ``damp_ratio`` sets
    the damping relative to the mean squared gradient of each layer (only that ratio matters;
    the paper's absolute 1e-7 is ~36x the mean g^2 of dpq's MiniLM, which turns the criterion
    into magnitude pruning); ``update`` is the weight compensation (obs | independent | none).
    The mean runs over all the layer's weights, the pruned ones' zeroed gradients included
    (:func:`suggest_damp`), so at sparsity s the damping is ``damp_ratio * (1 - s)`` of the kept
    weights' mean g^2: it weakens along the ramp as fewer weights carry the curvature.
    """

    block_size: int = 32
    num_grads: int = 32
    damp_ratio: float = 1e-2
    update: str = "obs"

    def check(self) -> None:
        if self.block_size < 1 or self.num_grads < 1:
            raise ValueError("obs block_size and num_grads must be >= 1")
        if not (self.damp_ratio > 0 and math.isfinite(self.damp_ratio)):
            raise ValueError("obs damp_ratio must be a finite number > 0")
        if self.update not in UPDATE_METHODS:
            raise ValueError(f"obs update must be one of {', '.join(UPDATE_METHODS)}")


__all__ = [
    "BlockFisherInverse",
    "obs_saliency",
    "select_masks",
    "obs_update",
    "obert_prune",
    "suggest_damp",
    "UPDATE_METHODS",
    "SCOPES",
    "ObsOptions",
]

Masks = dict[str, torch.Tensor]  # name -> bool keep-mask (True = kept), the weight's shape
SCOPES = ("layer", "global")
UPDATE_METHODS = ("obs", "none", "independent")


class BlockFisherInverse:
    """Inverse of the block-diagonal, dampened empirical Fisher of a set of named weight tensors.

    :param shapes: name -> shape of each weight tensor (e.g. ``{n: p.shape for n, p in ...}``).
    :param num_grads: ``m``, the number of gradients that will be added (each enters with 1/m).
    :param block_size: ``B``; blocks are ``B`` consecutive entries of the row-major flattened
        tensor and never span two tensors. A tensor whose size is not a multiple of ``B`` gets
        a zero-padded last block; padding is decoupled from the real weights (its Fisher rows
        are ``damp * e_i``) so it changes nothing and is never exposed.
    :param damp: ``lambda`` of ``F = damp*I + (1/m) sum g g^T``; one float, or name -> float
        (one lambda per tensor). Only its ratio to the mean squared gradient matters for masks
        and updates (both are invariant to scaling F jointly); see :meth:`damping_ratio` and
        :func:`suggest_damp`. Default 1e-7 as in the paper -- but see the README: for dpq's
        MiniLM student that absolute value is ~30x the mean squared gradient.
    :param dtype: storage dtype of the inverse (float32 default; float64 doubles the memory).
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        num_grads: int,
        block_size: int = 32,
        damp: float | Mapping[str, float] = 1e-7,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if num_grads < 1:
            raise ValueError(f"num_grads={num_grads}: need at least one gradient")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: must be >= 1")
        if not shapes:
            raise ValueError("no weight tensors given")
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.damp = (
            {n: float(damp[n]) for n in self.shapes}
            if isinstance(damp, Mapping)
            else {n: float(damp) for n in self.shapes}
        )
        if not all(d > 0 for d in self.damp.values()):
            raise ValueError(f"damp={damp}: must be > 0 (F^-1 starts at I/damp)")
        self.num_grads, self.block_size = int(num_grads), int(block_size)
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        self.numel = {n: s.numel() for n, s in self.shapes.items()}
        self.num_blocks = {n: math.ceil(k / self.block_size) for n, k in self.numel.items()}
        self.finv: dict[str, torch.Tensor] = {}
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to ``F^-1 = I/damp`` with no gradient added (call after every mask update)."""
        eye = torch.eye(self.block_size, dtype=self.dtype, device=self.device)
        self.finv = {n: (eye / self.damp[n]).expand(nb, -1, -1).clone() for n, nb in self.num_blocks.items()}
        self.count = 0
        self._sq_sum = {n: 0.0 for n in self.shapes}  # per tensor, sum over added gradients of sum_q g_q^2

    @property
    def complete(self) -> bool:
        return self.count == self.num_grads

    @staticmethod
    def memory_estimate(numel: int, block_size: int = 32, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the inverse for one tensor of ``numel`` weights: ceil(numel/B)*B*B*itemsize."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return math.ceil(numel / block_size) * block_size * block_size * itemsize

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.finv.values())

    def _blocks(self, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Flatten ``t`` row-major, zero-pad to num_blocks*B, view as [num_blocks, B]."""
        if t.shape != self.shapes[name]:
            raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected {tuple(self.shapes[name])}")
        flat = t.detach().reshape(-1).to(device=self.device, dtype=dtype or self.dtype)
        pad = self.num_blocks[name] * self.block_size - flat.numel()
        if pad:
            flat = F.pad(flat, (0, pad))
        return flat.view(self.num_blocks[name], self.block_size)

    def _unblock(self, name: str, b: torch.Tensor) -> torch.Tensor:
        return b.reshape(-1)[: self.numel[name]].view(self.shapes[name])

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def add_gradient(
        self, grads: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Sherman-Morrison update of every block with one gradient sample.

        ``grads`` must hold every tensor's gradient. With ``masks`` (bool keep-masks) the
        gradients of already-pruned weights are zeroed first, as the reference implementation
        does; then those weights are decoupled from the rest in F (their rows are damp*e_i).
        Cost per call: ~2*numel*B multiply-adds per tensor (a batched mat-vec and a rank-1 update).
        """
        missing = set(self.shapes) - set(grads)
        if missing:
            raise KeyError(f"no gradient for {sorted(missing)}")
        if self.count >= self.num_grads:
            raise RuntimeError(f"already {self.count} = num_grads gradients added; call reset() first")
        for n in self.shapes:
            g = grads[n]
            if masks is not None and n in masks:
                g = g * masks[n].to(g.device, g.dtype)
            g = self._blocks(n, g)  # [nb, B]
            finv = self.finv[n]
            fg = torch.bmm(finv, g.unsqueeze(2)).squeeze(2)  # F^-1 g, [nb, B]
            denom = self.num_grads + (g * fg).sum(1)  # m + g^T F^-1 g  (> m > 0)
            u = fg / denom.sqrt().unsqueeze(1)
            finv.baddbmm_(u.unsqueeze(2), u.unsqueeze(1), alpha=-1.0)  # F^-1 -= u u^T (stays symmetric)
            self._sq_sum[n] += float((g.double() ** 2).sum())
        self.count += 1

    # ---------------------------------------------------------------- queries
    def diag(self) -> dict[str, torch.Tensor]:
        """name -> diagonal of F^-1 in the weight's shape (padding removed)."""
        return {n: self._unblock(n, f.diagonal(dim1=1, dim2=2)) for n, f in self.finv.items()}

    def damping_ratio(self, name: str | None = None) -> float:
        """``damp / mean diag((1/m) sum g g^T)``: the damping relative to the empirical Fisher's
        average curvature, over all weights (numel-weighted mean damp) or for tensor ``name``.
        Meaningful once all m gradients are added."""
        names = [name] if name is not None else list(self.shapes)
        total = sum(self.numel[n] for n in names)
        mean_fisher_diag = sum(self._sq_sum[n] for n in names) / (self.num_grads * total)
        mean_damp = sum(self.damp[n] * self.numel[n] for n in names) / total
        return mean_damp / mean_fisher_diag if mean_fisher_diag > 0 else math.inf

    def dense_block(self, name: str, block: int) -> torch.Tensor:
        """F^-1 of one block, [B, B] (a view)."""
        return self.finv[name][block]


def suggest_damp(
    grads: Mapping[str, torch.Tensor],
    ratio: float = 1e-2,
    masks: Mapping[str, torch.Tensor] | None = None,
    per_layer: bool = False,
) -> float | dict[str, float]:
    """``ratio * mean(g^2)`` over the given (e.g. first) gradient sample: a damp whose
    :meth:`BlockFisherInverse.damping_ratio` is about ``ratio`` (one sample's mean g^2 is a rough
    estimate of the average over m; use the mean over a few samples if they are at hand).
    ``per_layer=True``: name -> ``ratio * mean(g_name^2)`` (gradient scales differ by >100x
    between layers of a transformer), for ``BlockFisherInverse(damp=...)``.

    With ``masks`` the pruned weights' gradients count as zeros in the mean (the sum over kept
    weights divided by all weights), the same mean :meth:`BlockFisherInverse.damping_ratio`
    divides by, so that ratio stays ``ratio``; relative to the kept weights alone the damping is
    ``ratio * kept/numel``. Kept so deliberately: dividing by the kept count instead would change
    every masked OBS update (all but a ramp's first) of existing runs."""
    sq: dict[str, float] = {}
    cnt: dict[str, int] = {}
    for name, g in grads.items():
        if masks is not None and name in masks:
            g = g * masks[name].to(g.device, g.dtype)
        sq[name] = float((g.detach().double() ** 2).sum())
        cnt[name] = g.numel()
    if sum(sq.values()) <= 0:
        raise ValueError("all gradients are zero; cannot scale damp")
    # float32 holds 1/damp (the inverse starts as I/damp) only while damp > ~3e-39; keep far from it
    overall = max(ratio * sum(sq.values()) / sum(cnt.values()), 1e-30)
    if per_layer:
        # A layer whose (unmasked) gradient is all zero -- every weight masked already, which global
        # allocation at a high target can do -- or negligible (mean g^2 below 1e-12 of the model's: a
        # spiral round on tiny_bert gave 1e-49, whose 1/damp overflowed float32 to inf and NaN) gets
        # the overall damp: its inverse is then about a scaled identity, its saliency w^2 / 2damp.
        per = {n: ratio * sq[n] / cnt[n] for n in sq}
        return {n: d if d > 1e-12 * overall else overall for n, d in per.items()}
    return overall


# ---------------------------------------------------------------------- saliency
@torch.no_grad()
def obs_saliency(weights: Mapping[str, torch.Tensor], finv: BlockFisherInverse) -> dict[str, torch.Tensor]:
    """name -> ``w^2 / (2 [F^-1]_qq)`` in the inverse's dtype (lower = pruned first).

    A non-positive diagonal (F^-1 is SPD in exact arithmetic, so only possible after float32
    cancellation with a tiny damping ratio) raises: the masks would be meaningless.
    """
    if finv.count == 0:
        raise RuntimeError("no gradient added to the Fisher inverse")
    if not finv.complete:
        warnings.warn(f"only {finv.count} of num_grads={finv.num_grads} gradients added", stacklevel=2)
    out = {}
    for n, d in finv.diag().items():
        if not bool((d > 0).all()):
            raise FloatingPointError(
                f"{n}: non-positive diagonal of F^-1 (numerical breakdown; raise damp or use float64)"
            )
        w = weights[n].detach().to(device=d.device, dtype=d.dtype)
        out[n] = w * w / (2.0 * d)
    return out


# -------------------------------------------------------------------- selection
def _prune_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool keep-vector dropping exactly the ``k`` lowest entries; ties go by position (lower
    index pruned first). kthvalue fast path when there is no tie at the threshold."""
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return keep
    if k >= flat.numel():
        return torch.zeros_like(keep)
    thr = torch.kthvalue(flat, k).values
    keep = flat > thr
    if int((~keep).sum()) != k:  # ties at the threshold: stable sort decides by position
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep


@torch.no_grad()
def select_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float],
    previous: Mapping[str, torch.Tensor] | None = None,
    scope: str = "layer",
) -> Masks:
    """Bool keep-masks pruning the lowest scores.

    ``scope="layer"``: each layer prunes ``round(s_l * n_l)`` (``sparsity`` a float or a
    name -> float mapping). ``scope="global"``: one ranking over all weights of all layers
    (concatenated in ``scores``' order, row-major), ``round(s * N)`` pruned in total. Weights
    pruned in ``previous`` rank first (-inf) and stay pruned, so they count towards the target;
    should ``previous`` already prune more than the target, the result is ``previous`` itself
    (masks never grow back). ``round`` is Python's (half to even), as in ``dpq.prune.masks``.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: must be one of {SCOPES}")
    per_layer = isinstance(sparsity, Mapping)
    if per_layer and scope == "global":
        raise ValueError("per-layer sparsities need scope='layer'")
    sps = list(sparsity.values()) if per_layer else [sparsity]
    if any(not 0.0 <= float(s) <= 1.0 for s in sps):
        raise ValueError(f"sparsity {sparsity}: must be in [0, 1]")
    ranked: dict[str, torch.Tensor] = {}
    for n, s in scores.items():
        s = s.detach().to(torch.float64)
        if bool(torch.isnan(s).any()):
            raise FloatingPointError(f"{n}: NaN scores")
        if previous is not None and n in previous:
            s = torch.where(previous[n].to(s.device, torch.bool), s, torch.full_like(s, -math.inf))
        ranked[n] = s
    masks: Masks = {}
    if scope == "global":
        flat = torch.cat([s.reshape(-1) for s in ranked.values()])
        keep = _prune_lowest(flat, int(round(float(sparsity) * flat.numel())))
        off = 0
        for n, s in ranked.items():
            masks[n] = keep[off : off + s.numel()].view(s.shape)
            off += s.numel()
    else:
        for n, s in ranked.items():
            sp = float(sparsity[n]) if per_layer else float(sparsity)
            masks[n] = _prune_lowest(s.reshape(-1), int(round(sp * s.numel()))).view(s.shape)
    if previous is not None:
        masks = {
            n: m & previous[n].to(m.device, torch.bool) if n in previous else m for n, m in masks.items()
        }
    return masks


# ----------------------------------------------------------------------- update
@torch.no_grad()
def obs_update(
    weights: Mapping[str, torch.Tensor],
    finv: BlockFisherInverse,
    masks: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor] | None = None,
    method: str = "obs",
    *,
    constrain_previous: bool = True,
    chunk_blocks: int = 4096,
    solve_dtype: torch.dtype = torch.float64,
    compute_loss: bool = True,
) -> dict[str, float]:
    """Prune ``weights`` **in place** to the keep-``masks`` and compensate the remaining ones.

    ``method="obs"``: per block, with S its set of pruned weights, ``dw = -F^-1[:, S]
    ([F^-1]_SS)^-1 w_S`` -- the minimiser of ``0.5 dw^T F dw`` subject to ``w_S + dw_S = 0``.
    S is every pruned weight of the block (``constrain_previous=True``), so weights pruned in
    ``previous`` stay at 0 even when the gradients were not masked; with masked gradients (see
    :meth:`BlockFisherInverse.add_gradient`) this equals using only the newly pruned ones.
    ``constrain_previous=False``: S = newly pruned only (``masks`` & ``previous``-kept).
    Vectorised over blocks by masking: ``A = [F^-1]_SS`` padded with the identity outside S, one
    batched ``solve`` per chunk of ``chunk_blocks`` blocks, in ``solve_dtype`` (float64 default,
    cheap insurance for a float32 inverse). Only blocks with a nonzero weight in S are touched.
    ``method="none"``: criterion only, just zero the pruned weights. ``method="independent"``:
    ``dw = -sum_{q in S} F^-1[:, q] w_q / [F^-1]_qq`` (sum of single-weight OBS updates, the
    SparseML implementation's choice); ignores correlations within S.

    Pruned weights are set to exactly 0.0 afterwards in every method. Returns name -> the
    quadratic model's predicted loss increase ``0.5 dw^T F dw``, which for "obs" equals
    ``0.5 w_S^T ([F^-1]_SS)^-1 w_S`` (= the sum of the saliencies of S when each block loses
    one weight); for "none"/"independent" it is ``0.5 dw^T F dw`` of the final dw (pruned
    entries at exactly -w), computed with a solve against the stored F^-1 -- about as costly
    as the "obs" update itself; ``compute_loss=False`` skips it (the loss is then NaN).
    """
    if method not in UPDATE_METHODS:
        raise ValueError(f"method={method!r}: must be one of {UPDATE_METHODS}")
    losses: dict[str, float] = {}
    B = finv.block_size
    for n, keep in masks.items():
        w = weights[n]
        keep = keep.to(w.device, torch.bool)
        pruned = ~keep
        if not constrain_previous and previous is not None and n in previous:
            S_full = pruned & previous[n].to(w.device, torch.bool)
        else:
            S_full = pruned
        if method == "none":
            if compute_loss:
                wb = finv._blocks(n, w, solve_dtype)
                Sb = finv._blocks(n, S_full, torch.bool)
                losses[n] = _quad_loss_of_zeroing(finv, n, wb, Sb, chunk_blocks, solve_dtype)
            else:
                losses[n] = math.nan
            w.masked_fill_(pruned, 0.0)
            continue
        wb = finv._blocks(n, w, solve_dtype)  # [nb, B]
        Sb = finv._blocks(n, S_full, torch.bool)  # [nb, B]
        active = torch.nonzero((Sb & (wb != 0)).any(1)).flatten()
        new_wb = wb.clone()
        loss = 0.0
        eye = torch.eye(B, dtype=solve_dtype, device=wb.device)
        for start in range(0, active.numel(), chunk_blocks):
            idx = active[start : start + chunk_blocks]
            Fi = finv.finv[n][idx].to(solve_dtype)  # [c, B, B]
            s = Sb[idx]
            rhs = torch.where(s, wb[idx], torch.zeros((), dtype=solve_dtype))  # w_S, 0 elsewhere
            if method == "obs":
                outer = s.unsqueeze(2) & s.unsqueeze(1)
                A = torch.where(outer, Fi, eye)  # [F^-1]_SS, identity outside S
                x = torch.linalg.solve(A, rhs)  # ([F^-1]_SS)^-1 w_S, 0 outside S
                dw = -torch.bmm(Fi, x.unsqueeze(2)).squeeze(2)
                loss += 0.5 * float((rhs * x).sum())
            else:  # independent: does not zero S by itself; S is zeroed below, loss of the final dw
                x = rhs / Fi.diagonal(dim1=1, dim2=2)
                dw = -torch.bmm(Fi, x.unsqueeze(2)).squeeze(2)
                dw = torch.where(s, -wb[idx], dw)
                if compute_loss:  # F dw = solve(F^-1, dw)
                    loss += 0.5 * float((dw * torch.linalg.solve(Fi, dw)).sum())
                else:
                    loss = math.nan
            new_wb[idx] = wb[idx] + dw
        new_w = finv._unblock(n, new_wb).to(device=w.device, dtype=w.dtype)
        new_w.masked_fill_(pruned, 0.0)  # exact zeros (also previously pruned ones)
        w.copy_(new_w)
        losses[n] = loss
    return losses


def _quad_loss_of_zeroing(
    finv: BlockFisherInverse,
    n: str,
    wb: torch.Tensor,
    Sb: torch.Tensor,
    chunk_blocks: int,
    solve_dtype: torch.dtype,
) -> float:
    """0.5 dw^T F dw for dw = -w on S (no compensation), F = inverse of the stored F^-1."""
    active = torch.nonzero((Sb & (wb != 0)).any(1)).flatten()
    loss = 0.0
    for start in range(0, active.numel(), chunk_blocks):
        idx = active[start : start + chunk_blocks]
        Fi = finv.finv[n][idx].to(solve_dtype)
        dw = -torch.where(Sb[idx], wb[idx], torch.zeros((), dtype=solve_dtype))
        y = torch.linalg.solve(Fi, dw)  # F dw
        loss += 0.5 * float((dw * y).sum())
    return loss


def obert_prune(
    weights: Mapping[str, torch.Tensor],
    finv: BlockFisherInverse,
    sparsity: float | Mapping[str, float],
    previous: Mapping[str, torch.Tensor] | None = None,
    scope: str = "layer",
    method: str = "obs",
    **update_kwargs,
) -> tuple[Masks, dict[str, float]]:
    """One oBERT pruning step: saliency -> masks -> (OBS) update, weights modified in place.

    Returns (keep-masks, predicted loss increase per layer). Call ``finv.reset()`` afterwards
    and collect m fresh gradients (with the new masks) before the next step.
    """
    scores = obs_saliency(weights, finv)
    masks = select_masks(scores, sparsity, previous=previous, scope=scope)
    losses = obs_update(weights, finv, masks, previous=previous, method=method, **update_kwargs)
    return masks, losses
