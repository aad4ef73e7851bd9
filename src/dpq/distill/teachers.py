"""The teacher as distillation sees it: its logits per training example, cached, and ensembles.

A run's teacher signal is a :class:`TeacherLogits` (one frozen model) or an
:class:`EnsembleTeacher` (several, their tempered soft labels averaged). :func:`teacher_signal`
is the one place one is built -- by the teacher stage, and again when a run is restored from a
snapshot or the stage cache -- and :func:`cache_state` / :func:`load_cache_state` carry the
logit cache through snapshots and mid-stage checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dpq.distill.features import combine_teachers


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

    def to(self, device) -> TeacherLogits:
        self.teacher.to(device)
        return self


class EnsembleTeacher:
    """Several cached teachers as one: the weighted average of their tempered soft labels."""

    def __init__(self, teachers: list[TeacherLogits], weights: list[float] | None = None):
        self.teachers, self.weights, self._combine = list(teachers), weights, combine_teachers
        combine_teachers([torch.zeros(1, 2)] * len(self.teachers), weights, 1.0)  # validates the weights now

    def log_probs(
        self, inputs: dict[str, torch.Tensor], idx: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        return self._combine([t(inputs, idx) for t in self.teachers], self.weights, temperature)

    def to(self, device) -> EnsembleTeacher:
        for t in self.teachers:
            t.to(device)
        return self


TeacherSignal = TeacherLogits | EnsembleTeacher


def teacher_signal(
    teacher: nn.Module,
    num_examples: int,
    num_labels: int,
    members: Sequence[str | Path] = (),
    weights: Sequence[float] | None = None,
    load: Callable[[Path], nn.Module] | None = None,
) -> TeacherSignal:
    """The frozen ``teacher``'s cached logits; with ``members`` (saved model folders, read with
    ``load``), the ensemble of it and them, weighted by ``weights`` (this teacher first)."""
    own = TeacherLogits(teacher, num_examples, num_labels)
    if not members:
        return own
    extra = [TeacherLogits(load(Path(p)), num_examples, num_labels) for p in members]
    return EnsembleTeacher([own, *extra], [float(w) for w in weights] if weights is not None else None)


def teacher_caches(signal: TeacherSignal | None) -> list[TeacherLogits]:
    """The :class:`TeacherLogits` caches behind a teacher signal (ensemble members in order)."""
    if signal is None:
        return []
    members = getattr(signal, "teachers", None)
    return list(members) if members is not None else [signal]


def cache_state(caches: list[TeacherLogits]) -> dict[str, torch.Tensor]:
    """The caches as flat tensors: which rows are filled, their logits, the forward count."""
    out = {}
    for i, c in enumerate(caches):
        out[f"{i}.logits"] = c.logits.detach().cpu().contiguous()
        out[f"{i}.filled"] = c.filled.detach().cpu().contiguous()
        out[f"{i}.forward_examples"] = torch.tensor([int(c.forward_examples)])
    return out


def load_cache_state(caches: list[TeacherLogits], state: dict[str, torch.Tensor]) -> None:
    """Put saved rows back, so a resumed run reads exactly the logits the first run computed.

    Raises ``ValueError`` when the saved cache does not fit these teachers."""
    n = len({k.split(".")[0] for k in state})
    if n != len(caches):
        raise ValueError(f"teacher logit cache has {n} members, the run's teacher has {len(caches)}")
    for i, c in enumerate(caches):
        logits, filled = state[f"{i}.logits"], state[f"{i}.filled"]
        if tuple(logits.shape) != tuple(c.logits.shape):
            raise ValueError(
                f"teacher logit cache {i} has shape {tuple(logits.shape)}, expected {tuple(c.logits.shape)}"
            )
        c.logits.copy_(logits)
        c.filled.copy_(filled)
        c.forward_examples = int(state[f"{i}.forward_examples"][0])
