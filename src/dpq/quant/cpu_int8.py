"""``cpu_int8`` backend: int8 x int8 -> int32 matrix products on the CPU (``torch._int_mm``).

The weights are the QAT / PTQ codes themselves (any of 2/3/4/8 bits fits in int8), so no
re-quantization happens at conversion: a weight the fake-quant model saw as ``w_hat`` is
``(code - zero_point) * scale`` here too, and pruned weights are code = zero point. Inputs
are quantized to int8 per tensor with the *observed* QAT/PTQ range when ``act_bits=8``
(then the output equals the fake-quant model's up to float summation order), or dynamically
per token (row) otherwise. The integer product is exact; asymmetric weights are handled by
subtracting ``zero_point * sum(x_q)`` from it. One scale per output channel (or per tensor)
is required, because the int32 accumulator of a whole row is scaled once.

Convolutions (:class:`Int8Conv2d`) run the same integer product on im2col patches
(``F.unfold``): each patch is a row of the input matrix (a "token" for dynamic per-row
scaling), each output channel's flattened filter a column; grouped convs do one product per
group.

Why hand-written rather than torchao's ``Int8DynamicActivationInt8WeightConfig`` (which is
the ``torchao`` backend's ``int8_dynamic`` scheme and also runs here): torchao re-derives
min-max scales from the float weights, so LSQ steps, percentile ranges, asymmetric zero
points and static activation ranges learned in QAT/PTQ would be dropped. On disk the layer
is the same bit-packed :class:`~dpq.quant.packed.PackedLinear` format (real bit width); the
unpacked int8 copy for the kernel is rebuilt on load.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from .affine import EPS
from .conv import PackedConv2d
from .packed import PackedLinear, register_module_type

log = logging.getLogger(__name__)
GRANULARITIES = ("per_tensor", "per_channel")


def int8_matmul(
    x2: Tensor,
    w_int8_t: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    act_scale: Tensor | None,
    w_float_t: Tensor | None = None,
) -> Tensor:
    """``[N, K]`` float inputs times int8 weight codes ``[K, O]`` -> float32 ``[N, O]`` (no bias).

    Inputs become int8 with ``act_scale`` (static, per tensor) or a per-row dynamic scale;
    ``scale`` / ``zero_point`` hold one value per output column (or a single one, per tensor).
    The integer product is exact on every CPU (:func:`int_mm`); ``w_float_t`` is the codes as
    float32, kept by the caller for CPUs without int8 instructions.
    """
    x2 = x2.float()
    if act_scale is not None:  # static range from QAT / PTQ
        sx = act_scale.float()
    else:  # dynamic, per token (row)
        sx = torch.clamp(x2.abs().amax(dim=-1, keepdim=True) / 127.5, min=EPS)
    xq = torch.clamp(torch.round(x2 * (1.0 / sx)), -128, 127).to(torch.int8)
    acc = int_mm(xq, w_int8_t, w_float_t)
    if zero_point is not None:
        acc = acc - xq.sum(dim=-1, keepdim=True, dtype=torch.int32) * zero_point.reshape(1, -1).to(
            torch.int32
        )
    return acc.float() * sx * scale.reshape(1, -1)


# Float32 represents every integer up to 2**24 exactly, and 1024 products of int8 codes (|x| <= 128,
# |w| <= 128) sum to at most 2**24: a float32 matrix product over K chunks of 1024 is an exact int32 one.
_EXACT_K = 1024


def int_mm(xq: Tensor, w_int8_t: Tensor, w_float_t: Tensor | None = None) -> Tensor:
    """Exact int32 ``xq @ w_int8_t`` with the fastest kernel this CPU has.

    With AMX, ``torch._int_mm`` (oneDNN, s8 x s8); with AVX512-VNNI and no AMX, u8 x s8 (the input
    shifted by 128 and corrected), the path torchao's ``int_scaled_matmul`` takes there. Without
    either, oneDNN's int8 product is a reference loop, 25-50x slower than float32 on the default
    student's shapes (bench/int8_matmul.py, AVX2, 2026-12-02), so the product runs as float32 SGEMM
    over K chunks of 1024, which is exact (above). Hand-written: torchao's CPU dispatch has no
    such fallback and applies its scales before the zero-point correction this backend needs.
    """
    kind = _kernel()
    if kind == "amx":
        return torch._int_mm(xq, w_int8_t)
    if kind == "vnni":
        xu = (xq.to(torch.int32) + 128).to(torch.uint8)
        return torch._int_mm(xu, w_int8_t) - w_int8_t.sum(dim=0, keepdim=True, dtype=torch.int32) * 128
    wf = w_int8_t.float() if w_float_t is None else w_float_t
    xf = xq.float()
    acc = None
    for k0 in range(0, xf.shape[1], _EXACT_K):
        part = (xf[:, k0 : k0 + _EXACT_K] @ wf[k0 : k0 + _EXACT_K]).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def _kernel() -> str:
    from torchao.kernel import intmm

    # torchao's own ISA probes (private helpers of the dispatch its int_scaled_matmul uses)
    if intmm._cpu_is_amx_tile_supported():
        return "amx"
    if intmm._cpu_is_vnni_supported():
        return "vnni"
    return "float"


def int8_kernel() -> str:
    """Which integer product this CPU runs (results say so; int8 beats float only with VNNI or AMX)."""
    return {
        "amx": "s8s8 int8 (AMX)",
        "vnni": "u8s8 int8 (AVX512-VNNI)",
        "float": "exact float32 SGEMM on the int8 codes (no VNNI or AMX here: int8 kernels are slower)",
    }[_kernel()]


def warn_if_slow() -> None:
    """One note per process when the CPU has no int8 dot-product instructions."""
    global _WARNED
    if _kernel() == "float" and not _WARNED:
        _WARNED = True
        log.warning(
            "cpu_int8: this CPU has no AVX512-VNNI or AMX, whose int8 kernels would make the product faster than "
            "float; it runs as an exact float32 product of the int8 codes (the same results, float speed at "
            "best; int8 oneDNN ran 25-50x slower than float here, bench/int8_matmul.py). For speed on this CPU "
            "export to ONNX Runtime (model/model.onnx)."
        )


_WARNED = False


@register_module_type
class Int8Linear(PackedLinear):
    backend = "cpu_int8"
    # Only traced calls (FLOP counting) take the float path: a kept float copy of the weight would be
    # memory the int8 kernel never uses, yet cost.peak_memory counts it (inference_caches).
    caches_float_weight = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 8,
        granularity: str = "per_channel",
        group_size: int = 128,
        symmetric: bool = True,
        act_bits: int | None = None,
        bias: bool = True,
    ):
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"cpu_int8 needs one scale per output channel or per tensor, not {granularity!r}"
            )
        super().__init__(in_features, out_features, bits, granularity, group_size, symmetric, act_bits, bias)
        self.register_buffer(
            "w_int8_t", torch.zeros(in_features, out_features, dtype=torch.int8), persistent=False
        )
        # Inputs are int8 either way (static range when act_bits was set in QAT/PTQ, else dynamic).
        self.static_act_bits, self.act_bits = act_bits, 8

    def meta(self) -> dict:
        return {**super().meta(), "act_bits": self.static_act_bits}

    def _codes_changed(self) -> None:
        self.w_int8_t = self.codes().t().contiguous().to(self.qweight.device)
        self._w_float_t = None

    def inference_caches(self) -> list[Tensor]:
        cached = getattr(self, "_w_float_t", None)
        return [*super().inference_caches(), *([cached] if cached is not None else [])]

    def _float_codes(self) -> Tensor | None:
        """The codes as float32 for :func:`int_mm` on CPUs without int8 instructions (built once)."""
        if _kernel() != "float":
            return None
        if getattr(self, "_w_float_t", None) is None or self._w_float_t.device != self.w_int8_t.device:
            self._w_float_t = self.w_int8_t.float()
        return self._w_float_t

    def forward(self, x: Tensor) -> Tensor:
        # FLOP counters trace: the same multiply-adds as a float linear (its weight not kept)
        if torch.jit.is_tracing():
            return super().forward(x)
        shape = x.shape
        y = int8_matmul(
            x.reshape(-1, self.in_features),
            self.w_int8_t,
            self.scale,
            self.zero_point,
            self.act_scale,
            self._float_codes(),
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        act = f"static int{self.act_bits}" if self.act_scale is not None else "dynamic per-token int8"
        return super().extra_repr() + f", activations={act}"


@register_module_type
class Int8Conv2d(PackedConv2d):
    """``cpu_int8`` conv: im2col (``F.unfold``) patches x the int8 filter codes with ``torch._int_mm``.

    Same codes, scales, activation handling and on-disk format as :class:`Int8Linear` (and
    :class:`~dpq.quant.conv.PackedConv2d`); one scale per output channel or per tensor.
    """

    backend = "cpu_int8"
    # Only traced calls (FLOP counting) take the float path: a kept float copy of the weight would be
    # memory the int8 kernel never uses, yet cost.peak_memory counts it (inference_caches).
    caches_float_weight = False

    def __init__(self, *args, granularity: str = "per_channel", act_bits: int | None = None, **kwargs):
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"cpu_int8 needs one scale per output channel or per tensor, not {granularity!r}"
            )
        super().__init__(*args, granularity=granularity, act_bits=act_bits, **kwargs)
        g = self.groups
        # [groups, K, out/groups]: each group's filter codes as the right operand of torch._int_mm.
        self.register_buffer(
            "w_int8_t",
            torch.zeros(g, self.in_features, self.out_features // g, dtype=torch.int8),
            persistent=False,
        )
        self.static_act_bits, self.act_bits = act_bits, 8  # inputs are int8 either way (static or dynamic)

    def meta(self) -> dict:
        return {**super().meta(), "act_bits": self.static_act_bits}

    def _codes_changed(self) -> None:
        g = self.groups
        codes = self.codes().reshape(g, self.out_features // g, self.in_features)
        self.w_int8_t = codes.transpose(1, 2).contiguous().to(self.qweight.device)

    def _per_group(self, t: Tensor | None, i: int) -> Tensor | None:
        """Group ``i``'s slice of a per-output-channel qparam (a per-tensor one as is)."""
        if t is None or t.numel() == 1:
            return t
        n = self.out_features // self.groups
        return t.reshape(-1)[i * n : (i + 1) * n]

    def forward(self, x: Tensor) -> Tensor:
        # FLOP counters trace: the same multiply-adds as a float conv (its weight not kept)
        if torch.jit.is_tracing():
            return super().forward(x)
        x = F.pad(
            x,
            self._reversed_padding_repeated_twice,
            mode="constant" if self.padding_mode == "zeros" else self.padding_mode,
        )
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        out_h = (h - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (w - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x.float(), self.kernel_size, dilation=self.dilation, padding=0, stride=self.stride)
        g, k = self.groups, self.in_features
        cols = cols.reshape(b, g, k, -1).permute(1, 0, 3, 2).reshape(g, -1, k)  # [groups, B * positions, K]
        y = torch.cat(
            [
                int8_matmul(
                    cols[i],
                    self.w_int8_t[i],
                    self._per_group(self.scale, i),
                    self._per_group(self.zero_point, i),
                    self.act_scale,
                )
                for i in range(g)
            ],
            dim=-1,
        )
        if self.bias is not None:
            y = y + self.bias
        return (
            y.reshape(b, out_h * out_w, self.out_features)
            .transpose(1, 2)
            .reshape(b, -1, out_h, out_w)
            .to(x.dtype)
        )

    def extra_repr(self) -> str:
        act = f"static int{self.act_bits}" if self.act_scale is not None else "dynamic per-patch int8"
        return super().extra_repr() + f", activations={act}, im2col"
