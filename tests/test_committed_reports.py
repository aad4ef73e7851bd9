"""The committed Pareto and compare reports under ``bench/results/`` are what today's code makes of the
committed runs: each records the command that built it (``built_by``), and rerunning that command gives
the same fronts, tables and intervals. A change to ``dpq.pareto`` that alters a committed report fails
here until the report is rebuilt with its command and the sections quoting it are checked."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import pytest

from dpq.pareto.cli import main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BUILT_HEADING = "\n## How this report was built"
# Reports whose runs are not committed, so they cannot be rebuilt from the repository.
EXEMPT = {
    "qat_digits/ownership.json": "its runs (hydra.sweep.dir=/work/runs/qat_digits2) were not committed",
}


def reports() -> list[Path]:
    return sorted([*RESULTS.rglob("ownership.json"), *RESULTS.rglob("compare.json")])


def rel(p: Path) -> str:
    return p.relative_to(RESULTS).as_posix()


def rebuildable() -> list[Path]:
    return [p for p in reports() if rel(p) not in EXEMPT]


def test_every_committed_report_records_its_command():
    assert reports(), "no committed reports found under bench/results"
    missing = [rel(p) for p in rebuildable() if "built_by" not in json.loads(p.read_text())]
    assert not missing, (
        f"reports without the command that built them (rebuild each with its documented command): {missing}"
    )
    stale = [k for k in EXEMPT if not (RESULTS / k).exists()]
    assert not stale, f"EXEMPT names reports that no longer exist: {stale}"


def same(a, b, where: str = "") -> list[str]:
    """Differences between two JSON-like values; floats equal to 1e-9 relative (summation order may
    differ between CPUs), everything else exactly."""
    if isinstance(a, float) or isinstance(b, float):
        ok = (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and (math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)))
        )
        return [] if ok else [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))} in only one"]
        return [d for k in a for d in same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def cell(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def read_csv(p: Path) -> list[dict]:
    with p.open(newline="") as f:
        return [{k: cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_same():
    assert not same({"a": [1.0, "x"]}, {"a": [1.0 + 1e-12, "x"]})
    assert same({"a": [1.0, "x"]}, {"a": [1.001, "x"]})
    assert same({"a": 1}, {"b": 1})
    assert same([1.0], [1.0, 2.0])
    assert not same(float("nan"), float("nan"))


def rerun_args(report: Path, out: Path) -> tuple[Path, list[str]]:
    """The folder to run in and the recorded command's arguments, writing into ``out``."""
    built = json.loads(report.read_text())["built_by"]
    argv = shlex.split(built["command"])
    assert argv[:3] == ["python", "-m", "dpq.pareto"], built["command"]
    argv = argv[3:]
    for flag in ("-o", "--out"):
        if flag in argv:
            argv[argv.index(flag) + 1] = str(out)
            break
    else:
        argv += ["-o", str(out)]
    if "--no-progress" not in argv:
        argv.append("--no-progress")
    return (report.parent / built["cwd"]).resolve(), argv


@pytest.mark.slow
@pytest.mark.parametrize("report", rebuildable(), ids=rel)
def test_committed_report_is_what_its_command_gives(report, tmp_path, monkeypatch, capsys):
    cwd, argv = rerun_args(report, tmp_path / "out")
    monkeypatch.chdir(cwd)
    assert main(argv) == 0, f"{shlex.join(argv)} failed in {cwd}"
    capsys.readouterr()
    new_dir = tmp_path / "out"
    old, new = json.loads(report.read_text()), json.loads((new_dir / report.name).read_text())
    old.pop("built_by")
    new.pop("built_by", None)
    diffs = same(old, new, report.name)
    if report.name == "ownership.json":
        md_old = (report.parent / "ownership.md").read_text().split(BUILT_HEADING)[0]
        md_new = (new_dir / "ownership.md").read_text().split(BUILT_HEADING)[0]
        if md_old != md_new:
            diffs.append("ownership.md differs")
        for name in ("pareto.csv", "runs.csv"):
            if (report.parent / name).exists():
                diffs += same(read_csv(report.parent / name), read_csv(new_dir / name), name)
    assert not diffs, (
        f"{rel(report)} is not what its command gives today ({len(diffs)} differences, first: {diffs[:5]}); "
        f"rebuild it with its command (in {cwd.relative_to(ROOT) if cwd.is_relative_to(ROOT) else cwd}) "
        "and check the sections that quote it"
    )
