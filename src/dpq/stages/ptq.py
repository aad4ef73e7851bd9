"""``ptq``: post-training quantization -- no training, ranges from N calibration batches.

A pipeline can end in ``ptq`` instead of ``quantize`` (presets ``dq_ptq``, ``dpq_ptq``).
Weight ranges come from the weights (min-max, or a percentile of |w| per block);
activation ranges (``act_bits=8``) from ``calibration_batches`` training batches. Then the
same conversion, sparsity check, export and measurement as the QAT stage
(:func:`dpq.stages.quantize.finish_quantization`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpq.core.errors import ConfigError
from dpq.core.nn import logits_of
from dpq.quant import calibrate_, check_zeros_kept, prepare_ptq_, zero_positions
from dpq.quant.config import ALLOWED_CALIBRATION
from dpq.quant.embedding import prepare_embedding_
from dpq.quant.zeros import summarize
from dpq.stages.base import Stage, register
from dpq.stages.quantize import QuantOptions, QuantStageMixin, finish_quantization


@dataclass
class PtqConfig(QuantOptions):
    kind: str = ""
    calibration: str = "minmax"  # minmax | percentile
    percentile: float = 99.99  # percentile calibration: of |w| per block, of |x| per batch (averaged)
    calibration_batches: int = 8  # training batches fed to the activation observers (act_bits=8)

    def check(self, key: str) -> None:
        if self.calibration not in ALLOWED_CALIBRATION:
            raise ConfigError(
                f"{key}.calibration", self.calibration, f"must be one of {', '.join(ALLOWED_CALIBRATION)}"
            )
        if (
            isinstance(self.calibration_batches, bool)
            or not isinstance(self.calibration_batches, int)
            or self.calibration_batches < 1
        ):
            raise ConfigError(
                f"{key}.calibration_batches", self.calibration_batches, "must be an integer >= 1"
            )
        self.check_quant(key, calibration=self.calibration, percentile=self.percentile)


@register
class PtqStage(QuantStageMixin, Stage):
    kind = "ptq"
    Config = PtqConfig

    def _quant_extra(self) -> dict:
        return {"calibration": self.cfg.calibration, "percentile": self.cfg.percentile}

    def run(self, state, ctx) -> None:
        student = ctx.ensure_student(state)
        qcfg, names = self.targets_of(student, ctx.model_spec)
        self.check_devices(ctx.trainer_device, ctx.latency_device)
        pruned = list(state.masks or {})
        before = zero_positions(student, sorted(set(pruned) | set(names)))
        prepare_ptq_(student, qcfg, names)
        if self.embedding_of(student) is not None:
            prepare_embedding_(student, self.cfg.embedding_config(), static=True)
        home = next(student.parameters()).device
        student.to(ctx.trainer_device)
        used = calibrate_(
            student,
            ctx.data.train_dataloader(),
            self.cfg.calibration_batches,
            forward=lambda m, b: logits_of(m, b),
        )
        student.to(home)
        report = check_zeros_kept(student, before, f"stage '{self.name}': after PTQ calibration")
        finish_quantization(
            self,
            state,
            ctx,
            student,
            qcfg,
            names,
            pruned,
            extra={
                "calibration": qcfg.calibration,
                "percentile": qcfg.percentile if qcfg.calibration == "percentile" else None,
                "calibration_batches": used,
                "ptq_zeros": summarize(report),
            },
        )
