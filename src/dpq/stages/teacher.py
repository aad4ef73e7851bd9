"""``teacher``: fine-tune the teacher on the task (or load a fine-tuned one), then freeze it.

A teacher already fine-tuned on the task is used as it is: a saved folder named by ``load_from``,
or a teacher spec with ``fine_tuned: true`` (a local folder or hub id with a trained head whose
labels match the task's).

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
from dpq.core.files import fingerprint_path, write_dir_atomic
from dpq.core.provenance import code_fingerprint, training_settings
from dpq.distill.teachers import teacher_signal
from dpq.models import check_head_labels, hub_commits, local_folder, local_folders, save_model
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


def _saved_config(path: str) -> dict:
    """A saved model folder's ``config.json`` ({} when it has none that reads as a mapping)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _saved_vocab_size(path: str) -> int | None:
    """``config.json``'s ``vocab_size`` of a saved model folder, or None if it does not say."""
    n = _saved_config(path).get("vocab_size")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _saved_labels(path: str) -> list[str] | None:
    """The labels a saved model folder's head predicts, in class-id order (``config.json``: ``id2label`` of
    a Hugging Face model, ``label_names`` of a dpq one; ``LABEL_<i>`` when unnamed), or None if it does not say."""
    config = _saved_config(path)
    if isinstance(config.get("id2label"), dict):
        return [str(config["id2label"][k]) for k in sorted(config["id2label"], key=int)]
    if "num_labels" in config:
        return [
            str(n)
            for n in config.get("label_names") or (f"LABEL_{i}" for i in range(int(config["num_labels"])))
        ]
    return None


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
        if self.cfg.load_from is not None and not isinstance(self.cfg.load_from, str):  # Path(3): a TypeError
            raise ConfigError(
                f"{self.key}.load_from", self.cfg.load_from, "must be a saved model folder (a path)"
            )
        if self.cfg.load_from and not Path(self.cfg.load_from).exists():
            raise ConfigError(f"{self.key}.load_from", self.cfg.load_from, "no such folder")
        if self.cfg.load_from and not (Path(self.cfg.load_from) / "config.json").exists():
            inner = Path(self.cfg.load_from) / "model"
            raise ConfigError(
                f"{self.key}.load_from",
                self.cfg.load_from,
                "is not a saved model folder (no config.json)"
                + (f"; a run folder keeps its model in {inner}" if (inner / "config.json").exists() else ""),
            )
        if self.cfg.ensemble is not None and not isinstance(self.cfg.ensemble, (list, tuple)):
            raise ConfigError(
                f"{self.key}.ensemble",
                self.cfg.ensemble,
                "must be a list of saved model folders, e.g. '[/a,/b]'",
            )
        extra = list(self.cfg.ensemble or [])
        for i, path in enumerate(extra):
            if not isinstance(path, str):
                raise ConfigError(f"{self.key}.ensemble[{i}]", path, "must be a saved model folder (a path)")
            if not (Path(path) / "config.json").exists():
                raise ConfigError(
                    f"{self.key}.ensemble[{i}]", path, "is not a saved model folder (no config.json)"
                )
        if self.cfg.ensemble_weights is not None:
            w = (
                list(self.cfg.ensemble_weights)
                if isinstance(self.cfg.ensemble_weights, (list, tuple))
                else []
            )
            numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)
            if (
                len(w) != 1 + len(extra)
                or not numbers
                or any(float(x) < 0 for x in w)
                or not any(float(x) > 0 for x in w)
            ):
                raise ConfigError(
                    f"{self.key}.ensemble_weights",
                    self.cfg.ensemble_weights,
                    f"needs {1 + len(extra)} non-negative numbers (this teacher first), not all zero",
                )

    def check_model(self, check: ModelCheck) -> None:
        """Saved teachers (``load_from``, ``ensemble``) must have the task's label count."""
        task, num_labels = check.task, int(check.task["num_labels"])
        saved = ([("load_from", self.cfg.load_from)] if self.cfg.load_from else []) + [
            (f"ensemble[{i}]", p) for i, p in enumerate(self.cfg.ensemble or [])
        ]
        for sub, path in saved:
            own = _saved_labels(path)
            if own is not None and len(own) != num_labels:
                raise ConfigError(
                    f"{self.key}.{sub}",
                    path,
                    f"is a {len(own)}-label model, but task '{task['name']}' has "
                    f"{num_labels} labels (task.num_labels)",
                )
            if own is not None:
                check_head_labels(own, task, f"{self.key}.{sub}", path)
            rows, tokens = _saved_vocab_size(path), check.tokens
            if rows is not None and tokens is not None and rows < tokens:
                raise ConfigError(  # the data is tokenized once, with the teacher spec's tokenizer
                    f"{self.key}.{sub}",
                    path,
                    f"has a {rows}-token vocabulary and the data is tokenized with teacher's {tokens}-token "
                    "one; a saved teacher must read the tokens the teacher's tokenizer writes",
                )

    def cache_key(self, cfg: dict, splits) -> str:
        """Hash of everything that determines the fine-tuned teacher: its model and task config, the
        examples (``splits``, the loaded :class:`~dpq.data.tasks.TaskSplits`), the seed, this stage's training
        parameters, every trainer setting that changes training, dpq's source files and the numerics
        libraries' versions (:func:`~dpq.core.provenance.code_fingerprint`)."""
        payload = {
            "teacher": cfg["teacher"],
            "task": cfg["task"],
            # the data actually loaded: task.source=auto reads the embedded copy when its package is
            # installed, else the hub's, which are other examples (the stage cache keys the same facts)
            "data_source": splits.source,
            "data_sizes": splits.sizes(),
            # the examples themselves (local files and hub datasets can change under one name), and
            # local model folders' files' sizes and times (they can be overwritten in place)
            "data_content": splits.content,
            **{
                "folder" if sub == "pretrained" else f"folder.{sub}": fingerprint_path(f)
                for sub, f in local_folders(cfg["teacher"]).items()
            },
            # hub models: the commit each one's branch points to (the branch can move)
            **{
                "hub" if sub == "pretrained" else f"hub.{sub}": commit
                for sub, commit in hub_commits(cfg["teacher"], "teacher").items()
            },
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

    def cache_entry(self, cfg: dict, splits) -> Path:
        """The teacher cache's folder for this run's fine-tuned teacher (complete when it holds ``COMPLETE``)."""
        return Path(cfg["paths"]["cache_dir"]) / "teachers" / self.cache_key(cfg, splits)

    def _cached_or_trained(self, state, ctx, info: dict):
        cfg: TeacherConfig = self.cfg
        entry = self.cache_entry(ctx.cfg, ctx.data.splits)
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
        elif ctx.teacher_spec.get("fine_tuned"):  # already trained on this task: used as it is
            teacher = ctx.build_teacher()
            info["loaded_from"] = local_folder(ctx.teacher_spec) or ctx.teacher_spec.get("pretrained")
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
