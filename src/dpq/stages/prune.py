"""``prune``: gradual magnitude pruning of the student along the polynomial sparsity ramp."""

from __future__ import annotations

from dataclasses import dataclass

from dpq.errors import ConfigError
from dpq.pruning import SCOPES, MaskFreeze, SparsityRamp, intersect
from dpq.stages.base import KDStageConfig, Stage, register


@dataclass
class PruneConfig(KDStageConfig):
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    exponent: float = 3.0  # 3 = Zhu & Gupta's cubic ramp, 1 = linear
    update_every: int = 10  # optimizer steps between mask updates
    ramp_end: float = 0.75  # fraction of the stage at which final_sparsity is reached (then held)
    scope: str = "layer"  # layer: same sparsity per layer; global: one threshold across layers
    targets: object = None  # module selector(s); null = the model config's prune_targets

    def check(self, key: str) -> None:
        super().check(key)
        for k in ("initial_sparsity", "final_sparsity"):
            v = getattr(self, k)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{key}.{k}", v, "must be in [0, 1)")
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError(f"{key}.initial_sparsity", self.initial_sparsity,
                              f"must be <= final_sparsity ({self.final_sparsity})")
        if self.exponent <= 0:
            raise ConfigError(f"{key}.exponent", self.exponent, "must be > 0")
        if self.update_every < 1:
            raise ConfigError(f"{key}.update_every", self.update_every, "must be >= 1")
        if not 0.0 < self.ramp_end <= 1.0:
            raise ConfigError(f"{key}.ramp_end", self.ramp_end, "must be in (0, 1]")
        if self.scope not in SCOPES:
            raise ConfigError(f"{key}.scope", self.scope, f"must be one of {', '.join(SCOPES)}")


@register
class PruneStage(Stage):
    kind = "prune"
    Config = PruneConfig

    def run(self, run) -> None:
        cfg: PruneConfig = self.cfg
        student = run.ensure_student()
        targets = run.prune_targets(student, cfg.targets, f"{self.key}.targets")
        ramp = SparsityRamp(self.name, targets, cfg.initial_sparsity, cfg.final_sparsity, cfg.exponent,
                            cfg.update_every, cfg.ramp_end, cfg.scope, frozen=run.masks)
        # Masks of an earlier prune stage on modules this ramp does not touch stay frozen.
        others = {k: v for k, v in (run.masks or {}).items() if k not in targets}
        callbacks = [ramp] + ([MaskFreeze(f"{self.name}.frozen", others)] if others else [])
        run.fit(student, self, kd_alpha=cfg.alpha, callbacks=callbacks, freeze_masks=False)
        run.masks = intersect(run.masks, ramp.masks)
        run.record(self, student, extra={"ramp": [list(h) for h in ramp.history[-1:]], "mask_updates": len(ramp.history)})
