"""QAT preparation (torchao module, dpq quantizers), selection, LSQ, activation ranges, resume, export."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from dpq import cost
from dpq.core.errors import ConfigError
from dpq.quant import (
    ActivationFakeQuant,
    LSQWeightQuantizer,
    MinMaxWeightQuantizer,
    PackedLinear,
    QuantConfig,
    QuantizationAware,
    QuantizedLinear,
    convert_,
    dequantize_,
    fake_quantize,
    head_names,
    load_quantized_,
    prepare_qat_,
    quantized_state,
    safetensors_data_bytes,
    save_quantized,
    select_targets,
)
from dpq.quant.fake import load_quantizer_state_, quantizer_state

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


def fake_quantized_linear():
    from torchao.quantization.qat import FakeQuantizedLinear

    return FakeQuantizedLinear


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("bits", 5, "2, 3, 4, 8"),
        ("granularity", "per_row", "per_tensor, per_channel, per_group"),
        ("group_size", 1, ">= 2"),
        ("observer", "ema", "minmax, lsq"),
        ("act_bits", 4, "null .* or 8"),
        ("act_bits", 8.0, "null .* or 8"),  # a float passed `in (None, 8)` and flowed into the metadata
        ("bits", 4.0, "2, 3, 4, 8"),
        ("calibration", "kl", "minmax, percentile"),
        ("percentile", 40, r"\(50, 100\]"),
        ("targets", "re:(", "regular expression"),
    ],
)
def test_config_errors_name_the_key(field, value, message):
    kw = {field: value}
    if field == "group_size":
        kw["granularity"] = "per_group"
    with pytest.raises(ConfigError, match=message) as e:
        QuantConfig(**kw).validate("pipeline.stages.quantize")
    assert e.value.key == f"pipeline.stages.quantize.{field}"


def test_lsq_needs_the_symmetric_grid():
    with pytest.raises(ConfigError, match="symmetric=true") as e:
        QuantConfig(observer="lsq", symmetric=False).validate("q")
    assert e.value.key == "q.observer"
    assert QuantConfig(bits=8, targets=("0", "re:2")).targets == ["0", "re:2"]


# ---------------------------------------------------------------- prepare


def test_prepare_uses_torchao_module_shares_parameters_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE prepare
    assert prepare_qat_(model, QuantConfig(bits=4)) == ["0", "2"]  # the head "4" stays float
    assert isinstance(model[0], fake_quantized_linear()) and type(model[4]) is nn.Linear
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    assert isinstance(model[0].weight_fake_quantizer, IntxFakeQuantizer)  # torchao's QAT API for this case
    assert (model[0].weight_bits, model[0].act_bits) == (4, None)
    assert list(model.state_dict()) == keys_before
    for name, p in model.named_parameters():
        assert p is params_before[name]
    before = model[0].weight.detach().clone()
    model(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)
    assert prepare_qat_(model, QuantConfig(bits=4)) == []  # idempotent


@pytest.mark.parametrize(
    "kw,quantizer",
    [
        (dict(granularity="per_tensor"), MinMaxWeightQuantizer),
        (dict(symmetric=False), MinMaxWeightQuantizer),
        (dict(granularity="per_group", group_size=5), MinMaxWeightQuantizer),  # 5 does not divide 6
        (dict(observer="lsq"), LSQWeightQuantizer),
    ],
)
def test_dpq_quantizers_where_torchao_has_no_equivalent(kw, quantizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    prepare_qat_(model, QuantConfig(act_bits=8, **kw))
    assert isinstance(model[0], fake_quantized_linear())
    assert isinstance(model[0].weight_fake_quantizer, quantizer)
    assert isinstance(model[0].activation_fake_quantizer, ActivationFakeQuant)
    assert model[0].act_bits == 8


def test_bert_targets_encoder_and_head_stays_float_unless_asked():
    model = tiny_bert()
    assert head_names(model) == ["classifier"]
    replaced = prepare_qat_(model, QuantConfig(bits=4, targets=ENCODER_TARGETS))
    assert len(replaced) == 2 * 6 and all(".encoder.layer." in n for n in replaced)
    assert type(model.classifier) is nn.Linear and type(model.bert.pooler.dense) is nn.Linear
    everything = tiny_bert()
    names = select_targets(everything, QuantConfig(targets="re:.*"))
    assert "classifier" not in names and "bert.pooler.dense" in names
    assert "classifier" in select_targets(everything, QuantConfig(targets="re:.*", quantize_head=True))
    model(**bert_inputs(), labels=torch.tensor([0, 1, 0])).loss.backward()
    assert model.bert.encoder.layer[1].attention.self.query.weight.grad.abs().sum() > 0


def test_bad_targets_raise_helpful_error():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"re:.*nope.*matched no nn\.Linear.*bert\.encoder\.layer\.0"):
        prepare_qat_(model, QuantConfig(targets="re:.*nope"))
    with pytest.raises(ValueError, match="classifier.*quantize_head=true"):
        prepare_qat_(model, QuantConfig(targets="classifier"))


# ---------------------------------------------------------------- LSQ


def test_lsq_gradients_follow_the_paper():
    """d w_hat / d s = (round(v) - v) inside the grid, -Q_N / Q_P outside, times g = 1/sqrt(N * Q_P)."""
    torch.manual_seed(0)
    w = torch.randn(4, 10)
    cfg = QuantConfig(bits=3, granularity="per_channel", observer="lsq")
    q = LSQWeightQuantizer(cfg, w)
    assert q.step.dim() == 1 and q.step.shape == (4,)  # 1-D: the optimizer's no-weight-decay group
    with torch.no_grad():
        q.step.copy_(torch.tensor([0.3, 0.5, 0.7, 0.2]))
    w.requires_grad_(True)
    q(w).sum().backward()
    s = q.step.detach().reshape(4, 1)
    v = w.detach() / s
    inside = (v >= -4) & (v <= 3)
    d_ds = torch.where(inside, v.round() - v, torch.where(v < -4, torch.tensor(-4.0), torch.tensor(3.0)))
    g = 1.0 / math.sqrt(10 * 3)
    torch.testing.assert_close(q.step.grad, d_ds.sum(dim=1) * g, rtol=1e-5, atol=1e-6)
    assert torch.equal(w.grad, inside.float())  # STE: 1 inside the grid, 0 where clipped


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_initial_step_is_never_worse_than_min_max(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 64)
    q = LSQWeightQuantizer(QuantConfig(bits=bits, observer="lsq"), w)
    mse_lsq = (q(w) - w).pow(2).sum()
    mse_minmax = (fake_quantize(w, bits, "per_channel") - w).pow(2).sum()
    assert mse_lsq <= mse_minmax * (1 + 1e-6)
    if bits == 2:
        assert mse_lsq < 0.9 * mse_minmax  # clipping pays off at low bit widths


# ---------------------------------------------------------------- activations


def test_activation_range_is_a_running_min_max_and_freezes_in_eval():
    act = ActivationFakeQuant(8, averaging_constant=0.5)
    x1, x2 = torch.full((4,), 2.0), torch.full((4,), 4.0)
    act.train()
    act(x1)
    assert float(act.amax) == 2.0
    act(x2)
    assert float(act.amax) == 3.0  # 2 + 0.5 * (4 - 2)
    act.eval()
    y = act(torch.tensor([10.0, -10.0, 1.0, 0.0]))
    scale = 3.0 / 127.5
    assert float(act.amax) == 3.0  # frozen in eval
    torch.testing.assert_close(y, torch.tensor([127 * scale, -128 * scale, round(1 / scale) * scale, 0.0]))


def test_callback_state_carries_lsq_steps_and_activation_ranges():
    torch.manual_seed(0)
    cfg = QuantConfig(bits=4, observer="lsq", act_bits=8, targets=["0"])
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    fresh = copy.deepcopy(model)

    class Holder(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

    cb = QuantizationAware("quantize", cfg)
    cb.setup(None, Holder(model), "fit")
    model.train()
    model(torch.randn(5, 6))
    with torch.no_grad():
        model[0].weight_fake_quantizer.step.mul_(1.5)
    state = cb.state_dict()
    assert set(state["quantizers"]["0"]) == {"step", "act_amax", "act_observed"}

    resumed = QuantizationAware("quantize", cfg)
    resumed.setup(None, Holder(fresh), "fit")  # Lightning: setup first, then the checkpoint's callback state
    resumed.load_state_dict(state)
    assert torch.equal(fresh[0].weight_fake_quantizer.step, model[0].weight_fake_quantizer.step)
    assert torch.equal(fresh[0].activation_fake_quantizer.amax, model[0].activation_fake_quantizer.amax)
    assert resumed.state_key != QuantizationAware("quantize2", cfg).state_key
    load_quantizer_state_(fresh, quantizer_state(model))  # the plain function round-trips too


# ---------------------------------------------------------------- export


def test_save_load_round_trip_tiny_bert_at_real_bit_width(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_bert()
    prepare_qat_(model, QuantConfig(bits=4, targets=ENCODER_TARGETS))
    inputs = bert_inputs()
    with torch.no_grad():
        fq_logits = model(**inputs).logits
    names = convert_(model)
    with torch.no_grad():
        q_logits = model(**inputs).logits
    assert torch.equal(q_logits, fq_logits)  # packed conversion is exact
    entry = quantized_state(model)[names[0]]
    assert entry["backend"] == "packed" and entry["bits"] == 4 and "bias" in entry

    path = save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / "quantization_config.json").read_text())
    assert meta["format_version"] == 2 and meta["bits"] == 4 and set(meta["modules"]) == set(names)
    # The file holds the whole model at its real bit width: exactly the bytes cost.size_bytes counts.
    assert safetensors_data_bytes(path) == cost.size_bytes(model)["size_bytes"]
    packed_bytes = sum(m.storage_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))
    mods = [model.get_submodule(n) for n in names]
    # 4 bits per weight + a float32 scale and a float32 bias per output row, nothing else.
    assert packed_bytes == sum(m.out_features * (m.in_features // 2 + 4 + 4) for m in mods)

    float_copy = copy.deepcopy(model)
    assert sorted(dequantize_(float_copy)) == sorted(names)
    with torch.no_grad():
        torch.testing.assert_close(float_copy(**inputs).logits, q_logits, atol=1e-6, rtol=0)
    float_copy.save_pretrained(tmp_path)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert sorted(load_quantized_(reloaded, tmp_path)) == sorted(names)
    assert isinstance(reloaded.bert.encoder.layer[0].attention.self.query, PackedLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, q_logits)

    # The file alone restores every tensor: a randomly initialised model becomes the same model.
    torch.manual_seed(123)
    other = transformers.BertForSequenceClassification(model.config).eval()
    load_quantized_(other, tmp_path)
    with torch.no_grad():
        assert torch.equal(other(**inputs).logits, q_logits)


def test_load_reads_format_1_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    codes = torch.randint(-7, 8, (4, 5), dtype=torch.int8)
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    u = torch.nn.functional.pad(u, (0, 1), value=8)
    save_file(
        {
            "0.qweight": (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(),
            "0.scale": torch.full((4,), 0.5),
            "0.bias": torch.zeros(4),
        },
        str(tmp_path / "quantized_weights.safetensors"),
    )
    (tmp_path / "quantization_config.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "modules": {
                    "0": {
                        "bits": 4,
                        "granularity": "per_channel",
                        "in_features": 5,
                        "out_features": 4,
                        "bias": True,
                    }
                },
            }
        )
    )
    model = nn.Sequential(nn.Linear(5, 4))
    assert load_quantized_(model, tmp_path) == ["0"]
    assert torch.equal(model[0].codes(), codes) and torch.equal(model[0].dequantize(), codes.float() * 0.5)


def test_load_rejects_mismatched_architecture(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    convert_(model, cfg=QuantConfig(bits=4, targets="0"))
    save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_quantized_(nn.Sequential(nn.Linear(4, 7), nn.Linear(7, 2)), tmp_path)


def test_lightning_resume_restores_lsq_steps_and_activation_ranges(tmp_path):
    """A QAT fit checkpointed mid-way and resumed on a fresh float model continues with the learned steps."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

    class Peek(L.Callback):
        def on_train_start(self, trainer, pl_module):
            m = pl_module.model[0]
            self.start = (
                m.weight_fake_quantizer.step.detach().clone(),
                m.activation_fake_quantizer.amax.clone(),
            )

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.randn(32, 6, generator=g), torch.randint(0, 2, (32,), generator=g)
        ),
        batch_size=8,
    )
    cfg = QuantConfig(bits=4, observer="lsq", act_bits=8, targets=["0"])
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    first = Tiny()
    trainer = L.Trainer(max_steps=3, callbacks=[QuantizationAware("quantize", cfg)], **kw)
    trainer.fit(first, data)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    trained = first.model[0]
    assert not torch.equal(trained.weight_fake_quantizer.step, LSQWeightQuantizer(cfg, trained.weight).step)

    peek = Peek()
    L.Trainer(max_steps=4, callbacks=[QuantizationAware("quantize", cfg), peek], **kw).fit(
        Tiny(), data, ckpt_path=tmp_path / "mid.ckpt"
    )
    assert torch.equal(peek.start[0], trained.weight_fake_quantizer.step.detach())
    assert torch.equal(peek.start[1], trained.activation_fake_quantizer.amax)


def test_the_output_projection_of_multihead_attention_is_left_out_with_a_warning(caplog):
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj: a fake quantizer there
    trained nothing (2-bit 'quantization' changed no logit) and the packed layer broke the forward."""
    from torch import nn

    from dpq.quant import QuantConfig, convert_, prepare_qat_

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.ffn = nn.Linear(16, 16)

        def forward(self, x):
            return self.ffn(self.self_attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    enc = Block().eval()
    x = torch.randn(2, 5, 16)
    with caplog.at_level("WARNING", logger="dpq.quant.fake"):
        names = prepare_qat_(enc, QuantConfig(bits=4, targets="re:.*", quantize_head=True))
    assert names == ["ffn"]
    assert any("self_attn.out_proj" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        fake = enc(x)
    convert_(enc)
    with torch.no_grad():
        assert torch.allclose(enc(x), fake, atol=1e-5)
    # the quantize stage names its targets itself (prepare_qat_ then takes them as given): left out there too
    from dpq.stages.quantize import QuantizeStage

    stage = QuantizeStage.from_config("quantize", {"targets": "re:.*", "quantize_head": True})
    _, staged = stage.targets_of(Block(), {})
    assert staged == ["ffn"]


def test_the_classifier_head_is_the_layer_that_gives_the_logits_wherever_it_is_registered():
    """XLM-RoBERTa registers its classifier before its encoder: the last nn.Linear in module order was an
    encoder layer's output.dense, left unquantized as "the head" while the real head was quantized."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    from dpq.quant.fake import head_names

    kw = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    xlmr = XLMRobertaForSequenceClassification(XLMRobertaConfig(**kw, num_labels=3))
    assert head_names(xlmr) == ["classifier.out_proj"]
    assert head_names(BertForSequenceClassification(BertConfig(**kw, num_labels=2))) == ["classifier"]
    assert head_names(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))) == ["1"]  # no config: the last
