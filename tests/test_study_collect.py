"""bench/study.py --collect: seeds run apart (one folder each) are summarised together, and the
goal check pairs each candidate with dq seed by seed. Synthetic results.json files: no training."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_study_collect", BENCH / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def final(acc, eff, lat=10.0):
    return {
        "accuracy": acc,
        "dense_gflops": 0.35,
        "effective_gflops": eff,
        "size_bytes": 1e6,
        "latency_ms_median": lat,
        "params_nonzero": 100,
    }


def write(folder: Path, name: str, acc: float, eff: float, status="completed", lat=10.0, stages=()):
    (folder / name).mkdir(parents=True)
    res = {
        "status": status,
        "final": final(acc, eff, lat),
        "git": {"sha": "abc" + name, "dirty": False},
        "stages": list(stages),
    }
    (folder / name / "results.json").write_text(json.dumps(res))


def dense_stages(t_acc, s_acc):
    return [
        {"kind": "teacher", "metrics": final(t_acc, 0.7)},
        {"kind": "distill", "metrics": final(s_acc, 0.35)},
    ]


@pytest.fixture
def folder(tmp_path):
    f = tmp_path / "study"
    write(f, "dense-s1", 0.85, 0.35, stages=dense_stages(0.86, 0.85))
    write(f, "dense-s2", 0.84, 0.35, stages=dense_stages(0.87, 0.84))
    write(f, "dq-s1", 0.86, 0.28, lat=14.0)
    write(f, "dq-s2", 0.80, 0.28, lat=12.0)
    write(f, "dpq_s55-s1", 0.855, 0.12, lat=7.0)  # -0.5 points on seed 1
    write(f, "dpq_s55-s2", 0.78, 0.12, lat=8.0)  # -2.0 points on seed 2
    write(f, "dpq_s55-s3", 0.99, 0.12, lat=8.0)  # no dq on seed 3: not paired, and not in the delta
    write(f, "dpq_u50-s1", 0.5, 0.18, status="failed")  # unfinished runs are not collected
    write(f, "notes-and-things", 0.1, 0.1)  # not a <config>-s<seed> folder
    return f


def test_collect_finds_completed_runs_in_study_order(study, folder):
    runs = study.collect(folder)
    assert list(runs) == [
        ("dense", 1),
        ("dense", 2),
        ("dq", 1),
        ("dq", 2),
        ("dpq_s55", 1),
        ("dpq_s55", 2),
        ("dpq_s55", 3),
    ]
    assert list(study.collect(folder, configs=["dq"], seeds=[2])) == [("dq", 2)]
    with pytest.raises(SystemExit, match="no completed"):
        study.collect(folder, configs=["spiral_u50"])


def test_goals_pair_candidates_with_dq_by_seed(study, folder):
    runs = study.collect(folder)
    summary = study.summarise(runs)
    assert summary["dpq_s55"]["accuracy"]["n"] == 3
    assert summary["teacher"]["accuracy"]["mean"] == pytest.approx(0.865)
    (cand,) = [c for c in study.goals(summary, runs)["dpq_vs_dq"] if c["config"] == "dpq_s55"]
    assert cand["accuracy_delta_per_seed"] == pytest.approx({"1": -0.005, "2": -0.02})
    assert cand["accuracy_delta"] == pytest.approx(-0.0125)  # paired mean, seed 3 left out
    assert cand["effective_gflops_ratio"] == pytest.approx(0.12 / 0.28)
    assert not cand["meets"] and not cand["meets_every_seed"]
    lat = study.goals(summary, runs)["dpq_s55_vs_dq_latency"]
    assert lat["speedup"] == pytest.approx(13.0 / (23 / 3)) and lat["faster"]


def test_collect_cli_writes_one_report_over_all_seeds(study, folder, monkeypatch):
    calls = []
    monkeypatch.setattr(
        study.subprocess, "run", lambda *a, **k: calls.append(a) or type("P", (), {"returncode": 0})()
    )
    report = study.main(["--collect", "--out", str(folder)])
    saved = json.loads((folder / "study.json").read_text())
    assert saved["collected"] and saved["seeds"] == [1, 2, 3]
    assert saved["seeds_per_config"]["dpq_s55"] == [1, 2, 3] and saved["seeds_per_config"]["dq"] == [1, 2]
    assert saved["git_per_run"]["dq-s2"] == "abcdq-s2"
    assert set(report["runs"]) == {
        "dense-s1",
        "dense-s2",
        "dq-s1",
        "dq-s2",
        "dpq_s55-s1",
        "dpq_s55-s2",
        "dpq_s55-s3",
    }
    assert calls and "dpq.pareto" in calls[0][0]  # the Pareto report is built from the same folder


def test_markdown_table_holds_the_reports_figures(study, folder, monkeypatch):
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: type("P", (), {"returncode": 0})())
    report = study.main(["--collect", "--out", str(folder)])
    table = study.markdown(report).splitlines()
    row = next(r for r in table if r.startswith("| `dpq_s55`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1,2,3"
    assert (
        cells[2] == f"{(0.855 + 0.78 + 0.99) / 3:.4f} ± {report['summary']['dpq_s55']['accuracy']['std']:.4f}"
    )
    assert cells[3] == "-1.25 (-0.50, -2.00)"  # paired with dq on seeds 1 and 2
    assert cells[6] == f"{0.12 / 0.28:.3f}"
    assert any(r.startswith("| teacher") and "0.8650 ± 0.0071" in r for r in table)
