"""Teacher and student models from ``conf/model`` / ``conf/teacher`` entries, with or without weights."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from dpq.core.errors import ConfigError
from dpq.models.hf import build_hf, check_embedded_copy, check_revision, check_tokenizer_source, skeleton_hf
from dpq.models.native import NATIVE_ARCHES, build_native

ARCHES = ("hf", "mlp", "cnn")
INITS = ("pretrained", "from_teacher", "random")


def _check_spec(spec: dict, key: str) -> None:
    arch, init = spec.get("arch"), spec.get("init", "pretrained")
    if arch not in ARCHES:
        raise ConfigError(f"{key}.arch", arch, f"must be one of {', '.join(ARCHES)}")
    if init not in INITS:
        raise ConfigError(f"{key}.init", init, f"must be one of {', '.join(INITS)}")
    if arch in NATIVE_ARCHES and spec.get("init") not in (None, "random"):
        # dpq's own MLP/CNN start from random weights: anything else was ignored, training from scratch
        raise ConfigError(
            f"{key}.init",
            spec["init"],
            f"arch={arch} models start from random weights (init: random); "
            "pretrained and from_teacher are for arch=hf",
        )
    check_revision(spec, key)
    if arch == "hf" and key == "teacher":  # the teacher's tokenizer tokenizes the data
        check_tokenizer_source(spec, key)
    if arch == "hf" and init == "pretrained":
        check_embedded_copy(spec, key)
    for part in ("tokenizer", "base_config"):  # a block of its own pins a revision as the model does
        if isinstance(spec.get(part), Mapping):
            check_revision({"arch": "hf", "init": "pretrained", **spec[part]}, f"{key}.{part}")
            check_embedded_copy(spec[part], f"{key}.{part}")
    if arch == "hf" and spec.get("dropout") is not None:
        # read by dpq's MLP/CNN only: on a Hugging Face model it was accepted and ignored
        raise ConfigError(
            f"{key}.dropout",
            spec["dropout"],
            "is read by arch=mlp/cnn models; a Hugging Face model's dropout is in its config: set "
            f"{key}.config.hidden_dropout_prob (and attention_probs_dropout_prob; DistilBERT: dropout, "
            "attention_dropout)",
        )
    if spec.get("fine_tuned") and (arch != "hf" or init != "pretrained"):
        raise ConfigError(
            f"{key}.fine_tuned",
            spec["fine_tuned"],
            "needs arch: hf and init: pretrained (a trained checkpoint)",
        )


def build_model(spec: dict, task: dict, key: str, teacher: nn.Module | None = None) -> nn.Module:
    """Build the model described by ``spec`` (a model/teacher config) for ``task``."""
    _check_spec(spec, key)
    if spec["arch"] in NATIVE_ARCHES:
        return build_native(spec, task, key)
    return build_hf(spec, task, key, teacher)


def skeleton(spec: dict, task: dict, key: str, teacher: nn.Module | None = None) -> nn.Module | None:
    """The model's modules for up-front checks: dpq's own small models built for real, Hugging Face
    ones without weights (meta device); None when that cannot be known here (offline)."""
    _check_spec(spec, key)
    if spec["arch"] in NATIVE_ARCHES:
        return build_native(spec, task, key)
    return skeleton_hf(spec, task, key, teacher)
