"""``distill``: train the student on alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE."""

from __future__ import annotations

from dataclasses import dataclass

from dpq.core.errors import ConfigError
from dpq.stages.base import KDStageConfig, Stage, register


@dataclass
class DistillConfig(KDStageConfig):
    epochs: int = 3
    lr: float = 1e-4


@register
class DistillStage(Stage):
    kind = "distill"
    Config = DistillConfig

    def check_order(self, before: list[Stage]) -> None:
        if not any(s.trains_teacher for s in before):
            raise ConfigError(
                "pipeline.order",
                [s.name for s in before] + [self.name],
                f"stage '{self.name}' (distill) needs a teacher stage before it",
            )
        super().check_order(before)

    def run(self, state, ctx) -> None:
        student = ctx.ensure_student(state)
        ctx.fit(state, student, self, kd_alpha=self.cfg.alpha)
        ctx.record(state, self, student)
