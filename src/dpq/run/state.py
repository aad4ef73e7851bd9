"""The state a pipeline builds up, as plain data: what stages read and write, what a snapshot saves.

Passive on purpose: no method here trains, evaluates or writes anything. Stages change it
through the run's services (:class:`dpq.run.context.RunContext`), the runner saves it after
every stage (:mod:`dpq.run.snapshot`) and restores it on resume or from the stage cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dpq.distill.teachers import TeacherSignal
from dpq.prune.masks import Masks


@dataclass
class State:
    teacher: nn.Module | None = None  # frozen once its stage is done
    teacher_logits: TeacherSignal | None = None  # what distillation reads (cached logits, or an ensemble)
    teacher_ensemble: dict[str, Any] | None = (
        None  # {"members": [folders], "weights": [...]} when several teachers
    )
    student: nn.Module | None = None
    masks: Masks | None = None  # module name -> bool keep-mask (pruned weights are False)
    quantized: bool = False  # the student has been converted to a low-bit backend
    records: list[dict] = field(
        default_factory=list
    )  # one per finished stage (and spiral sub-stage): results.json's "stages"
    round: dict | None = None  # set by composite stages (spiral): merged into every record and logged metric
    fit_steps: dict[str, int] = field(
        default_factory=dict
    )  # optimizer steps each fit took (resume must reproduce them)
    stage_index: int | None = None  # index in pipeline.order of the last stage begun
    stage_name: str | None = None

    @property
    def final_model(self) -> tuple[nn.Module, str]:
        """The model a run exports: the student, or the teacher in a teacher-only pipeline."""
        return (self.student, "student") if self.student is not None else (self.teacher, "teacher")
