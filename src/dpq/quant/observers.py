"""Activation fake quantization: per-tensor symmetric int8 with an observed range.

Why hand-written: torchao's QAT activation fake quantizer is per-token and dynamic (it
recomputes the range from every input), which a static int8 kernel cannot reproduce; here
the range is *observed* -- a running min-max during QAT (exponential moving average, as
``torch.ao``'s ``MovingAverageMinMaxObserver``), or min-max / percentile over N calibration
batches in PTQ -- and then frozen, so the deployed kernel (``cpu_int8``) uses the very same
scale. Grid ``[-128, 127]``, ``scale = amax / 127.5`` (torchao's symmetric rule).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .affine import EPS
from .config import qrange

MODES = ("qat", "calibrate_minmax", "calibrate_percentile", "frozen")
_QUANTILE_MAX_ELEMENTS = 1 << 24  # torch.quantile's input limit


def act_scale_from_amax(amax: Tensor, bits: int = 8) -> Tensor:
    qmin, qmax = qrange(bits)
    return torch.clamp(amax.float() / (float(qmax - qmin) / 2), min=EPS)


def fake_quantize_activation(x: Tensor, scale: Tensor, bits: int = 8) -> Tensor:
    """Per-tensor symmetric quantize-dequantize with a straight-through estimator (exact in forward)."""
    qmin, qmax = qrange(bits)
    s = scale.to(x.dtype)
    q = torch.clamp(torch.round(x.detach() * (1.0 / s)), qmin, qmax) * s
    return q + (x - x.detach())


def fake_quantize_dynamic(x: Tensor) -> Tensor:
    """Per-tensor asymmetric uint8 quantize-dequantize over ``x``'s own range, as ONNX Runtime's
    ``DynamicQuantizeLinear`` defines it (range widened to include 0, ``scale = range / 255``, zero
    point ``round(-min / scale)`` saturated to 0..255, round half to even), straight-through gradient.
    Why: the kernels ``quantize_dynamic`` emits (``DynamicQuantizeMatMul``, ``QAttention``) quantize
    their input so; a model trained and evaluated with it is the model those kernels run.

    Without a gradient to carry (evaluation, inference) the same arithmetic runs in place on one
    buffer, with one pass for the range (``aminmax``) and no straight-through terms: bit-identical
    results in fewer passes. These passes are what made the ``packed`` model slower than its float
    model in PyTorch (README, "packed")."""
    xd = x.detach().float()
    lo, hi = torch.aminmax(xd)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    s = torch.clamp((hi - lo) / 255.0, min=EPS)
    zp = torch.clamp(torch.round(-lo / s), 0, 255)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.div(xd, s).round_().add_(zp).clamp_(0, 255).sub_(zp).mul_(s).to(x.dtype)
    q = (torch.clamp(torch.round(xd / s) + zp, 0, 255) - zp) * s
    return q.to(x.dtype) + (x - x.detach())


class ActivationFakeQuant(nn.Module):
    """Observes the input range and fake-quantizes the input to ``bits`` (8) per tensor.

    Modes: ``qat`` (training: update the running range, then quantize; eval: frozen range),
    ``calibrate_minmax`` / ``calibrate_percentile`` (collect the range, pass inputs through
    unquantized), ``frozen`` (quantize with the stored range). ``amax`` is a persistent
    buffer, so Lightning checkpoints and the QAT callback's state carry it.
    """

    def __init__(
        self,
        bits: int = 8,
        averaging_constant: float = 0.01,
        percentile: float = 99.99,
        dynamic: bool = False,
    ):
        super().__init__()
        self.bits, self.averaging_constant, self.percentile = bits, averaging_constant, percentile
        self.dynamic = dynamic  # each input's own range (fake_quantize_dynamic): nothing observed or frozen
        self.mode = "qat"
        self.register_buffer("amax", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.long))  # inputs (batches) seen

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        if mode.startswith("calibrate"):
            self.amax.zero_()
            self.observed.zero_()
        self.mode = mode

    @property
    def ready(self) -> bool:
        return bool(self.observed.item() > 0)

    def scale(self) -> Tensor:
        if not self.ready:
            raise RuntimeError(
                "activation range was never observed (a layer the forward does not call?): run training "
                "steps or calibration batches through it, or leave it out of the quantize stage's targets"
            )
        return act_scale_from_amax(self.amax, self.bits)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        x = x.detach().float()
        n = int(self.observed.item())
        if self.mode == "calibrate_percentile":
            flat = x.abs().flatten()
            if flat.numel() > _QUANTILE_MAX_ELEMENTS:  # deterministic stride sample
                flat = flat[:: flat.numel() // _QUANTILE_MAX_ELEMENTS + 1]
            batch = torch.quantile(flat, self.percentile / 100.0)
            self.amax.copy_((self.amax * n + batch) / (n + 1))  # mean over batches
        else:
            batch = x.abs().amax()
            if n == 0:
                self.amax.copy_(batch)
            elif self.mode == "calibrate_minmax":
                self.amax.copy_(torch.maximum(self.amax, batch))
            else:
                self.amax.add_(self.averaging_constant * (batch - self.amax))
        self.observed.add_(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic:
            return fake_quantize_dynamic(x)
        if self.mode.startswith("calibrate"):
            self._observe(x)
            return x
        if self.mode == "qat" and self.training:
            self._observe(x)
        if not self.ready:
            return x  # nothing observed yet (eval before the first training step)
        return fake_quantize_activation(x, self.scale(), self.bits)

    def extra_repr(self) -> str:
        if self.dynamic:
            return f"bits={self.bits}, dynamic uint8 range per input"
        return f"bits={self.bits}, mode={self.mode}, amax={float(self.amax):.4g}"
