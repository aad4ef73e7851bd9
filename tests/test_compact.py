"""Compaction (dpq.prune.compact): heads and FFN neurons that pruning left without effect are removed
before export, the constant ones folded into the next bias; the model computes what it did."""

import copy

import pytest
import torch
from test_export import bert, ort_logits, quantized, text_inputs

from dpq.export import export_onnx
from dpq.prune.compact import compact_

D = 16  # head width of test_export's bert (64 / 4 heads)


def other_inputs():
    """Inputs compact_ never saw: another batch size, length and padding."""
    torch.manual_seed(7)
    ids = torch.randint(1, 300, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@torch.no_grad()
def kill(model):
    """Layer 0: neurons 0-29 lose their output weights, 30-49 their input weights (bias stays, so
    their output is a non-zero constant), neuron 50 keeps one input weight; head 1 loses its output
    columns, head 2 its Q, K and V rows. Layer 1: untouched."""
    layer = model.bert.encoder.layer[0]
    layer.output.dense.weight[:, :30] = 0
    layer.intermediate.dense.weight[30:51] = 0
    layer.intermediate.dense.bias[30:50] = 0.5  # GELU(0.5) != 0: folding must carry it
    layer.intermediate.dense.weight[50, 3] = 0.2
    layer.attention.output.dense.weight[:, D : 2 * D] = 0
    for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
        lin.weight[2 * D : 3 * D] = 0
    return model


def test_dead_and_constant_units_go_and_the_logits_stay():
    model = kill(bert())
    before = logits(model, other_inputs())
    report = compact_(model, text_inputs())
    layer0, layer1 = model.bert.encoder.layer
    assert layer0.intermediate.dense.out_features == 128 - 50 == layer0.output.dense.in_features
    assert (
        layer0.attention.self.num_attention_heads == 2 and layer0.attention.self.query.out_features == 2 * D
    )
    assert layer1.intermediate.dense.out_features == 128 and layer1.attention.self.num_attention_heads == 4
    enc = "bert.encoder.layer.0."
    assert report.sets[enc + "intermediate"] == {
        "kind": "neurons",
        "count": 128,
        "removed": 30,
        "folded": 20,
        "left": 78,
    }
    assert report.sets[enc + "attention"]["removed"] == 1 and report.sets[enc + "attention"]["folded"] == 1
    assert report.by_kind() == {"heads": {"before": 8, "left": 6}, "neurons": {"before": 256, "left": 206}}
    assert report.params_after < report.params_before and not report.skipped
    torch.testing.assert_close(logits(model, other_inputs()), before, atol=1e-5, rtol=0)


def test_a_unit_with_one_weight_left_stays():
    model = bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[:, :10] = 0
        model.bert.encoder.layer[1].output.dense.weight[0, 4] = 1e-3
    report = compact_(model, text_inputs())
    assert model.bert.encoder.layer[1].intermediate.dense.out_features == 128 - 9
    assert report.removed == 9


def test_a_layer_whose_units_are_all_dead_keeps_one():
    model = bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight.zero_()
    before = logits(model, other_inputs())
    compact_(model, text_inputs())
    assert model.bert.encoder.layer[1].intermediate.dense.out_features == 1
    torch.testing.assert_close(logits(model, other_inputs()), before, atol=1e-5, rtol=0)


def test_4_bit_layers_keep_their_codes_bit_for_bit_and_export_exactly(tmp_path):
    model = quantized(kill(bert()), 4)
    name = "bert.encoder.layer.0."
    up, down = model.get_submodule(name + "intermediate.dense"), model.get_submodule(name + "output.dense")
    codes_up, codes_down, scale_down = up.codes().clone(), down.codes().clone(), down.scale.clone()
    before = logits(model, other_inputs())
    report = compact_(model, text_inputs())
    up, down = model.get_submodule(name + "intermediate.dense"), model.get_submodule(name + "output.dense")
    assert report.sets[name + "intermediate"]["left"] == 78
    assert torch.equal(up.codes(), codes_up[50:]) and torch.equal(down.codes(), codes_down[:, 50:])
    assert torch.equal(down.scale, scale_down)  # per-channel: one scale per output row, unchanged
    torch.testing.assert_close(logits(model, other_inputs()), before, atol=1e-5, rtol=0)
    r = export_onnx(model, text_inputs(), tmp_path / "compact.onnx")
    torch.testing.assert_close(ort_logits(r.path, other_inputs()), before, atol=1e-4, rtol=0)


def test_what_cannot_be_cut_exactly_is_left_and_said():
    per_group = quantized(kill(bert()), 4, "per_group", group=32)
    report = compact_(per_group, text_inputs())
    assert per_group.bert.encoder.layer[0].intermediate.dense.out_features == 128
    assert "per-group codes cannot lose input columns" in report.skipped["bert.encoder.layer.0.intermediate"]

    # a consumer that rounds its input: dead units go, constant ones stay (their value would be rounded)
    static = quantized(kill(bert()), 4, act_bits=8)
    before = logits(static, other_inputs())
    report = compact_(static, text_inputs())
    assert report.sets["bert.encoder.layer.0.intermediate"]["removed"] == 30
    assert report.sets["bert.encoder.layer.0.intermediate"]["folded"] == 0
    assert "quantizes its input" in report.skipped["bert.encoder.layer.0.intermediate"]
    torch.testing.assert_close(logits(static, other_inputs()), before, atol=1e-5, rtol=0)


def test_deploy_exports_the_compact_model_and_says_so(tmp_path):
    from dpq.export.evaluate import deploy
    from dpq.export.onnx import OnnxOptions

    model = quantized(kill(bert()), 4)
    batches = [
        {**text_inputs(), "labels": torch.tensor([0, 1, 2, 0])},
        {**other_inputs(), "labels": torch.tensor([1, 1, 0])},
    ]
    cost = {"warmup": 0, "repeats": 2, "latency_process": "same"}
    kept = copy.deepcopy(model)
    metrics, report = deploy(model, tmp_path / "c.onnx", batches, batches, text_inputs(), cost)
    assert metrics["onnx_agreement"] == 1.0 and metrics["onnx_compacted_units"] == 52
    assert report["compact"]["by_kind"]["neurons"]["left"] == 206
    assert (
        model.bert.encoder.layer[0].intermediate.dense.out_features == 128
    )  # the caller's model is as it was
    plain, plain_report = deploy(
        kept, tmp_path / "p.onnx", batches, batches, text_inputs(), cost, OnnxOptions(compact=False)
    )
    assert "compact" not in plain_report and "onnx_dense_gflops" not in plain
    assert metrics["onnx_dense_gflops"] > 0 and report["size_bytes"] < plain_report["size_bytes"]


@pytest.mark.parametrize("bits", [8])
def test_int8_rows_and_columns_select_exactly(bits):
    from dpq.quant.packed import PackedLinear

    torch.manual_seed(0)
    m = PackedLinear(13, 5, bits=bits)
    codes = torch.randint(-100, 100, (5, 13), dtype=torch.int8)
    m.set_codes(codes, torch.rand(5, 1) + 0.1)
    m.select_(1, torch.tensor([0, 4, 12]))
    m.select_(0, torch.tensor([1, 3]))
    assert (m.out_features, m.in_features) == (2, 3)
    assert torch.equal(m.codes(), codes[[1, 3]][:, [0, 4, 12]])


def test_a_compacted_4_bit_model_saves_and_reloads_with_its_smaller_shapes(tmp_path):
    """What compaction leaves is a model like any shrunk one: dpq's save/load rebuilds its cut
    heads and neurons (config.dpq_structure) under the packed codes and gives the same logits."""
    from dpq.checkpoints import load_model, save_model

    model = quantized(kill(bert()), 4)
    compact_(model, text_inputs())
    before = logits(model, other_inputs())
    save_model(model, tmp_path / "model")
    reloaded = load_model({}, {}, tmp_path / "model").eval()
    layer0 = reloaded.bert.encoder.layer[0]
    assert layer0.intermediate.dense.out_features == 78 and layer0.output.dense.in_features == 78
    assert layer0.attention.self.num_attention_heads == 2
    name = "bert.encoder.layer.0.output.dense"
    assert torch.equal(reloaded.get_submodule(name).codes(), model.get_submodule(name).codes())
    torch.testing.assert_close(logits(reloaded, other_inputs()), before, atol=0, rtol=0)
