"""A run that reuses cached stages reports what a cold run reports: entries from other dpq code or
other library versions are never used (and the run says so), cost figures are measured under the
run's own cost settings, and sparsity is the same whether a stage ran or was restored."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import compose_cfg
from test_stage_cache import copy_of_dpq, other_version

from dpq.core import provenance
from dpq.core.config import list_options
from dpq.run.stage_cache import MANIFEST
from dpq.train import train

FAST = ["experiment=digits", "trainer=debug", "cost.repeats=1", "cost.warmup=0"]
# Measured wall-clock time: the only final figures a restored run may report differently.
TIMED = ("latency_ms_", "onnx_latency_ms_")  # measured anew by every run


def run(tmp_path: Path, name: str, *overrides: str) -> dict:
    cfg = compose_cfg(tmp_path / name, [*FAST, *overrides])
    cfg.paths.cache_dir = str(tmp_path / "cache")  # one cache for every run of the test
    return train(cfg)


def keep_prefixes(tmp_path: Path, n: int) -> None:
    """Evict every stage-cache entry of a prefix longer than ``n`` stages (the next run restores ``n``)."""
    for man in (tmp_path / "cache" / "stages").glob(f"*/{MANIFEST}"):
        if len(json.loads(man.read_text())["stages"]) > n:
            shutil.rmtree(man.parent)


def untimed(final: dict) -> dict:
    return {k: v for k, v in final.items() if not k.startswith(TIMED)}


def check_restores_match_cold(tmp_path: Path, count_fits: list, preset: str, prefixes) -> None:
    cold = run(tmp_path, "cold", f"pipeline={preset}")
    order = list(cold["order"])
    assert count_fits[0] == "teacher" and not any(r.get("cached") for r in cold["stages"])
    for n in prefixes:
        keep_prefixes(tmp_path, n)
        count_fits.clear()
        warm = run(tmp_path, f"restored{n}", f"pipeline={preset}")
        restored = [r for r in warm["stages"] if r.get("cached")]
        assert {r["stage"].split(".")[0] for r in restored} == set(order[:n]), n
        trained = {name.split(".")[0] for name in count_fits}  # spiral.r0.prune -> spiral
        assert trained <= set(order[n:]), (n, count_fits)  # nothing restored was trained
        want, got = untimed(cold["final"]), untimed(warm["final"])
        assert got.keys() == want.keys()
        diff = {k: (want[k], got[k]) for k in want if got[k] != want[k]}
        assert not diff, (preset, n, diff)


def test_a_dq_run_restored_before_or_after_quantize_reports_the_cold_sparsity(tmp_path, count_fits):
    """dq prunes nothing, yet 4-bit rounding leaves weights exactly zero: the sparsity layers come from
    the config's prune targets, not from module types (a restored quantized model has no nn.Linear)."""
    cold = run(tmp_path, "cold", "pipeline=dq")
    final = cold["final"]
    assert final["sparsity"] > 0 and set(final["sparsity_per_layer"]) == {"hidden.0"}
    for n, trained in ((2, ["quantize"]), (3, [])):  # quantize after a restored distill; all restored
        keep_prefixes(tmp_path, n)
        count_fits.clear()
        warm = run(tmp_path, f"restored{n}", "pipeline=dq")
        assert count_fits == trained
        assert warm["final"]["sparsity"] == final["sparsity"]
        assert warm["final"]["sparsity_per_layer"] == final["sparsity_per_layer"]
        assert untimed(warm["final"]) == untimed(final)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list_options("pipeline"))
def test_every_preset_restored_after_each_stage_reports_the_cold_final_metrics(tmp_path, count_fits, preset):
    from omegaconf import OmegaConf

    n_stages = len(OmegaConf.load(Path(__file__).parents[1] / "conf" / "pipeline" / f"{preset}.yaml").order)
    check_restores_match_cold(tmp_path, count_fits, preset, range(n_stages, 0, -1))


def test_one_edited_line_of_dpq_source_makes_the_next_run_miss_every_entry(
    tmp_path, count_fits, monkeypatch, caplog
):
    first = run(tmp_path, "a", "pipeline=dense")
    assert count_fits == ["teacher", "distill"]
    count_fits.clear()
    run(tmp_path, "same", "pipeline=dense")
    assert count_fits == []  # the same code: everything restored
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", copy_of_dpq(tmp_path, "prune/schedules.py"))
    count_fits.clear()
    with caplog.at_level(logging.INFO, logger="dpq"):
        second = run(tmp_path, "b", "pipeline=dense")
    assert count_fits == ["teacher", "distill"]  # the teacher cache misses too
    assert not any(r.get("cached") for r in second["stages"])
    assert "stage cache: 2 entries from other dpq code ignored" in caplog.text
    assert second["final"]["accuracy"] == first["final"]["accuracy"]  # (the edit was a comment)


@pytest.mark.slow
@pytest.mark.parametrize(
    "change", ["torchao", "gradient_clip_val"], ids=["torchao version", "trainer.gradient_clip_val"]
)
def test_another_torchao_version_or_gradient_clip_makes_the_next_run_miss_every_entry(
    tmp_path, count_fits, monkeypatch, caplog, change
):
    run(tmp_path, "a", "pipeline=dense")
    count_fits.clear()
    extra = []
    if change == "torchao":
        other_version(monkeypatch, "torchao", "0.1.0")
    else:
        extra = ["trainer.gradient_clip_val=0.25"]
    with caplog.at_level(logging.INFO, logger="dpq"):
        second = run(tmp_path, "b", "pipeline=dense", *extra)
    assert count_fits == ["teacher", "distill"]
    assert not any(r.get("cached") for r in second["stages"])
    if change == "torchao":
        assert "2 entries from other library versions ignored" in caplog.text


def test_a_cached_run_with_another_cost_batch_size_reports_cost_measured_at_that_batch_size(
    tmp_path, count_fits
):
    one = run(tmp_path, "b1", "pipeline=dense", "cost.batch_size=1")
    count_fits.clear()
    two = run(tmp_path, "b2", "pipeline=dense", "cost.batch_size=2")
    assert count_fits == ["distill"]  # no entry measured at batch 1 is reused (the teacher cache is)
    count_fits.clear()
    cached = run(tmp_path, "b2-again", "pipeline=dense", "cost.batch_size=2")
    assert count_fits == [] and all(r.get("cached") for r in cached["stages"])
    for res in (two, cached):
        assert res["cost_conditions"]["batch_size"] == 2
        for a, b in zip(one["stages"], res["stages"]):
            assert b["metrics"]["batch_size"] == 2
            assert b["metrics"]["dense_gflops"] == pytest.approx(2 * a["metrics"]["dense_gflops"])
            assert b["metrics"]["params_total"] == a["metrics"]["params_total"]
