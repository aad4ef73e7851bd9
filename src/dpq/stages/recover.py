"""``recover``: fine-tune with the masks frozen (no pruned weight comes back) at a lower learning rate."""

from __future__ import annotations

from dataclasses import dataclass

from dpq.core.errors import ConfigError
from dpq.stages.base import KDStageConfig, Stage, register


@dataclass
class RecoverConfig(KDStageConfig):
    lr: float = 2e-5


@register
class RecoverStage(Stage):
    kind = "recover"
    Config = RecoverConfig

    def check_order(self, before: list[Stage]) -> None:
        if not any(s.prunes for s in before):
            raise ConfigError(
                "pipeline.order",
                [s.name for s in before] + [self.name],
                f"stage '{self.name}' (recover) needs a prune stage before it: it fine-tunes with the pruning "
                "masks frozen",
            )
        super().check_order(before)

    def run(self, state, ctx) -> None:
        student = ctx.ensure_student(state)
        ctx.fit(state, student, self, kd_alpha=self.cfg.alpha)  # ctx.fit adds MaskFreeze whenever masks exist
        ctx.record(state, self, student)
