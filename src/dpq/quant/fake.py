"""Fake quantization for quantization-aware training (QAT).

Why hand-written rather than torch.ao / torchao: the foundation needs
symmetric (zero point 0), per-output-channel low-bit weights (int4 first) that
keep pruned weights *exactly* zero, run on CPU, are deterministic and add no
dependency. Symmetric quantization maps 0.0 to code 0 and code 0 back to 0.0,
so sparsity from the prune stage survives QAT and conversion. A later issue
adds a torchao adapter behind the same verbs (``prepare_qat_`` / ``convert_``).

Codes live in ``[-qmax, qmax]`` with ``qmax = 2**(bits-1) - 1`` (4-bit: -7..7,
8-bit: -127..127); the most negative two's-complement value is never used so
the grid is symmetric. Scale is ``max|w| / qmax`` per output row (or per
tensor); all-zero rows get scale 1.0 so nothing divides by zero and their
codes are 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpq.selectors import select_linears

ALLOWED_BITS: tuple[int, ...] = (2, 3, 4, 8)
ALLOWED_GRANULARITY: tuple[str, ...] = ("per_channel", "per_tensor")

Targets = str | Sequence[str]


@dataclass
class QATConfig:
    """What to fake-quantize and how; pure data so Hydra can build it."""

    bits: int = 4
    granularity: str = "per_channel"
    # "re:<regex>" = re.fullmatch on the qualified module name, else an exact
    # name; a list of selectors means their union.
    targets: Any = r"re:.*"

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_granularity(self.granularity)
        if not isinstance(self.targets, str):
            # Accept any sequence (e.g. an OmegaConf ListConfig) but store a list.
            try:
                self.targets = [str(t) for t in self.targets]
            except TypeError:
                raise ValueError(
                    f"QATConfig.targets={self.targets!r} must be a selector string "
                    "or a list of selector strings"
                ) from None
            if not self.targets:
                raise ValueError("QATConfig.targets=[] must contain at least one selector")
        for sel in _as_list(self.targets):
            if sel.startswith("re:"):
                try:
                    re.compile(sel[3:])
                except re.error as e:
                    raise ValueError(f"QATConfig.targets has invalid regex {sel!r}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["targets"], list):
            d["targets"] = list(d["targets"])
        return d


def _check_bits(bits: Any) -> None:
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(f"QATConfig.bits={bits!r} is not supported; allowed: {list(ALLOWED_BITS)}")


def _check_granularity(granularity: Any) -> None:
    if granularity not in ALLOWED_GRANULARITY:
        raise ValueError(
            f"QATConfig.granularity={granularity!r} is not supported; "
            f"allowed: {list(ALLOWED_GRANULARITY)}"
        )


def _as_list(targets: Targets) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)


def qmax_for(bits: int) -> int:
    """Largest code magnitude of the symmetric grid for ``bits``."""
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def scale_and_codes(w: Tensor, bits: int, granularity: str) -> tuple[Tensor, Tensor]:
    """Return ``(codes, scale)`` in float32, shared by fake quant and packing.

    ``codes`` has ``w``'s shape (integral values in [-qmax, qmax]); ``scale``
    has shape ``[out, 1, ...]`` (per_channel) or ``[1, 1, ...]`` (per_tensor)
    so it broadcasts against ``w``. One function for both paths is what makes
    the converted model reproduce the fake-quant model exactly.
    """
    _check_granularity(granularity)
    qmax = qmax_for(bits)
    wf = w.detach().float()
    if granularity == "per_channel":
        if wf.dim() < 2:
            raise ValueError(f"per_channel quantization needs a >=2-D weight, got shape {tuple(w.shape)}")
        amax = wf.abs().flatten(1).amax(dim=1).view(-1, *([1] * (wf.dim() - 1)))
    else:
        amax = wf.abs().amax().view(*([1] * max(wf.dim(), 1)))
    # All-zero rows: scale 1.0 keeps the division finite and their codes 0.
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.clamp(torch.round(wf / scale), -qmax, qmax)
    return codes, scale


def fake_quantize(w: Tensor, bits: int = 4, granularity: str = "per_channel") -> Tensor:
    """Quantize-dequantize ``w`` with a straight-through estimator.

    Forward returns exactly the dequantized grid values (zero stays exactly
    zero); backward passes the gradient through unchanged. We write the STE as
    ``q + (w - w.detach())`` instead of ``w + (q - w).detach()``: both have
    identity gradient, but the former is bit-exact ``q`` in forward (``w - w``
    is exactly 0), so the converted model matches to the last bit.
    """
    codes, scale = scale_and_codes(w, bits, granularity)
    q = (codes * scale).to(w.dtype)
    return q + (w - w.detach())


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses fake-quantized weights.

    It *shares* the wrapped module's ``weight``/``bias`` Parameter objects, so
    an optimizer built before ``prepare_qat_`` keeps training them and the
    state_dict keys stay ``weight``/``bias`` (HF ``save_pretrained`` works).
    """

    def __init__(self, linear: nn.Linear, bits: int = 4, granularity: str = "per_channel") -> None:
        _check_bits(bits)
        _check_granularity(granularity)
        # Skip nn.Linear.__init__: it would allocate fresh parameters.
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias  # Parameter or None; registered either way
        self.bits = bits
        self.granularity = granularity
        self.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, fake_quantize(self.weight, self.bits, self.granularity), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, granularity={self.granularity}"
        )


def select_modules(model: nn.Module, targets: Targets) -> list[str]:
    """Qualified names of ``nn.Linear`` modules (incl. subclasses) matching ``targets``."""
    return select_linears(model, _as_list(targets))


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule ``name`` in place (the root cannot be replaced)."""
    if not name:
        raise ValueError("cannot replace the root module in place; wrap it in a container first")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def no_match_error(model: nn.Module, targets: Targets) -> ValueError:
    """A ValueError that tells the user which Linear names they could have meant."""
    available = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not available:
        return ValueError(f"targets={targets!r} matched nothing: the model has no nn.Linear modules")
    shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
    return ValueError(
        f"targets={targets!r} matched no nn.Linear module "
        f"({len(available)} available, e.g. {shown}). Use 're:<regex>' for a "
        "full-match regex on the qualified name, or an exact name."
    )


def prepare_qat_(model: nn.Module, cfg: QATConfig) -> list[str]:
    """Swap each targeted ``nn.Linear`` for a ``FakeQuantLinear`` in place.

    Already fake-quantized modules are left alone (idempotent). Returns the
    names replaced; raises ``ValueError`` if ``cfg.targets`` matches no Linear.
    """
    names = select_modules(model, cfg.targets)
    if not names:
        raise no_match_error(model, cfg.targets)
    replaced: list[str] = []
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, FakeQuantLinear):
            continue
        set_module(model, name, FakeQuantLinear(mod, cfg.bits, cfg.granularity))
        replaced.append(name)
    return replaced
