"""The two Lightning callbacks that own pruning masks during training.

* :class:`SparsityRamp` -- the ``prune`` stage: gradual pruning along a sparsity schedule
  (:mod:`dpq.prune.schedules`), masks recomputed every ``update_every`` optimizer steps from an
  importance criterion (magnitude, Taylor, movement) and re-applied after every step;
  unstructured, N:M semi-structured or structured groups, optionally with per-layer final
  sparsities.
* :class:`MaskFreeze` -- ``recover`` and every later stage: masks fixed, re-applied after
  every optimizer step, so no pruned weight comes back.

Written by hand rather than on ``torch.nn.utils.prune`` (which Lightning's ``ModelPruning``
wraps) because that reparametrisation renames state-dict keys (``weight_orig``/``weight_mask``),
breaking ``save_pretrained``, and prunes a fraction *of the remaining* weights per call, which
compounds cumulative ramp targets. Here weights stay plain parameters and masks are boolean
tensors kept in the callback's ``state_dict`` under a per-stage ``state_key``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn

from dpq.prune import structured
from dpq.prune.masks import CRITERIA, Masks, apply_masks, intersect, mask_sparsity, score_masks, weight_of
from dpq.prune.obs import BlockFisherInverse, ObsOptions, obs_saliency, obs_update, suggest_damp
from dpq.prune.schedules import (
    Schedule,
    one_shot_sparsity,
    polynomial_sparsity,
    ramp_end_steps,
    ramp_progress,
)

log = logging.getLogger(__name__)


class _MaskCallback(L.Callback):
    """Shared: re-apply masks after every optimizer step; zero masked gradients before it."""

    def __init__(self, name: str, masks: Masks | None = None):
        self.name = name
        self.masks: Masks = {k: v.clone() for k, v in (masks or {}).items()}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def _model(self, pl_module: L.LightningModule) -> nn.Module:
        return pl_module.model

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Keeps Adam moments of pruned weights at zero, so the re-applied mask is not fighting them.
        model = self._model(pl_module)
        for n, m in self.masks.items():
            g = weight_of(model, n).grad
            if g is not None:
                g.mul_(m.to(device=g.device, dtype=g.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        apply_masks(self._model(pl_module), self.masks)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.cpu() for k, v in self.masks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])


class MaskFreeze(_MaskCallback):
    """Hold fixed masks for a whole stage (``recover``, ``quantize``, or any stage after ``prune``)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        apply_masks(self._model(pl_module), self.masks)

    def on_train_end(self, trainer, pl_module) -> None:
        apply_masks(self._model(pl_module), self.masks)


def one_jump(total_steps: int, update_every: int, ramp_end: float) -> str | None:
    """What a gradual ramp becomes when its first mask update after the start comes at or after the ramp's
    end (``ramp_end`` of ``total_steps``): one jump, at the stage's last step with no training after when
    ``update_every`` >= ``total_steps``. None when the ramp has two updates or more."""
    end = ramp_end_steps(total_steps, ramp_end)  # the step the target is reached (ramp_progress)
    if update_every < end or total_steps < 2:
        return None
    first, every = min(math.ceil(end), total_steps), max(1, int(end) // 4)  # the update at the ramp's end
    last = ", its last, with no training after" if first >= total_steps else ""
    n = int(end) // every
    fix = (
        f"update_every={every} would update them {n} times along it"
        if n >= 2
        else "a gradual ramp needs more steps: lengthen the stage (epochs, max_steps) or its ramp_end"
    )
    return (
        f"masks are recomputed every update_every={update_every} optimizer steps, but the ramp lasts "
        f"{math.ceil(end)} of the stage's {total_steps} steps (ramp_end={ramp_end:g}): it prunes in one jump at "
        f"step {first}{last}; {fix}"
    )


class SparsityRamp(_MaskCallback):
    """Gradual pruning: sparsity follows a schedule (default :func:`polynomial_sparsity`) over the stage.

    The target at optimizer step t is a pure function of ``t / total_steps``: ``initial`` at
    the first step, ``final`` (or the layer's own entry in ``finals``) from ``ramp_end`` of the
    stage to its end. Masks are recomputed every ``update_every`` steps (and exactly at the
    start, at ``ramp_end`` and at the end), and applied after every step. ``frozen`` masks from an earlier prune
    stage are kept (intersected).

    ``criterion`` ranks the weights at each update: ``magnitude`` |w|; ``taylor`` |w*grad|
    and ``movement`` -w*grad (Sanh et al. 2020: weights moving towards zero go first), both
    summed over the optimizer steps since the last update (gradients read before the masked
    ones are zeroed) and reset after it. An update with no accumulated step -- the one at
    step 0, or one right after a resume-time update -- falls back to magnitude.

    ``n_m=(N, M)``: every update may only prune among the M-N lowest-scoring weights of each
    group of M, so the unstructured ramp to ``final = (M-N)/M`` ends in exact N:M masks.

    ``groups`` (structured pruning, :mod:`dpq.prune.structured`): the sparsity is the fraction of
    whole groups (heads, neurons, channels) removed per set (``scope="layer"``) or over all
    sets (``"global"``); a group's score is the ``norm`` (l1/l2; a signed sum for movement) of
    its elements' scores; at least ``min_keep`` groups stay in every set. The element masks
    then zero the removed groups' producer and consumer slices.

    Every update logs the target, the overall and per-layer sparsity and, for structured
    pruning, the groups left per layer to the trainer's loggers.
    """

    def __init__(
        self,
        name: str,
        targets: list[str],
        initial: float,
        final: float,
        exponent: float = 3.0,
        update_every: int = 10,
        ramp_end: float = 1.0,
        scope: str = "layer",
        frozen: Masks | None = None,
        *,
        criterion: str = "magnitude",
        schedule: Schedule | None = None,
        finals: Mapping[str, float] | None = None,
        n_m: tuple[int, int] | None = None,
        groups: list[structured.GroupSet] | None = None,
        norm: str = "l2",
        min_keep: int = 1,
        totals: Mapping[str, int] | None = None,
        obs: ObsOptions | None = None,
        costs: Mapping[str, float] | None = None,
        flops_total: float | None = None,
    ):
        super().__init__(name, frozen)
        self.costs, self.flops_total = dict(costs or {}), flops_total
        self.obs = obs or ObsOptions()
        self._fisher: BlockFisherInverse | None = None  # obs: the inverse being built for the next update
        self._step = 0
        self.frozen: Masks = {k: v.clone() for k, v in (frozen or {}).items()}
        self.groups = list(groups or [])
        self.norm, self.min_keep = norm, int(min_keep)
        self.totals = dict(totals or {})
        self.group_keep: Masks = {}  # group set name -> bool keep per group (structured only)
        if not targets:
            raise ValueError("SparsityRamp needs at least one target module")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r}: must be one of {CRITERIA}")
        self.targets, self.initial, self.final = list(targets), float(initial), float(final)
        self.exponent, self.update_every, self.ramp_end, self.scope = (
            float(exponent),
            int(update_every),
            float(ramp_end),
            scope,
        )
        self.criterion = criterion
        self.schedule: Schedule = schedule or partial(polynomial_sparsity, exponent=self.exponent)
        self.finals = {k: float(v) for k, v in (finals or {}).items()}
        if self.finals and scope == "global":
            raise ValueError("per-layer final sparsities need scope='layer'")
        self.n_m = tuple(n_m) if n_m is not None else None
        if self.groups and self.n_m is not None:
            raise ValueError("n_m does not combine with structured groups")
        if scope == "flops" and not (self.groups and costs and flops_total):
            raise ValueError("scope='flops' needs structured groups, their costs and the model's total FLOPs")
        if self.groups and criterion == "obs":
            raise ValueError(
                "criterion obs prunes single weights; structured groups use magnitude, taylor or movement"
            )
        # Structured scores cover every module a group touches (consumers too), not only targets.
        self.score_names = (
            list(dict.fromkeys(m for g in self.groups for m in g.modules)) if self.groups else self.targets
        )
        self.total_steps = 0
        self.history: list[tuple[int, float]] = []  # (step, target sparsity) at each mask update
        self.scores: Masks = {}  # name -> accumulated float importance since the last mask update
        self.score_steps = 0  # optimizer steps accumulated into ``scores``
        self._resumed = False  # set when Lightning restores this callback from a checkpoint
        # fp16 steps whose gradients were not finite (the GradScaler skips them): in all, and since the last update
        self.skipped_steps = 0
        self._skipped = 0

    def target_at(self, step: int, name: str | None = None) -> float:
        final = self.finals.get(name, self.final) if name is not None else self.final
        return self.schedule(ramp_progress(step, self.total_steps, self.ramp_end), self.initial, final)

    def _sparsity(self, step: int) -> float | dict[str, float]:
        if not self.finals:
            return self.target_at(step)
        if self.groups:  # a set takes the final of its first producer (query, intermediate.dense, conv)
            return {g.name: self.target_at(step, g.producers[0].module) for g in self.groups}
        return {n: self.target_at(step, n) for n in self.targets}

    def _next_update(self, step: int) -> int:
        """The next step after ``step`` with a mask update: a multiple of update_every, or the ramp's end
        (``on_train_batch_end`` updates there too; obs opens its gradient window before it)."""
        nxt = min(self.total_steps, (step // self.update_every + 1) * self.update_every)
        end = self._ramp_end_step()
        return min(nxt, end) if step < end else nxt

    def _skip_non_finite(self, grads: list[torch.Tensor]) -> bool:
        """True (and counted) when any of this step's gradients holds inf/NaN: with fp16 mixed precision
        Lightning calls ``on_before_optimizer_step`` after unscaling but before the GradScaler skips such a
        step, so its gradients must not reach the scores (a NaN score is never pruned) or the Fisher."""
        dev = grads[0].device if grads else None
        if not grads or bool(torch.stack([torch.isfinite(g).all().to(dev) for g in grads]).all()):  # one sync
            return False
        self.skipped_steps += 1
        self._skipped += 1
        log.debug(
            "%s: step %d has non-finite gradients (a skipped fp16 step): not accumulated",
            self.name,
            self._step,
        )
        return True

    @torch.no_grad()
    def _add_to_fisher(self, model: nn.Module) -> None:
        """obs: the last ``num_grads`` raw gradients before the next update go into the block inverse."""
        left = (
            self._next_update(self._step) - self._step
        )  # optimizer steps before the update, this one included
        if self._fisher is None and left > self.obs.num_grads:
            return
        grads = {n: weight_of(model, n).grad for n in self.targets}
        if any(g is None for g in grads.values()):
            return
        if self._skip_non_finite(list(grads.values())):
            return
        grads = {n: g.detach().float() for n, g in grads.items()}
        if self._fisher is None:
            damp = suggest_damp(grads, self.obs.damp_ratio, masks=self.masks or None, per_layer=True)
            shapes = {n: tuple(g.shape) for n, g in grads.items()}
            self._fisher = BlockFisherInverse(
                shapes,
                max(1, min(self.obs.num_grads, left)),
                self.obs.block_size,
                damp,
                device=next(iter(grads.values())).device,
            )
        if not self._fisher.complete:
            self._fisher.add_gradient(grads, masks=self.masks or None)
            self.score_steps += 1

    @torch.no_grad()
    def accumulate(self, model: nn.Module) -> None:
        """Add this step's Taylor/movement scores (obs: its gradient to the Fisher); call with the raw
        (unmasked) gradients in place."""
        if self.criterion == "magnitude":
            return
        if self.criterion == "obs":
            self._add_to_fisher(model)
            return
        grads = [g for g in (weight_of(model, n).grad for n in self.score_names) if g is not None]
        if self._skip_non_finite(grads):  # the whole step, all targets: scores stay sums over the same steps
            return
        for n in self.score_names:
            w = weight_of(model, n)
            if w.grad is None:
                continue
            wg = w.detach().float() * w.grad.detach().float()
            s = wg.abs() if self.criterion == "taylor" else -wg
            acc = self.scores.get(n)
            self.scores[n] = s if acc is None else acc.to(s.device) + s
        self.score_steps += 1

    def current_scores(self, model: nn.Module) -> Masks:
        """Importance per target; magnitude when no gradient step has been accumulated yet."""
        if self.criterion == "magnitude" or self.score_steps == 0:
            return {n: weight_of(model, n).detach().abs() for n in self.score_names}
        return {
            n: self.scores[n] if n in self.scores else weight_of(model, n).detach().abs()
            for n in self.score_names
        }

    def _recompute(self, model: nn.Module, step: int) -> None:
        if self._skipped:
            if self.criterion != "magnitude" and self.score_steps == 0:
                log.warning(
                    "%s: all %d steps accumulated for the mask update at step %d had non-finite gradients "
                    "(skipped fp16 steps); it ranks by magnitude instead of %s",
                    self.name,
                    self._skipped,
                    step,
                    self.criterion,
                )
            else:
                log.info(
                    "%s: %d step(s) with non-finite gradients (skipped fp16 steps) left out of the mask update at "
                    "step %d",
                    self.name,
                    self._skipped,
                    step,
                )
            self._skipped = 0
        scores = self.current_scores(model)
        if self.groups:
            signed = self.criterion == "movement" and self.score_steps > 0
            if not self.group_keep:  # groups an earlier stage masked (not shrunk) stay removed
                self.group_keep = structured.keep_from_masks(model, self.groups, self.frozen)
            self.group_keep = structured.select_groups(
                self.groups,
                scores,
                self._sparsity(step),
                previous=self.group_keep,
                scope=self.scope,
                norm=self.norm,
                signed=signed,
                min_keep=self.min_keep,
                totals=self.totals,
                costs=self.costs,
                flops_total=self.flops_total,
            )
            self.masks = intersect(self.frozen, structured.group_masks(model, self.groups, self.group_keep))
        elif self.criterion == "obs" and self._fisher is not None and self._fisher.count:
            self._obs_prune(model, step)
        else:
            self.masks = score_masks(
                scores, self._sparsity(step), previous=self.masks, scope=self.scope, n_m=self.n_m
            )
        apply_masks(model, self.masks)
        self.scores, self.score_steps, self._fisher = {}, 0, None

    @torch.no_grad()
    def _obs_prune(self, model: nn.Module, step: int) -> None:
        """Lowest OBS saliency ``w^2 / (2 [F^-1]_qq)`` pruned, the rest of each block compensated."""
        weights = {n: weight_of(model, n).data for n in self.targets}
        saliency = obs_saliency(weights, self._fisher)
        previous = self.masks or None
        self.masks = score_masks(
            saliency, self._sparsity(step), previous=previous, scope=self.scope, n_m=self.n_m
        )
        obs_update(
            weights, self._fisher, self.masks, previous=previous, method=self.obs.update, compute_loss=False
        )

    def _update(self, pl_module, step: int, trainer=None) -> None:
        self._recompute(self._model(pl_module), step)
        self.history.append((step, self.target_at(step)))
        if trainer is not None:
            self._log(trainer, step)

    def update_metrics(self) -> dict[str, float]:
        """Overall and per-layer mask sparsity, and groups left per set (structured)."""
        out = {
            f"{self.name}/target_sparsity": self.history[-1][1] if self.history else 0.0,
            f"{self.name}/sparsity": mask_sparsity(
                {n: self.masks[n] for n in self.targets if n in self.masks}
            ),
        }
        for n in self.targets:
            if n in self.masks:
                m = self.masks[n]
                out[f"{self.name}/sparsity/{n}"] = 1.0 - float(m.sum()) / m.numel()
        for g in self.groups:
            if g.name in self.group_keep:
                out[f"{self.name}/{g.kind}_left/{g.name}"] = float(self.group_keep[g.name].sum())
        return out

    def _log(self, trainer, step: int) -> None:
        metrics = self.update_metrics()
        for lg in getattr(trainer, "loggers", []) or []:  # dpq's Trainers log through a TolerantLogger
            lg.log_metrics(metrics, step=step)

    def on_train_start(self, trainer, pl_module) -> None:
        # float inf with max_epochs=-1 and no max_steps: check before int(), which would raise OverflowError
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps <= 0:
            raise ValueError(
                "the prune stage needs a finite number of training steps (set epochs or max_steps)"
            )
        self.total_steps = int(steps)
        if self._resumed:
            # Restored from a checkpoint (at or between mask updates): the restored masks and
            # the scores accumulated since are the state; an extra update here would diverge
            # from the uninterrupted run, whose next update comes at its scheduled step.
            apply_masks(self._model(pl_module), self.masks)
            return
        if trainer.is_global_zero:  # once for a DDP run, not once per process
            self._warn_one_jump()
        self._update(pl_module, trainer.global_step, trainer)

    def _warn_one_jump(self) -> None:
        """Nothing fails when update_every turns the ramp into one jump, so the run would read as gradual
        pruning: say so as the stage starts (:func:`one_jump`; a dry run says it before anything trains)."""
        if self.schedule is one_shot_sparsity or (self.final <= self.initial and not self.finals):
            return  # one jump at step 0 is what one_shot asks for; no ramp, no jump
        said = one_jump(self.total_steps, self.update_every, self.ramp_end)
        if said:
            log.warning("%s: %s", self.name, said)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._step = trainer.global_step
        self.accumulate(self._model(pl_module))  # before super() zeroes the masked gradients
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        # Also at the ramp's end, so final sparsity holds from ramp_end on (not from the next multiple of
        # update_every); once per optimizer step (under gradient accumulation this hook runs per micro-batch,
        # and each repeat recomputed the same masks and logged another update).
        due = step % self.update_every == 0 or step == self._ramp_end_step() or step >= self.total_steps
        if due and not (self.history and self.history[-1][0] == step):
            self._update(pl_module, step, trainer)
        else:
            apply_masks(self._model(pl_module), self.masks)

    def _ramp_end_step(self) -> int:
        """The first optimizer step at which :func:`ramp_progress` is 1."""
        return math.ceil(ramp_end_steps(self.total_steps, self.ramp_end))

    def on_train_end(self, trainer, pl_module) -> None:
        # The stage ends at the final target exactly, even if the last step was not an update step.
        if (
            self.history
            and self.history[-1][0] == trainer.global_step
            and math.isclose(self.history[-1][1], self.final, rel_tol=0.0, abs_tol=1e-12)
        ):
            return
        self._recompute(self._model(pl_module), self.total_steps)
        self.history.append((trainer.global_step, self.target_at(self.total_steps)))
        self._log(trainer, trainer.global_step)

    def pending_state(self) -> bool:
        """obs: gradients collected for the next mask update that ``state_dict`` does not hold (they are
        ``num_grads`` copies of every pruned weight); :class:`dpq.run.resume.StageCheckpoint` skips such
        steps, so a resumed ramp never rebuilds that update from fewer gradients than the uninterrupted one."""
        return self._fisher is not None and self._fisher.count > 0

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "total_steps": self.total_steps,
            "history": list(self.history),
            "scores": {k: v.cpu() for k, v in self.scores.items()},
            "score_steps": self.score_steps,
            "group_keep": {k: v.cpu() for k, v in self.group_keep.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.total_steps = int(state_dict.get("total_steps", 0))
        self.history = [tuple(h) for h in state_dict.get("history", [])]
        self.scores = dict(state_dict.get("scores", {}))
        self.score_steps = int(state_dict.get("score_steps", 0))
        self.group_keep = dict(state_dict.get("group_keep", {}))
        self._resumed = True
