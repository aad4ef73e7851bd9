"""Affine integer quantization of weight matrices: blocks, scales, zero points, codes.

The formulas are torchao's (``choose_qparams_affine`` / ``quantize_affine`` with an
integer zero point): signed grid ``[-2^(b-1), 2^(b-1)-1]``; symmetric scale
``max|w| / ((qmax - qmin) / 2)`` with zero point 0; asymmetric scale
``(max(w,0) - min(w,0)) / (qmax - qmin)`` with the zero point *rounded to an integer*, so
0.0 maps to a code and back to exactly 0.0 and pruned weights stay zero;
``code = clamp(round(w * (1/scale)) + zero_point)``, ``w_hat = (code - zero_point) * scale``.

Why written out here rather than called from torchao: torchao's QAT fake quantizer covers
only the symmetric per-channel / per-group min-max case (``dpq.quant.ao`` uses it there);
its asymmetric path uses a float zero point (0.0 not representable), it has no per-tensor
weight granularity, no percentile clipping, and needs ``in_features % group_size == 0``.
This module covers those cases with the same arithmetic, and
``tests/test_quant_numerics.py`` checks it bit-for-bit against torchao where both apply.

A :class:`Blocks` layout views a ``[out, in]`` weight as ``[A, B, K]`` (A rows of B
blocks of K weights sharing one scale): per-tensor ``[1, 1, out*in]``, per-channel
``[out, 1, in]``, per-group ``[out, ceil(in/g), g]`` (the last group is zero-padded for
the range computation; padding with zeros never changes a range that always includes 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import qrange

# torchao's default for symmetric weight qparams (finfo(float32).smallest_normal): an
# all-zero block gets this scale and codes 0.
EPS = torch.finfo(torch.float32).smallest_normal


@dataclass(frozen=True)
class Blocks:
    """How a ``[out, in]`` weight is split into blocks that share a scale / zero point."""

    granularity: str
    out_features: int
    in_features: int
    group_size: int = 128

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.granularity == "per_tensor":
            return 1, 1, self.out_features * self.in_features
        if self.granularity == "per_channel":
            return self.out_features, 1, self.in_features
        if self.granularity == "per_group":
            g = self.group_size
            return self.out_features, math.ceil(self.in_features / g), g
        raise ValueError(f"unknown granularity {self.granularity!r}")

    @property
    def qparam_shape(self) -> tuple[int, int]:
        a, b, _ = self.shape
        return a, b

    @property
    def padding(self) -> int:
        if self.granularity != "per_group":
            return 0
        a, b, k = self.shape
        return b * k - self.in_features

    def split(self, w: Tensor, pad_value: float = 0.0) -> Tensor:
        """``[out, in]`` -> ``[A, B, K]`` (a view unless per-group padding is needed)."""
        if self.padding:
            w = F.pad(w, (0, self.padding), value=pad_value)
        return w.reshape(self.shape)

    def merge(self, blocks: Tensor) -> Tensor:
        """Inverse of :meth:`split` (drops the padding)."""
        if self.granularity == "per_group":
            w = blocks.reshape(self.out_features, -1)
            return w[:, : self.in_features] if self.padding else w
        return blocks.reshape(self.out_features, self.in_features)

    def expand(self, per_block: Tensor) -> Tensor:
        """A ``[A, B]`` per-block tensor broadcast to the weight's ``[out, in]`` shape."""
        return self.merge(per_block.reshape(*self.qparam_shape, 1).expand(*self.shape))


def qparams_from_range(min_val: Tensor, max_val: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` (float32, same shape as the ranges) for a grid that contains 0."""
    qmin, qmax = qrange(bits)
    min_neg = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_pos = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    if symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp(amax / (float(qmax - qmin) / 2), min=EPS)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=EPS)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
    return scale, zero_point


def block_range(
    blocks: Tensor, percentile: float | None = None, symmetric: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-block ``(min, max)`` of ``[A, B, K]`` blocks: exact, or clipped at a percentile.

    Percentiles ignore NaN, so per-group padding is passed in as NaN (see :meth:`Blocks.split`).
    Symmetric clipping uses the percentile of |w|; asymmetric the lower/upper tails of w.
    """
    if percentile is None or percentile >= 100.0:
        return torch.amin(torch.nan_to_num(blocks, nan=0.0), dim=-1), torch.amax(
            torch.nan_to_num(blocks, nan=0.0), dim=-1
        )
    q = float(percentile) / 100.0
    if symmetric:
        amax = nanquantile_last(blocks.abs().float(), q)
        return -amax, amax
    return nanquantile_last(blocks.float(), 1.0 - q), nanquantile_last(blocks.float(), q)


QUANTILE_MAX_ELEMENTS = 1 << 24  # torch.nanquantile refuses a longer reduced dimension


def nanquantile_last(x: Tensor, q: float) -> Tensor:
    """``torch.nanquantile(x, q, dim=-1)`` (linear interpolation, NaN ignored), also for rows longer than
    torch accepts (a per-tensor percentile over a 4096 x 4096 weight or a large embedding table failed):
    then computed from the sorted row itself, the same definition, by hand because torch has no other."""
    if x.shape[-1] <= QUANTILE_MAX_ELEMENTS:
        return torch.nanquantile(x, q, dim=-1)
    ordered = torch.sort(x, dim=-1).values  # NaN sorts last
    n = (~torch.isnan(x)).sum(dim=-1)
    pos = q * (n - 1).clamp(min=0).to(x.dtype)
    lo, hi = pos.floor().long(), pos.ceil().long()
    v_lo = ordered.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    v_hi = ordered.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    out = v_lo + (v_hi - v_lo) * (pos - lo.to(x.dtype))
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def weight_qparams(
    w: Tensor, layout: Blocks, bits: int, symmetric: bool, percentile: float | None = None
) -> tuple[Tensor, Tensor]:
    """Scale and zero point ``[A, B]`` of weight ``w`` from its min-max (or percentile) range."""
    w = w.detach()
    clipped = percentile is not None and percentile < 100
    blocks = layout.split(w.float(), pad_value=float("nan") if clipped else 0.0)
    if clipped:
        # A percentile of the weights that are there: pruned zeros counted in it shrank a sparse row's range
        # (one weight kept in 64 was clipped to 37% of itself at p99). A block of zeros only gives range 0.
        blocks = blocks.masked_fill(blocks == 0, float("nan"))
        lo, hi = (torch.nan_to_num(t, nan=0.0) for t in block_range(blocks, percentile, symmetric))
    else:
        lo, hi = block_range(blocks, percentile, symmetric)
    return qparams_from_range(lo, hi, bits, symmetric)


def quantize_blocks(blocks: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Integer codes (as float) of ``[A, B, K]`` blocks with ``[A, B]`` qparams."""
    qmin, qmax = qrange(bits)
    s = scale.reshape(*scale.shape, 1)
    zp = zero_point.reshape(*zero_point.shape, 1)
    return torch.clamp(torch.round(blocks * (1.0 / s)) + zp, qmin, qmax)


def dequantize_blocks(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    s = scale.reshape(*scale.shape, 1)
    zp = zero_point.reshape(*zero_point.shape, 1)
    return (codes - zp) * s


def weight_codes(w: Tensor, layout: Blocks, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Codes ``[out, in]`` (float tensor of integers) of ``w`` under the given qparams."""
    return layout.merge(quantize_blocks(layout.split(w.detach().float()), scale, zero_point, bits))


def dequantize_codes(codes: Tensor, layout: Blocks, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Float32 ``[out, in]`` weight from codes; a code equal to its zero point gives exactly 0.0."""
    return layout.merge(dequantize_blocks(layout.split(codes.float()), scale, zero_point))


def fake_quantize_weight(w: Tensor, layout: Blocks, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize ``w`` with a straight-through estimator.

    The STE is written ``q + (w - w.detach())`` rather than ``w + (q - w).detach()``: both
    have identity gradient, but the former is bit-exact ``q`` in forward (``w - w`` is
    exactly 0), so a converted model reproduces the fake-quant model to the last bit.
    """
    blocks = layout.split(w.detach().float())
    q = layout.merge(dequantize_blocks(quantize_blocks(blocks, scale, zero_point, bits), scale, zero_point))
    q = q.to(w.dtype)
    return q + (w - w.detach())


def fake_quantize(
    w: Tensor,
    bits: int = 4,
    granularity: str = "per_channel",
    group_size: int = 128,
    symmetric: bool = True,
    percentile: float | None = None,
) -> Tensor:
    """Min-max (or percentile) fake quantization of a ``[out, in]`` weight, in one call."""
    if w.dim() != 2:
        raise ValueError(f"fake_quantize expects a [out, in] weight, got shape {tuple(w.shape)}")
    layout = Blocks(granularity, w.shape[0], w.shape[1], group_size)
    scale, zp = weight_qparams(w, layout, bits, symmetric, percentile)
    return fake_quantize_weight(w, layout, scale, zp, bits)
