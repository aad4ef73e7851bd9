"""``spiral``: alternate prune and distill rounds; each round's model teaches the next.

Round r prunes from the previous round's sparsity to ``round_targets[r]`` (gradual ramp,
KD on), then distils with the masks frozen. Its teacher is chosen by ``teacher_mode``:
``previous`` -- the model as it entered the round (the previous round's result; for round 0
the model entering the spiral), ``original`` -- the pipeline's teacher, ``both`` -- the two
as an equally weighted ensemble. Every record, and so every logged metric, carries the
round index; results.json gets one entry per round.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any

from dpq.core.errors import ConfigError
from dpq.distill.teachers import EnsembleTeacher, TeacherLogits, TeacherSignal
from dpq.stages.base import ModelCheck, Stage, register
from dpq.stages.distill import DistillConfig, DistillStage
from dpq.stages.prune import PruneConfig, PruneStage, frozen_sparsity

TEACHER_MODES = ("previous", "original", "both")
# The round settings that follow the prune stage in conf/pipeline/spiral.yaml.
ROUND_FOLLOWS_PRUNE = ("granularity", "n_m", "criterion", "obs", "scope", "norm", "min_keep", "targets")


@dataclass
class SpiralConfig:
    kind: str = "spiral"
    rounds: int = 3
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    round_targets: Any = None  # explicit per-round targets; null = linear from initial to final
    teacher_mode: str = "previous"
    # PruneConfig / DistillConfig fields for every round's prune / distill (shorter than the stand-alone stages').
    # What is removed and how it is scored are the prune stage's defaults here; conf/pipeline/spiral.yaml
    # interpolates them from the run's prune stage, which a dataclass cannot see.
    prune: dict = field(
        default_factory=lambda: {
            "epochs": 1,
            "lr": 5e-5,
            "update_every": 10,
            "ramp_end": 0.75,
            "alpha": 0.5,
            "temperature": 2.0,
            **{k: copy.deepcopy(getattr(PruneConfig(), k)) for k in ROUND_FOLLOWS_PRUNE},
        }
    )
    distill: dict = field(default_factory=lambda: {"epochs": 1, "lr": 3e-5, "alpha": 0.5, "temperature": 2.0})

    def __post_init__(self) -> None:
        # null: the spiral's own (shorter) round settings, not the stand-alone stages' defaults
        defaults = {f.name: f.default_factory() for f in fields(self) if f.name in ("prune", "distill")}
        self.prune = dict(defaults["prune"] if self.prune is None else self.prune)
        self.distill = dict(defaults["distill"] if self.distill is None else self.distill)

    def targets(self) -> list[float]:
        if self.round_targets is not None:
            return [float(t) for t in self.round_targets]
        step = (self.final_sparsity - self.initial_sparsity) / self.rounds
        return [self.initial_sparsity + step * (r + 1) for r in range(self.rounds)]

    def check(self, key: str) -> None:
        rt = self.round_targets
        if rt is not None and (
            not isinstance(rt, (list, tuple))
            or any(isinstance(t, bool) or not isinstance(t, (int, float)) for t in rt)
        ):
            raise ConfigError(
                f"{key}.round_targets",
                rt,
                "must be a list of sparsities, one per round (e.g. [0.3, 0.5, 0.7])",
            )
        if self.rounds < 1:
            raise ConfigError(f"{key}.rounds", self.rounds, "must be >= 1")
        if self.teacher_mode not in TEACHER_MODES:
            raise ConfigError(
                f"{key}.teacher_mode", self.teacher_mode, f"must be one of {', '.join(TEACHER_MODES)}"
            )
        targets = self.targets()
        if len(targets) != self.rounds:
            raise ConfigError(
                f"{key}.round_targets", self.round_targets, f"needs one target per round ({self.rounds})"
            )
        prev = self.initial_sparsity
        for t in targets:
            if not 0.0 <= t < 1.0 or t < prev:
                raise ConfigError(
                    f"{key}.round_targets",
                    targets,
                    f"must rise monotonically from initial_sparsity={self.initial_sparsity} and stay in [0, 1)",
                )
            prev = t
        if not math.isclose(targets[-1], self.final_sparsity, abs_tol=1e-9):  # results are labelled by it
            raise ConfigError(
                f"{key}.round_targets",
                targets,
                f"must end at final_sparsity={self.final_sparsity} (the sparsity the run is reported at); "
                f"set {key}.final_sparsity={targets[-1]} too",
            )
        if self.prune.get("qat") is not None:
            raise ConfigError(
                f"{key}.prune.qat",
                self.prune["qat"],
                "quantize-aware pruning is not supported inside spiral rounds; use the prune stage's qat "
                "(pipeline=dpq_qat) or set it to null",
            )
        for sub, cls in (("prune", PruneStage), ("distill", DistillStage)):
            bad = {"kind", "initial_sparsity", "final_sparsity"} & set(getattr(self, sub))
            if bad:
                raise ConfigError(
                    f"{key}.{sub}.{sorted(bad)[0]}",
                    getattr(self, sub)[sorted(bad)[0]],
                    "is set per round by the spiral; use round_targets / final_sparsity",
                )
            checked = cls.from_config(f"{key.split('.')[-1]}.{sub}", {**getattr(self, sub), "kind": cls.kind})
            # the rounds build their configs from these: as checked (numbers to their types), not as typed
            setattr(self, sub, {k: getattr(checked.cfg, k) for k in getattr(self, sub)})
        start = self.initial_sparsity
        for r, target in enumerate(targets):  # each round's prune config, with its real range, up front
            PruneStage.from_config(
                f"{key.split('.')[-1]}.r{r}.prune",
                {**self.prune, "kind": "prune", "initial_sparsity": start, "final_sparsity": target},
            )
            start = target


@register
class SpiralStage(Stage):
    kind = "spiral"
    Config = SpiralConfig
    prunes = True

    @property
    def uses_teacher(self) -> bool:
        return self.cfg.teacher_mode != "previous"

    def check_order(self, before: list[Stage]) -> None:
        if self.uses_teacher and not any(s.trains_teacher for s in before):
            raise ConfigError(
                f"{self.key}.teacher_mode",
                self.cfg.teacher_mode,
                "needs a teacher stage before the spiral (or use teacher_mode=previous)",
            )
        first = self.round_stages(0, self.cfg.initial_sparsity, self.cfg.targets()[0])[0].cfg
        found = frozen_sparsity(before, first)  # masks of an earlier stage stay frozen
        if found and first.final_sparsity <= found[1]:
            name, left = found
            raise ConfigError(
                f"{self.key}.initial_sparsity",
                self.cfg.initial_sparsity,
                f"round 0 prunes to {first.final_sparsity:g}, but stage '{name}' before the spiral already leaves "
                f"{left:g} of the same targets pruned and its masks stay frozen; set initial_sparsity={left:g} "
                "(and final_sparsity above it) so the rounds continue from there",
            )

    def final_prune(self) -> PruneConfig:
        """The last round's prune settings: the masks the spiral leaves."""
        cfg: SpiralConfig = self.cfg
        targets = cfg.targets()
        start = targets[-2] if len(targets) > 1 else cfg.initial_sparsity
        return self.round_stages(len(targets) - 1, start, targets[-1])[0].cfg

    def check_model(self, check: ModelCheck) -> None:
        """Every round's prune and distill, checked as those stages check themselves."""
        prune = PruneStage(f"{self.name}.prune", PruneConfig(**{**self.cfg.prune, "kind": "prune"}))
        distill = DistillStage(
            f"{self.name}.distill", DistillConfig(**{**self.cfg.distill, "kind": "distill"})
        )
        prune.check_model(check)
        distill.check_model(check)

    def round_stages(self, r: int, start: float, target: float) -> tuple[PruneStage, DistillStage]:
        prune = PruneStage(
            f"{self.name}.r{r}.prune",
            PruneConfig(
                **{**self.cfg.prune, "kind": "prune", "initial_sparsity": start, "final_sparsity": target}
            ),
        )
        distill = DistillStage(
            f"{self.name}.r{r}.distill", DistillConfig(**{**self.cfg.distill, "kind": "distill"})
        )
        return prune, distill

    def run(self, state, ctx) -> None:
        cfg: SpiralConfig = self.cfg
        student = ctx.ensure_student(state)
        original = state.teacher_logits
        start = cfg.initial_sparsity
        try:
            for r, target in enumerate(cfg.targets()):
                state.teacher_logits = self._round_teacher(ctx, student, original)
                prune, distill = self.round_stages(r, start, target)
                state.round = {"round": r, "round_target": target, "teacher_mode": cfg.teacher_mode}
                for sub in (prune, distill):
                    ctx.begin_stage()
                    sub.run(state, ctx)
                start = target
        finally:
            state.teacher_logits, state.round = (
                original,
                None,
            )  # later stages distil from the pipeline's teacher again

    def _round_teacher(self, ctx, student, original: TeacherSignal | None) -> TeacherSignal | None:
        if self.cfg.teacher_mode == "original":
            return original
        snapshot = copy.deepcopy(student).eval().requires_grad_(False)
        previous = TeacherLogits(snapshot, ctx.data.num_train, ctx.num_labels)
        if self.cfg.teacher_mode == "previous":
            return previous
        if isinstance(original, EnsembleTeacher):
            # The pipeline's teacher is itself an ensemble: its members keep their weights within its
            # half (an ensemble of ensembles has no member to call), and the previous round has the other.
            w = original.weights or [1.0] * len(original.teachers)
            half = [0.5 * x / sum(w) for x in w]
            return EnsembleTeacher([*original.teachers, previous], [*half, 0.5])
        return EnsembleTeacher([original, previous])
