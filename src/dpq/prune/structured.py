"""Structured pruning: whole attention heads, FFN neurons and conv/linear channels, then a
physical shrink to smaller dense matrices.

Masking single weights makes no model faster; removing whole groups does. A *group* spans
every weight slice that only exists for it: for an attention head, its rows of the Q/K/V
projections (*producers*) and its columns of the output projection (*consumers*); for an FFN
neuron, its row of the up-projection and its column of the down-projection; for a conv
channel, its output filter, its batch-norm entries (*extra*: sliced, never scored) and the
next layer's input slice.

Masking is done on the weights only (the prune stage's element masks), and zeroing the
consumer slices is what makes a masked group contribute exactly nothing (the producer's bias,
or a batch-norm shift after it, would otherwise leak a constant). So the masked model and the
shrunk one compute the same function, up to float summation order.

Models describe their groups either by a method ``structured_groups(kind)`` returning
:class:`GroupSet` s (dpq's own MLP/CNN models) or, for Hugging Face BERT-family and
DistilBERT encoders, by the module layout recognised here. ``transformers`` 5 removed
``prune_heads``/``config.pruned_heads`` and its configs cannot express a different number of
heads per layer, which is why the shrink and its reload are written here: the shapes are
recorded in ``config.dpq_structure`` and :func:`restore_structure_` rebuilds them before the
state dict is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("heads", "neurons", "channels")
NORMS = ("l1", "l2")


@dataclass(frozen=True)
class Slice:
    """The part of ``module``'s tensors ``params`` that belongs to each group, along ``dim``.

    Group g owns indices ``[g*size, (g+1)*size)`` of that dim (``size`` = head width for
    heads, 1 for neurons and channels).
    """

    module: str
    dim: int
    size: int = 1
    params: tuple[str, ...] = ("weight", "bias")


@dataclass(frozen=True)
class GroupSet:
    """``count`` groups of one layer (e.g. the heads of layer 3) that are pruned together.

    ``producers`` and ``consumers`` are scored and masked (weights only); ``extra`` slices
    (batch norm) are only cut at shrink. ``owner``/``count_attr`` name the attribute that
    holds the group count (``num_attention_heads``), updated at shrink.
    """

    name: str
    kind: str
    count: int
    producers: tuple[Slice, ...]
    consumers: tuple[Slice, ...]
    extra: tuple[Slice, ...] = ()
    owner: str | None = None
    count_attr: str | None = None

    @property
    def slices(self) -> tuple[Slice, ...]:
        return self.producers + self.consumers

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(s.module for s in self.slices))


def parse_kinds(granularity: str) -> list[str]:
    """``heads``, ``neurons``, ``channels`` or a ``+`` combination (``heads+neurons``)."""
    kinds = [k for k in str(granularity).split("+") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(
            f"granularity={granularity!r}: structured kinds are {', '.join(KINDS)} (combine with +)"
        )
    return kinds


# ----------------------------------------------------------------------------- discovery


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    return m if isinstance(m, nn.Linear) else None


def _transformer_groups(model: nn.Module, kind: str) -> list[GroupSet]:
    """Heads and FFN neurons of BERT-family (``attention.self.query``...) and DistilBERT encoders."""
    sets: list[GroupSet] = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if kind == "heads":
            if (
                all(isinstance(getattr(mod, a, None), nn.Linear) for a in ("query", "key", "value"))
                and hasattr(mod, "attention_head_size")
                and name.endswith(".self")
            ):
                parent = name[: -len(".self")]
                out = f"{parent}.output.dense"
                if _linear(model, out) is None:
                    continue
                d = int(mod.attention_head_size)
                n = mod.query.out_features // d
                prod = tuple(Slice(f"{prefix}{p}", 0, d) for p in ("query", "key", "value"))
                sets.append(
                    GroupSet(
                        parent,
                        "heads",
                        n,
                        prod,
                        (Slice(out, 1, d, ("weight",)),),
                        owner=name,
                        count_attr="num_attention_heads",
                    )
                )
            elif all(
                isinstance(getattr(mod, a, None), nn.Linear) for a in ("q_lin", "k_lin", "v_lin", "out_lin")
            ) and hasattr(mod, "attention_head_size"):
                d = int(mod.attention_head_size)
                n = mod.q_lin.out_features // d
                prod = tuple(Slice(f"{prefix}{p}", 0, d) for p in ("q_lin", "k_lin", "v_lin"))
                sets.append(
                    GroupSet(
                        name,
                        "heads",
                        n,
                        prod,
                        (Slice(f"{prefix}out_lin", 1, d, ("weight",)),),
                        owner=name,
                        count_attr="n_heads",
                    )
                )
        elif kind == "neurons":
            up, down = _linear(model, f"{prefix}intermediate.dense"), _linear(model, f"{prefix}output.dense")
            if up is not None and down is not None and down.in_features == up.out_features:
                sets.append(
                    GroupSet(
                        f"{prefix}intermediate",
                        "neurons",
                        up.out_features,
                        (Slice(f"{prefix}intermediate.dense", 0),),
                        (Slice(f"{prefix}output.dense", 1, 1, ("weight",)),),
                    )
                )
            elif isinstance(getattr(mod, "lin1", None), nn.Linear) and isinstance(
                getattr(mod, "lin2", None), nn.Linear
            ):
                sets.append(
                    GroupSet(
                        f"{prefix}ffn" if not name.endswith("ffn") else name,
                        "neurons",
                        mod.lin1.out_features,
                        (Slice(f"{prefix}lin1", 0),),
                        (Slice(f"{prefix}lin2", 1, 1, ("weight",)),),
                    )
                )
    return sets


def find_groups(model: nn.Module, granularity: str, targets: list[str] | None = None) -> list[GroupSet]:
    """The group sets of ``model`` for a structured granularity, restricted to ``targets``.

    A set is kept when its first producer is one of ``targets`` (the prune stage's selected
    modules), so ``targets`` chooses layers the same way as for unstructured pruning.
    """
    sets: list[GroupSet] = []
    for kind in parse_kinds(granularity):
        own = getattr(model, "structured_groups", None)
        found = list(own(kind)) if callable(own) else _transformer_groups(model, kind)
        sets.extend(found)
    seen: set[str] = set()  # an MLP's channels are its neurons: neurons+channels must not list them twice
    sets = [s for s in sets if not (s.name in seen or seen.add(s.name))]
    if targets is not None:
        wanted = set(targets)
        sets = [s for s in sets if s.producers[0].module in wanted]
    return sets


# ----------------------------------------------------------------------------- scoring


def _group_view(t: torch.Tensor, dim: int, count: int, size: int) -> torch.Tensor:
    """``t`` as (count, elements of one group) along ``dim``."""
    return (
        t.movedim(dim, 0).reshape(count, -1)
        if size * count == t.shape[dim]
        else _bad_shape(t, dim, count, size)
    )


def _bad_shape(t, dim, count, size):
    raise ValueError(
        f"tensor of shape {tuple(t.shape)} does not split into {count} groups of {size} along dim {dim}"
    )


def group_scores(
    scores: Mapping[str, torch.Tensor],
    gs: GroupSet,
    norm: str = "l2",
    signed: bool = False,
    additive: bool = False,
) -> torch.Tensor:
    """One importance per group: the L1 or L2 norm of its elements' scores (a plain sum when
    ``signed``, for movement scores whose sign matters), over producers and consumers.

    ``additive``: L2's sum of squares instead of its root, so the score adds up over elements like L1's
    and a score per element or per FLOP compares groups of different sizes (a head of 4 x 64 x 384
    weights against a neuron of 2 x 384); the L2 norm over n equal elements grows as sqrt(n), and divided
    by n it ranked every head far below every neuron whatever their weights."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: must be one of {NORMS}")
    total = torch.zeros(gs.count, dtype=torch.float64)
    for s in gs.slices:
        v = _group_view(scores[s.module].detach().double().cpu(), s.dim, gs.count, s.size)
        if signed:
            total += v.sum(1)
        elif norm == "l1":
            total += v.abs().sum(1)
        else:
            total += v.pow(2).sum(1)
    return total if signed or norm == "l1" or additive else total.sqrt()


def prune_counts(
    sets: list[GroupSet],
    sparsity: float | Mapping[str, float],
    min_keep: int = 1,
    totals: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Groups to remove now per set, so that ``round(sparsity * total)`` are gone in all.

    ``total`` is the set's group count before any shrink (``totals``; a shrunk model has fewer
    groups left than it started with, and a later prune stage's sparsity is cumulative); never
    leaves fewer than ``min_keep``.
    """
    out = {}
    for gs in sets:
        sp = float(sparsity[gs.name]) if isinstance(sparsity, Mapping) else float(sparsity)
        total = int((totals or {}).get(gs.name, gs.count))
        gone = total - gs.count
        out[gs.name] = max(0, min(int(round(sp * total)) - gone, gs.count - min_keep))
    return out


def flops_fill(
    sets: list[GroupSet],
    costs: Mapping[str, float],
    fill: str,
    sparsity: float,
    remove_flops: float,
    min_keep: int = 1,
    totals: Mapping[str, int] | None = None,
) -> tuple[float, float]:
    """The per-layer fraction of ``fill``-kind groups (``heads`` or ``neurons``) that, with
    ``sparsity`` of every other set's groups gone, removes at least ``remove_flops``; and the FLOPs
    removed then.

    A FLOPs budget split evenly across layers at a chosen mix of kinds (keep half the heads, let the
    neurons make up the rest), where ``scope="flops"`` lets all groups compete. Counts are what
    :func:`prune_counts` makes of a fraction, so the ramp that ends at it removes exactly these
    groups. The smallest such fraction: one group fewer in every ``fill`` set would miss the budget.
    Raises ValueError when the other kinds alone already remove more, or when ``fill`` cannot
    remove enough before ``min_keep``.
    """
    fixed = [gs for gs in sets if gs.kind != fill]
    filled = [gs for gs in sets if gs.kind == fill]
    if not filled:
        raise ValueError(f"no {fill} among the groups ({', '.join(sorted({gs.kind for gs in sets}))})")
    by_fixed = prune_counts(fixed, sparsity, min_keep, totals)
    removed_fixed = sum(costs[gs.name] * by_fixed[gs.name] for gs in fixed)
    need = float(remove_flops) - removed_fixed
    others = sorted({gs.kind for gs in fixed})
    if need <= 0:
        raise ValueError(
            f"removing {sparsity} of the {', '.join(others)} alone leaves fewer FLOPs than the target "
            f"({removed_fixed:.4g} removed, {float(remove_flops):.4g} asked): lower final_sparsity or the "
            "fraction removed"
        )

    def removed(fraction: float) -> float:
        counts = prune_counts(filled, fraction, min_keep, totals)
        return sum(costs[gs.name] * counts[gs.name] for gs in filled)

    sizes = {int((totals or {}).get(gs.name, gs.count)) for gs in filled}
    for fraction in sorted({j / n for n in sizes for j in range(n)}):
        got = removed(fraction)
        if got >= need * (1 - 1e-12):
            return fraction, removed_fixed + got
    raise ValueError(
        f"removing {sparsity} of the {', '.join(others)} and all the {fill} but min_keep={min_keep} per "
        f"layer still leaves more FLOPs than the target ({removed_fixed + removed(1.0):.4g} of "
        f"{float(remove_flops):.4g} removed): raise final_sparsity or keep more FLOPs"
    )


def keep_from_masks(
    model: nn.Module, sets: list[GroupSet], masks: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Per-set keep vectors implied by element masks: a group whose producer weights are all masked is gone."""
    keep = {}
    for gs in sets:
        k = torch.ones(gs.count, dtype=torch.bool)
        for s in gs.producers:
            if masks and s.module in masks:
                k &= _group_view(masks[s.module].cpu(), s.dim, gs.count, s.size).any(1)
        keep[gs.name] = k
    return keep


@torch.no_grad()
def select_groups(
    sets: list[GroupSet],
    scores: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float],
    previous: Mapping[str, torch.Tensor] | None = None,
    scope: str = "layer",
    norm: str = "l2",
    signed: bool = False,
    min_keep: int = 1,
    totals: Mapping[str, int] | None = None,
    costs: Mapping[str, float] | None = None,
    flops_total: float | None = None,
) -> dict[str, torch.Tensor]:
    """Bool keep-vector per group set: the lowest-scoring groups go, earlier-pruned ones first.

    ``scope="layer"`` removes ``round(sparsity * count)`` groups in every set; ``"global"``
    removes that fraction of all groups together, ranked by their score per element (so heads
    and neurons of different sizes compare), never leaving a set with fewer than ``min_keep``.
    ``"flops"`` removes groups, lowest score per FLOP first (``costs``: FLOPs one group of each
    set costs, :func:`group_costs`), until the removed groups cost ``sparsity * flops_total``:
    the target is met within one group, or ValueError when ``min_keep`` leaves it out of reach
    (:func:`min_flops_fraction`).
    Ties break by index (stable sort), so a run is reproducible.
    """
    if scope == "flops":
        return _select_by_flops(
            sets, scores, float(sparsity), previous, norm, signed, min_keep, costs, flops_total
        )
    ranked = {}
    for gs in sets:
        s = group_scores(scores, gs, norm, signed, additive=scope == "global")
        if scope == "global":  # per element, so sets of different group sizes compare
            s = s / sum(sl.size * _other_elems(scores[sl.module], sl.dim) for sl in gs.slices)
        if previous is not None and gs.name in previous:
            s = torch.where(previous[gs.name].cpu(), s, torch.full_like(s, -math.inf))
        ranked[gs.name] = s
    keep = {gs.name: torch.ones(gs.count, dtype=torch.bool) for gs in sets}
    if scope == "global":
        total = sum(int((totals or {}).get(gs.name, gs.count)) for gs in sets)
        k = max(0, int(round(float(sparsity) * total)) - (total - sum(gs.count for gs in sets)))
        if previous is not None:  # groups pruned earlier in this ramp are re-selected first (-inf) and count
            k = max(k, sum(int((~previous[gs.name]).sum()) for gs in sets if gs.name in previous))
        flat = torch.cat([ranked[gs.name] for gs in sets])
        owner = [gs for gs in sets for _ in range(gs.count)]
        local = [i for gs in sets for i in range(gs.count)]
        left = {gs.name: gs.count for gs in sets}
        for j in torch.argsort(flat, stable=True).tolist():
            if k == 0:
                break
            gs = owner[j]
            if left[gs.name] > min_keep:
                keep[gs.name][local[j]] = False
                left[gs.name] -= 1
                k -= 1
    else:
        counts = prune_counts(sets, sparsity, min_keep, totals)
        for gs in sets:
            drop = torch.argsort(ranked[gs.name], stable=True)[: counts[gs.name]]
            keep[gs.name][drop] = False
    if previous is not None:  # a group once removed never returns
        keep = {n: k & previous[n].cpu() if n in previous else k for n, k in keep.items()}
    return keep


def group_costs(model: nn.Module, sets: list[GroupSet], by_module: Mapping[str, float]) -> dict[str, float]:
    """FLOPs one group of each set costs in one forward (``by_module``: fvcore's count per module).

    A group owns ``size / shape[dim]`` of each of its producers' and consumers' counts; an
    attention head also owns its share of the score and context matmuls (the attention module's
    count minus its linear children's).
    """
    mods = dict(model.named_modules())
    out = {}
    for gs in sets:
        c = 0.0
        for sl in gs.slices:
            c += float(by_module.get(sl.module, 0)) * sl.size / mods[sl.module].weight.shape[sl.dim]
        if gs.owner:
            depth = gs.owner.count(".") + 1
            children = sum(
                v for n, v in by_module.items() if n.startswith(gs.owner + ".") and n.count(".") == depth
            )
            c += max(0.0, float(by_module.get(gs.owner, 0)) - children) / gs.count
        out[gs.name] = c
    return out


def _select_by_flops(sets, scores, fraction, previous, norm, signed, min_keep, costs, flops_total):
    if costs is None or flops_total is None:
        raise ValueError("scope='flops' needs the groups' costs and the model's total FLOPs")
    keep = {gs.name: torch.ones(gs.count, dtype=torch.bool) for gs in sets}
    entries = []  # (rank key, set, index): earlier-removed groups first, then lowest score per FLOP
    for gs in sets:
        s = group_scores(scores, gs, norm, signed, additive=True) / max(costs[gs.name], 1e-12)
        if previous is not None and gs.name in previous:
            s = torch.where(previous[gs.name].cpu(), s, torch.full_like(s, -math.inf))
        entries += [(float(v), gs, i) for i, v in enumerate(s.tolist())]
    entries.sort(key=lambda e: e[0])  # stable: ties keep set order, then index
    need, removed = fraction * float(flops_total), 0.0
    left = {gs.name: gs.count for gs in sets}
    for v, gs, i in entries:
        if removed >= need and v != -math.inf:
            break
        if left[gs.name] > min_keep:
            keep[gs.name][i] = False
            left[gs.name] -= 1
            removed += costs[gs.name]
    if removed < need * (1 - 1e-9):  # min_keep stopped it: a model above the budget would pass unnoticed
        raise ValueError(
            f"removing all the {_kinds(sets)} but min_keep={min_keep} per layer removes {removed:.4g} of the "
            f"{float(flops_total):.4g} FLOPs, not the {need:.4g} asked: the model keeps at least "
            f"{min_flops_fraction(sets, costs, flops_total, min_keep):.4f} of them"
        )
    return keep


def removable_flops(sets: list[GroupSet], costs: Mapping[str, float], min_keep: int = 1) -> float:
    """The most FLOPs ``scope="flops"`` can remove: every group of every set but ``min_keep``."""
    return sum(costs[gs.name] * max(0, gs.count - int(min_keep)) for gs in sets)


def min_flops_fraction(
    sets: list[GroupSet], costs: Mapping[str, float], flops_total: float, min_keep: int = 1
) -> float:
    """The smallest fraction of ``flops_total`` a FLOPs budget can reach (:func:`removable_flops`)."""
    return 1.0 - removable_flops(sets, costs, min_keep) / float(flops_total)


def _kinds(sets: list[GroupSet]) -> str:
    return " and ".join(sorted({gs.kind for gs in sets}))


def _other_elems(t: torch.Tensor, dim: int) -> int:
    return t.numel() // t.shape[dim]


def _element_keep(keep: torch.Tensor, s: Slice, shape: torch.Size) -> torch.Tensor:
    """Expand a per-group keep vector to a bool mask of a tensor of ``shape`` along ``s.dim``."""
    per_index = keep.repeat_interleave(s.size)
    view = [1] * len(shape)
    view[s.dim] = shape[s.dim]
    return per_index.view(view).expand(shape)


def group_masks(
    model: nn.Module, sets: list[GroupSet], keep: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Element keep-masks (per module weight) of the removed groups' producer and consumer slices."""
    masks: dict[str, torch.Tensor] = {}
    for gs in sets:
        k = keep[gs.name]
        for s in gs.slices:
            w = model.get_submodule(s.module).weight
            m = _element_keep(k.to(w.device), s, w.shape)
            masks[s.module] = masks[s.module] & m if s.module in masks else m.clone()
    return masks


def groups_left(sets: list[GroupSet], keep: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {gs.name: int(keep[gs.name].sum()) if gs.name in keep else gs.count for gs in sets}


# ----------------------------------------------------------------------------- shrink


def _index_param(mod: nn.Module, pname: str, dim: int, idx: torch.Tensor) -> None:
    t = getattr(mod, pname, None)
    if t is None or not isinstance(t, torch.Tensor) or t.dim() <= dim:
        return
    new = t.detach().index_select(dim, idx.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        setattr(mod, pname, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        mod._buffers[pname] = new


def _sync_attrs(mod: nn.Module) -> None:
    """Keep a module's size attributes in step with its tensors (repr, FLOP counters, reload)."""
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.conv._ConvNd):
        mod.out_channels = mod.weight.shape[0]
        mod.in_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        mod.num_features = mod.weight.shape[0] if mod.weight is not None else mod.running_mean.shape[0]


@torch.no_grad()
def shrink_(
    model: nn.Module,
    sets: list[GroupSet],
    keep: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Physically remove the groups ``keep`` marks False, in place; returns ``masks`` cut to the new shapes.

    Every producer/consumer/extra slice is indexed with the kept groups' element indices;
    ``nn.Linear``/conv/batch-norm size attributes and the owner's group count (attention heads)
    are updated. For Hugging Face models the new shapes are written to ``config.dpq_structure``
    so :func:`restore_structure_` can rebuild them at reload; dpq's own models get
    ``after_shrink()`` called to update their config.
    """
    masks = {k: v.clone() for k, v in (masks or {}).items()}
    touched: set[str] = set()
    for gs in sets:
        k = keep[gs.name].cpu()
        if bool(k.all()):
            continue
        if not bool(k.any()):
            raise ValueError(f"{gs.name}: shrinking would remove all {gs.count} {gs.kind}")
        groups = torch.nonzero(k).flatten()
        for s in (*gs.slices, *gs.extra):
            idx = (groups[:, None] * s.size + torch.arange(s.size)[None, :]).flatten()
            mod = model.get_submodule(s.module)
            select = getattr(mod, "select_", None)
            if callable(select):  # a quantized layer cuts its own codes, scales and bias (dpq.prune.compact)
                select(s.dim, idx)
            else:
                for p in s.params:
                    _index_param(mod, p, s.dim if p == "weight" else 0, idx)
            if s.module in masks and s.dim < masks[s.module].dim():
                masks[s.module] = masks[s.module].index_select(s.dim, idx.to(masks[s.module].device))
            _sync_attrs(mod)
            touched.add(s.module)
        if gs.owner is not None and gs.count_attr:
            owner = model.get_submodule(gs.owner)
            setattr(owner, gs.count_attr, int(k.sum()))
            if hasattr(owner, "all_head_size"):
                owner.all_head_size = int(k.sum()) * int(owner.attention_head_size)
    originals = dict(getattr(model, "dpq_original_groups", None) or {})
    for gs in sets:
        originals.setdefault(gs.name, gs.count)
    model.dpq_original_groups = originals
    _record_structure(model, touched, sets)
    hook = getattr(model, "after_shrink", None)
    if callable(hook):
        hook()
    return masks


def _record_structure(model: nn.Module, touched: set[str], sets: list[GroupSet]) -> None:
    config = getattr(model, "config", None)
    if config is None or isinstance(config, dict) or not touched:
        return
    st = dict(getattr(config, "dpq_structure", None) or {})
    linears = dict(st.get("linears", {}))
    for name in touched:
        m = model.get_submodule(name)
        w = getattr(m, "weight", None)
        linears[name] = list(w.shape) if isinstance(w, torch.Tensor) else [m.out_features, m.in_features]
    counts = dict(st.get("counts", {}))
    for gs in sets:
        if gs.owner is not None and gs.count_attr:
            counts[gs.owner] = [gs.count_attr, int(getattr(model.get_submodule(gs.owner), gs.count_attr))]
    config.dpq_structure = {"linears": linears, "counts": counts, "original": dict(model.dpq_original_groups)}
    # When every FFN kept the same width the config can say so, and plain ``from_pretrained``
    # reloads a neurons-only shrink without dpq (per-layer head counts still need dpq's loader).
    for attr, suffix in (("intermediate_size", "intermediate.dense"), ("hidden_dim", "ffn.lin1")):
        widths = {
            m.out_features
            for n, m in model.named_modules()
            if n.endswith(suffix) and isinstance(getattr(m, "out_features", None), int)  # float or quantized
        }
        if hasattr(config, attr) and len(widths) == 1:
            setattr(config, attr, widths.pop())


@torch.no_grad()
def restore_structure_(model: nn.Module, structure: Mapping | None) -> None:
    """Resize a freshly built model to the shapes a shrink recorded, before loading its weights."""
    if not structure:
        return
    for name, shape in structure.get("linears", {}).items():
        mod = model.get_submodule(name)
        out, inp = int(shape[0]), int(shape[1])
        mod.weight = nn.Parameter(torch.empty(out, inp, dtype=mod.weight.dtype))
        if getattr(mod, "bias", None) is not None:
            mod.bias = nn.Parameter(torch.empty(out, dtype=mod.bias.dtype))
        _sync_attrs(mod)
    for owner, (attr, n) in structure.get("counts", {}).items():
        mod = model.get_submodule(owner)
        setattr(mod, attr, int(n))
        if hasattr(mod, "all_head_size"):
            mod.all_head_size = int(n) * int(mod.attention_head_size)
    if structure.get("original"):
        model.dpq_original_groups = dict(structure["original"])


def structure_summary(
    sets: list[GroupSet], keep: Mapping[str, torch.Tensor] | None = None
) -> dict[str, dict[str, int]]:
    """``{kind: {set name: groups left}}`` for results and logs."""
    out: dict[str, dict[str, int]] = {}
    for gs in sets:
        left = int(keep[gs.name].sum()) if keep is not None and gs.name in keep else gs.count
        out.setdefault(gs.kind, {})[gs.name] = left
    return out


__all__ = [
    "KINDS",
    "NORMS",
    "Slice",
    "GroupSet",
    "parse_kinds",
    "find_groups",
    "group_scores",
    "prune_counts",
    "select_groups",
    "keep_from_masks",
    "group_masks",
    "groups_left",
    "shrink_",
    "restore_structure_",
    "structure_summary",
]
