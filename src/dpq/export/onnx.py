"""Export a finished dpq model to ONNX Runtime (CPU), with its trained low-bit codes as they are.

The steps (:func:`export_onnx`):

1. A float copy of the model, every quantized layer dequantized (``s * (q - z)``), is exported
   with PyTorch's TorchScript exporter (``dynamo=False``, eager attention): the only form
   ONNX Runtime's transformer optimizer fuses. Batch and sequence axes are dynamic.
2. Hugging Face BERT-like encoders are fused by ``onnxruntime.transformers.optimizer``
   (attention, LayerNorm, GELU). A structurally shrunk model has a different head count per
   layer; the exported reshapes say ``-1`` heads, which the optimizer cannot read, so
   :func:`_fix_head_counts` writes each layer's real count first. SkipLayerNormalization is
   left unfused: on the CPUs measured it was 4x slower than Add + LayerNormalization at batch 32.
3. Every quantized layer's float weight is replaced by its own codes and scales, exactly:
   8-bit codes as ``DynamicQuantizeMatMul`` (weights stored as ``uint8`` ``q + 128`` -- the same
   ``s * (q - z)``; the ``int8`` form saturates in AVX2 kernels without VNNI); <= 4-bit codes as
   ``MatMulNBits`` (block size = the QAT group, or 128 with the scale repeated for per-channel
   codes; ``accuracy_level=0``, float math, bit-exact weights), and so are 8-bit ``per_group``
   codes (``MatMulNBits`` with ``bits=8``: the integer kernels take one scale per channel), or with
   ``nbits_compute="int8_matmul"`` as ``DynamicQuantizeMatMul`` / ``QAttention`` over signed int8
   weights (stored as INT4, see :func:`_int8_operands`); a fused attention whose Q/K/V
   are quantized per channel becomes ``QAttention``; the word
   embedding, when quantized, a ``GatherBlockQuantized``. Activations are quantized dynamically
   by ONNX Runtime (int8 ops) or stay float (``MatMulNBits``). Quantized convolutions keep their
   dequantized float weights (no integer conv here); the report lists them.
4. Checks: every replaced or kept weight is compared with the PyTorch module it came from
   (bit for bit, so pruned zeros stay exactly zero), and the ONNX Runtime logits are compared
   with PyTorch's on the example inputs: bounded (:data:`EXACT_LOGIT_TOLERANCE`) where the graph
   computes with float activations, recorded where dynamic int8 ops round them. The file is
   written beside ``path`` and moved there only once checked.

Written on ``onnx.helper`` by hand rather than with ``onnxruntime.quantization.quantize_dynamic``:
that tool re-quantizes the float weights with its own ranges, while dpq's codes come from QAT.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpq.core.errors import ConfigError
from dpq.cost import parameter_counts
from dpq.quant.packed import PackedLinear, QuantizedLinear, dequantize_, quantized_modules

log = logging.getLogger(__name__)

MS = "com.microsoft"
NBITS_BLOCK = 128  # MatMulNBits block for per-channel / per-tensor codes (the scale is repeated per block)
# MatMulNBits' accuracy_level per export.nbits_compute: "float" multiplies float activations by the
# dequantized codes (what PyTorch computes); "int8" lets ONNX Runtime quantize each block of activations
# to int8 on the fly and use integer dot products (not bit-exact: the agreement says how far; on an AVX2
# CPU without VNNI it measured slower than float, 2026-12-02). "int8_matmul" leaves MatMulNBits: the
# 4-bit codes are stored one per byte (exact: 4-bit values fit in uint8) and run by the kernels
# ``quantize_dynamic`` itself emits (DynamicQuantizeMatMul, QAttention: per-tensor dynamic uint8
# activations x uint8 weights), which use VNNI/AMX dot products where the CPU has them. The file grows
# by half a byte per encoder weight; the activations are rounded per tensor (the agreement says how far).
NBITS_COMPUTE = {"float": 0, "int8": 4, "int8_matmul": None}


def session_threads(value, key: str = "export.threads") -> int:
    """``export.threads``: ``auto`` = the intra-op threads PyTorch computes with here, so a run's ONNX
    Runtime latency is timed under the same thread count as its PyTorch latency (``cost``'s); an int
    as given."""
    if value == "auto":
        import torch

        return torch.get_num_threads()
    n = int(value) if isinstance(value, str) and value.isdigit() else value
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(key, value, "must be an integer >= 1 or auto")
    return n


@dataclass
class OnnxOptions:
    """How a model is exported (the ``export`` config group). Pure data."""

    opset: int = 17
    fuse: bool = True  # ONNX Runtime's transformer fusions (BERT-like Hugging Face encoders)
    fuse_attention: bool = True  # fused (Q)Attention; off: Q/K/V stay separate (Mat)Mul nodes
    threads: int = 2  # intra-op threads of the sessions dpq builds to check and time the model
    # Rows of the position table kept (a run sets the task's max_length): the positions the model can
    # ever see. The rest are dead weight in the file (0.69 MB of float32 at 512 x 384); a longer input
    # fails loudly in ONNX Runtime instead of running. None: keep the whole table.
    max_positions: int | None = None
    nbits_compute: str = (
        "float"  # float (exact) | int8 | int8_matmul: 4-bit layers' kernel (see NBITS_COMPUTE)
    )
    # Heads and FFN neurons that cannot change the output (all-zero output weights; all-zero input
    # weights, their constant folded into the next bias) are removed before export (dpq.prune.compact):
    # same predictions, fewer dense FLOPs for unstructured pruning at high targets.
    compact: bool = True


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and checked."""

    path: str
    size_bytes: int
    ops: dict[str, int]
    int8_layers: list[str] = field(default_factory=list)  # DynamicQuantizeMatMul / QAttention
    nbits_layers: list[str] = field(default_factory=list)  # MatMulNBits
    float_layers: list[str] = field(default_factory=list)  # quantized in PyTorch, float here (convs)
    embedding: str | None = None  # "GatherBlockQuantized <bits>-bit" or None (float table)
    weights_checked: int = 0  # weight tensors compared bit for bit with PyTorch
    zeros_checked: int = 0  # exact zeros among them
    fused: dict[str, int] = field(default_factory=dict)
    max_abs_logit_diff: float = 0.0  # ONNX Runtime vs PyTorch on the example inputs
    # Float activations throughout (no dynamic int8 op): then max_abs_logit_diff is bounded, else it is
    # activation rounding and the test agreement says how far it goes
    exact_math: bool | None = None
    max_positions: int | None = None  # the position table's rows when trimmed (longest input accepted)
    # Parameters of the model exported (position table trimmed, compacted if it was): dpq.cost's count
    params_total: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the OnnxOptions it was exported with

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExportError(RuntimeError):
    """The exported graph does not hold the model it came from (a mapping or a kernel went wrong)."""


# --------------------------------------------------------------------------- the codes of a layer


@dataclass
class Codes:
    """A quantized layer as ``W[n, k] = s[n, k // g] * (q[n, k] - z[n, k // g])`` (torch layout ``[N, K]``)."""

    q: np.ndarray  # int64 [N, K]
    s: np.ndarray  # float32 [N, G]
    z: np.ndarray  # int64 [N, G]
    bits: int
    group: int  # columns per scale
    # Trained per group: exported exactly (MatMulNBits) even when its one group spans the row, where the
    # scales look per channel (group_size >= in_features) but the model never rounded its activations.
    grouped: bool = False

    @classmethod
    def of(cls, m: QuantizedLinear) -> Codes:
        layout = m.layout
        n, k = m.out_features, m.in_features
        scale = m.scale.detach().float().cpu()
        zp = m._zero_point().cpu()
        if layout.granularity == "per_tensor":
            scale, zp = scale.reshape(1, 1).expand(n, 1), zp.reshape(1, 1).expand(n, 1)
            group = k
        elif layout.granularity == "per_channel":
            group = k
        else:
            group = layout.group_size
        q = m.codes().to(torch.int64).cpu().numpy().reshape(n, k)
        return cls(
            q,
            scale.numpy().astype(np.float32).reshape(n, -1),
            zp.round().to(torch.int64).numpy().reshape(n, -1),
            int(m.bits),
            int(group),
            layout.granularity == "per_group",
        )

    @property
    def per_channel(self) -> bool:
        return self.s.shape[1] == 1

    def dequantize(self) -> np.ndarray:
        """float32 ``[N, K]``, computed as the kernels do: ``(q - z)`` then ``* s``."""
        idx = np.arange(self.q.shape[1]) // self.group
        return (self.q - self.z[:, idx]).astype(np.float32) * self.s[:, idx]


def nbits_width(bits: int) -> int:
    """The ``MatMulNBits`` width that holds ``bits``-bit codes exactly: 4 for 2-4 bits, 8 for 5-8."""
    return 4 if bits <= 4 else 8


def _nbits_operands(c: Codes) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """``MatMulNBits`` inputs and width. 4-bit (2-4 bit codes): B uint8 ``[N, blocks, block/2]`` (even k
    in the low nibble, codes as unsigned ``q + 8``), zero points uint8 ``z + 8`` two per byte. 8-bit
    (5-8 bit codes): B uint8 ``[N, blocks, block]`` of ``q + 128``, zero points ``z + 128`` one per
    byte. Scales float32 ``[N * blocks]``; the same ``s * (q - z)`` either way."""
    n, k = c.q.shape
    bits = nbits_width(c.bits)
    off, top = 2 ** (bits - 1), 2**bits - 1
    block = NBITS_BLOCK if c.per_channel else c.group
    nb = -(-k // block)
    s = np.repeat(c.s, nb, axis=1) if c.per_channel else c.s
    z = np.repeat(c.z, nb, axis=1) if c.per_channel else c.z
    u = np.zeros((n, nb * block), np.int64)
    u[:, :k] = c.q + off
    u[:, k:] = z[:, -1:] + off  # padding dequantizes to exactly 0
    if u.min() < 0 or u.max() > top or (z + off).min() < 0 or (z + off).max() > top:
        raise ExportError(f"codes outside {bits} bits ({u.min() - off}..{u.max() - off})")
    u = u.reshape(n, nb, block).astype(np.uint8)
    if bits == 8:
        return u, s.reshape(-1).astype(np.float32), (z + off).reshape(-1).astype(np.uint8), block, bits
    b = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    zz = np.zeros((n, nb + nb % 2), np.uint8)
    zz[:, :nb] = (z + off).astype(np.uint8)
    zp = (zz[:, 0::2] | (zz[:, 1::2] << 4)).reshape(-1).astype(np.uint8)
    return b, s.reshape(-1).astype(np.float32), zp, block, bits


def _int8_operands(cs: list[Codes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel int codes of one or more layers (concatenated along N) as ONNX ``B [K, N]`` with a
    per-column scale and zero point (the same ``s * (q - z)``).

    Codes within +-64 (7 bits or fewer) are stored as int8 ``q`` and ``z``: ONNX Runtime's x86 kernels
    multiply uint8 activations by int8 weights with VNNI (or AVX2 ``vpmaddubsw``, whose int16 pair sums
    cannot saturate below 2 * 255 * 64), and took 2.5x longer per FLOP with uint8 weights
    (DynamicQuantizeMatMul, 2026-12-03, AVX512-VNNI). 8-bit codes are stored as uint8 ``q + 128``,
    which AVX2 without VNNI cannot saturate either."""
    if not all(c.per_channel for c in cs):
        raise ExportError("integer matmuls need one scale per output channel")
    q = np.concatenate([c.q.T for c in cs], 1)
    s = np.concatenate([c.s[:, 0] for c in cs]).astype(np.float32)
    z = np.concatenate([c.z[:, 0] for c in cs])
    if q.min() >= -64 and q.max() <= 64 and z.min() >= -128 and z.max() <= 127:
        return q.astype(np.int8), s, z.astype(np.int8)
    q, z = q + 128, z + 128
    if q.min() < 0 or q.max() > 255 or z.min() < 0 or z.max() > 255:
        raise ExportError("codes outside int8")
    return q.astype(np.uint8), s, z.astype(np.uint8)


def _int4_initializer(name: str, w: np.ndarray):
    """``w`` (int8 values in -8..7) as an INT4 initializer, two per byte (even index in the low nibble)."""
    from onnx import TensorProto, helper

    u = (w.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return helper.make_tensor(name, TensorProto.INT4, w.shape, (u[0::2] | (u[1::2] << 4)).tobytes(), raw=True)


# --------------------------------------------------------------------------- export


def _is_bert_like(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in ("bert", "roberta", "distilbert", "xlm-roberta", "electra")


# An attention block's query, key and value projections, by the attribute names the Hugging Face encoders
# give them: BERT, RoBERTa, XLM-RoBERTa, ELECTRA (``attention.self``) and DistilBERT (``attention``).
_QKV_ATTRIBUTES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))


def _qkv_names(model: nn.Module) -> list[tuple[str, str, str]]:
    """Each attention block's query, key and value module names, one triple per layer in model order:
    ``bert.encoder.layer.0.attention.self.query``, ``distilbert.transformer.layer.0.attention.q_lin``, ...
    (what the optimizer's fused ``Attention`` nodes hold, in the same order)."""
    out = []
    for name, module in model.named_modules():
        for attributes in _QKV_ATTRIBUTES:
            if all(isinstance(getattr(module, a, None), nn.Module) for a in attributes):
                out.append(tuple(f"{name}.{a}" if name else a for a in attributes))
                break
    return out


class _Positional(nn.Module):
    """``forward(*tensors)`` in a fixed input order, returning the logits tensor."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.m, self.names = model, names

    def forward(self, *args):
        out = self.m(**dict(zip(self.names, args)))
        return getattr(out, "logits", out)


def _float_copy(model: nn.Module) -> nn.Module:
    """The model with every quantized layer back to float (its dequantized weight), eager attention."""
    copy_ = copy.deepcopy(model).cpu().eval()
    dequantize_(copy_)
    if hasattr(copy_, "set_attn_implementation"):
        copy_.set_attn_implementation("eager")
    return copy_


def _torch_export(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path, opset: int) -> None:
    names = list(inputs)
    axes = {
        n: ({0: "batch", 1: "sequence"} if inputs[n].dim() == 2 and n != "features" else {0: "batch"})
        for n in names
    }
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about data-dependent control flow in transformers
        torch.onnx.export(
            _Positional(model, names).eval(),
            tuple(inputs[n] for n in names),
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


def _fix_head_counts(model_proto) -> int:
    """Write each attention layer's head count where the exported reshape says ``-1``.

    transformers reshapes Q/K/V with ``view(batch, seq, -1, head_size)``; the optimizer reads the
    head count from that shape. It comes from the producing MatMul: ``out_features / head_size``.
    """
    from onnx import numpy_helper

    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}

    def const(name):
        n = prod.get(name)
        while n is not None and n.op_type == "Identity":  # the exporter aliases some parameters
            name, n = n.input[0], prod.get(n.input[0])
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def out_features(name):
        for _ in range(3):
            n = prod.get(name)
            if n is None:
                return None
            if n.op_type == "MatMul":
                w = next((const(i) for i in n.input if const(i) is not None and const(i).ndim == 2), None)
                return int(w.shape[1]) if w is not None else None
            if n.op_type != "Add":
                return None
            name = next((i for i in n.input if const(i) is None), None)
            if name is None:
                return None
        return None

    fixed = 0
    for n in g.node:
        if n.op_type != "Reshape" or n.input[1] not in prod or prod[n.input[1]].op_type != "Concat":
            continue
        cc = prod[n.input[1]]
        if len(cc.input) != 4:
            continue
        a, b = const(cc.input[2]), const(cc.input[3])
        if a is None or b is None or int(a.reshape(-1)[0]) != -1 or int(b.reshape(-1)[0]) <= 0:
            continue
        of = out_features(n.input[0])
        if of is None:
            continue
        name = f"{cc.name or cc.output[0]}_num_heads"
        g.initializer.append(numpy_helper.from_array(np.array([of // int(b.reshape(-1)[0])], np.int64), name))
        cc.input[2] = name
        fixed += 1
    return fixed


def _fuse(path: Path, fuse_attention: bool, separate_qkv: bool = False) -> dict[str, int]:
    """ONNX Runtime's BERT fusions, in place; returns the fused operator counts.

    ``separate_qkv``: attention becomes ``MultiHeadAttention`` fed by the three Q/K/V MatMuls,
    which stay in the graph (so 4-bit Q/K/V can be exact ``MatMulNBits``), instead of one
    ``Attention`` holding a packed float QKV weight."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    proto = onnx.load(str(path))
    _fix_head_counts(proto)
    onnx.save(proto, str(path))
    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    options.enable_embed_layer_norm = False  # the word-embedding Gather stays visible (quantized tables)
    options.enable_attention = fuse_attention
    options.use_multi_head_attention = separate_qkv
    # The default mask format reads attention_mask as a length (its sum): a left-padded or gapped mask would
    # be computed as if right-padded, silently. The raw (batch, seq) mask is what the model was given.
    options.use_raw_attention_mask(True)
    # The optimizer's modules log as top-level names (onnx_model, fusion_base, onnx_model_bert, ...: it puts
    # its folder on sys.path), a dozen INFO lines per export; the fused counts are returned and recorded instead.
    was = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optimize_model(
                str(path),
                model_type="bert",
                num_heads=0,
                hidden_size=0,
                opt_level=0,
                optimization_options=options,
            )
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(path))
    finally:
        logging.disable(was)
    return stats


def _scope(node_name: str) -> str:
    """TorchScript node names keep the module scope: ``/m/bert/encoder/layer.0/output/dense/MatMul``."""
    parts = node_name.strip("/").split("/")
    if parts and parts[0] == "m":
        parts = parts[1:]
    return ".".join(parts[:-1])


def _replace_weights(
    path: Path, model: nn.Module, report: ExportReport, nbits_compute: str = "float"
) -> None:
    """Put the quantized layers' codes into the fused float graph; compare every weight with PyTorch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(path))
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    for n in g.node:  # parameters the exporter aliased through Identity nodes are still weights
        if n.op_type == "Identity" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]]
    modules = dict(model.named_modules())
    packed = [(n, m) for n, m in quantized_modules(model) if isinstance(m, PackedLinear)]
    codes = {n: Codes.of(m) for n, m in packed if m.module_kind == "linear"}
    # trained on dynamic uint8 activations (act_range=dynamic): the integer kernels are that model
    dynamic_act = {n for n, m in packed if getattr(m, "act_dynamic", False)}
    if nbits_compute == "int8_matmul" and (grouped := [n for n, c in codes.items() if not c.per_channel]):
        log.warning(
            "nbits_compute=int8_matmul: %d layers have per-group codes (%s, ...), which ONNX Runtime's integer "
            "kernels (one scale per output channel) cannot hold; they stay MatMulNBits on float activations",
            len(grouped),
            grouped[0],
        )
    table = next(((n, m) for n, m in packed if m.module_kind == "embedding"), None)
    floats = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    nodes, new_inits, dyn = [], [], {}
    # Quantized convs (no integer conv kernel here) and other backends' layers (torchao, bnb) are
    # exported with their dequantized float weights.
    report.float_layers = [
        n for n, m in quantized_modules(model) if n not in codes and (table is None or n != table[0])
    ]

    def weight_of(name: str) -> np.ndarray:
        return (
            codes[name].dequantize() if name in codes else floats[name].weight.detach().float().cpu().numpy()
        )

    def checked(name: str, onnx_w: np.ndarray) -> None:
        want = weight_of(name)
        if onnx_w.shape != want.shape or not np.array_equal(onnx_w, want):
            raise ExportError(
                f"{name}: the exported weight is not the model's (max diff "
                f"{np.abs(onnx_w - want).max() if onnx_w.shape == want.shape else 'shape'})"
            )
        report.weights_checked += 1
        report.zeros_checked += int((want == 0).sum())

    def quantize_input(x: str) -> list[str]:
        if x not in dyn:
            dyn[x] = [f"{x}_q", f"{x}_qs", f"{x}_qz"]
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], dyn[x], name=f"{x}_DynamicQuantize"))
        return dyn[x]

    def add(name: str, array: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(array, name))
        return name

    int4_stored = []

    def add_weight(name: str, array: np.ndarray) -> str:
        """An integer weight; 4-bit codes held in int8 are stored as INT4 and widened by a Cast, which
        ONNX Runtime folds into an int8 constant when the session loads (the file keeps half a byte
        per weight, the kernels see int8; same outputs and speed, measured 2026-12-03)."""
        if array.dtype != np.int8 or array.min() < -8 or array.max() > 7:
            return add(name, array)
        new_inits.append(_int4_initializer(f"{name}_int4", array))
        nodes.append(
            helper.make_node("Cast", [f"{name}_int4"], [name], name=f"{name}/Cast", to=TensorProto.INT8)
        )
        int4_stored.append(name)
        return name

    def integer(name: str) -> bool:
        c = codes[name]
        return c.per_channel and (
            (c.bits > 4 and not c.grouped) or nbits_compute == "int8_matmul" or name in dynamic_act
        )

    # The bias Add after a MatMul goes into DynamicQuantizeMatMul's optional bias input: one node
    # less per layer (at batch 1 every node is ~20 us of a ~2 ms model).
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    folded: set[int] = set()

    def bias_add(node):
        """The ``Add(bias, y)`` that alone consumes ``node``'s output, bias a 1-D initializer, or None."""
        y = node.output[0]
        users = consumers.get(y, [])
        if y in graph_outputs or len(users) != 1 or users[0].op_type != "Add":
            return None
        other = [i for i in users[0].input if i != y]
        if len(other) != 1 or other[0] not in inits or len(inits[other[0]].dims) != 1:
            return None
        return users[0], other[0]

    def linear_node(node, name: str, x: str, y: str, bias: str | None = None) -> bool:
        c = codes[name]
        if (c.bits <= 4 or c.grouped) and not integer(name):  # per_group 8-bit: MatMulNBits bits=8
            b, s, zp, block, width = _nbits_operands(c)
            n, k = c.q.shape
            ins = [x, add(f"{name}.nbits_B", b), add(f"{name}.nbits_scales", s), add(f"{name}.nbits_zp", zp)]
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    ins,
                    [y],
                    name=f"{name}/MatMulNBits",
                    domain=MS,
                    K=k,
                    N=n,
                    bits=width,
                    block_size=block,
                    accuracy_level=NBITS_COMPUTE[nbits_compute],
                )
            )
            report.nbits_layers.append(name)
            return True
        if not c.per_channel:
            return False
        bq, s, z = _int8_operands([c])
        ins = [x, add_weight(f"{name}.w_int", bq), add(f"{name}.w_scale", s), add(f"{name}.w_zp", z)]
        if bias:
            ins.append(bias)
        nodes.append(
            helper.make_node(
                "DynamicQuantizeMatMul", ins, [y], name=f"{name}/DynamicQuantizeMatMul", domain=MS
            )
        )
        report.int8_layers.append(name)
        return True

    qkv_layers = _qkv_names(model)
    attention = 0
    for node in g.node:
        if id(node) in folded:
            continue
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
            name = _scope(node.name)
            if name in codes or name in floats:
                w = numpy_helper.to_array(inits[node.input[1]])
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                checked(name, w if (node.op_type == "Gemm" and trans_b) else w.T)
                if name in codes and integer(name):
                    if node.op_type == "Gemm":
                        y, bias = node.output[0], (node.input[2] if len(node.input) > 2 else None)
                    elif found := bias_add(node):
                        folded.add(id(found[0]))
                        y, bias = found[0].output[0], found[1]
                    else:
                        y, bias = node.output[0], None
                    if linear_node(node, name, node.input[0], y, bias):
                        continue
                if name in codes:
                    y = (
                        node.output[0]
                        if node.op_type == "MatMul" or len(node.input) < 3
                        else f"{name}_nobias"
                    )
                    if linear_node(node, name, node.input[0], y):
                        if y != node.output[0]:
                            nodes.append(helper.make_node("Add", [y, node.input[2]], [node.output[0]]))
                        continue
        if node.op_type == "Attention":
            if attention >= len(qkv_layers):
                raise ExportError(
                    f"the fused graph has more attention nodes than the model has query/key/value layers "
                    f"({len(qkv_layers)})"
                )
            qkv = list(qkv_layers[attention])
            # the attention block, e.g. bert.encoder.layer.0.attention.self.
            prefix = qkv[0].rsplit(".", 1)[0] + "."
            attention += 1
            w = numpy_helper.to_array(inits[node.input[1]])
            want = np.concatenate([weight_of(n).T for n in qkv], 1)
            if not np.array_equal(w, want):
                raise ExportError(f"{prefix}: the fused attention weight is not the model's query/key/value")
            report.weights_checked += 3
            report.zeros_checked += int((want == 0).sum())
            if all(n in codes for n in qkv):
                bq, s, z = _int8_operands([codes[n] for n in qkv])
                xq, xs, xz = quantize_input(node.input[0])
                mask = node.input[3] if len(node.input) > 3 else ""
                heads = next(a.i for a in node.attribute if a.name == "num_heads")
                ins = [
                    xq,
                    add_weight(f"{prefix}qkv.w_int", bq),
                    node.input[2],
                    xs,
                    add(f"{prefix}qkv.w_scale", s),
                    mask,
                    xz,
                    add(f"{prefix}qkv.w_zp", z),
                ]
                nodes.append(
                    helper.make_node(
                        "QAttention",
                        ins,
                        list(node.output),
                        name=f"{prefix}QAttention",
                        domain=MS,
                        num_heads=heads,
                    )
                )
                report.int8_layers += qkv
                continue
        if node.op_type == "Gather" and table is not None and node.input[0] in inits:
            name, m = table
            w = numpy_helper.to_array(inits[node.input[0]])
            want = m.dequantize().cpu().numpy()
            if w.shape == want.shape and np.array_equal(w, want):
                report.weights_checked += 1
                report.zeros_checked += int((want == 0).sum())
                nodes.append(_gather_block_quantized(m, name, node, add))
                report.embedding = f"GatherBlockQuantized {m.bits}-bit"
                continue
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == MS for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS, 1))
    if int4_stored:  # INT4 tensors and their Cast need opset 21
        for o in proto.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, 21)
    missing = sorted(set(codes) - set(report.int8_layers) - set(report.nbits_layers))
    if missing:
        raise ExportError(f"quantized layers not found in the exported graph: {missing[:4]}")
    if table is not None and report.embedding is None:
        raise ExportError(f"the quantized table {table[0]} was not found in the exported graph")
    onnx.save(proto, str(path))


def _gather_block_quantized(m, name: str, node, add):
    """``GatherBlockQuantized`` over the table's codes: uint8 ``q + 2^(bits-1)`` (4-bit: two per byte, even
    column low), one scale per block of ``block`` columns (a per-row scale repeated over the row's blocks)."""
    from onnx import helper

    q = m.codes().to(torch.int64).cpu().numpy()
    v, d = q.shape
    scale = m.scale.detach().float().cpu().numpy()
    if m.granularity == "per_group":
        block = m.group_size
        if d % block:
            raise ExportError(f"{name}: width {d} is not a multiple of the group {block}")
    else:  # one scale per row, repeated over the row's blocks; a width such as 72 or 312 ends in a partial
        # block, which GatherBlockQuantized takes (its scales: one per started block)
        block = next((b for b in (128, 64, 32, 16) if d % b == 0), 16)
    if m.bits == 4 and d % 2:
        raise ExportError(f"{name}: 4-bit codes pack two per byte; width {d} is odd")
    blocks = -(-d // block)
    s = np.repeat(scale, blocks // scale.shape[1], axis=1) if scale.shape[1] != blocks else scale
    u = (q + 2 ** (m.bits - 1)).astype(np.uint8)
    data = u if m.bits == 8 else (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    return helper.make_node(
        "GatherBlockQuantized",
        [add(f"{name}.codes", data), node.input[1], add(f"{name}.scales", s.astype(np.float32))],
        list(node.output),
        name=f"{name}/GatherBlockQuantized",
        domain=MS,
        bits=m.bits,
        block_size=block,
        gather_axis=0,
        quantize_axis=1,
    )


def _qkv_fusable(model: nn.Module, dynamic_int8: bool = False) -> bool:
    """Whether quantized Q/K/V can be packed into one (Q)Attention without changing what the model computes.

    QAttention takes one uint8 weight per output channel and quantizes its input to uint8. Per-group
    codes do not fit it; 4-bit weight-only codes fit (4-bit values are exact in uint8) but the model
    was trained with float activations, and the dynamic uint8 input moved 0.85% of the test
    predictions of a shrunk 4-bit BERT (2026-12-02). Such Q/K/V stay three exact ``MatMulNBits``
    feeding a fused ``MultiHeadAttention``. Int8 Q/K/V (exported as dynamic int8 anyway), Q/K/V
    trained with int8 activations (``act_bits=8``) and float Q/K/V are packed, and so are 4-bit Q/K/V
    when ``dynamic_int8`` (``nbits_compute=int8_matmul``: the user asked for dynamic int8 activations)."""
    qkv = {n for layer in _qkv_names(model) for n in layer}
    for n, m in quantized_modules(model):
        if n not in qkv:
            continue
        if getattr(m, "granularity", "") == "per_group" or (
            m.bits <= 4 and not m.act_bits and not dynamic_int8
        ):
            return False
    return True


def export_onnx(
    model: nn.Module, inputs: dict[str, torch.Tensor], path: str | Path, options: OnnxOptions | None = None
) -> ExportReport:
    """Write ``model`` to ``path`` as an ONNX Runtime model (see the module docstring); check it on ``inputs``."""
    import onnx

    options = options or OnnxOptions()
    if options.nbits_compute not in NBITS_COMPUTE:
        raise ConfigError(
            "export.nbits_compute", options.nbits_compute, f"must be one of {', '.join(NBITS_COMPUTE)}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = {k: v.detach().cpu() for k, v in inputs.items()}
    model = copy.deepcopy(model).cpu().eval()  # the caller's model stays where it is
    trimmed = _trim_positions(model, options.max_positions) if options.max_positions else None
    float_model = _float_copy(model)
    with tempfile.TemporaryDirectory(prefix="dpq-onnx-") as tmp:
        raw = Path(tmp) / "model.onnx"
        _torch_export(float_model, inputs, raw, options.opset)
        fused: dict[str, int] = {}
        if options.fuse and _is_bert_like(model):
            packed_qkv = _qkv_fusable(model, dynamic_int8=options.nbits_compute == "int8_matmul")
            fused = _fuse(raw, options.fuse_attention, separate_qkv=not packed_qkv)
        # Counted after the trim: the graph no longer holds the table rows cut from it.
        params = parameter_counts(model)["params_total"]
        report = ExportReport(str(path), 0, {}, fused=fused, max_positions=trimmed, params_total=params)
        _replace_weights(raw, model, report, options.nbits_compute)
        proto = onnx.load(str(raw))
    # Written beside its destination and moved there once checked: a failed export leaves the old file.
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save(proto, str(staged))
        report.size_bytes = staged.stat().st_size
        report.ops = dict(sorted(_op_counts(proto).items()))
        report.options = asdict(options)
        session = ort_session(staged, options.threads)
        with torch.no_grad():
            want = getattr(model(**inputs), "logits", None)
        want = (want if want is not None else model(**inputs)).detach().float().numpy()
        got = session.run(["logits"], feed(session, inputs))[0]
        report.max_abs_logit_diff = float(np.abs(got - want).max())
        report.exact_math = _exact_math(report, model, options.nbits_compute)
        limit = EXACT_LOGIT_TOLERANCE * max(1.0, float(np.abs(want).max()))
        if report.exact_math and not report.max_abs_logit_diff <= limit:
            raise ExportError(
                f"ONNX Runtime's logits differ from PyTorch's by {report.max_abs_logit_diff:.3g} (allowed "
                f"{limit:.3g}: the graph's math is float, its weights the model's own): the graph does not "
                "hold the model it came from"
            )
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    report.path = str(path)
    return report


# Operators that quantize activations on the fly: their logits legitimately differ from PyTorch's by the
# rounding of those activations (0.013 to 0.80 over the 115 such exports in bench/results), so the export's
# logit check only bounds graphs without them; the test agreement says how far the others go.
DYNAMIC_INT8_OPS = frozenset(
    {"DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
)
# Float math on the model's own weights: 1.7e-6 to 5.9e-6 over the 82 such exports in bench/results (float32
# rounding, fused kernels); 1e-3 of the logit scale leaves room for long sequences and catches a wrong bias.
EXACT_LOGIT_TOLERANCE = 1e-3


def _exact_math(report: ExportReport, model: nn.Module, nbits_compute: str) -> bool:
    """Whether the graph and the PyTorch model both compute with float activations on the same weights (so
    the logits must match): no dynamic int8 op in the graph, no MatMulNBits quantizing its input, and on the
    PyTorch side no layer that rounds its activations (``act_bits``: the graph's float MatMulNBits does not)
    or runs a backend's own kernel (``float_layers``: torchao, bnb, convs, exported as float weights)."""
    if any(op in DYNAMIC_INT8_OPS for op in report.ops) or report.float_layers:
        return False
    if any(getattr(m, "act_bits", None) for _, m in quantized_modules(model)):
        return False
    return not (report.ops.get("MatMulNBits") and NBITS_COMPUTE[nbits_compute] not in (0, None))


def max_positions(value: Any, task: dict, cost: dict, key: str = "export.max_positions") -> int | None:
    """``export.max_positions`` as a number: ``"auto"`` is the longest input the run feeds the model
    (its tokenizer's ``task.max_length``, the cost inputs' ``cost.seq_len``); None for non-text tasks.
    A number below that longest input is refused now: the export would fail on it after training."""
    if value is None:
        return None
    longest = None
    if task.get("kind") == "text" and task.get("max_length") is not None:
        longest = max(int(task["max_length"]), int(cost.get("seq_len") or 0))
    if value == "auto":
        return longest
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        keep_all = "none" if key.startswith("--") else "null"  # the CLI's word, or the config's
        raise ConfigError(key, value, f"must be auto, a positive integer or {keep_all} (every row)")
    if longest is not None and value < longest:
        raise ConfigError(
            key,
            value,
            f"must be at least {longest}, the longest input this run feeds the model (task.max_length="
            f"{task['max_length']}, cost.seq_len={cost.get('seq_len')}); auto keeps exactly that many rows",
        )
    return value


def _trim_positions(model: nn.Module, keep: int) -> int | None:
    """Keep the rows of every learned position table (and its id buffers) that inputs of up to ``keep``
    tokens read; returns ``keep`` if a table was trimmed. Exact: the logits of inputs up to ``keep``
    tokens are unchanged. Position i reads row i (BERT, DistilBERT, ELECTRA: ``keep`` rows), or row
    ``padding_idx + 1 + i`` in RoBERTa-style embeddings (RoBERTa, XLM-RoBERTa: the position ids come from
    ``create_position_ids_from_input_ids``, padding reads row ``padding_idx``), which keep
    ``keep + padding_idx + 1`` rows. Hand-written because no exporter drops rows a model never reads."""
    if keep < 1:
        raise ValueError(f"max_positions must be >= 1, got {keep}")
    done, rows_kept = None, 0
    for module in model.modules():
        table = getattr(module, "position_embeddings", None)
        if not isinstance(table, nn.Embedding):
            continue
        rows = keep
        if callable(getattr(module, "create_position_ids_from_input_ids", None)):
            padding_idx = getattr(module, "padding_idx", None)
            if not isinstance(padding_idx, int):
                continue  # positions offset by an unknown amount: the table stays whole
            rows = keep + padding_idx + 1
        if table.num_embeddings <= rows:
            continue
        small = nn.Embedding(rows, table.embedding_dim, padding_idx=table.padding_idx)
        small.weight = nn.Parameter(table.weight.detach()[:rows].clone(), requires_grad=False)
        module.position_embeddings = small
        for name in ("position_ids", "token_type_ids"):  # RoBERTa gathers token_type_ids at the position ids
            buf = getattr(module, name, None)
            if isinstance(buf, torch.Tensor) and buf.dim() == 2 and buf.shape[1] > rows:
                module.register_buffer(name, buf[:, :rows].clone(), persistent=False)
        done, rows_kept = keep, max(rows_kept, rows)
    config = getattr(model, "config", None)
    if done and config is not None and getattr(config, "max_position_embeddings", 0) > rows_kept:
        config.max_position_embeddings = rows_kept
    return done


def _op_counts(proto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in proto.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


# --------------------------------------------------------------------------- running it


def ort_session(path: str | Path, threads: int = 2):
    """A CPU session as dpq measures it: ``threads`` intra-op threads that sleep when idle.

    Spinning idle threads (ONNX Runtime's default) steal the cores of everything else in the
    process -- other sessions, PyTorch -- and made interleaved timings meaningless (PyTorch
    batch 1 went from 10 to 65 ms). SkipLayerNormFusion is disabled for the reason above.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(
        str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"]
    )


def feed(session, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The session's inputs from a batch (tensors or arrays), in the dtypes the graph wants."""
    out = {}
    for i in session.get_inputs():
        if i.name not in inputs:
            raise ExportError(f"the model needs input {i.name!r}; the batch has {sorted(inputs)}")
        v = inputs[i.name]
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        out[i.name] = v.astype(np.int64 if "int64" in i.type else np.float32)
    return out
