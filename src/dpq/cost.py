"""Cost accounting for every run: parameters, sparsity, FLOPs, size and latency.

Every number here is measured on the actual model object (not inferred from a
config), so that a compressed model is reported honestly:

* parameter counts include quantized weights (which are packed buffers, not
  ``nn.Parameter``s) and never double count tied tensors;
* FLOPs are counted by fvcore on a trace of the real forward pass, with an
  explicit handle for ``aten::scaled_dot_product_attention`` (fvcore ignores
  it otherwise, which would silently drop attention cost);
* "effective" FLOPs scale each linear layer's traced cost by its weight density,
  i.e. assume perfect exploitation of exactly-zero weights and nothing else;
* size is bytes at the real storage width (``storage_bytes()`` for packed
  quantized layers, element size for everything ``state_dict()`` would save);
* latency is a median of wall-clock calls with the measuring conditions stated.

Models are called as ``model(**example_inputs)``; if the output has a
``.logits`` attribute that tensor is used.

A "quantized linear" is duck-typed (see :func:`is_quantized_linear`) so this
module does not depend on ``dpq.quant``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from numbers import Number
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "FLOPS_CONVENTION",
    "is_quantized_linear",
    "parameter_counts",
    "sparsity",
    "flops",
    "size_bytes",
    "latency",
    "example_inputs_for",
    "measure",
]

FLOPS_CONVENTION = "fvcore: one multiply-add counted as one flop"

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
    b = getattr(module, "bias", None)
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
    for name, qm in qmods.items():
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


class _PositionalWrapper(nn.Module):
    """fvcore traces with positional inputs; map them back to keywords, return logits."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = list(keys)

    def forward(self, *args: Tensor) -> Tensor:
        return _logits(self.model(**dict(zip(self.keys, args))))


def flops(model: nn.Module, example_inputs: dict[str, Tensor]) -> dict:
    """Dense and effective (zero-weight-skipping) GFLOPs via fvcore.

    Effective FLOPs scale each linear(-like) layer's traced cost by its weight
    density (nonzero / numel); every other op is counted dense. Quantized linears
    dequantize then call F.linear, so their dense count equals the float model's.
    """
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
                .unsupported_ops_warnings(False)
                .uncalled_modules_warnings(False)
                .tracer_warnings("none")
            )
            total = int(analysis.total())
            by_module = analysis.by_module()
    finally:
        fv_logger.setLevel(old_level)

    # Linear-like layers: outermost only (a quantized layer may wrap internals).
    linear_dense = 0.0
    linear_eff = 0.0
    linear_names: list[str] = []
    for name, mod in model.named_modules():
        if not _is_linear_like(mod) or _under(name, [n for n in linear_names]):
            continue
        linear_names.append(name)
        f = by_module.get(f"model.{name}" if name else "model", 0)
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
    ts = sorted(times)
    p90 = ts[min(len(ts) - 1, max(0, math.ceil(0.9 * len(ts)) - 1))]
    first = next((v for v in inputs.values() if isinstance(v, Tensor)), None)
    ids = inputs.get("input_ids")
    return {
        "latency_ms_median": float(statistics.median(ts)),
        "latency_ms_p90": float(p90),
        "latency_ms_min": float(ts[0]),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "warmup": int(warmup),
        "repeats": int(repeats),
        "batch_size": int(first.shape[0]) if first is not None and first.dim() > 0 else None,
        "seq_len": int(ids.shape[1]) if isinstance(ids, Tensor) and ids.dim() > 1 else None,
    }


# --------------------------------------------------------------------------- inputs / entry point


def example_inputs_for(
    kind: str,
    batch_size: int,
    seq_len: int | None = None,
    num_features: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Deterministic dummy inputs so cost numbers are reproducible across runs.

    "text": ``input_ids`` in [1000, vocab) (avoids special tokens) when the vocab
    is large enough, else [0, vocab); ``attention_mask`` all ones.
    "features": ``features`` float (batch, num_features).
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
    raise ValueError(f"unknown input kind {kind!r} (expected 'text' or 'features')")


def measure(
    model: nn.Module,
    example_inputs: dict[str, Tensor],
    prunable: list[str],
    latency_kwargs: dict | None = None,
) -> dict:
    """All cost numbers for one model in one dict (the entry point runs call).

    Keys: params_total, params_nonzero, sparsity, sparsity_per_layer,
    dense_gflops, effective_gflops, linear_dense_gflops, linear_effective_gflops,
    flops_convention, size_bytes, size_breakdown, latency_ms_median,
    latency_ms_p90, latency_ms_min, device, threads, warmup, repeats,
    batch_size, seq_len.
    """
    out: dict = {}
    out.update(parameter_counts(model))
    sp = sparsity(model, prunable)
    out["sparsity"] = sp["sparsity"]
    out["sparsity_per_layer"] = sp["per_layer"]
    out.update(flops(model, example_inputs))
    out.update(size_bytes(model))
    out.update(latency(model, example_inputs, **(latency_kwargs or {})))
    return out
