"""Behavioural tests for dpq.quant: fake quant, QAT prepare, packing, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dpq.quant import (
    FakeQuantLinear,
    QATConfig,
    QuantizedLinear,
    convert_,
    dequantize_,
    fake_quantize,
    load_quantized_,
    prepare_qat_,
    quantized_state,
    save_quantized,
    select_modules,
)

ENCODER_TARGETS = r"re:.*encoder\.layer\.\d+\..*"


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def bert_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---------------------------------------------------------------- fake_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_grid_and_zeros(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    w[w.abs() < 0.5] = 0.0
    w[3] = 0.0  # an all-zero row must not produce NaN
    q = fake_quantize(w, bits, "per_channel")
    assert torch.isfinite(q).all()
    assert (q[w == 0] == 0).all()
    assert (q[3] == 0).all()
    for row in q:
        assert row.unique().numel() <= 2**bits - 1


def test_fake_quantize_8bit_error_bound_and_per_tensor():
    torch.manual_seed(0)
    w = torch.randn(8, 33)
    q = fake_quantize(w, 8, "per_channel")
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q - w).abs() <= scale / 2 * (1 + 1e-5)).all()
    # Row maxima are representable exactly (code +-127).
    assert torch.allclose(q.abs().amax(dim=1), w.abs().amax(dim=1))
    qt = fake_quantize(w, 4, "per_tensor")
    assert qt.unique().numel() <= 15


def test_fake_quantize_straight_through_gradient():
    torch.manual_seed(0)
    w = torch.randn(5, 9, requires_grad=True)
    upstream = torch.randn(5, 9)
    fake_quantize(w, 4, "per_channel").backward(upstream)
    assert torch.equal(w.grad, upstream)


# ---------------------------------------------------------------- config


def test_config_validation():
    with pytest.raises(ValueError, match=r"bits=5.*\[2, 3, 4, 8\]"):
        QATConfig(bits=5)
    with pytest.raises(ValueError, match="granularity"):
        QATConfig(granularity="per_group")
    with pytest.raises(ValueError, match="regex"):
        QATConfig(targets="re:(")
    cfg = QATConfig(bits=8, targets=("0", "re:2"))
    assert cfg.targets == ["0", "re:2"]
    assert cfg.to_dict() == {"bits": 8, "granularity": "per_channel", "targets": ["0", "re:2"]}


# ---------------------------------------------------------------- prepare_qat_


def test_prepare_sequential_shares_parameters_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE prepare
    assert select_modules(model, ["0", "re:2"]) == ["0", "2"]
    assert prepare_qat_(model, QATConfig(bits=4)) == ["0", "2"]
    assert isinstance(model[0], FakeQuantLinear) and isinstance(model[2], FakeQuantLinear)
    assert list(model.state_dict()) == keys_before
    for name, p in model.named_parameters():
        assert p is params_before[name]
    assert "bits=4" in repr(model[0])
    before = model[0].weight.detach().clone()
    model(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)
    # Idempotent: already fake-quantized modules are not re-wrapped.
    assert prepare_qat_(model, QATConfig(bits=4)) == []


def test_prepare_bert_targets_encoder_only():
    model = tiny_bert()
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    replaced = prepare_qat_(model, QATConfig(bits=4, targets=ENCODER_TARGETS))
    assert len(replaced) == 2 * 6  # q, k, v, attn out, intermediate, output per layer
    assert all(".encoder.layer." in n for n in replaced)
    assert not isinstance(model.classifier, FakeQuantLinear)
    assert not isinstance(model.bert.pooler.dense, FakeQuantLinear)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, FakeQuantLinear)
    assert list(model.state_dict()) == keys_before
    for name, p in model.named_parameters():
        assert p is params_before[name]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    q = model.bert.encoder.layer[1].attention.self.query.weight
    before = q.detach().clone()
    model(**bert_inputs(), labels=torch.tensor([0, 1, 0])).loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(q.detach(), before)


def test_bad_targets_raise_helpful_error():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"re:.*nope.*matched no nn\.Linear.*bert\.encoder\.layer\.0"):
        prepare_qat_(model, QATConfig(targets="re:.*nope"))
    with pytest.raises(ValueError, match="classifier_typo"):
        prepare_qat_(model, QATConfig(targets=["classifier_typo"]))


# ---------------------------------------------------------------- pruning survives


@pytest.mark.parametrize("bits", [4, 8])
def test_pruned_zeros_survive_qat_and_conversion(bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(31, 24), nn.GELU(), nn.Linear(24, 5))
    masks = {}
    for i in (0, 2):
        w = model[i].weight.data
        thresh = w.abs().flatten().kthvalue(w.numel() // 2).values
        masks[i] = (w.abs() > thresh).float()
        w.mul_(masks[i])
    zeros_before = {i: int((model[i].weight == 0).sum()) for i in (0, 2)}
    assert all(z >= model[i].weight.numel() // 2 for i, z in zeros_before.items())

    prepare_qat_(model, QATConfig(bits=bits))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 31), torch.randn(16, 5)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            for i in (0, 2):
                model[i].weight.data.mul_(masks[i])  # mask-freeze callback

    assert convert_(model) == ["0", "2"]
    for i in (0, 2):
        qm = model[i]
        assert isinstance(qm, QuantizedLinear)
        pruned = masks[i] == 0
        assert (qm.codes()[pruned] == 0).all()
        assert (qm.dequantize()[pruned] == 0).all()
        assert int((qm.dequantize() == 0).sum()) == zeros_before[i]
        assert qm.nonzero_weights() == qm.dequantize().count_nonzero().item()
        assert qm.nonzero_weights() == qm.in_features * qm.out_features - zeros_before[i]


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_converted_matches_fake_quant(bits, granularity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 3, bias=False))  # odd in_features
    prepare_qat_(model, QATConfig(bits=bits, granularity=granularity))
    x = torch.randn(10, 7)
    with torch.no_grad():
        ref = model(x)
        fq_weights = [fake_quantize(model[i].weight, bits, granularity) for i in (0, 2)]
    convert_(model)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for i, fq in zip((0, 2), fq_weights):
        assert torch.equal(model[i].dequantize(), fq)
        qmax = 2 ** (bits - 1) - 1
        assert model[i].codes().dtype == torch.int8
        assert model[i].codes().abs().max() <= qmax


def test_storage_bytes_4bit_is_about_one_eighth():
    torch.manual_seed(0)
    lin = nn.Linear(64, 128)
    q4 = QuantizedLinear.from_float(lin, bits=4)
    fp32_weight = 64 * 128 * 4
    scales_and_bias = 128 * 4 + 128 * 4
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.shape == (128, 32)
    assert q4.storage_bytes() == fp32_weight // 8 + scales_and_bias
    q8 = QuantizedLinear.from_float(lin, bits=8)
    assert q8.storage_bytes() == fp32_weight // 4 + scales_and_bias
    assert q4.storage_bits == 4 and QuantizedLinear.from_float(lin, bits=2).storage_bits == 4


def test_convert_plain_linear_with_cfg_ptq():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2))
    ref = [fake_quantize(model[i].weight, 8, "per_channel").detach() for i in (0, 1)]
    assert convert_(model, cfg=QATConfig(bits=8, targets="1")) == ["1"]
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], QuantizedLinear)
    assert torch.equal(model[1].dequantize(), ref[1])


# ---------------------------------------------------------------- save / load


def test_save_load_roundtrip_tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_bert()
    prepare_qat_(model, QATConfig(bits=4, targets=ENCODER_TARGETS))
    inputs = bert_inputs()
    with torch.no_grad():
        fq_logits = model(**inputs).logits
    names = convert_(model)
    with torch.no_grad():
        q_logits = model(**inputs).logits
    torch.testing.assert_close(q_logits, fq_logits, atol=1e-5, rtol=0)

    state = quantized_state(model)
    assert set(state) == set(names)
    entry = state[names[0]]
    assert entry["bits"] == 4 and entry["granularity"] == "per_channel" and "bias" in entry

    save_quantized(model, tmp_path)
    assert (tmp_path / "quantized_weights.safetensors").exists()
    import json

    meta = json.loads((tmp_path / "quantization_config.json").read_text())
    assert meta["bits"] == 4 and meta["format_version"] == 1 and set(meta["modules"]) == set(names)

    # Float copy for HF: dequantize, save_pretrained, reload, then re-quantize from disk.
    float_copy = copy.deepcopy(model)
    assert sorted(dequantize_(float_copy)) == sorted(names)
    with torch.no_grad():
        torch.testing.assert_close(float_copy(**inputs).logits, q_logits, atol=1e-6, rtol=0)
    float_copy.save_pretrained(tmp_path)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert sorted(load_quantized_(reloaded, tmp_path)) == sorted(names)
    assert isinstance(reloaded.bert.encoder.layer[0].attention.self.query, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, q_logits)
    for n in names:
        a, b = reloaded.get_submodule(n), model.get_submodule(n)
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale)


def test_load_quantized_rejects_mismatched_architecture(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6))
    convert_(model, cfg=QATConfig(bits=4))
    save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_quantized_(nn.Sequential(nn.Linear(4, 7)), tmp_path)
