"""Knowledge distillation: the loss, and a per-example cache of the teacher's logits.

Loss (Hinton et al.): ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE``.
The T^2 factor keeps the soft-label gradients on the scale of the hard-label ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class KDConfig:
    alpha: float = 0.5
    temperature: float = 2.0

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha}: must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
            cfg: KDConfig, teacher_log_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), teacher_log_probs, log_target=True, reduction="batchmean")
    loss = cfg.alpha * t * t * kl + (1.0 - cfg.alpha) * ce
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


class TeacherLogits:
    """The frozen teacher's logits per training example, computed on first use and then reused.

    Batches carry an ``idx`` column (the example's position in its split), so a stage that
    sees an example again -- later epochs, later stages -- reads the cached row instead of
    running the teacher. The teacher is in eval mode (no dropout), so a cached row equals
    what a fresh forward pass would give.
    """

    def __init__(self, teacher: nn.Module, num_examples: int, num_labels: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.logits = torch.zeros(num_examples, num_labels)
        self.filled = torch.zeros(num_examples, dtype=torch.bool)
        self.forward_examples = 0  # how many examples the teacher actually ran on (for tests and logs)

    @torch.no_grad()
    def __call__(self, inputs: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        idx_cpu = idx.cpu()
        missing = ~self.filled[idx_cpu]
        if missing.any():
            sel = missing.to(idx.device)
            sub = {k: v[sel] for k, v in inputs.items()}
            out = self.teacher(**sub)
            out = getattr(out, "logits", out)
            self.logits[idx_cpu[missing]] = out.float().cpu()
            self.filled[idx_cpu[missing]] = True
            self.forward_examples += int(missing.sum())
        return self.logits[idx_cpu].to(idx.device)

    def to(self, device) -> "TeacherLogits":
        self.teacher.to(device)
        return self


class EnsembleTeacher:
    """Several cached teachers as one: the weighted average of their tempered soft labels."""

    def __init__(self, teachers: list[TeacherLogits], weights: list[float] | None = None):
        from dpq.kd_losses import combine_teachers

        self.teachers, self.weights, self._combine = list(teachers), weights, combine_teachers
        combine_teachers([torch.zeros(1, 2)] * len(self.teachers), weights, 1.0)  # validates the weights now

    def log_probs(self, inputs: dict[str, torch.Tensor], idx: torch.Tensor, temperature: float) -> torch.Tensor:
        return self._combine([t(inputs, idx) for t in self.teachers], self.weights, temperature)

    def to(self, device) -> "EnsembleTeacher":
        for t in self.teachers:
            t.to(device)
        return self
