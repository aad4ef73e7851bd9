"""``recover``: fine-tune with the masks frozen (no pruned weight comes back) at a lower learning rate;
with ``qat: quantize``, on the fake-quantized student (quantize-aware recovery)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpq.core.errors import ConfigError
from dpq.stages.base import KDStageConfig, Stage, register
from dpq.stages.quantize import QuantAwareTraining, check_qat_name


@dataclass
class RecoverConfig(KDStageConfig):
    lr: float = 2e-5
    qat: Any = (
        None  # the later quantize / ptq stage whose fake quantization runs during recovery; null = float
    )

    def check(self, key: str) -> None:
        super().check(key)
        check_qat_name(key, self.qat)


@register
class RecoverStage(QuantAwareTraining, Stage):
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
        qat = self.qat_callbacks(student, ctx)
        try:  # ctx.fit adds MaskFreeze whenever masks exist
            ctx.fit(state, student, self, kd_alpha=self.cfg.alpha, callbacks=qat)
        finally:
            for q in qat:
                q.restore_float()
        ctx.record(state, self, student, extra={"qat": self.qat_settings()} if qat else None)
