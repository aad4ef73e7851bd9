"""Converted low-bit layers, and the on-disk format that stores them at their real bit width.

:class:`QuantizedLinear` is what every backend's converted layer is (``dpq.cost`` duck-types
its ``dequantize`` / ``storage_bytes`` / ``nonzero_weights``; ``dpq.checkpoints`` finds it by
``isinstance``): it knows its ``weight_bits`` / ``act_bits``, the tensors that hold its
weight (:meth:`~QuantizedLinear.packed_tensors`, whose bytes are its ``storage_bytes``) and
how to rebuild itself from them (:meth:`~QuantizedLinear.from_packed`). Convolutions are
``QuantizedLinear`` s too (``module_kind = "conv2d"``, :mod:`dpq.quant.conv`): their weight is
stored as the ``[out, in/groups*kh*kw]`` matrix that ``in_features`` / ``out_features`` describe.

:class:`PackedLinear` is the default backend (``packed``): the integer codes of the QAT/PTQ
quantizer bit-packed (``bits`` per weight: 2- and 4-bit codes 4 resp. 2 per byte, 3-bit
codes 8 per 3 bytes, 8-bit 1 per byte), a float32 scale per block, an int8 zero point per
block when asymmetric, and an activation scale when activations are quantized. Compute is
float (dequantize, then ``F.linear``): it reproduces the fake-quant model bit for bit and
runs anywhere, but it is not a low-bit kernel (``cpu_int8``, ``torchao``, ``bnb`` are).

``save_quantized`` writes ``quantized_weights.safetensors``: every quantized module's
packed tensors *and* every other tensor of the model (float, tied ones once), so the file
alone is the deployable model at its real bit width and its size is the model's size
(``dpq.cost.size_bytes`` counts the same bytes; only the safetensors header is extra).
"""

from __future__ import annotations

import importlib
import json
import math
import struct
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dpq.core.nn import set_module

from .affine import Blocks, dequantize_codes
from .config import qrange
from .observers import fake_quantize_activation, fake_quantize_dynamic

FORMAT_VERSION = 2
WEIGHTS_NAME = "quantized_weights.safetensors"
CONFIG_NAME = "quantization_config.json"

# (backend name, module kind) -> module class; classes living in other modules register on import.
_MODULE_TYPES: dict[tuple[str, str], type[QuantizedLinear]] = {}
_HOME_MODULES = {
    ("torchao", "linear"): "dpq.quant.ao",
    ("cpu_int8", "linear"): "dpq.quant.cpu_int8",
    ("bnb", "linear"): "dpq.quant.bnb",
    ("packed", "conv2d"): "dpq.quant.conv",
    ("cpu_int8", "conv2d"): "dpq.quant.cpu_int8",
}


def register_module_type(cls: type[QuantizedLinear]) -> type[QuantizedLinear]:
    _MODULE_TYPES[(cls.backend, cls.module_kind)] = cls
    return cls


def module_type(backend: str, kind: str = "linear") -> type[QuantizedLinear]:
    """The class that rebuilds a saved ``kind`` (``linear`` | ``conv2d``) module of ``backend``."""
    key = (backend, kind)
    if key not in _MODULE_TYPES and key in _HOME_MODULES:
        importlib.import_module(_HOME_MODULES[key])
    if key not in _MODULE_TYPES:
        raise ValueError(
            f"unknown quantized module {kind!r} of backend {backend!r}; known: {sorted(_MODULE_TYPES)}"
        )
    return _MODULE_TYPES[key]


# ------------------------------------------------------------------------------ bit packing


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Signed codes ``[out, in]`` -> uint8 ``[out, ceil(in/8) * bits]`` (little-endian bit fields).

    Each row is padded to a multiple of 8 codes, so 8 codes fill exactly ``bits`` bytes.
    For 4-bit this is the classic nibble layout (low nibble = even column, stored as code + 8).
    """
    qmin, _ = qrange(bits)
    u = codes.to(torch.int64) - qmin  # 0 .. 2^bits - 1
    if bits == 8:
        return u.to(torch.uint8).contiguous()
    out, n = u.shape
    pad = (-n) % 8
    if pad:
        u = F.pad(u, (0, pad), value=-qmin)
    u = u.view(out, -1, 8)
    shifts = torch.arange(8, device=u.device, dtype=torch.int64) * bits
    word = (u << shifts).sum(dim=-1, keepdim=True)  # 8 * bits <= 32 bits
    byte_shifts = torch.arange(bits, device=u.device, dtype=torch.int64) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(out, -1).contiguous()


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int8 signed codes ``[out, in_features]``."""
    qmin, _ = qrange(bits)
    if bits == 8:
        return (packed.to(torch.int16) + qmin).to(torch.int8)
    out = packed.shape[0]
    b = packed.to(torch.int64).view(out, -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    u = ((word >> shifts) & ((1 << bits) - 1)).reshape(out, -1)[:, :in_features]
    return (u + qmin).to(torch.int8)


def packed_row_bytes(in_features: int, bits: int) -> int:
    return in_features if bits == 8 else math.ceil(in_features / 8) * bits


# ------------------------------------------------------------------------------ modules


class QuantizedLinear(nn.Module):
    """Base of every converted low-bit layer (one subclass per backend and module kind)."""

    backend: ClassVar[str] = ""
    module_kind: ClassVar[str] = "linear"  # what it replaces: linear (nn.Linear) | conv2d (nn.Conv2d)

    def __init__(self, in_features: int, out_features: int, bits: int, act_bits: int | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.act_bits = int(bits), act_bits

    @property
    def weight_bits(self) -> int:
        return self.bits

    def dequantize(self) -> Tensor:  # pragma: no cover - abstract
        """Float32 weight the layer computes with, in the replaced module's weight shape (``[out, in]``
        for a linear, ``[out, in/groups, kh, kw]`` for a conv); exact zeros preserved."""
        raise NotImplementedError

    def float_bias(self) -> Tensor | None:
        t = self.packed_tensors().get("bias")
        return None if t is None else t.detach().float()

    def packed_tensors(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Every tensor that stores this layer (what the export writes)."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """JSON-able description from which :meth:`from_packed` rebuilds the layer."""
        raise NotImplementedError

    @classmethod
    def from_packed(
        cls, meta: dict, tensors: dict[str, Tensor], device: torch.device | str = "cpu"
    ) -> QuantizedLinear:
        raise NotImplementedError  # pragma: no cover - abstract

    def float_module(self) -> nn.Module:
        """The float module this layer replaced, holding the dequantized weight (same logits)."""
        w, bias = self.dequantize(), self.float_bias()
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin

    @classmethod
    def mismatch(cls, module: nn.Module, meta: dict) -> str | None:
        """Why a saved layer described by ``meta`` cannot replace ``module`` (None when it can)."""
        if (
            not isinstance(module, (nn.Linear, QuantizedLinear))
            or getattr(module, "module_kind", "linear") != "linear"
        ):
            return f"is {type(module).__name__}, expected nn.Linear"
        if (module.in_features, module.out_features) != (meta["in_features"], meta["out_features"]):
            return (
                f"has shape ({module.in_features}, {module.out_features}) but the save has "
                f"({meta['in_features']}, {meta['out_features']})"
            )
        return None

    def storage_bytes(self) -> int:
        """Bytes of :meth:`packed_tensors` as stored (what the export writes for this layer)."""
        return sum(t.numel() * t.element_size() for t in self.packed_tensors().values())

    def nonzero_weights(self) -> int:
        return int(torch.count_nonzero(self.dequantize()).item())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}, "
            f"weight_bits={self.bits}, act_bits={self.act_bits}"
        )


@register_module_type
class PackedLinear(QuantizedLinear):
    """Bit-packed integer codes + scales (+ zero points, + activation scale); float compute.

    Buffers: ``qweight`` uint8 ``[out, packed_row_bytes]``; ``scale`` float32 ``[A, B]`` and
    ``zero_point`` int8 ``[A, B]`` (asymmetric only) per block of the layout
    (:class:`~dpq.quant.affine.Blocks`); ``act_scale`` float32 scalar (``act_bits`` only);
    ``bias`` float32 ``[out]``.
    """

    backend = "packed"
    # Whether float_weight keeps its dequantized copy: off for layers whose own kernel never reads a
    # float weight (``cpu_int8``), where only traced calls (FLOP counting, export) dequantize.
    caches_float_weight: ClassVar[bool] = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        granularity: str = "per_channel",
        group_size: int = 128,
        symmetric: bool = True,
        act_bits: int | None = None,
        bias: bool = True,
        act_dynamic: bool = False,
    ):
        super().__init__(in_features, out_features, bits, act_bits)
        self.granularity, self.group_size, self.symmetric = granularity, int(group_size), bool(symmetric)
        # act_range=dynamic: inputs fake-quantized to uint8 over their own range (no stored scale)
        self.act_dynamic = bool(act_dynamic and act_bits)
        a, b = self.layout.qparam_shape
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_row_bytes(in_features, bits), dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.ones(a, b, dtype=torch.float32))
        self.register_buffer("zero_point", None if symmetric else torch.zeros(a, b, dtype=torch.int8))
        static_act = act_bits and not self.act_dynamic
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32) if static_act else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    @property
    def layout(self) -> Blocks:
        return Blocks(self.granularity, self.out_features, self.in_features, self.group_size)

    @property
    def storage_bits(self) -> int:
        return self.bits

    @torch.no_grad()
    def set_codes(self, codes: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> None:
        """Pack integer ``codes`` ``[out, in]`` and store the block qparams."""
        qmin, qmax = qrange(self.bits)
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise ValueError(f"codes shape {tuple(codes.shape)} != {(self.out_features, self.in_features)}")
        if codes.numel() and (codes.min().item() < qmin or codes.max().item() > qmax):
            raise ValueError(f"codes outside [{qmin}, {qmax}] for {self.bits}-bit quantization")
        self.qweight = pack_codes(codes, self.bits).to(self.qweight.device)
        self.scale = scale.detach().float().reshape(self.scale.shape).to(self.scale.device).clone()
        if self.zero_point is not None:
            zp = torch.zeros_like(self.scale) if zero_point is None else zero_point
            self.zero_point = (
                zp.detach().reshape(self.scale.shape).round().to(torch.int8).to(self.scale.device)
            )
        elif zero_point is not None and bool((zero_point != 0).any()):
            raise ValueError("a symmetric PackedLinear cannot store non-zero zero points")
        self._codes_changed()

    @torch.no_grad()
    def select_(self, dim: int, index: Tensor) -> None:
        """Keep only the output rows (``dim=0``) or input columns (``dim=1``) in ``index``, codes as they are.

        The structural shrink's hook (:func:`dpq.prune.structured.shrink_`) for a quantized layer:
        rows take their codes, block scales, zero points and bias along; columns keep every row's
        scale, so only per-channel and per-tensor codes can lose columns (a per-group block's scale
        would then cover other columns). The kept codes are bit for bit the ones trained.
        """
        index = index.to(torch.long).cpu()
        codes = self.codes()
        if dim == 0:
            rows = index.to(self.qweight.device)
            qparams = {n: getattr(self, n) for n in ("scale", "zero_point")}
            self.out_features = int(index.numel())
            for n, t in qparams.items():
                if t is not None and self.layout.granularity != "per_tensor":
                    setattr(self, n, t.index_select(0, rows.to(t.device)).clone())
            if self.bias is not None:
                self.bias = self.bias.index_select(0, rows.to(self.bias.device)).clone()
            self.qweight = pack_codes(codes.index_select(0, index.to(codes.device)), self.bits).to(
                self.qweight.device
            )
        elif dim == 1:
            if self.layout.granularity == "per_group":
                raise ValueError(
                    f"{type(self).__name__}: per-group codes cannot lose input columns (each group's scale "
                    "covers a block of columns)"
                )
            self.in_features = int(index.numel())
            self.qweight = pack_codes(codes.index_select(1, index.to(codes.device)), self.bits).to(
                self.qweight.device
            )
        else:
            raise ValueError(f"dim must be 0 (rows) or 1 (columns), got {dim}")
        self._codes_changed()

    def _codes_changed(self) -> None:
        """Hook for subclasses that keep an unpacked copy for their kernel."""

    def codes(self) -> Tensor:
        """Signed integer codes as int8 ``[out, in]``."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def _zero_point(self) -> Tensor:
        return torch.zeros_like(self.scale) if self.zero_point is None else self.zero_point.float()

    def dequantize(self) -> Tensor:
        """Float32 ``(code - zero_point) * scale``; a code equal to its zero point gives exactly 0.0."""
        return dequantize_codes(self.codes(), self.layout, self.scale, self._zero_point())

    def nonzero_weights(self) -> int:
        zp = self.layout.expand(self._zero_point())
        return int((self.codes().float() != zp).sum().item())

    def forward(self, x: Tensor) -> Tensor:
        if self.act_dynamic:
            x = fake_quantize_dynamic(x)
        elif self.act_scale is not None:
            x = fake_quantize_activation(x, self.act_scale, self.act_bits)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.float_weight(x.dtype), bias)

    def float_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dequantized weight, computed once and kept until the codes change.

        ``packed`` computes in float: dequantizing on every call made it slower than the float
        model it came from (26.9 vs 13.1 ms at batch 1 on the default task). The cache holds one
        float copy of the weight (the float model's memory again); it is rebuilt whenever a
        buffer is replaced or modified in place (tensor versions), moved or cast. Subclasses with
        ``caches_float_weight = False`` get a fresh copy per call and keep nothing.
        """
        if not self.caches_float_weight:
            return self.dequantize().to(dtype)
        tensors = tuple(t for t in (self.qweight, self.scale, self.zero_point) if t is not None)
        # Keyed on the buffer objects themselves (held, compared with ``is``) and their versions: a key of
        # data_ptr() matched new codes that set_codes/select_ put at a freed buffer's address, and the
        # forward ran with the old weight.
        key = (dtype, self.qweight.device, tuple(t._version for t in tensors))
        cached = getattr(self, "_float_cache", None)
        if (
            cached is None
            or cached[0] != key
            or len(cached[2]) != len(tensors)
            or not all(a is b for a, b in zip(cached[2], tensors, strict=True))
        ):
            cached = (key, self.dequantize().to(dtype), tensors)
            object.__setattr__(
                self, "_float_cache", cached
            )  # not a buffer: never saved; cost.peak_memory counts it
        return cached[1]

    def inference_caches(self) -> list[Tensor]:
        """Tensors held for inference beyond the state (memory that :func:`dpq.cost.peak_memory` counts)."""
        cached = getattr(self, "_float_cache", None)
        return [cached[1]] if isinstance(cached, tuple) else []

    def packed_tensors(self) -> dict[str, Tensor]:
        names = ("qweight", "scale", "zero_point", "act_scale", "bias")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def meta(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "granularity": self.granularity,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "act_bits": self.act_bits,
            "act_range": "dynamic" if self.act_dynamic else "observed",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_packed(
        cls, meta: dict, tensors: dict[str, Tensor], device: torch.device | str = "cpu"
    ) -> PackedLinear:
        mod = cls(
            meta["in_features"],
            meta["out_features"],
            meta["bits"],
            meta["granularity"],
            meta["group_size"],
            meta["symmetric"],
            meta["act_bits"],
            meta["bias"],
            **({"act_dynamic": True} if meta.get("act_range") == "dynamic" else {}),  # older saves: observed
        )
        return mod._load_packed(tensors, device)

    def _load_packed(self, tensors: dict[str, Tensor], device: torch.device | str) -> PackedLinear:
        """Copy saved packed tensors into this (freshly built) module's buffers, checking shapes and dtypes."""
        with torch.no_grad():
            for key, buf in self.packed_tensors().items():
                t = tensors[key]
                if t.shape != buf.shape or t.dtype != buf.dtype:
                    raise ValueError(
                        f"{key}: saved {tuple(t.shape)} {t.dtype} != expected {tuple(buf.shape)} {buf.dtype}"
                    )
                buf.copy_(t)
        self._codes_changed()
        return self.to(device)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", granularity={self.granularity}"
            + (f", group_size={self.group_size}" if self.granularity == "per_group" else "")
            + f", symmetric={self.symmetric}"
        )


# ------------------------------------------------------------------------------ model-level


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def _under(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def quantized_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized module: its backend, metadata and packed tensors."""
    return {n: {"backend": m.backend, **m.meta(), **m.packed_tensors()} for n, m in quantized_modules(model)}


def _tensor_key(t: Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def float_tensors(model: nn.Module, skip: list[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``state_dict`` entries outside the ``skip`` modules, tied tensors once, plus ``alias -> key``."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if not isinstance(t, Tensor) or _under(key.rpartition(".")[0], skip):
            continue
        k = _tensor_key(t)
        if k in seen:
            aliases[key] = seen[k]
            continue
        seen[k] = key
        tensors[key] = t
    return tensors, aliases


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write ``quantized_weights.safetensors`` (every tensor, low-bit ones packed) + its JSON config.

    Returns the weights path; its size on disk is the model's size at its real bit width.
    """
    qmods = quantized_modules(model)
    if not qmods:
        raise ValueError("model has no QuantizedLinear modules; call convert_ first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    names = [n for n, _ in qmods]
    for name, m in qmods:
        packed = m.packed_tensors()
        for k, t in packed.items():
            tensors[f"{name}.{k}"] = t.detach().cpu().contiguous()
        modules[name] = {"backend": m.backend, **m.meta(), "tensors": sorted(packed)}
    floats, aliases = float_tensors(model, names)
    clash = set(floats) & set(tensors)
    if clash:
        raise ValueError(f"tensor names clash between quantized and float parts: {sorted(clash)[:3]}")
    tensors.update({k: v.detach().cpu().contiguous() for k, v in floats.items()})
    bits = {m["bits"] for m in modules.values() if "bits" in m} | {m.bits for _, m in qmods}
    config = {
        "format_version": FORMAT_VERSION,
        "quant_method": "dpq",
        "backends": sorted({m.backend for _, m in qmods}),
        "bits": bits.pop() if len(bits) == 1 else "mixed",
        "modules": modules,
        "float_tensors": sorted(floats),
        "aliases": aliases,
    }
    weights_path = directory / WEIGHTS_NAME
    save_file(
        tensors, str(weights_path), metadata={"format": "pt", "dpq_format_version": str(FORMAT_VERSION)}
    )
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights_path


def safetensors_data_bytes(path: str | Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus its 8-byte length and JSON header)."""
    path = Path(path)
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header_len


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def load_quantized_(model: nn.Module, directory: str | Path) -> list[str]:
    """Put the saved low-bit modules (and float tensors) into a same-architecture model, in place.

    ``model`` is typically the float copy reloaded with ``from_pretrained``; every saved
    quantized module replaces its Linear or Conv2d, and the float tensors are loaded too (the file is
    complete on its own). Returns the replaced module names.
    """
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    version = config.get("format_version")
    tensors = load_file(str(directory / WEIGHTS_NAME))
    if version == 1:
        return _load_v1(model, config, tensors)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{directory / CONFIG_NAME}: format_version {version!r} not supported (1 or {FORMAT_VERSION})"
        )

    names: list[str] = []
    for name, meta in config["modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"saved quantized module {name!r} does not exist in the model") from None
        cls = module_type(meta["backend"], meta.get("module", "linear"))
        why = cls.mismatch(old, meta)
        if why:
            raise ValueError(f"module {name!r} {why}")
        own = {k: tensors[f"{name}.{k}"] for k in meta["tensors"]}
        new = cls.from_packed(meta, own, device=_device_of(old))
        set_module(model, name, new)
        names.append(name)
    floats = {k: tensors[k] for k in config.get("float_tensors", [])}
    for alias, key in config.get("aliases", {}).items():
        floats[alias] = floats[key]
    if floats:
        missing, unexpected = model.load_state_dict(floats, strict=False)
        missing = [k for k in missing if not _under(k.rpartition(".")[0], names)]
        if missing or unexpected:
            raise ValueError(
                f"{directory / WEIGHTS_NAME} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    return names


def _load_v1(model: nn.Module, config: dict, tensors: dict[str, Tensor]) -> list[str]:
    """Format 1 (dpq 0.1): symmetric per-channel/per-tensor codes, <=4-bit ones in nibbles (code + 8)."""

    names = []
    for name, meta in config["modules"].items():
        bits, n_in, n_out = meta["bits"], meta["in_features"], meta["out_features"]
        q = tensors[f"{name}.qweight"]
        if bits <= 4:
            codes = (
                torch.stack(((q & 0x0F).to(torch.int8), (q >> 4).to(torch.int8)), dim=-1).flatten(1)[:, :n_in]
                - 8
            )
        else:
            codes = q.to(torch.int8)
        new = PackedLinear(n_in, n_out, bits, meta["granularity"], bias=meta["bias"])
        new.set_codes(codes, tensors[f"{name}.scale"])
        if meta["bias"]:
            new.bias.copy_(tensors[f"{name}.bias"])
        set_module(model, name, new.to(_device_of(model.get_submodule(name))))
        names.append(name)
    return names


def dequantize_(model: nn.Module) -> list[str]:
    """Replace every ``QuantizedLinear`` by the float module it replaced (``nn.Linear`` / ``nn.Conv2d``)
    holding its dequantized weight.

    Gives a plain float model (exact zeros preserved) that ``save_pretrained`` can write.
    """

    names: list[str] = []
    for name, m in quantized_modules(model):
        set_module(model, name, m.float_module())
        names.append(name)
    return names
