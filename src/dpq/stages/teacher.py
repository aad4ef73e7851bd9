"""``teacher``: fine-tune the teacher on the task (or load a fine-tuned one), then freeze it.

A fine-tuned teacher is cached under ``paths.cache_dir/teachers/<key>``, the key hashing
everything that determines it (model and task config, seed, this stage's config, library
versions), so later runs and sweep trials reuse it. Entries are written to a temporary
folder and renamed into place, so a half-written entry is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any
from pathlib import Path

from dpq.errors import ConfigError
from dpq.stages.base import Stage, StageConfig, register

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig(StageConfig):
    load_from: str | None = None  # a fine-tuned checkpoint (save_pretrained folder); skips training
    cache: bool = True
    # More fine-tuned teachers (folders) whose soft labels are averaged with this one's.
    ensemble: Any = None
    ensemble_weights: Any = None  # one weight per teacher, this one first; null = equal


@register
class TeacherStage(Stage):
    kind = "teacher"
    Config = TeacherConfig

    def check_order(self, before: list[Stage]) -> None:
        if before:
            raise ConfigError("pipeline.order", [s.name for s in before] + [self.name],
                              "the teacher stage must come first")
        if self.cfg.load_from and not Path(self.cfg.load_from).exists():
            raise ConfigError(f"{self.key}.load_from", self.cfg.load_from, "no such folder")
        extra = list(self.cfg.ensemble or [])
        for i, path in enumerate(extra):
            if not (Path(path) / "config.json").exists():
                raise ConfigError(f"{self.key}.ensemble[{i}]", path, "is not a saved model folder (no config.json)")
        if self.cfg.ensemble_weights is not None:
            w = list(self.cfg.ensemble_weights)
            if len(w) != 1 + len(extra) or any(float(x) < 0 for x in w) or not any(float(x) > 0 for x in w):
                raise ConfigError(f"{self.key}.ensemble_weights", w,
                                  f"needs {1 + len(extra)} non-negative weights (this teacher first), not all zero")

    def cache_key(self, run) -> str:
        from dpq.results import library_versions

        payload = {"teacher": run.cfg_dict["teacher"], "task": run.cfg_dict["task"], "seed": run.cfg_dict["seed"],
                   "stage": {k: v for k, v in asdict(self.cfg).items() if k not in ("cache", "load_from", "ensemble", "ensemble_weights")},
                   "trainer": {k: v for k, v in run.cfg_dict["trainer"].items() if k.startswith(("limit_", "precision", "accumulate"))},
                   "versions": library_versions(), "format": 1}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self, run) -> None:
        from dpq.checkpoints import load_model, save_model

        cfg: TeacherConfig = self.cfg
        info: dict = {}
        if cfg.load_from:
            teacher = load_model(run.teacher_spec, run.task_dict, Path(cfg.load_from))
            info["loaded_from"] = cfg.load_from
        else:
            entry = Path(run.cfg_dict["paths"]["cache_dir"]) / "teachers" / self.cache_key(run)
            if cfg.cache and (entry / "COMPLETE").exists():
                try:
                    teacher = load_model(run.teacher_spec, run.task_dict, entry)
                    info["cache"] = f"hit:{entry}"
                    log.info("teacher: reusing cached fine-tuned teacher %s", entry)
                except Exception as e:  # a broken entry is rebuilt, never used
                    log.warning("teacher cache entry %s is unreadable (%s); rebuilding it", entry, e)
                    shutil.rmtree(entry, ignore_errors=True)
                    teacher = None
            else:
                teacher = None
            if teacher is None:
                teacher = run.build_teacher()
                run.fit(teacher, self, kd_alpha=0.0)
                info["cache"] = "miss" if cfg.cache else "off"
                if cfg.cache:
                    if entry.exists() and not (entry / "COMPLETE").exists():
                        # Entries are renamed into place only once complete, so this is debris
                        # (an older format, a hand edit): replace it, never read it.
                        shutil.rmtree(entry, ignore_errors=True)
                    entry.parent.mkdir(parents=True, exist_ok=True)
                    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
                    save_model(teacher, tmp)
                    (tmp / "COMPLETE").write_text("ok\n")
                    try:
                        os.rename(tmp, entry)
                    except OSError:  # another run finished the same entry first: keep theirs
                        shutil.rmtree(tmp, ignore_errors=True)
        run.set_teacher(teacher)
        if self.cfg.ensemble:
            from dpq.distill import EnsembleTeacher, TeacherLogits

            extra = [TeacherLogits(load_model(run.teacher_spec, run.task_dict, Path(p)), run.data.num_train, run.num_labels)
                     for p in self.cfg.ensemble]
            weights = [float(w) for w in self.cfg.ensemble_weights] if self.cfg.ensemble_weights is not None else None
            run.teacher_logits = EnsembleTeacher([run.teacher_logits, *extra], weights)
            info["ensemble"] = {"members": [str(p) for p in self.cfg.ensemble], "weights": weights}
        run.record(self, teacher, role="teacher", extra=info)
