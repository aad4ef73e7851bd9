"""Cost accounting for every run: parameters, sparsity, FLOPs, BOPs, size, memory, latency.

Every number here is measured on the actual model object (not inferred from a
config), so that a compressed model is reported honestly:

* parameter counts include quantized weights (which are packed buffers, not
  ``nn.Parameter``s) and never double count tied tensors;
* FLOPs are counted by fvcore on a trace of the real forward pass, with
  explicit handles for ``aten::scaled_dot_product_attention`` and
  ``nn.MultiheadAttention``'s fused ``aten::_native_multi_head_attention``
  (fvcore ignores them otherwise, which would silently drop attention cost);
* "effective" FLOPs scale each Linear / Conv layer's traced cost by its weight density,
  i.e. assume perfect exploitation of exactly-zero weights and nothing else;
* BOPs (bit operations) are the MACs of every Linear/Conv layer times its weight
  bits times its activation bits, counting only MACs with a non-zero weight
  (see :data:`BOPS_CONVENTION`), measured with forward hooks on the real call;
* size is bytes at the real storage width (``storage_bytes()`` for packed
  quantized layers, element size for everything ``state_dict()`` would save);
* peak memory at inference is the model's resident tensors plus the peak of
  tensor bytes allocated during one forward (CUDA allocator statistics on GPU,
  torch.profiler allocation events on CPU; see :data:`PEAK_MEMORY_METHODS`);
* latency is a median (and p90) of timed calls after warm-up, with the
  measuring conditions stated (device, threads, batch, sequence length).

:data:`UNITS` names the unit of every number :func:`measure` returns.

Models are called as ``model(**example_inputs)``; if the output has a
``.logits`` attribute that tensor is used.

A "quantized linear" is duck-typed (see :func:`is_quantized_linear`) so this
module does not depend on ``dpq.quant``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from numbers import Number
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FLOPS_CONVENTION",
    "BOPS_CONVENTION",
    "PEAK_MEMORY_METHODS",
    "UNITS",
    "is_quantized_linear",
    "parameter_counts",
    "sparsity",
    "flops",
    "bops",
    "weight_bits",
    "activation_bits",
    "size_bytes",
    "peak_memory",
    "latency",
    "example_inputs_for",
    "measure",
]

# Recorded in every results.json and listed by dpq.pareto's report conditions (gather.CONVENTION_KEYS):
# kept word for word so that runs counted the same way show one convention. What it leaves out: fvcore
# counts norms as it estimates them, not as multiply-adds: LayerNorm / GroupNorm 5 flops per element
# (4 without affine), BatchNorm in eval 2 (1 without affine); they are dense in effective FLOPs. See UNITS.
FLOPS_CONVENTION = "fvcore: one multiply-add counted as one flop"
BOPS_CONVENTION = (
    "Linear/Conv MACs with a non-zero weight x weight bits x activation bits; "
    "attention matmuls, norms and elementwise ops not counted"
)
PEAK_MEMORY_METHODS = {
    "cuda": "model parameters+buffers+inputs resident on the GPU, plus the peak of "
    "torch.cuda.max_memory_allocated above its level before one forward (caching-allocator "
    "reserve and CUDA context not counted)",
    "cpu": "model parameters+buffers+inputs resident in memory, plus the peak of tensor bytes "
    "allocated during one forward from torch.profiler allocation events (profile_memory=True); "
    "memory allocated outside PyTorch's allocator (e.g. oneDNN scratch) is not seen",
}

# Unit of every number measure() returns (the pareto report and W&B tables show them).
UNITS = {
    "params_total": "count",
    "params_nonzero": "count",
    "sparsity": "fraction of exactly-zero weights in the pruned layers",
    "dense_gflops": "GFLOPs per forward (1 multiply-add = 1 flop; norms as fvcore counts them: "
    "LayerNorm 5, eval BatchNorm 2 flops per element)",
    "effective_gflops": "GFLOPs per forward, zero weights skipped (1 multiply-add = 1 flop; norms "
    "as fvcore counts them, dense)",
    "linear_dense_gflops": "GFLOPs per forward (1 multiply-add = 1 flop)",
    "linear_effective_gflops": "GFLOPs per forward (1 multiply-add = 1 flop)",
    "bops": "bit operations per forward (non-zero weights only)",
    "dense_bops": "bit operations per forward (all weights)",
    "macs": "multiply-adds per forward in Linear/Conv layers",
    "nonzero_macs": "multiply-adds per forward with a non-zero weight",
    "size_bytes": "bytes at the stored bit width",
    "peak_memory_bytes": "bytes",
    "peak_activation_bytes": "bytes",
    "latency_ms_median": "ms per forward",
    "latency_ms_p90": "ms per forward",
    "latency_ms_min": "ms per forward",
}

_QL_METHODS = ("dequantize", "storage_bytes", "nonzero_weights")
_QL_ATTRS = ("in_features", "out_features")


# --------------------------------------------------------------------------- helpers


def is_quantized_linear(module: nn.Module) -> bool:
    """Duck-type check for ``dpq.quant.packed.QuantizedLinear``-like modules.

    Their weight lives in packed buffers, so generic parameter / state_dict walks
    would miscount them; every function here special-cases them via this test.
    """
    return all(callable(getattr(module, m, None)) for m in _QL_METHODS) and all(
        hasattr(module, a) for a in _QL_ATTRS
    )


def _is_linear_like(module: nn.Module) -> bool:
    """A layer that multiplies by its weight (a quantized embedding only looks rows up: no MACs)."""
    if getattr(module, "module_kind", None) == "embedding":
        return False
    return isinstance(module, nn.Linear) or is_quantized_linear(module)


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Outermost quantized-linear modules by qualified name (nested ones are owned by them)."""
    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if found and _under(name, found):
            continue
        if is_quantized_linear(mod):
            found[name] = mod
    return found


def _under(name: str, prefixes) -> bool:
    """True if the dotted ``name`` belongs to one of the module ``prefixes``."""
    for p in prefixes:
        if p == "" or name == p or name.startswith(p + "."):
            return True
    return False


def _tensor_key(t: Tensor) -> Any:
    """Identity key for dedupe: same storage region => same key (tied weights)."""
    try:
        ptr = t.data_ptr()
    except Exception:  # e.g. tensor subclasses without storage
        ptr = 0
    if ptr == 0:
        return ("id", id(t))
    return ("ptr", ptr, t.numel(), t.dtype)


def _bias_tensor(module: nn.Module) -> Tensor | None:
    """A quantized layer's bias: its ``bias``, else its ``float_bias()`` (a wrapper such as ``BnbLinear``
    may keep it in an inner module, whose parameters the parameter walk skips as owned by the layer)."""
    if hasattr(module, "bias"):
        b = module.bias
    else:
        fb = getattr(module, "float_bias", None)
        b = fb() if callable(fb) else None
    return b if isinstance(b, Tensor) else None


def _weight_stats(module: nn.Module) -> tuple[int, int]:
    """(numel, nonzero) of a linear-like module's weight matrix."""
    if is_quantized_linear(module):
        return int(module.in_features) * int(module.out_features), int(module.nonzero_weights())
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"module {type(module).__name__} has no weight tensor")
    with torch.no_grad():
        return w.numel(), int(torch.count_nonzero(w).item())


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _to_device(inputs: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in inputs.items()}


def _logits(out: Any) -> Tensor:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """eval() for the duration, restoring every submodule's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


# --------------------------------------------------------------------------- parameters


def parameter_counts(model: nn.Module) -> dict:
    """Total and non-zero weight counts, including packed quantized weights.

    Quantized layers store weights as buffers, so a plain ``parameters()`` sum
    would undercount them; tied tensors are counted once.
    """
    qmods = _quantized_modules(model)
    seen: set = set()
    total = nonzero = 0
    for qm in qmods.values():
        total += int(qm.in_features) * int(qm.out_features)
        nonzero += int(qm.nonzero_weights())
        b = _bias_tensor(qm)
        if b is not None:
            seen.add(_tensor_key(b))
            total += b.numel()
            nonzero += int(torch.count_nonzero(b.detach()).item())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if _under(pname.rpartition(".")[0], qmods):
                continue  # owned by a quantized layer, already counted
            k = _tensor_key(p)
            if k in seen:
                continue
            seen.add(k)
            total += p.numel()
            nonzero += int(torch.count_nonzero(p).item())
    return {"params_total": int(total), "params_nonzero": int(nonzero)}


def sparsity(model: nn.Module, module_names: list[str]) -> dict:
    """Fraction of exactly-zero weights over the named (pruned) layers.

    ``sparsity`` pools all weights of the listed modules; ``per_layer`` gives each
    module's own fraction. Biases are excluded (pruning targets weight matrices).
    """
    mods = dict(model.named_modules())
    per_layer: dict[str, float] = {}
    tot = zeros = 0
    for name in module_names:
        if name not in mods:
            raise KeyError(f"no module named {name!r}")
        n, nz = _weight_stats(mods[name])
        per_layer[name] = (n - nz) / n if n else 0.0
        tot += n
        zeros += n - nz
    return {"sparsity": zeros / tot if tot else 0.0, "per_layer": per_layer}


# --------------------------------------------------------------------------- flops


def _sdpa_flop_jit(inputs: list, outputs: list) -> Number:
    """fvcore handle for ``aten::scaled_dot_product_attention``.

    Counts QK^T and AV as B*H*L*S*E + B*H*L*S*Ev multiply-adds (softmax, scaling
    and masking are not counted, consistent with fvcore's matmul convention).
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    if q is None or k is None or v is None:
        return 0
    batch = math.prod(q[:-2])
    L, E = q[-2], q[-1]
    S, Ev = k[-2], v[-1]
    return int(batch * L * S * E + batch * L * S * Ev)


def _native_mha_flop_jit(inputs: list, outputs: list) -> Number:
    """fvcore handle for ``aten::_native_multi_head_attention``: the fast path ``nn.MultiheadAttention``
    takes in eval mode without grad, one op that fvcore does not know (the whole block counted 0 flops).

    Multiply-adds of the Q/K/V projections (B*L*E*E for the query, B*S*E*E for key and value), QK^T and AV
    (B*L*S*E each over all heads) and the output projection (B*L*E*E). The projections stay inside this op,
    so their weights' zeros are not skipped in effective FLOPs (counted dense there)."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    if q is None or k is None:
        return 0
    *batch, L, E = q
    S = k[-2]
    b = math.prod(batch) if batch else 1
    return int(b * L * E * E + 2 * b * S * E * E + 2 * b * L * S * E + b * L * E * E)


class _PositionalWrapper(nn.Module):
    """fvcore traces with positional inputs; map them back to keywords, return logits."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = list(keys)

    def forward(self, *args: Tensor) -> Tensor:
        return _logits(self.model(**dict(zip(self.keys, args))))


def flops_by_module(model: nn.Module, example_inputs: dict[str, Tensor]) -> tuple[int, dict[str, int]]:
    """fvcore's total flop count of one forward and its count per module (qualified names of ``model``)."""
    from fvcore.nn import FlopCountAnalysis

    keys = list(example_inputs.keys())
    inputs = _to_device(example_inputs, _model_device(model))
    wrapper = _PositionalWrapper(model, keys)
    fv_logger = logging.getLogger("fvcore")
    old_level = fv_logger.level
    fv_logger.setLevel(logging.ERROR)
    try:
        with _eval_mode(model), torch.no_grad():
            analysis = (
                FlopCountAnalysis(wrapper, tuple(inputs[k] for k in keys))
                .set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
                .set_op_handle("aten::_native_multi_head_attention", _native_mha_flop_jit)
                .unsupported_ops_warnings(False)
                .uncalled_modules_warnings(False)
                .tracer_warnings("none")
            )
            total = int(analysis.total())
            raw = analysis.by_module()
    finally:
        fv_logger.setLevel(old_level)
    by_module = {
        k[len("model.") :] if k.startswith("model.") else ("" if k == "model" else k): int(v)
        for k, v in raw.items()
    }
    return total, by_module


def flops(model: nn.Module, example_inputs: dict[str, Tensor]) -> dict:
    """Dense and effective (zero-weight-skipping) GFLOPs via fvcore.

    Effective FLOPs scale each linear(-like) and conv layer's traced cost by its
    weight density (nonzero / numel); every other op is counted dense. Quantized
    linears (and convs) dequantize then call F.linear (F.conv2d) when traced, so their
    dense count equals the float model's; counting float convs' zeros too keeps a
    pruned CNN's effective FLOPs unchanged by quantizing it. ``linear_*`` totals
    cover these Linear and Conv layers.
    """
    total, by_module = flops_by_module(model, example_inputs)

    # Linear-like and conv layers: outermost only (a quantized layer may wrap internals).
    linear_dense = 0.0
    linear_eff = 0.0
    linear_names: list[str] = []
    for name, mod in model.named_modules():
        if not (_is_linear_like(mod) or _is_conv(mod)) or _under(name, [n for n in linear_names]):
            continue
        linear_names.append(name)
        f = by_module.get(name, 0)
        if not f:
            continue  # uncalled
        n, nz = _weight_stats(mod)
        linear_dense += f
        linear_eff += f * (nz / n if n else 0.0)
    effective = total - linear_dense + linear_eff
    return {
        "dense_gflops": total / 1e9,
        "effective_gflops": effective / 1e9,
        "linear_dense_gflops": linear_dense / 1e9,
        "linear_effective_gflops": linear_eff / 1e9,
        "flops_convention": FLOPS_CONVENTION,
    }


# --------------------------------------------------------------------------- bops


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def _dtype_bits(dtype: torch.dtype) -> int:
    if dtype.is_floating_point:
        return torch.finfo(dtype).bits
    if dtype == torch.bool:
        return 1
    return torch.iinfo(dtype).bits


def weight_bits(module: nn.Module) -> int:
    """Bits per weight: ``weight_bits``, else ``bits`` (packed / fake-quant layers), else the weight dtype."""
    for attr in ("weight_bits", "bits"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    w = getattr(module, "weight", None)
    return _dtype_bits(w.dtype) if isinstance(w, Tensor) else 32


def activation_bits(module: nn.Module, x: Any) -> int:
    """Bits per input activation: ``act_bits`` when the layer quantizes them, else the input's dtype."""
    v = getattr(module, "act_bits", None)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return _dtype_bits(x.dtype) if isinstance(x, Tensor) else 32


def bops(model: nn.Module, example_inputs: dict[str, Tensor]) -> dict:
    """Bit operations of one forward: per Linear/Conv, MACs x weight bits x activation bits.

    MACs come from the real call (forward hooks): a layer producing ``out`` does
    ``out.numel() / out_channels`` output positions, each costing one MAC per
    weight of its output channel, so non-zero MACs are positions x nnz(weight)
    (this holds for grouped convs too). ``bops`` counts only non-zero weights,
    ``dense_bops`` all of them. Bits: see :func:`weight_bits` and
    :func:`activation_bits` (a float32 layer is 32 x 32). Outermost layers only,
    so a quantized wrapper is not counted twice.
    """
    layers: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if (_is_linear_like(mod) or _is_conv(mod)) and not (layers and _under(name, layers)):
            layers[name] = mod
    tot = {"bops": 0, "dense_bops": 0, "macs": 0, "nonzero_macs": 0}

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        out = _logits(out)
        channels = int(getattr(mod, "out_features", 0) or getattr(mod, "out_channels", 0))
        if not isinstance(out, Tensor) or channels == 0:
            return
        numel, nonzero = _weight_stats(mod)
        positions = out.numel() // channels
        bits = weight_bits(mod) * activation_bits(mod, args[0] if args else None)
        tot["macs"] += positions * numel
        tot["nonzero_macs"] += positions * nonzero
        tot["dense_bops"] += positions * numel * bits
        tot["bops"] += positions * nonzero * bits

    handles = [m.register_forward_hook(hook) for m in layers.values()]
    try:
        with _eval_mode(model), torch.inference_mode():
            model(**_to_device(example_inputs, _model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return {**{k: int(v) for k, v in tot.items()}, "bops_convention": BOPS_CONVENTION}


# --------------------------------------------------------------------------- size


def size_bytes(model: nn.Module) -> dict:
    """Model size in bytes at the real bit width of what would be saved.

    Float tensors: ``state_dict()`` entries (non-persistent buffers excluded) at
    their dtype's element size, tied tensors once. Quantized linears: their own
    ``storage_bytes()``, which is assumed to cover all of that module's state
    (packed weights, scales, bias), so their internal tensors are not re-counted.
    """
    qmods = _quantized_modules(model)
    quant = sum(int(m.storage_bytes()) for m in qmods.values())
    seen: set = set()
    fl = 0
    for key, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, Tensor):
            continue
        if _under(key.rpartition(".")[0], qmods):
            continue
        k = _tensor_key(t)
        if k in seen:
            continue
        seen.add(k)
        fl += t.numel() * t.element_size()
    return {"size_bytes": int(fl + quant), "size_breakdown": {"float": int(fl), "quantized": int(quant)}}


# --------------------------------------------------------------------------- peak memory


@contextlib.contextmanager
def _placed(model: nn.Module, device: str | torch.device | None) -> Iterator[torch.device]:
    """Run on ``device`` (default: where the model is), moving the model back afterwards."""
    home = _model_device(model)
    dev = torch.device(device) if device is not None else home
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    moved = dev != home
    if moved:
        model.to(dev)
    try:
        yield dev
    finally:
        if moved:
            model.to(home)


def _resident_bytes(model: nn.Module, inputs: dict[str, Tensor]) -> int:
    """Bytes of the model's parameters and buffers (tied ones once) and of the inputs, as held in memory,
    plus weights a module keeps for inference (its ``inference_caches()``: ``packed``'s dequantized
    weights, ``cpu_int8``'s float codes; not state, so not in ``size_bytes``, but memory the process
    holds while it serves)."""
    seen: set = set()
    n = 0
    tensors = [*model.parameters(), *model.buffers(), *(v for v in inputs.values() if isinstance(v, Tensor))]
    for m in model.modules():  # caches kept for inference (duck-typed: cost does not import dpq.quant)
        caches = getattr(m, "inference_caches", None)
        tensors += list(caches()) if callable(caches) else []
    for t in _storage_tensors(tensors):
        k = _tensor_key(t)
        if k not in seen:
            seen.add(k)
            n += t.numel() * t.element_size()
    return n


def _storage_tensors(tensors: list[Tensor]) -> Iterator[Tensor]:
    """``tensors`` with every wrapper subclass (torchao's ``Int8Tensor``, ...) replaced by the plain tensors it
    holds: such a tensor reports its logical dtype (float32, 4 bytes per element) while what it keeps in
    memory is int8 codes plus scales."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for t in tensors:
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            yield from _storage_tensors([getattr(t, name) for name in names if getattr(t, name) is not None])
        else:
            yield t


@contextlib.contextmanager
def _without_profiler_banner() -> Iterator[None]:
    """Drop the two ``USDT: ... profiler_start/stop`` lines the C++ profiler writes to stderr.

    They come from native code, so Python's logging cannot silence them: fd 2 is
    sent to a temporary file for the duration and every other line is written back.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): leave it
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().splitlines(keepends=True) if not ln.startswith(b"USDT:")]
            if kept:
                os.write(2, b"".join(kept))


def _cpu_peak_allocated(run) -> int:
    """Peak net bytes of tensors allocated while ``run()`` executes.

    torch.profiler (profile_memory=True) reports every CPU allocation (+bytes) and free
    (-bytes); their running sum in time order is the memory the call holds, its maximum
    the peak. (The profiler's own running total is process-global and keeps counts from
    earlier sessions, so it is not used.)
    """
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_banner(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
        del out
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        size = getattr(node.extra_fields, "alloc_size", None)
        if isinstance(size, int) and getattr(node.extra_fields, "device", torch.device("cpu")).type == "cpu":
            events.append((node.start_time_ns, size))
    peak = held = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        held += size
        peak = max(peak, held)
    return peak


def peak_memory(
    model: nn.Module, example_inputs: dict[str, Tensor], device: str | torch.device | None = None
) -> dict:
    """Peak memory of one inference forward: resident model + inputs + peak transient tensors.

    Defined the same way on both devices so CPU and GPU numbers compare (see
    :data:`PEAK_MEMORY_METHODS`); other tensors on the device (a teacher, an optimizer)
    are not counted. One forward runs first as warm-up so lazy initialisation is not
    counted. Bytes; the method is stated in ``peak_memory_method``.
    """
    with _placed(model, device) as dev, _eval_mode(model), torch.inference_mode():
        inputs = _to_device(example_inputs, dev)
        model(**inputs)  # warm-up
        resident = _resident_bytes(model, inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            out = model(**inputs)
            torch.cuda.synchronize(dev)
            transient = torch.cuda.max_memory_allocated(dev) - base
            del out
            method = PEAK_MEMORY_METHODS["cuda"]
        else:
            method = PEAK_MEMORY_METHODS["cpu"]
            if torch.autograd.profiler._is_profiler_enabled:  # a second session would end the caller's
                transient, method = None, "not measured: torch.profiler was already running"
            else:
                transient = _cpu_peak_allocated(lambda: model(**inputs))
    return {
        "peak_memory_bytes": None if transient is None else int(resident + transient),
        "peak_activation_bytes": None if transient is None else int(transient),
        "peak_memory_device": str(dev),
        "peak_memory_method": method,
    }


# --------------------------------------------------------------------------- latency


def latency(
    model: nn.Module,
    example_inputs: dict[str, Tensor],
    warmup: int = 5,
    repeats: int = 30,
    device: str | torch.device | None = None,
) -> dict:
    """Median / p90 / min wall-clock latency per forward call, conditions included.

    Runs in eval mode under ``torch.inference_mode``; CUDA timing uses events and
    synchronizes. If ``device`` differs from the model's, the model is moved there
    for the measurement and moved back afterwards. Training flags are restored.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    home = _model_device(model)
    dev = torch.device(device) if device is not None else home
    moved = dev != home
    if moved:
        model.to(dev)
    inputs = _to_device(example_inputs, dev)
    cuda = dev.type == "cuda"
    times: list[float] = []
    try:
        with _eval_mode(model), torch.inference_mode():
            for _ in range(max(0, warmup)):
                model(**inputs)
            if cuda:
                torch.cuda.synchronize(dev)
            for _ in range(repeats):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    model(**inputs)
                    end.record()
                    torch.cuda.synchronize(dev)
                    times.append(float(start.elapsed_time(end)))
                else:
                    t0 = time.perf_counter()
                    model(**inputs)
                    times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if moved:
            model.to(home)
    first = next((v for v in inputs.values() if isinstance(v, Tensor)), None)
    ids = inputs.get("input_ids")
    return {
        **latency_summary(times),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "warmup": int(warmup),
        "repeats": int(repeats),
        "batch_size": int(first.shape[0]) if first is not None and first.dim() > 0 else None,
        "seq_len": int(ids.shape[1]) if isinstance(ids, Tensor) and ids.dim() > 1 else None,
    }


def latency_summary(times: list[float]) -> dict[str, float]:
    """Median, p90 and min of per-call milliseconds (the latency keys of a record)."""
    ts = sorted(times)
    p90 = ts[min(len(ts) - 1, max(0, math.ceil(0.9 * len(ts)) - 1))]
    return {
        "latency_ms_median": float(statistics.median(ts)),
        "latency_ms_p90": float(p90),
        "latency_ms_min": float(ts[0]),
    }


def interleaved_latency(
    models: dict[str, nn.Module],
    example_inputs: dict[str, Tensor],
    rounds: int = 10,
    per_round: int = 5,
    warmup: int = 3,
) -> dict[str, list[float]]:
    """Per-call wall-clock milliseconds of several models on the same inputs, for comparing them.

    Each round times every model ``per_round`` times in turn, so machine noise (a neighbour
    process, frequency changes) hits all alike; :func:`latency` one model at a time cannot
    promise that for models measured minutes apart. Compare medians. Models and inputs must
    be on one device; on CUDA each call is synchronized before the clock stops. Every model runs in
    eval mode (a model left training would time its dropout), its training flags restored after.
    """
    first = next((v for v in example_inputs.values() if isinstance(v, Tensor)), None)
    cuda = first is not None and first.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(first.device)) if cuda else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in models}
    with contextlib.ExitStack() as modes, torch.inference_mode():
        for m in models.values():
            if isinstance(m, nn.Module):  # an ONNX Runtime session (OrtModel) has no training mode
                modes.enter_context(_eval_mode(m))
        for m in models.values():
            for _ in range(max(0, warmup)):
                m(**example_inputs)
        sync()
        for _ in range(rounds):
            for k, m in models.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    m(**example_inputs)
                    sync()
                    times[k].append((time.perf_counter() - t0) * 1e3)
    return times


# --------------------------------------------------------------------------- inputs / entry point


def example_inputs_for(
    kind: str,
    batch_size: int,
    seq_len: int | None = None,
    num_features: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    image_shape: tuple[int, ...] | None = None,
) -> dict[str, Tensor]:
    """Deterministic dummy inputs so cost numbers are reproducible across runs.

    "text": ``input_ids`` in [1000, vocab) (avoids special tokens) when the vocab
    is large enough, else [0, vocab); ``attention_mask`` all ones.
    "features": ``features`` float (batch, num_features).
    "image": ``pixel_values`` float (batch, *image_shape), image_shape = (C, H, W).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "text":
        if seq_len is None or vocab_size is None:
            raise ValueError("text inputs need seq_len and vocab_size")
        low = 1000 if vocab_size >= 2000 else 0
        ids = torch.randint(low, vocab_size, (batch_size, seq_len), generator=g, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
    if kind == "features":
        if num_features is None:
            raise ValueError("features inputs need num_features")
        return {"features": torch.randn(batch_size, num_features, generator=g)}
    if kind == "image":
        if image_shape is None or len(image_shape) != 3:
            raise ValueError("image inputs need image_shape = (channels, height, width)")
        return {"pixel_values": torch.randn(batch_size, *(int(d) for d in image_shape), generator=g)}
    raise ValueError(f"unknown input kind {kind!r} (expected 'text', 'features' or 'image')")


def task_inputs(task: dict, cost: dict, tokenizer=None) -> dict[str, Tensor]:
    """:func:`example_inputs_for` for a task config under the ``cost`` settings (batch, sequence)."""
    kind, batch = task["kind"], int(cost["batch_size"])
    if kind == "text":
        return example_inputs_for("text", batch, int(cost["seq_len"]), vocab_size=len(tokenizer))
    if kind == "image":
        return example_inputs_for("image", batch, image_shape=tuple(task["image_shape"]))
    return example_inputs_for("features", batch, num_features=int(task["num_features"]))


def measure(
    model: nn.Module,
    example_inputs: dict[str, Tensor],
    prunable: list[str],
    latency_kwargs: dict | None = None,
    latency_fn=None,
) -> dict:
    """All cost numbers for one model in one dict (the entry point runs call).

    Keys: params_total, params_nonzero, sparsity, sparsity_per_layer,
    dense_gflops, effective_gflops, linear_dense_gflops, linear_effective_gflops,
    flops_convention, bops, dense_bops, macs, nonzero_macs, bops_convention,
    size_bytes, size_breakdown, peak_memory_bytes, peak_activation_bytes,
    peak_memory_device, peak_memory_method, latency_ms_median, latency_ms_p90,
    latency_ms_min, device, threads, warmup, repeats, batch_size, seq_len.
    ``latency_fn`` times the model in place of :func:`latency` (same arguments and keys; a run
    passes :func:`dpq.latency_process.latency`, which times it in a fresh process).
    Units: :data:`UNITS`. Peak memory is measured where latency is (``device``).
    """
    out: dict = {}
    out.update(parameter_counts(model))
    sp = sparsity(model, prunable)
    out["sparsity"] = sp["sparsity"]
    out["sparsity_per_layer"] = sp["per_layer"]
    out.update(flops(model, example_inputs))
    out.update(bops(model, example_inputs))
    out.update(size_bytes(model))
    out.update(peak_memory(model, example_inputs, device=(latency_kwargs or {}).get("device")))
    out.update((latency_fn or latency)(model, example_inputs, **(latency_kwargs or {})))
    return out
