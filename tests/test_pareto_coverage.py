"""What each number of a report covers: one front per task/model/teacher, the seeds a mean or a paired
difference is over when a metric is missing on some seeds, and runs without a final model (a diverged run,
a failed W&B sweep trial) named and skipped rather than counted as points."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_pareto import FakeRun, fake_results, fake_wandb_sweep, write_runs

from dpq.core.errors import ConfigError
from dpq.pareto import OBJECTIVES
from dpq.pareto.aggregate import add_objectives, check_objective_seeds, merge_seeds
from dpq.pareto.cli import front_table
from dpq.pareto.cli import main as cli_main
from dpq.pareto.compare import compare
from dpq.pareto.gather import gather, results_from_summary
from dpq.pareto.ownership import paired_delta

ACC, GFLOPS = OBJECTIVES["accuracy"], OBJECTIVES["effective_gflops"]
ORT = OBJECTIVES["onnx_latency_ms"]


def on_task(res: dict, task: str) -> dict:
    res = json.loads(json.dumps(res))
    res["config"]["task"]["name"] = task
    return res


def with_final(res: dict, **metrics) -> dict:
    """``res`` with these final metrics (``None`` removes one: a seed that did not measure it)."""
    res = json.loads(json.dumps(res))
    for k, v in metrics.items():
        if v is None:
            res["final"].pop(k, None)
        else:
            res["final"][k] = v
    return res


# --------------------------------------------------------------------------- one front per context


def two_tasks(root: Path) -> Path:
    # the hard task's points are all below the easy task's: one front over both would hold no hard point
    return write_runs(
        root,
        {
            "easy_dq": on_task(fake_results("dq", 1, 0.95, 1.0), "easy"),
            "easy_dpq": on_task(fake_results("dpq", 1, 0.96, 0.5), "easy"),
            "hard_dq": on_task(fake_results("dq", 1, 0.70, 1.0), "hard"),
            "hard_dpq": on_task(fake_results("dpq", 1, 0.72, 0.5), "hard"),
        },
    )


def test_each_task_has_a_front_of_its_own(tmp_path):
    runs = gather([str(two_tasks(tmp_path))], references=False, progress=False)
    pts = front_table(merge_seeds(runs), [ACC, GFLOPS])
    front = {(t, p): f for t, p, f in zip(pts["task"], pts["pipeline"], pts["pareto"])}
    assert front == {
        ("easy", "dq"): False,
        ("easy", "dpq"): True,
        ("hard", "dq"): False,
        ("hard", "dpq"): True,
    }


def test_the_report_flags_and_draws_one_front_per_task(tmp_path):
    two_tasks(tmp_path / "runs")
    out = tmp_path / "out"
    assert cli_main([str(tmp_path / "runs"), "--no-progress", "--no-references", "-o", str(out)]) == 0
    table = pd.read_csv(out / "pareto.csv")
    assert set(table.loc[table["pareto"], "label"]) == {
        "dpq 0.5 sparse 4-bit (task.name=easy)",
        "dpq 0.5 sparse 4-bit (task.name=hard)",
    }
    on_front = pd.read_csv(out / "runs.csv").set_index("run")["pareto"]
    assert on_front.to_dict() == {"easy_dq": False, "easy_dpq": True, "hard_dq": False, "hard_dpq": True}
    from dpq.pareto.plots import figure, front_lines

    names = [n for n, _ in front_lines(table[table["pareto"]])]
    assert names == ["Pareto front (task=easy)", "Pareto front (task=hard)"]
    fig = figure(table, [ACC, GFLOPS])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "Pareto front (task=easy)" in legend and "Pareto front (task=hard)" in legend
    assert "Pareto front (task=easy)" in (out / "pareto.html").read_text()
    # one context: one line, named as before
    assert [n for n, _ in front_lines(table[table["pareto"] & (table["task"] == "easy")])] == ["Pareto front"]


# --------------------------------------------------------------------------- seeds per metric


def ort_study(root: Path, dpq_ort=(1.0, 1.5, None)) -> Path:
    """dq and dpq on seeds 1-3; dpq's ONNX export failed on the seeds whose latency is None."""
    runs = {}
    for s, ort in zip((1, 2, 3), dpq_ort):
        runs[f"dq{s}"] = with_final(fake_results("dq", s, 0.85, 1.0), onnx_latency_ms_median=2.0)
        runs[f"dpq{s}"] = with_final(fake_results("dpq", s, 0.84, 0.5), onnx_latency_ms_median=ort)
    return write_runs(root, runs)


def test_a_mean_over_fewer_seeds_than_its_configuration_says_how_many(tmp_path):
    runs = add_objectives(gather([str(ort_study(tmp_path))], references=False, progress=False), [ACC, ORT])
    m = merge_seeds(runs).set_index("pipeline")
    assert m.loc["dpq", "n_seeds"] == 3 and m.loc["dpq", "onnx_latency_ms"] == pytest.approx(1.25)
    assert m.loc["dpq", "onnx_latency_ms_median_n"] == 2 and m.loc["dq", "onnx_latency_ms_median_n"] == 3
    assert m.loc["dpq", "onnx_latency_ms_n"] == 2  # the objective's column too
    assert "accuracy_n" not in m  # only where some mean is short: the tables stay as they were otherwise
    # every seed measured everything: no count columns at all
    full = merge_seeds(gather([str(ort_study(tmp_path / "full", (1.0, 1.5, 2.0)))], progress=False))
    assert not [c for c in full.columns if c.endswith("_n")]


def test_min_seeds_counts_the_seeds_that_measured_each_objective(tmp_path, caplog):
    runs = add_objectives(gather([str(ort_study(tmp_path))], references=False, progress=False), [ACC, ORT])
    with caplog.at_level("INFO", logger="dpq.pareto"):
        kept = check_objective_seeds(runs, [ACC, ORT], min_seeds=3)
    assert set(kept.loc[kept["kind"] == "final", "pipeline"]) == {"dq"}
    assert (
        "--min-seeds 3 leaves out 1 configuration(s) whose objectives were measured on fewer seeds: "
        "dpq 0.5 sparse 4-bit (onnx_latency_ms on seeds 1,2)" in caplog.text
    )
    # without --min-seeds the point stays, and a warning says its mean is over two of its three seeds
    caplog.clear()
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        kept = check_objective_seeds(runs, [ACC, ORT], min_seeds=1)
    assert len(kept) == len(runs)
    said = [r.getMessage() for r in caplog.records]
    assert (
        len(said) == 1
        and "onnx_latency_ms was measured on fewer seeds than 1 configuration(s) ran" in said[0]
    )
    assert "dpq 0.5 sparse 4-bit (seeds 1,2 of 1,2,3)" in said[0] and "onnx_latency_ms_n" in said[0]
    with pytest.raises(ConfigError, match="no configuration has its objectives measured on that many seeds"):
        check_objective_seeds(runs[runs["pipeline"] == "dpq"], [ACC, ORT], min_seeds=3)


def test_the_report_leaves_out_a_point_whose_objective_has_too_few_seeds(tmp_path, caplog, capsys):
    ort_study(tmp_path / "runs")
    out = tmp_path / "out"
    args = [str(tmp_path / "runs"), "--no-progress", "--no-references", "-O", "accuracy,onnx_latency_ms"]
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        assert cli_main([*args, "-o", str(out)]) == 0
    table = pd.read_csv(out / "pareto.csv").set_index("pipeline")
    assert table.loc["dpq", "onnx_latency_ms_n"] == 2 and table.loc["dpq", "n_seeds"] == 3
    assert "seeds 1,2 of 1,2,3" in caplog.text
    own = json.loads((out / "ownership.json").read_text())
    entry = next(e for e in own["contexts"][0]["fronts"][0]["front"] if e["ordering"] == "dpq")
    assert entry["onnx_latency_ms_n"] == 2 and "accuracy_n" not in entry
    assert "(2 of its seeds)" in (out / "ownership.md").read_text()
    assert "1.25 ± 0.3536 (n=2)" in capsys.readouterr().out  # the printed front table
    assert "1.25 ± 0.3536 (n=2)" in (out / "pareto.html").read_text()
    assert cli_main([*args, "--min-seeds", "3", "-o", str(tmp_path / "three")]) == 0
    table = pd.read_csv(tmp_path / "three" / "pareto.csv")
    assert list(table["pipeline"]) == ["dq"]


def test_paired_differences_list_the_seeds_they_are_over(tmp_path):
    runs = {f"dq{s}": fake_results("dq", s, 0.80 + s / 100, 1.0) for s in (1, 2)}
    runs["dq3"] = with_final(fake_results("dq", 3, 0.80, 1.0), accuracy=float("nan"))
    runs |= {f"dpq{s}": fake_results("dpq", s, 0.84 + s / 100, 0.5) for s in (1, 2, 3)}
    finals = gather([str(write_runs(tmp_path, runs))], references=False, progress=False)
    finals = finals[finals["kind"] == "final"]
    d = paired_delta(finals[finals["pipeline"] == "dq"], finals[finals["pipeline"] == "dpq"], "accuracy")
    assert d["n"] == 2 and d["seeds"] == [1, 2] and d["mean"] == pytest.approx(0.04)
    (c,) = compare(finals, "dq", "dpq")
    assert c["seeds"] == [1, 2, 3]  # the seeds both ran
    assert c["deltas"]["accuracy"]["n"] == 2 and c["deltas"]["accuracy"]["seeds"] == [1, 2]
    assert "seeds" not in c["ratios"]["effective_gflops"] and c["ratios"]["effective_gflops"]["n"] == 3
    assert c["baseline"]["accuracy"]["n"] == 2 and c["baseline"]["accuracy"]["seeds"] == [1, 2]
    assert "seeds" not in c["candidate"]["accuracy"]


# --------------------------------------------------------------------------- runs without a final model


def test_a_sweep_run_without_a_final_model_is_skipped_and_named(tmp_path, monkeypatch, caplog):
    """A trial that diverged still finishes its W&B run (the sweep goes on), with no final/* metric; one that
    uploaded results.json says its status there. Neither is a point."""
    ok = fake_results("dpq", 1, 0.88, 0.55)
    cfg = fake_results("dpq", 2, 0.88, 0.55)["config"]
    diverged = {"status": "diverged", "error": "NaN", "stages": [], "config": cfg}
    fake_wandb_sweep(
        monkeypatch,
        [
            FakeRun("r1", "finished", ok, {}, {}),
            # diverged before results.json was uploaded
            FakeRun("r2", "finished", None, cfg, {"teacher/val_accuracy": 0.9}),
            FakeRun("r3", "finished", diverged, cfg, {}),
        ],
    )
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        pts = gather(["me/dpq/abc123"], progress=False)
    assert list(pts.loc[pts["kind"] == "final", "run"]) == ["me/dpq/r1"]
    said = [r.getMessage() for r in caplog.records]
    assert "skipping W&B run me/dpq/r2: no final/* metric in its summary (no final model)" in said
    assert "skipping W&B run me/dpq/r3: run status 'diverged' (no final model)" in said
    assert results_from_summary(cfg, {"teacher/val_accuracy": 0.9}, "x") is None
    assert results_from_summary(cfg, {"final/accuracy": 0.9}, "x")["final"]["accuracy"] == 0.9


def test_a_results_json_that_is_no_object_is_skipped_with_a_warning(tmp_path, caplog):
    write_runs(tmp_path, {"ok": fake_results("dq", 1, 0.9, 1)})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text("[1, 2]")  # another tool's file, found recursively
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        runs = gather([str(tmp_path)], progress=False)
    assert list(runs.loc[runs["kind"] == "final", "run"]) == ["ok"]
    assert "not a dpq results.json (a JSON list, not an object)" in caplog.text


def test_a_diverged_run_is_named_with_how_to_resume_it(tmp_path, caplog):
    from dpq.run.resume import CHECKPOINTS, RUN_FILE

    res = fake_results("dq", 1, 0.9, 1)
    failed = {"status": "diverged", "stages": [], "config": res["config"]}
    write_runs(tmp_path, {"ok": res, "diverged": failed, "no_ckpt": {**failed, "status": "integrity_failed"}})
    (tmp_path / "diverged" / CHECKPOINTS).mkdir()
    (tmp_path / "diverged" / CHECKPOINTS / RUN_FILE).write_text("{}")
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        runs = gather([str(tmp_path)], progress=False)
    assert list(runs.loc[runs["kind"] == "final", "run"]) == ["ok"]
    said = {r.getMessage() for r in caplog.records}
    assert (
        f"skipping {tmp_path / 'diverged' / 'results.json'}: run status 'diverged' (no final model); "
        f"`python -m dpq.train resume={tmp_path / 'diverged'}` continues it from its newest snapshot"
    ) in said
    assert (
        f"skipping {tmp_path / 'no_ckpt' / 'results.json'}: run status 'integrity_failed' (no final model); "
        f"it kept no checkpoints ({Path(CHECKPOINTS) / RUN_FILE} is missing), so it can only be started again"
    ) in said


def test_seeds_run_under_other_code_or_disagreeing_runs_of_one_seed_are_said(tmp_path, caplog):
    """A seed re-run after a fix into the same study folder was averaged with the old run as one seed:
    no warning, std 0 and n_seeds 1 hid the disagreement."""
    from dpq.pareto.aggregate import merge_seeds, warn_mixed_code

    old, new = fake_results("dq", 1, 0.70, 1.0), fake_results("dq", 1, 0.80, 1.0)
    old["git"], old["versions"] = {"sha": "a" * 40, "dirty": False}, {"torch": "2.3.0"}
    new["git"], new["versions"] = (
        {"sha": "b" * 40, "dirty": True, "diff_sha256": "c" * 64},
        {"torch": "2.5.1"},
    )
    runs = gather([str(write_runs(tmp_path, {"old": old, "new": new}))], progress=False)
    with caplog.at_level("WARNING", logger="dpq.pareto"):
        assert warn_mixed_code(runs) == ["dq 4-bit"]
    said = caplog.text
    assert (
        "ran under different dpq commits (1 run with bbbbbbbbbb+dirty:cccccccc; 1 run with aaaaaaaaaa)"
        in said
    )
    assert "ran under different library versions" in said and "torch 2.3.0" in said
    assert "seed 1 of dq 4-bit has 2 runs that disagree on accuracy (" in said
    merged = merge_seeds(runs[runs["kind"] == "final"])
    assert set(merged["code"].iloc[0].split(" | ")) == {
        "aaaaaaaaaa",
        "bbbbbbbbbb+dirty:cccccccc",
    }  # both listed
    caplog.clear()
    same = gather([str(write_runs(tmp_path / "b", {"a": fake_results("dq", 1, 0.7, 1.0)}))], progress=False)
    assert warn_mixed_code(same) == [] and not caplog.text
    # a run recorded before dpq listed more libraries differs in what it lists, not in a version
    a, b = fake_results("dq", 1, 0.7, 1.0), fake_results("dq", 2, 0.7, 1.0)
    a["versions"], b["versions"] = {"torch": "2.13.0"}, {"torch": "2.13.0", "torchao": "0.18.0"}
    listed = gather([str(write_runs(tmp_path / "c", {"a": a, "b": b}))], progress=False)
    assert warn_mixed_code(listed) == [] and not caplog.text
