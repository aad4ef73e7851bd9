"""``bnb`` backend: bitsandbytes ``Linear4bit`` (nf4 / fp4) and ``Linear8bitLt`` (int8).

bitsandbytes is optional (``pip install 'dpq[gpu]'``) and imported only here, lazily.
bitsandbytes quantizes the trained float weight itself when the layer is moved to the
device (blockwise absmax with its nf4 / fp4 code books, or row-wise absmax int8), so LSQ
steps and the QAT grid are not carried over; the stage measures the resulting accuracy
difference. All three formats map 0.0 to exactly 0.0 (nf4 and fp4 contain 0, absmax
scaling is symmetric), so pruned weights stay zero -- the stage checks it anyway. Only the
selected target layers are replaced: the classifier head stays float (bitsandbytes'
own model-level helpers replace every Linear, head included, unless told otherwise).

dpq declares this backend for CUDA only (see ``dpq.quant.backends``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpq.core.nn import set_module

from .packed import QuantizedLinear, register_module_type

BNB_VERSION = "0.50.2"  # keep in step with pyproject.toml's gpu extra
SCHEMES = ("nf4", "fp4", "int8")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(
            f"backend bnb needs bitsandbytes (pip install 'dpq[gpu]', i.e. bitsandbytes=={BNB_VERSION}): {e}"
        ) from None
    return bnb


def blocksize_for(granularity: str, group_size: int) -> int:
    """bitsandbytes' 4-bit block size: the group size when ``per_group``, else its default 64."""
    return group_size if granularity == "per_group" else 64


@register_module_type
class BnbLinear(QuantizedLinear):
    """Wraps a bitsandbytes layer so cost accounting, export and the sparsity check see it."""

    backend = "bnb"

    def __init__(self, inner: nn.Module, scheme: str, blocksize: int = 64):
        super().__init__(
            inner.in_features,
            inner.out_features,
            bits=8 if scheme == "int8" else 4,
            act_bits=8 if scheme == "int8" else None,
        )  # LLM.int8 (threshold 0) quantizes inputs row-wise
        self.inner, self.scheme, self.blocksize = inner, scheme, blocksize

    @property
    def bias(self) -> Tensor | None:
        """The inner layer's bias, where generic code (``dpq.cost.parameter_counts``) looks for it."""
        return self.inner.bias

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():  # FLOP counters trace: the same multiply-adds as a float linear
            b = self.float_bias()
            return F.linear(x, self.dequantize().to(x.dtype), None if b is None else b.to(x.dtype))
        return self.inner(x)

    @torch.no_grad()
    def dequantize(self) -> Tensor:
        bnb = bitsandbytes()
        w = self.inner.weight
        if self.scheme == "int8":
            scb = getattr(w, "SCB", None)
            if scb is None:
                scb = self.inner.state.SCB
            return (w.data.float() * scb.float().reshape(-1, 1) / 127.0).reshape(
                self.out_features, self.in_features
            )
        return (
            bnb.functional.dequantize_4bit(w.data, w.quant_state)
            .float()
            .reshape(self.out_features, self.in_features)
        )

    def packed_tensors(self) -> dict[str, Tensor]:
        return dict(self.inner.state_dict())

    def meta(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "blocksize": self.blocksize,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.inner.bias is not None,
        }

    @classmethod
    def from_packed(
        cls, meta: dict, tensors: dict[str, Tensor], device: torch.device | str = "cuda"
    ) -> BnbLinear:
        bnb = bitsandbytes()
        n_in, n_out, bias = meta["in_features"], meta["out_features"], meta["bias"]
        if meta["scheme"] == "int8":
            inner = bnb.nn.Linear8bitLt(n_in, n_out, bias=bias, has_fp16_weights=False, threshold=0.0)
            inner = inner.to(device)  # bitsandbytes only loads int8 state into an already quantized layer
            inner.load_state_dict(tensors)
        else:
            inner = bnb.nn.Linear4bit(n_in, n_out, bias=bias, quant_type=meta["scheme"])
            stats = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
            inner.weight = bnb.nn.Params4bit.from_prequantized(
                tensors["weight"], stats, device=device, module=inner
            )
            if bias:
                inner.bias = nn.Parameter(tensors["bias"].to(device), requires_grad=False)
        return cls(inner, meta["scheme"], meta["blocksize"])


@torch.no_grad()
def to_bnb(linear: nn.Linear, scheme: str, blocksize: int, device: torch.device | str) -> BnbLinear:
    """Quantize one float Linear with bitsandbytes on ``device`` (quantization happens on the move)."""
    bnb = bitsandbytes()
    w = linear.weight.detach().float().cpu()
    bias = None if linear.bias is None else linear.bias.detach().float().cpu()
    if scheme == "int8":
        inner = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=0.0,
        )
        inner.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        inner = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias is not None, quant_type=scheme
        )
        inner.weight = bnb.nn.Params4bit(
            w.clone(),
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=True,
            quant_type=scheme,
            module=inner,
        )
    if bias is not None:
        inner.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return BnbLinear(inner.to(device), scheme, blocksize)


def convert_(
    model: nn.Module,
    names: list[str],
    scheme: str,
    granularity: str,
    group_size: int,
    device: torch.device | str,
) -> None:

    for name in names:
        set_module(
            model,
            name,
            to_bnb(model.get_submodule(name), scheme, blocksize_for(granularity, group_size), device),
        )
