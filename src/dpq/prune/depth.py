"""Depth pruning: whole transformer layers removed, chosen by how little each changes its input.

Heads and neurons thin every layer; dropping a layer removes its attention, FFN and both
LayerNorms at once, the one structured cut that also shortens the sequential critical path (per-op
overhead dominates small batches on CPU). Which layers: the ones with the lowest *block influence*
(ShortGPT, Men et al. 2024): ``BI_i = 1 - mean cos(h_i, h_{i+1})`` over the non-padding tokens of a
few training batches, where ``h_i`` enters layer ``i`` and ``h_{i+1}`` leaves it. A layer that
barely turns its input is the cheapest to lose; recovery (distillation) repairs the rest.

Hugging Face encoders (BERT family, DistilBERT) keep their layers in one ``ModuleList``; removing
entries and lowering ``config.num_hidden_layers`` (``n_layers``) is all a reload needs, because the
saved config builds the shorter model and the state-dict keys are renumbered with the list.
Everything keyed by module name (masks, the shrink's recorded shapes and original group counts) is
renumbered here too. Hand-written: transformers has no layer-removal API.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from dpq.core.nn import keep_config_layers_

_LAYER_NAME = re.compile(r"^(?P<list>.*\.(?:layer|layers))\.(?P<i>\d+)(?P<rest>(\..*)?)$")


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the encoder's transformer layers (``bert.encoder.layer``,
    ``distilbert.transformer.layer``); ValueError for a model without one."""
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and n.endswith(("encoder.layer", "transformer.layer", "encoder.layers"))
    ]
    if len(found) != 1:
        raise ValueError(
            "depth pruning needs a Hugging Face encoder with one list of transformer layers "
            f"(encoder.layer / transformer.layer); found {[n for n, _ in found] or 'none'}"
        )
    return found[0]


def num_layers(model: nn.Module) -> int:
    return len(layer_list(model)[1])


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Per layer, ``1 - mean cosine(input, output)`` of its hidden states over non-padding tokens."""
    n = num_layers(model)
    total = torch.zeros(n, dtype=torch.float64)
    tokens = 0
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            kwargs = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in batch:
                kwargs["token_type_ids"] = batch["token_type_ids"].to(device)
            hidden = model(**kwargs, output_hidden_states=True).hidden_states
            if hidden is None or len(hidden) != n + 1:
                raise ValueError(f"the model returned {len(hidden or ())} hidden states for {n} layers")
            keep = mask.bool()
            for i in range(n):
                cos = torch.nn.functional.cosine_similarity(hidden[i].float(), hidden[i + 1].float(), dim=-1)
                total[i] += cos[keep].double().sum().cpu()
            tokens += int(keep.sum())
    finally:
        for m, f in flags:
            m.training = f
    if tokens == 0:
        raise ValueError("block influence needs at least one non-padding token")
    return 1.0 - total / tokens


def choose(influence: torch.Tensor, count: int) -> list[int]:
    """The ``count`` layers of lowest influence (ties: the later layer), sorted."""
    n = len(influence)
    if not 0 < count < n:
        raise ValueError(f"can drop 1..{n - 1} of {n} layers, not {count}")
    order = sorted(range(n), key=lambda i: (float(influence[i]), -i))
    return sorted(order[:count])


def renumber(name: str, list_name: str, new_index: Mapping[int, int]) -> str | None:
    """``name`` with its layer index mapped (None: the name belongs to a dropped layer)."""
    m = _LAYER_NAME.match(name)
    if m is None or m.group("list") != list_name:
        return name
    i = int(m.group("i"))
    if i not in new_index:
        return None
    return f"{list_name}.{new_index[i]}{m.group('rest')}"


def _renamed(d: Mapping, list_name: str, new_index: Mapping[int, int]) -> dict:
    out = {}
    for k, v in d.items():
        k2 = renumber(k, list_name, new_index)
        if k2 is not None:
            out[k2] = v
    return out


@torch.no_grad()
def drop_layers_(
    model: nn.Module, drop: Iterable[int], masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Remove the transformer layers ``drop`` (indices) in place; returns ``masks`` renamed to the new
    layer numbers (a dropped layer's masks go with it).

    The config's layer count follows, and so do the names in ``config.dpq_structure`` and
    ``model.dpq_original_groups`` (a shrink's record), so save/reload and later stages see the
    shorter model as it is.
    """
    list_name, layers = layer_list(model)
    n = len(layers)
    drop = sorted(set(int(i) for i in drop))
    if not drop:
        return dict(masks or {})
    if drop[0] < 0 or drop[-1] >= n:
        raise ValueError(f"layer indices {drop}: the model has layers 0..{n - 1}")
    if len(drop) >= n:
        raise ValueError(f"dropping layers {drop} would leave none of {n}")
    kept = [i for i in range(n) if i not in drop]
    new_index = {old: new for new, old in enumerate(kept)}
    parent_name, _, attr = list_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList([layers[i] for i in kept]))
    for i, layer in enumerate(getattr(parent, attr)):  # transformers 5 layers know their index (caches)
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = i
    config = getattr(model, "config", None)
    if config is not None and not isinstance(config, dict):
        keep_config_layers_(config, kept, n)
        st = getattr(config, "dpq_structure", None)
        if st:
            config.dpq_structure = {
                "linears": _renamed(st.get("linears", {}), list_name, new_index),
                "counts": _renamed(st.get("counts", {}), list_name, new_index),
                "original": _renamed(st.get("original", {}), list_name, new_index),
            }
    if getattr(model, "dpq_original_groups", None):
        model.dpq_original_groups = _renamed(model.dpq_original_groups, list_name, new_index)
    return _renamed(masks or {}, list_name, new_index)


__all__ = ["layer_list", "num_layers", "block_influence", "choose", "renumber", "drop_layers_"]
