"""``quantize``: quantization-aware training, then conversion to a real low-bit backend.

:class:`QuantizationAware` swaps the target Linears and Conv2ds for fake-quantized ones at setup (same
Parameter objects, so the optimizer and state-dict keys are unchanged; LSQ steps and
activation ranges travel in its ``state_dict`` under a unique ``state_key``). After
training, :func:`finish_quantization` (shared with the ``ptq`` stage) measures the
fake-quant model, converts it with ``backend`` (``packed`` | ``cpu_int8`` | ``torchao`` |
``bnb``), checks that every pruned weight is still exactly zero, writes the model at its
real bit width to disk and reloads it, and records the reloaded model's *measured*
accuracy next to the fake-quant accuracy and their difference.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from dpq.errors import ConfigError, IntegrityError
from dpq.quant import (
    QuantConfig,
    check_zeros_kept,
    convert_,
    load_quantized_,
    prepare_qat_,
    resolve_scheme,
    safetensors_data_bytes,
    save_quantized,
    select_targets,
    zero_positions,
)
from dpq.quant.backends import check_device, check_keeps_zeros, check_module_kinds
from dpq.quant.fake import load_quantizer_state_, quantizer_state
from dpq.quant.integrity import SparsityLost, summarize
from dpq.stages.base import KDStageConfig, Stage, register

log = logging.getLogger(__name__)

QUANT_KINDS = ("quantize", "ptq")
PRUNING_KINDS = ("prune", "spiral")

__all__ = ["QuantizationAware", "QuantizeConfig", "QuantizeStage", "QuantOptions", "SparsityLost", "finish_quantization"]


@dataclass
class QuantOptions:
    """Quantization parameters shared by the ``quantize`` (QAT) and ``ptq`` stages."""

    bits: int = 4  # weight bits: 2 | 3 | 4 | 8
    granularity: str = "per_channel"  # per_tensor | per_channel | per_group
    group_size: int = 128  # per_group: input weights per scale
    symmetric: bool = True  # false: integer zero point (0.0 stays exactly representable)
    act_bits: Any = None  # null (float activations) | 8 (per-tensor int8, observed range)
    targets: object = None  # module selector(s); null = the model config's quant_targets
    quantize_head: bool = False  # the classifier head (last Linear) stays float unless true
    backend: str = "packed"  # packed | cpu_int8 | torchao | bnb
    scheme: Any = None  # backend format; null = chosen by bits (torchao: int8_weight_only/int8_dynamic/int4_weight_only; bnb: nf4/fp4/int8)

    def quant_config(self, targets: Any = None, **extra) -> QuantConfig:
        t = targets if targets is not None else (self.targets if self.targets is not None else r"re:.*")
        return QuantConfig(bits=self.bits, granularity=self.granularity, group_size=self.group_size,
                           symmetric=self.symmetric, act_bits=self.act_bits, targets=t,
                           quantize_head=self.quantize_head, **extra)

    def check_quant(self, key: str, **extra) -> None:
        qcfg = self.quant_config(**extra).validate(key)
        resolve_scheme(self.backend, self.scheme, qcfg, key)


def trainer_device(run) -> str:
    """Where the stage's Trainer runs the model: cpu or cuda."""
    accel = str(getattr(run.trainer_cfg, "accelerator", None) or run.trainer_cfg.get("accelerator", "cpu"))
    if accel in ("gpu", "cuda"):
        return "cuda"
    if accel == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


class QuantizationAware(L.Callback):
    """Fake-quantize the target Linears / Conv2ds for the whole fit (straight-through estimator in backward)."""

    def __init__(self, name: str, cfg: QuantConfig, names: list[str] | None = None):
        self.name, self.cfg, self.names = name, cfg, names
        self.prepared: list[str] = []
        self.model: torch.nn.Module | None = None
        self._pending: dict | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.model = pl_module.model
        if not self.prepared:
            self.prepared = prepare_qat_(self.model, self.cfg, self.names)
        if self._pending:
            load_quantizer_state_(self.model, self._pending)
            self._pending = None

    def state_dict(self) -> dict:
        return {"prepared": list(self.prepared), "config": self.cfg.to_dict(),
                "quantizers": quantizer_state(self.model) if self.model is not None else {}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.prepared = list(state_dict.get("prepared", [])) or self.prepared
        quantizers = state_dict.get("quantizers") or {}
        if self.model is not None:
            load_quantizer_state_(self.model, quantizers)
        else:
            self._pending = quantizers


def _reference_logits(model: torch.nn.Module, batch: dict, device: str) -> torch.Tensor:
    from dpq.data import model_inputs
    from dpq.module import logits_of

    model.to(device).eval()
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(batch).items()}
    with torch.no_grad():
        return logits_of(model, inputs).float().cpu()


def _log(run, values: dict) -> None:
    if run.logger is None:
        return
    try:
        run.logger.log_metrics({f"result/{k}": v for k, v in values.items()}, step=len(run.records) - 1)
    except Exception as e:  # a tracker failure must not fail the run
        log.warning("logging quantization results failed: %s", e)


def finish_quantization(stage: Stage, run, model: torch.nn.Module, qcfg: QuantConfig, names: list[str],
                        pruned: list[str], extra: dict) -> dict:
    """Fake-quant accuracy -> convert -> zeros check -> export + reload -> record (measured) + delta."""
    opts: QuantOptions = stage.cfg
    scheme = resolve_scheme(opts.backend, opts.scheme, qcfg, stage.key)
    device = "cuda" if "cpu" not in scheme.devices else trainer_device(run)
    fake = run.evaluate(model, stage.name)
    batch = next(iter(run.data.val_dataloader()))
    fake_logits = _reference_logits(model, batch, device)
    before = zero_positions(model, sorted(set(pruned) | set(names)))
    convert_(model, backend=opts.backend, scheme=scheme.name, names=names, device=device)
    report = check_zeros_kept(model, before, f"stage '{stage.name}': after conversion to {opts.backend} ({scheme.name})")
    real_logits = _reference_logits(model, batch, device)
    max_diff = float((real_logits - fake_logits).abs().max())
    rel_diff = max_diff / max(float(fake_logits.abs().max()), 1e-12)

    # Export at the real bit width, then reload every tensor of the model from that file (in
    # place: quantized modules rebuilt from their packed data, float tensors overwritten), so
    # what is measured below is the model as it comes back from disk.
    with tempfile.TemporaryDirectory(prefix="dpq-quant-") as tmp:
        path = save_quantized(model, tmp)
        disk_bytes, data_bytes = Path(path).stat().st_size, safetensors_data_bytes(path)
        load_quantized_(model, tmp)
    reload_logits = _reference_logits(model, batch, device)
    if not torch.allclose(reload_logits, real_logits, rtol=0, atol=1e-6 * max(1.0, float(real_logits.abs().max()))):
        raise IntegrityError(f"stage '{stage.name}': the {opts.backend} model reloaded from disk gives different logits "
                             f"(max diff {float((reload_logits - real_logits).abs().max()):.3g})")
    run.quantized = True
    rec = run.record(stage, model, extra={
        "backend": opts.backend, "scheme": scheme.name, "bits": qcfg.bits, "granularity": qcfg.granularity,
        "group_size": qcfg.group_size if qcfg.granularity == "per_group" else None, "symmetric": qcfg.symmetric,
        "act_bits": qcfg.act_bits, "quantize_head": qcfg.quantize_head, "quantized_modules": len(names),
        "quantized_names": list(names),
        "fake_quant_accuracy": fake["accuracy"], "fake_quant_val_accuracy": fake["val_accuracy"],
        "backend_max_logit_diff": max_diff, "backend_rel_logit_diff": rel_diff,
        "sparsity_kept": True, "zeros": summarize(report), **extra})
    delta = rec["metrics"]["accuracy"] - fake["accuracy"]
    rec["backend_accuracy_delta"] = delta
    rec["metrics"].update(fake_quant_accuracy=fake["accuracy"], backend_accuracy_delta=delta,
                          disk_size_bytes=disk_bytes, disk_data_bytes=data_bytes)
    log.info("%s: fake-quant accuracy %.4f, %s (%s) accuracy %.4f (delta %+.4f), max |logit diff| %.3g; on disk %d bytes",
             stage.name, fake["accuracy"], opts.backend, scheme.name, rec["metrics"]["accuracy"], delta, max_diff, disk_bytes)
    _log(run, {"fake_quant_accuracy": fake["accuracy"], "backend_accuracy_delta": delta,
               "backend_max_logit_diff": max_diff, "disk_size_bytes": disk_bytes})
    return rec


class QuantStageMixin:
    """Order rules and run-time device checks shared by ``quantize`` and ``ptq``."""

    def check_order(self, before: list[Stage]) -> None:
        earlier = [s.name for s in before if s.kind in QUANT_KINDS]
        if earlier:
            raise ConfigError("pipeline.order", [s.name for s in before] + [self.name],
                              f"only one quantization stage is allowed ({earlier[0]} already quantizes)")
        qcfg = self.cfg.quant_config(**self._quant_extra())
        scheme = resolve_scheme(self.cfg.backend, self.cfg.scheme, qcfg, self.key)
        check_keeps_zeros(self.cfg.backend, scheme, [s.name for s in before if s.kind in PRUNING_KINDS], self.key)
        super().check_order(before)

    def check_devices(self, model_device: str, latency_device: str) -> None:
        """Raise :class:`ConfigError` if the backend cannot run where the model is evaluated or timed."""
        qcfg = self.cfg.quant_config(**self._quant_extra())
        scheme = resolve_scheme(self.cfg.backend, self.cfg.scheme, qcfg, self.key)
        check_device(self.cfg.backend, scheme, model_device, self.key, "trainer.accelerator (where the model is evaluated)")
        check_device(self.cfg.backend, scheme, latency_device, self.key, "cost.device (where latency is measured)")

    def _quant_extra(self) -> dict:
        return {}

    def _targets(self, run, model) -> tuple[QuantConfig, list[str]]:
        cfg = self.cfg
        targets = cfg.targets if cfg.targets is not None else run.model_spec.get("quant_targets")
        if targets is None:
            raise ConfigError(f"{self.key}.targets", None, "no quantization targets: set it or model.quant_targets")
        qcfg = cfg.quant_config(targets=targets, **self._quant_extra()).validate(self.key)
        try:
            names = select_targets(model, qcfg)
        except ValueError as e:
            raise ConfigError(f"{self.key}.targets", targets, str(e)) from None
        tkey = f"{self.key}.targets" if cfg.targets is not None else "model.quant_targets"
        check_module_kinds(cfg.backend, model, names, self.key, tkey, targets)  # torchao / bnb: no conv
        self.check_devices(trainer_device(run), "cuda" if run.latency_device() == "cuda" else "cpu")
        return qcfg, names


@dataclass
class QuantizeConfig(KDStageConfig, QuantOptions):
    epochs: int = 1
    lr: float = 1e-5
    observer: str = "minmax"  # minmax | lsq (learned step sizes)

    def check(self, key: str) -> None:
        super().check(key)
        self.check_quant(key, observer=self.observer)


@register
class QuantizeStage(QuantStageMixin, Stage):
    kind = "quantize"
    Config = QuantizeConfig

    def _quant_extra(self) -> dict:
        return {"observer": self.cfg.observer}

    def run(self, run) -> None:
        student = run.ensure_student()
        qcfg, names = self._targets(run, student)
        pruned = list(run.masks or {})
        before = zero_positions(student, pruned)
        qat = QuantizationAware(self.name, qcfg, names)
        run.fit(student, self, kd_alpha=self.cfg.alpha, callbacks=[qat])
        report = check_zeros_kept(student, before, f"stage '{self.name}': after QAT")
        finish_quantization(self, run, student, qcfg, names, pruned,
                            extra={"observer": qcfg.observer, "qat_zeros": summarize(report)})
