"""Collect points from results.json files (run folders, multirun folders, globs) or a W&B sweep.

Every run gives its *final* point plus two reference points that the same results.json
already measured: the *teacher* and the *dense* distilled student (the record of the
first distill stage). With ``prefix_points`` (e.g. ``{"dp": [...]}``, from :func:`prefix_orderings`), a
run whose stages begin with a preset's whole stage order also gives that preset's final point: the
record at the end of that prefix is what a run of the preset measures (the stage cache restores exactly
that prefix for it), so a ``dpq`` run carries its ``dp`` point. Each point carries a ``config_key``: a
hash of the configuration
that determined it, without the seed and the bookkeeping that changes no number (run name, paths,
logger, checkpoints, integrity checks, stage-cache folder, the sweep's objective; see
:data:`IGNORED_KEYS`), so that seeds of one configuration can be merged (:mod:`dpq.pareto.aggregate`),
also when agents ran them with other cache folders or objective weights, and the shared teacher of a
whole grid counts once.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from dpq.core.config import BOOKKEEPING_KEYS, BOOKKEEPING_STAGE_KEYS, list_options, load_option
from dpq.core.errors import ConfigError

log = logging.getLogger(__name__)

RESULTS = "results.json"
STARTED = Path("checkpoints") / "run.json"  # written as a run starts (dpq.run.resume.RUN_FILE in CHECKPOINTS)
# Not part of what a configuration *is*: the seed, and the bookkeeping that never changes a number
# (where a run wrote, its checkpoints, integrity checks, stage-cache folder, the sweep's objective).
# Seeds of one recipe run by agents with other cache folders or objective weights are one configuration.
IGNORED_KEYS = BOOKKEEPING_KEYS | {"seed"}
# Config keys added after runs had been recorded without them, each with the value under which such a run
# behaved as it did (task.overlap: every example kept; export.compact: the export did not remove dead units;
# teacher.revision and model.revision: the hub branch main, whose commit results.json records as hub_commits;
# only hub-loaded models carry model.revision).
# A run recorded before the key existed and a run recording that value are one configuration; without this a
# study's earlier seeds and the seeds added after an upgrade split into two points. A key added to the config
# with a default goes here (tests/test_pareto.py compares today's config with a committed run's).
ADDED_LATER = {
    "task.overlap": "warn",
    "task.integer_labels": "ids",
    "export.compact": False,
    "teacher.revision": None,
    "model.revision": None,
}
# Conditions of the measurement, kept as columns but never averaged.
CONDITION_KEYS = ("device", "threads", "warmup", "repeats", "batch_size", "seq_len", "peak_memory_device")
CONVENTION_KEYS = ("flops_convention", "bops_convention", "peak_memory_method")
SWEEP_ID = re.compile(r"^(?:wandb:)?([\w.-]+)/([\w.-]+)/(?:sweeps/)?([A-Za-z0-9]+)$")
INPUTS_HELP = (
    "run folders, multirun folders, globs, results.json files, or a W&B sweep id entity/project/sweep_id"
)


# --------------------------------------------------------------------------- inputs


def is_sweep_id(spec: str) -> bool:
    """``entity/project/sweep_id`` (or ``wandb:...``) that is not also an existing path."""
    if spec.startswith("wandb:"):
        return True
    return bool(SWEEP_ID.match(spec)) and not os.path.exists(spec) and not glob.has_magic(spec)


def _results_under(folder: Path) -> list[Path]:
    # A W&B run folder may hold an uploaded copy of results.json: skip everything under wandb/.
    return sorted(p for p in folder.rglob(RESULTS) if "wandb" not in p.relative_to(folder).parts[:-1])


def unfinished_under(folder: Path) -> list[Path]:
    """Run folders under ``folder`` (itself included) that started but wrote no results.json: a run writes
    ``checkpoints/run.json`` as it starts (:func:`dpq.run.resume.claim_output_dir`) and results.json as it
    ends, also when it diverges. Crashed, killed or still running; a dry run or a config error writes neither."""
    return sorted(
        run
        for p in folder.rglob(STARTED.name)
        if p.parent.name == STARTED.parent.name
        and "wandb" not in p.relative_to(folder).parts[:-1]
        and not ((run := p.parent.parent) / RESULTS).exists()
    )


def warn_unfinished(folders: list[Path]) -> None:
    """A study whose jobs crashed must not read as the whole study: the report is on the runs that finished."""
    if not folders:
        return
    shown = ", ".join(map(str, folders[:5])) + (f" and {len(folders) - 5} more" if len(folders) > 5 else "")
    log.warning(
        "%d run(s) started but wrote no %s (crashed, killed or still running) and are not in this report: %s; "
        "`python -m dpq.train resume=<folder>` continues one from its last checkpoint",
        len(folders),
        RESULTS,
        shown,
    )


def find_results(inputs: Iterable[str]) -> list[Path]:
    """results.json files named by ``inputs`` (folders are searched recursively), each once, in order."""
    found: list[Path] = []
    unfinished: list[Path] = []
    for spec in inputs:
        spec = str(spec)
        matches = (
            [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
            if glob.has_magic(spec)
            else [Path(spec)]
        )
        hits: list[Path] = []
        started: list[Path] = []
        for m in matches:
            if m.is_dir():
                hits += _results_under(m)
                started += unfinished_under(m)
            elif m.is_file():
                hits.append(m)
        if not hits:
            what = (
                "no such file or folder"
                if not matches or not any(m.exists() for m in matches)
                else f"no {RESULTS} in it"
            )
            if started:
                what += (
                    f": {len(started)} run(s) started there but never finished ({', '.join(map(str, started[:3]))}"
                    f"{', ...' if len(started) > 3 else ''}); `python -m dpq.train resume=<folder>` continues one"
                )
            raise ConfigError("inputs", spec, f"{what}; pass {INPUTS_HELP}")
        found += hits
        unfinished += started
    seen: set[Path] = set()
    unique = []
    for p in found:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(p)
    warn_unfinished(list(dict.fromkeys(unfinished)))
    return unique


def load_results(paths: list[Path], progress: bool = True) -> list[tuple[dict, str]]:
    """(results dict, run folder) per file; unreadable or unfinished runs are skipped with a warning."""
    from rich.progress import track

    out = []
    for p in track(
        paths, description="reading results.json", disable=not progress or len(paths) < 10, transient=True
    ):
        try:
            res = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping %s: %s", p, e)
            continue
        if not isinstance(res, dict):  # a folder searched recursively may hold another tool's results.json
            log.warning(
                "skipping %s: not a dpq results.json (a JSON %s, not an object)", p, type(res).__name__
            )
            continue
        if res.get("status", "completed") != "completed" or "final" not in res:
            log.warning("skipping %s: run status %r (no final model)%s", p, res.get("status"), resume_hint(p))
            continue
        out.append((res, str(Path(p).parent)))
    return out


def resume_hint(results: Path) -> str:
    """How to continue the run of a results.json that has no final model: a diverged or failed run kept
    its stage snapshots, and ``resume=`` continues from the newest one (the last good state) with the
    config the run started with; a run started without checkpoints has nothing to continue from."""
    folder = Path(results).parent
    if (folder / STARTED).exists():
        return f"; `python -m dpq.train resume={folder}` continues it from its newest snapshot"
    return f"; it kept no checkpoints ({STARTED} is missing), so it can only be started again"


# --------------------------------------------------------------------------- W&B


def wandb_online() -> bool:
    from dpq.loggers import wandb_credentials

    return (
        os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun")
        and wandb_credentials()
    )


def load_sweep(spec: str, progress: bool = True) -> list[tuple[dict, str]]:
    """Finished runs of a W&B sweep as results dicts (their uploaded results.json, else config + summary)."""
    m = SWEEP_ID.match(spec.removeprefix("wandb:") if spec.startswith("wandb:") else spec)
    if not m:
        raise ConfigError("inputs", spec, "a W&B sweep id looks like entity/project/sweep_id")
    if not wandb_online():
        # a mistyped folder looks like a sweep id too (a/b/c): say both readings
        folder = (
            "" if spec.startswith("wandb:") else "no such folder; as a W&B sweep (entity/project/sweep_id), "
        )
        raise ConfigError(
            "inputs",
            spec,
            f"{folder}reading a W&B sweep needs W&B online (WANDB_API_KEY or `wandb login`, "
            "WANDB_MODE not offline); offline, pass the sweep's run folders instead",
        )
    import tempfile

    import wandb
    from rich.progress import track

    entity, project, sweep_id = m.groups()
    try:
        runs = list(wandb.Api(timeout=60).sweep(f"{entity}/{project}/{sweep_id}").runs)
    except Exception as e:  # network, permissions, unknown sweep: one clear line, no traceback
        raise ConfigError("inputs", spec, f"could not read the W&B sweep ({type(e).__name__}: {e})") from None
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in track(
            runs, description="reading W&B runs", disable=not progress or len(runs) < 10, transient=True
        ):
            where = "/".join(run.path)
            if run.state != "finished":
                log.warning("skipping W&B run %s: state %s", where, run.state)
                continue
            res = None
            try:
                with run.file(RESULTS).download(root=os.path.join(tmp, run.id), replace=True) as f:
                    res = json.loads(Path(f.name).read_text())
            except Exception:  # not uploaded (older run): rebuilt from the summary below
                res = None
            if not isinstance(res, dict):
                # One run whose config or summary cannot be read is skipped; the rest of the report stands.
                try:
                    res = results_from_summary(dict(run.config), dict(run.summary), run.name)
                    if res is not None:
                        points_from_results(res, where)  # its point can be built: fails here, not mid-report
                except Exception as e:
                    log.warning(
                        "skipping W&B run %s: its config and summary could not be read (%s: %s)",
                        where,
                        type(e).__name__,
                        e,
                    )
                    continue
                # A trial that diverged or failed an integrity check still finishes its W&B run (the sweep
                # goes on) but logs no final/* metric: it has no final model, not a point without numbers.
                if res is None:
                    log.warning(
                        "skipping W&B run %s: no final/* metric in its summary (no final model)", where
                    )
                    continue
            if res.get("status", "completed") != "completed" or "final" not in res:
                log.warning("skipping W&B run %s: run status %r (no final model)", where, res.get("status"))
                continue
            out.append((res, where))
    if not out:
        raise ConfigError("inputs", spec, "the W&B sweep has no finished runs")
    return out


def results_from_summary(config: dict, summary: dict, name: str) -> dict | None:
    """A results.json-shaped dict from a W&B run's config and ``final/*`` summary (final point only);
    ``None`` when the summary has no ``final/*`` metric (the run ended without a final model).
    The config is read in any form a run logged it in (:func:`nested_config`)."""
    final = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("final/")}
    if not final:
        return None
    config = nested_config(config, name)
    pipe = config.get("pipeline") if isinstance(config.get("pipeline"), dict) else {}
    order = pipe.get("order")
    order = [str(s) for s in order] if isinstance(order, list) else []
    return {
        "status": "completed",
        "run_name": config.get("run_name", name),
        "pipeline": pipe.get("name"),
        "order": order,
        "seed": config.get("seed"),
        "config": config,
        "final": {"stage": (order or ["?"])[-1], "model": "student", **final},
        "stages": [],
    }


def _merge(into: dict, more: dict) -> dict:
    """``into`` with ``more`` merged in, mapping by mapping (``more`` wins); neither is changed."""
    out = dict(into)
    for k, v in more.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def nested_config(config: dict, name: str = "?") -> dict:
    """A W&B run's config as a nested run config, whichever form it was logged in.

    - nested (a run outside a sweep): as it is;
    - dotted keys (``pipeline.stages.prune.final_sparsity``: a sweep's run, whose resolved config
      :func:`dpq.loggers.wandb_config` logs flattened, and the sweep's own dotted parameters): nested back;
    - a plain value where a block belongs (a swept ``pipeline: dp``, the preset's name): the block's
      ``name``. A sweep run logged before dpq kept the resolved config has only that name and the swept
      keys; its pipeline is rebuilt from today's preset in ``conf/pipeline`` with the swept keys on top
      (a warning names the run).
    """
    out = {k: copy.deepcopy(v) for k, v in config.items() if "." not in str(k)}  # the caller's stays as it is
    # the shallower dotted keys first, so that a deeper swept one refines a block and is never replaced by it
    for k in sorted((k for k in config if "." in str(k)), key=lambda k: str(k).count(".")):
        *path, leaf = str(k).split(".")
        node = out
        for p in path:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else {"name": node[p]}
            node = node[p]
        v = config[k]
        node[leaf] = _merge(node[leaf], v) if isinstance(v, dict) and isinstance(node.get(leaf), dict) else v
    pipe = out.get("pipeline")
    if pipe is not None and not isinstance(pipe, dict):
        pipe = out["pipeline"] = {"name": pipe}
    if isinstance(pipe, dict) and "order" not in pipe and str(pipe.get("name")) in list_options("pipeline"):
        preset = load_option("pipeline", str(pipe["name"]))
        preset.pop("defaults", None)
        out["pipeline"] = _merge(_merge(load_option("pipeline", "_base"), preset), pipe)
        log.warning(
            "W&B run %s logged only its pipeline's name (%s) and swept settings, not the resolved pipeline "
            "(a sweep run from before dpq kept it): rebuilt from conf/pipeline/%s.yaml as it is today",
            name,
            pipe["name"],
            pipe["name"],
        )
    return out


# --------------------------------------------------------------------------- points


def _stage_cfgs(cfg: dict, names: list[str]) -> list[dict]:
    stages = (cfg.get("pipeline") or {}).get("stages") or {}
    return [stages.get(n, {}) for n in names]


def _knobs(cfg: dict, names: list[str]) -> tuple[float, int | None, int | None, str | None, str]:
    """(final sparsity, weight bits, activation bits, pruning granularity, budget detail) the stages
    ``names`` aim for; 0.0 / None / "" when they do not.

    Any stage with ``bits`` quantizes (QAT ``quantize``, post-training ``ptq``, ...). The
    granularity keeps a structured (shrunk) point apart from an unstructured one of the same
    sparsity in labels and tables. The detail names what ``final_sparsity`` alone does not say:
    per-layer ``overrides`` (the 50% heads / 81% neurons mix was labelled a plain "0.5") and a
    ``flops_target``.
    """
    sparsity, bits, act_bits, granularity, detail = 0.0, None, None, None, ""
    for st in _stage_cfgs(cfg, names):
        if st.get("kind") in ("prune", "spiral") and st.get("final_sparsity") is not None:
            sparsity = float(st["final_sparsity"])
            # a spiral's rounds say it in their own prune settings
            own = (st.get("prune") or {}) if st.get("kind") == "spiral" else st
            granularity = str(own.get("granularity") or "unstructured")
            detail = _budget_detail(own)
        if isinstance(st.get("bits"), int):
            bits = int(st["bits"])
            act_bits = int(st["act_bits"]) if isinstance(st.get("act_bits"), int) else None
    return sparsity, bits, act_bits, granularity, detail


def _short_selector(sel: str) -> str:
    """``re:.*intermediate\\.dense`` -> ``intermediate.dense``: a layer selector as a label shows it."""
    s = str(sel).removeprefix("re:").replace("\\", "").strip("^$")
    s = s.removeprefix(".*").removesuffix(".*")
    return ".".join(s.split(".")[-2:]) or str(sel)


def _budget_detail(prune: dict) -> str:
    """Per-layer overrides and a FLOPs target of one prune configuration, for the label."""
    parts = []
    overrides = prune.get("overrides") or {}
    if isinstance(overrides, dict):
        parts += [
            f"{_short_selector(k)} {v:g}" if isinstance(v, (int, float)) else f"{_short_selector(k)} {v}"
            for k, v in overrides.items()
        ]
    if prune.get("flops_target") is not None:
        parts.append(
            f"{prune['flops_target']:g} of dense GFLOPs"
            if isinstance(prune["flops_target"], (int, float))
            else f"flops_target {prune['flops_target']}"
        )
    return ", ".join(parts)


def identity(cfg: dict, upto: list[str] | None = None, drop: tuple[str, ...] = ()) -> dict:
    """The part of a config that determines a point.

    ``upto``: the stages that produced it (a reference point depends only on the
    stages before it; stages defined but not in the order never matter).
    """
    out = {k: v for k, v in cfg.items() if k not in IGNORED_KEYS and k not in drop}
    for dotted, before in ADDED_LATER.items():  # as a run from before the key existed records it: absent
        block, key = dotted.split(".")
        if isinstance(out.get(block), dict) and key in out[block] and out[block][key] == before:
            out[block] = {k: v for k, v in out[block].items() if k != key}
    pipe = cfg.get("pipeline") or {}
    names = list(pipe.get("order") or []) if upto is None else upto
    if "pipeline" in out:
        stages = [
            {k: v for k, v in st.items() if k not in BOOKKEEPING_STAGE_KEYS} if isinstance(st, dict) else st
            for st in _stage_cfgs(cfg, names)
        ]
        out["pipeline"] = {"order": names, "stages": dict(zip(names, stages))}
        if upto is None:
            out["pipeline"]["name"] = pipe.get("name")
    return out


def config_key(ident: dict) -> str:
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _label(
    kind: str,
    pipeline: str,
    sparsity: float,
    bits: int | None,
    stage: str | None = None,
    act_bits: int | None = None,
    granularity: str | None = None,
    detail: str = "",
) -> str:
    if kind == "teacher":
        return "teacher"
    if kind == "dense":
        return "dense student"
    parts = [pipeline if kind == "final" else f"{pipeline}:{stage}"]
    if sparsity:
        parts.append(
            f"{sparsity:g} sparse" if granularity in (None, "unstructured") else f"{sparsity:g} {granularity}"
        )
        if detail:
            parts.append(f"[{detail}]")
    if bits:
        parts.append(f"W{bits}A{act_bits}" if act_bits else f"{bits}-bit")
    return " ".join(parts)


def prefix_orderings(names: Iterable[str]) -> dict[str, list[str]]:
    """The stage kinds of each named pipeline preset (``conf/pipeline``), in order: what
    ``prefix_points`` matches the start of a run's stages against."""
    allowed = list_options("pipeline")
    base = load_option("pipeline", "_base").get("stages") or {}
    out = {}
    for name in names:
        if name not in allowed:
            raise ConfigError("--prefix-points", name, f"a pipeline preset: one of {allowed}")
        opt = load_option("pipeline", name)
        own = opt.get("stages") or {}
        out[name] = [
            (own.get(s) or {}).get("kind") or (base.get(s) or {}).get("kind") or s for s in opt["order"]
        ]
    return out


def _prefix_records(cfg: dict, order: list[str], records: list[dict], prefix_points: dict[str, list[str]]):
    """(preset, stage names of the prefix, record) for each preset whose whole stage order (by kind) the run's
    stages begin with and go beyond. A prefix trained for a later quantizer (a stage with ``qat``) is not
    what the preset trains, so it gives no point."""
    kinds = [st.get("kind") or n for n, st in zip(order, _stage_cfgs(cfg, order))]
    for name, want in prefix_points.items():
        n = len(want)
        if n >= len(order) or kinds[:n] != want:
            continue
        prefix = order[:n]
        if any(st.get("qat") for st in _stage_cfgs(cfg, prefix)):
            continue
        rec = next((r for r in reversed(records) if r.get("stage") == prefix[-1]), None)
        if rec is not None:
            yield name, prefix, rec


def points_from_results(
    results: dict, run: str, stages: bool = False, prefix_points: dict[str, list[str]] | None = None
) -> list[dict]:
    """The points one results.json contributes: final, teacher and dense (or every stage with ``stages``),
    and with ``prefix_points`` the final point of each preset its stages begin with (see the module doc)."""
    cfg = results.get("config") or {}
    order = list(results.get("order") or (cfg.get("pipeline") or {}).get("order") or [])
    pipeline = results.get("pipeline") or (cfg.get("pipeline") or {}).get("name") or "?"
    task = cfg.get("task") or {}
    common = {
        "run": run,
        "run_name": results.get("run_name"),
        "pipeline": pipeline,
        "order": " → ".join(order),
        "seed": results.get("seed", cfg.get("seed")),
        "task": task.get("name") if isinstance(task, dict) else task,
        "primary_metric": (task.get("primary_metric") if isinstance(task, dict) else None) or "accuracy",
        "model": (cfg.get("model") or {}).get("name"),
        "teacher": (cfg.get("teacher") or {}).get("name"),
    }
    if results.get("hardware"):  # runs since 2026-12-05 say which processor they computed on
        common["hardware"] = hardware_label(results["hardware"])
    if data := data_label(results.get("task"), task if isinstance(task, dict) else {}):
        common["data"] = data
    if isinstance(task, dict) and (content := (results.get("task") or {}).get("content")):
        common["data_content"] = content  # runs since 2026-12-06: tells apart examples the label cannot
    git = results.get("git") if isinstance(results.get("git"), dict) else {}
    if git.get("sha"):  # the dpq commit (and the patch of a dirty tree) the run computed with
        dirty = f"+dirty:{str(git.get('diff_sha256') or '')[:8]}" if git.get("dirty") else ""
        common["code"] = f"{str(git['sha'])[:10]}{dirty}"
    if isinstance(versions := results.get("versions"), dict) and versions:
        common["versions"] = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    if commits := results.get("hub_commits"):  # runs since 2026-12-07: the commit of each hub model loaded
        common["hub_commits"] = ", ".join(f"{k}@{v}" for k, v in sorted(commits.items()))
    if weights := (cfg.get("objective") or {}).get("weights"):
        # final.objective is the weighted sum of the final metrics under these weights; the objective is
        # not part of a configuration's identity, so its seeds' sums are averaged only under one weighting
        common["objective_weights"] = json.dumps(weights, sort_keys=True)
    records = list(results.get("stages") or [])
    points = []

    def add(
        kind: str,
        metrics: dict,
        names: list[str],
        stage: str | None,
        role: str | None,
        drop: tuple[str, ...] = (),
        as_pipeline: str | None = None,
    ) -> None:
        sparsity, bits, act_bits, granularity, detail = _knobs(cfg, names)
        ident = identity(cfg, None if kind == "final" and not as_pipeline else names, drop)
        extra = {}
        if as_pipeline:  # a preset's point read off this run's prefix: keyed as that preset's run would be
            if "pipeline" in ident:
                ident["pipeline"]["name"] = as_pipeline
            extra = {"pipeline": as_pipeline, "prefix_of": pipeline}
        # A reference point depends only on the stages up to it: that is its ordering.
        order_of = " → ".join(names) if kind in ("teacher", "dense") or as_pipeline else common["order"]
        points.append(
            {
                **common,
                **extra,
                "order": order_of,
                "kind": kind,
                "stage": stage,
                "role": role,
                "label": _label(
                    kind, as_pipeline or pipeline, sparsity, bits, stage, act_bits, granularity, detail
                ),
                "final_sparsity": sparsity,
                "granularity": granularity,
                "bits": bits,
                "act_bits": act_bits,
                "config_key": config_key({"kind": kind, **ident}),
                "config": json.dumps(ident, sort_keys=True, default=str),
                **_scalars(metrics),
                **{k: metrics[k] for k in (*CONDITION_KEYS, *CONVENTION_KEYS) if k in metrics},
            }
        )

    final = results["final"]
    add("final", final, order, final.get("stage"), final.get("model"))
    for rec in records:
        # The stages that produced this record (composite stages such as spiral record several times).
        names = order[: order.index(rec["stage"]) + 1] if rec.get("stage") in order else order
        if stages:
            add("stage", rec["metrics"], names, rec["stage"], rec.get("model"))
        elif rec.get("model") == "teacher" and rec.get("kind") == "teacher":
            add("teacher", rec["metrics"], names, rec["stage"], "teacher", drop=("model",))
        elif (
            rec.get("kind") == "distill"
            and not any(p["kind"] == "dense" for p in points)
            # prune-before-distill (pd) distils a pruned student: that record is no dense reference
            and not any(st.get("kind") in ("prune", "spiral") for st in _stage_cfgs(cfg, names))
        ):
            add("dense", rec["metrics"], names, rec["stage"], rec.get("model"))
    if prefix_points and not stages:
        for name, prefix, rec in _prefix_records(cfg, order, records, prefix_points):
            add("final", rec["metrics"], prefix, rec["stage"], rec.get("model"), as_pipeline=name)
    return points


def data_label(record: dict | None, task: dict) -> str | None:
    """One line for the examples a run was measured on: the source, the split sizes, the seed that carved
    the splits the data lacks, and whether examples shared with train were dropped (``task.overlap``)."""
    if not isinstance(record, dict) or not (sizes := record.get("sizes")):
        return None
    label = f"{record.get('source', '?')}: " + ", ".join(f"{s} {n}" for s, n in sizes.items())
    label += f"; split seed {(task.get('split') or {}).get('seed', 0)}"
    if (record.get("overlap") or {}).get("policy") == "drop":
        label += "; examples shared with train dropped"
    return label


def hardware_label(hw: dict) -> str:
    """One line for a run's ``hardware`` record: CPU model, torch's CPU instruction set, GPUs if any."""
    label = f"{hw.get('cpu', '?')} [{hw.get('torch_cpu_capability', '?')}]"
    gpus = hw.get("gpus")
    return f"{label}; GPUs {gpus}" if gpus and gpus != "none" else label


def to_frame(
    loaded: list[tuple[dict, str]],
    references: bool = True,
    stages: bool = False,
    prefix_points: dict[str, list[str]] | None = None,
) -> pd.DataFrame:
    """One row per point of every loaded run (unmerged); with ``stages``, one per stage record instead."""
    rows = []
    for res, run in loaded:
        pts = points_from_results(res, run, stages, prefix_points)
        rows += (
            [p for p in pts if p["kind"] == "stage"]
            if stages
            else [p for p in pts if references or p["kind"] == "final"]
        )
    df = pd.DataFrame(rows)
    if not df.empty:
        # Where a local run's files are (predictions.npz, for the paired per-seed checks); not
        # written into reports, whose ``run`` stays relative so that they read the same anywhere.
        # A point read off a run's prefix has none: the run's predictions.npz is of its final model.
        derived = df["prefix_of"].notna() if "prefix_of" in df else pd.Series(False, index=df.index)
        df["run_path"] = [
            os.path.abspath(r) if os.path.isdir(r) and not d else None for r, d in zip(df["run"], derived)
        ]
        df["run"] = _relative_runs(df["run"])
        df["base_label"] = df["label"]  # what distinct_labels starts from (again, after a filter)
        df["label"] = distinct_labels(df)
    return df


def _flatten(d: dict, prefix: str = "") -> dict:
    """Dotted keys to leaf values. An empty mapping sets nothing, so it gives no key: a run with
    ``prune.overrides={re:...: 0.81}`` then differs from one with ``{}`` in that one setting, not
    also in an ``overrides`` key that one run has and the other lacks."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_UNSET = object()


def _show(v: Any) -> str:
    if v is _UNSET:
        return "unset"
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def flat_config(rows: pd.DataFrame, key: str) -> dict:
    """The flattened identity config of configuration ``key`` among ``rows`` ({} when absent)."""
    cfg = rows.loc[rows["config_key"] == key, "config"]
    return _flatten(json.loads(cfg.iloc[0])) if len(cfg) and isinstance(cfg.iloc[0], str) else {}


def shown_settings(flat: dict[str, dict]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Per configuration, every setting as text (``unset`` where it lacks one), and the settings
    whose text differs between the configurations: what tells them apart."""
    names = sorted(set().union(*flat.values()))
    shown = {k: {n: _show(f.get(n, _UNSET)) for n in names} for k, f in flat.items()}
    return shown, [n for n in names if len({v[n] for v in shown.values()}) > 1]


def _settings(shown: dict, differ: list[str], k: str, limit: int | None) -> str:
    """``k``'s values of the ``differ`` settings, the rarest among the configurations first."""
    share = {n: sum(v[n] == shown[k][n] for v in shown.values()) for n in differ}
    ranked = sorted(differ, key=lambda n: share[n])  # stable: by name among equals
    out = [f"{n.removeprefix('pipeline.stages.')}={shown[k][n]}" for n in ranked[:limit]]
    return ", ".join(out + (["…"] if limit is not None and len(differ) > limit else []))


def distinct_labels(df: pd.DataFrame, most: int = 3) -> pd.Series:
    """One label per configuration.

    A label names a point by its ordering, sparsity and bits; two configurations that differ
    elsewhere (criterion, scope, epochs, ...) would share it and be told apart nowhere in the
    plot or the tables. Each of those gets the settings where it differs from the others with
    its label, e.g. ``dpq 0.8 sparse 4-bit (prune.criterion=obs)``: at most ``most``, then "…",
    its rarest values first (among nine recipes at one sparsity, a recipe's own changes come before
    the settings it shares with most of the others), and all of them where the short labels of two
    configurations would be the same.
    """
    labels = df["label"].copy()
    for (_, label), grp in df.groupby(["kind", "label"], sort=False):
        keys = list(dict.fromkeys(grp["config_key"]))
        if len(keys) < 2:
            continue
        shown, differ = shown_settings({k: flat_config(grp, k) for k in keys})
        short = {k: _settings(shown, differ, k, most) for k in keys}
        for k in keys:
            clash = sum(v == short[k] for v in short.values()) > 1
            labels[grp.index[grp["config_key"] == k]] = (
                f"{label} ({_settings(shown, differ, k, None) if clash else short[k]})"
            )
    return labels


def _relative_runs(runs: pd.Series) -> pd.Series:
    """Run folders relative to their common parent (short and unique in tables and plots)."""
    local = [r for r in runs.unique() if os.path.isabs(r) or os.path.exists(r)]
    if not local:
        return runs
    try:
        root = os.path.commonpath([os.path.abspath(r) for r in local])
    except ValueError:  # different drives
        return runs
    if len(local) == 1:
        root = os.path.dirname(root)
    return runs.map(lambda r: os.path.relpath(os.path.abspath(r), root) if r in local else r)


def gather(
    inputs: list[str],
    references: bool = True,
    progress: bool = True,
    prefix_points: dict[str, list[str]] | None = None,
) -> pd.DataFrame:
    """All points named by ``inputs`` (see :data:`INPUTS_HELP`) as one unmerged table."""
    if not inputs:
        raise ConfigError("inputs", [], f"nothing to gather; pass {INPUTS_HELP}")
    loaded: list[tuple[dict, str]] = []
    paths = [s for s in map(str, inputs) if not is_sweep_id(s)]
    for s in map(str, inputs):
        if is_sweep_id(s):
            loaded += load_sweep(s, progress)
    if paths:
        loaded += load_results(find_results(paths), progress)
    if not loaded:
        raise ConfigError("inputs", list(inputs), "none of the runs found finished (status 'completed')")
    return to_frame(loaded, references=references, prefix_points=prefix_points)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric measured columns (averaged across seeds), without the measuring conditions."""
    fixed = {"seed", "final_sparsity", "bits", "act_bits", "round", *CONDITION_KEYS}
    return [
        c
        for c in df.columns
        if c not in fixed and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
    ]


def json_safe(v: Any) -> Any:
    """NaN -> None, numpy scalars -> Python (for JSON and HTML)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v
