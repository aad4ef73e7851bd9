"""Save and reload models in their library's own layout.

Hugging Face models use ``save_pretrained``/``from_pretrained``; MLPs a ``model.safetensors``
plus ``config.json``. A quantized model is saved twice: a float copy holding the dequantized
weights (reloads anywhere with ``from_pretrained`` and gives the same logits) and the packed
low-bit tensors (``quantized_weights.safetensors``) that :func:`load_model` puts back.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from dpq.models import MLPClassifier
from dpq.quant import QuantizedLinear, dequantize_, load_quantized_, save_quantized


def _has_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def save_model(model: nn.Module, directory: Path, tokenizer=None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    quantized = _has_quantized(model)
    float_model = model
    if quantized:
        save_quantized(model, directory)
        float_model = copy.deepcopy(model)
        dequantize_(float_model)
    if isinstance(float_model, MLPClassifier):
        save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({"dpq_arch": "mlp", **float_model.config}, indent=2))
    else:
        float_model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_model(spec: dict, task: dict, directory: Path) -> nn.Module:
    """Reload what :func:`save_model` wrote (packed low-bit modules included)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("dpq_arch") == "mlp":
        model = MLPClassifier(config["num_features"], config["num_labels"], config["hidden"], config["dropout"])
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(directory)
    if (directory / "quantized_weights.safetensors").exists():
        load_quantized_(model, directory)
    return model
