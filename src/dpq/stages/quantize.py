"""``quantize``: quantization-aware training, then conversion to a real low-bit backend.

:class:`dpq.quant.QuantizationAware` fake-quantizes the target Linears and Conv2ds during the
fit. After training, :func:`finish_quantization` (shared with the ``ptq`` stage) measures the
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

import torch
from torch import nn

from dpq.core.errors import ConfigError, IntegrityError
from dpq.core.nn import logits_of, model_inputs
from dpq.core.selectors import resolve_targets, select_checked
from dpq.quant import (
    QuantConfig,
    QuantizationAware,
    check_zeros_kept,
    convert_,
    load_quantized_,
    resolve_scheme,
    safetensors_data_bytes,
    save_quantized,
    zero_positions,
)
from dpq.quant.backends import check_device, check_keeps_zeros, check_layouts, check_module_kinds
from dpq.quant.embedding import EMBEDDING_BITS, convert_embedding_, embedding_config, word_embedding_name
from dpq.quant.fake import QUANTIZABLE, callable_only, head_names, no_match_error
from dpq.quant.zeros import summarize
from dpq.stages.base import KDStageConfig, ModelCheck, Stage, register

log = logging.getLogger(__name__)

__all__ = [
    "QuantAwareTraining",
    "QuantOptions",
    "QuantStageMixin",
    "QuantizeConfig",
    "QuantizeStage",
    "check_qat_name",
    "finish_quantization",
]


@dataclass
class QuantOptions:
    """Quantization parameters shared by the ``quantize`` (QAT) and ``ptq`` stages."""

    bits: int = 4  # weight bits: 2 | 3 | 4 | 8
    granularity: str = "per_channel"  # per_tensor | per_channel | per_group
    group_size: int = 128  # per_group: input weights per scale
    symmetric: bool = True  # false: integer zero point (0.0 stays exactly representable)
    act_bits: Any = None  # null (float activations) | 8 (per-tensor int8)
    # act_bits=8: observed (symmetric, a range frozen from training: static int8 kernels) | dynamic
    # (uint8 over each input's own range, as ONNX Runtime's quantize_dynamic kernels; packed backend)
    act_range: str = "observed"
    targets: object = None  # module selector(s); null = the model config's quant_targets
    quantize_head: bool = False  # the classifier head (last Linear) stays float unless true
    backend: str = "packed"  # packed | cpu_int8 | torchao | bnb
    # backend format; null = chosen by bits (torchao: int8_weight_only | int8_dynamic | int4_weight_only;
    # bnb: nf4 | fp4 | int8)
    scheme: Any = None
    # The word-embedding table (Hugging Face models): null keeps it float; 4 | 8 quantizes its rows
    # symmetrically (QAT in the quantize stage), one scale per row or per group of columns.
    embedding_bits: Any = None
    embedding_group_size: Any = None  # null: one scale per row; else a power of two >= 16 dividing the width

    def embedding_config(self) -> QuantConfig | None:
        if self.embedding_bits is None:
            return None
        return embedding_config(self.embedding_bits, self.embedding_group_size)

    def quant_config(self, targets: Any = None, **extra) -> QuantConfig:
        t = targets if targets is not None else (self.targets if self.targets is not None else r"re:.*")
        return QuantConfig(
            bits=self.bits,
            granularity=self.granularity,
            group_size=self.group_size,
            symmetric=self.symmetric,
            act_bits=self.act_bits,
            act_range=self.act_range,
            targets=t,
            quantize_head=self.quantize_head,
            **extra,
        )

    def check_quant(self, key: str, **extra) -> None:
        qcfg = self.quant_config(**extra).validate(key)
        resolve_scheme(self.backend, self.scheme, qcfg, key)
        if qcfg.act_range == "dynamic" and self.backend != "packed":
            raise ConfigError(
                f"{key}.act_range",
                qcfg.act_range,
                f"is kept by backend=packed (exported as ONNX Runtime's dynamic int8 kernels); backend "
                f"{self.backend} quantizes activations its own way (use act_range=observed or backend=packed)",
            )
        if self.embedding_bits is not None:
            if type(self.embedding_bits) is not int or self.embedding_bits not in EMBEDDING_BITS:
                raise ConfigError(
                    f"{key}.embedding_bits",
                    self.embedding_bits,
                    f"must be null (float table) or one of {', '.join(map(str, EMBEDDING_BITS))}",
                )
            if self.backend not in ("packed", "cpu_int8"):
                raise ConfigError(
                    f"{key}.embedding_bits",
                    self.embedding_bits,
                    f"quantized embeddings are stored by the packed format; backend {self.backend} "
                    "keeps the table float (set embedding_bits=null or backend=packed)",
                )
        g = self.embedding_group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 16 or g & (g - 1)):
            raise ConfigError(
                f"{key}.embedding_group_size",
                g,
                "must be null (one scale per row) or a power of two >= 16 (ONNX Runtime's "
                "GatherBlockQuantized blocks)",
            )


def _reference_logits(model: nn.Module, batch: dict, device: str) -> torch.Tensor:
    model.to(device).eval()
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(batch).items()}
    with torch.no_grad():
        return logits_of(model, inputs).float().cpu()


def finish_quantization(
    stage: Stage,
    state,
    ctx,
    model: nn.Module,
    qcfg: QuantConfig,
    names: list[str],
    pruned: list[str],
    extra: dict,
) -> dict:
    """Fake-quant accuracy -> convert -> zeros check -> export + reload -> record (measured) + delta."""
    opts: QuantOptions = stage.cfg
    scheme = resolve_scheme(opts.backend, opts.scheme, qcfg, stage.key)
    device = "cuda" if "cpu" not in scheme.devices else ctx.trainer_device
    fake = ctx.evaluate(model, stage.name)
    batch = next(iter(ctx.data.val_dataloader()))
    fake_logits = _reference_logits(model, batch, device)
    table = word_embedding_name(model) if opts.embedding_bits is not None else None
    before = zero_positions(model, sorted(set(pruned) | set(names) | ({table} if table else set())))
    convert_(model, backend=opts.backend, scheme=scheme.name, names=names, device=device)
    convert_embedding_(model)
    report = check_zeros_kept(
        model, before, f"stage '{stage.name}': after conversion to {opts.backend} ({scheme.name})"
    )
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
    if not torch.allclose(
        reload_logits, real_logits, rtol=0, atol=1e-6 * max(1.0, float(real_logits.abs().max()))
    ):
        raise IntegrityError(
            f"stage '{stage.name}': the {opts.backend} model reloaded from disk gives different logits "
            f"(max diff {float((reload_logits - real_logits).abs().max()):.3g})"
        )
    state.quantized = True
    rec = ctx.record(
        state,
        stage,
        model,
        extra={
            "backend": opts.backend,
            "scheme": scheme.name,
            "bits": qcfg.bits,
            "granularity": qcfg.granularity,
            "group_size": qcfg.group_size if qcfg.granularity == "per_group" else None,
            "symmetric": qcfg.symmetric,
            "act_bits": qcfg.act_bits,
            "quantize_head": qcfg.quantize_head,
            "quantized_modules": len(names),
            "quantized_names": list(names),
            "embedding_bits": opts.embedding_bits,
            "embedding_group_size": opts.embedding_group_size if opts.embedding_bits is not None else None,
            "fake_quant_accuracy": fake["accuracy"],
            "fake_quant_val_accuracy": fake["val_accuracy"],
            "backend_max_logit_diff": max_diff,
            "backend_rel_logit_diff": rel_diff,
            "sparsity_kept": True,
            "zeros": summarize(report),
            **extra,
        },
    )
    delta = rec["metrics"]["accuracy"] - fake["accuracy"]
    rec["backend_accuracy_delta"] = delta
    rec["metrics"].update(
        fake_quant_accuracy=fake["accuracy"],
        backend_accuracy_delta=delta,
        disk_size_bytes=disk_bytes,
        disk_data_bytes=data_bytes,
    )
    log.info(
        "%s: fake-quant accuracy %.4f, %s (%s) accuracy %.4f (delta %+.4f), max |logit diff| %.3g; on disk %d bytes",
        stage.name,
        fake["accuracy"],
        opts.backend,
        scheme.name,
        rec["metrics"]["accuracy"],
        delta,
        max_diff,
        disk_bytes,
    )
    ctx.log_metrics(
        {
            "fake_quant_accuracy": fake["accuracy"],
            "backend_accuracy_delta": delta,
            "backend_max_logit_diff": max_diff,
            "disk_size_bytes": disk_bytes,
        },
        step=len(state.records) - 1,
    )
    return rec


class QuantStageMixin:
    """Order rules, targets and device checks shared by ``quantize`` and ``ptq``."""

    quantizes = True

    def check_order(self, before: list[Stage]) -> None:
        earlier = [s.name for s in before if s.quantizes]
        if earlier:
            raise ConfigError(
                "pipeline.order",
                [s.name for s in before] + [self.name],
                f"only one quantization stage is allowed ({earlier[0]} already quantizes)",
            )
        qcfg = self.cfg.quant_config(**self._quant_extra())
        scheme = resolve_scheme(self.cfg.backend, self.cfg.scheme, qcfg, self.key)
        check_keeps_zeros(self.cfg.backend, scheme, [s.name for s in before if s.prunes], self.key)
        super().check_order(before)

    def check_devices(self, model_device: str, latency_device: str) -> None:
        """Raise :class:`ConfigError` if the backend cannot run where the model is evaluated or timed."""
        qcfg = self.cfg.quant_config(**self._quant_extra())
        scheme = resolve_scheme(self.cfg.backend, self.cfg.scheme, qcfg, self.key)
        check_device(
            self.cfg.backend,
            scheme,
            model_device,
            self.key,
            "trainer.accelerator (where the model is evaluated)",
        )
        check_device(
            self.cfg.backend, scheme, latency_device, self.key, "cost.device (where latency is measured)"
        )

    def check_model(self, check: ModelCheck) -> None:
        super().check_model(check)
        if check.student is not None:
            self.warn_wide_groups(check.student, self.targets_of(check.student, check.model_spec)[1])
            self.embedding_of(check.student)
        self.check_devices(check.model_device, check.latency_device)

    def warn_wide_groups(self, model: nn.Module, names: list[str]) -> str | None:
        """``per_group`` with a ``group_size`` wider than a layer's input: that layer's rows are one group
        each, one scale per row as ``per_channel`` gives (still exported exactly, as per_group codes are).
        Said before training, since the user asked for finer scales than the layer gets."""
        g = self.cfg.group_size
        if self.cfg.granularity != "per_group":
            return None
        wide = {n: w for n in names if (w := model.get_submodule(n).weight[0].numel()) < g}
        if not wide:
            return None
        shown = ", ".join(f"{n} ({w})" for n, w in list(wide.items())[:3]) + (
            ", ..." if len(wide) > 3 else ""
        )
        msg = (
            f"{self.key}.group_size={g} is wider than the input of {len(wide)} of the {len(names)} quantized "
            f"layers ({shown}): each of their rows is one group, with one scale as per_channel gives; a group_size "
            f"below {min(wide.values())} gives each of them several"
        )
        log.warning("%s", msg)
        return msg

    def embedding_of(self, model: nn.Module) -> str | None:
        """The word-embedding table ``embedding_bits`` quantizes (None when it stays float)."""
        if self.cfg.embedding_bits is None:
            return None
        name = word_embedding_name(model)
        if name is None:
            raise ConfigError(
                f"{self.key}.embedding_bits",
                self.cfg.embedding_bits,
                f"the {type(model).__name__} has no word-embedding table (only Hugging Face text "
                "models have one); set it to null",
            )
        dim, g = model.get_submodule(name).embedding_dim, self.cfg.embedding_group_size
        if g is not None and dim % g:
            raise ConfigError(f"{self.key}.embedding_group_size", g, f"must divide the embedding width {dim}")
        return name

    def _quant_extra(self) -> dict:
        return {}

    def targets_of(self, model: nn.Module, model_spec: dict) -> tuple[QuantConfig, list[str]]:
        """The quantization config and the modules it converts: ``targets`` (else ``model.quant_targets``)
        without the classifier head unless ``quantize_head``; modules the backend can convert."""
        cfg = self.cfg
        sel, key = resolve_targets(cfg.targets, f"{self.key}.targets", model_spec, "quant_targets")
        if sel is None:
            raise ConfigError(key, None, "no quantization targets: set it or model.quant_targets")
        names = callable_only(model, select_checked(model, sel, key, QUANTIZABLE, "nn.Linear or nn.Conv2d"))
        qcfg = cfg.quant_config(targets=sel, **self._quant_extra()).validate(self.key)
        if not qcfg.quantize_head:
            head = set(head_names(model))
            names = [n for n in names if n not in head]
            if not names:
                raise ConfigError(
                    f"{self.key}.targets", sel, str(no_match_error(model, sel, head_excluded=True))
                )
        check_module_kinds(cfg.backend, model, names, self.key, key, sel)  # torchao / bnb: no conv
        check_layouts(cfg.backend, qcfg, model, names, self.key)
        return qcfg, names


def check_qat_name(key: str, value: Any) -> None:
    """``<stage>.qat`` is null or the name of a stage (which one is checked against the order later)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(
            f"{key}.qat",
            value,
            "must be null or the name of the pipeline's quantization stage (e.g. quantize)",
        )


class QuantAwareTraining:
    """Stage mixin for ``qat: <quantization stage>``: quantize-aware pruning / recovery.

    While the stage trains, the student's target Linears / Conv2ds (and the word-embedding table if
    that stage quantizes it) are fake-quantized with the settings of the named ``quantize`` or
    ``ptq`` stage, which comes later in the order: the mask is chosen, and the weights around it
    learned, under the rounding they will be deployed with. The fit ends with plain float modules
    again (same Parameters), so a structured shrink, snapshots and the stage cache see the layers
    they know; the named stage quantizes for real (its QAT starts fresh quantizers: LSQ steps and
    activation ranges learned here are not carried over).
    """

    qat_stage: QuantStageMixin | None = None

    def check_after(self, after: list[Stage]) -> None:
        super().check_after(after)
        name = self.cfg.qat
        if name is None:
            return
        later = {s.name: s for s in after}
        quant = [s.name for s in after if s.quantizes]
        if name not in later or not isinstance(later[name], QuantStageMixin):
            raise ConfigError(
                f"{self.key}.qat",
                name,
                "must name the quantization stage (quantize or ptq) that comes later in pipeline.order"
                + (f": {quant[0]}" if quant else "; there is none after this stage")
                + ", or be null",
            )
        self.qat_stage = later[name]

    def qat_settings(self) -> dict | None:
        """What the fake quantization during this stage depends on (for records and cache keys)."""
        q = self.qat_stage
        if q is None:
            return None
        qcfg = q.cfg.quant_config(**q._quant_extra())
        return {
            "stage": q.name,
            **{k: v for k, v in qcfg.to_dict().items() if k != "targets"},
            "targets": q.cfg.targets,
            "embedding_bits": q.cfg.embedding_bits,
            "embedding_group_size": q.cfg.embedding_group_size,
        }

    def qat_callbacks(self, student: nn.Module, ctx) -> list[QuantizationAware]:
        """The QAT callback for this stage's fit ([] without ``qat``); it restores float modules at the end."""
        q = self.qat_stage
        if q is None:
            return []
        qcfg, names = q.targets_of(student, ctx.model_spec)
        q.embedding_of(student)
        emb = q.cfg.embedding_config()
        log.info(
            "%s: quantize-aware: %d modules fake-quantized at %d bits (%s) as stage '%s' will%s",
            self.name,
            len(names),
            qcfg.bits,
            qcfg.granularity,
            q.name,
            f", word embeddings at {emb.bits} bits" if emb is not None else "",
        )
        return [QuantizationAware(f"{self.name}.qat", qcfg, names, embedding=emb, keep=False)]


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

    def run(self, state, ctx) -> None:
        student = ctx.ensure_student(state)
        qcfg, names = self.targets_of(student, ctx.model_spec)
        self.check_devices(ctx.trainer_device, ctx.latency_device)
        pruned = list(state.masks or {})
        before = zero_positions(student, pruned)
        self.embedding_of(student)
        qat = QuantizationAware(self.name, qcfg, names, embedding=self.cfg.embedding_config())
        ctx.fit(state, student, self, kd_alpha=self.cfg.alpha, callbacks=[qat])
        report = check_zeros_kept(student, before, f"stage '{self.name}': after QAT")
        finish_quantization(
            self,
            state,
            ctx,
            student,
            qcfg,
            names,
            pruned,
            extra={"observer": qcfg.observer, "qat_zeros": summarize(report)},
        )
