"""Post-training quantization: calibration ranges, percentile clipping, the ptq stage end to end."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dpq.core.errors import ConfigError
from dpq.quant import (
    ActivationFakeQuant,
    QuantConfig,
    calibrate_,
    check_zeros_kept,
    convert_,
    prepare_ptq_,
    zero_positions,
)
from dpq.quant.affine import Blocks, weight_qparams


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def _batches(n=5):
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(4, 8, generator=g) * (i + 1)} for i in range(n)]


def test_minmax_calibration_takes_the_max_over_n_batches_then_freezes():
    model = _model()
    prepare_ptq_(model, QuantConfig(bits=8, act_bits=8, targets=["0", "2"]))
    act0 = model[0].activation_fake_quantizer
    assert act0.mode == "calibrate_minmax"
    batches = _batches()
    used = calibrate_(model, batches, num_batches=3, forward=lambda m, b: m(b["x"]))
    assert used == 3 and act0.mode == "frozen" and model.training  # its mode is restored
    assert float(act0.amax) == pytest.approx(max(float(b["x"].abs().max()) for b in batches[:3]))
    before = float(act0.amax)
    model(batches[4]["x"] * 100)  # frozen: a larger input no longer moves the range
    assert float(act0.amax) == before


def test_percentile_calibration_averages_batch_percentiles():
    model = _model()
    prepare_ptq_(
        model, QuantConfig(bits=8, act_bits=8, calibration="percentile", percentile=90.0, targets=["0"])
    )
    batches = _batches()
    calibrate_(model, batches, num_batches=4, forward=lambda m, b: m(b["x"]))
    expected = sum(float(torch.quantile(b["x"].abs().flatten(), 0.9)) for b in batches[:4]) / 4
    assert float(model[0].activation_fake_quantizer.amax) == pytest.approx(expected, rel=1e-6)


def test_calibration_without_observers_uses_no_batches_and_unseen_observers_fail():
    model = _model()
    prepare_ptq_(model, QuantConfig(bits=4, targets=["0"]))
    assert calibrate_(model, _batches(), 8, forward=lambda m, b: m(b["x"])) == 0
    model = _model()
    prepare_ptq_(model, QuantConfig(bits=4, act_bits=8, targets=["0"]))
    with pytest.raises(RuntimeError, match=r"never seen in 0 calibration batches: 0 \(a layer the forward"):
        calibrate_(model, [], 8)  # the layer named (it was "activation observer 0")
    with pytest.raises(RuntimeError, match="^0: activation range was never observed"):
        convert_(model, backend="packed")  # QAT's conversion names it too


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_weight_ranges_clip_outliers_and_keep_zeros(symmetric):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[:, 0] = 20.0  # one outlier per row
    w[w.abs() < 0.5] = 0.0
    layout = Blocks("per_channel", 8, 64)
    s_max, _ = weight_qparams(w, layout, 4, symmetric)
    s_pct, _ = weight_qparams(w, layout, 4, symmetric, percentile=95.0)
    assert (s_pct < s_max / 3).all()
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 2))
    model[0].weight.data.copy_(w)
    zeros = zero_positions(model, ["0"])
    prepare_ptq_(
        model,
        QuantConfig(bits=4, symmetric=symmetric, calibration="percentile", percentile=95.0, targets="0"),
    )
    convert_(model)
    check_zeros_kept(model, zeros, "ptq")
    torch.testing.assert_close(model[0].scale, s_pct)


# ---------------------------------------------------------------- the stage

ONE_EPOCH = [f"pipeline.stages.{s}.epochs=1" for s in ("teacher", "distill", "prune", "recover")]


def test_dpq_ptq_stage_end_to_end(make_cfg):
    from dpq.train import train

    cfg = make_cfg(
        "experiment=digits",
        "pipeline=dpq_ptq",
        "trainer=debug",
        "cost.repeats=1",
        "cost.warmup=0",
        *ONE_EPOCH,
        "pipeline.stages.ptq.act_bits=8",
        "pipeline.stages.ptq.backend=cpu_int8",
        "pipeline.stages.ptq.calibration=percentile",
        "pipeline.stages.ptq.calibration_batches=3",
    )
    results = train(cfg)
    rec = results["stages"][-1]
    assert rec["kind"] == "ptq" and rec["backend"] == "cpu_int8" and rec["calibration_batches"] == 3
    assert rec["calibration"] == "percentile" and rec["act_bits"] == 8
    m = rec["metrics"]
    assert m["backend_accuracy_delta"] == pytest.approx(m["accuracy"] - rec["fake_quant_accuracy"])
    assert (
        rec["backend_rel_logit_diff"] < 1e-4
    )  # static int8 inputs: the int8 kernel reproduces the fake-quant model
    assert rec["zeros"]["zeros_after"] >= rec["zeros"]["zeros_before"] > 0  # pruned weights stayed zero
    assert m["disk_data_bytes"] == m["size_bytes"] and m["disk_size_bytes"] > m["size_bytes"]
    assert results["final"]["quantized"] and results["final"]["sparsity"] >= 0.5
    assert m["size_bytes"] < results["stages"][-2]["metrics"]["size_bytes"]


@pytest.mark.parametrize(
    "overrides,key,message",
    [
        (["pipeline.stages.ptq.calibration=kl"], "pipeline.stages.ptq.calibration", "minmax, percentile"),
        (["pipeline.stages.ptq.calibration_batches=0"], "pipeline.stages.ptq.calibration_batches", ">= 1"),
        (
            ["pipeline.stages.ptq.bits=3", "pipeline.stages.ptq.backend=torchao"],
            "pipeline.stages.ptq.bits",
            "3-bit weights run with backend packed",
        ),
        (["pipeline.order=[teacher,distill,ptq,quantize]"], "pipeline.order", "only one quantization stage"),
    ],
)
def test_ptq_config_errors_before_training(make_cfg, overrides, key, message):
    from dpq.run.validate import validate

    cfg = make_cfg("experiment=digits", "pipeline=dq_ptq", *overrides)
    with pytest.raises(ConfigError, match=message) as e:
        validate(OmegaConf.to_container(cfg, resolve=True))
    assert e.value.key == key


def test_activation_observer_modes_are_checked():
    with pytest.raises(ValueError, match="mode"):
        ActivationFakeQuant().set_mode("ema")


def test_dynamic_activation_ranges_need_no_calibration():
    """act_range=dynamic takes each batch's own range: calibration leaves it alone (it once required every
    activation quantizer to have seen input, so PTQ with dynamic activations always failed)."""
    model = _model()
    prepare_ptq_(model, QuantConfig(bits=4, act_bits=8, act_range="dynamic", targets=["0", "2"]))
    assert model[0].activation_fake_quantizer.dynamic
    used = calibrate_(model, _batches(), num_batches=2, forward=lambda m, b: m(b["x"]))
    assert used == 0  # nothing to calibrate: no batch is run
    assert torch.isfinite(model(_batches()[0]["x"])).all()


def test_qat_ahead_of_a_percentile_ptq_stage_trains_under_the_percentile_it_deploys():
    """recover.qat=<ptq stage> with calibration=percentile: QAT picked torchao's min-max quantizer and the
    record said percentile; the weights learned a rounding other than the one deployed."""
    from dpq.quant import prepare_qat_

    cfg = QuantConfig(bits=4, granularity="per_channel", calibration="percentile", percentile=90.0)
    qat, ptq = _model(), _model()
    prepare_qat_(qat, cfg)
    prepare_ptq_(ptq, cfg)
    q = qat[0].weight_fake_quantizer
    assert type(q).__name__ == "MinMaxWeightQuantizer" and q.percentile == 90.0
    with torch.no_grad():
        assert torch.equal(q(qat[0].weight), ptq[0].weight_fake_quantizer(ptq[0].weight))
        minmax = _model()
        prepare_qat_(minmax, QuantConfig(bits=4, granularity="per_channel"))
        assert not torch.equal(minmax[0].weight_fake_quantizer(minmax[0].weight), q(qat[0].weight))
