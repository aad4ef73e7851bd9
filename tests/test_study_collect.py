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
        "val_accuracy": acc + 0.01,
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


class Tree:
    """What ``study.tree_state`` returns: the checkout's git state (here made up)."""

    def __init__(self, dirty):
        self.info = {
            "sha": "abc",
            "dirty": dirty,
            "diff_sha256": "d" * 64 if dirty else None,
            "untracked_sha256": None,
            "untracked": [],
        }


@pytest.fixture(autouse=True)
def clean_checkout(study, monkeypatch):
    monkeypatch.setattr(study, "tree_state", lambda: Tree(dirty=False))


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
    half = 12.706204736 * 0.015 / 2**0.5 / 2**0.5  # t(0.975, 1 df) * std / sqrt(2); std of (-.005, -.02)
    assert cand["accuracy_delta_ci95"] == pytest.approx([-0.0125 - half, -0.0125 + half])
    assert cand["accuracy_verdict"] == "unresolved"
    assert not cand["meets"] and not cand["meets_every_seed"] and not cand["meets_on_mean"]
    lat = study.goals(summary, runs)["dpq_s55_vs_dq_latency"]
    assert lat["speedup"] == pytest.approx(13.0 / (23 / 3)) and lat["faster_on_mean"]
    assert lat["saving_ms"] == pytest.approx(5.5)  # (14 - 7 + 12 - 8) / 2, seed 3 unpaired
    assert lat["saving_ms_ci95"][0] < 0 and not lat["faster"]  # two seeds do not show it


def test_a_goal_is_met_on_its_interval_not_on_its_mean(study, tmp_path):
    """Three seeds 0.2 points below dq, tightly: the interval clears -1 point (met); a candidate
    whose mean is as good but whose seeds scatter by points is unresolved."""
    f = tmp_path / "study"
    for sd, base in ((1, 0.85), (2, 0.86), (3, 0.84)):
        write(f, f"dq-s{sd}", base, 0.28, lat=14.0 + sd)
        write(f, f"dpq_s55-s{sd}", base - 0.002 - 0.0001 * sd, 0.12, lat=7.0 + 0.1 * sd)
        write(
            f, f"dpq_s50-s{sd}", base - 0.002 + (0.03, -0.03, 0.0)[sd - 1], 0.14, lat=(7.0, 14.0, 8.0)[sd - 1]
        )
    runs = study.collect(f)
    goals = study.goals(study.summarise(runs), runs)
    by = {c["config"]: c for c in goals["dpq_vs_dq"]}
    tight, loose = by["dpq_s55"], by["dpq_s50"]
    assert tight["accuracy_verdict"] == "met" and tight["meets"]
    assert loose["accuracy_delta"] == pytest.approx(-0.002) and loose["meets_on_mean"]
    assert loose["accuracy_verdict"] == "unresolved" and not loose["meets"]
    assert goals["dpq_s55_vs_dq_latency"]["faster"]  # 7.9 ms saved on every seed, give or take 0.1
    assert not goals["structured_vs_dq_latency"]["faster"]  # saves 8, 2 and 9 ms: not shown
    table = study.markdown_goals({"goals": goals})
    assert "| `dpq_s55` | 0.429 | −0.22 [" in table and "| met | met |" in table


def test_the_study_refuses_a_dirty_checkout_unless_allowed_and_records_it(study, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(study, "tree_state", lambda: Tree(dirty=True))
    monkeypatch.setattr(study, "run_one", lambda n, s, out, extra: ran.append((n, s)) or {})
    with pytest.raises(SystemExit, match="uncommitted changes.*--allow-dirty"):
        study.main(["--seeds", "1", "--configs", "dq", "--out", str(tmp_path)])
    assert ran == []  # refused before any run
    folder = tmp_path / "s"
    write(folder, "dq-s1", 0.86, 0.28)
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: type("P", (), {"returncode": 0})())
    monkeypatch.setattr(
        study, "run_one", lambda n, s, out, extra: json.loads((folder / "dq-s1/results.json").read_text())
    )
    report = study.main(["--seeds", "1", "--configs", "dq", "--out", str(folder), "--allow-dirty"])
    saved = json.loads((folder / "study.json").read_text())
    assert report["allow_dirty"] is True and saved["allow_dirty"] is True
    assert saved["git_at_start"]["dirty"] is True and saved["git_at_start"]["diff_sha256"] == "d" * 64
    collected = study.main(["--collect", "--out", str(folder)])  # summarising trains nothing: allowed
    assert collected["git_at_start"]["dirty"] is True


def test_update_docs_only_from_the_committed_study(study, folder):
    with pytest.raises(SystemExit, match="--update-docs needs --collect and the default --out"):
        study.main(["--collect", "--update-docs", "--out", str(folder)])


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
    assert (
        cells[3]
        == f"{(0.855 + 0.78 + 0.99) / 3 + 0.01:.4f} ± {report['summary']['dpq_s55']['accuracy']['std']:.4f}"
    )
    assert cells[4] == "-1.25 (-0.50, -2.00)"  # paired with dq on seeds 1 and 2
    lo, hi = report["goals"]["dpq_vs_dq"][0]["accuracy_delta_ci95"]
    assert cells[5] == f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
    assert cells[8] == f"{0.12 / 0.28:.3f}"
    assert any(r.startswith("| teacher") and "0.8650 ± 0.0071" in r for r in table)
