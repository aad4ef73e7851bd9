"""The tables of README.md and BENCHMARKS.md are generated from the committed study runs
(bench/results/study/**/results.json, bench/results/latency.json), never typed: this fails when
a committed table differs from what those runs produce. Regenerate them with
``python bench/study.py --collect --update-docs``."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_study_tables", ROOT / "bench" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tables(study):
    return study.doc_tables()


def test_the_committed_tables_are_what_the_committed_results_produce(study, tables):
    assert {doc for doc, _ in tables} == {"README.md", "BENCHMARKS.md"}
    for (doc, name), body in tables.items():
        committed = study.region((ROOT / doc).read_text(), name)
        assert committed == body, f"{doc} ({name}) differs: run python bench/study.py --collect --update-docs"


def test_every_study_run_and_the_interleaved_latency_are_in_the_tables(study, tables):
    runs = study.collect(study.RESULTS / "study")
    assert {n for n, _ in runs} == set(study.CONFIGS) and {s for _, s in runs} == {42, 43, 44}
    assert study.load_latency(study.RESULTS / "study") is not None  # it timed these runs' models
    table = tables[("BENCHMARKS.md", "study-table")]
    for name in study.CONFIGS:
        if name != "dense":  # the dense pipeline's final is the distilled student's row
            assert f"`{name}`" in table, name


def test_a_typed_change_to_a_generated_table_is_caught(study, tables):
    text = (ROOT / "README.md").read_text()
    body = tables[("README.md", "measured")]
    typed = study.with_region(text, "measured", body.replace("0.8537 ± 0.0054", "0.8637 ± 0.0054"))
    assert study.region(typed, "measured") != body
    assert study.region(study.with_region(typed, "measured", body), "measured") == body
    with pytest.raises(SystemExit, match="markers"):
        study.region(text, "no-such-region")
