"""What a stage is: strict config data, rules checked up front, and a ``run`` verb.

A stage kind is one class in one module of this package (plus its YAML in
``conf/pipeline/_base.yaml``). It declares:

* ``Config`` -- a dataclass of its parameters, the only source of their defaults. Unknown
  keys and out-of-range values are rejected with the key's full path before anything is
  loaded, the way llm-compressor validates recipes (:meth:`Stage.from_config`).
* :meth:`Stage.check_order` -- what must (not) come before it in ``pipeline.order``;
  :meth:`Stage.check_after` -- what it needs of the stages after it.
* :meth:`Stage.check_model` -- its module selectors, devices and task against the model's
  skeleton (weights not loaded), still before any training.
* :meth:`Stage.run` -- the work, on the passive :class:`dpq.run.state.State` through the run's
  services (:class:`dpq.run.context.RunContext`: fit, evaluate, record).

``register`` puts a kind in :data:`STAGES`; :mod:`dpq.stages` imports every module of the
package, so a new kind needs no edit anywhere else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from dpq.core.errors import ConfigError

if TYPE_CHECKING:
    from dpq.run.context import RunContext
    from dpq.run.state import State
    from dpq.stages.prune import PruneConfig

STAGES: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make ``cls.kind`` a stage kind ``pipeline.stages.<name>.kind`` may name."""
    if cls.kind in STAGES and STAGES[cls.kind] is not cls:
        raise ValueError(
            f"stage kind {cls.kind!r} is registered twice ({STAGES[cls.kind].__module__}, {cls.__module__})"
        )
    STAGES[cls.kind] = cls
    return cls


@dataclass
class StageConfig:
    kind: str = ""
    epochs: int = 1
    max_steps: int = -1  # > 0 caps the stage's optimizer steps (overrides epochs)
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06

    def check(self, key: str) -> None:
        if self.epochs < 1 and self.max_steps <= 0:
            raise ConfigError(f"{key}.epochs", self.epochs, "must be >= 1 (or set max_steps > 0)")
        if self.max_steps == 0 or self.max_steps < -1:  # 0 trained nothing; < -1 failed in Lightning
            raise ConfigError(f"{key}.max_steps", self.max_steps, "must be -1 (no cap) or a positive integer")
        if not self.lr > 0:
            raise ConfigError(f"{key}.lr", self.lr, "must be > 0")
        if not self.weight_decay >= 0:  # AdamW takes a negative one per group unchecked
            raise ConfigError(f"{key}.weight_decay", self.weight_decay, "must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{key}.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")


@dataclass
class KDStageConfig(StageConfig):
    """A stage that trains the student; ``alpha`` > 0 adds the teacher's soft labels."""

    alpha: float = 0.5
    temperature: float = 2.0
    # Intermediate-representation terms (dpq.distill.features), added to the loss with these weights.
    hidden: float = 0.0  # hidden-state transfer, through a learned projection when widths differ
    hidden_kind: str = "mse"  # mse | cosine
    layer_map: Any = None  # teacher layer (1-based) per student layer; null = uniform ceil(i*Lt/Ls)
    attention: float = 0.0  # attention-map KL (TinyBERT); switches both models to eager attention
    relation: float = 0.0  # pairwise-similarity (RKD) between the batch's [CLS] representations

    def feature_kd(self):
        from dpq.distill.features import FeatureKDConfig

        return FeatureKDConfig(
            hidden=self.hidden,
            hidden_kind=self.hidden_kind,
            layer_map=self.layer_map,
            attention=self.attention,
            relation=self.relation,
        )

    def check(self, key: str) -> None:
        super().check(key)
        try:
            self.feature_kd()
        except ValueError as e:  # "hidden_kind='l1': must be one of ...": named as that key, with its value
            field, _, why = str(e).partition("=")
            if not hasattr(self, field):
                raise ConfigError(key, None, str(e)) from None
            raise ConfigError(f"{key}.{field}", getattr(self, field), why.split(": ", 1)[-1]) from None
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"{key}.alpha", self.alpha, "must be in [0, 1]")
        if not self.temperature > 0:
            raise ConfigError(f"{key}.temperature", self.temperature, "must be > 0")


def _coerce(key: str, default: Any, v: Any, annotation: Any = None) -> Any:
    """Numbers from YAML or the command line to the field's type (finite; ``true`` is not 1); a switch
    must be true or false (a string such as "maybe" would count as true); ``null`` only where the field
    allows it (a plain ``int``/``float``/``bool`` field does not: the stage would fail on it mid-training);
    anything else unchanged."""
    if v is None:
        if annotation in ("int", "float", "bool", int, float, bool) and default is not None:
            kind = {"int": "an integer", "float": "a number", "bool": "true or false"}
            raise ConfigError(
                key, None, f"must be {kind[getattr(annotation, '__name__', annotation)]}, not null"
            )
        return v
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(key, v, "must be true or false")
        return v
    if not isinstance(default, (int, float)):
        return v
    try:
        if isinstance(v, bool):
            raise ValueError
        f = float(v)
        if not math.isfinite(f):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(key, v, f"must be a finite number ({type(default).__name__})") from None
    if isinstance(default, int):
        if not f.is_integer():
            raise ConfigError(key, v, "must be an integer")
        return int(f)
    return f


@dataclass
class ModelCheck:
    """What :meth:`Stage.check_model` checks a stage against, before any weights are loaded."""

    task: dict[str, Any]
    model_spec: dict[str, Any]
    student: nn.Module | None  # the student's modules (meta device for Hugging Face); None if unknown offline
    model_device: str = "cpu"  # where the Trainer runs the model (cpu | cuda)
    latency_device: str = "cpu"  # where cost is measured (cpu | cuda)
    extra: dict[str, Any] = field(default_factory=dict)
    tokens: int | None = None  # text tasks: token ids the data can hold (the teacher tokenizer's length)


class Stage:
    kind: ClassVar[str]
    Config: ClassVar[type] = StageConfig
    #: capabilities other stages' order rules ask about (instead of switching on kind names)
    trains_teacher: ClassVar[bool] = False  # provides the teacher later stages distil from
    prunes: ClassVar[bool] = False  # produces pruning masks
    quantizes: ClassVar[bool] = False  # converts to a low-bit model: the pipeline's last stage

    def __init__(self, name: str, cfg):
        self.name, self.cfg = name, cfg

    @property
    def key(self) -> str:
        return f"pipeline.stages.{self.name}"

    @classmethod
    def from_config(cls, name: str, raw: dict[str, Any]) -> Stage:
        key = f"pipeline.stages.{name}"
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(
                f"{key}.{unknown[0]}",
                raw[unknown[0]],
                f"is not a parameter of a {cls.kind} stage; allowed: {', '.join(sorted(fields))}",
            )
        values = {k: _coerce(f"{key}.{k}", fields[k].default, v, fields[k].type) for k, v in raw.items()}
        cfg = cls.Config(**values)
        cfg.check(key)
        return cls(name, cfg)

    @property
    def uses_teacher(self) -> bool:
        cfg = self.cfg
        return getattr(cfg, "alpha", 0.0) > 0 or (isinstance(cfg, KDStageConfig) and cfg.feature_kd().active)

    def check_order(self, before: list[Stage]) -> None:
        """Raise :class:`ConfigError` if this stage cannot follow ``before``."""
        if self.uses_teacher and not any(s.trains_teacher for s in before):
            raise ConfigError(
                f"{self.key}.alpha",
                self.cfg.alpha,
                f"the {self.kind} stage distils from a teacher (alpha or hidden/attention/relation > 0), "
                "but no teacher stage comes before it in pipeline.order; add 'teacher' first or set alpha=0",
            )

    def final_prune(self) -> PruneConfig | None:
        """The prune settings whose masks this stage leaves on the model (a later prune stage keeps them
        frozen and continues from their sparsity); None for a stage that prunes nothing."""
        return None

    def check_after(self, after: list[Stage]) -> None:
        """Raise :class:`ConfigError` if the stages that follow in ``pipeline.order`` do not fit this one
        (a stage that refers to a later one, e.g. ``prune.qat``, links it here)."""

    def check_model(self, check: ModelCheck) -> None:
        """Raise :class:`ConfigError` if the stage cannot run on this task, model or device."""
        feats = self.cfg.feature_kd() if isinstance(self.cfg, KDStageConfig) else None
        task = check.task
        if feats is not None and feats.active and task["kind"] != "text":
            raise ConfigError(
                f"{self.key}.hidden",
                feats.hidden,
                "hidden/attention/relation distillation needs "
                f"Hugging Face encoders (a text task); task '{task['name']}' is {task['kind']}",
            )

    def run(self, state: State, ctx: RunContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
