"""The benchmark scripts run end to end in their tiny mode and write what BENCHMARKS.md reads."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~10 tiny pipeline runs; CI runs the slow set

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    report = load("study").main(
        [
            "--tiny",
            "--allow-dirty",  # a check of the script, run from whatever checkout the tests run in
            "--seeds",
            "1",
            "2",
            "--configs",
            "dense",
            "dq",
            "dpq_u50",
            "dpq_s50",
            "--out",
            str(out),
            f"paths.cache_dir={out / 'cache'}",
        ]
    )
    return out, report


def test_study_runs_every_config_and_seed_and_summarises_mean_and_std(tiny_study):
    out, report = tiny_study
    assert set(report["runs"]) == {f"{c}-s{s}" for c in ("dense", "dq", "dpq_u50", "dpq_s50") for s in (1, 2)}
    s = report["summary"]
    assert s["dq"]["accuracy"]["n"] == 2 and s["dq"]["accuracy"]["std"] >= 0
    assert {"teacher", "student_dense"} <= set(s)
    # the unstructured point has half the effective FLOPs of its dense encoder linears; the
    # structured one has fewer *dense* FLOPs (it was shrunk), the unstructured one does not
    assert s["dpq_u50"]["effective_gflops"]["mean"] < s["dq"]["effective_gflops"]["mean"]
    assert s["dpq_s50"]["dense_gflops"]["mean"] < s["dq"]["dense_gflops"]["mean"]
    assert s["dpq_u50"]["dense_gflops"]["mean"] == pytest.approx(s["dq"]["dense_gflops"]["mean"])
    assert "dpq_vs_dq" in report["goals"] and "structured_vs_dq_latency" in report["goals"]
    assert json.loads((out / "study.json").read_text())["summary"] == json.loads(json.dumps(s))


def test_study_reuses_completed_runs(tiny_study):
    out, _ = tiny_study
    before = (out / "dq-s1" / "results.json").stat().st_mtime_ns
    load("study").main(["--tiny", "--allow-dirty", "--seeds", "1", "--configs", "dq", "--out", str(out)])
    assert (out / "dq-s1" / "results.json").stat().st_mtime_ns == before


def test_structured_latency_compares_shrunk_and_dense_in_one_process(tiny_study, tmp_path):
    out, _ = tiny_study
    res = load("structured_latency").main(
        [
            str(out / "dpq_s50-s1"),
            "--batches",
            "1",
            "4",
            "--rounds",
            "2",
            "--per-round",
            "2",
            "--warmup",
            "1",
            "--seq-len",
            "16",
            "--out",
            str(tmp_path / "lat.json"),
        ]
    )
    for b in ("1", "4"):
        r = json.loads((tmp_path / "lat.json").read_text())["batches"][b]
        assert r["gflops_shrunk"] < r["gflops_dense"] and r["flop_ratio"] > 1
        assert r["latency_ms_dense"] > 0 and r["latency_ms_shrunk"] > 0
    assert res["params_shrunk"] < res["params_dense"]


def test_latency_times_every_configs_saved_model_in_one_process(tiny_study, tmp_path):
    out, _ = tiny_study
    res = load("latency").main(
        [
            str(out),
            "--batches",
            "1",
            "3",
            "--rounds",
            "2",
            "--per-round",
            "1",
            "--warmup",
            "1",
            "--seq-len",
            "8",
            "--out",
            str(tmp_path / "lat.json"),
        ]
    )
    models = res["models"]
    assert set(models) == {"teacher", "dense", "dq", "dpq_u50", "dpq_s50"}
    assert all(m["run"].endswith("-s1") for k, m in models.items())  # one run per config: the lowest seed
    for k, m in models.items():  # each reloaded model is the run's own: same accuracy record, shape
        if k != "teacher":
            assert (
                m["accuracy"]
                == json.loads((out / f"{k}-s1" / "results.json").read_text())["final"]["accuracy"]
            )
    assert (
        models["dpq_s50"]["params_total"] < models["dense"]["params_total"]
    )  # the shrunk structure was reloaded
    for b in ("1", "3"):
        r = res["batches"][b]
        assert r["dq"]["speedup_vs_dq"] == 1.0
        assert r["dq"]["paired_speedup_vs_dq"]["geomean"] == 1.0  # paired by round: itself, exactly
        assert r["dpq_u50"]["paired_speedup_vs_dq"]["rounds"] == 2
        assert all(v["latency_ms_median"] > 0 for v in r.values())
    assert (
        json.loads((tmp_path / "lat.json").read_text())["batches"]["3"].keys() == res["batches"]["3"].keys()
    )
    # bf16 (the GPU item's dtype) runs too, packed 4-bit and shrunk models included
    bf = load("latency").main(
        [
            str(out),
            "--dtype",
            "bfloat16",
            "--batches",
            "2",
            "--rounds",
            "1",
            "--per-round",
            "1",
            "--warmup",
            "0",
            "--seq-len",
            "8",
            "--out",
            str(tmp_path / "bf.json"),
        ]
    )
    assert bf["dtype"] == "bfloat16" and set(bf["batches"]["2"]) == set(models)


def test_overhead_times_plain_prune_and_qat_steps(tmp_path):
    res = load("overhead").main(
        ["--tiny", "--steps", "8", "--warmup", "2", "--out", str(tmp_path / "o.json")]
    )
    for k in ("plain_ms", "prune_ms", "qat_ms"):
        assert res[k] > 0
    assert res["prune_ratio"] == pytest.approx(res["prune_ms"] / res["plain_ms"])
    assert json.loads((tmp_path / "o.json").read_text())["steps"] == 8


def test_int8_matmul_times_float_and_int8_on_the_students_shapes(tmp_path):
    res = load("int8_matmul").main(["--rounds", "1", "--per-round", "1", "--out", str(tmp_path / "i.json")])
    assert len(res["rows"]) == 10 and res["kernel"]
    for r in res["rows"]:
        assert r["float32_ms"] > 0 and r["int8_ms"] > 0
        assert r["int8_speedup"] == pytest.approx(r["float32_ms"] / r["int8_ms"])
    assert json.loads((tmp_path / "i.json").read_text())["kernel"] == res["kernel"]


def test_weight_only_export_times_integer_kernels_against_exact_matmulnbits(tiny_study, tmp_path):
    out, _ = tiny_study
    res = load("weight_only_export").main(
        [str(out / "dense-s1"), "--group", "16", "--batches", "2", "--rounds", "2", "--per-round", "1"]
        + ["--warmup", "0", "--seq-len", "8", "--out", str(tmp_path / "w.json")]
    )
    m = res["models"]
    channel, group = m["8-bit per_channel ORT"], m["8-bit per_group 16 ORT"]
    # per channel: the integer kernels (activations rounded on the fly); per group: MatMulNBits, exact
    assert (
        channel["int8_layers"] == 12
        and channel["nbits_layers"] == 0
        and "DynamicQuantizeMatMul" in channel["ops"]
    )
    assert (
        group["nbits_layers"] == 12
        and group["int8_layers"] == 0
        and "DynamicQuantizeMatMul" not in group["ops"]
    )
    assert group["max_abs_logit_diff"] < 1e-4 and group["agreement"] == 1.0
    assert 0 < channel["agreement"] <= 1 and m["8-bit per_channel PyTorch"]["accuracy"] > 0
    r = res["batches"]["2"]
    assert set(r) == {
        "dense ORT fp32",
        "dense ORT int8 dynamic",
        "8-bit per_channel ORT",
        "8-bit per_group 16 ORT",
    }
    assert r["dense ORT fp32"]["paired_speedup_vs_dense ORT fp32"]["geomean"] == 1.0
    assert json.loads((tmp_path / "w.json").read_text())["models"].keys() == m.keys()


def test_latency_of_other_runs_never_overwrites_the_studys_file(tmp_path, capsys):
    """bench/results/latency.json feeds README's measured table: timing other runs without --out replaced it."""
    with pytest.raises(SystemExit) as e:
        load("latency").main([str(tmp_path)])
    assert e.value.code == 2 and "--out is needed" in capsys.readouterr().err
