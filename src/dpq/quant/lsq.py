"""Learned step size quantization (LSQ, Esser et al., ICLR 2020) for weights.

Why hand-written: torchao's ``range_learning`` makes the scale a parameter but has neither
LSQ's gradient scale ``g = 1/sqrt(N_w * Q_P)`` (under SGD, without it the step's gradient is far
too large relative to the weights' and training is unstable; see below for AdamW) nor per-tensor steps, and in the
asymmetric case it also learns a float zero point, which would move 0.0 off the grid and
revive pruned weights. The grid is symmetric (zero point 0), so an exactly-zero weight is
quantized to code 0 and stays exactly zero whatever the step.

Forward, per block of weights sharing one step ``s`` (``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``)::

    w_hat = round(clamp(w / s, -Q_N, Q_P)) * s

with the straight-through estimator for ``round`` and the step's gradient multiplied by
``g`` (paper eq. 3-5). Steps are stored flat (1-D) so the optimizer's no-weight-decay group
(``ndim < 2``) picks them up.

The paper trains with SGD, where ``g`` sets the step's learning rate. dpq's stages train with AdamW,
whose update divides each gradient by its own running RMS: a constant ``g`` cancels (50 steps with and
without it differ by < 3e-4 relative), so under AdamW each step moves about ``lr`` per update in its
own units, like every weight, and ``g`` matters only against Adam's epsilon. It is kept for SGD and
as the paper states it; a step's pace under AdamW is the stage's ``lr``.

Initial step: the paper's ``2 * mean(|w|) / sqrt(Q_P)`` suits training from scratch; on an
already trained (and pruned) model a short QAT barely moves the step, and that rule is 11x
coarser than min-max at 8 bits for uniform-like weights. So, as LSQ+ (Bhalgat et al. 2020)
proposes, each block starts at the step with the least quantization MSE among
``{0.05, ..., 1.0} x`` its min-max step -- never worse than min-max, finer where clipping
pays off (low bit widths).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .affine import EPS, Blocks, qparams_from_range
from .config import QuantConfig, qrange

# Smallest step: keeps 1/s^2 in the step's gradient finite in float32.
STEP_MIN = 1e-8


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Exactly ``x`` in forward (``t - t`` is 0); multiplies the gradient by ``scale`` in backward."""
    t = x * scale
    return x.detach() + (t - t.detach())


def round_ste(x: Tensor) -> Tensor:
    """Exactly ``round(x)`` in forward, identity gradient in backward."""
    return x.detach().round() + (x - x.detach())


class LSQWeightQuantizer(nn.Module):
    """Fake-quantizes a ``[out, in]`` weight with learned per-block steps."""

    def __init__(self, cfg: QuantConfig, weight: Tensor):
        super().__init__()
        if not cfg.symmetric:
            raise ValueError("LSQ is implemented for the symmetric grid only (zero point 0)")
        self.config = cfg  # torchao's QAT convert step reads ``weight_fake_quantizer.config``
        self.bits = cfg.bits
        self.layout = Blocks(cfg.granularity, weight.shape[0], weight.shape[1], cfg.group_size)
        self.qmin, self.qmax = qrange(cfg.bits)
        self.step = nn.Parameter(self.initial_step(weight).reshape(-1))
        # Weights per step (padding excluded on average; the paper's N_w).
        n_per_block = weight.numel() / self.step.numel()
        self.grad_factor = 1.0 / math.sqrt(n_per_block * self.qmax)

    @torch.no_grad()
    def initial_step(self, weight: Tensor, candidates: int = 20) -> Tensor:
        """Per block, the least-MSE step among ``linspace(0.05, 1, candidates) x`` the min-max step."""
        blocks = self.layout.split(weight.detach().float())
        minmax, _ = qparams_from_range(blocks.amin(dim=-1), blocks.amax(dim=-1), self.bits, symmetric=True)
        best_err = torch.full_like(minmax, float("inf"))
        best = minmax.clone()
        for f in torch.linspace(0.05, 1.0, candidates).tolist():
            s = (minmax * f).clamp(min=EPS).unsqueeze(-1)
            err = (
                (torch.clamp(torch.round(blocks * (1.0 / s)), self.qmin, self.qmax) * s - blocks) ** 2
            ).sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s.squeeze(-1), best)
        # An all-zero block (fully pruned, or per-group padding) quantizes to 0 whatever the step;
        # a tiny step there would overflow 1/s^2 in the step's gradient, so it starts at 1.
        return torch.where(blocks.abs().amax(dim=-1) > 0, best, torch.ones_like(best)).clamp(min=STEP_MIN)

    def scale(self) -> Tensor:
        """Current steps as ``[A, B]`` (what conversion stores as the scale)."""
        return self.step.detach().float().clamp(min=STEP_MIN).reshape(self.layout.qparam_shape)

    def qparams(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        s = self.scale()
        return s, torch.zeros_like(s)

    def forward(self, weight: Tensor) -> Tensor:
        a, b = self.layout.qparam_shape
        s = grad_scale(self.step.clamp(min=STEP_MIN), self.grad_factor).reshape(a, b, 1)
        blocks = self.layout.split(weight)
        v = torch.clamp(blocks * (1.0 / s), self.qmin, self.qmax)
        return self.layout.merge(round_ste(v) * s).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.layout.granularity}, steps={self.step.numel()}"
