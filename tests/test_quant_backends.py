"""Real low-bit backends: agreement with the fake-quant model, exact zeros, export, bad combinations."""

import copy

import pytest
import torch
from torch import nn

from dpq import cost
from dpq.core.errors import ConfigError
from dpq.quant import (
    BACKENDS,
    QuantConfig,
    check_zeros_kept,
    convert_,
    load_quantized_,
    prepare_qat_,
    resolve_scheme,
    safetensors_data_bytes,
    save_quantized,
    zero_positions,
)
from dpq.quant.backends import check_device, check_keeps_zeros

ENCODER = r"re:.*encoder\.layer\.\d+\..*"


def pruned_bert(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.BertForSequenceClassification(cfg).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in n]
    for n in names:  # 50% magnitude pruning
        w = model.get_submodule(n).weight.data
        w.mul_(w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    return model, names


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (4, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, seed=1):
    with torch.no_grad():
        return model(**inputs(seed)).logits


CPU_CASES = [  # (backend, scheme, bits, act_bits, granularity, symmetric)
    ("packed", None, 4, None, "per_channel", True),
    ("packed", None, 3, 8, "per_group", False),
    ("cpu_int8", None, 8, 8, "per_channel", True),  # static activation range: matches to float rounding
    ("cpu_int8", None, 4, None, "per_channel", False),  # dynamic per-token activations
    ("cpu_int8", None, 2, 8, "per_tensor", True),
    ("torchao", "int8_weight_only", 8, None, "per_channel", True),
    ("torchao", "int8_weight_only", 8, None, "per_group", True),
    ("torchao", "int8_dynamic", 8, None, "per_channel", True),
]


@pytest.mark.parametrize("backend,scheme,bits,act_bits,granularity,symmetric", CPU_CASES)
def test_convert_agrees_with_fake_quant_keeps_zeros_and_reloads(
    tmp_path, backend, scheme, bits, act_bits, granularity, symmetric
):
    model, names = pruned_bert()
    float_model = copy.deepcopy(model)
    cfg = QuantConfig(
        bits=bits,
        act_bits=act_bits,
        granularity=granularity,
        group_size=32,
        symmetric=symmetric,
        targets=ENCODER,
    )
    s = resolve_scheme(backend, scheme, cfg, "quant")
    prepare_qat_(model, cfg)
    model.train()
    for seed in range(3):  # QAT-style forwards: the activation ranges are observed
        model(**inputs(10 + seed))
    model.eval()
    fake = logits(model)
    zeros = zero_positions(model, names)
    assert convert_(model, backend=backend, scheme=scheme) == names
    assert all(type(model.get_submodule(n)).backend == backend for n in names)
    assert type(model.classifier) is nn.Linear  # the head stays float
    report = check_zeros_kept(model, zeros, "conversion")
    assert (
        sum(r["zeros_before"] for r in report.values())
        >= sum(m.weight.numel() for m in [float_model.get_submodule(n) for n in names]) // 2
    )
    real = logits(model)
    rel = float((real - fake).abs().max() / fake.abs().max())
    tolerance = 1e-4 if backend == "cpu_int8" and act_bits else s.tolerance
    assert rel <= tolerance, (backend, scheme, rel)
    if backend == "packed":
        assert torch.equal(real, fake)
    for n in names:
        m = model.get_submodule(n)
        assert m.weight_bits == bits and m.act_bits == (
            8 if backend == "cpu_int8" or scheme == "int8_dynamic" else act_bits
        )

    path = save_quantized(model, tmp_path)
    assert safetensors_data_bytes(path) == cost.size_bytes(model)["size_bytes"]
    load_quantized_(float_model, tmp_path)  # the unquantized model becomes the converted one
    assert torch.equal(logits(float_model), real)
    assert torch.equal(logits(float_model, 7), logits(model, 7))


def test_cpu_int8_runs_integer_matmuls(monkeypatch):
    """On a CPU with int8 instructions (AMX here, by its probe) the product is torch._int_mm's."""
    from torchao.kernel import intmm

    monkeypatch.setattr(intmm, "_cpu_is_amx_tile_supported", lambda: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 2))
    prepare_qat_(model, QuantConfig(bits=4, act_bits=8, targets="0"))
    model.train()
    model(torch.randn(8, 16))
    convert_(model, backend="cpu_int8")
    calls = []
    real_int_mm = torch._int_mm

    def spy(a, b):
        calls.append((a.dtype, b.dtype))
        out = real_int_mm(a, b)
        assert out.dtype == torch.int32
        return out

    monkeypatch.setattr(torch, "_int_mm", spy)
    model.eval()(torch.randn(3, 16))
    assert calls == [(torch.int8, torch.int8)]
    assert model[0].w_int8_t.dtype == torch.int8 and model[0].qweight.dtype == torch.uint8


def test_sizes_follow_the_bit_width():
    torch.manual_seed(0)
    sizes = {}
    for bits in (2, 3, 4, 8):
        model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 2))
        convert_(model, cfg=QuantConfig(bits=bits, targets="0"))
        sizes[bits] = model[0].storage_bytes() - 32 * 4  # minus the float32 scales
    assert sizes == {2: 64 * 32 // 4, 3: 64 * 32 * 3 // 8, 4: 64 * 32 // 2, 8: 64 * 32}


# ---------------------------------------------------------------- bad combinations


def _err(backend, scheme=None, **kw):
    with pytest.raises(ConfigError) as e:
        resolve_scheme(backend, scheme, QuantConfig(**kw), "pipeline.stages.quantize")
    return e.value


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_bnb_on_cpu_fails_before_training_with_a_clear_message(make_cfg):
    from omegaconf import OmegaConf

    from dpq.run.validate import validate

    for scheme in ("nf4", "fp4", "int8"):
        e = _err("bnb", scheme, bits=8 if scheme == "int8" else 4)
        assert e.key == "pipeline.stages.quantize.backend" and e.value == "bnb"
        assert "runs on cuda only" in str(e) and "packed, cpu_int8, torchao" in str(e)
    cfg = make_cfg("experiment=digits", "pipeline.stages.quantize.backend=bnb")
    with pytest.raises(ConfigError, match=r"pipeline\.stages\.quantize\.backend='bnb'.*cuda only"):
        validate(OmegaConf.to_container(cfg, resolve=True))
    e = _err("torchao", "int4_weight_only", bits=4, granularity="per_group", group_size=64)
    assert e.key == "pipeline.stages.quantize.backend" and "cuda only" in str(e)


@pytest.mark.parametrize(
    "backend,scheme,kw,key,message",
    [
        ("torchao", None, dict(bits=3), "bits", "3-bit weights run with backend packed"),
        ("bnb", None, dict(bits=3), "bits", "3-bit weights run with backend packed"),
        ("torchao", "int8_dynamic", dict(bits=4), "bits", "stores 8-bit weights"),
        ("torchao", "int8_weight_only", dict(bits=8, symmetric=False), "symmetric", "symmetric only"),
        (
            "torchao",
            "int8_dynamic",
            dict(bits=8, granularity="per_group"),
            "granularity",
            "per_tensor, per_channel",
        ),
        ("cpu_int8", None, dict(bits=4, granularity="per_group"), "granularity", "per_tensor, per_channel"),
        (
            "torchao",
            "int4_weight_only",
            dict(bits=4, granularity="per_group", group_size=48),
            "group_size",
            "32, 64, 128, 256",
        ),
        ("torchao", "fp8", dict(bits=8), "scheme", "int8_weight_only, int8_dynamic, int4_weight_only"),
        # QAT on int8 activations that a weight-only layer never sees (it computed 0.8% off, 157% off range)
        ("torchao", "int8_weight_only", dict(bits=8, act_bits=8), "act_bits", "is weight-only"),
        ("bnb", "nf4", dict(bits=4, act_bits=8), "act_bits", "is weight-only"),
        ("tensorrt", None, dict(), "backend", "packed, cpu_int8, torchao, bnb"),
    ],
)
def test_unsupported_combinations_name_key_and_alternatives(backend, scheme, kw, key, message):
    e = _err(backend, scheme, **kw)
    assert e.key == f"pipeline.stages.quantize.{key}"
    assert message in str(e)


def test_device_and_zero_keeping_rules():
    s = resolve_scheme("cpu_int8", None, QuantConfig(bits=8), "q")
    with pytest.raises(ConfigError, match=r"runs on cpu, but trainer\.accelerator .* is cuda"):
        check_device("cpu_int8", s, "cuda", "q", "trainer.accelerator (where the model is evaluated)")
    check_device("cpu_int8", s, "cpu", "q", "x")
    int4 = BACKENDS["torchao"].scheme("int4_weight_only")
    with pytest.raises(ConfigError, match="does not keep exact zeros.*prune"):
        check_keeps_zeros("torchao", int4, ["prune"], "q")
    check_keeps_zeros("torchao", int4, [], "q")
    assert all(
        s.preserves_zeros for b in BACKENDS.values() for s in b.schemes if s.name != "int4_weight_only"
    )


# ---------------------------------------------------------------- bitsandbytes (needs the optional package)


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
def test_bnb_conversion_keeps_zeros_and_round_trips(tmp_path, scheme):
    """bitsandbytes >= 0.49 also has CPU kernels, so its conversion code is exercised here when installed
    (the dpq backend itself is declared CUDA-only); skipped where bitsandbytes is absent."""
    pytest.importorskip("bitsandbytes")
    from dpq.quant import bnb

    model, names = pruned_bert()
    float_model = copy.deepcopy(model)
    prepare_qat_(model, QuantConfig(bits=8 if scheme == "int8" else 4, targets=ENCODER))
    fake = logits(model)
    zeros = zero_positions(model, names)
    bnb.convert_(model, names, scheme, "per_channel", 128, device="cpu")
    assert (
        all(isinstance(model.get_submodule(n), bnb.BnbLinear) for n in names)
        and type(model.classifier) is nn.Linear
    )
    check_zeros_kept(model, zeros, f"bnb {scheme}")
    real = logits(model)
    assert float((real - fake).abs().max() / fake.abs().max()) <= BACKENDS["bnb"].scheme(scheme).tolerance
    path = save_quantized(model, tmp_path)
    assert safetensors_data_bytes(path) == cost.size_bytes(model)["size_bytes"]
    bits = 4 if scheme != "int8" else 8
    for n in names:  # the weight itself is stored at 4 (8) bits; absmax, code books and bias come on top
        packed = model.get_submodule(n).packed_tensors()["weight"]
        assert (
            packed.numel() * packed.element_size() * 8 == float_model.get_submodule(n).weight.numel() * bits
        )
    load_quantized_(float_model, tmp_path)
    assert torch.equal(logits(float_model), real)


def test_cpu_int8_products_are_exact_whichever_kernel_the_cpu_has(monkeypatch):
    """AMX (s8 x s8), AVX512-VNNI (u8 x s8, as torchao runs it) and, without either, float32 SGEMM over
    K chunks of 1024: the same int32 product bit for bit, so a model's output cannot depend on the CPU.
    K = 1536 of extreme codes sums past 2**24, where a single float32 product would round."""
    from torchao.kernel import intmm

    from dpq.quant import cpu_int8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1536, generator=g)
    x[0] = -10.0  # one row of -128 codes against a column of -128 weights: 1536 * 16384 > 2**24
    w = torch.randint(-8, 8, (1536, 40), generator=g, dtype=torch.int8)
    w[:, 0] = -128
    scale = torch.rand(40, generator=g) * 0.1 + 0.01
    zp = torch.randint(-3, 3, (40,), generator=g)
    xq = torch.clamp(torch.round(x / (x.abs().amax(-1, keepdim=True) / 127.5)), -128, 127).to(torch.int8)
    exact = xq.long() @ w.long()
    assert int(exact[0, 0]) > 2**24
    outs = {}
    for amx, vnni, kind in (
        (True, False, "s8s8 int8 (AMX)"),
        (False, True, "u8s8 int8 (AVX512-VNNI)"),
        (False, False, "exact float32"),
    ):
        monkeypatch.setattr(intmm, "_cpu_is_amx_tile_supported", lambda a=amx: a)
        monkeypatch.setattr(intmm, "_cpu_is_vnni_supported", lambda v=vnni: v)
        assert cpu_int8.int8_kernel().startswith(kind)
        assert torch.equal(cpu_int8.int_mm(xq, w).long(), exact)
        outs[kind] = (
            cpu_int8.int8_matmul(x, w, scale, None, None),
            cpu_int8.int8_matmul(x, w, scale, zp, torch.tensor(0.03)),
        )
    first = next(iter(outs.values()))
    for o in outs.values():
        assert all(torch.equal(a, b) for a, b in zip(o, first))
    # and the product is the one the codes mean: dynamic per-row int8 inputs times the weight codes
    sx = x.abs().amax(-1, keepdim=True) / 127.5
    want = (torch.round(x * (1.0 / sx)).clamp(-128, 127) * sx) @ (w.float() * scale)
    torch.testing.assert_close(first[0], want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_cpu_int8_keeps_its_float_codes_once_and_peak_memory_counts_them(monkeypatch):
    from torchao.kernel import intmm

    monkeypatch.setattr(intmm, "_cpu_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(intmm, "_cpu_is_vnni_supported", lambda: False)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 2))
    prepare_qat_(m, QuantConfig(bits=8, granularity="per_channel", targets=["0"]))
    convert_(m, backend="cpu_int8")
    x = {"input": torch.randn(4, 64)}

    class Call(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input):
            return self.inner(input)

    model = Call(m).eval()
    before = cost._resident_bytes(model, x)
    with torch.no_grad():
        y1 = model(**x)
        cache = m[0]._w_float_t
        y2 = model(**x)
    assert m[0]._w_float_t is cache and torch.equal(y1, y2)
    assert cost._resident_bytes(model, x) - before == 64 * 32 * 4


def test_layouts_the_conversion_would_refuse_after_qat_are_refused_before_it():
    """Dynamic activation ranges on a conv (packed keeps them on Linear layers only) and torchao per-group
    on a width the group does not divide (a shrunk FFN: 45 inputs) failed at conversion, after QAT."""
    from torch import nn

    from dpq.core.errors import ConfigError
    from dpq.quant import QuantConfig
    from dpq.quant.backends import check_layouts

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(45, 8), nn.Linear(64, 2))
    dyn = QuantConfig(bits=4, act_bits=8, act_range="dynamic")
    with pytest.raises(ConfigError, match=r"q.act_range='dynamic': .* select 1 nn.Conv2d module\(s\) \(0\)"):
        check_layouts("packed", dyn, model, ["0", "2"], "q")
    check_layouts("packed", dyn, model, ["2"], "q")  # linears only: fine
    group = QuantConfig(bits=8, granularity="per_group", group_size=16)
    with pytest.raises(ConfigError, match=r"q.group_size=16: .* 1 target\(s\) have other widths: 2 \(45\)"):
        check_layouts("torchao", group, model, ["2", "3"], "q")
    check_layouts("torchao", group, model, ["3"], "q")
    check_layouts("packed", group, model, ["2", "3"], "q")  # packed pads the last group
