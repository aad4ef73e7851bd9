"""Quantized word embeddings: QAT equals the converted table bit for bit, zero rows stay zero, the table
reloads at its real bit width and the size counts it; config errors come before training."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from dpq import cost
from dpq.core.errors import ConfigError
from dpq.models.io import load_model, save_model
from dpq.quant.embedding import (
    FakeQuantizedEmbedding,
    PackedEmbedding,
    convert_embedding_,
    embedding_config,
    prepare_embedding_,
)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 32), (8, 16)])
def test_qat_table_equals_the_packed_table_and_zero_rows_stay_zero(bits, group):
    model = tiny_bert()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[[3, 7]] = 0.0  # e.g. rows a pruning removed
    ids = torch.randint(0, 500, (4, 9))
    prepare_embedding_(model, embedding_config(bits, group))
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, FakeQuantizedEmbedding)
    fake = model(input_ids=ids).logits
    fake_rows = emb(torch.arange(500))
    assert int((fake_rows != 0).any(dim=1).logical_not().sum()) >= 2  # zero rows are still zero
    convert_embedding_(model)
    packed = model.bert.embeddings.word_embeddings
    assert isinstance(packed, PackedEmbedding) and packed.bits == bits
    assert torch.equal(packed(torch.arange(500)), fake_rows)  # bit for bit
    assert torch.equal(model(input_ids=ids).logits, fake)
    assert torch.equal(packed(torch.tensor([3, 7])), torch.zeros(2, 64))
    levels = {len(torch.unique(r)) for r in packed.codes()[:50]}
    assert max(levels) <= 2**bits


def test_convert_and_unprepare_of_every_prepared_layer_leave_the_table_to_its_own_verbs():
    """A fake-quantized table has quant_config and weight_fake_quantizer too: convert_ and unprepare_qat_
    with no names took it for a linear layer and failed ('no attribute in_features')."""
    import copy

    from dpq.quant import QuantConfig, convert_, prepare_qat_, prepared_modules
    from dpq.quant.fake import unprepare_qat_
    from dpq.quant.packed import PackedLinear

    model = tiny_bert()
    prepare_qat_(model, QuantConfig(bits=4))
    prepare_embedding_(model, embedding_config(8, None))
    assert "bert.embeddings.word_embeddings" not in prepared_modules(model)
    restored = copy.deepcopy(model)
    assert "bert.encoder.layer.0.output.dense" in unprepare_qat_(restored)
    assert type(restored.bert.encoder.layer[0].output.dense) is torch.nn.Linear
    assert isinstance(restored.bert.embeddings.word_embeddings, FakeQuantizedEmbedding)
    convert_(model, backend="packed")
    assert isinstance(model.bert.encoder.layer[0].output.dense, PackedLinear)
    assert convert_embedding_(model) == "bert.embeddings.word_embeddings"


def test_quantized_table_reloads_and_its_size_is_counted(tmp_path):
    model = tiny_bert()
    float_size = cost.size_bytes(model)["size_bytes"]
    prepare_embedding_(model, embedding_config(4, None))
    convert_embedding_(model)
    ids = torch.randint(0, 500, (2, 7))
    want = model(input_ids=ids).logits
    table = 500 * 64
    size = cost.size_bytes(model)["size_bytes"]
    # 4-bit codes (32 bytes per 64-wide row) + one float32 scale per row instead of 4 bytes per weight
    assert size == float_size - table * 4 + 500 * 32 + 500 * 4
    save_model(model, tmp_path)
    back = load_model({"arch": "hf"}, {}, tmp_path)
    assert isinstance(back.bert.embeddings.word_embeddings, PackedEmbedding)
    assert torch.equal(back(input_ids=ids).logits, want)
    flops_q = cost.flops(model, {"input_ids": ids})["dense_gflops"]
    flops_f = cost.flops(tiny_bert(), {"input_ids": ids})["dense_gflops"]
    assert flops_q == pytest.approx(flops_f)  # a table lookup is no multiply-add
    assert cost.parameter_counts(model)["params_total"] == cost.parameter_counts(tiny_bert())["params_total"]


@pytest.mark.parametrize(
    "override,key,match",
    [
        (
            "pipeline.stages.quantize.embedding_bits=3",
            "pipeline.stages.quantize.embedding_bits",
            "null .*4, 8",
        ),
        (
            "pipeline.stages.quantize.embedding_group_size=24",
            "pipeline.stages.quantize.embedding_group_size",
            "power of two",
        ),
    ],
)
def test_bad_embedding_settings_fail_before_training(make_cfg, override, key, match):
    from omegaconf import OmegaConf

    from dpq.run.validate import validate

    with pytest.raises(ConfigError, match=match) as e:
        validate(OmegaConf.to_container(make_cfg("experiment=tiny", "pipeline=dq", override), resolve=True))
    assert e.value.key == key


def test_an_mlp_has_no_table_to_quantize(make_cfg):
    from omegaconf import OmegaConf

    from dpq.run.validate import validate

    cfg = make_cfg("experiment=digits", "pipeline=dq", "pipeline.stages.quantize.embedding_bits=8")
    with pytest.raises(ConfigError, match="no word-embedding table"):
        validate(OmegaConf.to_container(cfg, resolve=True))


def test_a_dq_run_with_a_4_bit_table_trains_converts_and_reloads(make_cfg):
    from dpq.train import train

    results = train(
        make_cfg(
            "experiment=tiny",
            "pipeline=dq",
            "pipeline.stages.quantize.embedding_bits=4",
            "pipeline.stages.quantize.embedding_group_size=32",
        )
    )
    q = results["stages"][-1]
    assert q["embedding_bits"] == 4 and q["embedding_group_size"] == 32
    distill = results["stages"][1]["metrics"]
    assert q["metrics"]["size_bytes"] < distill["size_bytes"] - 30522 * 64 * 3  # the table shrank ~8x
    assert results["final"]["reload_accuracy"] == pytest.approx(results["final"]["accuracy"], abs=1e-3)
