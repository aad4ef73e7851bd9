"""Small ``torch.nn`` helpers shared by pruning, quantization, cost and the run checks."""

from __future__ import annotations

import torch
from torch import nn

NON_INPUT_KEYS = ("labels", "idx")


def model_inputs(batch: dict) -> dict:
    """The part of a batch that is fed to the model (everything but labels and the example index)."""
    return {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits of a Hugging Face model (``.logits``) or of a dpq model (the tensor itself)."""
    out = model(**model_inputs(batch))
    return getattr(out, "logits", out)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule ``name`` in place (the root cannot be replaced)."""
    if not name:
        raise ValueError("cannot replace the root module in place; wrap it in a container first")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# Config settings that hold one entry per transformer layer (ModernBERT and newer decoders: layer_types;
# Longformer: a list attention_window); each must follow the layers a student or a depth drop keeps.
PER_LAYER_CONFIG = ("layer_types", "attention_window")
LAYER_COUNT_CONFIG = ("num_hidden_layers", "n_layers")


def keep_config_layers_(config, kept: list[int], n_before: int) -> None:
    """``config`` of a model that kept layers ``kept`` (indices into the ``n_before`` it had), in place.

    The layer count, and every per-layer list: with only the count lowered, a ModernBERT student of
    teacher layers [0, 3] ran its copy of layer 3 (full attention) as the config's entry 1 (sliding
    window), and save_pretrained refused a config of 2 layers with 4 layer types."""
    for a in PER_LAYER_CONFIG:
        v = getattr(config, a, None)
        if isinstance(v, (list, tuple)) and len(v) == n_before:
            setattr(config, a, [v[i] for i in kept])
    for a in LAYER_COUNT_CONFIG:
        if isinstance(getattr(config, a, None), int):
            setattr(config, a, len(kept))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a layer computes with (packed low-bit layers dequantized)."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.detach()
    return module.dequantize().detach()
