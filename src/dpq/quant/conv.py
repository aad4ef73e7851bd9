"""``nn.Conv2d`` quantization: a conv's weight is quantized as the matrix it multiplies with.

A conv weight ``[out, in/groups, kh, kw]`` is viewed as ``[out, in/groups * kh * kw]`` -- one
row per output channel, the row being the filter that im2col multiplies with each input
patch. Every weight quantizer of ``dpq.quant`` then applies unchanged (this module adds the
reshape, not the math): per_tensor, per_channel (= per output channel), per_group (groups of
``group_size`` consecutive weights of a flattened filter), symmetric or asymmetric, min-max or
LSQ, so 0.0 stays exactly 0.0 and pruned filters stay zero.

* :class:`FakeQuantizedConv2d` is QAT / PTQ's conv. Why hand-written: torchao 0.18's QAT API
  has ``FakeQuantizedLinear`` and ``FakeQuantizedEmbedding`` only (``torchao/quantization/qat/``
  holds ``linear.py`` and ``embedding.py``, no conv), so this is the conv counterpart of
  ``FakeQuantizedLinear``: it shares the conv's Parameter objects (an existing optimizer keeps
  training them; state-dict keys stay ``weight`` / ``bias``) and carries the same
  ``weight_fake_quantizer`` / ``activation_fake_quantizer`` slots.
* :class:`PackedConv2d` is the ``packed`` backend's conv: a
  :class:`~dpq.quant.packed.PackedLinear` (bit-packed codes of the weight matrix, block
  scales, zero points) that dequantizes and runs ``F.conv2d`` with the original stride /
  padding / dilation / groups, so it reproduces the fake-quant conv bit for bit. Its
  ``in_features`` / ``out_features`` are the weight matrix's, which is what cost accounting
  (MACs per output position, parameter counts) needs. The ``cpu_int8`` conv
  (:class:`~dpq.quant.cpu_int8.Int8Conv2d`) subclasses it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .observers import fake_quantize_activation
from .packed import PackedLinear, register_module_type

# The nn.Conv2d constructor arguments that fix the layer's function (besides its weights).
GEOMETRY = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as the ``[out, K]`` matrix its quantizer sees (a view; a Linear's weight as is)."""
    w = module.weight
    return w.flatten(1) if w.dim() > 2 else w


def conv_geometry(conv: nn.Module) -> dict[str, Any]:
    """JSON-able constructor arguments (besides bias) of an ``nn.Conv2d``-like module."""
    g = {k: getattr(conv, k) for k in GEOMETRY}
    for k in ("kernel_size", "stride", "dilation"):
        g[k] = [int(v) for v in g[k]]
    g["padding"] = g["padding"] if isinstance(g["padding"], str) else [int(v) for v in g["padding"]]
    return g


def matrix_in_features(geometry: dict[str, Any]) -> int:
    """Columns of the weight matrix: weights per output channel (``in/groups * kh * kw``)."""
    return geometry["in_channels"] // geometry["groups"] * math.prod(geometry["kernel_size"])


def make_conv(
    geometry: dict[str, Any],
    bias: bool,
    device: torch.device | str | None = None,
    cls: type[nn.Conv2d] = nn.Conv2d,
) -> nn.Conv2d:
    """A fresh ``cls`` with this geometry (``nn.Conv2d``'s own argument checks apply)."""
    return cls(**geometry, bias=bias, device=device)


class FakeQuantizedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose weight (as a ``[out, K]`` matrix) and optional input are fake-quantized.

    ``weight_fake_quantizer`` is a :class:`~dpq.quant.fake.MinMaxWeightQuantizer` or
    :class:`~dpq.quant.lsq.LSQWeightQuantizer` built on :func:`weight_matrix`;
    ``activation_fake_quantizer`` an :class:`~dpq.quant.observers.ActivationFakeQuant` or None.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_fake_quantizer: nn.Module | None = None
        self.activation_fake_quantizer: nn.Module | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> FakeQuantizedConv2d:
        """A fake-quantized conv sharing ``conv``'s Parameter objects (no quantizer yet)."""
        new = make_conv(conv_geometry(conv), conv.bias is not None, "meta", cls)
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        w = self.weight
        if self.weight_fake_quantizer is not None:
            w = self.weight_fake_quantizer(weight_matrix(self)).reshape(self.weight.shape)
        return self._conv_forward(x, w, self.bias)


@register_module_type
class PackedConv2d(PackedLinear):
    """Bit-packed codes of a conv's ``[out, in/groups*kh*kw]`` weight matrix; dequantize, then ``F.conv2d``.

    Buffers as :class:`~dpq.quant.packed.PackedLinear`; the conv geometry lives in :meth:`meta`.
    """

    backend = "packed"
    module_kind = "conv2d"

    def select_(self, dim: int, index: Tensor) -> None:
        raise NotImplementedError(
            "PackedConv2d: a quantized conv cannot be cut in place (its codes are a [out, in*kh*kw] matrix)"
        )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        bits: int = 4,
        granularity: str = "per_channel",
        group_size: int = 128,
        symmetric: bool = True,
        act_bits: int | None = None,
        bias: bool = True,
    ):
        ref = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
            bias=False,
            device="meta",
        )  # nn.Conv2d's own checks
        geometry = conv_geometry(ref)
        super().__init__(
            matrix_in_features(geometry),
            out_channels,
            bits,
            granularity,
            group_size,
            symmetric,
            act_bits,
            bias,
        )
        self.geometry = geometry
        for k in GEOMETRY:  # the attributes nn.Conv2d has (tuples), for code that reads them
            setattr(self, k, getattr(ref, k))
        self._reversed_padding_repeated_twice = list(ref._reversed_padding_repeated_twice)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def dequantize(self) -> Tensor:
        """Float32 ``[out, in/groups, kh, kw]`` weight (the conv's own shape; exact zeros preserved)."""
        return super().dequantize().reshape(self.weight_shape)

    def pad_input(self, x: Tensor) -> tuple[Tensor, Any]:
        """The input and the padding argument for ``F.conv2d``, exactly as ``nn.Conv2d._conv_forward`` does it."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return x, self.padding

    def forward(self, x: Tensor) -> Tensor:
        if self.act_scale is not None:
            x = fake_quantize_activation(x, self.act_scale, self.act_bits)
        x, padding = self.pad_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.float_weight(x.dtype), bias, self.stride, padding, self.dilation, self.groups)

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "module": self.module_kind, **self.geometry}

    @classmethod
    def from_packed(
        cls, meta: dict, tensors: dict[str, Tensor], device: torch.device | str = "cpu"
    ) -> PackedConv2d:
        mod = cls(
            **{k: meta[k] for k in GEOMETRY},
            bits=meta["bits"],
            granularity=meta["granularity"],
            group_size=meta["group_size"],
            symmetric=meta["symmetric"],
            act_bits=meta["act_bits"],
            bias=meta["bias"],
        )
        return mod._load_packed(tensors, device)

    def float_module(self) -> nn.Conv2d:
        conv = make_conv(self.geometry, self.bias is not None, self.qweight.device)
        with torch.no_grad():
            conv.weight.copy_(self.dequantize())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    @classmethod
    def mismatch(cls, module: nn.Module, meta: dict) -> str | None:
        if not isinstance(module, (nn.Conv2d, PackedConv2d)):
            return f"is {type(module).__name__}, expected nn.Conv2d"
        have = conv_geometry(module) if isinstance(module, nn.Conv2d) else module.geometry
        diff = [k for k in GEOMETRY if have[k] != meta[k]]
        if diff:
            return (
                f"has {', '.join(f'{k}={have[k]}' for k in diff)} but the save has "
                f"{', '.join(f'{k}={meta[k]}' for k in diff)}"
            )
        return None

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{g['in_channels']}, {g['out_channels']}, kernel_size={tuple(g['kernel_size'])}, "
            f"stride={tuple(g['stride'])}, padding={g['padding']}, groups={g['groups']}, "
            + super().extra_repr()
        )
