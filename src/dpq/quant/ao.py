"""The one adapter to torchao (pinned in pyproject.toml): its QAT API and its low-bit tensors.

What dpq takes from torchao:

* QAT: ``quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(...), step="prepare"))``
  swaps each target ``nn.Linear`` for torchao's ``FakeQuantizedLinear`` (same Parameter
  objects). torchao's ``IntxFakeQuantizer`` serves the symmetric per-channel / per-group
  min-max case; for the cases it lacks (per-tensor, asymmetric with an integer zero point,
  LSQ, percentile, groups that do not divide ``in_features``, int8 activation ranges) dpq
  plugs its own quantizer modules into the same ``FakeQuantizedLinear``.
* The ``torchao`` backend: ``quantize_(model, QATConfig(base_config, step="convert"))`` with
  ``Int8WeightOnlyConfig`` / ``Int8DynamicActivationInt8WeightConfig`` (CPU and CUDA) or
  ``Int4WeightOnlyConfig`` (tinygemm, CUDA + bfloat16 only in torchao 0.18), each resulting
  ``nn.Linear`` wrapped in :class:`TorchaoLinear` so cost accounting and export see it.
  torchao has no conv path in either API, so ``nn.Conv2d`` targets use dpq's own
  :class:`~dpq.quant.conv.FakeQuantizedConv2d`, and the ``torchao`` backend refuses them
  (:func:`dpq.quant.backends.check_module_kinds`).

torchao is imported lazily (``import dpq.quant`` stays light); the warnings it logs on a CPU
machine about CUDA-only extensions are filtered (see :func:`_silence_import_noise`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpq.core.nn import set_module

from .affine import Blocks, weight_qparams
from .config import QuantConfig
from .packed import QuantizedLinear, register_module_type

TORCHAO_VERSION = "0.18.0"  # keep in step with pyproject.toml
SCHEMES = ("int8_weight_only", "int8_dynamic", "int4_weight_only")
INT4_GROUP_SIZES = (32, 64, 128, 256)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


def _silence_import_noise() -> None:
    """torchao (imported by dpq, and by transformers whenever torchao is installed) logs one warning
    per CUDA-only extension it cannot load -- expected on a CPU machine, so dropped there -- and
    torch logs a deprecation for each enum torchao registers. Only those messages are filtered."""
    if not torch.cuda.is_available():
        logging.getLogger("torchao").addFilter(_DropMessages("Failed to load"))
    logging.getLogger("torch.utils._pytree").addFilter(
        _DropMessages("is an Enum subclass and is now natively supported by torch.compile")
    )


_silence_import_noise()


def torchao():
    """The imported ``torchao`` package, with a clear error if it is missing."""
    try:
        import torchao as ao
        import torchao.quantization.qat  # noqa: F401
    except ImportError as e:  # pragma: no cover - torchao is a dependency
        raise ImportError(
            f"dpq's QAT and torchao backend need torchao=={TORCHAO_VERSION}: pip install "
            f"'torchao=={TORCHAO_VERSION}' --no-deps ({e})"
        ) from None
    return ao


# ------------------------------------------------------------------------------ QAT


def fake_quantized_linear_class() -> type[nn.Linear]:
    torchao()
    from torchao.quantization.qat import FakeQuantizedLinear

    return FakeQuantizedLinear


def is_fake_quantized(module: nn.Module) -> bool:
    return isinstance(module, fake_quantized_linear_class())


def intx_fits(cfg: QuantConfig, in_features: int, static: bool) -> bool:
    """Whether torchao's ``IntxFakeQuantizer`` computes exactly what ``cfg`` asks for this layer."""
    if not cfg.symmetric or cfg.observer != "minmax" or cfg.calibration != "minmax":  # torchao: min-max only
        return False
    if cfg.granularity == "per_channel":  # one group of in_features per row: torchao asserts a group > 1
        return in_features > 1  # (a layer shrunk to one input: a FFN left with one neuron)
    return (
        cfg.granularity == "per_group" and in_features % cfg.group_size == 0 and cfg.group_size < in_features
    )


def intx_weight_config(cfg: QuantConfig):
    torchao()
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    granularity = PerAxis(0) if cfg.granularity == "per_channel" else PerGroup(cfg.group_size)
    return IntxFakeQuantizeConfig(
        getattr(torch, f"int{cfg.bits}"), granularity=granularity, is_symmetric=True
    )


def prepare_intx_(model: nn.Module, names: list[str], cfg: QuantConfig) -> None:
    """torchao's QAT prepare step on exactly the modules ``names``."""
    if not names:
        return
    ao = torchao()
    from torchao.quantization.qat import QATConfig

    wanted = set(names)
    ao.quantization.quantize_(
        model,
        QATConfig(weight_config=intx_weight_config(cfg), step="prepare"),
        filter_fn=lambda m, fqn: fqn in wanted,
    )


def empty_fake_quantized_linear(linear: nn.Linear) -> nn.Linear:
    """torchao's ``FakeQuantizedLinear`` sharing ``linear``'s parameters, with no quantizer yet."""
    return fake_quantized_linear_class().from_linear(linear, None, None)


def intx_qparams(quantizer, weight: Tensor) -> tuple[Blocks, Tensor, Tensor, int]:
    """Layout, scale, zero point and bits that torchao's ``IntxFakeQuantizer`` applies to ``weight``.

    Recomputed with dpq's copy of torchao's formulas (bit-identical; see tests) so that
    packing reproduces the fake-quantized weight exactly.
    """
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import _DTYPE_TO_BIT_WIDTH

    config = quantizer.config
    bits = _DTYPE_TO_BIT_WIDTH[config.dtype]
    if isinstance(config.granularity, PerGroup):
        layout = Blocks("per_group", weight.shape[0], weight.shape[1], config.granularity.group_size)
    else:
        layout = Blocks("per_channel", weight.shape[0], weight.shape[1])
    scale, zp = weight_qparams(weight, layout, bits, symmetric=True)
    return layout, scale, zp, bits


# ------------------------------------------------------------------------------ backend


def base_config(scheme: str, cfg: QuantConfig):
    """The torchao PTQ config for ``scheme`` (``set_inductor_config=False``: no global side effects)."""
    torchao()
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerGroup,
        PerRow,
        PerTensor,
    )

    gran = {"per_tensor": PerTensor(), "per_channel": PerRow(), "per_group": PerGroup(cfg.group_size)}[
        cfg.granularity
    ]
    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig(granularity=gran, set_inductor_config=False)
    if scheme == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig(granularity=gran, set_inductor_config=False)
    if scheme == "int4_weight_only":
        return Int4WeightOnlyConfig(
            group_size=cfg.group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
    raise ValueError(f"unknown torchao scheme {scheme!r}; allowed: {SCHEMES}")


def _loaded_by_wrapper(*args, **kwargs) -> None:
    """``_load_from_state_dict`` of a TorchaoLinear's inner Linear: its wrapper loads the components."""


def _tensor_fields(w: Tensor) -> dict[str, Tensor]:
    names = list(getattr(w, "tensor_data_names", [])) + list(
        getattr(w, "optional_tensor_data_names", None) or []
    )
    return {n: getattr(w, n) for n in names if isinstance(getattr(w, n, None), Tensor)}


class TorchaoLinear(QuantizedLinear):
    """A linear whose weight is a torchao quantized tensor (``Int8Tensor``, int4 tinygemm tensor).

    The export stores torchao's own components (``qdata``, ``scale``, ...), i.e. exactly
    the low-bit data its kernel uses; reloading rebuilds the tensor structure by
    quantizing a placeholder with the same config and copies the saved components in.
    """

    backend = "torchao"

    def __init__(self, inner: nn.Linear, scheme: str, cfg_dict: dict[str, Any]):
        super().__init__(
            inner.in_features,
            inner.out_features,
            bits=4 if scheme == "int4_weight_only" else 8,
            act_bits=8 if scheme == "int8_dynamic" else None,
        )
        inner._load_from_state_dict = _loaded_by_wrapper  # see state_dict below
        self.inner, self.scheme, self.cfg_dict = inner, scheme, dict(cfg_dict)
        self.compute_dtype = torch.bfloat16 if scheme == "int4_weight_only" else None

    @property
    def bias(self) -> Tensor | None:
        return self.inner.bias

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Plain tensors (torchao's components), not the tensor subclass: generic state-dict walkers
        (NaN checks, DDP, checkpoints) cannot run arbitrary ops on an ``Int8Tensor``."""
        destination = {} if destination is None else destination
        for k, v in self.packed_tensors().items():
            destination[prefix + k] = v if keep_vars else v.detach()
        return destination

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        with torch.no_grad():
            for k, t in self.packed_tensors().items():
                if prefix + k in state_dict:
                    t.copy_(state_dict[prefix + k])
                elif strict:
                    missing_keys.append(prefix + k)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():  # FLOP counters trace: show them the same multiply-adds as a linear
            b = self.float_bias()
            return F.linear(x, self.dequantize().to(x.dtype), None if b is None else b.to(x.dtype))
        if self.compute_dtype is not None:
            return self.inner(x.to(self.compute_dtype)).to(x.dtype)
        return self.inner(x)

    @torch.no_grad()
    def dequantize(self) -> Tensor:
        w = self.inner.weight
        if hasattr(w, "dequantize"):
            return w.dequantize().float()
        # Tensors without dequantize (tinygemm int4): the weight's action on the identity.
        eye = torch.eye(self.in_features, device=w.device, dtype=w.dtype)
        return F.linear(eye, w).t().float()

    def packed_tensors(self) -> dict[str, Tensor]:
        out = {f"w_{k}": v for k, v in _tensor_fields(self.inner.weight).items()}
        if self.inner.bias is not None:
            out["bias"] = self.inner.bias.detach()
        return out

    def meta(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "config": self.cfg_dict,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.inner.bias is not None,
        }

    @classmethod
    def from_packed(
        cls, meta: dict, tensors: dict[str, Tensor], device: torch.device | str = "cpu"
    ) -> TorchaoLinear:
        cfg = QuantConfig(**meta["config"])
        lin = nn.Linear(meta["in_features"], meta["out_features"], bias=meta["bias"], device=device)
        if meta["scheme"] == "int4_weight_only":
            lin = lin.to(torch.bfloat16)
        mod = wrap_converted(quantize_linear(lin, meta["scheme"], cfg), meta["scheme"], cfg)
        with torch.no_grad():
            for k, t in _tensor_fields(mod.inner.weight).items():
                saved = tensors[f"w_{k}"]
                if saved.shape != t.shape:
                    raise ValueError(
                        f"torchao tensor field {k}: saved shape {tuple(saved.shape)} != {tuple(t.shape)}"
                    )
                t.copy_(saved.to(t.device))
            if meta["bias"]:
                mod.inner.bias.copy_(tensors["bias"])
        return mod


register_module_type(TorchaoLinear)


def quantize_linear(linear: nn.Linear, scheme: str, cfg: QuantConfig) -> nn.Linear:
    """Apply the scheme's torchao config to one float ``nn.Linear`` (in place; returned)."""
    ao = torchao()
    holder = nn.Sequential(linear)
    ao.quantization.quantize_(holder, base_config(scheme, cfg), filter_fn=lambda m, fqn: fqn == "0")
    return holder[0]


def wrap_converted(linear: nn.Linear, scheme: str, cfg: QuantConfig) -> TorchaoLinear:
    linear.requires_grad_(False)  # a converted layer is for inference
    return TorchaoLinear(linear, scheme, cfg.to_dict())


def convert_(
    model: nn.Module,
    names: list[str],
    scheme: str,
    cfg: QuantConfig,
    device: torch.device | str | None = None,
) -> None:
    """torchao's QAT convert step (``QATConfig(base_config, step="convert")``) on ``names``, then wrap.

    Fake-quantized modules go back to ``nn.Linear`` and torchao quantizes their (trained)
    float weights with its own min-max scales: LSQ steps or percentile clipping are not
    carried over, which the stage's measured backend-vs-fake-quant difference shows.
    """
    ao = torchao()
    from torchao.quantization.qat import QATConfig

    if scheme == "int4_weight_only":
        for n in names:  # tinygemm int4 wants bfloat16 weights on the GPU
            model.get_submodule(n).to(device=device or "cuda", dtype=torch.bfloat16)
    wanted = set(names)
    ao.quantization.quantize_(
        model, QATConfig(base_config(scheme, cfg), step="convert"), filter_fn=lambda m, fqn: fqn in wanted
    )
    for n in names:
        mod = model.get_submodule(n)
        if not hasattr(mod.weight, "tensor_data_names"):
            raise RuntimeError(
                f"torchao {scheme} left {n} unquantized (shape {tuple(mod.weight.shape)}; "
                f"int4 needs in_features divisible by group_size {cfg.group_size})"
            )
        set_module(model, n, wrap_converted(mod, scheme, cfg))
