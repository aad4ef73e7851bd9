"""``cpu_int8`` backend: int8 x int8 -> int32 matrix products on the CPU (``torch._int_mm``).

The weights are the QAT / PTQ codes themselves (any of 2/3/4/8 bits fits in int8), so no
re-quantization happens at conversion: a weight the fake-quant model saw as ``w_hat`` is
``(code - zero_point) * scale`` here too, and pruned weights are code = zero point. Inputs
are quantized to int8 per tensor with the *observed* QAT/PTQ range when ``act_bits=8``
(then the output equals the fake-quant model's up to float summation order), or dynamically
per token (row) otherwise. The integer product is exact; asymmetric weights are handled by
subtracting ``zero_point * sum(x_q)`` from it. One scale per output channel (or per tensor)
is required, because the int32 accumulator of a whole row is scaled once.

Why hand-written rather than torchao's ``Int8DynamicActivationInt8WeightConfig`` (which is
the ``torchao`` backend's ``int8_dynamic`` scheme and also runs here): torchao re-derives
min-max scales from the float weights, so LSQ steps, percentile ranges, asymmetric zero
points and static activation ranges learned in QAT/PTQ would be dropped. On disk the layer
is the same bit-packed :class:`~dpq.quant.packed.PackedLinear` format (real bit width); the
unpacked int8 copy for the kernel is rebuilt on load.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .affine import EPS
from .packed import PackedLinear, register_module_type

GRANULARITIES = ("per_tensor", "per_channel")


@register_module_type
class Int8Linear(PackedLinear):
    backend = "cpu_int8"

    def __init__(self, in_features: int, out_features: int, bits: int = 8, granularity: str = "per_channel",
                 group_size: int = 128, symmetric: bool = True, act_bits: int | None = None, bias: bool = True):
        if granularity not in GRANULARITIES:
            raise ValueError(f"cpu_int8 needs one scale per output channel or per tensor, not {granularity!r}")
        super().__init__(in_features, out_features, bits, granularity, group_size, symmetric, act_bits, bias)
        self.register_buffer("w_int8_t", torch.zeros(in_features, out_features, dtype=torch.int8), persistent=False)
        # Inputs are int8 either way (static range when act_bits was set in QAT/PTQ, else dynamic).
        self.static_act_bits, self.act_bits = act_bits, 8

    def meta(self) -> dict:
        return {**super().meta(), "act_bits": self.static_act_bits}

    def _codes_changed(self) -> None:
        self.w_int8_t = self.codes().t().contiguous().to(self.qweight.device)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():  # FLOP counters trace: the same multiply-adds as a float linear
            return super().forward(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if self.act_scale is not None:  # static range from QAT / PTQ
            sx = self.act_scale.float()
        else:  # dynamic, per token
            sx = torch.clamp(x2.abs().amax(dim=-1, keepdim=True) / 127.5, min=EPS)
        xq = torch.clamp(torch.round(x2 * (1.0 / sx)), -128, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.w_int8_t)
        if self.zero_point is not None:
            acc = acc - xq.sum(dim=-1, keepdim=True, dtype=torch.int32) * self.zero_point.reshape(1, -1).to(torch.int32)
        y = acc.float() * sx * self.scale.reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        act = f"static int{self.act_bits}" if self.act_scale is not None else "dynamic per-token int8"
        return super().extra_repr() + f", activations={act}"
