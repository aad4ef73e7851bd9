"""Who owns the front (issue 21): segments per cost, paired intervals against dq, per-seed domination."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_pareto import fake_results, write_runs

from dpq.pareto import OBJECTIVES
from dpq.pareto.cli import main as cli_main
from dpq.pareto.gather import gather
from dpq.pareto.ownership import front_ownership


def renamed(res: dict, pipeline: str) -> dict:
    """A fake run of another ordering with dpq's stages (the name is what ownership reads)."""
    res = json.loads(json.dumps(res))
    res["pipeline"] = res["config"]["pipeline"]["name"] = pipeline
    res["run_name"] = res["config"]["run_name"] = f"{pipeline}-s{res['seed']}"
    return res


def study(tmp_path, dq_beaten: bool):
    runs = {
        "dq1": fake_results("dq", 1, 0.90, 0.68),
        "dq2": fake_results("dq", 2, 0.92, 0.70),
        "p1": fake_results("dpq", 1, 0.89, 0.40, sparsity=0.5),
        "p2": fake_results("dpq", 2, 0.90, 0.41, sparsity=0.5),
        "q1": renamed(fake_results("dpq", 1, 0.86, 0.20, sparsity=0.8), "dpq_qat"),
        "q2": renamed(fake_results("dpq", 2, 0.87, 0.21, sparsity=0.8), "dpq_qat"),
    }
    if dq_beaten:  # a light prune that is better and cheaper than dq on both seeds
        runs["l1"] = fake_results("dpq", 1, 0.91, 0.55, sparsity=0.2)
        runs["l2"] = fake_results("dpq", 2, 0.93, 0.56, sparsity=0.2)
    return gather([str(write_runs(tmp_path, runs))], references=False, progress=False)


def test_segments_owners_and_paired_intervals_against_dq(tmp_path):
    own = front_ownership(
        study(tmp_path, dq_beaten=False), OBJECTIVES["accuracy"], [OBJECTIVES["effective_gflops"]]
    )
    (ctx,) = own["contexts"]
    (front,) = ctx["fronts"]
    assert front["owners"] == ["dpq_qat", "dpq", "dq"]  # cheapest first
    assert [s["ordering"] for s in front["segments"]] == ["dpq_qat", "dpq", "dq"]
    assert front["segments"][0]["from"] == pytest.approx(0.205)
    by = {e["point"]: e for e in front["front"]}
    d = by["dpq 0.5 sparse 4-bit"]["vs_baseline"]
    diffs = [0.89 - 0.90, 0.90 - 0.92]
    assert d["baseline"] == "dq" and d["seeds"] == [1, 2] and d["n"] == 2
    assert d["mean"] == pytest.approx(np.mean(diffs))
    half = 12.706204736 * np.std(diffs, ddof=1) / np.sqrt(2)
    assert d["ci_low"] == pytest.approx(np.mean(diffs) - half) and d["ci_high"] == pytest.approx(
        np.mean(diffs) + half
    )
    assert by["dq 4-bit"]["vs_baseline"]["mean"] == 0.0
    # dq is the most accurate point: nothing dominates it, on either seed
    dom = ctx["domination"]
    assert dom["objectives"] == ["accuracy", "effective_gflops"] and not dom["all_dominated"]
    assert [(c["seed"], c["dominated_by"]) for c in dom["checks"]] == [(1, None), (2, None)]
    # how far from dominated: the most accurate point of another ordering at no higher cost
    assert [c["closest"]["point"] for c in dom["checks"]] == ["dpq 0.5 sparse 4-bit"] * 2
    assert [c["closest"]["margin"] for c in dom["checks"]] == pytest.approx([0.89 - 0.90, 0.90 - 0.92])
    assert [c["accuracy"] for c in dom["checks"]] == pytest.approx([0.90, 0.92])
    assert [c["effective_gflops"] for c in dom["checks"]] == pytest.approx([0.68, 0.70])


def test_the_closest_point_is_at_no_higher_cost_and_none_when_every_other_costs_more(tmp_path):
    runs = {
        "dq1": fake_results("dq", 1, 0.90, 0.30),
        "hi": fake_results("dpq", 1, 0.95, 0.31, sparsity=0.1),  # better but dearer: not a candidate
        "lo": fake_results("dpq", 1, 0.88, 0.30, sparsity=0.3),  # same cost, lower accuracy
        "dq2": fake_results("dq", 2, 0.90, 0.10),
        "hi2": fake_results("dpq", 2, 0.95, 0.31, sparsity=0.1),
    }
    runs = gather([str(write_runs(tmp_path, runs))], references=False, progress=False)
    own = front_ownership(runs, OBJECTIVES["accuracy"], [OBJECTIVES["effective_gflops"]])
    c1, c2 = own["contexts"][0]["domination"]["checks"]
    assert c1["dominated_by"] is None and c1["closest"]["point"] == "dpq 0.3 sparse 4-bit"
    assert c1["closest"]["margin"] == pytest.approx(-0.02) and c1["closest"][
        "effective_gflops"
    ] == pytest.approx(0.30)
    assert c2["dominated_by"] is None and c2["closest"] is None


def test_a_dq_point_beaten_on_every_seed_is_reported_dominated(tmp_path):
    own = front_ownership(
        study(tmp_path, dq_beaten=True), OBJECTIVES["accuracy"], [OBJECTIVES["effective_gflops"]]
    )
    (ctx,) = own["contexts"]
    assert "dq" not in ctx["fronts"][0]["owners"]
    dom = ctx["domination"]
    assert dom["all_dominated"] and {c["dominated_by"] for c in dom["checks"]} == {"dpq 0.2 sparse 4-bit"}


def test_a_dense_student_does_not_count_as_beating_dq(tmp_path):
    """A float student has dq's effective GFLOPs (they do not see bits) and more accuracy: it compresses
    less, so it answers nothing about whether the pruning orderings own the front."""
    runs = {
        "dq1": fake_results("dq", 1, 0.90, 0.68),
        "d1": renamed(fake_results("dq", 1, 0.91, 0.68), "dense"),
        "p1": fake_results("dpq", 1, 0.89, 0.40, sparsity=0.5),
    }
    runs = gather([str(write_runs(tmp_path, runs))], references=False, progress=False)
    own = front_ownership(runs, OBJECTIVES["accuracy"], [OBJECTIVES["effective_gflops"]])
    (check,) = own["contexts"][0]["domination"]["checks"]
    assert check["dominated_by"] is None and check["closest"]["point"] == "dpq 0.5 sparse 4-bit"


def test_an_ambiguous_baseline_is_said_not_guessed(tmp_path):
    runs = study(tmp_path, dq_beaten=False)
    own = front_ownership(runs, OBJECTIVES["accuracy"], [OBJECTIVES["effective_gflops"]], baseline="dpq_qat")
    by = {e["point"]: e for e in own["contexts"][0]["fronts"][0]["front"]}
    # dq's point has no sparsity of its own: the only dpq_qat configuration is the one to pair with
    assert by["dq 4-bit"]["vs_baseline"]["mean"] == pytest.approx(np.mean([0.90 - 0.86, 0.92 - 0.87]))
    own = front_ownership(runs, OBJECTIVES["accuracy"], [OBJECTIVES["effective_gflops"]], baseline="dense")
    assert all(
        "no dense runs" in e["vs_baseline"]["missing"] for e in own["contexts"][0]["fronts"][0]["front"]
    )


def test_the_report_writes_and_prints_who_owns_the_front(tmp_path, capsys):
    study(tmp_path / "runs", dq_beaten=False)
    out = tmp_path / "report"
    assert cli_main([str(tmp_path / "runs"), "-o", str(out), "--no-progress", "--no-references"]) == 0
    printed = capsys.readouterr().out
    assert "front along effective_gflops [GFLOPs]: dpq_qat 0.205; dpq 0.405; dq 0.69" in printed
    # no dp runs here: the line names what was checked, and says what was not
    assert "every dq point dominated on every seed (accuracy, effective_gflops): no, 2 of 2 not" in printed
    assert "No dp points among these runs: the check covers dq only" in printed
    md = (out / "ownership.md").read_text()
    assert "### accuracy vs effective_gflops [GFLOPs]: owned by dpq_qat, dpq, dq" in md
    assert "| 0.405 | dpq | dpq 0.5 sparse 4-bit | 0.8950 | -0.0150 [" in md
    assert (
        "| 1 | dq 4-bit | 0.9000 | 0.68 | **not dominated** | dpq 0.5 sparse 4-bit: 0.8900 (-0.0100) |" in md
    )
    assert (
        json.loads((out / "ownership.json").read_text())["contexts"][0]["fronts"][0]["owners"][0] == "dpq_qat"
    )
    assert 'id="ownership"' in (out / "pareto.html").read_text()


def with_observer(res: dict, observer: str) -> dict:
    res = json.loads(json.dumps(res))
    res["config"]["pipeline"]["stages"]["quantize"]["observer"] = observer
    return res


def test_two_dq_quantizers_each_point_is_paired_with_the_dq_of_its_own_quantizer(tmp_path):
    """dq with minmax and with LSQ steps: same bits, so MATCH_ON cannot choose; the setting where the
    two dq configurations differ (quantize.observer) does, and the table names the one used."""
    runs = {}
    for s, (mm, lsq, p_mm, p_lsq) in {1: (0.90, 0.88, 0.89, 0.85), 2: (0.92, 0.86, 0.90, 0.84)}.items():
        runs[f"dqm{s}"] = with_observer(fake_results("dq", s, mm, 0.68), "minmax")
        runs[f"dql{s}"] = with_observer(fake_results("dq", s, lsq, 0.69), "lsq")
        runs[f"pm{s}"] = with_observer(fake_results("dpq", s, p_mm, 0.40), "minmax")
        runs[f"pl{s}"] = with_observer(fake_results("dpq", s, p_lsq, 0.30), "lsq")
    df = gather([str(write_runs(tmp_path, runs))], references=False, progress=False)
    own = front_ownership(df, OBJECTIVES["accuracy"], [OBJECTIVES["effective_gflops"]])
    by = {e["point"]: e["vs_baseline"] for e in own["contexts"][0]["fronts"][0]["front"]}
    lsq = by["dpq 0.5 sparse 4-bit (quantize.observer=lsq)"]
    assert lsq["mean"] == pytest.approx(np.mean([0.85 - 0.88, 0.84 - 0.86]))
    assert lsq["baseline_point"] == "dq 4-bit (quantize.observer=lsq)"
    mm = by["dpq 0.5 sparse 4-bit (quantize.observer=minmax)"]
    assert mm["mean"] == pytest.approx(np.mean([0.89 - 0.90, 0.90 - 0.92]))
    assert mm["baseline_point"] == "dq 4-bit (quantize.observer=minmax)"
    # a point without the setting that tells them apart cannot pick one: said, not guessed
    runs = {k: v for k, v in runs.items() if not k.startswith("p")}
    runs |= {f"x{s}": fake_results("dpq", s, 0.95, 0.1) for s in (1, 2)}  # no observer in its config
    df = gather([str(write_runs(tmp_path / "b", runs))], references=False, progress=False)
    own = front_ownership(df, OBJECTIVES["accuracy"], [OBJECTIVES["effective_gflops"]])
    (x,) = [e for e in own["contexts"][0]["fronts"][0]["front"] if e["ordering"] == "dpq"]
    assert (
        "2 dq configurations fit this point (they differ in quantize.observer" in x["vs_baseline"]["missing"]
    )


def test_the_objectives_order_does_not_turn_a_cost_into_the_quality_the_front_is_owned_by(tmp_path):
    """-O effective_gflops,accuracy asks what -O accuracy,effective_gflops does: the ownership is by
    accuracy (it was by effective GFLOPs, checking 'dominated on (effective_gflops, effective_gflops)');
    with costs alone it is by the runs' primary metric."""
    study(tmp_path / "runs", dq_beaten=True)
    owned = {}
    for objectives in ("accuracy,effective_gflops", "effective_gflops,accuracy", "effective_gflops,gbops"):
        out = tmp_path / objectives.replace(",", "_")
        argv = [str(tmp_path / "runs"), "-o", str(out), "--no-progress", "--no-references", "-O", objectives]
        assert cli_main(argv) == 0
        own = json.loads((out / "ownership.json").read_text())
        own.pop("built_by", None)
        owned[objectives] = own
        assert own["contexts"][0]["domination"]["objectives"] == ["accuracy", "effective_gflops"]
    assert owned["accuracy,effective_gflops"] == owned["effective_gflops,accuracy"]
    assert owned["accuracy,effective_gflops"] == owned["effective_gflops,gbops"]
