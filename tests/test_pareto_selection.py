"""``--choose KEYS --choose-on val_...``: variants of a recipe reduced to the one picked on validation
before the front, the ownership, the domination check and compare see them."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_pareto import compare_cli, fake_results, write_runs

from dpq.pareto.cli import main as cli_main


def with_val(res: dict, val: float, observer: str | None = None) -> dict:
    """``res`` with a validation accuracy on its final point (and a QAT observer setting)."""
    res["final"]["val_accuracy"] = val
    if observer is not None:
        res["config"]["pipeline"]["stages"]["quantize"]["observer"] = observer
    return res


def study(root, lsq_seeds=(1, 2, 3), lsq_val=0.80, minmax_val=0.85):
    """dq at test .86; dpq with minmax steps (val high, test .85) and lsq steps (val low, test .88):
    only lsq would dominate dq on test, and validation picks minmax."""
    runs = {f"dq_s{s}": with_val(fake_results("dq", s, 0.86, 0.3), 0.86, "minmax") for s in (1, 2, 3)}
    runs |= {
        f"a_minmax_s{s}": with_val(fake_results("dpq", s, 0.85, 0.1), minmax_val + 0.001 * s, "minmax")
        for s in (1, 2, 3)
    }
    runs |= {
        f"b_lsq_s{s}": with_val(fake_results("dpq", s, 0.88, 0.1), lsq_val + 0.001 * s, "lsq")
        for s in lsq_seeds
    }
    return write_runs(root, runs)


def test_the_variant_chosen_on_validation_is_the_only_one_reported(tmp_path, caplog):
    runs = study(tmp_path / "runs")
    every, chosen = tmp_path / "every", tmp_path / "chosen"
    assert cli_main([str(runs), "--no-progress", "-o", str(every)]) == 0
    own = json.loads((every / "ownership.json").read_text())
    assert own["contexts"][0]["domination"]["all_dominated"]  # lsq, the test winner, dominates dq
    with caplog.at_level("INFO", logger="dpq.pareto"):
        assert cli_main([str(runs), "--no-progress", "-o", str(chosen), "--choose", "quantize.observer"]) == 0
    assert "chose quantize.observer=minmax on val_accuracy (mean over seeds 1,2,3)" in caplog.text
    finals = pd.read_csv(chosen / "pareto.csv").query("kind == 'final'")
    dpq = finals.query("pipeline == 'dpq'")
    assert len(dpq) == 1 and dpq["accuracy"].item() == pytest.approx(0.85)
    assert dpq["label"].item() == "dpq 0.5 sparse 4-bit (quantize.observer=minmax)"
    assert set(pd.read_csv(chosen / "runs.csv").query("kind == 'final'")["run"].str[:5]) == {
        "a_min",
        "dq_s1",
        "dq_s2",
        "dq_s3",
    }
    own = json.loads((chosen / "ownership.json").read_text())
    assert not own["contexts"][0]["domination"]["all_dominated"]  # minmax (.85) does not dominate dq (.86)
    (record,) = own["chosen"]
    assert record["on"] == "val_accuracy" and record["seeds"] == [1, 2, 3]
    scores = {v["settings"]["pipeline.stages.quantize.observer"]: v for v in record["variants"]}
    assert scores["minmax"]["val_accuracy"] == pytest.approx(0.852) and scores["minmax"]["kept"]
    assert scores["lsq"]["val_accuracy"] == pytest.approx(0.802) and not scores["lsq"]["kept"]
    md = (chosen / "ownership.md").read_text()
    assert md.startswith("# Variants chosen on val_accuracy") and "| no |" in md and "**yes**" in md
    # dq's observer is a setting too, but dq has no other variant: it stays
    assert len(finals.query("pipeline == 'dq'")) == 1


def test_variants_are_compared_on_the_seeds_they_share(tmp_path):
    # lsq only has seed 1, where it beats minmax on validation; the other seeds of minmax do not count
    runs = study(tmp_path / "runs", lsq_seeds=(1,), lsq_val=0.90)
    assert cli_main([str(runs), "--no-progress", "-o", str(tmp_path / "o"), "--choose", "observer"]) == 0
    (record,) = json.loads((tmp_path / "o" / "ownership.json").read_text())["chosen"]
    assert record["seeds"] == [1]
    kept = [v for v in record["variants"] if v["kept"]]
    assert kept[0]["settings"] == {"pipeline.stages.quantize.observer": "lsq"}
    assert sorted(v["val_accuracy"] for v in record["variants"]) == pytest.approx([0.851, 0.901])


def test_a_tie_goes_to_the_variant_listed_first(tmp_path):
    runs = study(tmp_path / "runs", lsq_val=0.85)  # the same validation accuracy on every seed
    assert cli_main([str(runs), "--no-progress", "-o", str(tmp_path / "o"), "--choose", "observer"]) == 0
    (record,) = json.loads((tmp_path / "o" / "ownership.json").read_text())["chosen"]
    assert [v["kept"] for v in record["variants"]] == [True, False]
    assert (
        record["variants"][0]["settings"]["pipeline.stages.quantize.observer"] == "minmax"
    )  # a_minmax sorts first


def test_compare_reports_only_the_chosen_variant(tmp_path):
    runs = study(tmp_path / "runs")
    assert compare_cli(runs, tmp_path / "o", "--choose", "quantize.observer") == 0
    got = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert [c["candidate"]["label"] for c in got["comparisons"]] == [
        "dpq 0.5 sparse 4-bit (quantize.observer=minmax)"
    ]
    assert got["comparisons"][0]["deltas"]["accuracy"]["mean"] == pytest.approx(-0.01)
    assert got["chosen"][0]["kept"].endswith("(quantize.observer=minmax)")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--choose", "observer", "--choose-on", "accuracy"], "a validation objective, one of val_accuracy"),
        (["--choose-on", "val_accuracy"], "needs --choose"),
        (["--choose", "quantize.observr"], "no run has a setting of that name"),
        (
            ["--choose", "stages.quantize.obs"],
            "settings of the runs with that ending: pipeline.stages.quantize.observer",
        ),
    ],
)
def test_choosing_on_test_or_on_no_setting_is_a_config_error(tmp_path, capsys, extra, match):
    runs = study(tmp_path / "runs")
    assert cli_main([str(runs), "--no-progress", "-o", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert compare_cli(runs, tmp_path / "c", *extra) == 2
    assert match in capsys.readouterr().err


def test_the_committed_epyc_report_is_what_its_command_gives(tmp_path):
    """bench/results/front_epyc_lsq/pareto (BENCHMARKS.md "The QAT observer chosen on validation") is
    rebuilt from the committed runs with its documented command: the same choices and the same front."""
    from pathlib import Path

    from dpq.pareto.cli import build_report

    root = Path(__file__).resolve().parents[1] / "bench" / "results"
    inputs = [
        str(root / "front_epyc_b"),
        *(str(root / "front_epyc" / f"fu80-s{s}") for s in (42, 43, 44)),
        str(root / "front_epyc" / "*-s45"),
        str(root / "front_epyc" / "*-s46"),
        str(root / "front_epyc_lsq"),
    ]
    build_report(
        inputs,
        ["accuracy", "effective_gflops"],
        tmp_path,
        progress=False,
        min_seeds=5,
        seeds=list(range(42, 47)),
        choose=["quantize.observer"],
    )
    committed = root / "front_epyc_lsq" / "pareto"
    got = json.loads((tmp_path / "ownership.json").read_text())
    want = json.loads((committed / "ownership.json").read_text())
    assert want.pop("built_by")["command"].endswith("--choose quantize.observer")  # how it was made
    assert got == want
    assert [v["kept"] for r in got["chosen"] for v in r["variants"]] == [False, True, False, True]
    md = (committed / "ownership.md").read_text().split("\n## How this report was built")[0]
    assert (tmp_path / "ownership.md").read_text() == md
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "pareto.csv"), pd.read_csv(committed / "pareto.csv"))


def test_a_variant_whose_runs_carry_no_seed_shares_no_seed_with_the_others(tmp_path, capsys):
    runs = {f"a_s{s}": with_val(fake_results("dpq", s, 0.85, 0.1), 0.85, "minmax") for s in (1, 2)}
    seedless = with_val(fake_results("dpq", 1, 0.88, 0.1), 0.80, "lsq")
    seedless["seed"] = seedless["config"]["seed"] = None
    root = write_runs(tmp_path / "runs", {**runs, "b": seedless})
    assert cli_main([str(root), "--no-progress", "-o", str(tmp_path / "o"), "--choose", "observer"]) == 2
    err = capsys.readouterr().err  # was a KeyError of the seedless variant's config key
    assert "share no seed with val_accuracy: a choice must compare them on the same seeds" in err
