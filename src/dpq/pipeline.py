"""Run an ordered list of stages on one student, recording a result after each.

:class:`RunState` is what stages share: the data, the frozen teacher and its logit cache,
the student being compressed, the pruning masks, and the per-stage records that become
results.json. Each stage trains with its own Lightning ``Trainer`` (built from the
``trainer`` config with Hydra's ``instantiate``), its own epochs and learning rate.

After every stage the run is checked (:mod:`dpq.integrity`) and saved as a snapshot
(:meth:`RunState.save_snapshot`, format in :mod:`dpq.snapshot`); within a stage, every fit
checkpoints every ``checkpoint.every_n_steps`` steps (:mod:`dpq.resume`), so a killed run
continues where it stopped and ends as if it never had.
"""

from __future__ import annotations

import json
import os
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from torch import nn

from dpq import cost, integrity, resume, snapshot, stage_cache
from dpq.data import ClassificationDataModule
from dpq.distill import KDConfig, TeacherLogits
from dpq.errors import ConfigError
from dpq.loggers import tolerant
from dpq.models import build_model
from dpq.module import ClassifierModule
from dpq.pruning import MaskFreeze, Masks
from dpq.selectors import PRUNABLE, select_prunable
from dpq.stages import KDStageConfig, Stage

log = logging.getLogger(__name__)


class RunState:
    def __init__(self, cfg_dict: dict[str, Any], trainer_cfg, data: ClassificationDataModule, tokenizer=None,
                 logger=None, output_dir: Path | str = "."):
        self.cfg_dict, self.trainer_cfg = cfg_dict, trainer_cfg
        self.task_dict, self.model_spec, self.teacher_spec = cfg_dict["task"], cfg_dict["model"], cfg_dict["teacher"]
        self.data, self.tokenizer, self.logger = data, tokenizer, logger
        self._trainer_logger = tolerant(logger)  # a tracker failing mid-run never ends a fit
        self.output_dir = Path(output_dir)
        self.teacher: nn.Module | None = None
        self.teacher_logits: TeacherLogits | None = None
        self.student: nn.Module | None = None
        self.masks: Masks | None = None
        self.quantized = False
        self.records: list[dict] = []
        self.round: dict | None = None  # set by composite stages (spiral): added to every record and logged metric
        self._prunable: dict[int, list[str]] = {}
        self._stage_started = time.perf_counter()
        # Checkpointing and resume (see dpq.resume): where the current stage writes, and what it did.
        ck = dict(cfg_dict.get("checkpoint") or {})
        self.checkpointing = bool(ck.get("enabled", True))
        self.every_n_steps, self.keep_checkpoints = int(ck.get("every_n_steps", 100)), int(ck.get("keep", 2))
        self.keep_snapshots = int(ck.get("keep_snapshots", 2))
        self.integrity = bool(cfg_dict.get("integrity", True))
        self.checkpoints = resume.checkpoints_dir(self.output_dir)
        self.order: list[str] = []
        self.stage: Stage | None = None
        self.stage_index: int | None = None
        self.stage_dir: Path | None = None  # None: this fit is not checkpointed (a stage run outside run())
        self._next_stage = 0  # run() starts here: 0, or the stage after a loaded snapshot
        self.fit_steps: dict[str, int] = {}  # optimizer steps each fit took (resume must reproduce them)
        self.last_snapshot: snapshot.Snapshot | None = None
        self._teacher_snapshot: tuple[nn.Module, snapshot.Snapshot] | None = None  # a snapshot holding this teacher

    # ---- models -------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return int(self.task_dict["num_labels"])

    def build_teacher(self) -> nn.Module:
        return build_model(self.teacher_spec, self.task_dict, "teacher")

    def set_teacher(self, teacher: nn.Module) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_logits = TeacherLogits(self.teacher, self.data.num_train, self.num_labels)

    def ensure_student(self) -> nn.Module:
        if self.student is None:
            source = None
            if self.model_spec.get("init") == "from_teacher":
                source = self.teacher if self.teacher is not None else self.build_teacher()
            self.student = build_model(self.model_spec, self.task_dict, "model", teacher=source)
        return self.student

    def prune_targets(self, model: nn.Module, selector, key: str) -> list[str]:
        selector = selector if selector is not None else self.model_spec.get("prune_targets")
        if selector is None:
            raise ConfigError(key, None, "no pruning targets: set it or model.prune_targets")
        names = select_prunable(model, selector)
        if not names:
            linears = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
            raise ConfigError(key, selector, f"matches no nn.Linear or conv module; the model has e.g. {', '.join(linears[:6])}")
        return names

    def _prunable_names(self, model: nn.Module, role: str) -> list[str]:
        """Names the sparsity metric covers: masked modules, else the model's prune targets (fixed once seen)."""
        if role != "teacher" and self.masks:
            return list(self.masks)
        if id(model) not in self._prunable:
            spec = self.teacher_spec if role == "teacher" else self.model_spec
            self._prunable[id(model)] = select_prunable(model, spec.get("prune_targets") or [])
        return self._prunable[id(model)]

    # ---- training -----------------------------------------------------------------------
    def make_trainer(self, callbacks=(), **overrides) -> L.Trainer:
        return hydra.utils.instantiate(self.trainer_cfg, callbacks=list(callbacks), logger=self._trainer_logger or False,
                                       default_root_dir=str(self.output_dir), **overrides)

    def module_for(self, model: nn.Module, stage_name: str, stage_cfg=None, kd_alpha: float = 0.0) -> ClassifierModule:
        kd = KDConfig(alpha=kd_alpha, temperature=getattr(stage_cfg, "temperature", 1.0)) if kd_alpha > 0 else None
        features = stage_cfg.feature_kd() if isinstance(stage_cfg, KDStageConfig) else None
        wants_teacher = kd_alpha > 0 or (features is not None and features.active)
        kw = {}
        if stage_cfg is not None:
            kw = dict(lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay, warmup_ratio=stage_cfg.warmup_ratio)
        return ClassifierModule(model, self.num_labels, stage_name, kd=kd, features=features,
                                teacher=self.teacher_logits if wants_teacher else None, **kw)

    def fit(self, model: nn.Module, stage: Stage, kd_alpha: float = 0.0, callbacks=(), freeze_masks: bool = True) -> L.Trainer:
        callbacks = list(callbacks)
        if freeze_masks and self.masks:
            callbacks.append(MaskFreeze(f"{stage.name}.masks", self.masks))
        if stage.uses_teacher and self.teacher_logits is None:
            raise ConfigError(f"{stage.key}.alpha", kd_alpha, "needs a teacher, and none was trained or loaded")
        module = self.module_for(model, stage.name, stage.cfg, kd_alpha)
        # ResumeState carries what Lightning's checkpoint lacks (RNG streams, data position, teacher cache).
        state = resume.ResumeState(stage.name, None, 1, module.teacher)
        callbacks.append(state)
        ckpt_path, extra = None, {}
        if self.stage_dir is not None and self.every_n_steps > 0:
            fit_dir = self.stage_dir / resume.LIGHTNING / snapshot.safe_name(stage.name)
            ckpt_path = resume.newest_checkpoint(fit_dir)
            callbacks.append(resume.StageCheckpoint(fit_dir, self.every_n_steps, self.keep_checkpoints))
            extra = dict(enable_checkpointing=True, plugins=[resume.AtomicCheckpointIO()])
        trainer = self.make_trainer(callbacks, max_epochs=stage.cfg.epochs, max_steps=stage.cfg.max_steps, **extra)
        loader, seed = self.data.train_dataloader(), int(torch.randint(0, 2**31 - 1, (1,)))
        if trainer.world_size == 1:
            # The data order becomes a pure function of (seed, epoch), so a resumed fit sees the batches
            # the uninterrupted one would have. (Under DDP, Lightning's DistributedSampler orders the
            # data; a mid-epoch resume there restarts the epoch's order.)
            loader, state.sampler = resume.resumable_loader(loader, seed)
            state.batch_size = loader.batch_size or 1
        log.info("stage %s (%s): %d epochs, lr %.2e, kd alpha %.2f%s", stage.name, stage.kind, stage.cfg.epochs, stage.cfg.lr,
                 kd_alpha, f"; resuming from {ckpt_path}" if ckpt_path else "")
        with warnings.catch_warnings():
            # Mid-epoch resume is exact here (ResumableSampler skips the batches already seen).
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            # weights_only=False: the checkpoint is this run's own, and callback states (RNG streams,
            # schedules) hold more than tensors.
            trainer.fit(module, train_dataloaders=loader, val_dataloaders=self.data.val_dataloader(),
                        ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=False)
        self.fit_steps[stage.name] = int(trainer.global_step)
        return trainer

    def evaluate(self, model: nn.Module, stage_name: str) -> dict[str, float]:
        """Accuracy (torchmetrics) and cross-entropy on the test and validation splits."""
        module = self.module_for(model, stage_name)
        trainer = self.make_trainer(enable_progress_bar=False)
        test = trainer.test(module, dataloaders=self.data.test_dataloader(), verbose=False)[0]
        val = trainer.validate(module, dataloaders=self.data.val_dataloader(), verbose=False)[0]
        return {"accuracy": float(test[f"{stage_name}/test_acc"]), "loss": float(test[f"{stage_name}/test_loss"]),
                "val_accuracy": float(val[f"{stage_name}/val_acc"]), "val_loss": float(val[f"{stage_name}/val_loss"])}

    # ---- results ------------------------------------------------------------------------
    def example_inputs(self) -> dict:
        c = self.cfg_dict["cost"]
        if self.task_dict["kind"] == "text":
            return cost.example_inputs_for("text", int(c["batch_size"]), int(c["seq_len"]), vocab_size=len(self.tokenizer))
        if self.task_dict["kind"] == "image":
            return cost.example_inputs_for("image", int(c["batch_size"]), image_shape=tuple(self.task_dict["image_shape"]))
        return cost.example_inputs_for("features", int(c["batch_size"]), num_features=int(self.task_dict["num_features"]))

    def latency_device(self) -> str:
        """Where latency is measured: ``cost.device`` (cpu | cuda | auto = cuda when available)."""
        want = self.cfg_dict["cost"].get("device", "cpu")
        if want == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return want

    def record(self, stage: Stage, model: nn.Module, role: str = "student", extra: dict | None = None) -> dict:
        metrics = self.evaluate(model, stage.name)
        c = self.cfg_dict["cost"]
        metrics.update(cost.measure(model, self.example_inputs(), self._prunable_names(model, role),
                                    latency_kwargs={"warmup": int(c["warmup"]), "repeats": int(c["repeats"]),
                                                    "device": self.latency_device()}))
        rec = {"stage": stage.name, "kind": stage.kind, "model": role, "quantized": self.quantized and role != "teacher",
               "duration_s": time.perf_counter() - self._stage_started, **(self.round or {}), "metrics": metrics,
               **(extra or {})}
        self.records.append(rec)
        if self._trainer_logger is not None:
            scalar = {k: v for k, v in {**metrics, **(self.round or {})}.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            try:
                self._trainer_logger.log_metrics({f"result/{k}": v for k, v in scalar.items()} | {"result/stage_index": len(self.records) - 1},
                                        step=len(self.records) - 1)
            except Exception as e:  # a tracker failure must not fail the run
                log.warning("logging results failed: %s", e)
        log.info("after %s: accuracy %.4f, sparsity %.3f, effective GFLOPs %.4f", stage.name, metrics["accuracy"],
                 metrics["sparsity"], metrics["effective_gflops"])
        return rec

    def run(self, stages: list[Stage]) -> None:
        """Run the stages in order -- after a :meth:`load_snapshot`, only those after the snapshot's stage.

        After each stage: the integrity checks (``integrity``), then a snapshot in
        ``checkpoints/stage_<i>_<name>/`` (``checkpoint.enabled``). With ``stage_cache.enabled``
        (and not resuming) the longest pipeline prefix another run already computed with the same
        configuration is restored from the cache instead of retrained, and each newly run stage
        is published there; a stage that another process is building is waited for, then reused.
        """
        seed = int(self.cfg_dict["seed"])
        self.order = [s.name for s in stages]
        sc = self.cfg_dict.get("stage_cache") or {}
        if not sc.get("enabled") or self._next_stage > 0 or self.last_snapshot is not None:
            for i, stage in enumerate(stages):
                if i >= self._next_stage:
                    self._run_stage(i, stage, seed)
            self.stage_dir = None
            return
        cache = stage_cache.StageCache(sc["dir"])
        keys = stage_cache.pipeline_keys(self.cfg_dict, {"data_source": self.data.splits.source,
                                                          "data_sizes": self.data.splits.sizes()})
        distributed = stage_cache.trainer_world_size(self.cfg_dict["trainer"]) > 1
        n = stage_cache.rank_zero_decides(json.dumps(keys), lambda: cache.longest_prefix(keys)[0], cache.root)
        if n and not self._restore_cached(cache, keys[n - 1], stages):
            n = 0
        for i in range(n, len(stages)):
            meta = {"stages": self.order[: i + 1]}
            if distributed:  # every rank runs every remaining stage; rank 0 publishes (no collective under a lock)
                self._run_stage(i, stages[i], seed)
                if resume.is_global_zero():
                    cache.build(keys[i], self._publish, meta)
                continue

            def build(d: Path, i: int = i) -> None:
                self._run_stage(i, stages[i], seed)
                self._publish(d)

            _, built = cache.get_or_build(keys[i], build, meta)
            if not built and not self._restore_cached(cache, keys[i], stages):
                self._run_stage(i, stages[i], seed)
        self.stage_dir = None

    def _run_stage(self, i: int, stage: Stage, seed: int) -> None:
        # Re-seed per stage: a stage's result must not depend on how much randomness earlier
        # stages drew (a cached teacher draws none), so a warm run reproduces a cold one --
        # and a resumed run, which starts from a snapshot, the uninterrupted one.
        L.seed_everything(seed + i, workers=True, verbose=False)
        self.stage_index, self.stage = i, stage
        self.stage_dir = snapshot.stage_dir(self.checkpoints, i, stage.name) if self.checkpointing else None
        before = integrity.layer_sparsity(self.student, list(self.masks)) if self.student is not None and self.masks else {}
        self.begin_stage()
        stage.run(self)
        if self.integrity:
            self.check_stage(stage, before)
        if self.stage_dir is not None and resume.is_global_zero():  # DDP: every rank holds the same state
            self.save_snapshot(self.stage_dir)
            self._drop_old_checkpoints()

    def _publish(self, directory: Path) -> None:
        """Fill a stage-cache entry: hard-link the snapshot just written (else write one there)."""
        snap = self.last_snapshot
        if snap is not None and snap.stage_index == self.stage_index and snap.directory.exists():
            for rel in snap.manifest["files"]:
                dst = Path(directory) / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(snap.directory / rel, dst)
                except OSError:  # another file system: copy
                    shutil.copy2(snap.directory / rel, dst)
            shutil.copy2(snap.directory / snapshot.MANIFEST, Path(directory) / snapshot.MANIFEST)
        else:
            kept = (self.last_snapshot, self._teacher_snapshot)
            self.save_snapshot(directory)
            self.last_snapshot, self._teacher_snapshot = kept

    def _restore_cached(self, cache: stage_cache.StageCache, key: str, stages: list[Stage]) -> bool:
        try:
            with cache.reading(key) as entry:  # `python -m dpq.stage_cache prune` skips an entry being read
                if entry is None:
                    log.warning("stage cache: %s was evicted before this run read it; building it again", cache.path(key))
                    return False
                snap = self.load_snapshot(entry)
        except snapshot.SnapshotError as e:
            cache.discard(key, str(e))
            return False
        for r in self.records:
            r["cached"] = True
            r.setdefault("cached_from", str(cache.path(key)))
        self.stage_index, self.stage = snap.stage_index, stages[snap.stage_index]
        log.info("stage cache: reused %s (stages %s)", cache.path(key), ", ".join(self.order[: snap.stage_index + 1]))
        if self.checkpointing and resume.is_global_zero():  # the run's own resume point
            self.save_snapshot(snapshot.stage_dir(self.checkpoints, snap.stage_index, self.stage.name))
        return True

    def check_stage(self, stage: Stage, sparsity_before: dict) -> None:
        """No NaN/Inf weights, every pruned weight still zero, no layer less sparse than before the stage."""
        last_good = str(self.last_snapshot.directory) if self.last_snapshot is not None else None
        for model in (self.student, self.teacher if stage.kind == "teacher" else None):
            if model is not None:
                integrity.check_finite(model, stage.name, last_good)
        if self.student is not None:
            integrity.check_masks_hold(self.student, self.masks, stage.name)
            integrity.check_sparsity_kept(sparsity_before, integrity.layer_sparsity(self.student, sparsity_before), stage.name)

    # ---- snapshots (format: dpq.snapshot) --------------------------------------------------------
    def save_snapshot(self, directory: Path | str) -> snapshot.Snapshot:
        """Write the run's state after the current stage into ``directory``; the manifest goes last.

        Holds the student (``dpq.checkpoints.save_model``: shrunk and quantized models too), the
        teacher (linked from the snapshot that saved it first), the masks, the teacher's logit
        cache, the records, the quantized flag, the stage index and every fit's step count. No
        RNG state: each stage re-seeds with ``seed + index``.
        """
        same_teacher = self._teacher_snapshot is not None and self._teacher_snapshot[0] is self.teacher
        stage = self.stage
        manifest = {"stage_index": self.stage_index, "stage": stage.name if stage else None, "kind": stage.kind if stage else None,
                    "order": list(self.order), "quantized": self.quantized, "records": self.records,
                    "fit_steps": dict(self.fit_steps), "seed": self.cfg_dict.get("seed")}
        snap = snapshot.write(directory, json.loads(json.dumps(manifest, default=str)), student=self.student, teacher=self.teacher,
                              teacher_from=self._teacher_snapshot[1] if same_teacher else None, masks=self.masks,
                              teacher_logits=snapshot.cache_state(snapshot.teacher_caches(self.teacher_logits)) or None)
        if self.teacher is not None:
            self._teacher_snapshot = (self.teacher, snap)
        self.last_snapshot = snap
        return snap

    def load_snapshot(self, directory: Path | str) -> snapshot.Snapshot:
        """Restore the state :meth:`save_snapshot` wrote (raises :class:`dpq.snapshot.SnapshotError` if unusable)."""
        from dpq.checkpoints import load_model

        snap = directory if isinstance(directory, snapshot.Snapshot) else snapshot.read(directory)
        m = snap.manifest
        self.records, self.quantized = list(m["records"]), bool(m["quantized"])
        self.fit_steps, self.stage_index = dict(m.get("fit_steps") or {}), snap.stage_index
        self.teacher = self.teacher_logits = None
        if snap.has(snapshot.TEACHER):
            self.set_teacher(load_model(self.teacher_spec, self.task_dict, snap.path(snapshot.TEACHER)))
            ensemble = next((r["ensemble"] for r in self.records if r.get("kind") == "teacher" and r.get("ensemble")), None)
            if ensemble:  # the teacher stage averaged more teachers: rebuild the same ensemble
                from dpq.distill import EnsembleTeacher

                extra = [TeacherLogits(load_model(self.teacher_spec, self.task_dict, Path(p)), self.data.num_train, self.num_labels)
                         for p in ensemble["members"]]
                self.teacher_logits = EnsembleTeacher([self.teacher_logits, *extra], ensemble.get("weights"))
            self._teacher_snapshot = (self.teacher, snap)
        cached = snapshot.load_teacher_logits(snap)
        if cached:
            snapshot.load_cache_state(snapshot.teacher_caches(self.teacher_logits), cached)
        self.student = load_model(self.model_spec, self.task_dict, snap.path(snapshot.STUDENT)) if snap.has(snapshot.STUDENT) else None
        self.masks = snapshot.load_masks(snap)
        self.last_snapshot, self._next_stage = snap, snap.stage_index + 1
        return snap

    def _drop_old_checkpoints(self) -> None:
        """Mid-stage checkpoints of finished stages, and snapshots beyond ``checkpoint.keep_snapshots``, go."""
        for d in self.checkpoints.glob("stage_*_*"):
            if (d / snapshot.MANIFEST).exists():
                shutil.rmtree(d / resume.LIGHTNING, ignore_errors=True)
        if self.keep_snapshots > 0 and self.stage_index is not None:
            for d in self.checkpoints.glob("stage_*_*"):
                idx = int(d.name.split("_")[1]) if d.name.split("_")[1].isdigit() else None
                if idx is not None and idx <= self.stage_index - self.keep_snapshots:
                    shutil.rmtree(d, ignore_errors=True)

    def begin_stage(self) -> None:
        """Start the clock of the next record's ``duration_s`` (composite stages call it per sub-stage)."""
        self._stage_started = time.perf_counter()

    @property
    def final_model(self) -> tuple[nn.Module, str]:
        return (self.student, "student") if self.student is not None else (self.teacher, "teacher")
