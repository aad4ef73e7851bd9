"""Quantization that keeps sparsity: QAT, PTQ, real low-bit backends, packed export.

Verbs: ``prepare_qat_`` / ``prepare_ptq_`` (target Linears -> torchao ``FakeQuantizedLinear``
with dpq or torchao quantizers, target Conv2ds -> :class:`FakeQuantizedConv2d`), ``calibrate_``
(PTQ activation ranges), ``convert_`` (-> a backend's :class:`QuantizedLinear`: ``packed``,
``cpu_int8``, ``torchao``, ``bnb``; convs: ``packed`` and ``cpu_int8`` only),
``check_zeros_kept`` (pruned weights still exactly zero), ``save_quantized`` /
``load_quantized_`` (the model at its real bit width), ``dequantize_`` (back to float for
Hugging Face ``save_pretrained``). Every grid maps 0.0 to exactly 0.0.
"""

from .affine import Blocks, fake_quantize
from .backends import BACKENDS, convert_, resolve_scheme
from .calibrate import calibrate_
from .callback import QuantizationAware
from .config import ALLOWED_BITS, ALLOWED_GRANULARITY, QuantConfig, qrange
from .conv import FakeQuantizedConv2d, PackedConv2d
from .embedding import FakeQuantizedEmbedding, PackedEmbedding, convert_embedding_, prepare_embedding_
from .fake import (
    MinMaxWeightQuantizer,
    head_names,
    prepare_ptq_,
    prepare_qat_,
    prepared_modules,
    select_modules,
    select_targets,
)
from .lsq import LSQWeightQuantizer
from .observers import ActivationFakeQuant
from .packed import (
    PackedLinear,
    QuantizedLinear,
    dequantize_,
    load_quantized_,
    quantized_state,
    safetensors_data_bytes,
    save_quantized,
)
from .zeros import SparsityLost, check_zeros_kept, zero_positions

__all__ = [
    "QuantConfig",
    "ALLOWED_BITS",
    "ALLOWED_GRANULARITY",
    "qrange",
    "Blocks",
    "fake_quantize",
    "prepare_qat_",
    "prepare_ptq_",
    "prepared_modules",
    "select_modules",
    "select_targets",
    "head_names",
    "MinMaxWeightQuantizer",
    "LSQWeightQuantizer",
    "ActivationFakeQuant",
    "calibrate_",
    "QuantizationAware",
    "FakeQuantizedEmbedding",
    "PackedEmbedding",
    "prepare_embedding_",
    "convert_embedding_",
    "BACKENDS",
    "resolve_scheme",
    "convert_",
    "QuantizedLinear",
    "PackedLinear",
    "FakeQuantizedConv2d",
    "PackedConv2d",
    "SparsityLost",
    "zero_positions",
    "check_zeros_kept",
    "save_quantized",
    "load_quantized_",
    "dequantize_",
    "quantized_state",
    "safetensors_data_bytes",
]
