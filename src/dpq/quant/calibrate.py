"""Post-training quantization: ranges from N calibration batches, no training.

``prepare_ptq_`` fixes every weight range at once (min-max or percentile of the weight);
:func:`calibrate_` runs batches through the model in eval mode so the activation observers
(``act_bits=8``) collect their ranges -- the maximum |x| over the batches (``minmax``) or the
mean over batches of the given percentile of |x| (``percentile``) -- and then freezes them.
Inputs pass through unquantized while they are observed (TensorRT-style calibration).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .observers import ActivationFakeQuant


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def activation_quantizers(model: nn.Module) -> dict[str, ActivationFakeQuant]:
    """The activation quantizers with a range to calibrate (``act_range=dynamic`` ones take each batch's own),
    by the name of the layer they quantize the input of."""
    return {
        n.removesuffix(".activation_fake_quantizer"): m
        for n, m in model.named_modules()
        if isinstance(m, ActivationFakeQuant) and not m.dynamic
    }


@torch.no_grad()
def calibrate_(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    forward: Callable[[nn.Module, Any], Any] = lambda m, b: m(**b),
) -> int:
    """Feed up to ``num_batches`` batches through ``model`` (eval mode), then freeze the ranges.

    ``forward(model, batch)`` runs one batch (default ``model(**batch)``). Returns the
    number of batches used; raises if an activation observer saw nothing.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be >= 1")
    observers = activation_quantizers(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    used = 0
    try:
        if observers:
            for i, batch in enumerate(batches):
                if i >= num_batches:
                    break
                forward(model, _move(batch, device))
                used += 1
    finally:
        model.train(was_training)
    unseen = [n for n, obs in observers.items() if not obs.ready]
    if unseen:
        raise RuntimeError(
            f"the input of {len(unseen)} layer(s) quantized at act_bits was never seen in {used} calibration "
            f"batches: {', '.join(unseen[:5])}{', ...' if len(unseen) > 5 else ''} (a layer the forward does not "
            "call; leave it out of the quantize stage's targets)"
        )
    for obs in observers.values():
        obs.set_mode("frozen")
    return used
