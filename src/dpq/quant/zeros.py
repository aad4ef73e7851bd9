"""Sparsity integrity: pruned (exactly-zero) weights must stay exactly zero through quantization.

It covers every quantized layer kind (Linear and Conv2d: fake-quantized modules expose their
float ``weight``, converted ones dequantize to the same shape).

The usual way sparsity is lost (asymmetric grids whose zero point is not an integer, a
re-initialised or re-quantized weight, a kernel that repacks) is silent; this check makes it
loud. :func:`zero_positions` records where every checked layer's weight is exactly zero;
:func:`check_zeros_kept` raises :class:`SparsityLost`, naming the layer and the counts, if any
of those weights is no longer exactly zero. Quantization may *add* zeros (a small weight can
round to code 0); those are reported, not an error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpq.core.errors import IntegrityError

from .packed import QuantizedLinear


class SparsityLost(IntegrityError):
    """Quantization turned a pruned (exactly-zero) weight non-zero."""


@torch.no_grad()
def effective_weight(module: nn.Module) -> Tensor:
    """The weight the layer computes with: dequantized for low-bit modules, else ``.weight``."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize()
    return module.weight.detach()


@torch.no_grad()
def zero_positions(model: nn.Module, names) -> dict[str, Tensor]:
    """Boolean mask (the weight's shape: ``[out, in]``, a conv's ``[out, in/groups, kh, kw]``) of
    exactly-zero weights for each named layer (on CPU)."""
    return {n: (effective_weight(model.get_submodule(n)) == 0).cpu() for n in names}


@torch.no_grad()
def check_zeros_kept(model: nn.Module, before: dict[str, Tensor], when: str) -> dict[str, dict[str, int]]:
    """Raise :class:`SparsityLost` if a weight that was exactly zero in ``before`` is not any more.

    Returns ``{layer: {"zeros_before", "zeros_after", "revived"}}`` (revived is 0 when it returns).
    """
    report: dict[str, dict[str, int]] = {}
    for name, was_zero in before.items():
        w = effective_weight(model.get_submodule(name)).cpu()
        if w.shape != was_zero.shape:
            raise SparsityLost(
                f"{when}: layer {name}: weight shape changed from {tuple(was_zero.shape)} to {tuple(w.shape)}"
            )
        is_zero = w == 0
        revived = int((was_zero & ~is_zero).sum())
        report[name] = {
            "zeros_before": int(was_zero.sum()),
            "zeros_after": int(is_zero.sum()),
            "revived": revived,
        }
        if revived:
            r = report[name]
            raise SparsityLost(
                f"{when}: layer {name}: {revived} of its {r['zeros_before']} exactly-zero (pruned) "
                f"weights became non-zero (zeros before {r['zeros_before']}, after {r['zeros_after']})"
            )
    return report


def summarize(report: dict[str, dict[str, int]]) -> dict[str, int]:
    return {
        "layers_checked": len(report),
        "zeros_before": sum(r["zeros_before"] for r in report.values()),
        "zeros_after": sum(r["zeros_after"] for r in report.values()),
    }
