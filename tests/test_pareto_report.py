"""A real grid (digits: dq, and dpq at 0.2/0.5/0.8 sparsity; two seeds of dq) -> python -m dpq.pareto ->
tables, PNG and an HTML report that headless Chromium renders; compare mode; W&B (offline) logging.

The grid trains five small models (tens of seconds on 2 cores), so its tests are marked slow;
the fast suite renders a report of hand-written results.json files in Chromium instead.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from dpq.core.config import CONF_DIR
from dpq.pareto import pareto_mask, parse_objectives
from dpq.train import train

CHROMIUM = "/usr/bin/chromium"
FAST = [
    "experiment=digits",
    "save_model=false",
    "cost.repeats=5",
    "cost.warmup=1",
    "pipeline.stages.teacher.epochs=4",
    "pipeline.stages.distill.epochs=4",
    "pipeline.stages.prune.epochs=3",
    "pipeline.stages.recover.epochs=1",
    "pipeline.stages.quantize.epochs=1",
]
# Hydra-multirun-like folder names; dq seed 2 runs with the W&B logger (offline) to check its logging.
GRID = {
    "0_pipeline=dq,seed=1": ["pipeline=dq", "seed=1"],
    "1_pipeline=dq,seed=2": ["pipeline=dq", "seed=2", "logger=wandb"],
    "2_pipeline=dpq,sparsity=0.2": ["pipeline=dpq", "seed=1", "pipeline.stages.prune.final_sparsity=0.2"],
    "3_pipeline=dpq,sparsity=0.5": ["pipeline=dpq", "seed=1", "pipeline.stages.prune.final_sparsity=0.5"],
    "4_pipeline=dpq,sparsity=0.8": ["pipeline=dpq", "seed=1", "pipeline.stages.prune.final_sparsity=0.8"],
}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dpq.pareto", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    root = tmp_path_factory.mktemp("pareto_grid")
    results = {}
    for name, overrides in GRID.items():
        logger = [o for o in overrides if o.startswith("logger=")] or ["logger=none"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "train", overrides=[*FAST, *logger, *(o for o in overrides if not o.startswith("logger="))]
            )
        with open_dict(cfg):
            cfg.paths.output_dir = str(root / "multirun" / name)
            cfg.paths.cache_dir = str(root / "cache")
        results[name] = train(cfg)
    return root / "multirun", results


@pytest.fixture(scope="module")
def report(multirun):
    folder, _ = multirun
    proc = _cli(str(folder), "--no-progress", cwd=folder.parent)
    return folder / "pareto", proc


@pytest.mark.slow
def test_tables_list_every_run_and_flag_the_front(multirun, report):
    folder, results = multirun
    out, proc = report
    points = pd.read_csv(out / "pareto.csv")
    assert pd.read_parquet(out / "pareto.parquet")[["label", "pareto"]].equals(points[["label", "pareto"]])
    # dq (2 seeds), dpq x 3, plus one teacher and one dense reference per seed-configuration
    finals = points[points["kind"] == "final"].set_index("label")
    assert sorted(finals.index) == [
        "dpq 0.2 sparse 4-bit",
        "dpq 0.5 sparse 4-bit",
        "dpq 0.8 sparse 4-bit",
        "dq 4-bit",
    ]
    assert finals.loc["dq 4-bit", "n_seeds"] == 2
    dq_acc = [results[n]["final"]["accuracy"] for n in GRID if "dq" in n]
    assert finals.loc["dq 4-bit", "accuracy"] == pytest.approx(np.mean(dq_acc))
    assert finals.loc["dq 4-bit", "accuracy_std"] == pytest.approx(np.std(dq_acc, ddof=1))
    for s in (0.2, 0.5, 0.8):  # the measured sparsity is the configured one
        assert finals.loc[f"dpq {s} sparse 4-bit", "sparsity"] == pytest.approx(s, abs=0.01)
    assert set(points["kind"]) == {"final", "teacher", "dense"}
    # the flag is the non-dominated set of the written numbers
    objs = parse_objectives(["accuracy", "effective_gflops"])
    assert (
        points["pareto"].tolist()
        == pareto_mask(points[["accuracy", "effective_gflops"]], ["max", "min"]).tolist()
    )
    assert points["pareto"].any() and objs[0].name in points
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs.loc[runs["kind"] == "final", "run"]) == sorted(GRID)
    assert "Pareto front" in proc.stdout and "pareto.html" in proc.stdout


@pytest.mark.slow
def test_png_is_a_real_plot(report):
    import matplotlib.image as mpimg

    out, _ = report
    img = mpimg.imread(out / "pareto.png")
    assert img.shape[0] > 500 and img.shape[1] > 800
    assert img[..., :3].std() > 0.05  # not blank


@pytest.mark.slow
def test_html_is_self_contained_and_lists_every_run(report):
    out, _ = report
    page = (out / "pareto.html").read_text()
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']?(https?:)?//""", page)  # nothing to fetch
    assert "plotly" in page.lower() and 'id="pareto-plot"' in page
    for name in GRID:
        assert name in page


def check_renders(html: Path, runs: list[str], tmp_path: Path, error_bars: bool = True) -> None:
    """Headless Chromium runs the page's JS: the chart is drawn and the runs table lists every run."""
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1800",
    ]
    url = html.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    # plotly drew the chart: its SVG, a marker per point, seed error bars, the front's step line
    assert 'class="main-svg"' in dom, dom[:500]
    points = pd.read_csv(html.parent / "pareto.csv")
    assert len(re.findall(r'<path class="point', dom)) >= len(points)
    assert 'class="js-line"' in dom
    assert ('class="errorbar"' in dom) == error_bars  # error bars only where a config has several seeds
    assert "Pareto front" in dom and "effective GFLOPs" in dom
    # the runs table, as rendered, lists every run
    table = dom[dom.index('id="runs"') :]
    body = table[table.index("<tbody>") : table.index("</table>")]
    assert len(re.findall(r"<tr[ >]", body)) == len(runs)  # one row per run
    for name in runs:
        assert f"<td>{name}</td>" in body
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (1800, 1400) and img[..., :3].std() > 0.05  # something was painted


needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} not installed (Debian package 'chromium'; CI installs it)",
)


@needs_chromium
def test_report_of_hand_built_runs_renders_in_chromium(tmp_path):
    """Fast-suite version: results.json files written by hand (two seeds of dq for error bars)."""
    from test_pareto import grid

    folder = grid(tmp_path / "runs")
    _cli(str(folder), "--no-progress", cwd=tmp_path)
    check_renders(folder / "pareto" / "pareto.html", ["a1", "a2", "b1", "dq1", "dq2"], tmp_path)


@pytest.mark.slow
@needs_chromium
def test_report_of_the_real_grid_renders_in_chromium(multirun, report, tmp_path):
    out, _ = report
    check_renders(out / "pareto.html", list(GRID), tmp_path)


@pytest.mark.slow
def test_compare_reports_deltas_and_ratios(multirun, tmp_path):
    folder, results = multirun
    _cli(
        "compare",
        "--baseline",
        "dq",
        "--candidate",
        "dpq",
        str(folder),
        "-o",
        str(tmp_path),
        "--no-progress",
        cwd=tmp_path,
    )
    payload = json.loads((tmp_path / "compare.json").read_text())
    comps = {c["candidate"]["final_sparsity"]: c for c in payload["comparisons"]}
    assert sorted(comps) == [0.2, 0.5, 0.8]
    base = results["0_pipeline=dq,seed=1"]["final"]  # dpq ran with seed 1 only: paired on it
    for s, c in comps.items():
        cand = results[f"{2 + [0.2, 0.5, 0.8].index(s)}_pipeline=dpq,sparsity={s}"]["final"]
        assert c["pairing"] == "paired by seed" and c["seeds"] == [1]
        assert c["deltas"]["accuracy"]["mean"] == pytest.approx(cand["accuracy"] - base["accuracy"])
        for m in ("effective_gflops", "bops", "size_bytes", "latency_ms_median"):
            assert c["ratios"][m]["mean"] == pytest.approx(cand[m] / base[m]), m
        assert c["baseline"]["seeds"] == [1, 2]
    assert (
        comps[0.8]["ratios"]["effective_gflops"]["mean"]
        < comps[0.2]["ratios"]["effective_gflops"]["mean"]
        < 1
    )


@pytest.mark.slow
def test_wandb_run_gets_table_plot_and_results(multirun):
    folder, results = multirun
    run_dir = folder / "1_pipeline=dq,seed=2"
    [offline] = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    files = Path(offline) / "files"
    [table] = glob.glob(str(files / "media" / "table" / "pareto" / "stages_*.table.json"))
    data = json.loads(Path(table).read_text())
    assert len(data["data"]) == len(results["1_pipeline=dq,seed=2"]["stages"])  # one row per stage
    assert "pareto" in data["columns"] and "accuracy" in data["columns"]
    assert glob.glob(str(files / "media" / "images" / "pareto" / "plot_*.png"))
    assert (
        json.loads((files / "results.json").read_text())["final"] == results["1_pipeline=dq,seed=2"]["final"]
    )


@pytest.mark.slow
def test_cli_wandb_flag_logs_report_offline(multirun, tmp_path):
    folder, _ = multirun
    _cli(
        str(folder),
        "--wandb",
        "-o",
        str(tmp_path / "rep"),
        "--no-progress",
        "-O",
        "accuracy,size_mb,latency_ms",
        cwd=tmp_path,
    )
    [offline] = glob.glob(str(tmp_path / "rep" / "wandb" / "offline-run-*"))
    media = Path(offline) / "files" / "media"
    assert glob.glob(str(media / "table" / "pareto" / "points_*.table.json"))
    assert glob.glob(str(media / "images" / "pareto" / "plot_*.png"))
    assert glob.glob(str(media / "html" / "pareto" / "report_*.html"))
    points = pd.read_csv(tmp_path / "rep" / "pareto.csv")  # three objectives: the front is 3-d
    mask = pareto_mask(points[["accuracy", "size_mb", "latency_ms"]], ["max", "min", "min"])
    assert points["pareto"].tolist() == mask.tolist()


STUDY = Path(__file__).resolve().parents[1] / "bench" / "results" / "study"
GRID_ON_DEFAULT_TASK = {"dq-s42", "dpq_u20-s42", "dpq_u50-s42", "dpq_u80-s42"}


@needs_chromium
def test_report_of_the_real_default_task_study_renders_in_chromium(tmp_path):
    """The real grid on the embedded default task (MiniLM-L3 student on Rotten Tomatoes): the
    results.json files that ``python bench/study.py`` wrote and BENCHMARKS.md reports (committed
    under bench/results/study/) -> python -m dpq.pareto -> PNG + HTML -> headless Chromium."""
    import shutil

    found = sorted(STUDY.glob("*/results.json"))
    runs = [p.parent.name for p in found]
    assert GRID_ON_DEFAULT_TASK <= set(runs), runs
    folder = tmp_path / "study"
    for p in found:
        r = json.loads(p.read_text())
        assert r["status"] == "completed" and r["task"]["name"] == "rotten_tomatoes"
        assert r["task"]["sizes"]["test"] == 1057  # the whole test split, not a subsample
        assert r["config"]["model"]["name"] == "minilm_l3"
        (folder / p.parent.name).mkdir(parents=True)
        shutil.copy(p, folder / p.parent.name / "results.json")
    _cli(str(folder), "--no-progress", cwd=tmp_path)
    out = folder / "pareto"
    points = pd.read_csv(out / "pareto.csv")
    by_config: dict[str, dict[str, float]] = {}  # config -> run -> its measured final accuracy
    for p in found:
        by_config.setdefault(p.parent.name.rsplit("-s", 1)[0], {})[p.parent.name] = json.loads(p.read_text())[
            "final"
        ]["accuracy"]
    finals = points[points["kind"] == "final"]
    for config, accs in by_config.items():  # one row per config: the mean over its seeds' measured accuracies
        row = finals[finals["runs"].map(lambda r: set(r.split("; "))) == set(accs)]
        assert len(row) == 1, config
        assert row["n_seeds"].item() == len(accs)
        assert row["accuracy"].item() == pytest.approx(sum(accs.values()) / len(accs))
    assert points["pareto"].any() and not points["pareto"].all()
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "pareto.png")
    assert img[..., :3].std() > 0.05
    several_seeds = any(len(a) > 1 for a in by_config.values())
    check_renders(out / "pareto.html", runs, tmp_path, error_bars=several_seeds)
