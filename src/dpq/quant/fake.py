"""Fake quantization for QAT and PTQ: which modules, and with which quantizers.

Every target ``nn.Linear`` becomes torchao's ``FakeQuantizedLinear`` and every target
``nn.Conv2d`` a :class:`~dpq.quant.conv.FakeQuantizedConv2d` (both share the original
module's Parameter objects, so an optimizer built before ``prepare_qat_`` keeps training
them and state-dict keys stay ``weight`` / ``bias``). Its ``weight_fake_quantizer`` is:

* torchao's ``IntxFakeQuantizer`` (torchao's QAT API, ``dpq.quant.ao``) for symmetric
  per-channel / per-group min-max weights of a Linear;
* :class:`MinMaxWeightQuantizer` (per-tensor, asymmetric, PTQ percentile, groups that do
  not divide ``in_features``, every conv) or :class:`~dpq.quant.lsq.LSQWeightQuantizer`
  otherwise. A conv's quantizer sees its weight as the ``[out, in/groups*kh*kw]`` matrix
  (:func:`~dpq.quant.conv.weight_matrix`).

With ``act_bits=8`` its ``activation_fake_quantizer`` is an
:class:`~dpq.quant.observers.ActivationFakeQuant`. Each prepared module carries
``weight_bits``, ``act_bits`` (``None`` = float) and ``quant_config`` for cost accounting
and conversion. Every quantizer maps 0.0 to exactly 0.0, so pruned weights stay zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpq.core.nn import set_module
from dpq.core.selectors import matches

from . import ao
from .affine import Blocks, fake_quantize_weight, weight_qparams
from .config import QuantConfig
from .conv import FakeQuantizedConv2d, conv_geometry, weight_matrix
from .lsq import LSQWeightQuantizer
from .observers import ActivationFakeQuant

Targets = str | Sequence[str]

log = logging.getLogger(__name__)

# Module types the quantizers handle (subclasses included).
QUANTIZABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


class MinMaxWeightQuantizer(nn.Module):
    """Weight fake quantizer from the min-max (or percentile) range, any granularity / symmetry.

    ``static=False`` (QAT) recomputes the range from the current weight at every call;
    ``static=True`` (PTQ) computes it once from the weight at construction (``scale`` /
    ``zero_point`` buffers); both with ``cfg.calibration`` min-max or percentile clipping.
    """

    def __init__(self, cfg: QuantConfig, weight: Tensor, static: bool = False):
        """``weight``: the ``[out, in]`` weight matrix (a conv's :func:`~dpq.quant.conv.weight_matrix`)."""
        super().__init__()
        self.config = cfg  # torchao's QAT convert step reads ``weight_fake_quantizer.config``
        self.bits, self.symmetric, self.static = cfg.bits, cfg.symmetric, static
        self.layout = Blocks(cfg.granularity, weight.shape[0], weight.shape[1], cfg.group_size)
        # QAT for a ptq stage with percentile ranges (recover.qat=ptq) trains under that clipping too: it was
        # min-max in training and percentile when deployed, while the record said percentile
        self.percentile = cfg.percentile if cfg.calibration == "percentile" else None
        if static:
            scale, zp = weight_qparams(weight, self.layout, self.bits, self.symmetric, self.percentile)
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zp)

    def qparams(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        if self.static:
            return self.scale, self.zero_point
        return weight_qparams(weight, self.layout, self.bits, self.symmetric, self.percentile)

    def forward(self, weight: Tensor) -> Tensor:
        scale, zp = self.qparams(weight)
        return fake_quantize_weight(weight, self.layout, scale, zp, self.bits)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, granularity={self.layout.granularity}, symmetric={self.symmetric}, "
            f"static={self.static}, percentile={self.percentile}"
        )


@dataclass
class WeightQParams:
    """What conversion needs from a prepared module: layout, scale / zero point per block, bits."""

    layout: Blocks
    scale: Tensor
    zero_point: Tensor
    bits: int
    symmetric: bool


def weight_qparams_of(module: nn.Module) -> WeightQParams:
    """The quantization a prepared module applies to its current weight."""
    q = module.weight_fake_quantizer
    if isinstance(q, (MinMaxWeightQuantizer, LSQWeightQuantizer)):
        scale, zp = q.qparams(weight_matrix(module))
        return WeightQParams(q.layout, scale, zp, q.bits, bool(q.config.symmetric))
    layout, scale, zp, bits = ao.intx_qparams(q, module.weight)
    return WeightQParams(layout, scale, zp, bits, True)


def activation_scale_of(module: nn.Module) -> Tensor | None:
    q = getattr(module, "activation_fake_quantizer", None)
    return q.scale() if isinstance(q, ActivationFakeQuant) and not q.dynamic else None


# ------------------------------------------------------------------------------ selection


def head_names(model: nn.Module) -> list[str]:
    """The classifier head: the ``nn.Linear`` that produces the logits -- the last one with the model's
    ``config.num_labels`` outputs (XLM-RoBERTa registers its ``classifier`` before its encoder, so the last
    ``nn.Linear`` in module order is an encoder layer's), else the last ``nn.Linear``."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    if isinstance(labels, int) and not isinstance(labels, bool):
        heads = [n for n, m in linears if m.out_features == labels]
        if heads:
            return heads[-1:]
    return [n for n, _ in linears][-1:]


def _as_list(targets: Targets) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)


def select_modules(model: nn.Module, targets: Targets) -> list[str]:
    """Qualified names of ``nn.Linear`` and ``nn.Conv2d`` modules (incl. subclasses) matching ``targets``,
    but not the ``out_proj`` of an ``nn.MultiheadAttention`` (``NonDynamicallyQuantizableLinear``): the
    attention reads its ``weight`` directly and never calls it, so a fake quantizer there would train
    nothing and a packed layer (no ``weight``) would break the model. Skipped with a warning."""
    sel = _as_list(targets)
    return callable_only(
        model, [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE) and matches(n, sel)]
    )


def callable_only(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` without the ``out_proj`` of an ``nn.MultiheadAttention`` (said in a warning): see
    :func:`select_modules`. Every way to name quantization targets goes through it."""
    skipped = [
        n
        for n in names
        if isinstance(model.get_submodule(n), nn.modules.linear.NonDynamicallyQuantizableLinear)
    ]
    if skipped:
        log.warning(
            "not quantized: %s (the output projection of nn.MultiheadAttention, which reads its weight "
            "without calling it)",
            ", ".join(skipped),
        )
    return [n for n in names if n not in skipped]


def conv_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The ``nn.Conv2d`` modules among ``names``."""
    return [n for n in names if isinstance(model.get_submodule(n), nn.Conv2d)]


def select_targets(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """``cfg.targets`` minus the classifier head (unless ``cfg.quantize_head``); never empty."""
    names = select_modules(model, cfg.targets)
    if not cfg.quantize_head:
        head = set(head_names(model))
        names = [n for n in names if n not in head]
    if not names:
        raise no_match_error(model, cfg.targets, head_excluded=not cfg.quantize_head)
    return names


def no_match_error(model: nn.Module, targets: Targets, head_excluded: bool = False) -> ValueError:
    """A ValueError that tells the user which Linear / Conv2d names they could have meant."""
    available = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    if not available:
        return ValueError(
            f"targets={targets!r} matched nothing: the model has no nn.Linear or nn.Conv2d modules"
        )
    shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
    head = (
        f" (the classifier head {head_names(model)[0]!r} is left out unless quantize_head=true)"
        if head_excluded and head_names(model)
        else ""
    )
    return ValueError(
        f"targets={targets!r} matched no nn.Linear or nn.Conv2d module{head} "
        f"({len(available)} available, e.g. {shown}). "
        "Use 're:<regex>' for a full-match regex on the qualified name, or an exact name."
    )


# ------------------------------------------------------------------------------ prepare


def is_prepared(module: nn.Module) -> bool:
    return hasattr(module, "quant_config") and hasattr(module, "weight_fake_quantizer")


def prepared_modules(model: nn.Module) -> list[str]:
    """The fake-quantized linear and conv layers. Not a fake-quantized word embedding (it has the same
    two attributes): it converts with :func:`dpq.quant.embedding.convert_embedding_`, and convert_ and
    unprepare_qat_ of every prepared module failed on it (no ``in_features``)."""
    return [n for n, m in model.named_modules() if is_prepared(m) and not isinstance(m, nn.Embedding)]


def _prepare(
    model: nn.Module, cfg: QuantConfig, names: list[str] | None, static: bool, intx: bool = True
) -> list[str]:
    cfg.validate()
    names = select_targets(model, cfg) if names is None else list(names)
    todo = [n for n in names if not is_prepared(model.get_submodule(n))]
    if not todo:
        return []
    training = {n: model.get_submodule(n).training for n in todo}
    # torchao's QAT API where it computes what cfg asks for (Linears only: torchao has no conv QAT) ...
    # (in float32 only: torchao computes the scales in the weight's dtype, dpq's conversion from w.float();
    # in bf16 a fifth of the codes trained differed by a step from the ones stored)
    intx = [
        n
        for n in todo
        if intx
        and isinstance(model.get_submodule(n), nn.Linear)
        and model.get_submodule(n).weight.dtype == torch.float32
        and ao.intx_fits(cfg, model.get_submodule(n).in_features, static)
    ]
    ao.prepare_intx_(model, intx, cfg)
    for name in todo:
        if name in intx:
            mod = model.get_submodule(name)
        else:  # ... dpq's quantizers inside the same torchao module, or dpq's conv, otherwise
            old = model.get_submodule(name)
            if isinstance(old, nn.Conv2d):
                mod = FakeQuantizedConv2d.from_conv(old)
            else:
                mod = ao.empty_fake_quantized_linear(old)
            w = weight_matrix(old)
            if cfg.observer == "lsq" and not static:
                mod.weight_fake_quantizer = LSQWeightQuantizer(cfg, w).to(w.device)
            else:
                mod.weight_fake_quantizer = MinMaxWeightQuantizer(cfg, w, static=static).to(w.device)
            set_module(model, name, mod)
        if cfg.act_bits:
            dynamic = cfg.act_range == "dynamic"
            act = ActivationFakeQuant(cfg.act_bits, percentile=cfg.percentile, dynamic=dynamic)
            act = act.to(mod.weight.device)
            if static and not dynamic:
                act.set_mode(f"calibrate_{cfg.calibration}")
            mod.activation_fake_quantizer = act
        mod.weight_bits = mod.bits = cfg.bits
        mod.act_bits = cfg.act_bits
        mod.quant_config = cfg
        mod.train(training[name])
    return todo


def prepare_qat_(
    model: nn.Module, cfg: QuantConfig, names: list[str] | None = None, float32: bool = True
) -> list[str]:
    """Fake-quantize the target Linears and Conv2ds for training (weights: dynamic min-max or LSQ).

    ``names`` overrides the selection (``cfg.targets`` minus the head). Already prepared
    modules are left alone (idempotent). Returns the names prepared by this call.
    ``float32=False``: the model will train in half precision (``bf16-true``), so dpq's quantizers,
    which compute ranges in float32 as conversion does, stand in for torchao's everywhere.
    """
    return _prepare(model, cfg, names, static=False, intx=float32)


def prepare_ptq_(model: nn.Module, cfg: QuantConfig, names: list[str] | None = None) -> list[str]:
    """Fake-quantize for post-training quantization: weight ranges fixed now (min-max or
    percentile), activation observers (``act_bits``) in calibration mode; see ``dpq.stages.ptq`` and
    ``dpq.quant.calibrate``."""
    return _prepare(model, cfg, names, static=True)


def unprepare_qat_(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Undo :func:`prepare_qat_`: each prepared module (``names``, default all) becomes a plain
    ``nn.Linear`` / ``nn.Conv2d`` holding the same Parameter objects, quantizers dropped.

    For QAT that only shapes the weights of a stage before the quantize stage (``prune.qat``):
    the stage's result is a float model again, so shrinking, snapshots and the stage cache see
    the layers they know. Returns the names restored.
    """
    done = []
    for name in prepared_modules(model) if names is None else list(names):
        mod = model.get_submodule(name)
        if not is_prepared(mod):
            continue
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(**conv_geometry(mod), bias=mod.bias is not None, device="meta")
        else:
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        new.weight, new.bias = mod.weight, mod.bias
        new.train(mod.training)
        set_module(model, name, new)
        done.append(name)
    return done


def quantizer_state(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Learned / observed quantizer tensors (LSQ steps, activation ranges), for resume."""
    state: dict[str, dict[str, Tensor]] = {}
    for name in prepared_modules(model):
        mod = model.get_submodule(name)
        entry = {}
        if isinstance(mod.weight_fake_quantizer, LSQWeightQuantizer):
            entry["step"] = mod.weight_fake_quantizer.step.detach().cpu().clone()
        act = getattr(mod, "activation_fake_quantizer", None)
        if isinstance(act, ActivationFakeQuant):
            entry["act_amax"] = act.amax.detach().cpu().clone()
            entry["act_observed"] = act.observed.detach().cpu().clone()
        if entry:
            state[name] = entry
    return state


@torch.no_grad()
def load_quantizer_state_(model: nn.Module, state: dict[str, dict[str, Tensor]]) -> None:
    for name, entry in state.items():
        mod = model.get_submodule(name)
        if "step" in entry:
            mod.weight_fake_quantizer.step.copy_(entry["step"])
        if "act_amax" in entry:
            mod.activation_fake_quantizer.amax.copy_(entry["act_amax"])
            mod.activation_fake_quantizer.observed.copy_(entry["act_observed"])
