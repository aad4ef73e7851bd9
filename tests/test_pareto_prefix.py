"""``--prefix-points dp``: a dpq run's recovery record is its dp point (issue 21's third goal names dp points,
and a dp run would restore exactly that prefix from the stage cache)."""

from __future__ import annotations

import json

import pytest
from test_pareto import fake_results, write_runs

from dpq.core.errors import ConfigError
from dpq.pareto import OBJECTIVES
from dpq.pareto.cli import main as cli_main
from dpq.pareto.gather import gather, points_from_results, prefix_orderings
from dpq.pareto.ownership import front_ownership

DP = prefix_orderings(["dp"])


def with_recovery(res: dict, acc: float, gflops: float, **quantize) -> dict:
    """``res`` (a dpq run) whose recovery ended at (acc, gflops), its quantize stage set with ``quantize``."""
    res = json.loads(json.dumps(res))
    rec = next(r for r in res["stages"] if r["stage"] == "recover")
    rec["metrics"].update(accuracy=acc, effective_gflops=gflops)
    res["config"]["pipeline"]["stages"]["quantize"].update(quantize)
    return res


def test_the_presets_stage_kinds_and_a_clear_error_for_an_unknown_one():
    assert DP == {"dp": ["teacher", "distill", "prune", "recover"]}
    with pytest.raises(ConfigError, match=r"--prefix-points.*'dq_typo'.*dp"):
        prefix_orderings(["dq_typo"])


def test_a_dpq_run_gives_its_recovery_as_the_dp_point_keyed_apart_from_its_later_stages():
    minmax = with_recovery(fake_results("dpq", 1, 0.88, 0.40, sparsity=0.8), 0.89, 0.41, observer="minmax")
    lsq = with_recovery(fake_results("dpq", 1, 0.87, 0.40, sparsity=0.8), 0.89, 0.41, observer="lsq")
    a = [p for p in points_from_results(minmax, "r1", prefix_points=DP) if p["pipeline"] == "dp"]
    b = [p for p in points_from_results(lsq, "r2", prefix_points=DP) if p["pipeline"] == "dp"]
    (dp,) = a
    assert (dp["kind"], dp["accuracy"], dp["effective_gflops"]) == ("final", 0.89, 0.41)
    assert dp["label"] == "dp 0.8 sparse" and dp["bits"] is None and dp["prefix_of"] == "dpq"
    assert dp["order"] == "teacher → distill → prune → recover"
    # the quantizer comes after the prefix: both runs carry one dp configuration
    assert b[0]["config_key"] == dp["config_key"]
    # without the option, nothing changes
    assert all(p["pipeline"] == "dpq" for p in points_from_results(minmax, "r1") if p["kind"] == "final")


def test_no_dp_point_from_a_dp_run_itself_nor_from_a_prefix_trained_for_the_quantizer():
    res = fake_results("dpq", 1, 0.88, 0.40)
    dp_run = json.loads(json.dumps(res))
    dp_run["order"] = dp_run["config"]["pipeline"]["order"] = ["teacher", "distill", "prune", "recover"]
    dp_run["pipeline"] = dp_run["config"]["pipeline"]["name"] = "dp"
    dp_run["stages"] = dp_run["stages"][:-1]
    finals = [p for p in points_from_results(dp_run, "r", prefix_points=DP) if p["kind"] == "final"]
    assert len(finals) == 1  # its own final, once
    qat = json.loads(json.dumps(res))
    qat["config"]["pipeline"]["stages"]["recover"]["qat"] = (
        "quantize"  # dpq_qat: recovered under 4-bit rounding
    )
    assert not [p for p in points_from_results(qat, "r", prefix_points=DP) if p["pipeline"] == "dp"]


def test_a_dp_point_is_checked_once_per_seed_and_has_no_predictions_of_its_own(tmp_path):
    runs = {  # two dpq runs per seed that share their prefix (min-max and LSQ steps) and a dq run
        "a1": with_recovery(fake_results("dpq", 1, 0.85, 0.20, sparsity=0.8), 0.86, 0.21, observer="minmax"),
        "b1": with_recovery(fake_results("dpq", 1, 0.87, 0.20, sparsity=0.8), 0.86, 0.21, observer="lsq"),
        "a2": with_recovery(fake_results("dpq", 2, 0.82, 0.20, sparsity=0.8), 0.84, 0.21, observer="minmax"),
        "b2": with_recovery(fake_results("dpq", 2, 0.83, 0.20, sparsity=0.8), 0.84, 0.21, observer="lsq"),
        "dq1": fake_results("dq", 1, 0.80, 0.70),
        "dq2": fake_results("dq", 2, 0.80, 0.70),
    }
    (tmp_path / "runs").mkdir()
    folder = write_runs(tmp_path / "runs", runs)
    df = gather([str(folder)], references=False, progress=False, prefix_points=DP)
    dp = df[df["pipeline"] == "dp"]  # a run's predictions.npz is its final model's, never its dp point's
    assert (
        len(dp) == 4
        and dp["run_path"].isna().all()
        and df.loc[df["pipeline"] != "dp", "run_path"].notna().all()
    )
    own = front_ownership(df, OBJECTIVES["accuracy"], [OBJECTIVES["effective_gflops"]])
    checks = own["contexts"][0]["domination"]["checks"]
    got = sorted((c["seed"], c["point"], c["dominated_by"] is not None) for c in checks)
    # seed 1: the LSQ run (0.87 at 0.20) beats its dp point (0.86 at 0.21); seed 2: no dpq run reaches 0.84
    assert got == [
        (1, "dp 0.8 sparse", True),
        (1, "dq 4-bit", True),
        (2, "dp 0.8 sparse", False),
        (2, "dq 4-bit", True),
    ]


def test_the_cli_counts_dp_points_in_the_per_seed_check(tmp_path, capsys):
    runs = {
        "p1": with_recovery(fake_results("dpq", 1, 0.85, 0.20), 0.90, 0.21),
        "dq1": fake_results("dq", 1, 0.80, 0.70),
    }
    (tmp_path / "runs").mkdir()
    folder = write_runs(tmp_path / "runs", runs)
    out = tmp_path / "report"
    assert cli_main([str(folder), "-o", str(out), "--prefix-points", "dp", "--no-progress"]) == 0
    assert "dp 0.5 sparse | 0.9000 | 0.21 | **not dominated**" in (out / "ownership.md").read_text()
    assert "no, 1 of 2 not" in capsys.readouterr().out
    assert cli_main([str(folder), "-o", str(out), "--prefix-points", "dpx", "--no-progress"]) == 2
    assert "--prefix-points" in capsys.readouterr().err


def test_compare_takes_dp_points_as_candidates(tmp_path):
    runs = {f"p{s}": with_recovery(fake_results("dpq", s, 0.85, 0.20), 0.90 + s / 100, 0.21) for s in (1, 2)}
    runs |= {f"dq{s}": fake_results("dq", s, 0.80, 0.70) for s in (1, 2)}
    (tmp_path / "runs").mkdir()
    folder = write_runs(tmp_path / "runs", runs)
    args = ["compare", str(folder), "--baseline", "dq", "--candidate", "dp", "--prefix-points", "dp"]
    assert cli_main([*args, "-o", str(tmp_path / "c"), "--no-progress"]) == 0
    (c,) = json.loads((tmp_path / "c" / "compare.json").read_text())["comparisons"]
    assert c["candidate"]["label"] == "dp 0.5 sparse"
    assert c["deltas"]["accuracy"]["mean"] == pytest.approx(0.915 - 0.80)


def test_a_check_without_dp_points_says_it_covers_dq_only(tmp_path, capsys):
    runs = {"p1": fake_results("dpq", 1, 0.85, 0.20), "dq1": fake_results("dq", 1, 0.80, 0.70)}
    (tmp_path / "runs").mkdir()
    folder = write_runs(tmp_path / "runs", runs)
    assert cli_main([str(folder), "-o", str(tmp_path / "a"), "--no-progress"]) == 0
    md = (tmp_path / "a" / "ownership.md").read_text()
    assert "is every dq point dominated" in md and "No dp points among these runs" in md
    assert "No dp points" in capsys.readouterr().out
    assert cli_main([str(folder), "-o", str(tmp_path / "b"), "--prefix-points", "dp", "--no-progress"]) == 0
    md = (tmp_path / "b" / "ownership.md").read_text()
    assert "is every dq/dp point dominated" in md and "No dp points" not in md
