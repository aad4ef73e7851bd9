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


def test_a_prune_stage_with_flops_target_reaches_it(make_cfg):
    from dpq.train import train

    results = train(
        make_cfg(
            "experiment=tiny",
            "pipeline=dp",
            "pipeline.stages.prune.granularity=heads+neurons",
            "+pipeline.stages.prune.flops_target=0.6",
            "pipeline.stages.prune.criterion=taylor",
        )
    )
    prune = next(s for s in results["stages"] if s["stage"] == "prune")
    distill = next(s for s in results["stages"] if s["stage"] == "distill")
    before, after = distill["metrics"]["dense_gflops"], prune["metrics"]["dense_gflops"]
    assert prune["flops_target"] == 0.6 and prune["shrunk"]
    assert after <= 0.6 * before + 1e-9 and after >= 0.45 * before
