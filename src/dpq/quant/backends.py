"""Deployment backends: what each supports, where it runs, and the ``convert_`` verb.

============  =====================  ==========================================  ============
backend       scheme                 weights (bits, granularity, symmetry)       devices
============  =====================  ==========================================  ============
``packed``    ``packed``             2/3/4/8, any, both; float compute           cpu, cuda
``cpu_int8``  ``int8``               2/3/4/8 codes in int8, tensor/channel, both cpu
``torchao``   ``int8_weight_only``   8, any, symmetric                           cpu, cuda
``torchao``   ``int8_dynamic``       8 (+ int8 per-token inputs), tensor/channel cpu, cuda
``torchao``   ``int4_weight_only``   4, groups of 32-256 (tinygemm, bf16)        cuda
``bnb``       ``nf4`` / ``fp4``      4, bitsandbytes blocks (64 or group_size)   cuda
``bnb``       ``int8``               8, per channel (LLM.int8, no outliers)      cuda
============  =====================  ==========================================  ============

``packed`` and ``cpu_int8`` convert ``nn.Conv2d`` targets too (:class:`~dpq.quant.conv.PackedConv2d`,
:class:`~dpq.quant.cpu_int8.Int8Conv2d`); ``torchao`` and ``bnb`` have linear layers only, so
targets that select a conv are a config error for them (:func:`check_module_kinds`).
``packed`` and ``cpu_int8`` reuse the QAT/PTQ codes (LSQ steps, percentile ranges, zero
points, activation ranges); ``torchao`` and ``bnb`` re-quantize the trained float weights
with their own rules. Every backend except torchao's int4 (its tinygemm format uses a
float zero point) keeps exact zeros, so only that one is refused after pruning.
``tolerance`` is the documented bound of ``max |logits_backend - logits_fake| / max |logits_fake|``
that the tests hold each backend to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpq.core.errors import ConfigError
from dpq.core.nn import set_module

from . import ao
from .config import ALLOWED_BITS, ALLOWED_GRANULARITY, QuantConfig
from .conv import PackedConv2d, conv_geometry, weight_matrix
from .cpu_int8 import Int8Conv2d, Int8Linear
from .fake import activation_scale_of, conv_names, prepared_modules, weight_qparams_of
from .packed import PackedLinear

CPU_BACKENDS = "packed, cpu_int8, torchao (schemes int8_weight_only, int8_dynamic)"
CONV_BACKENDS = ("packed", "cpu_int8")  # backends with a low-bit nn.Conv2d


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: tuple[int, ...]
    granularities: tuple[str, ...]
    symmetric_only: bool
    devices: tuple[str, ...]
    preserves_zeros: bool
    tolerance: float
    note: str = ""
    quantizes_activations: bool = True  # False: weight-only, the layer computes on float activations


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    schemes: tuple[Scheme, ...]

    def scheme(self, name: str) -> Scheme:
        return next(s for s in self.schemes if s.name == name)

    @property
    def scheme_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.schemes)

    def default_scheme(self, cfg: QuantConfig) -> str | None:
        if len(self.schemes) == 1:
            return self.schemes[0].name
        if self.name == "torchao":
            return {8: "int8_dynamic" if cfg.act_bits else "int8_weight_only", 4: "int4_weight_only"}.get(
                cfg.bits
            )
        if self.name == "bnb":
            return {4: "nf4", 8: "int8"}.get(cfg.bits)
        return None

    def devices(self, scheme: str) -> tuple[str, ...]:
        return self.scheme(scheme).devices


BACKENDS: dict[str, Backend] = {
    "packed": Backend(
        "packed",
        "bit-packed codes, dequantized to float for compute",
        (Scheme("packed", ALLOWED_BITS, ALLOWED_GRANULARITY, False, ("cpu", "cuda"), True, 1e-5),),
    ),
    "cpu_int8": Backend(
        "cpu_int8",
        "int8 x int8 matmul (torch._int_mm) on the QAT/PTQ codes",
        (
            Scheme(
                "int8",
                ALLOWED_BITS,
                ("per_tensor", "per_channel"),
                False,
                ("cpu",),
                True,
                2e-2,
                "inputs: the observed int8 range with act_bits=8 (each layer then equals the fake-quant layer "
                "up to float rounding; through a deep model a few activation roundings flip), else dynamic per token",
            ),
        ),
    ),
    "torchao": Backend(
        "torchao",
        f"torchao {ao.TORCHAO_VERSION} quantized tensors",
        (
            Scheme(
                "int8_weight_only",
                (8,),
                ALLOWED_GRANULARITY,
                True,
                ("cpu", "cuda"),
                True,
                1e-4,
                quantizes_activations=False,
            ),
            Scheme("int8_dynamic", (8,), ("per_tensor", "per_channel"), True, ("cpu", "cuda"), True, 2e-2),
            Scheme(
                "int4_weight_only",
                (4,),
                ("per_group",),
                False,
                ("cuda",),
                False,
                5e-2,
                "tinygemm: asymmetric with a float zero point, bfloat16",
                quantizes_activations=False,
            ),
        ),
    ),
    "bnb": Backend(
        "bnb",
        "bitsandbytes",
        (
            Scheme(
                "nf4", (4,), ALLOWED_GRANULARITY, False, ("cuda",), True, 2e-1, quantizes_activations=False
            ),
            Scheme(
                "fp4", (4,), ALLOWED_GRANULARITY, False, ("cuda",), True, 2e-1, quantizes_activations=False
            ),
            Scheme("int8", (8,), ("per_channel",), False, ("cuda",), True, 2e-2),
        ),
    ),
}


def available_devices() -> set[str]:
    return {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())


def resolve_scheme(backend: str, scheme: str | None, cfg: QuantConfig, key: str) -> Scheme:
    """Check ``backend`` / ``scheme`` against ``cfg`` and this machine; return the scheme.

    Every problem is a :class:`ConfigError` naming the key, the value and what is allowed.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"{key}.backend", backend, f"must be one of {', '.join(BACKENDS)}")
    b = BACKENDS[backend]
    if scheme is None:
        scheme = b.default_scheme(cfg)
        if scheme is None:
            bits = sorted({x for s in b.schemes for x in s.bits})
            raise ConfigError(
                f"{key}.bits",
                cfg.bits,
                f"backend {backend} stores {', '.join(map(str, bits))}-bit weights "
                f"only ({', '.join(b.scheme_names)}); {cfg.bits}-bit weights run with backend packed "
                "(2, 3, 4, 8 bits) or cpu_int8 (2, 3, 4, 8 bits)",
            )
    if scheme not in b.scheme_names:
        raise ConfigError(
            f"{key}.scheme",
            scheme,
            f"backend {backend} has schemes {', '.join(b.scheme_names)} (or null: by bits)",
        )
    s = b.scheme(scheme)
    if cfg.bits not in s.bits:
        raise ConfigError(
            f"{key}.bits",
            cfg.bits,
            f"backend {backend} scheme {scheme} stores "
            f"{'/'.join(map(str, s.bits))}-bit weights; {cfg.bits}-bit weights run with backend packed "
            "(2, 3, 4, 8 bits) or cpu_int8 (2, 3, 4, 8 bits)",
        )
    if cfg.granularity not in s.granularities:
        raise ConfigError(
            f"{key}.granularity",
            cfg.granularity,
            f"backend {backend} scheme {scheme} supports {', '.join(s.granularities)}",
        )
    if (
        cfg.act_bits and not s.quantizes_activations
    ):  # QAT trained on int8 inputs the deployed layer never sees
        raise ConfigError(
            f"{key}.act_bits",
            cfg.act_bits,
            f"backend {backend} scheme {scheme} is weight-only (float activations), so the converted model would "
            "not compute what QAT trained; set act_bits=null, or use a scheme that quantizes activations "
            "(packed, cpu_int8, torchao int8_dynamic, bnb int8)",
        )
    if s.symmetric_only and not cfg.symmetric:
        raise ConfigError(
            f"{key}.symmetric",
            cfg.symmetric,
            f"backend {backend} scheme {scheme} is symmetric only; "
            "set symmetric=true or use backend packed / cpu_int8",
        )
    if scheme == "int4_weight_only" and cfg.group_size not in ao.INT4_GROUP_SIZES:
        raise ConfigError(
            f"{key}.group_size",
            cfg.group_size,
            f"torchao int4_weight_only needs one of {', '.join(map(str, ao.INT4_GROUP_SIZES))}",
        )
    if backend == "bnb" and scheme != "int8" and cfg.granularity == "per_group":
        from .bnb import BLOCKSIZES

        if cfg.group_size not in BLOCKSIZES:
            raise ConfigError(
                f"{key}.group_size",
                cfg.group_size,
                f"bitsandbytes 4-bit blocks are {', '.join(map(str, BLOCKSIZES))} weights",
            )
    if not set(s.devices) & available_devices():
        raise ConfigError(
            f"{key}.backend",
            backend,
            f"{b.description} ({scheme}) runs on {', '.join(s.devices)} only, and "
            f"no CUDA GPU is visible on this machine; backends that run on CPU: {CPU_BACKENDS}",
        )
    return s


def check_device(backend: str, scheme: Scheme, device: str, key: str, what: str) -> None:
    """Raise :class:`ConfigError` if the converted model would have to run on ``device`` (``what`` says why)."""
    if device not in scheme.devices:
        raise ConfigError(
            f"{key}.backend",
            backend,
            f"{backend} ({scheme.name}) runs on {', '.join(scheme.devices)}, but "
            f"{what} is {device}; backends that run on CPU: {CPU_BACKENDS}",
        )


def check_keeps_zeros(backend: str, scheme: Scheme, pruned_by: list[str], key: str) -> None:
    if pruned_by and not scheme.preserves_zeros:
        raise ConfigError(
            f"{key}.scheme",
            scheme.name,
            f"backend {backend} scheme {scheme.name} does not keep exact zeros "
            f"({scheme.note}), but stage(s) {', '.join(pruned_by)} pruned the model; use backend packed, "
            "cpu_int8, torchao int8_*, or bnb",
        )


def check_module_kinds(
    backend: str, model: nn.Module, names: list[str], key: str, targets_key: str, targets
) -> None:
    """Raise :class:`ConfigError` if ``backend`` has no low-bit conv but the targets select ``nn.Conv2d`` modules."""
    convs = conv_names(model, names)
    if convs and backend not in CONV_BACKENDS:
        shown = ", ".join(convs[:6]) + (", ..." if len(convs) > 6 else "")
        raise ConfigError(
            f"{key}.backend",
            backend,
            f"backend {backend} quantizes nn.Linear layers only, but {targets_key}={targets!r} selects "
            f"{len(convs)} nn.Conv2d module(s) ({shown}); use backend {' or '.join(CONV_BACKENDS)}, or "
            f"set {key}.targets to select only linear layers",
        )


def check_layouts(backend: str, qcfg: QuantConfig, model: nn.Module, names: list[str], key: str) -> None:
    """Settings the conversion would refuse only after QAT has trained, refused before it: dynamic
    activation ranges on conv targets (the packed format keeps them on Linear layers only), and
    torchao's per-group schemes on a layer whose input width the group does not divide (dpq's own QAT
    pads the last group; torchao asserts; structured pruning easily leaves such widths)."""
    convs = conv_names(model, names)
    if qcfg.act_bits and qcfg.act_range == "dynamic" and convs:
        shown = ", ".join(convs[:6]) + (", ..." if len(convs) > 6 else "")
        raise ConfigError(
            f"{key}.act_range",
            qcfg.act_range,
            f"dynamic activation ranges are kept by the packed format's Linear layers only, but the targets "
            f"select {len(convs)} nn.Conv2d module(s) ({shown}); use act_range=observed, or targets without convs",
        )
    if backend == "torchao" and qcfg.granularity == "per_group":
        g = int(qcfg.group_size)
        odd = [
            (n, m.in_features)
            for n in names
            if isinstance(m := model.get_submodule(n), nn.Linear) and m.in_features % g
        ]
        if odd:
            shown = ", ".join(f"{n} ({w})" for n, w in odd[:4]) + (", ..." if len(odd) > 4 else "")
            raise ConfigError(
                f"{key}.group_size",
                g,
                f"torchao's per-group schemes need input widths the group divides; {len(odd)} target(s) "
                f"have other widths: {shown}; choose a group size that divides them, granularity=per_channel, "
                "or backend=packed (which pads the last group)",
            )


def _to_codes_module(backend: str, module: nn.Module):
    qp = weight_qparams_of(module)
    cfg: QuantConfig = module.quant_config
    w = weight_matrix(module).detach()
    from .affine import weight_codes

    if isinstance(module, nn.Conv2d):
        cls = PackedConv2d if backend == "packed" else Int8Conv2d
        shape = conv_geometry(module)
    else:
        cls = PackedLinear if backend == "packed" else Int8Linear
        shape = {"in_features": module.in_features, "out_features": module.out_features}
    dynamic = cfg.act_bits and cfg.act_range == "dynamic"
    if dynamic and cls is not PackedLinear:
        raise ValueError(
            f"act_range=dynamic is kept by the packed format's Linear layers only, not by {cls.__name__}"
        )
    new = cls(
        **shape,
        bits=qp.bits,
        granularity=qp.layout.granularity,
        group_size=qp.layout.group_size,
        symmetric=qp.symmetric,
        act_bits=cfg.act_bits,
        bias=module.bias is not None,
        **({"act_dynamic": True} if dynamic else {}),
    )
    new.set_codes(
        weight_codes(w, qp.layout, qp.scale, qp.zero_point, qp.bits),
        qp.scale,
        None if qp.symmetric else qp.zero_point,
    )
    with torch.no_grad():
        act = activation_scale_of(module)
        if act is not None:
            new.act_scale.copy_(act)
        if module.bias is not None:
            new.bias.copy_(module.bias.detach().float())
    return new.to(w.device)


def convert_(
    model: nn.Module,
    cfg: QuantConfig | None = None,
    backend: str = "packed",
    scheme: str | None = None,
    names: list[str] | None = None,
    device: str | torch.device | None = None,
) -> list[str]:
    """Replace fake-quantized modules by the backend's real low-bit modules, in place.

    ``names`` defaults to every prepared (fake-quantized) module. With ``cfg``, plain
    ``nn.Linear`` / ``nn.Conv2d`` modules it selects are first prepared for PTQ with min-max ranges
    (post-training quantization without a QAT phase). ``device`` is where the backend
    places the converted layers (bitsandbytes quantizes while moving to the GPU).
    Returns the converted names.
    """
    if cfg is not None:
        from .fake import prepare_ptq_

        prepare_ptq_(model, cfg)
    names = prepared_modules(model) if names is None else list(names)
    if not names:
        return []
    qcfg: QuantConfig = model.get_submodule(names[0]).quant_config
    s = resolve_scheme(backend, scheme, qcfg, "quant")
    check_module_kinds(backend, model, names, "quant", "names", names)
    if backend == "cpu_int8":
        from .cpu_int8 import warn_if_slow

        warn_if_slow()
    if backend in ("packed", "cpu_int8"):
        for n in names:
            try:
                set_module(model, n, _to_codes_module(backend, model.get_submodule(n)))
            except RuntimeError as e:  # an activation range never observed: say which layer
                raise RuntimeError(f"{n}: {e}") from None
    elif backend == "torchao":
        ao.convert_(model, names, s.name, qcfg, device)
    else:
        from . import bnb

        bnb.convert_(model, names, s.name, qcfg.granularity, qcfg.group_size, device or "cuda")
    return names
