"""``dry_run=true``: check a run and show what it would do, without training anything.

A run on a queue, or one trial of a sweep, otherwise learns that its data is wrong when its turn comes,
and the stage cache decides silently which stages train again. A dry run makes every check a run makes
before its first stage (the config, the folders, the data and its labels), then prints one row per
stage: what the stage is set to do, how long it trains, and where its state would come from -- the
stage cache (the same configuration's finished prefix), the teacher cache, a folder, or training. It
loads no model, starts no logger and writes no results.json; only Hydra's own record of the invocation
(``.hydra/``, its log) lands in the run folder.

Hydra's ``--cfg job`` prints the composed config but runs none of dpq's checks; Lightning's
``fast_dev_run`` trains a batch per stage and measures it, which is a (meaningless) result. Neither
says what the stage cache will reuse, hence this module.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dpq.core.distributed import trainer_world_size
from dpq.models import run_hub_commits
from dpq.run import stage_cache

log = logging.getLogger(__name__)

# Stage parameters worth a glance in the plan, in this order, where a stage kind has them (any kind,
# including one added later: the plan reads its config, it does not switch on kind names).
SHOWN = (
    "granularity",
    "criterion",
    "scope",
    "initial_sparsity",
    "final_sparsity",
    "flops_target",
    "flops_fill",
    "overrides",
    "drop_layers",
    "rounds",
    "teacher_mode",
    "bits",
    "act_bits",
    "act_range",
    "observer",
    "backend",
    "embedding_bits",
    "calibration",
    "alpha",
    "hidden",
    "attention",
    "relation",
    "qat",
)


def length(stage, steps: int | None = None) -> str:
    """How long a stage trains, as its config says (``epochs`` or ``max_steps``; a spiral's rounds).
    ``steps``: optimizer steps per epoch, to say which of ``epochs`` and ``max_steps`` ends the stage."""
    cfg = stage.cfg
    rounds = getattr(cfg, "rounds", None)
    if rounds is not None and isinstance(getattr(cfg, "prune", None), dict):
        p, d = cfg.prune.get("epochs", 1), cfg.distill.get("epochs", 1)
        return f"{rounds} x ({p} + {d}) epochs"
    if (cap := getattr(cfg, "max_steps", -1)) > 0:
        if steps is None or not hasattr(cfg, "epochs"):
            return f"{cap} steps"
        n = stage_steps(cfg, steps)
        ended = f" ({cfg.epochs} epoch{' ends' if cfg.epochs == 1 else 's end'} before max_steps={cap})"
        return f"{n} steps" + (ended if n < cap else "")
    if hasattr(cfg, "epochs"):
        return f"{cfg.epochs} epoch{'' if cfg.epochs == 1 else 's'}"
    return "no training"


# Of these, an unset or zero value means the feature is off, and is left out.
OFF_WHEN_FALSY = {
    "flops_target",
    "flops_fill",
    "overrides",
    "drop_layers",
    "act_bits",
    "embedding_bits",
    "hidden",
    "attention",
    "relation",
    "qat",
}


def settings(stage) -> str:
    """The stage's notable parameters, ``key=value`` (defaults of its kind included: what will run)."""
    values = dataclasses.asdict(stage.cfg)
    shown = [
        f"{k}={values[k]}"
        for k in SHOWN
        if k in values
        and values[k] is not None
        and not (k in OFF_WHEN_FALSY and not values[k])
        and not (k == "act_range" and not values.get("act_bits"))  # float activations have no range
    ]
    if "lr" in values:
        shown.append(f"lr={values['lr']:.1e}")
    return " ".join(shown)


# What the dry runs of the current Hydra multirun's earlier jobs would build (stage-cache keys) and how their
# stages' states would be had: the basic launcher runs jobs one after another in one process, and a later job
# of the real multirun reuses what an earlier one trained (a grid over the final sparsity trains the teacher
# and the distillation once). :class:`DryRunSummary` empties both as a multirun starts and sums them up at its end.
_PLANNED: set[str] = set()
_TALLY: Counter = Counter()


def _in_multirun() -> bool:
    """Whether this job belongs to a Hydra multirun (not a single run, nor a test's direct call)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):  # ValueError: no Hydra job is running
        return False


EARLIER = "(an earlier job trains it)"


def sources(cfg: dict[str, Any], stages: list, splits) -> list[str]:
    """Where each stage's state would come from if the run started now (or, in a multirun, after the
    jobs before it)."""
    out = ["train" for _ in stages]
    sc = cfg.get("stage_cache") or {}
    reused = 0
    if sc.get("enabled"):
        data = {"data_source": splits.source, "data_sizes": splits.sizes(), "data_content": splits.content}
        keys = stage_cache.pipeline_keys(cfg, data)
        reused, _ = stage_cache.StageCache(sc["dir"]).longest_prefix(keys, touch=False)  # writes nothing
        for i in range(reused):
            out[i] = f"stage cache {keys[reused - 1]}"
        if _in_multirun():
            # keys chain prefixes: an earlier job that builds keys[i] builds (or reuses) keys[:i] too
            later = max((i + 1 for i, k in enumerate(keys) if k in _PLANNED), default=0)
            for i in range(reused, later):
                out[i] = f"stage cache {keys[later - 1]} {EARLIER}"
            reused = max(reused, later)
            _PLANNED.update(keys)
    for i, stage in enumerate(stages[reused:], start=reused):
        if stage.trains_teacher:
            out[i] = teacher_source(cfg, stage, splits)
        elif length(stage) == "no training":
            out[i] = "compute (no training)"
    return out


def teacher_source(cfg: dict[str, Any], stage, splits) -> str:
    if getattr(stage.cfg, "load_from", None):
        return f"loaded from {stage.cfg.load_from}"
    if cfg["teacher"].get("fine_tuned"):
        return "the teacher as it is (teacher.fine_tuned)"
    if getattr(stage.cfg, "cache", False) and hasattr(stage, "cache_entry"):
        entry = stage.cache_entry(cfg, splits)
        if (entry / "COMPLETE").exists():
            return f"teacher cache {entry.name}"
    return "train"


def stage_steps(stage_cfg, steps: int) -> int:
    """Optimizer steps a stage trains with ``steps`` per epoch, as Lightning's ``estimated_stepping_batches``
    counts them: ``epochs`` of them, capped by ``max_steps`` where set."""
    by_epochs = int(stage_cfg.epochs) * steps
    cap = int(getattr(stage_cfg, "max_steps", -1))
    return by_epochs if cap <= 0 else (min(cap, by_epochs) if stage_cfg.epochs >= 1 else cap)


def warn_one_jump_ramps(stages: list, steps: int) -> None:
    """The prune ramps (a spiral's rounds too) whose ``update_every`` leaves one mask update on them, said
    before anything trains, in the words the stage itself would use (:func:`dpq.prune.callbacks.one_jump`)."""
    from dpq.prune.callbacks import one_jump
    from dpq.stages.prune import PruneStage

    for s in stages:
        if isinstance(s, PruneStage):
            c, key = s.cfg, s.key
        elif hasattr(s, "round_stages"):  # a spiral: every round prunes as its first does
            c, key = s.round_stages(0, s.cfg.initial_sparsity, s.cfg.targets()[0])[0].cfg, f"{s.key}.prune"
        else:
            continue
        if c.schedule == "one_shot" or (c.final_sparsity <= c.initial_sparsity and not c.overrides):
            continue
        said = one_jump(stage_steps(c, steps), int(c.update_every), float(c.ramp_end))
        if said:
            log.warning("%s%s: %s", key, " (every round)" if key != s.key else "", said)


def plan(cfg: dict[str, Any], stages: list, splits) -> dict[str, Any]:
    """What a dry run reports (and ``train`` returns): the data, and per stage its settings and source."""
    batch = int(cfg["task"]["batch_size"])
    n_train = splits.sizes()["train"]
    world = trainer_world_size(cfg["trainer"])  # DDP: each process takes its share of the batches
    steps = steps_per_epoch(n_train, batch, world, cfg["trainer"])
    warn_one_jump_ramps(stages, steps)
    rows = [
        {"stage": s.name, "kind": s.kind, "length": length(s, steps), "settings": settings(s), "source": src}
        for s, src in zip(stages, sources(cfg, stages, splits), strict=True)
    ]
    if _in_multirun():
        tally(rows)
    return {
        "dry_run": True,
        "output_dir": str(Path(cfg["paths"]["output_dir"])),
        "data": {
            "source": splits.source,
            "sizes": splits.sizes(),
            "batches_per_epoch": math.ceil(n_train / batch),
            "processes": world,
            "steps_per_epoch": steps,
            "batches_used": used_batches(n_train, batch, world, cfg["trainer"]),
        },
        "stages": rows,
        # the commit each hub model would load at (resolved now, as the run would: dpq.models.hf)
        "hub_commits": run_hub_commits(cfg),
    }


def used_batches(n_train: int, batch: int, world: int, trainer: dict[str, Any]) -> int:
    """Training batches per epoch in each process, as Lightning counts them (:func:`limited_batches`)."""
    return limited_batches(n_train, batch, world, trainer.get("limit_train_batches"))


def limited_batches(n: int, batch: int, world: int, limit: Any) -> int:
    """Batches per epoch in each process of a split of ``n`` examples, as Lightning counts them: the process's
    batches (its DistributedSampler pads the split to a multiple of the processes), cut by a
    ``trainer.limit_*_batches`` (an int: at most that many; a float: that fraction, rounded down)."""
    batches = math.ceil(math.ceil(n / world) / batch)
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    return batches


def steps_per_epoch(n_train: int, batch: int, world: int, trainer: dict[str, Any]) -> int:
    """Optimizer steps per epoch in each process: :func:`used_batches` over ``accumulate_grad_batches``."""
    return math.ceil(
        used_batches(n_train, batch, world, trainer) / int(trainer.get("accumulate_grad_batches") or 1)
    )


def tally(rows: list[dict[str, Any]]) -> None:
    """Count a multirun job's stages by where their state would come from (for :class:`DryRunSummary`)."""
    _TALLY["jobs"] += 1
    for row in rows:
        src = row["source"]
        _TALLY[
            "earlier job"
            if src.endswith(EARLIER)
            else next((k for k in ("train", "stage cache", "teacher cache") if src.startswith(k)), "other")
        ] += 1


class DryRunSummary(Callback):
    """``hydra.callbacks`` entry (``conf/hydra/default.yaml``): a dry-run multirun ends with one line saying how
    many stages the real one would train, and how many states the caches would serve."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _PLANNED.clear()
        _TALLY.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if (
            not config.get("dry_run") or not _TALLY["jobs"]
        ):  # a launcher with jobs in other processes: nothing seen
            return
        t = _TALLY
        print(
            f"dpq dry run of {t['jobs']} jobs: {t['train']} stages would train; the stage cache would serve "
            f"{t['stage cache'] + t['earlier job']} ({t['earlier job']} after an earlier job of this multirun), "
            f"the teacher cache {t['teacher cache']}; {t['other']} need no training"
        )


def print_plan(result: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    data = result["data"]
    table = Table(
        title=title,
        caption=(
            f"data {data['source']}: {data['sizes']}, {data['batches_per_epoch']} training batches per epoch"
            + (
                f" ({data['batches_used']} used: trainer.limit_train_batches)"
                if data.get("batches_used", data["batches_per_epoch"]) * data["processes"]
                < data["batches_per_epoch"]
                else ""
            )
            + f"; {data['steps_per_epoch']} optimizer steps per epoch"
            + (f" in each of {data['processes']} processes" if data["processes"] > 1 else "")
            + "".join(f"; {k} from the hub at {c[:12]}" for k, c in result.get("hub_commits", {}).items())
            + "; dry run: nothing trained, nothing written but Hydra's .hydra/ and log"
        ),
    )
    for header in ("stage", "kind", "length", "settings", "state from"):
        table.add_column(header, overflow="fold")
    for row in result["stages"]:
        table.add_row(row["stage"], row["kind"], row["length"], row["settings"], row["source"])
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
