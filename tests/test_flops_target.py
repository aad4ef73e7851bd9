"""Structured pruning to a FLOPs budget: "remove heads and neurons until dense GFLOPs reach X"."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from dpq import cost
from dpq.prune import structured


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


INPUTS = {"input_ids": torch.randint(1, 200, (1, 32)), "attention_mask": torch.ones(1, 32, dtype=torch.long)}


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.33])
def test_a_gflops_target_is_met_within_one_group(keep):
    m = bert()
    targets = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and "encoder" in n]
    sets = structured.find_groups(m, "heads+neurons", targets)
    total, by_module = cost.flops_by_module(m, INPUTS)
    costs = structured.group_costs(m, sets, by_module)
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(m.get_submodule(n).weight.shape, generator=g) for n in targets}
    kept = structured.select_groups(sets, scores, 1 - keep, scope="flops", costs=costs, flops_total=total)
    structured.shrink_(m, sets, kept)
    after = cost.flops_by_module(m, INPUTS)[0]
    biggest = max(costs.values())
    assert keep * total - biggest <= after <= keep * total + 1e-6  # within one group, never above the target
    # the costs add up: what shrinking removed is what the selection counted
    removed = sum(costs[s.name] * int((~k).sum()) for s, k in ((s, kept[s.name]) for s in sets))
    assert abs((total - after) - removed) <= 1e-6 * total


def _tiny_structured_run(make_cfg, *overrides):
    """A tiny heads+neurons Taylor dp run: (results, prune record, dense GFLOPs before and after pruning)."""
    from dpq.train import train

    results = train(
        make_cfg(
            "experiment=tiny",
            "pipeline=dp",
            "pipeline.stages.prune.granularity=heads+neurons",
            "pipeline.stages.prune.criterion=taylor",
            *overrides,
        )
    )
    prune = next(s for s in results["stages"] if s["stage"] == "prune")
    distill = next(s for s in results["stages"] if s["stage"] == "distill")
    return results, prune, distill["metrics"]["dense_gflops"], prune["metrics"]["dense_gflops"]


def test_a_prune_stage_with_flops_target_reaches_it(make_cfg):
    _, prune, before, after = _tiny_structured_run(make_cfg, "+pipeline.stages.prune.flops_target=0.6")
    assert prune["flops_target"] == 0.6 and prune["shrunk"]
    assert after <= 0.6 * before + 1e-9 and after >= 0.45 * before


def _setup(keep: float):
    m = bert()
    targets = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and "encoder" in n]
    sets = structured.find_groups(m, "heads+neurons", targets)
    total, by_module = cost.flops_by_module(m, INPUTS)
    costs = structured.group_costs(m, sets, by_module)
    return m, targets, sets, total, costs


@pytest.mark.parametrize("keep, heads", [(0.4, 0.5), (0.45, 0.25), (0.6, 0.0)])
def test_flops_fill_keeps_the_head_share_and_meets_the_budget_with_the_fewest_neurons_removed(keep, heads):
    m, targets, sets, total, costs = _setup(keep)
    fraction, removed = structured.flops_fill(sets, costs, "neurons", heads, (1 - keep) * total)
    neuron_sets = [s for s in sets if s.kind == "neurons"]
    n = neuron_sets[0].count  # 256 in every layer
    assert abs(fraction * n - round(fraction * n)) < 1e-9  # a whole number of neurons per layer
    # the smallest such fraction: one neuron fewer per layer would leave the model above the budget
    per_layer = sum(costs[s.name] for s in neuron_sets)
    assert removed >= (1 - keep) * total - 1e-6 and removed - per_layer < (1 - keep) * total

    g = torch.Generator().manual_seed(1)
    scores = {t: torch.rand(m.get_submodule(t).weight.shape, generator=g) for t in targets}
    per_set = {s.name: (fraction if s.kind == "neurons" else heads) for s in sets}
    kept = structured.select_groups(sets, scores, per_set, scope="layer")
    structured.shrink_(m, sets, kept)
    after = cost.flops_by_module(m, INPUTS)[0]
    assert abs((total - after) - removed) <= 1e-6 * total  # the solver's count is what the shrink removes
    assert after <= keep * total + 1e-6
    for s in sets:  # the head share is exactly the one asked, in every layer
        if s.kind == "heads":
            assert int(kept[s.name].sum()) == s.count - round(heads * s.count)
        else:
            assert int(kept[s.name].sum()) == n - round(fraction * n)


def test_flops_fill_says_when_the_budget_cannot_be_split_that_way():
    _, _, sets, total, costs = _setup(0.5)
    with pytest.raises(ValueError, match="alone leaves fewer FLOPs than the target"):
        structured.flops_fill(sets, costs, "neurons", 0.75, 0.01 * total)  # the heads alone remove more
    with pytest.raises(ValueError, match="still leaves more FLOPs than the target"):
        structured.flops_fill(sets, costs, "neurons", 0.0, 0.95 * total)  # neurons alone cannot reach 5%


@pytest.mark.parametrize(
    "settings, bad",
    [
        ({"flops_fill": "neurons"}, "flops_fill"),  # no flops_target
        ({"flops_fill": "layers", "flops_target": 0.3}, "flops_fill"),
        ({"flops_fill": "neurons", "flops_target": 0.3, "granularity": "neurons"}, "flops_fill"),
        ({"flops_fill": "neurons", "flops_target": 0.3, "scope": "global"}, "flops_fill"),
    ],
)
def test_flops_fill_misuse_is_a_config_error_naming_the_key(settings, bad):
    from dpq.core.errors import ConfigError
    from dpq.stages.prune import PruneConfig

    cfg = PruneConfig(**{"granularity": "heads+neurons", **settings})
    with pytest.raises(ConfigError, match=rf"pipeline\.stages\.prune\.{bad}"):
        cfg.check("pipeline.stages.prune")


def test_a_prune_stage_with_flops_fill_keeps_the_head_share_and_reaches_the_target(make_cfg):
    results, prune, before, after = _tiny_structured_run(
        make_cfg,
        "pipeline.stages.prune.final_sparsity=0.5",
        "pipeline.stages.prune.flops_target=0.4",
        "pipeline.stages.prune.flops_fill=neurons",
    )
    assert prune["flops_fill"] == "neurons" and prune["shrunk"] and 0 < prune["fill_fraction"] < 1
    assert after <= 0.4 * before + 1e-9 and after >= 0.3 * before
    arch = results["config"]["model"]["config"]
    h, n = arch["num_attention_heads"], arch["intermediate_size"]
    # half the heads in every layer, and the same solved share of the neurons in every layer
    assert set(prune["structure"]["heads"].values()) == {h - round(0.5 * h)}
    assert set(prune["structure"]["neurons"].values()) == {n - round(prune["fill_fraction"] * n)}


def test_flops_fill_below_the_initial_sparsity_is_a_config_error():
    from dpq.core.errors import ConfigError
    from dpq.stages.prune import PruneConfig, PruneStage

    m, _, sets, total, costs = _setup(0.8)
    cfg = PruneConfig(
        granularity="heads+neurons",
        final_sparsity=0.25,
        initial_sparsity=0.25,
        flops_target=0.8,
        flops_fill="neurons",
    )
    cfg.check("pipeline.stages.prune")
    fraction, _ = structured.flops_fill(sets, costs, "neurons", 0.25, 0.2 * total)
    assert fraction < 0.25  # the neurons' solved share is below where the ramp starts
    budget = {"costs": costs, "flops_total": total}
    with pytest.raises(ConfigError, match=r"pipeline\.stages\.prune\.initial_sparsity"):
        PruneStage("prune", cfg).fill_finals(m, sets, budget, 0.2)


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("scope", ["global", "flops"])
def test_heads_and_neurons_compete_on_importance_per_element_not_on_group_size(norm, scope):
    """Every attention weight scores 3, every FFN weight 1: per element (global) or per FLOP (flops) the
    neurons are the cheaper importance, so they go first and no head does, with l1 and with l2. (The l2
    norm divided by a group's size once ranked heads, which have 128x a neuron's elements here, far lower.)"""
    m = bert()
    targets = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and "encoder" in n]
    sets = structured.find_groups(m, "heads+neurons", targets)
    scores = {
        n: torch.full(m.get_submodule(n).weight.shape, 3.0 if "attention" in n else 1.0) for n in targets
    }
    extra = {}
    if scope == "flops":
        total, by_module = cost.flops_by_module(m, INPUTS)
        extra = dict(costs=structured.group_costs(m, sets, by_module), flops_total=total)
    kept = structured.select_groups(sets, scores, 0.2, scope=scope, norm=norm, **extra)
    heads_gone = sum(int((~kept[s.name]).sum()) for s in sets if s.kind == "heads")
    neurons_gone = sum(int((~kept[s.name]).sum()) for s in sets if s.kind == "neurons")
    assert heads_gone == 0 and neurons_gone > 0


@pytest.mark.parametrize("keep", [0.1, 0.05])
def test_a_flops_target_min_keep_puts_out_of_reach_raises_instead_of_stopping_above_it(keep):
    """Every group but min_keep=1 per layer gone still leaves ~0.11 of the tiny BERT's FLOPs (embeddings,
    pooler, one head and one neuron per layer): the selection stopped there and returned a model above the
    target with no word."""
    m, targets, sets, total, costs = _setup(keep)
    smallest = structured.min_flops_fraction(sets, costs, total, 1)
    assert keep < smallest < 0.2
    scores = {n: torch.rand(m.get_submodule(n).weight.shape) for n in targets}
    with pytest.raises(ValueError, match=rf"min_keep=1.*keeps at least {smallest:.4f}"):
        structured.select_groups(sets, scores, 1 - keep, scope="flops", costs=costs, flops_total=total)
    kept = structured.select_groups(  # the smallest reachable target itself is met: every group but one
        sets, scores, 1 - smallest, scope="flops", costs=costs, flops_total=total
    )
    assert all(int(k.sum()) == 1 for k in kept.values())


def _stage(flops_target: float, min_keep: int = 1):
    from dpq.stages.prune import PruneConfig, PruneStage

    cfg = PruneConfig(granularity="heads+neurons", flops_target=flops_target, min_keep=min_keep)
    cfg.check("pipeline.stages.prune")
    return PruneStage("prune", cfg)


def test_an_unreachable_flops_target_is_a_config_error_naming_the_key_and_the_smallest_target():
    from dpq.core.errors import ConfigError

    _, _, sets, total, costs = _setup(0.1)
    budget = {"costs": costs, "flops_total": total}
    smallest = structured.min_flops_fraction(sets, costs, total, 1)
    with pytest.raises(
        ConfigError, match=rf"pipeline\.stages\.prune\.flops_target=0\.1: .*{smallest:.4f}"
    ) as e:
        _stage(0.1).check_flops_reachable(sets, budget)
    assert "min_keep=1" in str(e.value) and "lower min_keep" not in str(e.value)  # it cannot go below 1
    suggested = float(str(e.value).split("flops_target >= ")[1].split()[0])
    assert smallest <= suggested < smallest + 1e-4  # rounded up: the value it suggests is reachable
    _stage(suggested).check_flops_reachable(sets, budget)
    _stage(0.2).check_flops_reachable(sets, budget)  # reachable: no error
    with pytest.raises(ConfigError, match="lower min_keep"):  # two heads and neurons per layer: ~0.21 left
        _stage(0.2, min_keep=2).check_flops_reachable(sets, budget)
    # after drop_layers the target is a fraction of the FLOPs before the drop: 0.1 of twice these is reachable
    _stage(0.1).check_flops_reachable(sets, budget, flops_first=2 * total)


def test_a_prune_stage_with_an_unreachable_flops_target_stops_before_it_trains():
    from types import SimpleNamespace

    from dpq.core.errors import ConfigError

    def fit(*args, **kwargs):
        raise AssertionError("the ramp trained before the target was checked")

    ctx = SimpleNamespace(
        ensure_student=lambda state: bert(),
        model_spec={
            "prune_targets": r"re:.*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|"
            r"attention\.output\.dense|intermediate\.dense|output\.dense)"
        },
        example_inputs=lambda: INPUTS,
        fit=fit,
    )
    with pytest.raises(ConfigError, match=r"pipeline\.stages\.prune\.flops_target=0\.05"):
        _stage(0.05).run(SimpleNamespace(masks=None), ctx)
