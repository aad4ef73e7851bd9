"""``quantize``: quantization-aware training with fake-quantized weights, then a real low-bit model.

The :class:`QuantizationAware` callback swaps the target ``nn.Linear`` modules for
fake-quantized ones at setup (same Parameter objects, so the optimizer and state-dict keys
are unchanged); after training the stage converts them to packed low-bit modules and checks
that every pruned weight is still exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch

from dpq.errors import ConfigError
from dpq.quant import QATConfig, QuantizedLinear, convert_, prepare_qat_
from dpq.quant.fake import ALLOWED_BITS, ALLOWED_GRANULARITY
from dpq.stages.base import KDStageConfig, Stage, register


class SparsityLost(RuntimeError):
    """Quantization turned a pruned (exactly-zero) weight non-zero."""


class QuantizationAware(L.Callback):
    """Fake-quantize target linears for the whole fit (straight-through estimator in backward)."""

    def __init__(self, name: str, cfg: QATConfig):
        self.name, self.cfg = name, cfg
        self.prepared: list[str] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.prepared:
            self.prepared = prepare_qat_(pl_module.model, self.cfg)

    def state_dict(self) -> dict:
        return {"prepared": list(self.prepared), "config": self.cfg.to_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.prepared = list(state_dict.get("prepared", []))


@dataclass
class QuantizeConfig(KDStageConfig):
    epochs: int = 1
    lr: float = 1e-5
    bits: int = 4
    granularity: str = "per_channel"
    targets: object = None  # module selector(s); null = the model config's quant_targets

    def check(self, key: str) -> None:
        super().check(key)
        if self.bits not in ALLOWED_BITS:
            raise ConfigError(f"{key}.bits", self.bits, f"must be one of {', '.join(map(str, ALLOWED_BITS))}")
        if self.granularity not in ALLOWED_GRANULARITY:
            raise ConfigError(f"{key}.granularity", self.granularity, f"must be one of {', '.join(ALLOWED_GRANULARITY)}")


@torch.no_grad()
def check_masks_kept(model, masks) -> None:
    """Raise :class:`SparsityLost` if any pruned weight is no longer exactly zero."""
    for name, keep in (masks or {}).items():
        mod = model.get_submodule(name)
        w = mod.dequantize() if isinstance(mod, QuantizedLinear) else mod.weight
        revived = int((w[~keep.to(w.device)] != 0).sum())
        if revived:
            raise SparsityLost(f"{name}: {revived} pruned weights became non-zero during quantization")


@register
class QuantizeStage(Stage):
    kind = "quantize"
    Config = QuantizeConfig

    def check_order(self, before: list[Stage]) -> None:
        if any(s.kind == "quantize" for s in before):
            raise ConfigError("pipeline.order", [s.name for s in before] + [self.name], "only one quantize stage is allowed")
        super().check_order(before)

    def run(self, run) -> None:
        cfg: QuantizeConfig = self.cfg
        student = run.ensure_student()
        targets = cfg.targets if cfg.targets is not None else run.model_spec.get("quant_targets")
        if targets is None:
            raise ConfigError(f"{self.key}.targets", None, "no quantization targets: set it or model.quant_targets")
        qcfg = QATConfig(bits=cfg.bits, granularity=cfg.granularity, targets=targets)
        qat = QuantizationAware(self.name, qcfg)
        run.fit(student, self, kd_alpha=cfg.alpha, callbacks=[qat])
        check_masks_kept(student, run.masks)
        fake = run.evaluate(student, self.name)
        converted = convert_(student)
        check_masks_kept(student, run.masks)
        run.quantized = True
        extra = {"bits": cfg.bits, "granularity": cfg.granularity, "quantized_modules": len(converted),
                 "fake_quant_accuracy": fake["accuracy"],
                 "sparsity_kept": True}
        rec = run.record(self, student, extra=extra)
        rec["metrics"]["real_minus_fake_accuracy"] = rec["metrics"]["accuracy"] - fake["accuracy"]
