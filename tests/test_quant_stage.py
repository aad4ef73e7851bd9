"""The quantize stage end to end: QAT options, real backends measured, the difference recorded and logged."""

import csv

import pytest

from dpq.train import train

ONE_EPOCH = [f"pipeline.stages.{s}.epochs=1" for s in ("teacher", "distill", "prune", "recover", "quantize")]
BASE = ["experiment=digits", "trainer=debug", "cost.repeats=1", "cost.warmup=0", *ONE_EPOCH]


def test_lsq_int8_activations_on_the_cpu_int8_backend(make_cfg, tmp_path):
    cfg = make_cfg(
        *BASE,
        "pipeline=dpq",
        "logger=csv",
        "pipeline.stages.quantize.observer=lsq",
        "pipeline.stages.quantize.act_bits=8",
        "pipeline.stages.quantize.bits=4",
        "pipeline.stages.quantize.backend=cpu_int8",
    )
    results = train(cfg)
    rec = results["stages"][-1]
    assert (rec["kind"], rec["backend"], rec["scheme"], rec["observer"], rec["act_bits"]) == (
        "quantize",
        "cpu_int8",
        "int8",
        "lsq",
        8,
    )
    m = rec["metrics"]
    assert m["backend_accuracy_delta"] == pytest.approx(m["accuracy"] - rec["fake_quant_accuracy"])
    assert rec["backend_rel_logit_diff"] < 1e-4  # same codes, same input range: integer kernel == fake quant
    assert (
        rec["qat_zeros"]["zeros_before"] == rec["qat_zeros"]["zeros_after"] > 0
    )  # QAT left pruned weights at 0
    assert rec["zeros"]["zeros_after"] >= rec["zeros"]["zeros_before"]
    assert results["final"]["sparsity"] >= 0.5 and results["final"]["quantized"]
    assert m["disk_data_bytes"] == m["size_bytes"]
    assert results["final"]["reload_accuracy"] == pytest.approx(
        m["accuracy"]
    )  # the saved model reproduces it
    # The fake-vs-real difference reaches the experiment tracker.
    logged = {}
    for path in (tmp_path / "run").rglob("metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                logged.update({k: v for k, v in row.items() if v})
    assert "result/backend_accuracy_delta" in logged and "result/fake_quant_accuracy" in logged


def test_torchao_int8_dynamic_backend_after_quant_only_distillation(make_cfg):
    cfg = make_cfg(
        *BASE,
        "pipeline=dq",
        "pipeline.stages.quantize.bits=8",
        "pipeline.stages.quantize.backend=torchao",
        "pipeline.stages.quantize.scheme=int8_dynamic",
        "pipeline.stages.quantize.granularity=per_tensor",
    )
    results = train(cfg)
    rec = results["stages"][-1]
    assert (rec["backend"], rec["scheme"], rec["granularity"]) == ("torchao", "int8_dynamic", "per_tensor")
    assert rec["backend_rel_logit_diff"] < 2e-2
    assert abs(rec["backend_accuracy_delta"]) < 0.05
    assert rec["metrics"]["size_bytes"] < results["stages"][-2]["metrics"]["size_bytes"]
