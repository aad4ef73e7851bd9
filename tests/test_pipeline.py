"""Every pipeline preset composes and runs; results.json carries every promised field."""

import json

import pytest
import torch

from dpq.checkpoints import load_model
from dpq.core.config import list_options
from dpq.quant import QuantizedLinear
from dpq.train import train

PRESETS = list_options("pipeline")
STAGE_FIELDS = [
    "accuracy",
    "loss",
    "val_accuracy",
    "params_total",
    "params_nonzero",
    "sparsity",
    "dense_gflops",
    "effective_gflops",
    "size_bytes",
    "latency_ms_median",
    "latency_ms_p90",
    "device",
    "threads",
    "batch_size",
    "seq_len",
    "warmup",
    "repeats",
    "flops_convention",
]


def test_presets_are_the_documented_ones():
    assert set(PRESETS) >= {"dpq", "dq", "dp", "dense"}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("experiment", ["tiny", "digits"])
def test_every_preset_runs_a_few_steps(make_cfg, preset, experiment):
    cfg = make_cfg(
        f"pipeline={preset}", f"experiment={experiment}", "trainer=debug", "cost.repeats=2", "cost.warmup=1"
    )
    results = train(cfg)
    order = list(cfg.pipeline.order)
    top_level = [r["stage"].split(".")[0] for r in results["stages"]]  # spiral.r0.prune -> spiral
    assert list(dict.fromkeys(top_level)) == order
    final = results["final"]
    prunes = "prune" in order or "spiral" in order
    # 4-bit rounding may add zeros after the prune (pd distils for long after it: 0.5056 on digits)
    assert prunes == (0.5 - 1e-3 <= final["sparsity"] <= 0.51)
    pruned = [r for r in results["stages"] if r["kind"] == "prune" or r["stage"].endswith(".prune")]
    if pruned:  # where pruning ends, the target exactly
        assert pruned[-1]["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert final["quantized"] == any(s in cfg.pipeline.order for s in ("quantize", "ptq"))


@pytest.fixture(scope="module")
def dpq_run(tmp_path_factory):
    from conftest import compose_cfg

    tmp = tmp_path_factory.mktemp("dpq")
    cfg = compose_cfg(tmp, ["experiment=tiny", "cost.repeats=2", "cost.warmup=1"])
    results = train(cfg)
    return cfg, results, tmp / "run"


def test_results_json_has_all_fields(dpq_run):
    cfg, results, out = dpq_run
    on_disk = json.loads((out / "results.json").read_text())
    for key in [
        "run_name",
        "pipeline",
        "order",
        "task",
        "seed",
        "git",
        "versions",
        "hardware",
        "cost_conditions",
        "stages",
        "final",
        "config",
        "model_dir",
        "wall_time_s",
    ]:
        assert key in on_disk, key
    assert on_disk["config"]["pipeline"]["order"] == list(cfg.pipeline.order)
    assert {"torch", "lightning", "transformers", "datasets", "torchmetrics", "fvcore"} <= set(
        on_disk["versions"]
    )
    from dpq.core.provenance import hardware

    assert on_disk["hardware"] == hardware() and on_disk["hardware"]["cpu"]  # the machine's processor
    assert set(on_disk["git"]) == {
        "sha",
        "dirty",
        "diff_sha256",
        "untracked_sha256",
        "untracked",
        "patch",
        "started",
    }
    assert [s["stage"] for s in on_disk["stages"]] == ["teacher", "distill", "prune", "recover", "quantize"]
    for rec in on_disk["stages"] + [on_disk["final"]]:
        missing = [f for f in STAGE_FIELDS if f not in rec.get("metrics", rec)]
        assert not missing, (rec.get("stage"), missing)
    stages = {s["stage"]: s["metrics"] for s in on_disk["stages"]}
    # Honest cost: pruning lowers effective (not dense) FLOPs; 4-bit lowers the size.
    assert stages["prune"]["effective_gflops"] < 0.75 * stages["distill"]["effective_gflops"]
    assert stages["prune"]["dense_gflops"] == pytest.approx(stages["distill"]["dense_gflops"])
    assert stages["quantize"]["size_bytes"] < stages["recover"]["size_bytes"]
    assert on_disk["final"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 0.0 <= on_disk["final"]["accuracy"] <= 1.0


def test_quantized_model_keeps_pruned_weights_zero_and_reloads(dpq_run):
    cfg, results, out = dpq_run
    model = load_model(dict(cfg.model), dict(cfg.task), out / "model")
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert qmods and all(m.bits == 4 for m in qmods.values())
    zero_frac = sum(int((m.codes() == 0).sum()) for m in qmods.values()) / sum(
        m.codes().numel() for m in qmods.values()
    )
    assert zero_frac >= 0.5  # the pruned half is exactly zero after QAT and conversion
    # The float copy (from_pretrained alone) gives the same logits as the packed low-bit model.
    from transformers import AutoModelForSequenceClassification

    float_copy = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        a = model.eval()(input_ids=ids).logits
        b = float_copy(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_second_run_reuses_the_cached_teacher_and_reproduces_the_first(tmp_path):
    from conftest import compose_cfg

    # The stage cache off: it would restore the whole pipeline, teacher record included (tested in test_sweeps).
    overrides = [
        "experiment=tiny",
        "pipeline=dp",
        "cost.repeats=1",
        "cost.warmup=0",
        "save_model=false",
        "stage_cache.enabled=false",
    ]
    runs = []
    for name in ("a", "b"):
        cfg = compose_cfg(tmp_path / name, overrides)
        cfg.paths.cache_dir = str(tmp_path / "shared-cache")
        runs.append(train(cfg))
    first, second = runs
    assert first["stages"][0]["cache"] == "miss" and second["stages"][0]["cache"].startswith("hit:")
    for a, b in zip(first["stages"], second["stages"]):
        assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
        assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-5)


def test_a_nan_loss_stops_the_run_with_a_clear_error(make_cfg, tmp_path):
    from dpq.core.errors import TrainingDiverged

    cfg = make_cfg(
        "experiment=digits",
        "pipeline=dense",
        "trainer=debug",
        "pipeline.stages.distill.lr=1e30",
        "pipeline.stages.distill.epochs=3",
        "cost.repeats=1",
        "cost.warmup=0",
    )
    with pytest.raises(TrainingDiverged, match="stage 'distill'"):
        train(cfg)
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert partial["status"] == "diverged" and [s["stage"] for s in partial["stages"]] == ["teacher"]
