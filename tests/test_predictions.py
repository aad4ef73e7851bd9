"""Per-example predictions (dpq.predictions) and the paired per-seed comparison they allow (dpq.pareto.paired)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_pareto import fake_results, write_runs

from dpq import predictions
from dpq.pareto import OBJECTIVES
from dpq.pareto.cli import main as cli_main
from dpq.pareto.gather import gather
from dpq.pareto.ownership import front_ownership
from dpq.pareto.paired import paired_accuracy


def test_mcnemar_and_the_paired_interval_against_a_hand_computation():
    # 15 examples only the first gets right, 5 only the second, 80 both, 0 neither
    first = np.array([True] * 15 + [False] * 5 + [True] * 80)
    second = np.array([False] * 15 + [True] * 5 + [True] * 80)
    p = paired_accuracy(first, second)
    assert (p["n"], p["only_first"], p["only_second"]) == (100, 15, 5)
    assert p["diff"] == pytest.approx(second.mean() - first.mean()) == pytest.approx(-0.10)
    # exact two-sided binomial: 2 * P(X <= 5), X ~ Bin(20, 1/2)
    tail = sum(math.comb(20, k) for k in range(6)) / 2**20
    assert p["p_mcnemar"] == pytest.approx(2 * tail)
    se = math.sqrt(15 + 5 - (5 - 15) ** 2 / 100) / 100
    assert p["ci_low"] == pytest.approx(-0.10 - 1.959963985 * se)
    assert p["ci_high"] == pytest.approx(-0.10 + 1.959963985 * se)
    # the same models: no evidence either way
    same = paired_accuracy(first, first)
    assert same["diff"] == 0 and same["p_mcnemar"] == 1.0 and same["ci_low"] == same["ci_high"] == 0
    with pytest.raises(ValueError, match="one length"):
        paired_accuracy(first, second[:-1])


def correct_on(idx, n=100) -> dict:
    """Predictions over ``n`` examples (labels 0/1 alternating) right exactly at ``idx``."""
    labels = np.arange(n) % 2
    pred = 1 - labels
    pred[list(idx)] = labels[list(idx)]
    return {"test_pred": pred, "test_label": labels, "val_pred": labels.copy(), "val_label": labels}


def paired_study(tmp_path, tamper=None):
    runs = {
        "dq1": fake_results("dq", 1, 0.90, 0.68),
        "p1": fake_results("dpq", 1, 0.89, 0.40, sparsity=0.5),
        "dq2": fake_results("dq", 2, 0.92, 0.70),
        "p2": fake_results("dpq", 2, 0.90, 0.41, sparsity=0.5),
    }
    root = write_runs(tmp_path, runs)
    preds = {
        "dq1": correct_on(range(90)),
        "p1": correct_on(range(10, 99)),  # 89 right: 10 only dq gets, 9 only this one
        "dq2": correct_on(range(92)),
        "p2": correct_on(range(90)),  # a subset of dq2's: 2 discordant, both dq's
    }
    if tamper:
        tamper(preds)
    for name, p in preds.items():
        predictions.save(root / name, p)
    return root


def compare_dq_dpq(root, out) -> list[str]:
    return ["compare", str(root), "--baseline", "dq", "--candidate", "dpq", "-o", str(out), "--no-progress"]


def checks(root):
    runs = gather([str(root)], references=False, progress=False)
    own = front_ownership(runs, OBJECTIVES["accuracy"], [OBJECTIVES["effective_gflops"]])
    return own["contexts"][0]["domination"]["checks"]


def test_the_per_seed_check_pairs_the_closest_point_with_the_dq_point_on_the_same_examples(tmp_path):
    c1, c2 = checks(paired_study(tmp_path))
    p1, p2 = c1["closest"]["paired"], c2["closest"]["paired"]
    assert p1["split"] == "test" and (p1["n"], p1["only_first"], p1["only_second"]) == (100, 10, 9)
    assert p1["diff"] == pytest.approx(c1["closest"]["margin"]) == pytest.approx(-0.01)
    assert p1["p_mcnemar"] == pytest.approx(1.0)
    assert (p2["only_first"], p2["only_second"]) == (2, 0) and p2["p_mcnemar"] == pytest.approx(0.5)
    half = 1.959963985 * math.sqrt(2 - 2**2 / 100) / 100
    assert (p2["ci_low"], p2["ci_high"]) == pytest.approx((-0.02 - half, -0.02 + half))
    # on validation the runs' predictions are the labels: every run gets 1.0, but the fake
    # results.json says otherwise, so they are not the runs' predictions and are not paired
    runs = gather([str(tmp_path)], references=False, progress=False)
    own = front_ownership(runs, OBJECTIVES["val_accuracy"], [OBJECTIVES["effective_gflops"]])
    for c in own["contexts"][0]["domination"]["checks"]:
        assert "not the run's" in c["closest"]["paired"]["missing"]


def test_predictions_that_are_not_the_runs_or_not_on_the_same_examples_are_not_paired(tmp_path):
    def wrong_accuracy(p):
        p["p1"] = correct_on(range(80))

    (c1, c2) = checks(paired_study(tmp_path / "a", wrong_accuracy))
    assert "predictions give accuracy 0.8000, not the run's 0.89" in c1["closest"]["paired"]["missing"]
    assert "missing" not in c2["closest"]["paired"]

    def other_examples(p):
        p["p2"]["test_label"] = 1 - p["p2"]["test_label"]
        p["p2"]["test_pred"] = 1 - p["p2"]["test_pred"]  # same accuracy, other labels

    (_, c2) = checks(paired_study(tmp_path / "b", other_examples))
    assert "different examples" in c2["closest"]["paired"]["missing"]


def test_the_report_has_the_paired_column_only_where_runs_have_predictions(tmp_path):
    root = paired_study(tmp_path / "runs")
    assert cli_main([str(root), "-o", str(tmp_path / "with"), "--no-progress", "--no-references"]) == 0
    md = (tmp_path / "with" / "ownership.md").read_text()
    assert "McNemar p |" in md and "| 9 / 10 of 100: -0.0100 [" in md and "p=1 |" in md
    assert "McNemar" in (tmp_path / "with" / "pareto.html").read_text()
    assert "run_path" not in (tmp_path / "with" / "runs.csv").read_text().splitlines()[0]
    for p in root.glob("*/predictions.npz"):
        p.unlink()
    assert cli_main([str(root), "-o", str(tmp_path / "without"), "--no-progress", "--no-references"]) == 0
    md = (tmp_path / "without" / "ownership.md").read_text()
    assert "McNemar" not in md and "| 1 | dq 4-bit | 0.9000 | 0.68 | **not dominated** |" in md
    own = json.loads((tmp_path / "without" / "ownership.json").read_text())
    assert all("paired" not in c["closest"] for c in own["contexts"][0]["domination"]["checks"])


def test_a_run_writes_its_predictions_and_the_cli_rewrites_them_from_the_saved_model(make_cfg, tmp_path):
    from dpq.predictions import main
    from dpq.train import train

    results = train(make_cfg("experiment=tiny", "pipeline=dq", "export.onnx=false"))
    run = tmp_path / "run"
    preds = predictions.load(run)
    final = results["final"]
    assert predictions.accuracy(preds, "test") == pytest.approx(final["accuracy"], abs=1e-6)
    assert predictions.accuracy(preds, "val") == pytest.approx(final["val_accuracy"], abs=1e-6)
    summary = results["predictions"]
    assert summary["matches"] and summary["test_n"] == len(preds["test_label"]) > 0
    assert json.loads((run / "results.json").read_text())["predictions"] == summary

    (run / predictions.FILE).unlink()
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process: the CLI turns transformers' load bars off
    assert main([str(run)]) == 0
    assert not hf_logging.is_progress_bar_enabled()
    again = predictions.load(run)
    assert all(np.array_equal(again[k], preds[k]) for k in preds)

    # results.json that the saved model does not reproduce: refused, nothing written
    (run / predictions.FILE).unlink()
    res = json.loads((run / "results.json").read_text())
    res["final"]["accuracy"] = final["accuracy"] - 0.25
    (run / "results.json").write_text(json.dumps(res))
    assert main([str(run)]) == 2
    assert predictions.load(run) is None


def test_compare_gives_the_seed_averaged_difference_its_spread_over_test_samples(tmp_path, capsys):
    root = paired_study(tmp_path / "runs")
    assert cli_main(compare_dq_dpq(root, tmp_path / "c")) == 0
    (r,) = json.loads((tmp_path / "c" / "compare.json").read_text())["comparisons"]
    e = r["examples"]["accuracy"]
    # by hand: per example, the candidate's minus dq's correctness averaged over the two seeds
    right = {
        k: correct_on(v)["test_pred"] == correct_on(v)["test_label"]
        for k, v in {"dq1": range(90), "p1": range(10, 99), "dq2": range(92), "p2": range(90)}.items()
    }
    d = ((right["p1"] * 1.0 - right["dq1"]) + (right["p2"] * 1.0 - right["dq2"])) / 2
    assert e["mean"] == pytest.approx(d.mean()) == pytest.approx(r["deltas"]["accuracy"]["mean"])
    se = d.std(ddof=1) / math.sqrt(100)
    assert e["se"] == pytest.approx(se) and e["ci_low"] == pytest.approx(d.mean() - 1.959963985 * se)
    assert (e["n_examples"], e["n_seeds"], e["seeds"]) == (100, 2, [1, 2])
    assert set(r["examples"]) == {"accuracy"}  # these fake runs record no val_accuracy
    assert "over 100 examples x 2 seeds: -0.0150 [" in capsys.readouterr().out


def test_compare_names_the_split_each_per_example_interval_is_over(tmp_path, capsys):
    def with_val(preds):  # validation predictions that differ from the test ones: dq right on 80, dpq on 70
        for name, right in {"dq1": 80, "p1": 70, "dq2": 80, "p2": 70}.items():
            v = correct_on(range(right))
            preds[name]["val_pred"], preds[name]["val_label"] = v["test_pred"], v["test_label"]

    root = paired_study(tmp_path / "runs", tamper=with_val)
    for name, acc in {"dq1": 0.80, "p1": 0.70, "dq2": 0.80, "p2": 0.70}.items():
        res = json.loads((root / name / "results.json").read_text())
        res["final"]["val_accuracy"] = acc
        (root / name / "results.json").write_text(json.dumps(res))
    assert cli_main(compare_dq_dpq(root, tmp_path / "c")) == 0
    out = capsys.readouterr().out
    (r,) = json.loads((tmp_path / "c" / "compare.json").read_text())["comparisons"]
    assert r["examples"]["val_accuracy"]["split"] == "val"
    assert r["examples"]["val_accuracy"]["mean"] == pytest.approx(-0.10)
    assert r["examples"]["accuracy"]["split"] == "test"
    val_line = next(line for line in out.splitlines() if "val_accuracy over" in line)
    test_line = next(line for line in out.splitlines() if " accuracy over" in line and "val_" not in line)
    assert "over validation samples" in val_line and "-0.1000" in val_line
    assert "over test samples" in test_line
