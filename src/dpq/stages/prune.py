"""``prune``: gradual pruning of the student along a sparsity schedule.

Criterion (magnitude / Taylor / movement / OBS), granularity (unstructured / N:M / structured
heads, neurons, channels), schedule and per-layer final sparsities are chosen here;
:class:`dpq.prune.callbacks.SparsityRamp` does the work. Structured pruning ends with a physical
shrink (:func:`dpq.prune.structured.shrink_`) unless ``shrink=false``. With ``qat: quantize`` the ramp
runs on the fake-quantized student (quantize-aware pruning).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from dpq.core.errors import ConfigError
from dpq.core.selectors import PRUNABLE, matches, resolve_targets, select_checked
from dpq.prune import depth, structured
from dpq.prune.callbacks import MaskFreeze, SparsityRamp
from dpq.prune.masks import CRITERIA, GRANULARITIES, SCOPES, intersect
from dpq.prune.obs import UPDATE_METHODS, ObsOptions
from dpq.prune.schedules import SCHEDULES, make_schedule
from dpq.stages.base import KDStageConfig, ModelCheck, Stage, register
from dpq.stages.quantize import QuantAwareTraining, check_qat_name

log = logging.getLogger(__name__)

FILL_KINDS = ("heads", "neurons")  # flops_fill: the kind whose per-layer fraction meets flops_target


@dataclass
class PruneConfig(KDStageConfig):
    epochs: int = 2
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    exponent: float = 3.0  # polynomial schedule: 3 = Zhu & Gupta's cubic ramp, 1 = linear
    update_every: int = 10  # optimizer steps between mask updates
    ramp_end: float = 0.75  # fraction of the stage at which final_sparsity is reached (then held)
    scope: str = "layer"  # layer: same sparsity per layer; global: one threshold across layers
    targets: object = None  # module selector(s); null = the model config's prune_targets
    criterion: str = (
        "magnitude"  # magnitude |w| | taylor |w*grad| | movement -w*grad (grad terms summed between updates)
    )
    schedule: str = "polynomial"  # polynomial | linear | one_shot | iterative
    iterations: int = 3  # iterative schedule: number of equal sparsity jumps
    granularity: str = "unstructured"  # unstructured | n:m | heads | neurons | channels | heads+neurons
    n_m: list[int] = field(
        default_factory=lambda: [2, 4]
    )  # n:m: keep at most N of every M consecutive input weights
    overrides: dict = field(
        default_factory=dict
    )  # selector -> this layer's final sparsity (scope=layer only)
    norm: str = "l2"  # structured: a group's score is the l1 or l2 norm of its weights' scores
    min_keep: int = 1  # structured: groups (heads/neurons/channels) always kept per layer
    shrink: bool = True  # structured: physically remove pruned groups at the end of the stage
    # structured: keep this fraction of the model's dense GFLOPs (cost.batch_size/seq_len inputs) instead of a
    # per-layer fraction of groups; groups go lowest importance per FLOP first, across all layers
    flops_target: Any = None
    # with flops_target: null = the above (all groups compete); heads | neurons = every layer loses
    # final_sparsity of its other kind and this kind fills the rest of the budget, the same fraction in every
    # layer (a FLOPs budget at a chosen head/neuron mix: dpq.prune.structured.flops_fill)
    flops_fill: Any = None
    # criterion=obs (second order, oBERT): block_size, num_grads, damp_ratio, update (dpq.prune.obs.ObsOptions)
    obs: dict = field(default_factory=dict)
    # depth: whole transformer layers removed when the stage starts, before its ramp. An int: that many,
    # lowest block influence first (dpq.prune.depth), measured on layer_batches training batches; a
    # list: those layer indices. With flops_target the budget counts from the model before the drop.
    drop_layers: Any = None
    layer_batches: int = 16
    # quantize-aware pruning: the name of the later quantize / ptq stage whose fake quantization runs during
    # the ramp (dpq.stages.quantize.QuantAwareTraining); null = float training
    qat: Any = None

    def obs_options(self) -> ObsOptions:
        return ObsOptions(**self.obs)

    @property
    def structured(self) -> bool:
        return self.granularity not in ("unstructured", "n:m")

    def check(self, key: str) -> None:
        super().check(key)
        for k in ("initial_sparsity", "final_sparsity"):
            v = getattr(self, k)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{key}.{k}", v, "must be in [0, 1)")
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError(
                f"{key}.initial_sparsity",
                self.initial_sparsity,
                f"must be <= final_sparsity ({self.final_sparsity})",
            )
        if self.exponent <= 0:
            raise ConfigError(f"{key}.exponent", self.exponent, "must be > 0")
        if self.update_every < 1:
            raise ConfigError(f"{key}.update_every", self.update_every, "must be >= 1")
        if not 0.0 < self.ramp_end <= 1.0:
            raise ConfigError(f"{key}.ramp_end", self.ramp_end, "must be in (0, 1]")
        if self.scope not in SCOPES:
            raise ConfigError(f"{key}.scope", self.scope, f"must be one of {', '.join(SCOPES)}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"{key}.criterion", self.criterion, f"must be one of {', '.join(CRITERIA)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{key}.schedule", self.schedule, f"must be one of {', '.join(SCHEDULES)}")
        if self.iterations < 1:
            raise ConfigError(f"{key}.iterations", self.iterations, "must be >= 1")
        if self.criterion != "magnitude" and self.schedule == "one_shot":
            # One-shot prunes at step 0, before any gradient: the criterion would silently be magnitude.
            raise ConfigError(
                f"{key}.criterion",
                self.criterion,
                "needs gradients, but schedule=one_shot prunes at step 0 before any; use criterion=magnitude "
                "or a gradual schedule",
            )
        self._check_n_m(key)
        self._check_overrides(key)
        self._check_obs(key)
        self._check_depth(key)
        check_qat_name(key, self.qat)
        if self.flops_target is not None:
            t = self.flops_target
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
                raise ConfigError(
                    f"{key}.flops_target", t, "must be a fraction in (0, 1) of the dense GFLOPs to keep"
                )
            if not self.structured:
                raise ConfigError(
                    f"{key}.flops_target",
                    t,
                    f"removes whole groups; granularity={self.granularity} "
                    "masks single weights, which no dense FLOP count sees (use heads, neurons, channels)",
                )
            if self.overrides:
                raise ConfigError(
                    f"{key}.overrides",
                    self.overrides,
                    "do not combine with flops_target (one budget for the whole model)",
                )
            if self.flops_fill is None and self.initial_sparsity > 0:
                raise ConfigError(
                    f"{key}.initial_sparsity",
                    self.initial_sparsity,
                    "is not read with flops_target (its ramp removes a share of the FLOPs, from 0 to the "
                    "budget): set it to 0, or use flops_fill, whose ramp runs from initial_sparsity",
                )
        self._check_flops_fill(key)

    def _check_flops_fill(self, key: str) -> None:
        fill = self.flops_fill
        if fill is None:
            return
        if fill not in FILL_KINDS:
            raise ConfigError(f"{key}.flops_fill", fill, f"must be null or one of {', '.join(FILL_KINDS)}")
        if self.flops_target is None:
            raise ConfigError(
                f"{key}.flops_fill",
                fill,
                "fills a FLOPs budget: set flops_target (the fraction of dense GFLOPs kept)",
            )
        if self.granularity != "heads+neurons":
            raise ConfigError(
                f"{key}.flops_fill",
                fill,
                f"splits the budget between heads and neurons; granularity={self.granularity} "
                "(use granularity=heads+neurons, or flops_fill=null)",
            )
        if self.scope != "layer":
            raise ConfigError(
                f"{key}.flops_fill",
                fill,
                f"removes the same fractions in every layer, which scope={self.scope} contradicts (use scope=layer)",
            )

    def _check_depth(self, key: str) -> None:
        d = self.drop_layers
        ints = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if d is not None:
            ok = (ints(d) and d >= 1) or (
                isinstance(d, (list, tuple))
                and d
                and all(ints(i) and i >= 0 for i in d)
                and len(set(d)) == len(d)
            )
            if not ok:
                raise ConfigError(
                    f"{key}.drop_layers",
                    d,
                    "must be null, a number of layers >= 1, or a list of distinct layer indices (0-based)",
                )
            self.drop_layers = list(d) if isinstance(d, (list, tuple)) else d
        if not ints(self.layer_batches) or self.layer_batches < 1:
            raise ConfigError(f"{key}.layer_batches", self.layer_batches, "must be an integer >= 1")

    def _check_obs(self, key: str) -> None:
        allowed = [f.name for f in fields(ObsOptions)]
        if not isinstance(self.obs, dict) or set(self.obs) - set(allowed):
            bad = sorted(set(self.obs) - set(allowed)) if isinstance(self.obs, dict) else []
            raise ConfigError(
                f"{key}.obs{'.' + bad[0] if bad else ''}",
                self.obs if not bad else self.obs[bad[0]],
                f"obs settings are {', '.join(allowed)}",
            )
        # each value as typed: int(2.7) and int(True) were taken as 2 and 1, and int('abc')'s message
        # named neither the setting nor what it allows
        for k, v in self.obs.items():
            if k in ("block_size", "num_grads"):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConfigError(f"{key}.obs.{k}", v, "must be an integer >= 1")
            elif k == "damp_ratio":
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                    raise ConfigError(f"{key}.obs.{k}", v, "must be a finite number > 0 (e.g. 1e-2)")
            elif k == "update" and v not in UPDATE_METHODS:
                raise ConfigError(f"{key}.obs.{k}", v, f"must be one of {', '.join(UPDATE_METHODS)}")
        opts = ObsOptions(**{k: (float(v) if k == "damp_ratio" else v) for k, v in self.obs.items()})
        self.obs = {k: getattr(opts, k) for k in self.obs}
        if self.criterion == "obs" and self.structured:
            raise ConfigError(
                f"{key}.criterion",
                "obs",
                f"prunes single weights; granularity={self.granularity} "
                "removes whole groups (use magnitude, taylor or movement)",
            )

    def _check_n_m(self, key: str) -> None:
        if self.granularity not in GRANULARITIES:
            try:
                structured.parse_kinds(self.granularity)
            except ValueError:
                raise ConfigError(
                    f"{key}.granularity",
                    self.granularity,
                    f"must be one of {', '.join(GRANULARITIES)} (structured kinds combine with +, "
                    "e.g. heads+neurons)",
                ) from None
        if self.norm not in structured.NORMS:
            raise ConfigError(f"{key}.norm", self.norm, f"must be one of {', '.join(structured.NORMS)}")
        if isinstance(self.min_keep, bool) or int(self.min_keep) != self.min_keep or self.min_keep < 1:
            raise ConfigError(
                f"{key}.min_keep",
                self.min_keep,
                "must be an integer >= 1 (a layer cannot lose all its groups)",
            )
        if not isinstance(self.shrink, bool):
            raise ConfigError(f"{key}.shrink", self.shrink, "must be true or false")
        nm = self.n_m
        try:
            nm = [int(v) for v in nm]
            ok = len(nm) == 2 and all(float(a) == b for a, b in zip(self.n_m, nm))
        except (TypeError, ValueError):
            ok = False
        if not ok or not 0 < nm[0] < nm[1]:
            raise ConfigError(
                f"{key}.n_m", self.n_m, "must be two integers [N, M] with 0 < N < M (keep N of every M)"
            )
        self.n_m = nm
        if self.granularity == "n:m":
            want = (nm[1] - nm[0]) / nm[1]
            if not math.isclose(self.final_sparsity, want, abs_tol=1e-9):
                raise ConfigError(
                    f"{key}.final_sparsity",
                    self.final_sparsity,
                    f"must be {want:g} for granularity=n:m with n_m={nm} (M-N of every M weights pruned)",
                )
            if self.overrides:
                raise ConfigError(
                    f"{key}.overrides",
                    self.overrides,
                    "not allowed with granularity=n:m (every layer ends N:M)",
                )

    def _check_overrides(self, key: str) -> None:
        if not isinstance(self.overrides, dict):
            raise ConfigError(
                f"{key}.overrides", self.overrides, "must be a mapping selector -> final sparsity"
            )
        if self.overrides and self.scope == "global":
            raise ConfigError(
                f"{key}.overrides",
                self.overrides,
                "per-layer final sparsities need scope=layer (global uses one threshold)",
            )
        clean = {}
        for sel, v in self.overrides.items():
            k = f"{key}.overrides.{sel}"
            if str(sel).startswith("re:"):
                try:
                    re.compile(str(sel)[3:])
                except re.error as e:
                    raise ConfigError(k, sel, f"is not a valid regex: {e}") from None
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ConfigError(k, v, "must be a number in [0, 1)") from None
            if not 0.0 <= v < 1.0:
                raise ConfigError(k, v, "must be in [0, 1)")
            if v < self.initial_sparsity:
                raise ConfigError(
                    k, v, f"must be >= initial_sparsity ({self.initial_sparsity}): masks only grow sparser"
                )
            clean[str(sel)] = v
        self.overrides = clean

    def layer_finals(self, targets: list[str], key: str) -> dict[str, float]:
        """Final sparsity per target an override picks (first matching selector wins); others use final_sparsity."""
        finals: dict[str, float] = {}
        for sel, v in self.overrides.items():
            hit = [n for n in targets if matches(n, sel)]
            if not hit:
                raise ConfigError(
                    f"{key}.overrides.{sel}",
                    v,
                    f"selector matches none of this stage's targets, e.g. {', '.join(targets[:4])}",
                )
            for n in hit:
                finals.setdefault(n, v)
        return finals


def frozen_sparsity(before: list[Stage], cfg: PruneConfig) -> tuple[str, float] | None:
    """(stage, sparsity): the most pruned of the ``before`` stages whose masks, frozen from then on, cover
    exactly what ``cfg`` prunes -- unstructured, the same targets and scope, one sparsity for every layer (no
    overrides, no FLOPs target, no layers dropped) -- so ``cfg``'s ramp removes nothing below that sparsity.
    None where no stage before prunes that way."""

    def plain(c: PruneConfig) -> bool:
        return (
            c.granularity == "unstructured"
            and not c.overrides
            and not c.flops_target
            and c.drop_layers is None
        )

    found = None
    for s in before:
        earlier = s.final_prune()
        if (
            earlier is not None
            and plain(earlier)
            and plain(cfg)
            and (earlier.targets, earlier.scope) == (cfg.targets, cfg.scope)
            and (found is None or earlier.final_sparsity >= found[1])
        ):
            found = (s.name, earlier.final_sparsity)
    return found


def warn_idle_ramps(stages: list[Stage]) -> None:
    """A prune stage that continues an earlier one (:func:`frozen_sparsity`) from an initial_sparsity below what
    that one left removes nothing until its target passes it: part of its ramp is spent at the earlier sparsity."""
    for i, stage in enumerate(stages):
        if not isinstance(stage, PruneStage):
            continue
        cfg: PruneConfig = stage.cfg
        found = frozen_sparsity(stages[:i], cfg)
        if found and cfg.initial_sparsity < found[1]:
            name, left = found
            log.warning(
                "%s.initial_sparsity=%g: stage '%s' before it leaves %g pruned, so the ramp prunes nothing until "
                "its target passes %g; initial_sparsity=%g starts the ramp there",
                stage.key,
                cfg.initial_sparsity,
                name,
                left,
                left,
                left,
            )


@register
class PruneStage(QuantAwareTraining, Stage):
    kind = "prune"
    Config = PruneConfig
    prunes = True

    def check_order(self, before: list[Stage]) -> None:
        """A second unstructured prune stage on the same targets and scope continues from the sparsity the
        earlier one leaves: that stage's masks stay frozen (masks only grow sparser), so a target at or below
        it prunes nothing and the stage would silently be a recovery (:func:`warn_idle_ramps`: a ramp that
        starts below it)."""
        super().check_order(before)
        cfg: PruneConfig = self.cfg
        found = frozen_sparsity(before, cfg)
        if found and cfg.final_sparsity <= found[1]:
            name, left = found
            raise ConfigError(
                f"{self.key}.final_sparsity",
                cfg.final_sparsity,
                f"prunes nothing: stage '{name}' before it already leaves {left:g} of the same targets pruned "
                f"({cfg.scope} scope), and its masks stay frozen; set it above {left:g} to prune further, or "
                "fine-tune at this sparsity with a recover stage",
            )

    def final_prune(self) -> PruneConfig:
        return self.cfg

    def targets_of(self, model: nn.Module, model_spec: dict) -> list[str]:
        """The modules this stage prunes (its ``targets``, else ``model.prune_targets``), each fit for its
        granularity (N:M: linear layers whose input width M divides) and for the per-layer overrides."""
        cfg: PruneConfig = self.cfg
        sel, key = resolve_targets(cfg.targets, f"{self.key}.targets", model_spec, "prune_targets")
        if sel is None:
            raise ConfigError(key, None, "no pruning targets: set it or model.prune_targets")
        targets = select_checked(model, sel, key, PRUNABLE, "nn.Linear or conv")
        cfg.layer_finals(targets, self.key)  # every per-layer override must pick one of these targets
        if cfg.granularity == "n:m":
            m = int(cfg.n_m[1])
            for n in targets:
                shape = tuple(model.get_submodule(n).weight.shape)
                if len(shape) != 2:
                    raise ConfigError(
                        f"{self.key}.granularity",
                        cfg.granularity,
                        f"N:M groups input weights of linear layers; target {n} is a convolution "
                        "(exclude it with targets, or use unstructured or channels)",
                    )
                if shape[1] % m:
                    raise ConfigError(
                        f"{self.key}.n_m",
                        list(cfg.n_m),
                        f"module {n} has in_features={shape[1]}, not divisible by M={m}",
                    )
        return targets

    def check_model(self, check: ModelCheck) -> None:
        super().check_model(check)
        if check.student is not None:
            self.check_depth(check.student)
            if self.cfg.drop_layers is None:  # targets name layers as they are after the drop
                targets = self.targets_of(check.student, check.model_spec)
                if self.cfg.structured:  # the kinds the model has, min_keep against their counts
                    self.find_groups(check.student, targets)

    def check_depth(self, model: nn.Module) -> None:
        """``drop_layers`` fits the model: an encoder with layers, at least one left."""
        d = self.cfg.drop_layers
        if d is None:
            return
        try:
            n = depth.num_layers(model)
        except ValueError as e:
            raise ConfigError(f"{self.key}.drop_layers", d, str(e)) from None
        count = d if isinstance(d, int) else len(d)
        if count >= n:
            raise ConfigError(
                f"{self.key}.drop_layers", d, f"must leave at least one of the model's {n} layers"
            )
        if isinstance(d, list) and max(d) >= n:
            raise ConfigError(f"{self.key}.drop_layers", d, f"layer indices must be in 0..{n - 1}")
        lm = self.cfg.layer_map
        if isinstance(lm, (list, tuple)) and len(lm) != n - count:
            raise ConfigError(
                f"{self.key}.layer_map",
                list(lm),
                f"needs one teacher layer per student layer left after drop_layers ({n - count})",
            )

    def drop_layers(self, state, ctx, model: nn.Module) -> dict:
        """Remove ``drop_layers`` from ``model`` (in place) before the ramp; what it did, for the record."""
        import itertools

        import torch

        cfg: PruneConfig = self.cfg
        self.check_depth(model)
        with torch.random.fork_rng(devices=[]):  # the batches drawn here leave the run's randomness as it was
            torch.manual_seed(0)
            batches = list(itertools.islice(ctx.data.train_dataloader(), int(cfg.layer_batches)))
        influence = depth.block_influence(model, batches)
        drop = (
            depth.choose(influence, cfg.drop_layers) if isinstance(cfg.drop_layers, int) else cfg.drop_layers
        )
        before = depth.num_layers(model)
        state.masks = depth.drop_layers_(model, drop, state.masks)
        log.info(
            "%s: dropped layers %s of %d (block influence %s)",
            self.name,
            drop,
            before,
            ", ".join(f"{v:.4f}" for v in influence.tolist()),
        )
        return {"dropped_layers": list(drop), "layers_before": before, "block_influence": influence.tolist()}

    def run(self, state, ctx) -> None:
        cfg: PruneConfig = self.cfg
        student = ctx.ensure_student(state)
        depth_record, flops_first = {}, None
        if cfg.drop_layers is not None:
            if cfg.flops_target:
                from dpq import cost

                flops_first = float(cost.flops_by_module(student, ctx.example_inputs())[0])
            depth_record = self.drop_layers(state, ctx, student)
        targets = self.targets_of(student, ctx.model_spec)
        n_m = (int(cfg.n_m[0]), int(cfg.n_m[1])) if cfg.granularity == "n:m" else None
        groups = self.find_groups(student, targets) if cfg.structured else None
        budget = self.flops_budget(student, groups, ctx.example_inputs()) if cfg.flops_target else {}
        remove = 1.0 - cfg.flops_target if budget else None
        if budget and flops_first is not None:  # the target is a fraction of the model before the drop
            remove = max(0.0, 1.0 - cfg.flops_target * flops_first / budget["flops_total"])
        finals, fill_record = cfg.layer_finals(targets, self.key), {}
        # flops_fill: per-layer fractions, the other kind's final_sparsity and the fill kind's solved one
        if budget and cfg.flops_fill:
            finals, fill_record = self.fill_finals(student, groups, budget, remove)
            fill_record["flops_before"] = flops_first or budget["flops_total"]
            budget = {}
        if budget:
            self.check_flops_reachable(groups, budget, flops_first)
        ramp = SparsityRamp(
            self.name,
            targets,
            0.0 if budget else cfg.initial_sparsity,
            remove if budget else cfg.final_sparsity,
            cfg.exponent,
            cfg.update_every,
            cfg.ramp_end,
            "flops" if budget else cfg.scope,
            frozen=state.masks,
            criterion=cfg.criterion,
            schedule=make_schedule(cfg.schedule, cfg.exponent, cfg.iterations),
            finals=finals,
            n_m=n_m,
            groups=groups,
            norm=cfg.norm,
            min_keep=int(cfg.min_keep),
            obs=cfg.obs_options(),
            totals=getattr(student, "dpq_original_groups", None),
            **budget,
        )
        # Masks of an earlier prune stage on modules this ramp does not touch stay frozen.
        others = {k: v for k, v in (state.masks or {}).items() if k not in targets}
        callbacks = [ramp] + ([MaskFreeze(f"{self.name}.frozen", others)] if others else [])
        qat = self.qat_callbacks(student, ctx)
        try:
            ctx.fit(state, student, self, kd_alpha=cfg.alpha, callbacks=callbacks + qat, freeze_masks=False)
        finally:
            for q in qat:  # float modules again before the shrink (the callback's teardown did it already)
                q.restore_float()
        state.masks = intersect(state.masks, ramp.masks)
        extra = {
            "granularity": cfg.granularity,
            "ramp": [list(h) for h in ramp.history[-1:]],
            "mask_updates": len(ramp.history),
        }
        extra.update(depth_record)
        if qat:
            extra["qat"] = self.qat_settings()
        if budget:
            extra.update(flops_target=cfg.flops_target, flops_before=flops_first or budget["flops_total"])
        extra.update(fill_record)
        if groups:
            extra["structure"] = structured.structure_summary(groups, ramp.group_keep)
            extra["shrunk"] = bool(cfg.shrink)
            if cfg.shrink:
                state.masks = structured.shrink_(student, groups, ramp.group_keep, state.masks)
        ctx.record(state, self, student, extra=extra)

    def fill_finals(self, student, groups, budget: dict, remove: float) -> tuple[dict[str, float], dict]:
        """``flops_fill``: per-layer final sparsities that meet ``flops_target`` with ``final_sparsity`` of
        the other kind removed in every layer (keyed like ``overrides``, by each set's first producer)."""
        cfg: PruneConfig = self.cfg
        totals = getattr(student, "dpq_original_groups", None)
        try:
            fraction, removed = structured.flops_fill(
                groups,
                budget["costs"],
                cfg.flops_fill,
                cfg.final_sparsity,
                remove * budget["flops_total"],
                int(cfg.min_keep),
                totals,
            )
        except ValueError as e:
            raise ConfigError(f"{self.key}.flops_target", cfg.flops_target, str(e)) from None
        if fraction < cfg.initial_sparsity:  # the ramp would have to give groups back
            raise ConfigError(
                f"{self.key}.initial_sparsity",
                cfg.initial_sparsity,
                f"must be <= the {cfg.flops_fill}' solved final fraction {fraction:.4f} (flops_fill)",
            )
        log.info(
            "%s: flops_fill=%s: %.4f of the %s per layer with %s of the %s meets flops_target=%s "
            "(%.4g of %.4g FLOPs removed)",
            self.name,
            cfg.flops_fill,
            fraction,
            cfg.flops_fill,
            cfg.final_sparsity,
            next(k for k in FILL_KINDS if k != cfg.flops_fill),
            cfg.flops_target,
            removed,
            budget["flops_total"],
        )
        finals = {gs.producers[0].module: fraction for gs in groups if gs.kind == cfg.flops_fill}
        record = {
            "flops_target": cfg.flops_target,
            "flops_fill": cfg.flops_fill,
            "fill_fraction": fraction,
        }
        return finals, record

    def check_flops_reachable(self, groups, budget: dict, flops_first: float | None = None) -> None:
        """``flops_target`` below what removing every group but ``min_keep`` per layer leaves is a ConfigError
        before the ramp trains (the ramp's last update would otherwise stop above it); ``flops_first``: the
        FLOPs before ``drop_layers``, which the target is a fraction of."""
        cfg: PruneConfig = self.cfg
        total = budget["flops_total"]
        left = total - structured.removable_flops(groups, budget["costs"], int(cfg.min_keep))
        smallest = left / (flops_first or total)
        if cfg.flops_target < smallest * (1 - 1e-9):
            kinds = " and ".join(sorted({g.kind for g in groups}))
            raise ConfigError(
                f"{self.key}.flops_target",
                cfg.flops_target,
                f"removing all the {kinds} but min_keep={cfg.min_keep} per layer still leaves {smallest:.4f} of "
                f"the dense GFLOPs (the rest is outside the groups): the smallest reachable target is "
                f"{smallest:.4f}; set flops_target >= {math.ceil(smallest * 1e4) / 1e4:.4f}"
                + (" or lower min_keep" if cfg.min_keep > 1 else ""),
            )

    @staticmethod
    def flops_budget(model, groups: list[structured.GroupSet], inputs: dict) -> dict:
        """The model's dense FLOPs on ``inputs`` (fvcore) and what one group of each set costs of them."""
        from dpq import cost

        total, by_module = cost.flops_by_module(model, inputs)
        return {"costs": structured.group_costs(model, groups, by_module), "flops_total": float(total)}

    def find_groups(self, model, targets: list[str]) -> list[structured.GroupSet]:
        cfg: PruneConfig = self.cfg
        groups = structured.find_groups(model, cfg.granularity, targets)
        kinds = structured.parse_kinds(cfg.granularity)
        missing = [k for k in kinds if not any(g.kind == k for g in groups)]
        if missing:
            raise ConfigError(
                f"{self.key}.granularity",
                cfg.granularity,
                f"the model has no {', '.join(missing)} among this stage's targets "
                f"({', '.join(targets[:4])}...); choose unstructured, n:m or a kind the model has",
            )
        # A set's fraction is read off its first producer (query, intermediate.dense, the conv): an override
        # that picks none of those (output.dense, value...) would pass and change nothing.
        firsts = [g.producers[0].module for g in groups]
        for sel, v in (cfg.overrides or {}).items():
            if not any(matches(n, sel) for n in firsts):
                raise ConfigError(
                    f"{self.key}.overrides.{sel}",
                    v,
                    f"with granularity={cfg.granularity} a layer's fraction is set on the first module of each "
                    f"group set (e.g. {', '.join(dict.fromkeys(firsts[:4]))}); this selector picks none of them",
                )
        # Against the layer's count before any shrink: a later round (spiral) or a second prune stage
        # finds layers already shrunk to min_keep, which simply lose nothing more.
        totals = getattr(model, "dpq_original_groups", None) or {}
        for g in groups:
            total = int(totals.get(g.name, g.count))
            small = int(cfg.min_keep) >= total
            if small and cfg.final_sparsity > 0:
                raise ConfigError(
                    f"{self.key}.min_keep",
                    cfg.min_keep,
                    f"{g.name} has only {total} {g.kind}; must be < {total}",
                )
        return groups
