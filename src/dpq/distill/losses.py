"""The distillation loss on logits.

Loss (Hinton et al.): ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE``.
The T^2 factor keeps the soft-label gradients on the scale of the hard-label ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KDConfig:
    alpha: float = 0.5
    temperature: float = 2.0

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha}: must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    cfg: KDConfig,
    teacher_log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the total loss and its parts (for logging).

    The teacher is given as logits, or directly as tempered log-probabilities (an ensemble's
    averaged soft labels, which have no logits of their own).
    """
    ce = F.cross_entropy(student_logits, labels)
    if (teacher_logits is None and teacher_log_probs is None) or cfg.alpha == 0.0:
        return ce, {"ce": ce.detach()}
    t = cfg.temperature
    if teacher_log_probs is None:
        teacher_log_probs = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), teacher_log_probs, log_target=True, reduction="batchmean"
    )
    loss = cfg.alpha * t * t * kl + (1.0 - cfg.alpha) * ce
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
