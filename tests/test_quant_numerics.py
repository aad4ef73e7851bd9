"""Fake-quant numerics: a float64 reference, bit-equality with torchao, exact zeros, bit packing."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from dpq.quant import (
    Blocks,
    PackedLinear,
    QuantConfig,
    check_zeros_kept,
    convert_,
    fake_quantize,
    prepare_qat_,
    zero_positions,
)
from dpq.quant.affine import weight_qparams
from dpq.quant.packed import pack_codes, packed_row_bytes, unpack_codes

BITS = [2, 3, 4, 8]
LAYOUTS = [("per_tensor", 0), ("per_channel", 0), ("per_group", 16), ("per_group", 7)]  # 7 does not divide 40


def reference_fake_quant(w: np.ndarray, bits: int, granularity: str, group: int, symmetric: bool):
    """Independent float64 reference: returns (dequantized, codes, scale per element, zero point per element)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out, n = w.shape
    if granularity == "per_tensor":
        ids = np.zeros_like(w, dtype=np.int64)
    elif granularity == "per_channel":
        ids = np.repeat(np.arange(out)[:, None], n, axis=1)
    else:
        ids = np.arange(out)[:, None] * 10_000 + (np.arange(n)[None, :] // group)
    deq, codes = np.zeros_like(w), np.zeros_like(w)
    scales, zps = np.zeros_like(w), np.zeros_like(w)
    for b in np.unique(ids):
        sel = ids == b
        lo, hi = min(w[sel].min(), 0.0), max(w[sel].max(), 0.0)
        eps = float(np.finfo(np.float32).tiny)  # an all-zero block: tiny scale, codes = zero point
        if symmetric:
            scale, zp = max(max(-lo, hi) / ((qmax - qmin) / 2), eps), 0.0
        else:
            scale = max((hi - lo) / (qmax - qmin), eps)
            zp = float(np.clip(qmin - np.round(lo / scale), qmin, qmax))
        c = np.clip(np.round(w[sel] / scale) + zp, qmin, qmax)
        codes[sel], deq[sel], scales[sel], zps[sel] = c, (c - zp) * scale, scale, zp
    return deq, codes, scales, zps


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity,group", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_matches_float64_reference(bits, granularity, group, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(12, 40) * torch.rand(12, 1) * 3  # rows of different ranges
    w[w.abs() < 0.3] = 0.0
    w[5] = 0.0  # an all-zero row: finite scale, codes = zero point
    q = fake_quantize(w, bits, granularity, group or 128, symmetric)
    ref, codes, scales, zps = reference_fake_quant(w.double().numpy(), bits, granularity, group, symmetric)
    assert torch.isfinite(q).all()
    # Same codes as the float64 reference, except at exact ties (w / scale = k + 1/2, e.g. the
    # largest |w| of a symmetric block sits at (qmax - qmin) / 2), where float32 may round either way.
    layout = Blocks(granularity, 12, 40, group or 128)
    scale, zp = weight_qparams(w, layout, bits, symmetric)
    ours = layout.merge(
        torch.clamp(
            torch.round(layout.split(w) * (1.0 / scale.unsqueeze(-1))) + zp.unsqueeze(-1),
            -(2 ** (bits - 1)),
            2 ** (bits - 1) - 1,
        )
    ).numpy()
    ratio = np.abs(w.double().numpy() / np.where(scales > 0, scales, 1.0))
    tie = np.abs(ratio - np.floor(ratio) - 0.5) < 1e-5
    np.testing.assert_array_equal(ours[~tie], codes[~tie])
    assert (np.abs(ours - codes)[tie] <= 1).all()
    # ... and the same values up to float32 rounding of the scale.
    np.testing.assert_allclose(q.double().numpy()[~tie], ref[~tie], rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # Error bound: within half a step wherever the value is inside the grid.
    inside = (codes > -(2 ** (bits - 1))) & (codes < 2 ** (bits - 1) - 1)
    err = np.abs(q.double().numpy() - w.double().numpy())
    assert (err[inside] <= scales[inside] / 2 * (1 + 1e-5)).all()
    # Exact zeros stay exact, and the zero point of an asymmetric grid is an integer.
    assert (q[w == 0] == 0).all() and (q[5] == 0).all()
    assert np.array_equal(zps, np.round(zps))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity,group", [("per_channel", 0), ("per_group", 8)])
def test_dpq_quantizer_is_bit_identical_to_torchao(bits, granularity, group):
    """Where torchao's IntxFakeQuantizer applies, dpq's formulas (used for packing) give the same bits."""
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    torch.manual_seed(0)
    w = torch.randn(16, 32)
    w[w.abs() < 0.5] = 0.0
    gran = PerAxis(0) if granularity == "per_channel" else PerGroup(group)
    ao = IntxFakeQuantizer(
        IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), granularity=gran, is_symmetric=True)
    )
    assert torch.equal(fake_quantize(w, bits, granularity, group or 128, True), ao(w))


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    w = torch.randn(5, 9, requires_grad=True)
    upstream = torch.randn(5, 9)
    fake_quantize(w, 4, "per_group", 4, symmetric=False).backward(upstream)
    assert torch.equal(w.grad, upstream)


def _pruned_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 3))
    masks = {}
    for name in ("0", "2"):
        w = model.get_submodule(name).weight.data
        keep = w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values
        w.mul_(keep)
        masks[name] = keep
    return model, masks


COMBOS = [
    (b, g, s, o)
    for b, (g, s, o) in itertools.product(
        BITS,
        [(g, s, "minmax") for g, s in itertools.product(LAYOUTS, [True, False])]
        + [(g, True, "lsq") for g in LAYOUTS],
    )
]


@pytest.mark.parametrize("bits,layout,symmetric,observer", COMBOS)
def test_pruned_zeros_stay_zero_through_qat_and_conversion(bits, layout, symmetric, observer):
    granularity, group = layout
    model, masks = _pruned_mlp(bits)
    cfg = QuantConfig(
        bits=bits,
        granularity=granularity,
        group_size=group or 128,
        symmetric=symmetric,
        observer=observer,
        targets=["0", "2"],
    )
    zeros = zero_positions(model, list(masks))
    assert prepare_qat_(model, cfg) == ["0", "2"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 40), torch.randint(0, 3, (32,))
    for _ in range(3):  # a few QAT steps with the mask held, as MaskFreeze does
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            for n, keep in masks.items():
                model.get_submodule(n).weight.mul_(keep)
    check_zeros_kept(model, zeros, "after QAT")
    with torch.no_grad():
        fq = model(x)
    convert_(model)
    report = check_zeros_kept(model, zeros, "after conversion")
    for n, keep in masks.items():
        q = model.get_submodule(n)
        assert isinstance(q, PackedLinear) and q.bits == bits
        codes = q.codes().float()
        zp = q.layout.expand(q._zero_point())
        assert torch.equal(codes[~keep], zp[~keep])  # pruned weights are stored as the zero point
        assert (q.dequantize()[~keep] == 0).all()
        assert (
            report[n]["zeros_before"] == int((~keep).sum())
            and report[n]["zeros_after"] >= report[n]["zeros_before"]
        )
        assert q.nonzero_weights() == int(q.dequantize().count_nonzero())
    with torch.no_grad():
        assert torch.equal(model(x), fq)  # packed conversion reproduces the fake-quant model bit for bit


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_in", [1, 7, 8, 33])
def test_pack_unpack_round_trip_at_real_bit_width(bits, n_in):
    g = torch.Generator().manual_seed(bits * 100 + n_in)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, n_in), generator=g, dtype=torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_row_bytes(n_in, bits))
    assert packed_row_bytes(n_in, bits) == (n_in if bits == 8 else -(-n_in // 8) * bits)
    assert torch.equal(unpack_codes(packed, bits, n_in), codes)


def test_4bit_packing_keeps_the_nibble_layout():
    codes = torch.tensor([[-8, 7, 0, -1, 3, 2, 1, -2]], dtype=torch.int8)
    packed = pack_codes(codes, 4)
    assert packed.tolist() == [[0 | (15 << 4), 8 | (7 << 4), 11 | (10 << 4), 9 | (6 << 4)]]


def test_a_layer_with_one_input_quantizes_per_channel():
    """A FFN pruned down to one neuron leaves its output layer with in_features 1: per-channel QAT there
    (torchao's quantizer asserts a group wider than 1) runs dpq's quantizer, matches the float64 reference
    and converts bit for bit -- it used to fail in the quantize stage, after every earlier stage had trained."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1), nn.ReLU(), nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 3))
    cfg = QuantConfig(bits=4, granularity="per_channel", targets=["0", "2"])
    assert prepare_qat_(model, cfg) == ["0", "2"]
    x = torch.randn(16, 8)
    deq, _, scales, _ = reference_fake_quant(
        model[2].weight.detach().double().numpy(), 4, "per_channel", 0, True
    )
    with torch.no_grad():
        fq = model(x)
        used = (model[2](torch.ones(1, 1)) - model[2].bias).double().numpy().T  # the weight it computes with
    # one weight per row sits at the symmetric grid's edge (|w| / scale = 7.5), where float32 may round to
    # the code on either side (see test_fake_quant_matches_float64_reference): the reference's, or one step
    assert np.all(np.abs(used - deq) <= scales * (1 + 1e-5)) and np.any(np.abs(used - deq) < 1e-7)
    convert_(model)
    with torch.no_grad():
        assert torch.equal(model(x), fq)


def test_a_percentile_over_more_weights_than_torch_quantile_takes_is_the_same_quantile(monkeypatch):
    """Per-tensor percentile PTQ of a layer over 2^24 weights failed ("quantile() input tensor is too
    large"); the long-row path computes torch.nanquantile's definition from the sorted row."""
    from dpq.quant import affine

    torch.manual_seed(0)
    x = torch.randn(3, 5, 1001)
    x[0, 1, 500:] = float("nan")  # per-group padding is NaN
    x[2, 4, :] = float("nan")
    want = {q: torch.nanquantile(x, q, dim=-1) for q in (0.0, 0.5, 0.999, 1.0)}
    monkeypatch.setattr(affine, "QUANTILE_MAX_ELEMENTS", 10)
    for q, w in want.items():
        assert torch.allclose(affine.nanquantile_last(x, q), w, equal_nan=True, atol=1e-6), q
    monkeypatch.undo()
    big = torch.randn(4100, 4100)  # 16.8M weights, one block
    layout = affine.Blocks("per_tensor", 4100, 4100)
    scale, _ = affine.weight_qparams(big, layout, 4, True, percentile=99.9)
    amax = big.abs().flatten().sort().values[int(0.999 * (big.numel() - 1))]
    assert torch.allclose(scale.flatten() * 7.5, amax, rtol=1e-4)


def test_the_float_weight_cache_follows_new_codes_at_a_reused_address(monkeypatch):
    """The cache was keyed on data_ptr() and versions: new codes from set_codes landing at a freed
    buffer's address (version 0 again) matched, and the forward ran with the old weight. Every address
    reads as 0 here, so that reuse is certain."""
    from dpq.quant.packed import PackedLinear

    torch.manual_seed(0)
    m = PackedLinear(4, 3, bits=4, bias=False)
    x = torch.eye(4)
    monkeypatch.setattr(torch.Tensor, "data_ptr", lambda self: 0)
    for _ in range(3):
        codes, scale = torch.randint(-8, 8, (3, 4)), torch.rand(3, 1) + 0.1
        m.set_codes(codes, scale)
        assert torch.equal(m(x), (codes.float() * scale).t())


@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
def test_a_half_precision_model_trains_the_codes_its_conversion_stores(granularity):
    """torchao's IntxFakeQuantizer computes its scales in the weight's dtype, conversion in float32: on a
    bf16 model a fifth of the weights trained a step away from the codes stored. dpq's quantizer stands in
    there, also when Lightning will cast the model only after the QAT callback's setup (bf16-true)."""
    from types import SimpleNamespace

    from dpq.quant.callback import QuantizationAware
    from dpq.quant.fake import MinMaxWeightQuantizer

    cfg = QuantConfig(bits=4, granularity=granularity, group_size=16)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).to(torch.bfloat16).eval()
    prepare_qat_(m, cfg)
    assert isinstance(m[0].weight_fake_quantizer, MinMaxWeightQuantizer)
    with torch.no_grad():
        trained = m[0].weight_fake_quantizer(m[0].weight).float()
    convert_(m, backend="packed")
    assert torch.equal(m[0].dequantize().to(torch.bfloat16).float(), trained)

    kinds = {}
    for precision in ("32-true", "bf16-true"):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        QuantizationAware("q", cfg).setup(
            SimpleNamespace(precision=precision), SimpleNamespace(model=model), "fit"
        )
        kinds[precision] = type(model[0].weight_fake_quantizer).__name__
    assert kinds == {"32-true": "IntxFakeQuantizer", "bf16-true": "MinMaxWeightQuantizer"}


def test_a_percentile_range_is_of_the_weights_a_pruned_row_keeps():
    """Pruned zeros counted in the percentile: a row with one weight kept in 64 had its range cut to the
    interpolation between that weight and zero (37% of it at p99), and the one weight left was clipped."""
    from dpq.quant import affine

    w = torch.zeros(3, 64)
    w[0, 5] = 0.8  # one weight kept
    w[1, :3] = torch.tensor([0.5, -0.2, 0.1])
    w[2] = torch.linspace(-1, 1, 64)  # dense: as before
    layout = affine.Blocks("per_channel", 3, 64)
    scale, _ = affine.weight_qparams(w, layout, 8, True, percentile=99.0)
    q = fake_quantize(w, 8, "per_channel", 128, True, percentile=99.0)
    assert torch.allclose(q[0, 5], torch.tensor(0.8), rtol=1e-2) and torch.equal(q[0] == 0, w[0] == 0)
    kept = torch.nanquantile(w[1, :3].abs(), 0.99)  # of the 3 weights kept, not of 64 mostly zeros (0.0)
    assert torch.allclose(scale[1].flatten() * 127.5, kept, rtol=1e-5) and float(kept) > 0.49
    dense = torch.nanquantile(w[2].abs(), 0.99)
    assert torch.allclose(scale[2].flatten() * 127.5, dense, rtol=1e-5)
    assert (
        float(
            affine.weight_qparams(torch.zeros(2, 8), affine.Blocks("per_channel", 2, 8), 8, True, 99.0)[
                0
            ].min()
        )
        > 0
    )
