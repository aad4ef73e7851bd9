"""Quantization: symmetric fake-quant QAT and conversion to packed low-bit linears.

Verbs: ``prepare_qat_`` (swap Linear -> FakeQuantLinear), ``convert_``
(FakeQuantLinear -> QuantizedLinear), ``save_quantized`` / ``load_quantized_``,
``dequantize_`` (back to float for HF ``save_pretrained``). Symmetric codes keep
pruned (exactly zero) weights exactly zero throughout.
"""

from .fake import FakeQuantLinear, QATConfig, fake_quantize, prepare_qat_, select_modules
from .packed import QuantizedLinear, convert_, dequantize_, load_quantized_, quantized_state, save_quantized

__all__ = [
    "QATConfig",
    "fake_quantize",
    "FakeQuantLinear",
    "prepare_qat_",
    "select_modules",
    "QuantizedLinear",
    "convert_",
    "save_quantized",
    "load_quantized_",
    "dequantize_",
    "quantized_state",
]
