"""Quantized word embeddings: the biggest table of a small encoder, at 4 or 8 bits.

The word-embedding table of MiniLM-L3 is 30522 x 384 float32 = 47 MB, two thirds of the
model's file. Its rows are quantized symmetrically (0.0 stays exactly 0.0, so pruned rows
stay zero), one scale per row (``group_size`` null) or per group of ``group_size`` columns.

* :class:`FakeQuantizedEmbedding` -- QAT: the table is fake-quantized at every forward with
  dpq's min-max weight quantizer (straight-through gradient), the same quantizer the linear
  layers use, so conversion reproduces it bit for bit. (torchao 0.18's ``FakeQuantizedEmbedding``
  exists, but its qparams come from its own observer, which dpq's packed format and export
  would have to re-derive; one quantizer for linears and embeddings keeps the codes exact.)
* :class:`PackedEmbedding` -- the converted table: bit-packed codes and scales; a lookup
  unpacks and scales only the rows it gathers, so it is never materialised in float.

Saved, reloaded and dequantized like every :class:`~dpq.quant.packed.QuantizedLinear`
(``module_kind = "embedding"``); cost counts its bytes but never its "MACs".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpq.core.nn import set_module

from .affine import Blocks, weight_codes
from .config import QuantConfig
from .fake import MinMaxWeightQuantizer
from .packed import PackedLinear, register_module_type, unpack_codes

EMBEDDING_BITS = (4, 8)


def embedding_config(bits: int, group_size: int | None, static: bool = False) -> QuantConfig:
    """The weight quantization of a table: symmetric, per row (``group_size`` None) or per group."""
    return QuantConfig(
        bits=int(bits),
        granularity="per_group" if group_size else "per_channel",
        group_size=int(group_size or 128),
        symmetric=True,
        targets=r"re:.*",
    )


class FakeQuantizedEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose table is fake-quantized in forward (same ``weight`` Parameter)."""

    def __init__(self, emb: nn.Embedding, cfg: QuantConfig, static: bool = False):
        super().__init__(
            emb.num_embeddings,
            emb.embedding_dim,
            padding_idx=emb.padding_idx,
            max_norm=emb.max_norm,
            norm_type=emb.norm_type,
            scale_grad_by_freq=emb.scale_grad_by_freq,
            sparse=emb.sparse,
            _weight=emb.weight,
            device=emb.weight.device,
            dtype=emb.weight.dtype,
        )
        self.weight = emb.weight  # the same Parameter: optimizer and state-dict keys unchanged
        self.quant_config = cfg
        self.weight_fake_quantizer = MinMaxWeightQuantizer(cfg, emb.weight.detach(), static=static)

    def forward(self, input: Tensor) -> Tensor:
        w = self.weight_fake_quantizer(self.weight)
        return F.embedding(
            input, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def float_module(self) -> nn.Embedding:
        emb = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
            device="meta",
        )
        emb.weight = self.weight
        return emb


@register_module_type
class PackedEmbedding(PackedLinear):
    """Bit-packed table ``[num_embeddings, embedding_dim]``; a lookup dequantizes only the rows it reads.

    As a :class:`PackedLinear` its ``out_features`` are the rows (tokens) and ``in_features`` the
    embedding dimension, so one scale per output channel is one scale per row.
    """

    module_kind = "embedding"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 8,
        granularity: str = "per_channel",
        group_size: int = 128,
        symmetric: bool = True,
        act_bits: int | None = None,
        bias: bool = False,
        padding_idx: int | None = None,
    ):
        if not symmetric or act_bits or bias:
            raise ValueError("a PackedEmbedding is symmetric, has no bias and no activation quantization")
        super().__init__(in_features, out_features, bits, granularity, group_size, True, None, False)
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, input: Tensor) -> Tensor:
        flat = input.reshape(-1)
        codes = unpack_codes(self.qweight.index_select(0, flat), self.bits, self.in_features).float()
        layout = self.layout
        scale = self.scale.index_select(0, flat)  # [n, B]
        if layout.granularity == "per_group":
            rows = Blocks("per_group", flat.numel(), self.in_features, self.group_size)
            w = rows.merge(rows.split(codes) * scale.unsqueeze(-1))
        else:
            w = codes * scale
        return w.reshape(*input.shape, self.in_features)

    def float_module(self) -> nn.Embedding:
        emb = nn.Embedding(
            self.out_features, self.in_features, padding_idx=self.padding_idx, device=self.qweight.device
        )
        with torch.no_grad():
            emb.weight.copy_(self.dequantize())
        return emb

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "module": self.module_kind, "padding_idx": self.padding_idx}

    @classmethod
    def from_packed(cls, meta: dict, tensors: dict[str, Tensor], device: torch.device | str = "cpu"):
        new = cls(
            meta["in_features"],
            meta["out_features"],
            meta["bits"],
            meta["granularity"],
            meta["group_size"],
            padding_idx=meta.get("padding_idx"),
        )
        return new._load_packed(tensors, device)

    @classmethod
    def mismatch(cls, module: nn.Module, meta: dict) -> str | None:
        if not isinstance(module, (nn.Embedding, PackedEmbedding)):
            return f"is {type(module).__name__}, expected nn.Embedding"
        shape = (module.num_embeddings, module.embedding_dim)
        if shape != (meta["out_features"], meta["in_features"]):
            return f"has shape {shape} but the save has ({meta['out_features']}, {meta['in_features']})"
        return None

    def extra_repr(self) -> str:
        return f"num_embeddings={self.out_features}, embedding_dim={self.in_features}, bits={self.bits}"


def word_embedding_name(model: nn.Module) -> str | None:
    """Qualified name of the model's input (word) embedding table, if it has one."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        return None
    return next((n for n, m in model.named_modules() if m is emb), None)


def prepare_embedding_(model: nn.Module, cfg: QuantConfig, static: bool = False) -> str | None:
    """Swap the word embedding for a :class:`FakeQuantizedEmbedding` (QAT, or ``static`` ranges for PTQ)."""
    name = word_embedding_name(model)
    if name is None:
        return None
    emb = model.get_submodule(name)
    if not isinstance(emb, FakeQuantizedEmbedding):
        set_module(model, name, FakeQuantizedEmbedding(emb, cfg, static=static))
    return name


def unprepare_embedding_(model: nn.Module) -> str | None:
    """Undo :func:`prepare_embedding_`: the plain ``nn.Embedding`` with the same ``weight`` Parameter."""
    name = word_embedding_name(model)
    emb = model.get_submodule(name) if name is not None else None
    if not isinstance(emb, FakeQuantizedEmbedding):
        return None
    plain = emb.float_module()
    plain.train(emb.training)
    set_module(model, name, plain)
    return name


def convert_embedding_(model: nn.Module) -> str | None:
    """Replace the fake-quantized word embedding by its :class:`PackedEmbedding` (the same values)."""
    name = word_embedding_name(model)
    emb = model.get_submodule(name) if name is not None else None
    if not isinstance(emb, FakeQuantizedEmbedding):
        return None
    q = emb.weight_fake_quantizer
    w = emb.weight.detach()
    scale, zp = q.qparams(w)
    cfg = emb.quant_config
    new = PackedEmbedding(
        emb.embedding_dim,
        emb.num_embeddings,
        cfg.bits,
        cfg.granularity,
        cfg.group_size,
        padding_idx=emb.padding_idx,
    )
    new.set_codes(weight_codes(w, q.layout, scale, zp, cfg.bits), scale)
    set_module(model, name, new.to(w.device))
    return name
