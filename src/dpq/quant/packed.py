"""Real low-bit storage for fake-quantized linears, plus save/load.

Why hand-written: see ``dpq.quant.fake``. Here the integer codes computed by
the same ``scale_and_codes`` used in QAT are actually packed (two 4-bit codes
per byte), so the size reduction is real and the converted model reproduces
the fake-quant model's outputs. Compute stays float (weight-only quant,
dequantized on the fly): honest on CPU, where there are no int4 kernels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .fake import (
    FakeQuantLinear,
    QATConfig,
    _check_bits,
    _check_granularity,
    no_match_error,
    qmax_for,
    scale_and_codes,
    select_modules,
    set_module,
)

FORMAT_VERSION = 1
WEIGHTS_NAME = "quantized_weights.safetensors"
CONFIG_NAME = "quantization_config.json"
_NIBBLE_OFFSET = 8  # code + 8 is in 1..15 for every bits <= 4, stored unsigned


def _pack_nibbles(codes: Tensor) -> Tensor:
    """[out, in] integer codes in [-7, 7] -> [out, ceil(in/2)] uint8 (low nibble = even column)."""
    u = (codes.to(torch.int16) + _NIBBLE_OFFSET).to(torch.uint8)
    if u.shape[1] % 2:
        # Pad odd in_features with code 0 (nibble 8); dropped again on unpack.
        u = F.pad(u, (0, 1), value=_NIBBLE_OFFSET)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(packed: Tensor, in_features: int) -> Tensor:
    lo = (packed & 0x0F).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    u = torch.stack((lo, hi), dim=-1).flatten(1)[:, :in_features]
    return u - _NIBBLE_OFFSET


class QuantizedLinear(nn.Module):
    """Weight-only symmetric low-bit linear.

    Buffers:
      * ``qweight``: bits <= 4 -> uint8 ``[out, ceil(in/2)]``, two codes per
        byte stored as ``code + 8`` nibbles (2- and 3-bit codes also use 4-bit
        nibbles, see ``storage_bits``); bits == 8 -> int8 ``[out, in]``.
      * ``scale``: float32 ``[out]`` (per_channel) or ``[1]`` (per_tensor).
        float32, not float16, so dequantization is bit-identical to QAT.
      * ``bias``: float32 ``[out]`` or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        granularity: str = "per_channel",
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_bits(bits)
        _check_granularity(granularity)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.granularity = granularity
        if bits <= 4:
            qweight = torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8)
        else:
            qweight = torch.zeros(out_features, in_features, dtype=torch.int8)
        n_scale = out_features if granularity == "per_channel" else 1
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.ones(n_scale, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    @property
    def storage_bits(self) -> int:
        """Bits actually used per stored code (2/3-bit codes sit in 4-bit nibbles)."""
        return 4 if self.bits <= 4 else 8

    @classmethod
    def from_float(
        cls, linear: nn.Linear, bits: int = 4, granularity: str = "per_channel"
    ) -> QuantizedLinear:
        """Quantize ``linear`` with exactly the codes ``fake_quantize`` uses."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bits, granularity, linear.bias is not None)
        codes, scale = scale_and_codes(w, bits, granularity)
        mod.set_codes(codes, scale.reshape(-1))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        return mod.to(w.device)

    @torch.no_grad()
    def set_codes(self, codes: Tensor, scale: Tensor) -> None:
        """Pack integer ``codes`` [out, in] and store ``scale``."""
        qmax = qmax_for(self.bits)
        if codes.shape != (self.out_features, self.in_features):
            raise ValueError(f"codes shape {tuple(codes.shape)} != {(self.out_features, self.in_features)}")
        if codes.numel() and codes.abs().max().item() > qmax:
            raise ValueError(f"codes exceed +-{qmax} for {self.bits}-bit quantization")
        if self.bits <= 4:
            packed = _pack_nibbles(codes)
        else:
            packed = codes.to(torch.int8)
        self.qweight = packed.to(self.qweight.device)
        self.scale = scale.detach().float().reshape(self.scale.shape).to(self.scale.device).clone()

    def codes(self) -> Tensor:
        """Unpacked integer codes as int8 ``[out, in]``."""
        if self.bits <= 4:
            return _unpack_nibbles(self.qweight, self.in_features)
        return self.qweight.clone()

    def dequantize(self) -> Tensor:
        """Float32 weight ``codes * scale``; code 0 gives exactly 0.0."""
        return self.codes().float() * self.scale.view(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        # Weight-only quant: dequantize on the fly and compute in float.
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def storage_bytes(self) -> int:
        """Bytes of ``qweight`` + ``scale`` + ``bias`` as stored."""
        tensors = [self.qweight, self.scale] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def nonzero_weights(self) -> int:
        return int((self.codes() != 0).sum().item())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, granularity={self.granularity}, "
            f"storage_bits={self.storage_bits}"
        )


def convert_(model: nn.Module, cfg: QATConfig | None = None) -> list[str]:
    """Replace every ``FakeQuantLinear`` by a ``QuantizedLinear`` in place.

    With ``cfg``, plain ``nn.Linear`` modules matching ``cfg.targets`` are
    converted too (post-training quantization without a QAT phase). Returns
    the converted names.
    """
    plan: dict[str, tuple[int, str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantLinear):
            plan[name] = (mod.bits, mod.granularity)
    if cfg is not None:
        matched = select_modules(model, cfg.targets)
        if not matched:
            raise no_match_error(model, cfg.targets)
        for name in matched:
            plan.setdefault(name, (cfg.bits, cfg.granularity))
    for name, (bits, granularity) in plan.items():
        set_module(model, name, QuantizedLinear.from_float(model.get_submodule(name), bits, granularity))
    return list(plan)


def _quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def quantized_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-module packed tensors and metadata of every ``QuantizedLinear``."""
    state: dict[str, dict[str, Any]] = {}
    for name, m in _quantized_modules(model):
        entry: dict[str, Any] = {
            "qweight": m.qweight,
            "scale": m.scale,
            "bits": m.bits,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "granularity": m.granularity,
        }
        if m.bias is not None:
            entry["bias"] = m.bias
        state[name] = entry
    return state


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write ``quantized_weights.safetensors`` + ``quantization_config.json``.

    Only the quantized modules are stored; the rest of the model is expected
    to come from a float checkpoint (e.g. ``save_pretrained`` after
    ``dequantize_`` on a copy). Returns the weights path.
    """
    state = quantized_state(model)
    if not state:
        raise ValueError("model has no QuantizedLinear modules; call convert_ first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, e in state.items():
        tensors[f"{name}.qweight"] = e["qweight"].detach().cpu().contiguous()
        tensors[f"{name}.scale"] = e["scale"].detach().cpu().contiguous()
        if "bias" in e:
            tensors[f"{name}.bias"] = e["bias"].detach().cpu().contiguous()
        modules[name] = {
            "bits": e["bits"],
            "granularity": e["granularity"],
            "in_features": e["in_features"],
            "out_features": e["out_features"],
            "bias": "bias" in e,
        }
    bits = {m["bits"] for m in modules.values()}
    grans = {m["granularity"] for m in modules.values()}
    config = {
        "format_version": FORMAT_VERSION,
        "quant_method": "dpq-symmetric-weight-only",
        "bits": bits.pop() if len(bits) == 1 else "mixed",
        "granularity": grans.pop() if len(grans) == 1 else "mixed",
        "nibble_offset": _NIBBLE_OFFSET,
        "modules": modules,
    }
    weights_path = directory / WEIGHTS_NAME
    save_file(tensors, str(weights_path), metadata={"format": "pt", "dpq_format_version": str(FORMAT_VERSION)})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights_path


def load_quantized_(model: nn.Module, directory: str | Path) -> list[str]:
    """Replace the saved modules of a same-architecture float model in place.

    ``model`` is typically reloaded with ``from_pretrained`` from the
    dequantized float save; its Linear values are ignored and the packed
    tensors from ``directory`` are used. Returns the replaced names.
    """
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME}: format_version {version!r} != supported {FORMAT_VERSION}")
    tensors = load_file(str(directory / WEIGHTS_NAME))
    names: list[str] = []
    for name, meta in config["modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"saved quantized module {name!r} does not exist in the model") from None
        if not isinstance(old, (nn.Linear, QuantizedLinear)):
            raise ValueError(f"module {name!r} is {type(old).__name__}, expected nn.Linear")
        if (old.in_features, old.out_features) != (meta["in_features"], meta["out_features"]):
            raise ValueError(
                f"module {name!r} has shape ({old.in_features}, {old.out_features}) but the "
                f"save has ({meta['in_features']}, {meta['out_features']})"
            )
        new = QuantizedLinear(
            meta["in_features"], meta["out_features"], meta["bits"], meta["granularity"], meta["bias"]
        )
        keys = ["qweight", "scale"] + (["bias"] if meta["bias"] else [])
        for key in keys:
            t = tensors[f"{name}.{key}"]
            buf = getattr(new, key)
            if t.shape != buf.shape or t.dtype != buf.dtype:
                raise ValueError(
                    f"{name}.{key}: saved {tuple(t.shape)} {t.dtype} != expected {tuple(buf.shape)} {buf.dtype}"
                )
            buf.copy_(t)
        device = next((p.device for p in old.parameters()), None) or next(
            (b.device for b in old.buffers()), torch.device("cpu")
        )
        set_module(model, name, new.to(device))
        names.append(name)
    return names


def dequantize_(model: nn.Module) -> list[str]:
    """Replace every ``QuantizedLinear`` by an ``nn.Linear`` with the dequantized weight.

    Gives a plain float model (exact zeros preserved) that HF ``save_pretrained``
    can write. Returns the replaced names.
    """
    names: list[str] = []
    for name, m in _quantized_modules(model):
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.scale.device)
        with torch.no_grad():
            lin.weight.copy_(m.dequantize())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        set_module(model, name, lin)
        names.append(name)
    return names
