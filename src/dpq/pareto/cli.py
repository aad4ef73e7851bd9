"""``python -m dpq.pareto``: Pareto front, plot, tables and HTML report over finished runs;
``python -m dpq.pareto compare``: a named baseline against a candidate across seeds."""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shlex
import sys
from pathlib import Path

import pandas as pd

from dpq.core.errors import ConfigError

from .aggregate import (
    add_objectives,
    check_objective_seeds,
    drop_few_seeds,
    keep_seeds,
    merge_seeds,
    parse_seeds,
    relabel,
    warn_diverging_references,
    warn_mixed_code,
    warn_mixed_data,
    warn_mixed_hardware,
    warn_mixed_hub_models,
    warn_mixed_objective,
)
from .front import CONTEXT, pareto_mask
from .gather import INPUTS_HELP, SWEEP_ID, gather, is_sweep_id, prefix_orderings
from .objectives import ALIASES, OBJECTIVES, Objective, parse_objectives
from .selection import parse_keys, validation_objective

log = logging.getLogger("dpq.pareto")
SEEDS_HELP = (
    "only the runs of these seeds, e.g. 42,43,44 or 42-44 (default: every seed found), so the "
    "command of a committed report still gives that report after more seeds land beside it"
)
DEFAULT_OBJECTIVES = (
    "primary,effective_gflops"  # primary: the runs' task.primary_metric (accuracy by default)
)


def default_out(first: str) -> Path:
    """``<first input>/pareto`` for a folder, next to a file, below a glob's fixed part; sweeps under outputs/."""
    if is_sweep_id(first):
        m = SWEEP_ID.match(first.removeprefix("wandb:"))
        return Path("outputs") / "pareto" / (m.group(3) if m else "sweep")
    if glob.has_magic(first):
        fixed = []
        for part in Path(first).parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        base = Path(*fixed) if fixed else Path(".")
    else:
        base = Path(first)
    return (base if base.is_dir() else base.parent) / "pareto"


def built_by(argv: list[str], out: Path) -> dict:
    """How a report was made, so it can be made again: the command as given and the folder it ran in,
    relative to the report's own folder (paths in the command are relative to that folder; a glob is
    recorded as the shell expanded it). ``tests/test_committed_reports.py`` reruns it."""
    return {
        "command": shlex.join(["python", "-m", "dpq.pareto", *argv]),
        "cwd": Path(os.path.relpath(Path.cwd().resolve(), Path(out).resolve())).as_posix(),
    }


def built_by_markdown(b: dict | None) -> str:
    if not b:
        return ""
    return (
        "\n## How this report was built\n\n"
        f"In `{b['cwd']}` (relative to this folder), with the runs it names there:\n\n"
        f"```bash\n{b['command']}\n```\n"
    )


def front_table(points: pd.DataFrame, objectives: list[Objective]) -> pd.DataFrame:
    """Objective columns plus ``pareto``: non-dominated among the points of the same task/model/teacher
    (references included). One front over every point would let an easy task's accuracies knock a hard
    task's points off it; the ownership (:mod:`dpq.pareto.ownership`) groups the same way."""
    points = add_objectives(points, objectives)
    cols = [o.name for o in objectives]
    senses = [o.sense for o in objectives]
    points["pareto"] = False
    ctx = [c for c in CONTEXT if c in points]
    groups = points.groupby(ctx, sort=False, dropna=False).indices.values() if ctx else [range(len(points))]
    for rows in groups:
        idx = points.index[list(rows)]
        points.loc[idx, "pareto"] = pareto_mask(points.loc[idx, cols].to_numpy(dtype=float), senses)
    points["pareto"] = points["pareto"].astype(bool)
    return points


def choose_variants(
    runs: pd.DataFrame, choose: list[str] | None, choose_on: str | None
) -> tuple[pd.DataFrame, list[dict]]:
    """``--choose``/``--choose-on``: the runs left once each recipe's variants are reduced to the
    one chosen on validation, and the record of each choice (see :mod:`dpq.pareto.selection`)."""
    from .selection import choose as choose_

    check_choose(choose, choose_on)
    if not choose:
        return runs, []
    objective = validation_objective(choose_on or f"val_{primary_objective(runs)}")
    return choose_(runs, choose, objective)


def check_choose(choose: list[str] | None, choose_on: str | None) -> None:
    """A bad ``--choose-on`` fails before any run is read."""
    if choose_on is not None:
        validation_objective(choose_on)
        if not choose:
            raise ConfigError(
                "--choose-on", choose_on, "needs --choose, the settings whose variants it decides"
            )


def primary_objective(runs: pd.DataFrame) -> str:
    """The runs' ``task.primary_metric`` (what ``primary`` in ``--objectives`` stands for)."""
    found = sorted(dict.fromkeys(runs["primary_metric"].dropna())) if "primary_metric" in runs else []
    if len(found) > 1:
        raise ConfigError(
            "--objectives",
            "primary",
            f"the runs have different primary metrics ({', '.join(found)}); name the objective, e.g. -O "
            f"{found[0]},effective_gflops",
        )
    return found[0] if found else "accuracy"


def make_out(out: Path) -> Path:
    """The output folder, created; one that cannot be (a file in the way, no permission) is the user's to fix."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("--out", str(out), f"cannot be created as a folder ({e.strerror})") from None
    return out


def build_report(
    inputs: list[str],
    objectives: list[Objective] | list[str],
    out: Path | None = None,
    baseline: str | None = "dq",
    references: bool = True,
    log_x: str = "auto",
    title: str | None = None,
    progress: bool = True,
    wandb_project: str | None = None,
    wandb_entity: str | None = None,
    min_seeds: int = 1,
    seeds: list[int] | None = None,
    choose: list[str] | None = None,
    choose_on: str | None = None,
    prefix_points: list[str] | None = None,
    argv: list[str] | None = None,
    baseline_named: bool = False,
) -> dict:
    """Gather, merge seeds, mark the front, write CSV/Parquet/PNG/HTML into ``out``; return the paths and counts.

    ``min_seeds``: configurations with fewer distinct seeds, or with an objective measured on fewer, are
    left out of everything (see :func:`dpq.pareto.aggregate.drop_few_seeds` and
    :func:`~dpq.pareto.aggregate.check_objective_seeds`); ``seeds``: only the runs of these seeds (applied
    first; see :func:`dpq.pareto.aggregate.keep_seeds`); ``choose``: settings whose variants are
    reduced to the one with the best mean ``choose_on`` (a validation objective; default
    ``val_<primary metric>``), see :mod:`dpq.pareto.selection`; ``prefix_points``: pipeline presets whose
    points are also read off the runs whose stages begin with theirs (``dp`` from ``dpq`` runs), see
    :mod:`dpq.pareto.gather`; ``argv``: the command line that asked for the report, recorded in
    ``ownership.json``/``.md`` (see :func:`built_by`)."""
    from .ownership import COSTS, front_ownership, html_section, markdown
    from .plots import write_png
    from .report import write_html
    from .selection import markdown as chosen_markdown

    prefixes = prefix_orderings(prefix_points) if prefix_points else None
    runs = gather(inputs, references=references, progress=progress, prefix_points=prefixes)
    runs = drop_few_seeds(keep_seeds(runs, seeds), min_seeds)
    warn_mixed_hardware(runs)
    warn_mixed_data(runs)
    warn_mixed_hub_models(runs)
    warn_mixed_code(runs)
    warn_mixed_objective(runs)
    diverging = warn_diverging_references(runs)
    runs, picked = choose_variants(runs, choose, choose_on)
    if any(isinstance(o, str) for o in objectives):  # names, "primary" among them: resolved on the runs
        primary = primary_objective(runs)
        objectives = parse_objectives(
            [primary + o[len("primary") :] if o.split(":")[0] == "primary" else o for o in objectives]
        )
    # --min-seeds again on the seeds each objective was measured on (a metric a seed lacks is averaged without it)
    runs = check_objective_seeds(add_objectives(runs, objectives), objectives, min_seeds)
    final = runs["kind"] == "final"
    for o in objectives:
        missing = runs[o.name].isna()
        if not missing.any():
            continue
        # counted apart: a teacher or dense-student reference lacks what only a final model gets (the ONNX export)
        said = []
        if n := int((missing & final).sum()):
            said.append(f"{n} of {int(final.sum())} final points (runs made before it was measured?)")
        if n := int((missing & ~final).sum()):
            said.append(
                f"{n} of {int((~final).sum())} reference and stage points"
                + (
                    " (only a run's final model is exported to ONNX Runtime)"
                    if o.metric.startswith("onnx_")
                    else ""
                )
            )
        log.warning(
            "no %s (metric %r) for %s: they cannot be on the front", o.name, o.metric, "; ".join(said)
        )
    points = front_table(merge_seeds(runs), objectives)
    keys = points.set_index(["kind", "config_key"])["pareto"]
    runs["pareto"] = [bool(keys.get((k, c), False)) for k, c in zip(runs["kind"], runs["config_key"])]
    if baseline and baseline not in set(runs["pipeline"]):
        if baseline_named:  # --baseline given: a typo would leave the report without its intervals
            raise ConfigError(
                "--baseline",
                baseline,
                f"no run has this pipeline; the runs' pipelines: {', '.join(sorted(set(runs['pipeline'])))}",
            )
        log.info("baseline pipeline %r not among the runs; nothing marked as baseline", baseline)
    out = make_out(Path(out) if out else default_out(str(inputs[0])))
    title = title or f"dpq Pareto front: {objectives[0].name} vs {', '.join(o.name for o in objectives[1:])}"
    paths = {
        "csv": out / "pareto.csv",
        "parquet": out / "pareto.parquet",
        "runs_csv": out / "runs.csv",
        "png": out / "pareto.png",
        "html": out / "pareto.html",
        "ownership_json": out / "ownership.json",
        "ownership_md": out / "ownership.md",
    }
    # Who owns the front along each cost (the chosen ones first), with paired intervals against the baseline,
    # by the first quality objective (-O effective_gflops,accuracy asks the same question as
    # -O accuracy,effective_gflops; sparsity is not one), else by the runs' primary metric.
    quality = next((o for o in objectives if o.is_quality), None)
    if quality is None:
        quality = OBJECTIVES.get(primary_objective(runs), OBJECTIVES["accuracy"])
    chosen = [o for o in objectives if o.is_cost]
    costs = chosen + [OBJECTIVES[c] for c in COSTS if c not in {o.name for o in chosen}]
    own = front_ownership(runs, quality, costs, baseline=baseline)
    if picked:
        own["chosen"] = picked
    if argv is not None:
        own["built_by"] = built_by(argv, out)
    runs = runs.drop(columns=["run_path"], errors="ignore")  # a local path: not in the reports
    # the dpq commit and library versions of each run serve the integrity warnings (warn_mixed_code); the
    # tables keep their columns (results.json has both, in full)
    provenance = ["code", "versions"]
    runs = runs.drop(columns=provenance, errors="ignore")
    points = points.drop(columns=provenance, errors="ignore")
    paths["ownership_json"].write_text(json.dumps(own, indent=2, default=str))
    paths["ownership_md"].write_text(
        chosen_markdown(picked) + markdown(own) + built_by_markdown(own.get("built_by"))
    )
    points.to_csv(paths["csv"], index=False)
    points.to_parquet(paths["parquet"], index=False)
    runs.to_csv(paths["runs_csv"], index=False)
    write_png(points, objectives, paths["png"], baseline=baseline, title=title, log_x=log_x)
    write_html(
        points,
        runs,
        objectives,
        paths["html"],
        baseline=baseline,
        title=title,
        log_x=log_x,
        sections=html_section(own),
    )
    summary = {
        "out": str(out),
        **{k: str(v) for k, v in paths.items()},
        "runs": int((runs["kind"] == "final").sum()),
        "points": len(points),
        "front": int(points["pareto"].sum()),
        "diverging_references": diverging,
        "chosen": picked,
    }
    if wandb_project:
        from .wandb_log import log_report

        try:
            summary["wandb"] = log_report(
                points,
                runs,
                paths["png"],
                paths["html"],
                wandb_project,
                wandb_entity,
                name=f"pareto-{out.name if out.name != 'pareto' else out.parent.name}",
                config={
                    "inputs": list(map(str, inputs)),
                    "objectives": [f"{o.name}:{o.sense}" for o in objectives],
                    "only_seeds": seeds,
                },
                out_dir=out,
            )
        except Exception as e:  # the files are written; W&B is a copy
            log.warning("W&B logging failed (%s); the report files are in %s", e, out)
            summary["wandb"] = f"failed: {e}"
    return {**summary, "points_df": points, "runs_df": runs, "objectives": objectives, "ownership": own}


def print_front(points: pd.DataFrame, objectives: list[Objective], summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .ownership import absent_note, checked
    from .report import _objective

    table = Table(
        title=f"Pareto front ({summary['front']} of {summary['points']} points, {summary['runs']} "
        f"run{'' if summary['runs'] == 1 else 's'})"
    )
    for h in ("point", "ordering", "seeds", *(f"{o.name} [{o.unit}]" for o in objectives)):
        table.add_column(h, justify="left" if h in ("point", "ordering", "seeds") else "right")
    for _, r in points[points["pareto"]].sort_values(objectives[1].name).iterrows():
        table.add_row(
            str(r["label"]),
            str(r["order"]),
            f"{r['seeds']} (n={r['n_seeds']})",
            *(_objective(r, o) for o in objectives),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    for ctx in summary.get("ownership", {}).get("contexts", []):
        for f in ctx["fronts"]:
            owners = "; ".join(
                f"{s['ordering']} {s['from']:.4g}-{s['to']:.4g}"
                if s["from"] != s["to"]
                else f"{s['ordering']} {s['from']:.4g}"
                for s in f["segments"]
            )
            console.print(f"front along {f['cost']} [{f['unit']}]: {owners}", highlight=False, markup=False)
        dom = ctx.get("domination")
        if dom and dom["checks"]:
            missed = [c for c in dom["checks"] if c["dominated_by"] is None]
            console.print(
                f"every {checked(dom)} point dominated on every seed ({', '.join(dom['objectives'])}): "
                + ("yes" if not missed else f"no, {len(missed)} of {len(dom['checks'])} not"),
                highlight=False,
                markup=False,
            )
            if note := absent_note(dom):
                console.print(note, highlight=False, markup=False)
    for k in ("csv", "parquet", "runs_csv", "png", "html", "ownership_md"):
        console.print(f"{k:>8}: {summary[k]}", highlight=False)
    if "wandb" in summary:
        console.print(f"   wandb: {summary['wandb']}", highlight=False)


def _objective_list() -> str:
    also = {n: a for a, n in ALIASES.items()}
    return "\n".join(
        f"  {o.name:<17} {o.sense}  {o.unit:<10} {o.label}"
        + (f" (also: {also[o.name]})" if o.name in also else "")
        for o in OBJECTIVES.values()
    )


def add_choose_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--choose",
        metavar="KEYS",
        help="comma-separated settings (dotted config keys or their last parts, e.g. quantize.observer): "
        "among final configurations equal but in these, keep only the variant with the best mean "
        "--choose-on over the seeds they share (ties: the one listed first in the inputs), so what "
        "is reported on test was picked without it",
    )
    p.add_argument(
        "--choose-on",
        metavar="OBJECTIVE",
        help="the validation objective --choose decides on (default val_<the runs' primary metric>)",
    )


def names_of(spec: str | None) -> list[str]:
    """``dp,dense`` -> ["dp", "dense"] (none for ``None``)."""
    return [n.strip() for n in (spec or "").split(",") if n.strip()]


def add_prefix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prefix-points",
        metavar="PIPELINES",
        help="comma-separated pipeline presets (e.g. dp): also count, as that preset's point, the record a "
        "run made at the end of the preset's whole stage order when its own stages begin with it (a dpq "
        "run's recovery is its dp point); prefixes trained for a later quantizer (qat) are not",
    )


def front_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpq.pareto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pareto front over finished dpq runs: writes pareto.csv/.parquet (merged points with a "
        "'pareto' flag), runs.csv (every run), pareto.png and a self-contained pareto.html.\n"
        "Seeds of one configuration are merged into mean ± std. Teacher and dense-student points "
        "come from the same results.json files and take part in the front (--no-references drops them).\n\n"
        "Also: python -m dpq.pareto compare --baseline dq --candidate dpq INPUT...  (see compare --help)",
        epilog="objectives (name, better, unit, meaning):\n" + _objective_list(),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUTS_HELP)
    p.add_argument(
        "-O",
        "--objectives",
        default=DEFAULT_OBJECTIVES,
        help="2 or 3 comma-separated objective names, the first on the y axis; NAME:max / NAME:min "
        "overrides the direction; primary = the runs' task.primary_metric "
        f"(default {DEFAULT_OBJECTIVES})",
    )
    p.add_argument("-o", "--out", type=Path, help="output folder (default: <first input>/pareto)")
    p.add_argument(
        "--baseline", default=None, help="pipeline whose points are outlined as the baseline (default dq)"
    )
    p.add_argument(
        "--no-references", action="store_true", help="leave out the teacher and dense-student points"
    )
    p.add_argument(
        "--log-x",
        choices=("auto", "on", "off"),
        default="auto",
        help="log-scale cost axes (auto: when values span > 10x)",
    )
    p.add_argument("--title", help="plot and report title")
    p.add_argument(
        "--min-seeds",
        type=int,
        default=1,
        metavar="N",
        help="leave out configurations measured on fewer than N distinct seeds, counted for each objective "
        "(a seed that lacks the metric does not count; default 1: keep all), so one-seed variants do not "
        "sit on the front beside means over every seed",
    )
    p.add_argument("--seeds", metavar="S", help=SEEDS_HELP)
    add_choose_args(p)
    add_prefix_args(p)
    p.add_argument(
        "--wandb",
        action="store_true",
        help="also log the tables, plot and report to a W&B run "
        "(online with credentials, else offline into the output folder)",
    )
    p.add_argument("--wandb-project", default=None, help="W&B project (with --wandb; default dpq)")
    p.add_argument("--wandb-entity", default=None, help="W&B entity (with --wandb)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpq.pareto compare",
        description="A baseline configuration against candidate configurations of the same task/model/teacher: "
        "accuracy difference and cost ratios (candidate / baseline), mean ± std across seeds with a 95% "
        "interval, paired by seed when both share seeds. Prints a table and writes compare.json.",
        epilog="selectors: a pipeline name, optionally with filters on columns or config keys, e.g. "
        "--candidate 'dpq,final_sparsity=0.2' --baseline 'dq,bits=4'",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUTS_HELP)
    p.add_argument("--baseline", required=True, help="e.g. dq")
    p.add_argument("--candidate", required=True, help="e.g. dpq or 'dpq,final_sparsity=0.2'")
    p.add_argument(
        "-o", "--out", type=Path, help="output folder for compare.json (default: <first input>/pareto)"
    )
    p.add_argument("--seeds", metavar="S", help=SEEDS_HELP)
    add_choose_args(p)
    add_prefix_args(p)
    p.add_argument("--no-progress", action="store_true")
    return p


def run_compare(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    from .compare import compare, print_comparison

    seeds = parse_seeds(args.seeds)
    prefixes = prefix_orderings(names_of(args.prefix_points)) or None
    runs = keep_seeds(
        gather(args.inputs, references=True, progress=not args.no_progress, prefix_points=prefixes), seeds
    )
    machines = warn_mixed_hardware(runs)
    splits = warn_mixed_data(runs)
    hub_models = warn_mixed_hub_models(runs)
    mixed_code = warn_mixed_code(runs)
    warn_mixed_objective(runs)
    diverging = warn_diverging_references(runs)  # the references are read for this check only
    runs, chosen = choose_variants(runs, parse_keys(args.choose), args.choose_on)
    runs = relabel(runs[runs["kind"] == "final"].reset_index(drop=True))
    results = compare(runs, args.baseline, args.candidate)
    print_comparison(results)
    out = make_out(Path(args.out) if args.out else default_out(str(args.inputs[0])))
    payload = {
        "baseline": args.baseline,
        "candidate": args.candidate,
        "only_seeds": seeds,
        **({"hardware": machines} if machines else {}),
        **({"data": splits} if splits else {}),
        **({"hub_commits": hub_models} if hub_models else {}),
        **({"mixed_code": mixed_code} if mixed_code else {}),
        **({"diverging_references": diverging} if diverging else {}),
        **({"chosen": chosen} if chosen else {}),
        "comparisons": results,
        **({"built_by": built_by(argv, out)} if argv is not None else {}),
        "method": "deltas: candidate - baseline; ratios: candidate / baseline; mean ± std across seeds "
        "with the 95% interval of the mean (ci_low, ci_high): per-seed pairs and Student's t when seeds "
        "are shared, else propagated from each side's std (Welch's interval for deltas, none for ratios); "
        "examples (runs with predictions.npz): the seed-averaged per-example difference, its normal 95% "
        "interval over the samples of its metric's split (test for accuracy, validation for val_accuracy) with the "
        "trained models fixed (dpq.pareto.paired.seed_averaged)",
    }
    (out / "compare.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"compare.json: {out / 'compare.json'}")
    return payload


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    is_compare = bool(argv) and argv[0] == "compare"
    parser = compare_parser() if is_compare else front_parser()
    args = parser.parse_args(argv[1:] if is_compare else argv)
    if not is_compare and not args.wandb and (args.wandb_project or args.wandb_entity):
        parser.error("--wandb-project and --wandb-entity need --wandb (nothing would be logged)")
    try:
        check_choose(args.choose, args.choose_on)
        if is_compare:
            run_compare(args, argv)
        else:
            names = [s.strip() for s in args.objectives.split(",") if s.strip()]
            if all(n.split(":")[0] != "primary" for n in names):
                parse_objectives(names)  # a typo fails before any run is read
            summary = build_report(
                args.inputs,
                names,
                args.out,
                baseline=args.baseline or "dq",
                baseline_named=args.baseline is not None,
                references=not args.no_references,
                log_x=args.log_x,
                title=args.title,
                progress=not args.no_progress,
                wandb_project=(args.wandb_project or "dpq") if args.wandb else None,
                wandb_entity=args.wandb_entity,
                min_seeds=args.min_seeds,
                seeds=parse_seeds(args.seeds),
                choose=parse_keys(args.choose),
                choose_on=args.choose_on,
                prefix_points=names_of(args.prefix_points),
                argv=argv,
            )
            print_front(summary["points_df"], summary["objectives"], summary)
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
