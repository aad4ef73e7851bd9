"""Behaviour tests for dpq.cost: the numbers must match independent references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpq import cost

BERT_CFG = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3))


class FeatureModel(nn.Module):
    """Plain module called as model(features=...)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)


class FakeQuantizedLinear(nn.Module):
    """Test double for dpq.quant.packed.QuantizedLinear: int8 codes + per-row scale."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        codes = torch.round(w / scale).to(torch.int8)
        codes[codes == 0] = 1  # keep the double's sparsity fully controlled by the tests
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.squeeze(1).clone())
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]

    def nonzero_weights(self) -> int:
        return int(torch.count_nonzero(self.codes))

    def storage_bytes(self) -> int:
        # pretend 4-bit packing: half a byte per weight, fp16 scales, fp32 bias
        return self.codes.numel() // 2 + self.scale.numel() * 2 + self.bias.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)


def _bert(attn: str | None = None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kw = dict(BERT_CFG)
    if attn is not None:
        kw["attn_implementation"] = attn
    return transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2, **kw)).eval()


def _zero_half(lin: nn.Module) -> int:
    with torch.no_grad():
        w = lin.weight.view(-1)
        n = w.numel() // 2
        w[::2][:n] = 0.0
    return n


# --------------------------------------------------------------------------- flops


def test_mlp_dense_flops_equal_analytic_macs():
    model = FeatureModel(_mlp())
    x = cost.example_inputs_for("features", batch_size=5, seq_len=None, num_features=16, vocab_size=None)
    out = cost.flops(model, x)
    macs = 5 * (16 * 32 + 32 * 24 + 24 * 3)
    assert out["dense_gflops"] * 1e9 == pytest.approx(macs, abs=1e-6)
    assert out["effective_gflops"] == pytest.approx(out["dense_gflops"])
    assert out["flops_convention"] == cost.FLOPS_CONVENTION


def test_effective_flops_halve_when_half_of_each_linear_is_zero():
    model = FeatureModel(_mlp())
    x = {"features": torch.randn(4, 16)}
    dense = cost.flops(model, x)["dense_gflops"]
    for m in model.modules():
        if isinstance(m, nn.Linear):
            _zero_half(m)
    out = cost.flops(model, x)
    assert out["dense_gflops"] == pytest.approx(dense)
    assert out["effective_gflops"] == pytest.approx(dense / 2, rel=1e-12)


def test_bert_effective_flops_scale_only_the_linear_part():
    model = _bert()
    x = cost.example_inputs_for("text", 2, 16, None, 100)
    # independent linear MAC count via forward hooks
    linear_macs = []
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: linear_macs.append(
                inp[0].numel() // mod.in_features * mod.in_features * mod.out_features
            )
        )
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model(**x)
    for h in hooks:
        h.remove()
    linear = sum(linear_macs)
    before = cost.flops(model, x)
    assert before["linear_dense_gflops"] * 1e9 == pytest.approx(linear)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            _zero_half(m)
    after = cost.flops(model, x)
    assert after["dense_gflops"] == pytest.approx(before["dense_gflops"])
    assert after["effective_gflops"] * 1e9 == pytest.approx(
        before["dense_gflops"] * 1e9 - linear / 2, rel=1e-9
    )
    assert 0 < after["effective_gflops"] < after["dense_gflops"]


def test_bert_flops_match_flop_counter_mode():
    """SDPA handle cross-check against torch's own counter (2 flops per MAC).

    On CPU, SDPA dispatches to ``_scaled_dot_product_flash_attention_for_cpu``,
    which FlopCounterMode does not register, so we map it to torch's own
    ``sdpa_flop_count``. FlopCounterMode does not count LayerNorm while fvcore
    does (5 flops/element), so normalization is excluded from the comparison.
    """
    from fvcore.nn import FlopCountAnalysis
    from torch.utils import flop_counter as fcm

    model = _bert()
    assert model.config._attn_implementation == "sdpa"
    x = cost.example_inputs_for("text", 2, 16, None, 100)
    ours = cost.flops(model, x)["dense_gflops"] * 1e9

    mapping = {}
    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is not None:
        mapping[cpu_op] = lambda q, k, v, *a, out_shape=None, **kw: fcm.sdpa_flop_count(q, k, v)
    with fcm.FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model(**x)
    ref = counter.get_total_flops() / 2

    wrapper = cost._PositionalWrapper(model, list(x))
    fa = (
        FlopCountAnalysis(wrapper, tuple(x.values()))
        .set_op_handle("aten::scaled_dot_product_attention", cost._sdpa_flop_jit)
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
    )
    by_op = fa.by_operator()
    assert by_op["scaled_dot_product_attention"] > 0  # the handle actually fired
    assert fa.total() == pytest.approx(ours)
    norm = sum(v for k, v in by_op.items() if "norm" in k)
    assert ours - norm == pytest.approx(ref, rel=0.02)

    # the SDPA handle counts exactly what fvcore counts for the eager matmuls
    eager = _bert("eager")
    assert cost.flops(eager, x)["dense_gflops"] == pytest.approx(cost.flops(model, x)["dense_gflops"])


def test_quantized_linear_flops_equal_float_model():
    float_model = FeatureModel(_mlp())
    q_model = FeatureModel(_mlp())
    q_model.body[2] = FakeQuantizedLinear(q_model.body[2])
    x = {"features": torch.randn(3, 16)}
    assert cost.flops(q_model, x)["dense_gflops"] == pytest.approx(cost.flops(float_model, x)["dense_gflops"])


# --------------------------------------------------------------------------- params / sparsity / size


def test_parameter_counts_drop_by_zeroed_weights_and_dedupe_tied():
    model = FeatureModel(_mlp())
    before = cost.parameter_counts(model)
    total = sum(p.numel() for p in model.parameters())
    assert before == {"params_total": total, "params_nonzero": total}
    zeroed = _zero_half(model.body[0]) + _zero_half(model.body[2])
    after = cost.parameter_counts(model)
    assert after["params_total"] == total
    assert after["params_nonzero"] == total - zeroed

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    assert cost.parameter_counts(Tied())["params_total"] == 40
    assert cost.size_bytes(Tied())["size_bytes"] == 40 * 4


def test_sparsity_pooled_and_per_layer():
    model = FeatureModel(_mlp())
    _zero_half(model.body[0])
    q = FakeQuantizedLinear(model.body[2])
    with torch.no_grad():
        q.codes[:, :8] = 0  # 24 rows * 8 of 32 cols -> exactly 1/4 zero
    model.body[2] = q
    out = cost.sparsity(model, ["body.0", "body.2", "body.4"])
    assert out["per_layer"]["body.0"] == pytest.approx(0.5)
    assert out["per_layer"]["body.2"] == pytest.approx(0.25)
    assert out["per_layer"]["body.4"] == 0.0
    zeros = 16 * 32 / 2 + 24 * 8
    assert out["sparsity"] == pytest.approx(zeros / (16 * 32 + 32 * 24 + 24 * 3))


def test_size_bytes_float_bert_equals_unique_state_dict():
    model = _bert()
    sd = model.state_dict()
    unique = {t.data_ptr(): t for t in sd.values()}
    expected = 4 * sum(t.numel() for t in unique.values())
    out = cost.size_bytes(model)
    assert out["size_bytes"] == expected
    assert out["size_breakdown"] == {"float": expected, "quantized": 0}
    # non-persistent buffers (not saved) must not be counted
    np_bufs = {n for n, _ in model.named_buffers()} - set(sd)
    assert all(n not in sd for n in np_bufs)


def test_quantized_module_counted_via_storage_bytes():
    model = FeatureModel(_mlp())
    q = FakeQuantizedLinear(model.body[2])
    model.body[2] = q
    out = cost.size_bytes(model)
    float_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if not n.startswith("body.2."))
    assert out["size_breakdown"] == {"float": float_bytes, "quantized": q.storage_bytes()}
    assert out["size_bytes"] == float_bytes + q.storage_bytes()

    counts = cost.parameter_counts(model)
    total = 16 * 32 + 32 + 32 * 24 + 24 + 24 * 3 + 3
    assert counts["params_total"] == total
    with torch.no_grad():
        q.codes[0].zero_()
    assert cost.parameter_counts(model)["params_nonzero"] == total - 32


# --------------------------------------------------------------------------- latency / inputs / measure


def test_latency_positive_and_restores_training_mode():
    model = FeatureModel(_mlp()).train()
    model.body[1].eval()  # mixed flags must come back exactly
    x = {"features": torch.randn(2, 16)}
    out = cost.latency(model, x, warmup=1, repeats=7)
    assert 0 < out["latency_ms_median"] <= out["latency_ms_p90"]
    assert out["latency_ms_min"] <= out["latency_ms_median"]
    assert out["device"] == "cpu" and out["threads"] == torch.get_num_threads()
    assert (out["warmup"], out["repeats"], out["batch_size"], out["seq_len"]) == (1, 7, 2, None)
    assert model.training and model.body[0].training and not model.body[1].training
    assert all(p.grad is None for p in model.parameters())


def test_example_inputs_deterministic():
    a = cost.example_inputs_for("text", 2, 8, None, 30522)
    b = cost.example_inputs_for("text", 2, 8, None, 30522)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert a["input_ids"].shape == (2, 8) and a["input_ids"].min() >= 1000 and a["input_ids"].max() < 30522
    assert torch.equal(a["attention_mask"], torch.ones(2, 8, dtype=torch.long))
    small = cost.example_inputs_for("text", 2, 8, None, 50)["input_ids"]
    assert small.min() >= 0 and small.max() < 50
    f = cost.example_inputs_for("features", 3, None, 7, None)
    assert f["features"].shape == (3, 7) and f["features"].dtype == torch.float32
    with pytest.raises(ValueError):
        cost.example_inputs_for("image", 1, None, None, None)


def test_measure_bert_entry_point():
    model = _bert().train()
    x = cost.example_inputs_for("text", 2, 16, None, 100)
    prunable = ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.output.dense"]
    _zero_half(model.bert.encoder.layer[0].intermediate.dense)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    out = cost.measure(model, x, prunable, latency_kwargs={"warmup": 1, "repeats": 3})
    for key in (
        "params_total",
        "params_nonzero",
        "sparsity",
        "sparsity_per_layer",
        "dense_gflops",
        "effective_gflops",
        "flops_convention",
        "size_bytes",
        "size_breakdown",
        "latency_ms_median",
        "latency_ms_p90",
        "device",
        "threads",
        "batch_size",
        "seq_len",
        "bops",
        "dense_bops",
        "bops_convention",
        "peak_memory_bytes",
        "peak_activation_bytes",
        "peak_memory_method",
    ):
        assert key in out, key
    assert out["sparsity"] == pytest.approx(0.25)
    assert out["sparsity_per_layer"][prunable[0]] == pytest.approx(0.5)
    assert out["effective_gflops"] < out["dense_gflops"]
    assert out["seq_len"] == 16 and out["batch_size"] == 2
    assert model.training
    assert n_hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------- known layers vs hand formulas


class SelfAttention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (what HF's sdpa path calls)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, n, d = features.shape
        q, k, v = self.qkv(features).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(b, n, d))


def _flop_counter_macs(model: nn.Module, x: dict) -> float:
    """torch.utils.flop_counter.FlopCounterMode total / 2: it counts 2 flops per multiply-add, fvcore 1.

    On CPU, SDPA dispatches to ``_scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode
    does not register; it is mapped to torch's own ``sdpa_flop_count``.
    """
    from torch.utils import flop_counter as fcm

    mapping = {}
    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is not None:
        mapping[cpu_op] = lambda q, k, v, *a, out_shape=None, **kw: fcm.sdpa_flop_count(q, k, v)
    with fcm.FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model(**x)
    return counter.get_total_flops() / 2


# (model, input shape, hand-counted multiply-adds, of which in Linear/Conv layers)
KNOWN_LAYERS = {
    "linear": (lambda: nn.Linear(16, 8), (4, 10, 16), 4 * 10 * 16 * 8, 4 * 10 * 16 * 8),
    "conv2d": (
        lambda: nn.Conv2d(3, 6, 3, padding=1),
        (2, 3, 8, 8),
        2 * 6 * 8 * 8 * 3 * 3 * 3,
        2 * 6 * 8 * 8 * 3 * 3 * 3,
    ),
    # groups=3: each output channel sees 6/3 input channels; no padding -> 6x6 output
    "conv2d_grouped": (
        lambda: nn.Conv2d(6, 6, 3, groups=3),
        (2, 6, 8, 8),
        2 * 6 * 6 * 6 * 2 * 9,
        2 * 6 * 6 * 6 * 2 * 9,
    ),
    # B=2, L=12, d=16, 2 heads: qkv + out projections 4*B*L*d^2; QK^T and AV each B*L*L*d
    "attention": (
        lambda: SelfAttention(16, 2),
        (2, 12, 16),
        4 * 2 * 12 * 16 * 16 + 2 * 2 * 12 * 12 * 16,
        4 * 2 * 12 * 16 * 16,
    ),
}


@pytest.mark.parametrize("name", list(KNOWN_LAYERS))
def test_flops_of_known_layers_match_hand_formula_and_flop_counter_mode(name):
    make, shape, macs, layer_macs = KNOWN_LAYERS[name]
    torch.manual_seed(0)
    model = FeatureModel(make()).eval()
    x = {"features": torch.randn(*shape)}
    out = cost.flops(model, x)
    assert out["dense_gflops"] * 1e9 == pytest.approx(macs, abs=1e-6)  # fvcore: 1 MAC = 1 flop
    assert _flop_counter_macs(model, x) == pytest.approx(macs, abs=1e-6)  # torch: 2 flops per MAC
    assert cost.bops(model, x)["macs"] == layer_macs  # the BOPs hooks see the same layer MACs


def test_bops_multiply_nonzero_macs_by_weight_and_activation_bits():
    model = FeatureModel(_mlp())
    x = {"features": torch.randn(5, 16)}
    macs = 5 * (16 * 32 + 32 * 24 + 24 * 3)
    out = cost.bops(model, x)
    assert (out["macs"], out["nonzero_macs"]) == (macs, macs)
    assert out["bops"] == out["dense_bops"] == macs * 32 * 32
    assert out["bops_convention"] == cost.BOPS_CONVENTION

    zeroed = _zero_half(model.body[0])  # only MACs with a non-zero weight count
    out = cost.bops(model, x)
    assert out["nonzero_macs"] == macs - 5 * zeroed and out["bops"] == (macs - 5 * zeroed) * 32 * 32
    assert out["dense_bops"] == macs * 32 * 32

    # a packed low-bit layer declaring `bits` (as dpq.quant's do), float activations: 4 x 32 for its MACs
    q = FakeQuantizedLinear(model.body[2])
    q.bits = 4
    model.body[2] = q
    nz2 = q.nonzero_weights()
    out = cost.bops(model, x)
    first = 5 * (16 * 32 - zeroed) * 32 * 32
    last = 5 * 24 * 3 * 32 * 32
    assert out["bops"] == first + 5 * nz2 * 4 * 32 + last

    # another quantizer's attributes win: 2-bit weights, 8-bit activations
    q.weight_bits, q.act_bits = 2, 8
    assert cost.bops(model, x)["bops"] == first + 5 * nz2 * 2 * 8 + last


def test_bops_half_precision_and_pruned_grouped_conv():
    model = FeatureModel(_mlp()).to(torch.bfloat16)
    x = {"features": torch.randn(2, 16, dtype=torch.bfloat16)}
    macs = 2 * (16 * 32 + 32 * 24 + 24 * 3)
    assert cost.bops(model, x)["bops"] == macs * 16 * 16

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, groups=3)
    with torch.no_grad():
        conv.weight[0].zero_()  # one whole output channel pruned: 2*9 weights
        conv.weight[1, 0, 0, 0] = 0.0
    nnz = conv.weight.numel() - 18 - 1
    out = cost.bops(FeatureModel(conv), {"features": torch.randn(2, 6, 8, 8)})
    positions = 2 * 6 * 6  # batch x output height x width
    assert out["nonzero_macs"] == positions * nnz and out["bops"] == positions * nnz * 32 * 32


def test_peak_memory_counts_the_weights_packed_keeps_dequantized():
    from dpq.quant import QuantConfig, convert_, prepare_qat_

    torch.manual_seed(0)
    model = FeatureModel(nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10)))
    convert_(model, backend="packed", names=prepare_qat_(model, QuantConfig(bits=4, targets="re:body.*")))
    x = {"features": torch.randn(8, 256)}
    stored = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    out = cost.peak_memory(model, x)  # its warm-up call fills the cache: float weights held from then on
    from dpq.quant.packed import quantized_modules

    packed = quantized_modules(model)
    assert [n for n, _ in packed] == ["body.0"]  # the head (last Linear) stays float: quantize_head=False
    floats = sum(m.in_features * m.out_features * 4 for _, m in packed)
    assert out["peak_memory_bytes"] - out["peak_activation_bytes"] == stored + floats + 8 * 256 * 4


def test_peak_memory_cpu_counts_resident_weights_and_live_activations(capfd):
    torch.manual_seed(0)
    model = FeatureModel(nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10)))
    params = sum(p.numel() for p in model.parameters()) * 4
    peaks = {}
    for batch in (32, 64):
        x = {"features": torch.randn(batch, 256)}
        out = cost.peak_memory(model, x)
        assert out["peak_memory_bytes"] - out["peak_activation_bytes"] == params + batch * 256 * 4
        hidden = batch * 1024 * 4  # linear output and ReLU output are both alive at the peak
        assert 2 * hidden <= out["peak_activation_bytes"] <= 2 * hidden + batch * 10 * 4 + 4096
        assert (
            out["peak_memory_method"] == cost.PEAK_MEMORY_METHODS["cpu"]
            and out["peak_memory_device"] == "cpu"
        )
        peaks[batch] = out["peak_activation_bytes"]
    assert peaks[64] == pytest.approx(2 * peaks[32], rel=0.05)
    assert "USDT" not in capfd.readouterr().err  # the native profiler banner is filtered


def test_latency_is_reproducible_within_its_reported_spread():
    """Two measurements agree within their own spread (p90 - min) plus a margin for a shared machine."""
    torch.manual_seed(0)
    model = FeatureModel(
        nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    )
    x = {"features": torch.randn(16, 256)}
    attempts = []
    for _ in range(3):  # other processes share the 2 cores: a burst of load may hit one pair
        a, b = (cost.latency(model, x, warmup=5, repeats=40) for _ in range(2))
        spread = max(a["latency_ms_p90"] - a["latency_ms_min"], b["latency_ms_p90"] - b["latency_ms_min"])
        gap = abs(a["latency_ms_median"] - b["latency_ms_median"])
        attempts.append((gap, spread, a["latency_ms_median"], b["latency_ms_median"]))
        if gap <= spread + 0.25 * min(a["latency_ms_median"], b["latency_ms_median"]):
            break
    else:
        pytest.fail(f"latency medians disagree beyond their spread: {attempts}")
    assert a["latency_ms_min"] <= a["latency_ms_median"] <= a["latency_ms_p90"]


def test_every_measured_number_has_a_unit():
    model = FeatureModel(_mlp())
    out = cost.measure(
        model, {"features": torch.randn(2, 16)}, ["body.0"], latency_kwargs={"warmup": 1, "repeats": 3}
    )
    conditions = {"threads", "warmup", "repeats", "batch_size", "seq_len"}
    numeric = {k for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric - conditions <= set(cost.UNITS), numeric - conditions - set(cost.UNITS)
    assert {"bops", "dense_bops", "peak_memory_bytes", "peak_activation_bytes"} <= numeric
    assert out["bops_convention"] == cost.BOPS_CONVENTION and out["peak_memory_method"]


def test_interleaved_latency_cycles_through_the_models_each_round():
    """Noise must hit every compared model alike: warm-up for all, then round after round of each in turn."""
    calls = []

    class Tag(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.lin = name, nn.Linear(16, 16)

        def forward(self, features):
            calls.append(self.name)
            return self.lin(features)

    models = {"small": Tag("small"), "big": Tag("big")}
    x = {"features": torch.randn(64, 16)}
    t = cost.interleaved_latency(models, x, rounds=3, per_round=2, warmup=1)
    assert calls == ["small", "big"] + ["small", "small", "big", "big"] * 3
    assert {k: len(v) for k, v in t.items()} == {"small": 6, "big": 6}
    assert all(
        v > 0 for vs in t.values() for v in vs
    )  # (which is faster is a benchmark's question, not a test's)


def test_interleaved_latency_times_models_in_eval_mode_and_restores_their_flags():
    """A model left in training mode would time its dropout (and differ from the model deployed)."""
    modes = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)

        def forward(self, features):
            modes.append((self.training, self.drop.training))
            return self.drop(self.lin(features))

    trained, frozen = Spy().train(), Spy().train()
    frozen.lin.eval()  # a mixed state, to be given back as it was
    cost.interleaved_latency({"a": trained, "b": frozen}, {"features": torch.randn(4, 8)}, 2, 1, 1)
    assert modes and all(m == (False, False) for m in modes)
    assert trained.training and trained.drop.training and trained.lin.training
    assert frozen.training and not frozen.lin.training

    class Session:  # a model that is no nn.Module, as dpq.export's OrtModel (an ONNX Runtime session)
        def __call__(self, features):
            modes.append("session")
            return features

    modes.clear()
    cost.interleaved_latency({"ort": Session(), "a": trained}, {"features": torch.randn(4, 8)}, 2, 1, 1)
    assert modes.count("session") == 3 and (False, False) in modes


def test_norms_are_counted_as_fvcore_estimates_them_and_stay_dense_in_effective_flops():
    """Not multiply-adds: fvcore counts LayerNorm at 5 flops per element, BatchNorm in eval at 2; the
    units say so, and zeroed weights leave them whole."""
    model = FeatureModel(
        nn.Sequential(
            nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 24), nn.BatchNorm1d(24), nn.Linear(24, 3)
        )
    )
    _zero_half(model.body[0])
    out = cost.flops(model, {"features": torch.randn(4, 16)})
    norms = 4 * 32 * 5 + 4 * 24 * 2
    assert out["dense_gflops"] * 1e9 == pytest.approx(4 * (16 * 32 + 32 * 24 + 24 * 3) + norms)
    assert (out["effective_gflops"] - out["linear_effective_gflops"]) * 1e9 == pytest.approx(norms)
    assert "LayerNorm 5" in cost.UNITS["dense_gflops"] and "BatchNorm 2" in cost.UNITS["dense_gflops"]


def test_multihead_attention_fast_path_is_counted_as_its_slow_path():
    """In eval mode without grad nn.MultiheadAttention runs one fused op fvcore does not know: the whole
    block counted 0 flops. Counted as the projections and matmuls its slow path traces."""
    from fvcore.nn import FlopCountAnalysis

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(32, 2, batch_first=True), nn.Linear(32, 2)

        def forward(self, features):
            return self.head(self.attn(features, features, features)[0])

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(2, 16, 32)
    slow = FlopCountAnalysis(model, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert slow.total() == 2 * 16 * (4 * 32 * 32 + 2 * 16 * 32) + 2 * 16 * 32 * 2  # grad on: the slow path
    assert cost.flops(model, {"features": x})["dense_gflops"] * 1e9 == pytest.approx(slow.total())
