"""Check a whole run configuration before anything is loaded or trained.

Every problem is a :class:`~dpq.errors.ConfigError` naming the key, the bad value and what is
allowed. Data availability (an online-only task without network) is checked right after,
when the task is loaded -- still before any training.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from torch import nn

from dpq.errors import ConfigError
from dpq.stages import STAGES, Stage

TASK_KINDS = ("text", "features", "image")
# Which model architectures can read each task kind's inputs.
ARCHES_FOR_KIND = {"text": ("hf",), "features": ("mlp",), "image": ("cnn", "mlp")}
LOGGERS = ("wandb", "csv", "tensorboard", "none")


def build_stages(pipeline: dict[str, Any]) -> list[Stage]:
    """Parse ``pipeline.order`` / ``pipeline.stages`` into stage objects, checking order rules."""
    order, defined = pipeline.get("order"), pipeline.get("stages") or {}
    if not order or not isinstance(order, (list, tuple)):
        raise ConfigError("pipeline.order", order, "must be a non-empty list of stage names")
    if len(set(order)) != len(order):
        dup = next(n for n in order if order.count(n) > 1)
        raise ConfigError("pipeline.order", list(order), f"stage '{dup}' appears twice; define a second stage under another name")
    stages: list[Stage] = []
    for i, name in enumerate(order):
        if name not in defined:
            raise ConfigError(f"pipeline.order[{i}]", name,
                              f"is not a stage of this pipeline; defined stages: {', '.join(defined)}",
                              f"stage kinds: {', '.join(STAGES)}")
        raw = dict(defined[name] or {})
        kind = raw.get("kind", name)
        if kind not in STAGES:
            raise ConfigError(f"pipeline.stages.{name}.kind", kind, f"unknown stage kind; allowed: {', '.join(STAGES)}")
        raw["kind"] = kind
        stages.append(STAGES[kind].from_config(name, raw))
    for i, stage in enumerate(stages):
        if i and stages[i - 1].kind in ("quantize", "ptq"):
            raise ConfigError("pipeline.order", list(order),
                              f"stage '{stage.name}' ({stage.kind}) comes after quantization stage '{stages[i - 1].name}'; "
                              "quantization must be the last stage" +
                              (" (only one quantization stage per pipeline)" if stage.kind in ("quantize", "ptq") else ""))
        stage.check_order(stages[:i])
    return stages


def validate(cfg: dict[str, Any]) -> list[Stage]:
    """Validate the resolved run config; return the pipeline's stages."""
    task = cfg["task"]
    if task.get("kind") not in TASK_KINDS:
        raise ConfigError("task.kind", task.get("kind"), f"must be one of {', '.join(TASK_KINDS)}")
    for key in ("model", "teacher"):
        arch = cfg[key].get("arch")
        want = ARCHES_FOR_KIND[task["kind"]]
        if arch not in want:
            raise ConfigError(f"{key}", cfg[key].get("name"),
                              f"is a {arch} model but task '{task['name']}' ({task['kind']}) needs an {' or '.join(want)} model")
    if int(task.get("num_labels", 0)) < 2:
        raise ConfigError("task.num_labels", task.get("num_labels"), "must be >= 2")
    stages = build_stages(cfg["pipeline"])
    for stage in stages:
        feats = stage.cfg.feature_kd() if hasattr(stage.cfg, "feature_kd") else None
        if feats is not None and feats.active and task["kind"] != "text":
            raise ConfigError(f"{stage.key}.hidden", feats.hidden, "hidden/attention/relation distillation needs "
                              f"Hugging Face encoders (a text task); task '{task['name']}' is {task['kind']}")
    if cfg["model"].get("init") == "from_teacher" and cfg["teacher"].get("arch") != cfg["model"].get("arch"):
        raise ConfigError("model.init", "from_teacher", "needs a teacher of the same architecture")
    accel = cfg["trainer"].get("accelerator")
    if accel in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator", accel, "no CUDA GPU is visible on this machine; use trainer=cpu")
    device = cfg.get("cost", {}).get("device", "cpu")
    if device not in ("cpu", "cuda", "auto"):
        raise ConfigError("cost.device", device, "must be one of cpu, cuda, auto")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("cost.device", device, "no CUDA GPU is visible on this machine; use cpu or auto")
    check_backend_devices(cfg, device)
    check_objective(cfg)
    kind = (cfg.get("logger") or {}).get("kind", "none")
    if kind not in LOGGERS:
        raise ConfigError("logger.kind", kind, f"must be one of {', '.join(LOGGERS)}")
    check_run_keys(cfg)
    check_trainer(cfg.get("trainer") or {})
    check_models(cfg, stages)
    return stages


# ---- numbers and switches of the run itself --------------------------------------------------
def _int(key: str, v: Any, low: int, what: str = "") -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float, str))
    try:
        ok = ok and float(v).is_integer() and int(float(v)) >= low
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(key, v, f"must be an integer >= {low}{what}")


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(key, v, "must be true or false")


def check_run_keys(cfg: dict[str, Any]) -> None:
    """Seed, batch sizes, cost conditions, checkpointing and integrity switches."""
    _int("seed", cfg.get("seed"), 0)
    if not isinstance(cfg.get("run_name"), str) or not cfg["run_name"].strip():
        raise ConfigError("run_name", cfg.get("run_name"), "must be a non-empty string (it names the run folder)")
    task = cfg["task"]
    for k in ("batch_size", "eval_batch_size"):
        _int(f"task.{k}", task.get(k), 1)
    if task.get("subsample") is not None:
        _int("task.subsample", task["subsample"], 1, " or null (all examples)")
    if task.get("kind") == "text" and task.get("max_length") is not None:
        _int("task.max_length", task["max_length"], 1, " (tokens per example) or null")
    c = cfg.get("cost") or {}
    for k, low in (("batch_size", 1), ("seq_len", 1), ("warmup", 0), ("repeats", 1)):
        if k in c:
            _int(f"cost.{k}", c[k], low)
    ck = cfg.get("checkpoint") or {}
    for k in ("enabled",):
        if k in ck:
            _bool(f"checkpoint.{k}", ck[k])
    for k, low, what in (("every_n_steps", 0, " (0: only a snapshot after each stage)"), ("keep", 1, ""),
                         ("keep_snapshots", 0, " (0: keep all)")):
        if k in ck:
            _int(f"checkpoint.{k}", ck[k], low, what)
    unknown = sorted(set(ck) - {"enabled", "every_n_steps", "keep", "keep_snapshots"})
    if unknown:
        raise ConfigError(f"checkpoint.{unknown[0]}", ck[unknown[0]], "is not a checkpoint setting; allowed: enabled, "
                          "every_n_steps, keep, keep_snapshots")
    for k in ("integrity", "save_model"):
        if k in cfg:
            _bool(k, cfg[k])
    tol = cfg.get("integrity_tolerance", 0.0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:
        raise ConfigError("integrity_tolerance", tol, "must be a number in [0, 1] (largest accuracy difference allowed "
                          "between the run and its reloaded model)")


# ---- the Lightning Trainer ---------------------------------------------------------------------
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")


def check_trainer(trainer: dict[str, Any]) -> None:
    """Build the ``trainer`` config once (no fit), so a bad argument fails now with Lightning's own reason."""
    accel = trainer.get("accelerator", "auto")
    if accel not in ACCELERATORS:
        raise ConfigError("trainer.accelerator", accel, f"must be one of {', '.join(ACCELERATORS)}")
    if trainer.get("strategy") is not None or "_target_" not in trainer:
        return  # distributed launchers set up process groups when built: leave them to the first fit
    import hydra
    import lightning as L

    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[])
    try:
        built = hydra.utils.instantiate(trainer, **kw)
    except Exception as e:  # Lightning's message names the argument and what it accepts
        err = e.__cause__ or e
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        m = re.search(r"unexpected keyword argument '(\w+)'", msg)
        if m:
            raise ConfigError(f"trainer.{m.group(1)}", trainer.get(m.group(1)),
                              "is not a lightning.Trainer argument (see `python -m dpq.train --cfg job` for the trainer group)") from None
        hit = next((k for k in trainer if k != "_target_" and re.search(rf"\b{k}\b", msg)), None)
        key = f"trainer.{hit}" if hit else "trainer"
        raise ConfigError(key, trainer.get(hit) if hit else {k: v for k, v in trainer.items() if k != "_target_"}, msg) from None
    if not isinstance(built, L.Trainer):
        raise ConfigError("trainer._target_", trainer.get("_target_"), "must build a lightning Trainer")


# ---- models: module selectors and classifier heads -----------------------------------------------
QUANT_KINDS = ("quantize", "ptq")


def _skeleton(spec: dict[str, Any], task: dict[str, Any], key: str, teacher: nn.Module | None = None) -> nn.Module | None:
    """The model's modules without its weights (Hugging Face: on the meta device), or None if unknown offline."""
    from dpq.models import build_model, resolve_layers, resolve_pretrained

    if spec.get("arch") != "hf":
        return build_model(spec, task, key)  # dpq's own models are small: build them for real
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    num_labels, overrides, init = int(task["num_labels"]), dict(spec.get("config") or {}), spec.get("init", "pretrained")
    try:
        if init == "pretrained":
            path = resolve_pretrained(spec)
            config = AutoConfig.from_pretrained(path, **overrides)
            head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
            if head and config.num_labels != num_labels:
                raise ConfigError(f"{key}.pretrained", path, f"has a {config.num_labels}-label classification head, but "
                                  f"task '{task['name']}' has {num_labels} labels (task.num_labels)")
            config.num_labels = num_labels
        elif init == "random":
            base = spec.get("base_config")
            if base:
                config = AutoConfig.from_pretrained(resolve_pretrained(base) if isinstance(base, dict) else base,
                                                    num_labels=num_labels, **overrides)
            else:
                config = AutoConfig.for_model(spec.get("model_type", "bert"), num_labels=num_labels, **overrides)
        else:  # from_teacher: the teacher's config with fewer layers
            if teacher is None or not hasattr(teacher, "config"):
                return None
            n_teacher = teacher.config.num_hidden_layers
            layers = resolve_layers(spec.get("layers"), n_teacher)
            if not layers or any(not 0 <= i < n_teacher for i in layers):
                raise ConfigError("model.layers", layers, f"must be a non-empty list of teacher layer indices in [0, {n_teacher})")
            config = copy.deepcopy(teacher.config)
            config.num_hidden_layers = len(layers)
    except ConfigError:
        raise
    except Exception:  # not available offline, say: loading it later reports that with its own message
        return None
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def _saved_labels(path: str) -> int | None:
    """Label count of a saved model folder (``config.json``), or None if it does not say."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if "num_labels" in config:
        return int(config["num_labels"])
    return len(config["id2label"]) if isinstance(config.get("id2label"), dict) else None


def _select(model: nn.Module, selector: Any, key: str, quant: bool = False) -> list[str]:
    """Names ``selector`` picks; a bad regex or an empty match is a :class:`ConfigError` naming ``key``."""
    from dpq.selectors import PRUNABLE, select_prunable

    if selector is None:
        raise ConfigError(key, None, "no target modules: set it (a name, 're:<regex>' or a list of those)")
    pats = [selector] if isinstance(selector, str) else list(selector)
    for pat in pats:
        if not isinstance(pat, str):
            raise ConfigError(key, selector, "must be a module name, 're:<regex>' or a list of those")
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as e:
                raise ConfigError(key, selector, f"'{pat}' is not a valid regular expression ({e})") from None
    if quant:
        from dpq.quant import select_modules
        from dpq.quant.fake import QUANTIZABLE

        names, kinds, what = select_modules(model, selector), QUANTIZABLE, "nn.Linear or nn.Conv2d"
    else:
        names, kinds, what = select_prunable(model, selector), PRUNABLE, "nn.Linear or conv"
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, kinds)]
        raise ConfigError(key, selector, f"matches no module of the {model.__class__.__name__}; it has e.g. "
                          f"{', '.join(linears[:6]) or 'no ' + what}")
    return names


def check_models(cfg: dict[str, Any], stages: list[Stage]) -> None:
    """Before anything trains: classifier heads match ``task.num_labels``, and every stage's module
    selectors (targets, per-layer overrides, N:M groups) match the student's modules."""
    task = cfg["task"]
    num_labels = int(task["num_labels"])
    for stage in stages:
        if stage.kind != "teacher":
            continue
        saved = ([("load_from", stage.cfg.load_from)] if stage.cfg.load_from else []) + \
            [(f"ensemble[{i}]", p) for i, p in enumerate(stage.cfg.ensemble or [])]
        for sub, path in saved:
            n = _saved_labels(path)
            if n is not None and n != num_labels:
                raise ConfigError(f"{stage.key}.{sub}", path, f"is a {n}-label model, but task '{task['name']}' has "
                                  f"{num_labels} labels (task.num_labels)")
    if all(s.kind == "teacher" for s in stages):
        return
    teacher = _skeleton(cfg["teacher"], task, "teacher") if cfg["model"].get("init") == "from_teacher" else None
    student = _skeleton(cfg["model"], task, "model", teacher=teacher)
    if student is None:
        return
    model_spec = cfg["model"]
    for stage in stages:
        if stage.kind == "prune":
            _check_prune(student, stage.cfg, stage.key, model_spec)
        elif stage.kind == "spiral":
            from dpq.stages.prune import PruneConfig

            _check_prune(student, PruneConfig(**{**stage.cfg.prune, "kind": "prune"}), f"{stage.key}.prune", model_spec)
        elif stage.kind in QUANT_KINDS and hasattr(stage.cfg, "targets"):
            from dpq.quant.backends import check_module_kinds

            sel, key = stage.cfg.targets, f"{stage.key}.targets"
            if sel is None:
                sel, key = model_spec.get("quant_targets"), "model.quant_targets"
            names = _select(student, sel, key, quant=True)
            check_module_kinds(stage.cfg.backend, student, names, stage.key, key, sel)  # torchao / bnb: no conv


def _check_prune(student: nn.Module, pcfg, key: str, model_spec: dict[str, Any]) -> None:
    sel, tkey = pcfg.targets, f"{key}.targets"
    if sel is None:
        sel, tkey = model_spec.get("prune_targets"), "model.prune_targets"
    targets = _select(student, sel, tkey)
    pcfg.layer_finals(targets, key)  # every per-layer override must pick one of these targets
    if getattr(pcfg, "granularity", None) == "n:m":
        m = int(pcfg.n_m[1])
        for n in targets:
            w = student.get_submodule(n).weight
            if w.dim() == 2 and w.shape[1] % m:
                raise ConfigError(f"{key}.n_m", list(pcfg.n_m), f"module {n} has in_features={w.shape[1]}, not divisible by M={m}")


# ---- the data, once loaded -------------------------------------------------------------------------
def check_backend_devices(cfg: dict[str, Any], latency_device: str) -> None:
    """A quantization backend must run where the model is evaluated and timed (bnb on CPU fails here)."""
    import torch

    def dev(d) -> str:
        return "cuda" if d in ("gpu", "cuda") or (d == "auto" and torch.cuda.is_available()) else "cpu"

    acc = (cfg.get("trainer") or {}).get("accelerator", "cpu")
    for s in build_stages(cfg["pipeline"]):
        if hasattr(s, "check_devices"):
            s.check_devices(dev(acc), dev(latency_device))


OBJECTIVE_METRICS = ("accuracy", "loss", "val_accuracy", "val_loss", "objective")


def check_objective(cfg: dict[str, Any]) -> None:
    """Sweep objectives name metrics of results.json's ``final``; a typo would fail only after training."""
    from dpq.cost import UNITS

    allowed = sorted({*OBJECTIVE_METRICS, *(k for k in UNITS if not k.endswith(("_convention", "_method")))})
    obj = cfg.get("objective") or {}
    for m in obj.get("metrics") or []:
        if m not in allowed:
            raise ConfigError("objective.metrics", m, f"must be metrics of the final record: {', '.join(allowed)}")
    for k, w in (obj.get("weights") or {}).items():
        if k not in allowed or k == "objective":
            raise ConfigError(f"objective.weights.{k}", w, f"keys must be metrics of the final record: {', '.join(allowed)}")


def validate_data(cfg: dict[str, Any], splits) -> None:
    """Columns and shapes the task config promises are what the loaded data has."""
    task = cfg["task"]
    need = {"text": ["text", "label"], "features": ["features", "label"]}.get(splits.kind, ["label"])
    for split in ("train", "validation", "test"):
        ds = getattr(splits, split)
        missing = [c for c in need if c not in ds.column_names]
        if missing:
            raise ConfigError("task", task["name"], f"its {split} split lacks the column(s) {missing}; it has {ds.column_names}")
    if splits.kind == "features" and len(splits.train):
        width = len(splits.train[0]["features"])
        if int(task.get("num_features") or 0) != width:
            raise ConfigError("task.num_features", task.get("num_features"), f"the data has {width} features per example")
