"""Depth pruning (dpq.prune.depth): whole layers chosen by block influence, removed, renumbered, reloaded."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from dpq.core.errors import ConfigError
from dpq.models.hf import student_from_teacher
from dpq.prune import depth, structured


def bert(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # weights that turn the hidden states (BERT's 0.02 init barely does)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.3)
    return model


def batches(n=3, batch=4, seq=12):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 200, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


@torch.no_grad()
def make_identity(model, i):
    """Layer i passes its (already layer-normed) input through: attention and FFN outputs zeroed."""
    layer = model.bert.encoder.layer[i]
    for lin in (layer.attention.output.dense, layer.output.dense):
        lin.weight.zero_()
        lin.bias.zero_()


def test_block_influence_finds_the_layer_that_changes_nothing():
    model = bert()
    make_identity(model, 2)
    bi = depth.block_influence(model, batches())
    assert bi.shape == (4,) and float(bi[2]) < 1e-6
    assert all(float(bi[i]) > 1e-3 for i in (0, 1, 3))
    assert depth.choose(bi, 1) == [2]
    assert model.training is False


def test_dropping_layers_gives_the_model_built_from_the_kept_ones_and_reloads(tmp_path):
    from dpq.models.io import load_model, save_model

    model = bert()
    expected = student_from_teacher(model, [0, 3]).eval()  # the same embeddings, layers 0 and 3, head
    masks = {
        "bert.encoder.layer.1.intermediate.dense": torch.ones(64, 32, dtype=torch.bool),
        "bert.encoder.layer.3.intermediate.dense": torch.zeros(64, 32, dtype=torch.bool),
    }
    renamed = depth.drop_layers_(model, [1, 2], masks)
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    assert list(renamed) == ["bert.encoder.layer.1.intermediate.dense"]  # old layer 3 is now 1; layer 1 gone
    assert not renamed["bert.encoder.layer.1.intermediate.dense"].any()
    for b in batches():
        torch.testing.assert_close(logits(model, b), logits(expected, b), rtol=0, atol=0)
    save_model(model, tmp_path / "m")
    spec = {"arch": "hf", "init": "random", "model_type": "bert"}
    again = load_model(spec, {"kind": "text", "num_labels": 2}, tmp_path / "m").eval()
    assert again.config.num_hidden_layers == 2
    for b in batches():
        torch.testing.assert_close(logits(again, b), logits(model, b), rtol=0, atol=0)


def test_a_shrink_recorded_before_the_drop_is_renumbered_and_reloads(tmp_path):
    from dpq.models.io import load_model, save_model

    model = bert(layers=3)
    targets = [
        n for n, _ in model.named_modules() if n.endswith(("query", "key", "value", "intermediate.dense"))
    ]
    sets = structured.find_groups(model, "heads+neurons", targets)
    keep = {s.name: torch.arange(s.count) % 2 == 0 for s in sets}  # half the heads and neurons everywhere
    structured.shrink_(model, sets, keep)
    depth.drop_layers_(model, [0])
    st = model.config.dpq_structure
    assert not any("layer.2." in k for k in st["linears"]) and any("layer.1." in k for k in st["linears"])
    assert set(model.dpq_original_groups) == {
        "bert.encoder.layer.0.attention",
        "bert.encoder.layer.0.intermediate",
        "bert.encoder.layer.1.attention",
        "bert.encoder.layer.1.intermediate",
    }
    save_model(model, tmp_path / "m")
    spec = {"arch": "hf", "init": "random", "model_type": "bert"}
    again = load_model(spec, {"kind": "text", "num_labels": 2}, tmp_path / "m").eval()
    for b in batches():
        torch.testing.assert_close(logits(again, b), logits(model, b), rtol=0, atol=0)


def test_bad_drops_are_refused():
    model = bert(layers=2)
    with pytest.raises(ValueError, match="would leave none"):
        depth.drop_layers_(model, [0, 1])
    with pytest.raises(ValueError, match="layers 0..1"):
        depth.drop_layers_(model, [2])
    with pytest.raises(ValueError, match="can drop 1..1 of 2"):
        depth.choose(torch.zeros(2), 2)
    with pytest.raises(ValueError, match="one list of transformer layers"):
        depth.layer_list(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize(
    "value, allowed",
    [
        (0, "must be null, a number of layers >= 1"),
        ("[1,1]", "a list of distinct layer indices"),
        (2, "must leave at least one of the model's 2 layers"),
        ("[5]", "layer indices must be in 0..1"),
    ],
)
def test_config_errors_before_training(make_cfg, value, allowed):
    from dpq.train import train

    cfg = make_cfg("experiment=tiny", "pipeline=dp", f"pipeline.stages.prune.drop_layers={value}")
    with pytest.raises(ConfigError, match="pipeline.stages.prune.drop_layers") as e:
        train(cfg)
    assert allowed in str(e.value)


def test_a_prune_stage_drops_a_layer_then_meets_a_flops_target_of_the_model_before(make_cfg):
    from dpq.train import train

    results = train(
        make_cfg(
            "experiment=tiny",
            "pipeline=dp",
            "pipeline.stages.prune.granularity=heads+neurons",
            "pipeline.stages.prune.criterion=taylor",
            "pipeline.stages.prune.drop_layers=1",
            "pipeline.stages.prune.flops_target=0.4",
        )
    )
    prune = next(s for s in results["stages"] if s["stage"] == "prune")
    before = next(s for s in results["stages"] if s["stage"] == "distill")["metrics"]["dense_gflops"]
    assert (
        prune["layers_before"] == 2
        and len(prune["dropped_layers"]) == 1
        and len(prune["block_influence"]) == 2
    )
    assert all(k.startswith("bert.encoder.layer.0.") for k in prune["structure"]["heads"])
    after = prune["metrics"]["dense_gflops"]
    assert after <= 0.4 * before + 1e-9  # the budget counted from the two-layer model
    assert after >= 0.4 * before * 0.5  # and not a layer more than needed
    assert (
        results["final"]["params_total"]
        < next(s for s in results["stages"] if s["stage"] == "distill")["metrics"]["params_total"]
    )


def test_a_layer_map_counts_the_layers_left_after_the_drop(make_cfg):
    from dpq.train import train

    cfg = make_cfg(
        "experiment=tiny",
        "pipeline=dp",
        "pipeline.stages.prune.drop_layers=1",
        "+pipeline.stages.prune.hidden=1.0",
        "+pipeline.stages.prune.layer_map=[1,2]",
    )
    with pytest.raises(
        ConfigError, match=r"pipeline.stages.prune.layer_map=\[1, 2\]: needs one teacher layer"
    ):
        train(cfg)


def test_per_layer_config_lists_follow_the_kept_layers_of_a_student_and_a_drop(tmp_path):
    """ModernBERT's config.layer_types (full / sliding-window attention per layer): with only the layer
    count lowered, a student of teacher layers [0, 3] ran its copy of layer 3 (full attention) as sliding
    window, and save_pretrained refused 2 layers with 4 layer types."""
    import warnings

    from transformers import AutoModelForSequenceClassification, ModernBertConfig

    from dpq.models.io import load_model, save_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = ModernBertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
            global_attn_every_n_layers=3,
            local_attention=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        )
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_config(cfg).eval()
    assert teacher.config.layer_types == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]
    ids = torch.randint(3, 100, (2, 16))
    student = student_from_teacher(teacher, [0, 3]).eval()
    assert student.config.layer_types == ["full_attention", "full_attention"]
    with torch.no_grad():
        want = student(input_ids=ids).logits
        save_model(student, tmp_path / "s")
        task = {"name": "t", "kind": "text", "num_labels": 2, "label_names": ["a", "b"]}
        assert torch.equal(load_model({}, task, str(tmp_path / "s"))(input_ids=ids).logits, want)


def test_a_depth_drop_keeps_the_per_layer_config_lists_of_the_layers_it_keeps():
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=16,
            layer_types=[
                "full_attention",
                "sliding_attention",
                "chunked_attention",
                "conv",
            ],  # as ModernBERT's: one entry per layer
        )
    )
    depth.drop_layers_(model, [1, 2])
    assert model.config.layer_types == ["full_attention", "conv"] and model.config.num_hidden_layers == 2
