"""bench/latency.py's paired speedup: per-round ratios cancel drift that hits both models alike."""

import importlib.util
import math
import random
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def latency():
    spec = importlib.util.spec_from_file_location("bench_latency", BENCH / "latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rounds(per_round, factors, ms):
    return [ms * f for f in factors for _ in range(per_round)]


def test_drift_shared_by_both_models_cancels(latency):
    drift = [1.0, 1.6, 0.9, 2.5, 1.1]  # the machine slowed 2.5x in one round, for both
    p = latency.paired_speedup(rounds(3, drift, 10.0), rounds(3, drift, 4.0), per_round=3)
    assert p["geomean"] == pytest.approx(2.5)
    assert p["ci95"][0] == pytest.approx(2.5) and p["ci95"][1] == pytest.approx(2.5)
    assert p["rounds"] == 5 and p["min_round"] == pytest.approx(2.5)


def test_the_interval_covers_the_true_ratio_and_narrows_with_rounds(latency):
    rng = random.Random(0)

    def noisy(n):
        drift = [rng.uniform(0.8, 1.5) for _ in range(n)]
        base = [10.0 * d * rng.lognormvariate(0, 0.05) for d in drift for _ in range(5)]
        model = [5.0 * d * rng.lognormvariate(0, 0.05) for d in drift for _ in range(5)]
        return latency.paired_speedup(base, model, per_round=5)

    few, many = noisy(4), noisy(40)
    for p in (few, many):
        assert p["ci95"][0] < 2.0 < p["ci95"][1]
    assert many["ci95"][1] - many["ci95"][0] < few["ci95"][1] - few["ci95"][0]
    assert math.isclose(many["geomean"], 2.0, rel_tol=0.03)


def test_one_round_has_no_interval_and_bad_shapes_are_refused(latency):
    p = latency.paired_speedup([2.0, 2.0], [1.0, 1.0], per_round=2)
    assert p["geomean"] == pytest.approx(2.0) and p["ci95"] == [None, None]
    with pytest.raises(ValueError, match="per_round"):
        latency.paired_speedup([1.0, 1.0, 1.0], [1.0, 1.0], per_round=1)
    with pytest.raises(ValueError, match="per_round"):
        latency.paired_speedup([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], per_round=2)


def test_run_folders_are_named_by_config_unless_two_share_one(latency, tmp_path):
    """Three seeds' models of one recipe are three rows; a lone seed keeps its config's name, so
    ``--baseline dense`` still finds ``dense-s42`` (they once collapsed into one row, the last seed)."""
    dirs = {}
    for name in ("dense-s42", "mix-s42", "mix-s43", "mix-s44", "custom"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text("{}")
        dirs[name] = tmp_path / name
    runs = latency.pick_runs([dirs[n] for n in ("dense-s42", "mix-s42", "mix-s43", "mix-s44", "custom")])
    assert runs == {
        "dense": dirs["dense-s42"],
        "mix-s42": dirs["mix-s42"],
        "mix-s43": dirs["mix-s43"],
        "mix-s44": dirs["mix-s44"],
        "custom": dirs["custom"],
    }
    other = tmp_path / "elsewhere" / "mix-s42"
    other.mkdir(parents=True)
    (other / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="both named 'mix-s42'"):
        latency.pick_runs([dirs["mix-s42"], other])


def test_a_study_pick_never_replaces_a_named_run_and_a_hydra_named_dense_run_is_dense(latency, tmp_path):
    """A study folder's dense-s42 once silently replaced an explicit dense-s43 (and a second study folder the
    first): now that is an error. A run folder as Hydra names it is found as the dense run by its pipeline,
    so the teacher row and the free ONNX Runtime baselines are not silently left out."""
    import json

    def run(folder, pipeline):
        folder.mkdir(parents=True)
        (folder / "model").mkdir()
        (folder / "results.json").write_text(json.dumps({"status": "completed", "pipeline": pipeline}))
        return folder

    study = tmp_path / "study"
    run(study / "dense-s42", "dense"), run(study / "dq-s42", "dq")
    other = run(tmp_path / "other" / "dense-s43", "dense")
    with pytest.raises(SystemExit, match="'dense' is both"):
        latency.pick_runs([other, study])
    study2 = tmp_path / "study2"
    run(study2 / "dq-s44", "dq")
    with pytest.raises(SystemExit, match="'dq' is both"):
        latency.pick_runs([study, study2])
    hydra = run(tmp_path / "outputs" / "10-00-00_dense-rotten_tomatoes-minilm_l3-s42", "dense")
    mix = run(tmp_path / "outputs" / "11-00-00_dpq-rotten_tomatoes-minilm_l3-s42", "dpq")
    assert latency.pick_runs([hydra, mix]) == {"dense": hydra, "11-00-00_dpq-rotten_tomatoes-minilm_l3": mix}
    two = run(tmp_path / "outputs" / "12-00-00_dense-rotten_tomatoes-minilm_l3-s43", "dense")
    assert "dense" not in latency.pick_runs([hydra, two])  # which one would be a guess
