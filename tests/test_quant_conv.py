"""Quantized nn.Conv2d: fake quant against a float64 reference, QAT on the CNN, packed / cpu_int8
conversion, exact zeros, export + reload, cost, config errors for backends without a conv, a pipeline."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dpq import cost
from dpq.checkpoints import load_model, save_model
from dpq.core.errors import ConfigError
from dpq.models import CNNClassifier, native_from_config
from dpq.quant import (
    FakeQuantizedConv2d,
    PackedConv2d,
    QuantConfig,
    calibrate_,
    check_zeros_kept,
    convert_,
    load_quantized_,
    prepare_ptq_,
    prepare_qat_,
    save_quantized,
    zero_positions,
)
from dpq.quant.backends import check_module_kinds
from dpq.quant.conv import weight_matrix
from dpq.quant.cpu_int8 import Int8Conv2d

TARGETS = r"re:blocks\.\d+\.conv|fc\.\d+"  # conf/model/cnn_small.yaml's quant_targets
CONVS = ["blocks.0.conv", "blocks.1.conv", "blocks.2.conv"]


def cnn(seed=0, channels=(4, 8, 8), hidden=(16,)) -> CNNClassifier:
    torch.manual_seed(seed)
    model = CNNClassifier(1, 10, list(channels), list(hidden))
    with torch.no_grad():  # batch norm with non-trivial statistics, so eval logits depend on every layer
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def images(n=4, seed=1) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x)


def observe(model, x, steps=2):
    """Forward passes in training mode, so int8 activation observers see a range (no weight update)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(pixel_values=x)
    model.eval()


def prune_(model) -> dict[str, torch.Tensor]:
    """Filter 0 of every conv zeroed (a pruned channel) plus the smallest 40% of the rest (unstructured)."""
    masks = {}
    with torch.no_grad():
        for n in CONVS:
            w = model.get_submodule(n).weight
            keep = w.abs() > w.abs().flatten().kthvalue(int(w.numel() * 0.4)).values
            keep[0] = False
            w.mul_(keep)
            masks[n] = keep
    return masks


# ----------------------------------------------------------------------------- numerics


def reference(
    w: np.ndarray, bits: int, granularity: str, group: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """float64 quantize-dequantize of a conv weight, written from the affine formulas on its own, and
    where ``w / scale`` is an exact tie (``k + 1/2``, which float32 may round either way).

    Blocks: the whole tensor, one output channel's filter, or ``group`` consecutive weights of a
    filter flattened in (in_channel, kh, kw) order; every range includes 0.
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = w.shape[0]
    flat = w.reshape(out, -1)
    k = flat.shape[1]
    if granularity == "per_tensor":
        ids = np.zeros(flat.shape, dtype=np.int64)
    elif granularity == "per_channel":
        ids = np.repeat(np.arange(out)[:, None], k, axis=1)
    else:
        ids = np.arange(out)[:, None] * 1000 + np.arange(k)[None, :] // group
    deq, tie = np.zeros_like(flat), np.zeros(flat.shape, dtype=bool)
    for b in np.unique(ids):
        sel = ids == b
        lo, hi = min(flat[sel].min(), 0.0), max(flat[sel].max(), 0.0)
        tiny = float(np.finfo(np.float32).tiny)
        if symmetric:
            scale, zp = max(max(-lo, hi) / ((qmax - qmin) / 2), tiny), 0.0
        else:
            scale = max((hi - lo) / (qmax - qmin), tiny)
            zp = float(np.clip(qmin - np.round(lo / scale), qmin, qmax))
        deq[sel] = (np.clip(np.round(flat[sel] / scale) + zp, qmin, qmax) - zp) * scale
        r = np.abs(flat[sel] / scale)
        tie[sel] = np.abs(r - np.floor(r) - 0.5) < 1e-5
    return deq.reshape(w.shape), tie.reshape(w.shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity,group", [("per_tensor", 0), ("per_channel", 0), ("per_group", 8)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_conv_weight_and_output_match_float64_reference(bits, granularity, group, symmetric):
    torch.manual_seed(bits)
    conv = nn.Conv2d(
        6, 8, 3, padding=1, groups=2, bias=True
    )  # filters of 3*3*3 = 27 weights: groups of 8, 8, 8, 3
    with torch.no_grad():
        conv.weight.mul_(torch.rand(8, 1, 1, 1) * 3)  # filters of different ranges
        conv.weight[conv.weight.abs() < 0.05] = 0.0
        conv.weight[3] = 0.0  # an all-zero (pruned) filter
    holder = nn.Sequential(conv)
    cfg = QuantConfig(
        bits=bits,
        granularity=granularity,
        group_size=group or 128,
        symmetric=symmetric,
        targets="0",
        quantize_head=True,
    )
    assert prepare_qat_(holder, cfg) == ["0"]
    fq = holder[0]
    assert isinstance(fq, FakeQuantizedConv2d) and fq.weight is conv.weight
    w = conv.weight.detach()
    q = fq.weight_fake_quantizer(weight_matrix(fq)).reshape(w.shape).detach()
    ref, tie = reference(w.double().numpy(), bits, granularity, group, symmetric)
    # Equal up to float32 rounding of the scale; at an exact tie (|w| / scale = k + 1/2, e.g. a
    # symmetric block's largest |w|) float32 may round the other way: at most one step there.
    diff = np.abs(q.double().numpy() - ref)
    assert diff[~tie].max() <= 1e-6 * np.abs(ref).max() and tie.mean() < 0.2
    assert diff[tie].max(initial=0.0) <= np.abs(ref).max() / (2 ** (bits - 1) - 1) * 1.01
    assert (q[w == 0] == 0).all() and (q[3] == 0).all()  # exact zeros, the pruned filter included
    # The layer computes F.conv2d with that weight and the original geometry.
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        assert torch.allclose(fq(x), F.conv2d(x, q, conv.bias, 1, 1, 1, 2), atol=1e-6)


def test_prepare_qat_on_the_cnn_quantizes_convs_and_fc_not_head_and_trains_the_same_parameters():
    model = cnn()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keys = set(model.state_dict())
    names = prepare_qat_(model, QuantConfig(bits=4, targets=TARGETS, act_bits=8))
    assert names == [*CONVS, "fc.0"]
    assert all(type(model.get_submodule(n)) is FakeQuantizedConv2d for n in CONVS)
    assert type(model.head) is nn.Linear and not hasattr(model.head, "weight_fake_quantizer")
    for n in CONVS:
        m = model.get_submodule(n)
        assert (m.weight_bits, m.act_bits, m.quant_config.bits) == (4, 8, 4)
        assert m.weight is params[f"{n}.weight"]  # the very same Parameter objects ...
    assert [p for g in opt.param_groups for p in g["params"]] == list(
        params.values()
    )  # ... the optimizer trains
    assert keys <= set(model.state_dict())  # weight / bias keys unchanged (quantizer buffers added)

    before = {n: model.get_submodule(n).weight.detach().clone() for n in CONVS}
    model.train()
    x, y = images(8), torch.randint(0, 10, (8,))
    F.cross_entropy(model(pixel_values=x), y).backward()
    for n in CONVS:
        g = model.get_submodule(n).weight.grad
        assert g is not None and g.abs().sum() > 0  # the straight-through estimator reaches the conv weights
    opt.step()
    assert all(not torch.equal(model.get_submodule(n).weight, before[n]) for n in CONVS)


def test_lsq_steps_of_a_conv_get_gradients():
    model = cnn()
    prepare_qat_(model, QuantConfig(bits=4, targets=TARGETS, observer="lsq"))
    model.train()
    F.cross_entropy(model(pixel_values=images(8)), torch.randint(0, 10, (8,))).backward()
    step = model.blocks[1].conv.weight_fake_quantizer.step
    assert step.numel() == 8 and step.grad is not None and step.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize(
    "granularity,symmetric", [("per_channel", True), ("per_group", False), ("per_tensor", False)]
)
def test_packed_conversion_reproduces_fake_quant_logits(act_bits, granularity, symmetric):
    model = cnn()
    prepare_qat_(
        model,
        QuantConfig(
            bits=4,
            granularity=granularity,
            group_size=16,
            symmetric=symmetric,
            act_bits=act_bits,
            targets=TARGETS,
        ),
    )
    x = images()
    observe(model, x)
    fq = logits(model, x)
    assert convert_(model) == [*CONVS, "fc.0"]
    assert all(type(model.get_submodule(n)) is PackedConv2d for n in CONVS)
    assert torch.allclose(logits(model, x), fq, rtol=0, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_int8_conv_is_close_to_fake_quant(symmetric):
    """Static int8 inputs (act_bits=8): the integer im2col product is the fake-quant conv up to float summation
    order, held to 1e-4 of the largest logit; dynamic per-patch int8 inputs (act_bits=null) against the
    float-input fake-quant model: 2e-2, the cpu_int8 scheme's documented tolerance."""
    x = images(6)
    for act_bits, tol in ((8, 1e-4), (None, 2e-2)):
        model = cnn(seed=3)
        prepare_qat_(model, QuantConfig(bits=4, symmetric=symmetric, act_bits=act_bits, targets=TARGETS))
        observe(model, x)
        fq = logits(model, x)
        convert_(model, backend="cpu_int8")
        assert all(type(model.get_submodule(n)) is Int8Conv2d for n in CONVS)
        rel = float((logits(model, x) - fq).abs().max() / fq.abs().max())
        assert rel < tol, (act_bits, rel)


def test_int8_conv_handles_groups_stride_dilation_and_reflect_padding():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect")
    holder = nn.Sequential(conv)
    prepare_qat_(holder, QuantConfig(bits=8, act_bits=8, targets="0", quantize_head=True))
    x = torch.randn(3, 4, 11, 9)
    holder.train()
    holder(x)
    holder.eval()
    with torch.no_grad():
        fq = holder(x)
        packed, int8 = copy.deepcopy(holder), copy.deepcopy(holder)
        convert_(packed)
        convert_(int8, backend="cpu_int8")
        assert fq.shape == conv(x).shape and torch.allclose(packed(x), fq, rtol=0, atol=1e-6)
        assert torch.allclose(int8(x), fq, rtol=0, atol=1e-4 * float(fq.abs().max()))


BITS_LAYOUTS = list(itertools.product([2, 4, 8], ["per_tensor", "per_channel", "per_group"]))


@pytest.mark.parametrize("bits,granularity", BITS_LAYOUTS)
def test_pruned_filters_and_zeros_stay_exactly_zero_through_qat_ptq_and_conversion(bits, granularity):
    x, y = images(8), torch.randint(0, 10, (8,))
    for mode, symmetric in (("qat", True), ("qat", False), ("ptq", False)):
        model = cnn()
        masks = prune_(model)
        cfg = QuantConfig(
            bits=bits,
            granularity=granularity,
            group_size=16,
            symmetric=symmetric,
            act_bits=8,
            targets=TARGETS,
        )
        before = zero_positions(model, CONVS)
        if mode == "qat":
            prepare_qat_(model, cfg)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            model.train()
            for _ in range(3):  # QAT steps with the masks held after each step, as MaskFreeze does
                opt.zero_grad()
                F.cross_entropy(model(pixel_values=x), y).backward()
                opt.step()
                with torch.no_grad():
                    for n, keep in masks.items():
                        model.get_submodule(n).weight.mul_(keep)
            model.eval()
        else:
            prepare_ptq_(model, cfg)
            calibrate_(model, [{"pixel_values": x}], 1)
        for n, keep in masks.items():  # what the fake-quant model computes with is exactly 0 there
            m = model.get_submodule(n)
            q = m.weight_fake_quantizer(weight_matrix(m)).reshape(keep.shape)
            assert (q[~keep] == 0).all() and (q[0] == 0).all()
        check_zeros_kept(model, before, f"{mode} {bits}-bit {granularity}")
        backends = ["packed"] + (["cpu_int8"] if granularity != "per_group" else [])
        for backend in backends:
            converted = copy.deepcopy(model)
            convert_(converted, backend=backend)
            report = check_zeros_kept(converted, before, f"{backend}")  # raises if a pruned weight revived
            for n, keep in masks.items():
                w = converted.get_submodule(n).dequantize()
                assert w.shape == keep.shape and (w[~keep] == 0).all() and (w[0] == 0).all()
                assert report[n]["zeros_after"] >= report[n]["zeros_before"] == int((~keep).sum())
                layer = cost.sparsity(converted, [n])["per_layer"][n]
                assert round(layer * keep.numel()) >= int((~keep).sum())  # the recorded sparsity did not drop


# ----------------------------------------------------------------------------- export


def conv_bytes_in_file(path: Path, name: str) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(
            f.get_tensor(k).numel() * f.get_tensor(k).element_size()
            for k in f.keys()
            if k.startswith(name + ".")
        )


@pytest.mark.parametrize("backend", ["packed", "cpu_int8"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_save_and_reload_gives_the_same_logits_at_bits_over_32_of_the_float_size(tmp_path, backend, bits):
    model = cnn(channels=(8, 16, 16))
    prune_(model)
    prepare_qat_(model, QuantConfig(bits=bits, targets=TARGETS, act_bits=8))
    x = images()
    observe(model, x)
    convert_(model, backend=backend)
    q = logits(model, x)
    path = save_quantized(model, tmp_path)
    fresh = cnn(seed=7, channels=(8, 16, 16))  # other weights: everything must come from the file
    assert load_quantized_(fresh, tmp_path) == [*CONVS, "fc.0"]
    assert type(fresh.blocks[2].conv) is type(model.blocks[2].conv)
    assert torch.equal(logits(fresh, x), q)
    meta = json.loads((tmp_path / "quantization_config.json").read_text())["modules"]["blocks.1.conv"]
    assert (meta["module"], meta["kernel_size"], meta["in_channels"], meta["out_channels"]) == (
        "conv2d",
        [3, 3],
        8,
        16,
    )
    for n in CONVS[1:]:  # filters of 8*9 = 72 and 16*9 = 144 weights, no bias
        conv = model.get_submodule(n)
        k, out = conv.in_features, conv.out_features
        packed = (
            out * (k // 8) * bits + 4 * out + 4
        )  # codes at `bits` per weight + a scale per filter + act scale
        assert conv_bytes_in_file(path, n) == conv.storage_bytes() == packed
        ratio = packed / (out * k * 4)
        assert bits / 32 < ratio <= bits / 32 + 1.5 / k  # about bits/32 of float32 (scales: 1/k)

    # Through dpq.checkpoints too: the float copy holds the dequantized convs, the low-bit modules come back.
    save_model(model, tmp_path / "ckpt")
    again = load_model({}, {}, tmp_path / "ckpt")
    assert type(again.blocks[0].conv) is type(model.blocks[0].conv) and torch.equal(
        logits(again.eval(), x), q
    )
    float_copy = native_from_config(json.loads((tmp_path / "ckpt" / "config.json").read_text()))
    float_copy.load_state_dict(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    for n in CONVS:
        assert type(float_copy.get_submodule(n)) is nn.Conv2d
        assert torch.equal(float_copy.get_submodule(n).weight, model.get_submodule(n).dequantize())


def test_reload_refuses_a_conv_of_another_geometry(tmp_path):
    model = cnn()
    prepare_qat_(model, QuantConfig(bits=4, targets=TARGETS))
    convert_(model)
    save_quantized(model, tmp_path)
    other = cnn(channels=(4, 6, 8))
    with pytest.raises(ValueError, match=r"blocks\.1\.conv.*out_channels=6 but the save has out_channels=8"):
        load_quantized_(other, tmp_path)


# ----------------------------------------------------------------------------- cost


class Images(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, pixel_values):
        return self.body(pixel_values)


@pytest.mark.parametrize("backend,act_bits", [("packed", 8), ("packed", None), ("cpu_int8", None)])
def test_bops_size_and_flops_of_a_quantized_conv_follow_the_hand_formula(backend, act_bits):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True)  # 6 filters of 2*3*3 = 18 weights
    with torch.no_grad():
        conv.weight[0] = 0.0  # a pruned filter
        conv.weight[1, 0] = 0.0
        conv.weight[2, 1, 1, 1] = 0.0
    model = Images(nn.Sequential(conv)).eval()
    x = {"pixel_values": torch.randn(2, 4, 8, 8)}
    positions, numel = 2 * 8 * 8, 6 * 18
    nnz = numel - 18 - 9 - 1
    dense = cost.flops(model, x)
    assert dense["dense_gflops"] * 1e9 == pytest.approx(positions * numel)
    assert dense["effective_gflops"] * 1e9 == pytest.approx(
        positions * nnz
    )  # conv zeros are skipped (float too)

    prepare_qat_(model, QuantConfig(bits=4, act_bits=act_bits, targets="body.0", quantize_head=True))
    model.train()
    model(**x)
    model.eval()
    convert_(model, backend=backend)
    q = model.body[0]
    assert (q.in_features, q.out_features) == (18, 6)
    w = q.dequantize()
    assert (w[0] == 0).all() and (w[1, 0] == 0).all() and w[2, 1, 1, 1] == 0
    nnz_q = int((w != 0).sum())  # 4-bit rounding may zero a few more small weights
    assert nnz_q <= nnz and q.nonzero_weights() == nnz_q
    out = cost.bops(model, x)
    a_bits = 8 if (act_bits or backend == "cpu_int8") else 32  # cpu_int8 quantizes inputs to int8 either way
    assert (out["macs"], out["nonzero_macs"]) == (positions * numel, positions * nnz_q)
    assert (
        out["bops"] == positions * nnz_q * 4 * a_bits and out["dense_bops"] == positions * numel * 4 * a_bits
    )
    # size: 4-bit codes (18 -> 24 padded codes = 12 bytes per filter), a float32 scale per filter, float32 bias,
    # a float32 activation scale when act_bits=8
    size = 6 * 12 + 6 * 4 + 6 * 4 + (4 if act_bits else 0)
    assert cost.size_bytes(model) == {"size_bytes": size, "size_breakdown": {"float": 0, "quantized": size}}
    assert cost.parameter_counts(model) == {"params_total": numel + 6, "params_nonzero": nnz_q + 6}
    fl = cost.flops(model, x)  # fvcore traces the dequantized F.conv2d: same multiply-adds as the float conv
    assert fl["dense_gflops"] == pytest.approx(dense["dense_gflops"])
    assert fl["effective_gflops"] * 1e9 == pytest.approx(positions * nnz_q)


# ----------------------------------------------------------------------------- config errors


def resolved(make_cfg, *overrides) -> dict:
    return OmegaConf.to_container(make_cfg(*overrides), resolve=True)


@pytest.mark.parametrize("pipeline,stage", [("dq", "quantize"), ("dq_ptq", "ptq")])
def test_torchao_with_conv_targets_fails_validation_naming_the_convs(make_cfg, pipeline, stage):
    from dpq.run.validate import validate

    cfg = resolved(
        make_cfg,
        "experiment=fashion_cnn",
        f"pipeline={pipeline}",
        f"pipeline.stages.{stage}.backend=torchao",
        f"pipeline.stages.{stage}.bits=8",
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    key = f"pipeline.stages.{stage}.backend"
    msg = str(err.value)
    assert err.value.key == key and msg.startswith(f"{key}='torchao'"), msg
    assert "model.quant_targets" in msg and "blocks.0.conv, blocks.1.conv, blocks.2.conv" in msg, msg
    assert "packed or cpu_int8" in msg, msg
    # Targets that select only the linear layers are fine for torchao.
    cfg = resolved(
        make_cfg,
        "experiment=fashion_cnn",
        f"pipeline={pipeline}",
        f"pipeline.stages.{stage}.backend=torchao",
        f"pipeline.stages.{stage}.bits=8",
        f"pipeline.stages.{stage}.targets=re:fc\\.\\d+",
    )
    validate(cfg)


def test_torchao_conv_targets_fail_before_training(make_cfg, monkeypatch):
    import lightning as L

    from dpq.train import train

    def boom(*a, **k):
        raise AssertionError("training started before the config error was raised")

    monkeypatch.setattr(L.Trainer, "fit", boom)
    with pytest.raises(ConfigError, match=r"blocks\.0\.conv"):
        train(
            make_cfg(
                "experiment=fashion_cnn",
                "pipeline=dq",
                "pipeline.stages.quantize.backend=torchao",
                "pipeline.stages.quantize.bits=8",
                "pipeline.stages.quantize.targets=re:blocks\\.0\\.conv",
            )
        )


def test_bnb_with_conv_targets_fails_the_model_check(make_cfg, monkeypatch):
    """No GPU here: bitsandbytes' device check is lifted, so the module-kind check is what fails."""
    from dpq.quant import backends
    from dpq.run.validate import check_models
    from dpq.stages import build_stages

    monkeypatch.setattr(backends, "available_devices", lambda: {"cpu", "cuda"})
    cfg = resolved(make_cfg, "experiment=fashion_cnn", "pipeline=dq", "pipeline.stages.quantize.backend=bnb")
    with pytest.raises(
        ConfigError,
        match=r"pipeline\.stages\.quantize\.backend='bnb': backend bnb quantizes nn\.Linear "
        r"layers only.*3 nn\.Conv2d module\(s\) \(blocks\.0\.conv",
    ):
        check_models(cfg, build_stages(cfg["pipeline"]))
    with pytest.raises(
        ConfigError, match=r"pipeline\.stages\.quantize\.backend='bnb'"
    ):  # the stage's own check
        check_module_kinds(
            "bnb", cnn(), CONVS, "pipeline.stages.quantize", "pipeline.stages.quantize.targets", TARGETS
        )


# ----------------------------------------------------------------------------- pipeline


def _have_fashion() -> bool:
    from dpq.data.sources import FASHION_MNIST_DIR, IDX_FILES

    return all((Path(FASHION_MNIST_DIR) / f).is_file() for pair in IDX_FILES.values() for f in pair)


@pytest.mark.skipif(not _have_fashion(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_cnn_dq_quantizes_the_convs(make_cfg):
    """teacher -> distill -> 4-bit QAT on 256 Fashion-MNIST images, 4 batches per stage."""
    from dpq.train import train

    res = train(
        make_cfg(
            "experiment=fashion_cnn",
            "pipeline=dq",
            "task.subsample=256",
            "trainer=debug",
            "cost.repeats=2",
            "cost.warmup=1",
        )
    )
    by = {r["stage"]: r for r in res["stages"]}
    q, dense = by["quantize"], by["distill"]
    assert q["quantized_names"] == [*CONVS, "fc.0"] and q["quantized_modules"] == 4
    assert q["backend_max_logit_diff"] <= 1e-5  # packed == fake quant
    # cnn_small: convs 1->16, 16->32, 32->64 (3x3, no bias), fc.0 64->64. Float: 4 bytes per weight.
    k = {"blocks.0.conv": (16, 9), "blocks.1.conv": (32, 144), "blocks.2.conv": (64, 288), "fc.0": (64, 64)}
    float_bytes = sum(o * i * 4 for o, i in k.values()) + 64 * 4  # + fc.0's bias
    packed = (
        sum(o * (-(-i // 8) * 4 + 4) for o, i in k.values()) + 64 * 4
    )  # 4-bit codes + a scale per row + bias
    m, d = q["metrics"], dense["metrics"]
    assert m["size_breakdown"]["quantized"] == packed
    assert m["size_bytes"] == d["size_bytes"] - float_bytes + packed
    assert m["disk_data_bytes"] == m["size_bytes"]
    assert m["bops"] < d["bops"] / 7.9  # 4-bit weights in every conv and the FC layer (32x32 -> 4x32 bits)
    assert res["final"]["quantized"] and res["final"]["reload_accuracy"] == pytest.approx(m["accuracy"])
    again = load_model({}, {}, Path(res["model_dir"]))
    assert all(type(again.get_submodule(n)) is PackedConv2d for n in CONVS)
