"""Save and reload models in their library's own layout.

Hugging Face models use ``save_pretrained``/``from_pretrained``; dpq's own models (MLP, CNN:
``dpq.models.NATIVE_ARCHES``) a ``model.safetensors`` plus ``config.json``. A structurally
shrunk Hugging Face model carries its smaller shapes in ``config.dpq_structure``; it is rebuilt
from its config, resized (:func:`dpq.prune.structured.restore_structure_`) and then loaded, because
``transformers`` 5 configs cannot express per-layer head counts for ``from_pretrained``. A
quantized model is saved twice: a float copy holding the dequantized weights (reloads anywhere
with ``from_pretrained`` and gives the same logits) and the packed low-bit tensors
(``quantized_weights.safetensors``) that :func:`load_model` puts back.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from dpq.models.native import NATIVE_ARCHES, native_from_config
from dpq.prune.structured import restore_structure_
from dpq.quant import QuantizedLinear, dequantize_, load_quantized_, save_quantized


def _has_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def save_model(model: nn.Module, directory: Path, tokenizer=None, max_length: int | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``directory``. ``max_length``: the tokens per input the run
    trained and measured at (``task.max_length``), saved as the tokenizer's ``model_max_length`` so that
    ``tokenizer(text, truncation=True)`` and a ``transformers`` pipeline cut where the run did, and stay
    within the position rows an ONNX export keeps (``export.max_positions: auto``). Left at the base
    tokenizer's value (often 512) they fed the exported graph inputs it refuses."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    quantized = _has_quantized(model)
    float_model = model
    if quantized:
        save_quantized(model, directory)
        float_model = copy.deepcopy(model)
        dequantize_(float_model)
    arch = getattr(float_model, "arch_name", None)
    if arch in NATIVE_ARCHES:
        save_file(
            {k: v.contiguous() for k, v in float_model.state_dict().items()},
            str(directory / "model.safetensors"),
        )
        config = {"dpq_arch": arch, **float_model.config}
        if getattr(float_model, "dpq_original_groups", None):  # a shrink's record: later prune stages count
            config["dpq_original_groups"] = dict(float_model.dpq_original_groups)  # sparsity against it
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    else:
        float_model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        if max_length is not None:  # patched in the file: the tokenizer object is shared by the run
            path = directory / "tokenizer_config.json"
            saved = json.loads(path.read_text()) if path.exists() else {}
            saved["model_max_length"] = int(max_length)
            path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")
    return directory


def load_shrunk_pretrained(directory: Path) -> nn.Module:
    """A Hugging Face classifier saved after a structured shrink: config -> resize -> weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)  # as load_model
    restore_structure_(model, config.dpq_structure)
    state = {}
    for f in sorted(Path(directory).glob("model*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"{directory}: weights do not match the shrunk structure (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    return model.eval()


def load_model(spec: dict, task: dict, directory: Path) -> nn.Module:
    """Reload what :func:`save_model` wrote (packed low-bit modules included)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("dpq_arch") in NATIVE_ARCHES:
        originals = config.pop("dpq_original_groups", None)
        model = native_from_config(config)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        if originals:
            model.dpq_original_groups = dict(originals)
    elif config.get("dpq_structure"):
        model = load_shrunk_pretrained(directory)
    else:
        import torch
        from transformers import AutoModelForSequenceClassification

        # float32 whatever the folder holds (as build_hf): a bf16 teacher's config would otherwise make a
        # from_teacher student bf16 too, losing most AdamW updates to rounding
        model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
    if (directory / "quantized_weights.safetensors").exists():
        load_quantized_(model, directory)
    return model.eval()  # as from_pretrained does: dpq's own models came back in train mode (dropout on)
