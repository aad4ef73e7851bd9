"""``teacher``: fine-tune the teacher on the task (or load a fine-tuned one), then freeze it.

A fine-tuned teacher is cached under ``paths.cache_dir/teachers/<key>``, the key hashing
everything that determines it (:meth:`TeacherStage.cache_key`), so later runs and sweep trials
reuse it; after a change to dpq's code or a numerics library the teacher is trained again.
Entries are written to a temporary folder and renamed into place, so a half-written entry is
never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dpq.core.errors import ConfigError
from dpq.core.files import write_dir_atomic
from dpq.core.provenance import code_fingerprint, training_settings
from dpq.distill.teachers import teacher_signal
from dpq.models import save_model
from dpq.stages.base import ModelCheck, Stage, StageConfig, register

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig(StageConfig):
    epochs: int = 2
    lr: float = 1e-4
    load_from: str | None = None  # a fine-tuned checkpoint (save_pretrained folder); skips training
    cache: bool = True
    # More fine-tuned teachers (folders) whose soft labels are averaged with this one's.
    ensemble: Any = None
    ensemble_weights: Any = None  # one weight per teacher, this one first; null = equal


def _saved_labels(path: str) -> int | None:
    """Label count of a saved model folder (``config.json``), or None if it does not say."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if "num_labels" in config:
        return int(config["num_labels"])
    return len(config["id2label"]) if isinstance(config.get("id2label"), dict) else None


@register
class TeacherStage(Stage):
    kind = "teacher"
    Config = TeacherConfig
    trains_teacher = True

    def check_order(self, before: list[Stage]) -> None:
        if before:
            raise ConfigError(
                "pipeline.order", [s.name for s in before] + [self.name], "the teacher stage must come first"
            )
        if self.cfg.load_from and not Path(self.cfg.load_from).exists():
            raise ConfigError(f"{self.key}.load_from", self.cfg.load_from, "no such folder")
        extra = list(self.cfg.ensemble or [])
        for i, path in enumerate(extra):
            if not (Path(path) / "config.json").exists():
                raise ConfigError(
                    f"{self.key}.ensemble[{i}]", path, "is not a saved model folder (no config.json)"
                )
        if self.cfg.ensemble_weights is not None:
            w = list(self.cfg.ensemble_weights)
            if len(w) != 1 + len(extra) or any(float(x) < 0 for x in w) or not any(float(x) > 0 for x in w):
                raise ConfigError(
                    f"{self.key}.ensemble_weights",
                    w,
                    f"needs {1 + len(extra)} non-negative weights (this teacher first), not all zero",
                )

    def check_model(self, check: ModelCheck) -> None:
        """Saved teachers (``load_from``, ``ensemble``) must have the task's label count."""
        task, num_labels = check.task, int(check.task["num_labels"])
        saved = ([("load_from", self.cfg.load_from)] if self.cfg.load_from else []) + [
            (f"ensemble[{i}]", p) for i, p in enumerate(self.cfg.ensemble or [])
        ]
        for sub, path in saved:
            n = _saved_labels(path)
            if n is not None and n != num_labels:
                raise ConfigError(
                    f"{self.key}.{sub}",
                    path,
                    f"is a {n}-label model, but task '{task['name']}' has "
                    f"{num_labels} labels (task.num_labels)",
                )

    def cache_key(self, ctx) -> str:
        """Hash of everything that determines the fine-tuned teacher: its model and task config, the
        seed, this stage's training parameters, every trainer setting that changes training, dpq's
        source files and the numerics libraries' versions (:func:`~dpq.core.provenance.code_fingerprint`)."""
        cfg = ctx.cfg
        payload = {
            "teacher": cfg["teacher"],
            "task": cfg["task"],
            "seed": cfg["seed"],
            "stage": {
                k: v
                for k, v in asdict(self.cfg).items()
                if k not in ("cache", "load_from", "ensemble", "ensemble_weights")
            },
            "trainer": training_settings(cfg["trainer"]),
            "code": code_fingerprint(),
            "format": 2,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _cached_or_trained(self, state, ctx, info: dict):
        cfg: TeacherConfig = self.cfg
        entry = Path(ctx.cfg["paths"]["cache_dir"]) / "teachers" / self.cache_key(ctx)
        if cfg.cache and (entry / "COMPLETE").exists():
            try:
                teacher = ctx.load_model("teacher", entry)
                info["cache"] = f"hit:{entry}"
                log.info("teacher: reusing cached fine-tuned teacher %s", entry)
                return teacher
            except Exception as e:  # a broken entry is rebuilt, never used
                log.warning("teacher cache entry %s is unreadable (%s); rebuilding it", entry, e)
                shutil.rmtree(entry, ignore_errors=True)
        teacher = ctx.build_teacher()
        ctx.fit(state, teacher, self, kd_alpha=0.0)
        info["cache"] = "miss" if cfg.cache else "off"
        if cfg.cache:
            if entry.exists() and not (entry / "COMPLETE").exists():
                # Entries are renamed into place only once complete, so this is debris
                # (an older format, a hand edit): replace it, never read it.
                shutil.rmtree(entry, ignore_errors=True)

            def fill(d: Path) -> None:
                save_model(teacher, d)
                (d / "COMPLETE").write_text("ok\n")

            write_dir_atomic(
                entry, fill, replace=False
            )  # another run finished the same entry first: keep theirs
        return teacher

    def run(self, state, ctx) -> None:
        cfg: TeacherConfig = self.cfg
        info: dict = {}
        if cfg.load_from:
            teacher = ctx.load_model("teacher", Path(cfg.load_from))
            info["loaded_from"] = cfg.load_from
        else:
            teacher = self._cached_or_trained(state, ctx, info)
        weights = [float(w) for w in cfg.ensemble_weights] if cfg.ensemble_weights is not None else None
        members = [str(p) for p in cfg.ensemble or []]
        state.teacher = teacher.eval().requires_grad_(False)
        state.teacher_ensemble = {"members": members, "weights": weights} if members else None
        state.teacher_logits = teacher_signal(
            state.teacher,
            ctx.data.num_train,
            ctx.num_labels,
            members,
            weights,
            load=lambda p: ctx.load_model("teacher", p),
        )
        if members:
            info["ensemble"] = state.teacher_ensemble
        ctx.record(state, self, teacher, role="teacher", extra=info)
