"""dpq.pareto on hand-built points and results: the front, objectives, gathering, seed merging, compare, CLI errors."""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpq.core.errors import ConfigError
from dpq.pareto import OBJECTIVES, pareto_mask, parse_objectives
from dpq.pareto.aggregate import add_objectives, merge_seeds
from dpq.pareto.cli import build_report
from dpq.pareto.cli import main as cli_main
from dpq.pareto.compare import compare
from dpq.pareto.front import step_order
from dpq.pareto.gather import _flatten, find_results, gather, identity, is_sweep_id, points_from_results

# --------------------------------------------------------------------------- the front


def test_front_two_objectives_max_and_min():
    # (accuracy: max, cost: min)
    pts = [(0.90, 1.0), (0.85, 0.5), (0.80, 0.7), (0.95, 3.0), (0.70, 0.4), (0.92, 3.5)]
    assert pareto_mask(pts, ["max", "min"]).tolist() == [True, True, False, True, True, False]


def test_front_ties_in_one_objective_and_exact_duplicates():
    pts = [(0.9, 1.0), (0.9, 2.0), (0.9, 1.0), (0.8, 0.5), (0.8, 0.5), (0.8, 0.6)]
    # equal accuracy, higher cost: dominated; exact duplicates: both on the front
    assert pareto_mask(pts, ["max", "min"]).tolist() == [True, False, True, True, True, False]
    # all points identical: nobody dominates anybody
    assert pareto_mask([(1, 1)] * 4, ["max", "min"]).all()


def test_front_three_objectives():
    # accuracy max, GFLOPs min, latency min
    pts = [
        (0.90, 1.0, 5.0),
        (0.90, 1.0, 4.0),
        (0.85, 0.5, 9.0),
        (0.80, 0.6, 9.5),
        (0.95, 2.0, 6.0),
        (0.80, 2.0, 1.0),
    ]
    assert pareto_mask(pts, ["max", "min", "min"]).tolist() == [False, True, True, False, True, True]
    # dropping the third objective changes the answer: (0.80, 2.0) is then dominated
    assert pareto_mask([p[:2] for p in pts], ["max", "min"]).tolist() == [
        True,
        True,
        True,
        False,
        True,
        False,
    ]


def test_front_sense_flips_the_answer():
    pts = np.array([(1.0, 1.0), (2.0, 2.0), (1.5, 0.5)])
    assert pareto_mask(pts, ["min", "min"]).tolist() == [True, False, True]
    assert pareto_mask(pts, ["max", "max"]).tolist() == [False, True, False]
    assert pareto_mask(pts, ["max", "min"]).tolist() == [False, True, True]
    assert pareto_mask(pts, ["min", "max"]).tolist() == [True, True, False]


def test_front_missing_values_and_bad_input():
    pts = [(0.9, np.nan), (0.5, 1.0), (0.99, 0.1)]
    assert pareto_mask(pts, ["max", "min"]).tolist() == [False, False, True]
    assert pareto_mask(np.zeros((0, 2)), ["max", "min"]).tolist() == []
    with pytest.raises(ValueError, match="senses"):
        pareto_mask(pts, ["max"])
    with pytest.raises(ValueError, match="'max' or 'min'"):
        pareto_mask(pts, ["max", "smallest"])


def test_front_agrees_with_brute_force_on_random_points():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 6, size=(300, 3)).astype(float)  # many ties and duplicates
    senses = ["max", "min", "min"]
    sign = np.array([-1, 1, 1])
    m = pts * sign
    brute = [
        not any((m[j] <= m[i]).all() and (m[j] < m[i]).any() for j in range(len(m))) for i in range(len(m))
    ]
    assert pareto_mask(pts, senses).tolist() == brute


def test_step_order_follows_the_cost_direction():
    order, where = step_order([3.0, 1.0, 2.0], "min")
    assert order.tolist() == [1, 2, 0] and where == "post"
    assert step_order([3.0, 1.0], "max")[1] == "pre"


# --------------------------------------------------------------------------- objectives


def test_objectives_by_name_with_direction_override():
    objs = parse_objectives(["accuracy", "size_mb", "latency_ms:max"])
    assert [(o.name, o.metric, o.sense, o.scale) for o in objs] == [
        ("accuracy", "accuracy", "max", 1.0),
        ("size_mb", "size_bytes", "min", 1e-6),
        ("latency_ms", "latency_ms_median", "max", 1.0),
    ]
    assert OBJECTIVES["gbops"].unit == "GBOPs" and "lower is better" in OBJECTIVES["effective_gflops"].title
    assert [o.name for o in parse_objectives(["accuracy", "bops", "dense_bops:max"])] == [
        "accuracy",
        "gbops",
        "dense_gbops",
    ]  # the recorded metrics' names are accepted for them


def test_no_scaled_objective_takes_a_recorded_metrics_column():
    metrics = {o.metric for o in OBJECTIVES.values()}
    for o in OBJECTIVES.values():
        if o.scale != 1.0:
            assert o.name not in metrics, (
                f"{o.name} would replace the recorded {o.name} with its scaled value"
            )


@pytest.mark.parametrize(
    "specs, match",
    [
        (["accuracy", "gflops"], "effective_gflops"),  # the message lists the allowed names
        (["accuracy"], "two or three"),
        (["accuracy", "size_mb", "bops", "latency_ms"], "two or three"),
        (["accuracy", "accuracy:min"], "once"),
        (["accuracy", "size_mb:lowest"], "max or min"),
    ],
)
def test_bad_objectives_are_config_errors(specs, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_objectives(specs)
    assert e.value.key == "--objectives"


# --------------------------------------------------------------------------- results.json -> points


def fake_results(
    pipeline: str,
    seed: int,
    acc: float,
    gflops: float,
    sparsity: float = 0.5,
    bits: int = 4,
    teacher_acc: float = 0.95,
    dense_acc: float = 0.9,
    lr: float = 1e-3,
) -> dict:
    """A results.json shaped like dpq.train writes it (only what dpq.pareto reads)."""
    orders = {
        "dq": ["teacher", "distill", "quantize"],
        "dpq": ["teacher", "distill", "prune", "recover", "quantize"],
        "dense": ["teacher", "distill"],
    }
    order = orders[pipeline]
    stages = {
        "teacher": {"kind": "teacher", "epochs": 2},
        "distill": {"kind": "distill", "lr": lr},
        "prune": {"kind": "prune", "final_sparsity": sparsity},
        "recover": {"kind": "recover"},
        "quantize": {"kind": "quantize", "bits": bits},
    }
    cfg = {
        "task": {"name": "toy"},
        "teacher": {"name": "big"},
        "model": {"name": "small"},
        "seed": seed,
        "run_name": f"{pipeline}-s{seed}",
        "paths": {"output_dir": f"/x/{pipeline}{seed}"},
        "logger": {"kind": "none"},
        "cost": {"batch_size": 1},
        "pipeline": {"name": pipeline, "order": order, "stages": stages},
    }

    def m(a, g):
        return {
            "accuracy": a,
            "effective_gflops": g,
            "size_bytes": g * 1e6,
            "latency_ms_median": g,
            "bops": g * 1e9,
            "device": "cpu",
            "threads": 2,
            "flops_convention": "fvcore",
        }

    records = [
        {"stage": "teacher", "kind": "teacher", "model": "teacher", "metrics": m(teacher_acc, 10.0)},
        {"stage": "distill", "kind": "distill", "model": "student", "metrics": m(dense_acc, 2.0)},
    ]
    records += [
        {"stage": s, "kind": stages[s]["kind"], "model": "student", "metrics": m(acc, gflops)}
        for s in order[2:]
    ]
    return {
        "status": "completed",
        "run_name": cfg["run_name"],
        "pipeline": pipeline,
        "order": order,
        "seed": seed,
        "config": cfg,
        "stages": records,
        "final": {"stage": order[-1], "model": "student", **m(acc, gflops)},
    }


def compare_cli(runs, out, *extra: str) -> int:
    """``python -m dpq.pareto compare --baseline dq --candidate dpq RUNS -o OUT EXTRA...``"""
    return cli_main(
        [
            "compare",
            str(runs),
            "--baseline",
            "dq",
            "--candidate",
            "dpq",
            "--no-progress",
            "-o",
            str(out),
            *extra,
        ]
    )


def write_runs(root, runs: dict[str, dict]):
    for name, res in runs.items():
        d = root / name
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(res))
    return root


def test_points_carry_final_teacher_and_dense_with_their_knobs():
    pts = points_from_results(fake_results("dpq", 1, 0.88, 0.55, sparsity=0.2), "run0")
    by = {p["kind"]: p for p in pts}
    assert set(by) == {"final", "teacher", "dense"}
    assert (by["final"]["accuracy"], by["final"]["final_sparsity"], by["final"]["bits"]) == (0.88, 0.2, 4)
    assert by["final"]["label"] == "dpq 0.2 sparse 4-bit" and by["final"]["seed"] == 1
    assert (by["teacher"]["accuracy"], by["teacher"]["final_sparsity"], by["teacher"]["bits"]) == (
        0.95,
        0.0,
        None,
    )
    assert by["dense"]["accuracy"] == 0.9 and by["dense"]["order"] == "teacher → distill"
    assert by["final"]["device"] == "cpu" and by["final"]["flops_convention"] == "fvcore"


def test_a_structured_spiral_is_labelled_with_its_rounds_granularity():
    """The spiral keeps the granularity in its rounds' prune settings; it was labelled 'sparse'
    (unstructured) before, beside dpq and pd points of the same heads+neurons shape."""
    run = Path(__file__).parents[1] / "bench" / "results" / "deploy" / "deploy70spiral-s42"
    final = next(
        p
        for p in points_from_results(json.loads((run / "results.json").read_text()), "s")
        if p["kind"] == "final"
    )
    assert final["granularity"] == "heads+neurons" and final["final_sparsity"] == 0.7
    assert final["label"].startswith("spiral 0.7 heads+neurons")


def test_per_layer_overrides_and_a_flops_target_are_in_the_label():
    """The 50% heads / 81% neurons mix was labelled "dpq 0.5 heads+neurons W4A8", as if every
    layer lost half its groups; its label now names the override (and a FLOPs target its budget)."""
    run = Path(__file__).parents[1] / "bench" / "results" / "deploy_epyc" / "deploy70mix-s42"
    res = json.loads((run / "results.json").read_text())
    final = next(p for p in points_from_results(res, "s") if p["kind"] == "final")
    assert final["label"] == "dpq 0.5 heads+neurons [intermediate.dense 0.81] W4A8"
    prune = res["config"]["pipeline"]["stages"]["prune"]
    prune.update(overrides={}, flops_target=0.3)
    final = next(p for p in points_from_results(res, "s") if p["kind"] == "final")
    assert final["label"] == "dpq 0.5 heads+neurons [0.3 of dense GFLOPs] W4A8"
    prune.update(flops_target=None)
    final = next(p for p in points_from_results(res, "s") if p["kind"] == "final")
    assert final["label"] == "dpq 0.5 heads+neurons W4A8"


def test_the_exported_models_runtime_cost_is_an_objective_of_final_points():
    res = fake_results("dpq", 1, 0.88, 0.55)
    res["final"].update(onnx_accuracy=0.87, onnx_latency_ms_median=2.5, onnx_size_bytes=8e6)
    fast = fake_results("dq", 1, 0.86, 0.60)
    fast["final"].update(onnx_accuracy=0.86, onnx_latency_ms_median=1.5, onnx_size_bytes=9e6)
    objs = parse_objectives(["onnx_accuracy", "onnx_latency_ms"])
    assert [(o.metric, o.sense) for o in objs] == [
        ("onnx_accuracy", "max"),
        ("onnx_latency_ms_median", "min"),
    ]
    pts = [p for r in (res, fast) for p in points_from_results(r, r["run_name"]) if p["kind"] == "final"]
    df = add_objectives(pd.DataFrame(pts), objs)
    # by PyTorch's cost the dpq point dominates; by what ONNX Runtime measures, both are on the front
    assert pareto_mask(df[[o.name for o in objs]].to_numpy(), [o.sense for o in objs]).tolist() == [
        True,
        True,
    ]


def test_post_training_quantization_and_activation_bits_are_read_from_any_stage_with_bits():
    res = fake_results("dq", 1, 0.9, 1.0)
    res["config"]["pipeline"]["stages"]["quantize"] = {"kind": "ptq", "bits": 8, "act_bits": 8}
    final = next(p for p in points_from_results(res, "r") if p["kind"] == "final")
    assert (final["bits"], final["act_bits"], final["label"]) == (8, 8, "dq W8A8")


def test_config_identity_ignores_seed_paths_and_unused_stages():
    a, b = fake_results("dq", 1, 0.9, 1.0, sparsity=0.2), fake_results("dq", 2, 0.9, 1.0, sparsity=0.8)
    # dq never prunes: its (unused) prune sparsity and the seed do not make it another configuration
    assert identity(a["config"]) == identity(b["config"])
    c = fake_results("dpq", 1, 0.9, 1.0, sparsity=0.2)
    d = fake_results("dpq", 1, 0.9, 1.0, sparsity=0.8)
    assert identity(c["config"]) != identity(d["config"])
    # ...but their teacher and dense references are the same configuration
    assert identity(c["config"], ["teacher", "distill"]) == identity(d["config"], ["teacher", "distill"])


def test_merge_seeds_mean_std_and_shared_references(tmp_path):
    write_runs(
        tmp_path,
        {
            "dq_s1": fake_results("dq", 1, 0.90, 1.0, dense_acc=0.91),
            "dq_s2": fake_results("dq", 2, 0.86, 1.2, dense_acc=0.89),
            "dq_s2_again": fake_results(
                "dq", 2, 0.88, 1.2, dense_acc=0.89, sparsity=0.8
            ),  # same seed once more
            "dpq_s1": fake_results("dpq", 1, 0.84, 0.6, dense_acc=0.91),
        },
    )
    runs = gather([str(tmp_path)], progress=False)
    assert len(runs[runs["kind"] == "final"]) == 4
    merged = merge_seeds(runs).set_index(["kind", "label"])
    dq = merged.loc[("final", "dq 4-bit")]
    # seed 2 is averaged first (0.87), then across seeds: mean(0.90, 0.87), std with ddof=1
    assert dq["n_seeds"] == 2 and dq["n_runs"] == 3 and dq["seeds"] == "1,2"
    assert dq["accuracy"] == pytest.approx(0.885)
    assert dq["accuracy_std"] == pytest.approx(np.std([0.90, 0.87], ddof=1))
    assert dq["effective_gflops"] == pytest.approx(1.1)
    assert merged.loc[("final", "dpq 0.5 sparse 4-bit"), "accuracy_std"] == 0.0
    # one teacher and one dense point for the whole grid, merged over its seeds
    assert merged.loc[("teacher", "teacher"), "n_runs"] == 4
    assert merged.loc[("dense", "dense student"), "accuracy"] == pytest.approx(np.mean([0.91, 0.89]))
    # objective columns in their units, std included
    pts = add_objectives(merge_seeds(runs), parse_objectives(["accuracy", "size_mb"]))
    row = pts[pts["label"] == "dq 4-bit"].iloc[0]
    assert row["size_mb"] == pytest.approx(1.1) and row["size_mb_std"] == pytest.approx(
        np.std([1.0, 1.2], ddof=1)
    )


def test_find_results_folders_globs_files_and_wandb_copies(tmp_path):
    write_runs(
        tmp_path / "multi", {"0_a": fake_results("dq", 1, 0.9, 1), "1_b": fake_results("dq", 2, 0.9, 1)}
    )
    (tmp_path / "multi" / "0_a" / "wandb" / "run-1" / "files").mkdir(parents=True)
    (tmp_path / "multi" / "0_a" / "wandb" / "run-1" / "files" / "results.json").write_text("{}")
    assert [p.parent.name for p in find_results([str(tmp_path / "multi")])] == ["0_a", "1_b"]
    assert len(find_results([str(tmp_path / "multi" / "*_a")])) == 1
    # the same run named twice counts once
    assert (
        len(find_results([str(tmp_path / "multi" / "0_a"), str(tmp_path / "multi" / "0_a" / "results.json")]))
        == 1
    )
    with pytest.raises(ConfigError, match="no such file"):
        find_results([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no results.json"):
        find_results([str(tmp_path / "empty")])


def test_unfinished_runs_are_skipped(tmp_path):
    res = fake_results("dq", 1, 0.9, 1)
    write_runs(
        tmp_path, {"ok": res, "diverged": {"status": "diverged", "stages": [], "config": res["config"]}}
    )
    runs = gather([str(tmp_path)], progress=False)
    assert list(runs.loc[runs["kind"] == "final", "run"]) == ["ok"]


def test_sweep_ids_are_told_from_paths(tmp_path):
    assert is_sweep_id("me/dpq/abc123") and is_sweep_id("wandb:me/dpq/abc123")
    assert not is_sweep_id(str(tmp_path)) and not is_sweep_id("outputs/*/x")


# --------------------------------------------------------------------------- compare


def grid(tmp_path):
    return write_runs(
        tmp_path,
        {
            "dq1": fake_results("dq", 1, 0.90, 0.68),
            "dq2": fake_results("dq", 2, 0.92, 0.70),
            "a1": fake_results("dpq", 1, 0.88, 0.55, sparsity=0.2),
            "a2": fake_results("dpq", 2, 0.89, 0.56, sparsity=0.2),
            "b1": fake_results("dpq", 1, 0.80, 0.30, sparsity=0.8),
        },
    )


def test_compare_paired_by_seed(tmp_path):
    runs = gather([str(grid(tmp_path))], references=False, progress=False)
    out = compare(runs, "dq", "dpq")
    assert [r["candidate"]["label"] for r in out] == ["dpq 0.2 sparse 4-bit", "dpq 0.8 sparse 4-bit"]
    a, b = out
    assert a["pairing"] == "paired by seed" and a["seeds"] == [1, 2]
    d = [0.88 - 0.90, 0.89 - 0.92]
    assert a["deltas"]["accuracy"]["mean"] == pytest.approx(np.mean(d))
    assert a["deltas"]["accuracy"]["std"] == pytest.approx(np.std(d, ddof=1))
    half = 12.706204736 * np.std(d, ddof=1) / np.sqrt(2)  # t(0.975, 1 df): two seeds bound little
    assert a["deltas"]["accuracy"]["ci_low"] == pytest.approx(np.mean(d) - half)
    assert a["deltas"]["accuracy"]["ci_high"] == pytest.approx(np.mean(d) + half)
    r = [0.55 / 0.68, 0.56 / 0.70]
    assert a["ratios"]["effective_gflops"]["mean"] == pytest.approx(np.mean(r))
    assert a["ratios"]["effective_gflops"]["std"] == pytest.approx(np.std(r, ddof=1))
    assert a["baseline"]["accuracy"]["mean"] == pytest.approx(0.91) and a["baseline"]["seeds"] == [1, 2]
    # the 0.8 candidate has one seed: paired on it alone
    assert b["seeds"] == [1] and b["deltas"]["accuracy"] == {
        "mean": pytest.approx(-0.10),
        "std": 0.0,
        "n": 1,
        "ci_low": None,  # one seed bounds nothing
        "ci_high": None,
        "level": 0.95,
    }
    only = compare(runs, "dq", "dpq,final_sparsity=0.8")
    assert len(only) == 1 and only[0]["candidate"]["final_sparsity"] == 0.8


def test_compare_unpaired_propagates_spread(tmp_path):
    write_runs(
        tmp_path,
        {
            "dq1": fake_results("dq", 1, 0.90, 1.0),
            "dq2": fake_results("dq", 2, 0.92, 1.2),
            "c3": fake_results("dpq", 3, 0.85, 0.5),
            "c4": fake_results("dpq", 4, 0.87, 0.7),
        },
    )
    [r] = compare(gather([str(tmp_path)], references=False, progress=False), "dq", "dpq")
    assert r["pairing"].startswith("unpaired")
    sd = np.std([0.90, 0.92], ddof=1)
    assert r["deltas"]["accuracy"]["mean"] == pytest.approx(0.86 - 0.91)
    assert r["deltas"]["accuracy"]["std"] == pytest.approx(np.hypot(sd, sd))
    # Welch: equal spreads and sizes give 2 degrees of freedom; standard error sqrt(2 sd^2 / 2)
    half = 4.302652730 * sd
    assert r["deltas"]["accuracy"]["ci_low"] == pytest.approx(0.86 - 0.91 - half)
    assert r["deltas"]["accuracy"]["ci_high"] == pytest.approx(0.86 - 0.91 + half)
    ratio = 0.6 / 1.1
    rel = np.hypot(np.std([1.0, 1.2], ddof=1) / 1.1, np.std([0.5, 0.7], ddof=1) / 0.6)
    assert r["ratios"]["effective_gflops"]["mean"] == pytest.approx(ratio)
    assert r["ratios"]["effective_gflops"]["std"] == pytest.approx(ratio * rel)


def test_intervals_of_the_mean_and_their_verdicts():
    from dpq.pareto.stats import mean_interval, t_quantile, verdict

    assert t_quantile(2) == pytest.approx(4.302652730) and t_quantile(1e9) == pytest.approx(
        1.959964, abs=1e-5
    )
    s = mean_interval([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["n"]) == (2.0, 1.0, 3)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((2 - 4.302652730 / 3**0.5, 2 + 4.302652730 / 3**0.5))
    assert verdict(s, -0.5) == "met" and verdict(s, 5.0) == "missed" and verdict(s, 1.0) == "unresolved"
    assert verdict(mean_interval([3.0]), 0.0) == "unresolved"  # one value: no interval, no claim


def test_compare_prints_the_interval(tmp_path, capsys):
    from dpq.pareto.compare import fmt, print_comparison

    out = compare(gather([str(grid(tmp_path))], references=False, progress=False), "dq", "dpq")
    d = out[0]["deltas"]["accuracy"]
    assert fmt(d, signed=True, interval=True) == (
        f"{d['mean']:+.4f} ± {d['std']:.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
    )
    print_comparison(out)
    assert "95% interval of the mean" in capsys.readouterr().out


def test_compare_selector_errors(tmp_path):
    runs = gather([str(grid(tmp_path))], references=False, progress=False)
    with pytest.raises(ConfigError, match="pipelines found: dpq, dq"):
        compare(runs, "quant_only", "dpq")
    with pytest.raises(ConfigError, match="2 configurations"):
        compare(runs, "dpq", "dq")  # two dpq configurations: the baseline must be one
    with pytest.raises(ConfigError, match=r"no run matches 'bits=8'; the dq runs have bits: 4$"):
        compare(runs, "dq,bits=8", "dpq")  # what the filter could have said
    with pytest.raises(ConfigError, match=r"the dpq runs that match the filters before it have bits: 4$"):
        compare(runs, "dq", "dpq,final_sparsity=0.2,bits=8")
    for empty in ("", " , "):  # was an uncaught ValueError of the unpacking
        with pytest.raises(ConfigError, match="a pipeline name, optionally with column=value filters"):
            compare(runs, empty, "dpq")


def test_compare_filters_match_null_and_true_false_as_typed(tmp_path):
    runs = {}
    for name, seed, sparsity, shrink in (("a1", 1, 0.2, True), ("b1", 1, 0.8, False)):
        res = fake_results("dpq", seed, 0.88, 0.5, sparsity=sparsity)
        res["config"]["pipeline"]["stages"]["prune"].update(flops_target=None, shrink=shrink)
        runs[name] = res
    runs["dq1"] = fake_results("dq", 1, 0.9, 0.68)
    gathered = gather([str(write_runs(tmp_path, runs))], references=False, progress=False)
    key = "pipeline.stages.prune"
    # null in every run is still a key of theirs (it was "neither a column nor a config key")
    assert len(compare(gathered, "dq", f"dpq,{key}.flops_target=null")) == 2
    (out,) = compare(gathered, "dq", f"dpq,{key}.shrink=true")  # YAML's spelling matched nothing
    assert out["candidate"]["label"] == "dpq 0.2 sparse 4-bit"
    (out,) = compare(gathered, "dq", f"dpq,{key}.shrink=false")
    assert out["candidate"]["label"] == "dpq 0.8 sparse 4-bit"
    with pytest.raises(ConfigError, match="nor a config key"):
        compare(gathered, "dq", f"dpq,{key}.no_such_key=1")


def test_sparsity_is_not_the_quality_a_front_is_owned_by():
    from dpq.pareto.objectives import parse_objectives

    objectives = parse_objectives(["sparsity", "accuracy"])
    assert [o.name for o in objectives if o.is_quality] == ["accuracy"]
    assert not any(o.is_cost for o in objectives)


# --------------------------------------------------------------------------- CLI errors


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    write_runs(tmp_path, {"r": fake_results("dq", 1, 0.9, 1.0)})
    assert cli_main([str(tmp_path), "--objectives", "accuracy,flops"]) == 2
    err = capsys.readouterr().err
    assert "--objectives='flops'" in err and "effective_gflops" in err and "Traceback" not in err
    assert cli_main([str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no inputs at all: argparse usage error
        cli_main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # a W&B project without --wandb logged nothing, unsaid
        cli_main([str(tmp_path), "--wandb-project", "mine"])
    assert e.value.code == 2 and "need --wandb" in capsys.readouterr().err


def test_cli_sweep_id_offline_says_why(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "WANDB_MODE": "offline",
        "NETRC": str(tmp_path / "none"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "dpq.pareto", "someone/dpq/abc123"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "needs W&B online" in proc.stderr and "Traceback" not in proc.stderr
    assert "no such folder; as a W&B sweep" in proc.stderr  # a mistyped a/b/c folder reads as a sweep id


def test_an_explicit_wandb_sweep_offline_is_not_called_a_missing_folder(monkeypatch):
    from dpq.pareto.gather import load_sweep

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ConfigError, match="needs W&B online") as e:
        load_sweep("wandb:someone/dpq/abc123")
    assert "no such folder" not in str(e.value)


def test_cli_refuses_a_named_baseline_no_run_has_and_an_output_folder_it_cannot_make(tmp_path, capsys):
    grid(tmp_path / "runs")
    (tmp_path / "a_file").write_text("")
    assert cli_main([str(tmp_path / "runs"), "--no-progress", "--baseline", "qd"]) == 2
    assert (
        "--baseline='qd': no run has this pipeline; the runs' pipelines: dpq, dq" in capsys.readouterr().err
    )
    assert cli_main([str(tmp_path / "runs"), "--no-progress", "-o", str(tmp_path / "a_file" / "out")]) == 2
    assert "cannot be created as a folder" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "pareto").exists()


def test_cli_writes_tables_that_flag_the_front(tmp_path):
    grid(tmp_path / "runs")
    assert cli_main([str(tmp_path / "runs"), "--no-progress", "-O", "accuracy,effective_gflops"]) == 0
    out = tmp_path / "runs" / "pareto"
    table = pd.read_csv(out / "pareto.csv")
    assert table.equals(table) and set(pd.read_parquet(out / "pareto.parquet")["label"]) == set(
        table["label"]
    )
    front = dict(zip(table["label"], table["pareto"]))
    # teacher (0.95 @ 10), dense (0.9 @ 2), dq (0.91 @ 0.69), dpq 0.2 (0.885 @ 0.555), dpq 0.8 (0.80 @ 0.30)
    assert front == {
        "teacher": True,
        "dense student": False,
        "dq 4-bit": True,
        "dpq 0.2 sparse 4-bit": True,
        "dpq 0.8 sparse 4-bit": True,
    }
    assert (out / "pareto.png").stat().st_size > 10_000 and (out / "pareto.html").exists()
    assert len(pd.read_csv(out / "runs.csv").query("kind == 'final'")) == 5


class FakeFile:
    """A W&B run's uploaded file (``payload`` None: never uploaded)."""

    def __init__(self, payload):
        self.payload = payload

    def download(self, root, replace):
        if self.payload is None:
            raise ValueError("file not found")
        path = Path(root) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.payload))
        return open(path)


class FakeRun:
    """A W&B sweep run: its state, uploaded results.json (or None), config and summary."""

    def __init__(self, rid, state, payload, config, summary):
        self.id, self.state, self.path, self.name = rid, state, ["me", "dpq", rid], rid
        self.payload, self.config, self.summary = payload, config, summary

    def file(self, name):
        assert name == "results.json"
        return FakeFile(self.payload)


def fake_wandb_sweep(monkeypatch, runs: list[FakeRun]) -> list[str]:
    """wandb.Api stood in for (no network here): its sweep holds ``runs``; returns the sweep paths asked."""
    import wandb

    from dpq.pareto import gather as gather_mod

    asked = []

    class Api:
        def __init__(self, timeout=None):
            pass

        def sweep(self, path):
            asked.append(path)
            return type("Sweep", (), {"runs": runs})()

    monkeypatch.setattr(gather_mod, "wandb_online", lambda: True)
    monkeypatch.setattr(wandb, "Api", Api)
    return asked


def test_sweep_runs_are_read_through_the_wandb_api(tmp_path, monkeypatch):
    """No network here: a stand-in for wandb.Api with one run that uploaded results.json and one that did not."""
    full = fake_results("dpq", 1, 0.88, 0.55, sparsity=0.2)
    old = fake_results("dq", 1, 0.90, 0.68)
    asked = fake_wandb_sweep(
        monkeypatch,
        [
            FakeRun("r1", "finished", full, {}, {}),
            FakeRun(
                "r2", "finished", None, old["config"], {"final/accuracy": 0.9, "final/effective_gflops": 0.68}
            ),
            FakeRun("r3", "crashed", None, {}, {}),
        ],
    )
    pts = gather(["me/dpq/abc123"], progress=False)
    assert asked == ["me/dpq/abc123"]
    finals = pts[pts["kind"] == "final"].set_index("run")
    assert sorted(finals.index) == ["me/dpq/r1", "me/dpq/r2"]  # the crashed run is skipped
    assert (
        finals.loc["me/dpq/r1", "label"] == "dpq 0.2 sparse 4-bit"
        and finals.loc["me/dpq/r1", "accuracy"] == 0.88
    )
    assert (
        finals.loc["me/dpq/r2", "label"] == "dq 4-bit" and finals.loc["me/dpq/r2", "effective_gflops"] == 0.68
    )
    assert set(pts.loc[pts["run"] == "me/dpq/r1", "kind"]) == {"final", "teacher", "dense"}


def test_point_labels_do_not_overlap_each_other_or_markers():
    """A study's points crowd (dq and dpq 0.2 a few pixels apart, several configs at one FLOP
    count): every label gets a slot of its own, and a label moved off its point gets a leader line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from dpq.pareto.plots import place_labels

    xs = [0.275, 0.270, 0.180, 0.180, 0.122, 0.140, 0.146, 0.112, 0.078]
    ys = [0.859, 0.858, 0.858, 0.856, 0.858, 0.865, 0.862, 0.842, 0.795]
    labels = [f"config number {i} 4-bit" for i in range(len(xs))]
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    ax.scatter(xs, ys, s=40)
    ax.set_xlim(0.05, 0.72)
    fig.tight_layout()
    anns = place_labels(ax, labels, xs, ys, avoid=[(0.35, 0.856)])
    r = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(a, r) for a in anns]
    assert sorted(a.get_text() for a in anns) == sorted(labels)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    half = 3.5 * fig.dpi / 72
    marks = ax.transData.transform(list(zip(xs, ys)) + [(0.35, 0.856)])
    for box in boxes:
        for x, y in marks:
            assert not (box.x0 < x + half and x - half < box.x1 and box.y0 < y + half and y - half < box.y1)
    frame = ax.get_window_extent(r)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)  # nothing cut off at the edges
    # the two points 2 px apart cannot both sit beside their marker: one label is moved and linked
    assert any(a.arrow_patch is not None for a in anns)
    assert all(
        a.arrow_patch is None for a in anns if a.get_text() == labels[-1]
    )  # a lone point keeps its label beside it
    plt.close(fig)


def test_a_dense_pipeline_run_is_drawn_once_as_the_dense_student(tmp_path):
    """``pipeline=dense`` ends at its distillation: its final point is the dense-student reference
    and is drawn as the diamond only, not a second time (with a legend entry) beneath it."""
    import matplotlib.pyplot as plt

    from dpq.pareto.plots import figure

    runs = {f"dense_s{s}": fake_results("dense", s, 0.9, 2.0) for s in (1, 2)}
    runs |= {f"dq_s{s}": fake_results("dq", s, 0.88, 0.3) for s in (1, 2)}
    out = build_report(
        [str(write_runs(tmp_path, runs))], ["accuracy", "effective_gflops"], tmp_path / "o", progress=False
    )
    points = out["points_df"]
    assert len(points.query("kind == 'final' and pipeline == 'dense'")) == 1  # still in the tables
    fig = figure(points, out["objectives"])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "dense student (distilled)" in legend and "dq: teacher → distill → quantize" in legend
    assert not any(t.startswith("dense:") for t in legend)
    drawn = [tuple(o) for c in fig.axes[0].collections for o in c.get_offsets()]
    assert drawn.count((2.0, 0.9)) == 1
    plt.close(fig)


def test_task_metrics_are_objectives_and_the_primary_one_is_the_default(tmp_path):
    mcc, val_f1 = parse_objectives(["mcc", "val_f1"])
    assert (mcc.sense, mcc.unit) == ("max", "-1..1") and "higher is better" in mcc.title
    assert val_f1.metric == "val_f1" and val_f1.label == "validation F1 of the positive label"

    def with_f1(res: dict, f1s: list[float]) -> dict:
        res["config"]["task"]["primary_metric"] = "mcc"
        for rec, f in zip(res["stages"], f1s):
            rec["metrics"].update(mcc=f - 0.5, f1=f)
        res["final"].update(mcc=f1s[-1] - 0.5, f1=f1s[-1])
        return res

    write_runs(
        tmp_path / "runs",
        {
            "dq": with_f1(fake_results("dq", 1, 0.91, 0.69), [0.9, 0.8, 0.7]),
            "dpq": with_f1(fake_results("dpq", 1, 0.9, 0.3), [0.9, 0.8, 0.6, 0.6, 0.75]),
        },
    )
    assert cli_main([str(tmp_path / "runs"), "--no-progress"]) == 0  # -O primary,effective_gflops
    table = pd.read_csv(tmp_path / "runs" / "pareto" / "pareto.csv")
    finals = table[table["kind"] == "final"].set_index("pipeline")
    assert finals.loc["dq", "mcc"] == pytest.approx(0.2) and finals.loc["dpq", "mcc"] == pytest.approx(0.25)
    # On MCC (the primary metric) dpq dominates dq; on accuracy dq (0.91 vs 0.90) would be on the front too.
    assert finals["pareto"].to_dict() == {"dq": False, "dpq": True}
    html = (tmp_path / "runs" / "pareto" / "pareto.html").read_text()
    assert mcc.title in html and "<th>f1</th>" in html  # the axis, and a table column
    assert (
        cli_main(
            [
                str(tmp_path / "runs"),
                "--no-progress",
                "-O",
                "accuracy,effective_gflops",
                "-o",
                str(tmp_path / "acc"),
            ]
        )
        == 0
    )
    by_acc = pd.read_csv(tmp_path / "acc" / "pareto.csv").query("kind == 'final'").set_index("pipeline")
    assert by_acc["pareto"].to_dict() == {"dq": True, "dpq": True}
    compared = compare(gather([str(tmp_path / "runs")], progress=False), "dq", "dpq")[0]
    assert compared["deltas"]["mcc"]["mean"] == pytest.approx(0.05)


def test_configurations_sharing_a_label_are_told_apart_by_their_settings(tmp_path):
    def run(seed, criterion=None, epochs=None):
        res = fake_results("dpq", seed, 0.85, 0.1, sparsity=0.8)
        prune = res["config"]["pipeline"]["stages"]["prune"]
        if criterion:
            prune["criterion"] = criterion
        if epochs:
            prune["epochs"] = epochs
        return res

    write_runs(
        tmp_path,
        {
            "taylor_s1": run(1, "taylor"),
            "taylor_s2": run(2, "taylor"),
            "obs_s1": run(1, "obs", epochs=4),
            "dq_s1": fake_results("dq", 1, 0.86, 0.3),
        },
    )
    runs = gather([str(tmp_path)], progress=False)
    finals = runs[runs["kind"] == "final"].set_index("run")["label"]
    assert (
        finals["taylor_s1"]
        == finals["taylor_s2"]
        == "dpq 0.8 sparse 4-bit (prune.criterion=taylor, prune.epochs=unset)"
    )
    assert finals["obs_s1"] == "dpq 0.8 sparse 4-bit (prune.criterion=obs, prune.epochs=4)"
    # a label naming one configuration stays as it was, and so do the shared references
    assert finals["dq_s1"] == "dq 4-bit"
    assert set(runs.loc[runs["kind"] == "teacher", "label"]) == {"teacher"}
    merged = merge_seeds(runs)
    assert merged.loc[merged["kind"] == "final", "label"].is_unique


def test_min_seeds_keeps_one_seed_variants_off_the_front(tmp_path, caplog):
    # a lucky one-seed variant dominates the three-seed dpq point unless --min-seeds 3 leaves it out
    runs = {f"dpq_s{s}": fake_results("dpq", s, 0.85, 0.1, sparsity=0.8) for s in (1, 2, 3)}
    runs |= {f"dq_s{s}": fake_results("dq", s, 0.86, 0.3) for s in (1, 2, 3)}
    lucky = fake_results("dpq", 1, 0.90, 0.05, sparsity=0.8)
    lucky["config"]["pipeline"]["stages"]["prune"]["criterion"] = "obs"
    write_runs(tmp_path / "runs", {**runs, "lucky_s1": lucky})
    out_all, out_3 = tmp_path / "all", tmp_path / "three"
    assert cli_main([str(tmp_path / "runs"), "--no-progress", "-o", str(out_all)]) == 0
    front = pd.read_csv(out_all / "pareto.csv").query("kind == 'final' and pareto")
    assert set(front["label"]) == {"dpq 0.8 sparse 4-bit (prune.criterion=obs)"}
    with caplog.at_level("INFO", logger="dpq.pareto"):
        assert cli_main([str(tmp_path / "runs"), "--no-progress", "--min-seeds", "3", "-o", str(out_3)]) == 0
    assert (
        "leaves out 1 configuration(s): dpq 0.8 sparse 4-bit (prune.criterion=obs) (seeds 1)" in caplog.text
    )
    points = pd.read_csv(out_3 / "pareto.csv")
    finals = points.query("kind == 'final'")
    assert set(finals["label"]) == {"dpq 0.8 sparse 4-bit", "dq 4-bit"}  # no settings left to tell apart
    assert (finals["n_seeds"] == 3).all()
    assert set(finals.query("pareto")["label"]) == {"dpq 0.8 sparse 4-bit", "dq 4-bit"}
    own = json.loads((out_3 / "ownership.json").read_text())
    assert "obs" not in json.dumps(own)


def test_min_seeds_more_than_any_configuration_has_is_a_config_error(tmp_path, capsys):
    write_runs(tmp_path, {"dq_s1": fake_results("dq", 1, 0.86, 0.3)})
    assert cli_main([str(tmp_path), "--no-progress", "--min-seeds", "3"]) == 2
    err = capsys.readouterr().err
    assert "--min-seeds=3" in err and "the most is 1" in err
    assert cli_main([str(tmp_path), "--no-progress", "--min-seeds", "0"]) == 2


def test_seeds_keeps_a_report_to_its_seeds_after_more_land_beside_it(tmp_path, caplog):
    # three seeds reported, then seed 4 lands in the same folder: --seeds 1-3 still gives the first report
    runs = {f"dq_s{s}": fake_results("dq", s, 0.86, 0.3) for s in (1, 2, 3)}
    runs |= {f"dpq_s{s}": fake_results("dpq", s, 0.84 + 0.01 * s, 0.1, sparsity=0.8) for s in (1, 2, 3)}
    write_runs(tmp_path / "runs", runs)
    first = tmp_path / "first"
    assert cli_main([str(tmp_path / "runs"), "--no-progress", "-o", str(first)]) == 0
    write_runs(tmp_path / "runs", {"dpq_s4": fake_results("dpq", 4, 0.70, 0.1, sparsity=0.8)})
    later, all_four = tmp_path / "later", tmp_path / "all"
    with caplog.at_level("INFO", logger="dpq.pareto"):
        assert cli_main([str(tmp_path / "runs"), "--no-progress", "--seeds", "1-3", "-o", str(later)]) == 0
    assert "--seeds 1,2,3 leaves out 1 run(s) of seeds 4" in caplog.text
    pd.testing.assert_frame_equal(pd.read_csv(first / "pareto.csv"), pd.read_csv(later / "pareto.csv"))
    assert cli_main([str(tmp_path / "runs"), "--no-progress", "-o", str(all_four)]) == 0
    dpq = pd.read_csv(all_four / "pareto.csv").query("kind == 'final' and pipeline == 'dpq'")
    assert dpq["n_seeds"].item() == 4 and dpq["accuracy"].item() == pytest.approx(
        (0.85 + 0.86 + 0.87 + 0.70) / 4
    )
    # compare: the same filter, so its paired interval is the three-seed one
    three = compare(
        gather([str(tmp_path / "runs")], references=False, progress=False).query("seed <= 3"), "dq", "dpq"
    )
    assert compare_cli(tmp_path / "runs", str(later), "--seeds", "1,2,3") == 0
    got = json.loads((later / "compare.json").read_text())
    assert got["only_seeds"] == [1, 2, 3] and got["comparisons"][0]["seeds"] == [1, 2, 3]
    assert got["comparisons"][0]["deltas"]["accuracy"]["mean"] == pytest.approx(
        three[0]["deltas"]["accuracy"]["mean"]
    )


def toy_file_runs():
    """(pipeline, seed, results) of dq and dpq on seeds 1-3 of one local-files task, as each records its data."""
    for s in (1, 2, 3):
        for pipe, acc, g in (("dq", 0.86, 0.3), ("dpq", 0.85, 0.1)):
            res = fake_results(pipe, s, acc, g, sparsity=0.8)
            res["task"] = {
                "name": "toy",
                "source": "files:csv",
                "sizes": {"train": 80, "validation": 10, "test": 10},
            }
            yield pipe, s, res


def test_runs_measured_on_other_examples_are_flagged_not_silently_compared(tmp_path, caplog):
    """Seed 3's dq run dropped the test examples shared with train (task.overlap=drop): its accuracy is on
    other examples than its dpq pair's, which the report and compare say, and record."""
    same = "files:csv: train 80, validation 10, test 10; split seed 0"
    runs = {}
    for pipe, s, res in toy_file_runs():
        if (pipe, s) == ("dq", 3):
            res["task"]["sizes"]["test"] = 8
            res["task"]["overlap"] = {"test_in_train": 2, "policy": "drop", "dropped": {"test": 2}}
        runs[f"{pipe}_s{s}"] = res
    write_runs(tmp_path / "runs", runs)
    other = "files:csv: train 80, validation 10, test 8; split seed 0; examples shared with train dropped"
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        assert compare_cli(tmp_path / "runs", str(tmp_path / "all")) == 0
        assert cli_main([str(tmp_path / "runs"), "--no-progress", "-o", str(tmp_path / "all")]) == 0
    assert (
        caplog.text.count(
            f"the runs of task toy were measured on different examples (5 on {same}; 1 on {other})"
        )
        == 2
    )
    assert json.loads((tmp_path / "all" / "compare.json").read_text())["data"] == [same, other]
    points = pd.read_csv(tmp_path / "all" / "pareto.csv").query("kind == 'final'").set_index("pipeline")
    assert points.loc["dq", "data"] == f"{same} | {other}" and points.loc["dpq", "data"] == same
    caplog.clear()
    with caplog.at_level("WARNING", logger="dpq.pareto"):  # the same examples: nothing to warn about
        assert compare_cli(tmp_path / "runs", str(tmp_path / "two"), "--seeds", "1,2") == 0
    assert "different examples" not in caplog.text
    assert json.loads((tmp_path / "two" / "compare.json").read_text())["data"] == [same]


def test_runs_on_changed_data_under_one_name_are_flagged_by_their_content_digest(tmp_path, caplog):
    """Same source, sizes and split seed, but seed 2's dq run read an edited file (another content digest):
    the label cannot tell, the digest can. A run from before digests (none recorded) is no evidence."""
    runs = {}
    for pipe, s, res in toy_file_runs():
        if s != 3:
            res["task"]["content"] = "bbbb" if (pipe, s) == ("dq", 2) else "aaaa"
        runs[f"{pipe}_s{s}"] = res
    write_runs(tmp_path / "runs", runs)
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        assert cli_main([str(tmp_path / "runs"), "--no-progress", "-o", str(tmp_path / "all")]) == 0
    assert (
        "although source, sizes and split seed agree (content digests aaaa: 3 runs, bbbb: 1 run"
        in caplog.text
    )
    points = pd.read_csv(tmp_path / "all" / "pareto.csv").query("kind == 'final'").set_index("pipeline")
    assert points.loc["dq", "data_content"] == "aaaa | bbbb" and points.loc["dpq", "data_content"] == "aaaa"
    caplog.clear()
    with caplog.at_level("WARNING", logger="dpq.pareto"):  # seeds 1 and 3: one digest and one unknown
        assert compare_cli(tmp_path / "runs", str(tmp_path / "two"), "--seeds", "1,3") == 0
    assert "different examples" not in caplog.text


def test_runs_whose_hub_models_moved_between_them_are_flagged(tmp_path, caplog):
    """Seed 3 loaded the teacher after its hub branch moved (another commit under one name): flagged, and the
    commits are columns of the points. A run from before dpq recorded commits is no evidence."""
    runs = {}
    for s in (1, 2, 3, 4):
        for pipe, acc, g in (("dq", 0.86, 0.3), ("dpq", 0.85, 0.1)):
            res = fake_results(pipe, s, acc, g)
            if s != 4:
                res["hub_commits"] = {"teacher": "b" * 40 if s == 3 else "a" * 40}
            runs[f"{pipe}_s{s}"] = res
    write_runs(tmp_path / "runs", runs)
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        assert cli_main([str(tmp_path / "runs"), "--no-progress", "-o", str(tmp_path / "all")]) == 0
    a, b = f"teacher@{'a' * 40}", f"teacher@{'b' * 40}"
    assert (
        f"the runs of big / small loaded their hub models at different commits (4 runs with {a}; 2 runs with {b})"
        in caplog.text
    )
    points = pd.read_csv(tmp_path / "all" / "pareto.csv").query("kind == 'final'")
    assert (points["hub_commits"] == f"{a} | {b}").all()
    assert f"{a} | {b}" in (tmp_path / "all" / "pareto.html").read_text()
    caplog.clear()
    with caplog.at_level("WARNING", logger="dpq.pareto"):  # seeds 1, 2 and 4: one commit and one unknown
        assert compare_cli(tmp_path / "runs", str(tmp_path / "two"), "--seeds", "1,2,4") == 0
    assert "different commits" not in caplog.text
    assert json.loads((tmp_path / "two" / "compare.json").read_text())["hub_commits"] == [a]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("1,5", "no run has seed 5; the runs have seeds 1, 2"),
        ("1,x", "comma-separated integer seeds"),
        (",", "comma-separated"),
        ("2-1,1", "a range runs low-high: 1-2"),  # the reversed range dropped its seeds unsaid
    ],
)
def test_seeds_that_no_run_has_or_that_are_not_numbers_are_config_errors(tmp_path, capsys, spec, match):
    write_runs(tmp_path, {f"dq_s{s}": fake_results("dq", s, 0.86, 0.3) for s in (1, 2)})
    assert cli_main([str(tmp_path), "--no-progress", "--seeds", spec]) == 2
    err = capsys.readouterr().err
    assert f"--seeds={spec!r}" in err and match in err and err.count("\n") == 1


def test_runs_from_two_processor_types_are_flagged_not_silently_merged(tmp_path, caplog):
    epyc = {
        "cpu": "AuthenticAMD family 23 model 49: AMD EPYC",
        "torch_cpu_capability": "AVX2",
        "gpus": "none",
    }
    xeon = {"cpu": "GenuineIntel family 6 model 143: Xeon", "torch_cpu_capability": "AVX512", "gpus": "none"}
    runs = {}
    for s in (1, 2, 3):
        for pipe, acc, g in (("dq", 0.86, 0.3), ("dpq", 0.85, 0.1)):
            res = fake_results(pipe, s, acc, g, sparsity=0.8)
            res["hardware"] = xeon if s == 3 else epyc
            runs[f"{pipe}_s{s}"] = res
    write_runs(tmp_path / "runs", runs)
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        assert cli_main([str(tmp_path / "runs"), "--no-progress", "-o", str(tmp_path / "all")]) == 0
    assert (
        "more than one machine type (4 on AuthenticAMD family 23 model 49: AMD EPYC [AVX2]; 2 on"
        in caplog.text
    )
    points = pd.read_csv(tmp_path / "all" / "pareto.csv").query("kind == 'final'")
    assert (
        points["hardware"] == "AuthenticAMD family 23 model 49: AMD EPYC [AVX2] | "
        "GenuineIntel family 6 model 143: Xeon [AVX512]"
    ).all()
    html = (tmp_path / "all" / "pareto.html").read_text()
    assert "Xeon [AVX512]" in html
    caplog.clear()
    with caplog.at_level("WARNING", logger="dpq.pareto"):  # one machine: nothing to warn about
        assert (
            cli_main([str(tmp_path / "runs"), "--no-progress", "--seeds", "1,2", "-o", str(tmp_path / "two")])
            == 0
        )
        assert compare_cli(tmp_path / "runs", str(tmp_path / "two"), "--seeds", "1,2") == 0
    assert "machine type" not in caplog.text
    assert json.loads((tmp_path / "two" / "compare.json").read_text())["hardware"] == [
        "AuthenticAMD family 23 model 49: AMD EPYC [AVX2]"
    ]


def test_a_teacher_that_differs_between_runs_of_one_seed_is_flagged(tmp_path, caplog):
    # the stage cache shares one teacher per seed: runs whose teachers differ did not start from the same model
    # (here seed 2's dpq run, as if trained on another machine); seed 1 agrees to the last digit
    runs = {
        "dq_s1": fake_results("dq", 1, 0.86, 0.3),
        "dpq_s1": fake_results("dpq", 1, 0.85, 0.1),
        "dq_s2": fake_results("dq", 2, 0.86, 0.3),
        "dpq_s2": fake_results("dpq", 2, 0.85, 0.1, teacher_acc=0.95 + 1e-7),
    }
    write_runs(tmp_path / "runs", runs)
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        summary = build_report(
            [str(tmp_path / "runs")], ["accuracy", "effective_gflops"], tmp_path / "out", progress=False
        )
        assert compare_cli(tmp_path / "runs", str(tmp_path / "out")) == 0
    (found,) = summary["diverging_references"]
    assert found["kind"] == "teacher" and found["seed"] == 2
    assert sorted(len(v["runs"]) for v in found["versions"]) == [1, 1]
    assert caplog.text.count("the teacher of seed 2 is not one training") == 2 and "seed 1" not in caplog.text
    payload = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert payload["diverging_references"][0]["seed"] == 2
    assert payload["comparisons"][0]["seeds"] == [1, 2]  # still compared, with the warning on record


def test_a_distill_stage_after_pruning_is_no_dense_reference():
    # pd: teacher -> prune -> distill -> quantize; its distill record is a pruned student
    res = fake_results("dpq", 1, 0.84, 0.08, sparsity=0.8)
    order = ["teacher", "prune", "distill", "quantize"]
    res["order"] = res["config"]["pipeline"]["order"] = order
    res["pipeline"] = res["config"]["pipeline"]["name"] = "pd"
    by_stage = {r["stage"]: r for r in res["stages"]}
    res["stages"] = [by_stage[s] for s in order]
    kinds = [p["kind"] for p in points_from_results(res, "pd1")]
    assert sorted(kinds) == ["final", "teacher"]
    # the same records in dpq's order do give the dense student
    assert "dense" in [p["kind"] for p in points_from_results(fake_results("dpq", 1, 0.84, 0.08), "dpq1")]


def test_a_label_leads_with_the_settings_its_configuration_changed(tmp_path):
    """Five recipes at one sparsity, each changing one prune setting of a common base: four
    settings differ across them, more than a label shows, so each label starts with its own change
    (before, the update_every recipe was labelled like the base: both by criterion, epochs, scope)."""
    base = {"criterion": "taylor", "epochs": 2, "scope": "layer", "update_every": 10}
    changes = {"base": {}, "ep": {"epochs": 4}, "gl": {"scope": "global"}, "up": {"update_every": 5}}
    changes["obs"] = {"criterion": "obs"}
    runs = {}
    for name, change in changes.items():
        res = fake_results("dpq", 1, 0.85, 0.1, sparsity=0.8)
        res["config"]["pipeline"]["stages"]["prune"].update({**base, **change})
        runs[name] = res
    write_runs(tmp_path, runs)
    finals = gather([str(tmp_path)], progress=False).query("kind == 'final'").set_index("run")["label"]
    assert finals.is_unique
    assert finals["up"].startswith("dpq 0.8 sparse 4-bit (prune.update_every=5, ")
    assert finals["ep"].startswith("dpq 0.8 sparse 4-bit (prune.epochs=4, ")
    assert finals["obs"].startswith("dpq 0.8 sparse 4-bit (prune.criterion=obs, ")
    assert (
        finals["base"]
        == "dpq 0.8 sparse 4-bit (prune.criterion=taylor, prune.epochs=2, prune.scope=layer, …)"
    )


def test_an_empty_mapping_is_no_setting_when_configurations_are_told_apart():
    plain = _flatten({"prune": {"overrides": {}, "final_sparsity": 0.5}})
    mixed = _flatten({"prune": {"overrides": {"re:.*intermediate": 0.81}, "final_sparsity": 0.5}})
    assert plain == {"prune.final_sparsity": 0.5}
    assert set(mixed) - set(plain) == {"prune.overrides.re:.*intermediate"}


def test_reports_record_the_command_that_built_them(tmp_path, monkeypatch, capsys):
    """ownership.json/.md and compare.json say how to make them again: the command as given and the folder
    it ran in, relative to the report (tests/test_committed_reports.py reruns the committed ones)."""
    grid(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    argv = [
        "runs",
        "--no-progress",
        "-O",
        "accuracy,effective_gflops",
        "-o",
        "runs/rep",
        "--title",
        "a front",
    ]
    assert cli_main(argv) == 0
    built = json.loads((tmp_path / "runs/rep/ownership.json").read_text())["built_by"]
    assert built == {"command": "python -m dpq.pareto " + " ".join(argv[:-1]) + " 'a front'", "cwd": "../.."}
    assert (tmp_path / "runs/rep" / built["cwd"]).resolve() == tmp_path
    md = (tmp_path / "runs/rep/ownership.md").read_text()
    assert md.rstrip().endswith(f"```bash\n{built['command']}\n```")
    assert html.escape(built["command"]) in (tmp_path / "runs/rep/pareto.html").read_text()
    argv = [
        "compare",
        "runs",
        "--baseline",
        "dq",
        "--candidate",
        "dpq,final_sparsity=0.2",
        "-o",
        "cmp",
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    capsys.readouterr()
    built = json.loads((tmp_path / "cmp/compare.json").read_text())["built_by"]
    assert built == {"command": "python -m dpq.pareto " + " ".join(argv), "cwd": ".."}


@pytest.mark.parametrize("cost", ["bops", "gbops"])
def test_a_scaled_cost_chosen_by_name_is_scaled_once(tmp_path, cost):
    """-O accuracy,bops: the front, the tables and the ownership show GBOPs (the recorded BOPs x 1e-9, once),
    and runs.csv keeps the recorded count under its own name. (The objective once shared the metric's
    column name, so each pass that added it scaled it again: 34 GBOPs came out as 3.4e-08.)"""
    grid(tmp_path / "runs")
    assert cli_main([str(tmp_path / "runs"), "--no-progress", "-O", f"accuracy,{cost}"]) == 0
    out = tmp_path / "runs" / "pareto"
    points = pd.read_csv(out / "pareto.csv").set_index("label")
    assert points.loc["dq 4-bit", "gbops"] == pytest.approx(0.69)  # grid(): bops = GFLOPs x 1e9
    assert points.loc["teacher", "gbops"] == pytest.approx(10.0)
    runs = pd.read_csv(out / "runs.csv")
    assert runs.query("kind == 'final'")["bops"].min() == pytest.approx(0.30e9)
    own = json.loads((out / "ownership.json").read_text())
    front = next(f for f in own["contexts"][0]["fronts"] if f["cost"] == "gbops")
    assert sorted(e["gbops"] for e in front["front"]) == pytest.approx([0.30, 0.555, 0.69])
    assert "accuracy vs gbops [GBOPs]" in (out / "ownership.md").read_text()


def test_runs_without_a_seed_are_not_a_shared_seed():
    """compare pairs by seed: runs without one (a W&B summary, say) are not a pair of their own (-1 and -1),
    and the merged point lists them as "none" among its seeds."""
    from dpq.pareto.aggregate import merge_seeds
    from dpq.pareto.compare import compare_pair

    def rows(accs):
        return pd.DataFrame({"seed": [1, 2, None], "accuracy": accs})

    out = compare_pair(rows([0.80, 0.82, 0.70]), rows([0.81, 0.83, 0.90]))
    assert out["seeds"] == [1, 2] and out["deltas"]["accuracy"]["mean"] == pytest.approx(0.01)
    grid_rows = rows([0.80, 0.82, 0.70]).assign(kind="final", config_key="k", label="x", run=["a", "b", "c"])
    merged = merge_seeds(grid_rows)
    assert merged.loc[0, "seeds"] == "1,2,none" and merged.loc[0, "n_seeds"] == 3


def test_a_key_added_to_the_config_later_does_not_split_a_configurations_seeds(tmp_path):
    """Seeds 1-2 ran before task.overlap existed, seed 3 after (recording its default, warn): one configuration
    of three seeds. A seed with overlap=drop ran on other examples: a configuration of its own."""
    runs = {}
    for s in (1, 2, 3, 4):
        res = fake_results("dpq", s, 0.85, 0.1)
        if s == 3:
            res["config"]["task"]["overlap"] = "warn"
        if s == 4:
            res["config"]["task"]["overlap"] = "drop"
        runs[f"dpq_s{s}"] = res
    write_runs(tmp_path / "runs", runs)
    merged = merge_seeds(gather([str(tmp_path / "runs")], references=False, progress=False))
    assert sorted(merged["seeds"]) == ["1,2,3", "4"]


def test_every_config_key_added_since_the_committed_runs_says_how_those_runs_behaved():
    """Today's default config holds no key (outside the pipeline, which is compared as parsed stages) that a
    committed run of 2026-12-05 lacks, unless ADDED_LATER gives the value those runs behaved as: a key added
    with a default would otherwise split old and new seeds of one recipe into two points."""
    import os

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dpq.core.config import load_option
    from dpq.pareto.gather import ADDED_LATER, IGNORED_KEYS

    def flat(d: dict, prefix: str = "") -> set[str]:
        keys = set()
        for k, v in d.items():
            keys |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
        return keys

    root = Path(__file__).resolve().parents[1]
    ref = json.loads((root / "bench/results/front_epyc_30/fu30lsq-s42/results.json").read_text())["config"]
    with initialize_config_dir(config_dir=os.path.abspath(root / "conf"), version_base="1.3"):
        today = OmegaConf.to_container(compose("train", overrides=["experiment=far_u80"]), resolve=False)
    blocks = [k for k in today if k not in (*IGNORED_KEYS, "pipeline", "hydra")]
    new = {k for b in blocks for k in flat({b: today[b]})} - {
        k for b in blocks for k in flat({b: ref.get(b) or {}})
    }
    assert new <= set(ADDED_LATER), f"add to dpq.pareto.gather.ADDED_LATER: {sorted(new - set(ADDED_LATER))}"
    # a key every committed run has needs no entry; model.revision exists only on hub-loaded models (no
    # committed run used one), so it is checked on the option that has it
    assert set(ADDED_LATER) - {"model.revision"} <= new
    assert "revision" in load_option("model", "distilbert") and "revision" not in ref["model"]


def test_seeds_run_with_other_bookkeeping_are_one_configuration(tmp_path, caplog):
    """Sweep agents that ran seeds of one recipe with another stage-cache folder, checkpoint cadence, integrity
    setting, teacher cache or objective: one configuration of every seed (these change no number). Its
    final.objective, a sum under the weights of each run, is averaged only where the weights agree. A setting
    that changes a number (the distill lr; the cost conditions) still makes a configuration of its own."""
    one = {"weights": {"val_accuracy": 1.0}}
    bookkeeping = {
        1: {"stage_cache": {"enabled": True, "dir": "/a/stages"}, "objective": one},
        2: {
            "stage_cache": {"enabled": False, "dir": "/b/stages"},
            "checkpoint": {"every_n_steps": 0},
            "integrity": False,
            "integrity_tolerance": 0.01,
            "objective": {"weights": {"val_accuracy": 1.0, "effective_gflops": -0.1}},
        },
        3: {"stage_cache": {"enabled": True, "dir": "/c/stages"}, "objective": one},
    }
    runs = {}
    for s, extra in bookkeeping.items():
        for pipe in ("dq", "dpq"):
            res = fake_results(pipe, s, 0.85 + s / 100, 0.1)
            res["config"].update(extra)
            res["config"]["pipeline"]["stages"]["teacher"]["cache"] = s != 2
            res["final"]["objective"] = float(s)
            runs[f"{pipe}_s{s}"] = res
    lr = fake_results("dq", 4, 0.9, 0.1, lr=5e-4)  # another distill lr: another dq and dense student
    lr["config"]["objective"], lr["final"]["objective"] = one, 1.0
    cost = fake_results("dpq", 4, 0.9, 0.1)
    cost["config"]["cost"] = {"batch_size": 32}  # measured under other conditions: every point its own
    runs |= {"dq_lr_s4": lr, "dpq_b32_s4": cost}
    write_runs(tmp_path / "runs", runs)
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        assert cli_main([str(tmp_path / "runs"), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    merged = merge_seeds(gather([str(tmp_path / "runs")], progress=False))
    finals = merged[merged["kind"] == "final"].set_index(["pipeline", "seeds"])
    assert sorted(finals.index) == [("dpq", "1,2,3"), ("dpq", "4"), ("dq", "1,2,3"), ("dq", "4")]
    refs = merged[merged["kind"] != "final"]
    assert sorted(zip(refs["kind"], refs["seeds"])) == [
        ("dense", "1,2,3"),  # the teacher's cache switch is no setting of the student either
        ("dense", "4"),  # another distill lr
        ("dense", "4"),  # other cost conditions
        ("teacher", "1,2,3,4"),
        ("teacher", "4"),  # other cost conditions
    ]
    for pipe in ("dq", "dpq"):
        row = finals.loc[(pipe, "1,2,3")]
        assert row["accuracy"] == pytest.approx(0.87) and row["n_runs"] == 3
        assert np.isnan(row["objective"]) and np.isnan(row["objective_std"])  # seed 2 weighed it otherwise
    assert finals.loc[("dq", "4"), "objective"] == 1.0  # one run: its own objective
    warned = [r.getMessage() for r in caplog.records if "weigh final.objective differently" in r.getMessage()]
    assert len(warned) == 2 and all("2 runs with" in w and "1 run with" in w for w in warned)
    # the same weights on every seed: the objective is averaged as before
    for res in runs.values():
        res["config"]["objective"] = one
    write_runs(tmp_path / "same", runs)
    merged = merge_seeds(gather([str(tmp_path / "same")], references=False, progress=False))
    assert merged.set_index(["pipeline", "seeds"]).loc[("dq", "1,2,3"), "objective"] == pytest.approx(2.0)


def test_a_missing_objective_is_counted_apart_for_final_points_and_references(tmp_path, caplog):
    """The teacher and dense-student references are never exported to ONNX Runtime: they were counted with
    the final points as if the runs predated the measurement."""
    runs = {f"dpq_s{s}": fake_results("dpq", s, 0.85, 0.1, sparsity=0.8) for s in (1, 2)}
    for res in runs.values():
        res["final"]["onnx_latency_ms_median"] = 1.0
    del runs["dpq_s2"]["final"]["onnx_latency_ms_median"]  # an older run
    write_runs(tmp_path / "runs", runs)
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        args = [
            str(tmp_path / "runs"),
            "-O",
            "accuracy,onnx_latency_ms",
            "--no-progress",
            "-o",
            str(tmp_path / "o"),
        ]
        assert cli_main(args) == 0
    assert (
        "no onnx_latency_ms (metric 'onnx_latency_ms_median') for 1 of 2 final points (runs made before it was "
        "measured?); 4 of 4 reference and stage points (only a run's final model is exported to ONNX Runtime)"
    ) in caplog.text


def test_a_run_recorded_before_the_revision_keys_is_the_configuration_of_one_on_main():
    """model.revision / teacher.revision null (the hub's main, whose commit hub_commits records) is how a run
    from before the keys loaded its models: one configuration; a pinned revision is another."""
    from dpq.pareto.gather import config_key, identity

    old = {
        "model": {"name": "distilbert", "pretrained": "distilbert-base-uncased"},
        "teacher": {"name": "bert"},
    }
    new = {"model": {**old["model"], "revision": None}, "teacher": {"name": "bert", "revision": None}}
    pinned = {**new, "model": {**old["model"], "revision": "v1"}}
    assert config_key(identity(old)) == config_key(identity(new)) != config_key(identity(pinned))


def test_runs_that_started_and_never_finished_are_named_not_silently_left_out(tmp_path, caplog):
    """A job that crashed or was killed has checkpoints/run.json (written as it starts) and no results.json:
    the report on the rest names it, with how to continue it. A dry run or a config error (Hydra's .hydra/
    and log only) is no run. A folder holding only unfinished runs is an error that says so."""
    from dpq.run.resume import CHECKPOINTS, RUN_FILE

    runs = tmp_path / "multirun"
    write_runs(runs, {"0_dq": fake_results("dq", 1, 0.85, 0.1), "1_dpq": fake_results("dpq", 1, 0.86, 0.05)})
    crashed = runs / "2_dpq"
    (crashed / CHECKPOINTS).mkdir(parents=True)
    (crashed / CHECKPOINTS / RUN_FILE).write_text("{}")
    (runs / "3_dry" / ".hydra").mkdir(parents=True)
    (runs / "3_dry" / ".hydra" / "config.yaml").write_text("dry_run: true\n")
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        assert len(find_results([str(runs)])) == 2
    said = [
        r.getMessage() for r in caplog.records if "never" in r.getMessage() or "started" in r.getMessage()
    ]
    assert len(said) == 1 and "1 run(s) started" in said[0] and str(crashed) in said[0]
    assert "3_dry" not in said[0] and "resume=" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        find_results([str(runs / "0_dq")])
    assert not caplog.records
    with pytest.raises(ConfigError, match=r"1 run\(s\) started there but never finished .*2_dpq.*resume="):
        find_results([str(crashed)])
