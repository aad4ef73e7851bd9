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


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a layer computes with (packed low-bit layers dequantized)."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.detach()
    return module.dequantize().detach()
