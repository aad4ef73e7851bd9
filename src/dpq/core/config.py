"""Access to the packaged Hydra config tree (``conf/``), for messages and tests."""

from __future__ import annotations

from pathlib import Path

import yaml

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"

# Top-level keys of a run's config that never change what it computes or measures: where results go
# and how they are named, tracked and kept (checkpoints only save state; the integrity checks only
# verify it; a stage-cache hit restores what the same settings computed), and what a sweep optimises
# (``objective`` weighs the final metrics afterwards; ``stage_params`` is what an Optuna study samples from,
# and each value it samples is an override of its own). The stage cache keys on everything else, and
# dpq.pareto counts runs that differ only here as seeds of one configuration.
BOOKKEEPING_KEYS = frozenset(
    {
        "logger",
        "paths",
        "run_name",
        "save_model",
        "hydra",
        "resume",
        "checkpoint",
        "integrity",
        "integrity_tolerance",
        "stage_cache",
        "objective",
        "dry_run",
        "stage_params",
    }
)
# Stage parameters of the same kind: they switch another cache (the teacher's), not the result.
BOOKKEEPING_STAGE_KEYS = frozenset({"cache"})


def list_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def load_option(group: str, name: str) -> dict:
    return yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text()) or {}
