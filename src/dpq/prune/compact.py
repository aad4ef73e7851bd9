"""Remove the units that pruning left without effect, exactly: what the masks say, as a smaller dense model.

Unstructured pruning at a high target kills whole units on its way. At 80% with Taylor scores ranked
across the model (``experiment=far_u80``), the last layer's FFN of every seed keeps fewer than 280 of
its 1,536 neurons with any non-zero weight, and ONNX Runtime still multiplies by all of them.
Two kinds of unit can go without changing what the model computes:

- a unit whose **output** weights (its consumer columns) are all zero adds nothing;
- a unit whose **input** weights (its producer rows) are all zero outputs a constant (an FFN neuron:
  ``act(bias)``; a head whose Q, K and V are zero: its value bias), which :func:`compact_` folds
  into the consumer's bias. The constant is read from one forward pass on example inputs and must be
  the same for every token, or the unit stays.

The result is a dense model with fewer heads and FFN neurons that gives the same logits up to
float summation order, and its trained low-bit codes bit for bit (quantized layers are cut by
:meth:`~dpq.quant.packed.PackedLinear.select_`). The deployed model of an unstructured run then
skips, in every runtime, the part of its sparsity that is whole units. Hand-written: neither
``torch.nn.utils.prune``, torchao's sparsity nor ONNX Runtime removes the dead units of a masked model.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dpq.core.nn import logits_of
from dpq.cost import parameter_counts
from dpq.prune.structured import GroupSet, _group_view, find_groups, shrink_
from dpq.quant.packed import PackedLinear, QuantizedLinear, dequantize_, quantized_modules

KINDS = "heads+neurons"


@dataclass
class CompactReport:
    """What :func:`compact_` removed: per group set, its units before, removed (dead output),
    folded (constant output moved into the consumer's bias) and left; the sets it had to leave alone."""

    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    max_abs_logit_diff: float = 0.0  # before vs after, on the example inputs

    @property
    def removed(self) -> int:
        return sum(s["removed"] + s["folded"] for s in self.sets.values())

    def by_kind(self) -> dict[str, dict[str, int]]:
        """``{kind: {"before": n, "left": n}}`` summed over layers, for logs and results."""
        out: dict[str, dict[str, int]] = {}
        for s in self.sets.values():
            k = out.setdefault(s["kind"], {"before": 0, "left": 0})
            k["before"] += s["count"]
            k["left"] += s["left"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "by_kind": self.by_kind()}


def _all_zero(probe: nn.Module, gs: GroupSet, slices) -> torch.Tensor:
    """Per group of ``gs``: whether all its weights in ``slices`` are exactly zero."""
    dead = torch.ones(gs.count, dtype=torch.bool)
    for s in slices:
        w = probe.get_submodule(s.module).weight.detach().cpu()
        dead &= _group_view(w, s.dim, gs.count, s.size).eq(0).all(1)
    return dead


def _cuttable(model: nn.Module, gs: GroupSet) -> str | None:
    """Why ``gs`` cannot be cut exactly in ``model`` (None: it can)."""
    for s in gs.slices:
        m = model.get_submodule(s.module)
        if isinstance(m, QuantizedLinear) and not isinstance(m, PackedLinear):
            return f"{s.module}: {type(m).__name__} layers cannot be cut in place"
        if isinstance(m, PackedLinear) and s.dim == 1:
            if m.granularity == "per_group":
                return f"{s.module}: per-group codes cannot lose input columns"
            if m.act_dynamic:
                return f"{s.module}: its input is quantized over its own range, which the removed units share"
    return None


def _no_fold(model: nn.Module, gs: GroupSet) -> str | None:
    """Why constant units of ``gs`` cannot be folded into the consumer's bias (None: they can)."""
    for s in gs.consumers:
        m = model.get_submodule(s.module)
        if getattr(m, "bias", None) is None:
            return f"{s.module} has no bias"
        if getattr(m, "act_bits", None):
            return f"{s.module} quantizes its input (the constant would be rounded first)"
    return None


@torch.no_grad()
def compact_(model: nn.Module, example_inputs: dict[str, torch.Tensor]) -> CompactReport:
    """Remove, in place, the attention heads and FFN neurons of ``model`` that cannot change its output.

    ``model`` may be float or hold :class:`~dpq.quant.packed.PackedLinear` layers (as a dpq run ends);
    ``example_inputs`` feed the one forward pass that reads constant units' values. Returns what was
    removed (:class:`CompactReport`). Raises ``RuntimeError`` if the logits moved (a bug, not noise).
    """
    was_training = model.training
    model.eval()
    report = CompactReport(params_before=parameter_counts(model)["params_total"])
    probe = model
    if quantized_modules(model):  # group discovery and zero tests on float weights; same module names
        probe = copy.deepcopy(model)
        dequantize_(probe)
    sets = find_groups(probe, KINDS)
    plans: list[tuple[GroupSet, torch.Tensor, torch.Tensor]] = []  # (set, dead output, dead input)
    for gs in sets:
        why = _cuttable(model, gs)
        if why is not None:
            report.skipped[gs.name] = why
            continue

        dead_out, dead_in = _all_zero(probe, gs, gs.consumers), _all_zero(probe, gs, gs.producers)
        report.sets[gs.name] = {
            "kind": gs.kind,
            "count": gs.count,
            "removed": 0,
            "folded": 0,
            "left": gs.count,
        }
        if bool((dead_out | dead_in).any()):
            plans.append((gs, dead_out, dead_in))
    if not plans:
        report.params_after = report.params_before
        model.train(was_training)
        return report

    # One forward: the consumers' inputs, to read (and check) the constant output of input-dead units.
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for gs, _, dead_in in plans:
        if bool(dead_in.any()):
            name = gs.consumers[0].module

            def grab(_m, args, name=name):
                seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).cpu()

            hooks.append(model.get_submodule(name).register_forward_pre_hook(grab))
    try:
        before = logits_of(model, example_inputs).detach().float().cpu()
    finally:
        for h in hooks:
            h.remove()

    for gs, dead_out, dead_in in plans:
        fold = dead_in & ~dead_out
        no_fold = _no_fold(model, gs) if bool(fold.any()) else None
        if no_fold is not None:
            report.skipped[gs.name] = f"constant units kept: {no_fold}"
            fold = torch.zeros_like(fold)
        width = gs.consumers[0].size
        constants: dict[int, torch.Tensor] = {}
        for g in torch.nonzero(fold).flatten().tolist():
            x = seen[gs.consumers[0].module][:, g * width : (g + 1) * width]
            if bool((x == x[:1]).all()):
                constants[g] = x[0]
            else:
                fold[g] = False  # not constant after all: this architecture feeds it something else
        remove = dead_out | fold
        if bool(remove.all()):  # a layer keeps one unit (a set cannot be empty); prefer keeping a dead one
            keep_one = int(torch.nonzero(dead_out).flatten()[0]) if bool(dead_out.any()) else 0
            remove[keep_one] = False
            constants.pop(keep_one, None)
        if not bool(remove.any()):
            continue
        for g, c in constants.items():
            cols = slice(g * width, (g + 1) * width)
            for s in gs.consumers:
                w = probe.get_submodule(s.module).weight.detach()
                bias = model.get_submodule(s.module).bias
                bias += (w[:, cols].to(c.device) @ c.to(w.dtype)).to(bias.device, bias.dtype)
        shrink_(model, [gs], {gs.name: ~remove})
        report.sets[gs.name].update(
            removed=int((remove & dead_out).sum()),
            folded=int((remove & ~dead_out).sum()),
            left=int((~remove).sum()),
        )
    after = logits_of(model, example_inputs).detach().float().cpu()
    report.max_abs_logit_diff = float((after - before).abs().max()) if before.numel() else 0.0
    report.params_after = parameter_counts(model)["params_total"]
    model.train(was_training)
    scale = 1.0 + float(before.abs().max()) if before.numel() else 1.0
    if report.max_abs_logit_diff > 1e-3 * scale:
        raise RuntimeError(
            f"compact_ changed the logits by {report.max_abs_logit_diff:.3g} (sets {sorted(report.sets)}): "
            "removing dead units must not change the model"
        )
    return report


__all__ = ["CompactReport", "compact_"]
