"""A finished run's saved model with the data it was measured on, for work done after the run
(``python -m dpq.export``, ``python -m dpq.predictions``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dpq.core.errors import ConfigError


@dataclass
class FinishedRun:
    results: dict
    task: dict
    data: Any  # a ClassificationDataModule over the run's task, split as the run split it
    model: nn.Module
    tokenizer: Any
    model_dir: Path


def read_results(run_dir: Path) -> dict:
    """``run_dir/results.json`` of a completed run with a saved model, or a :class:`ConfigError` saying why not."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError) as e:
        runs = sorted(run_dir.glob("*/results.json")) if run_dir.is_dir() else []
        hint = (  # a study's or multirun's folder: its runs are one level down
            f"; it holds {len(runs)} run folder(s), e.g. {runs[0].parent}: pass those ({run_dir}/*/)"
            if runs
            else ""
        )
        raise ConfigError("RUN_DIR", str(run_dir), f"holds no readable results.json ({e}){hint}") from None
    if results.get("status") != "completed" or not results.get("model_dir"):
        raise ConfigError(
            "RUN_DIR",
            str(run_dir),
            "is not a completed run with a saved model (status "
            f"{results.get('status')!r}, model_dir {results.get('model_dir')!r})",
        )
    return results


def load_finished(run_dir: Path, model_dir: Path | None = None) -> FinishedRun:
    """The model saved by the run in ``run_dir`` (``model_dir``, default ``run_dir/model``), eval mode."""
    from dpq.data import ClassificationDataModule, load_task, recorded_task
    from dpq.models import load_model

    results = read_results(run_dir)
    model_dir = Path(model_dir) if model_dir is not None else run_dir / "model"
    if not model_dir.is_dir():
        raise ConfigError("model folder", str(model_dir), "does not exist (the run's saved model is needed)")
    cfg = results["config"]
    task = recorded_task(cfg["task"])  # an older run's keys in today's names
    spec = cfg["model"] if results["final"].get("model", "student") == "student" else cfg["teacher"]
    splits = load_task(task)
    if differs := splits.changed_since(results.get("task")):
        raise ConfigError(
            "RUN_DIR",
            str(run_dir),
            f"the task's examples are not the ones the run was measured on ({differs}); accuracies "
            "measured now would sit in its results.json beside numbers from other data: restore the data "
            "the run used (a file edited in place, a hub dataset's newer revision)",
        )
    tokenizer = None
    try:
        if splits.kind == "text":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = load_model(spec, task, model_dir).eval()
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # no config.json, weights or tokenizer files: not the run's model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("model folder", str(model_dir), f"cannot be loaded ({first})") from None
    data = ClassificationDataModule.for_task(splits, tokenizer, task, group_by_length=False)
    return FinishedRun(results, task, data, model, tokenizer, model_dir)
