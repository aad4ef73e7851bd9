"""Run an ordered list of stages on one student, recording a result after each.

:class:`RunState` is what stages share: the data, the frozen teacher and its logit cache,
the student being compressed, the pruning masks, and the per-stage records that become
results.json. Each stage trains with its own Lightning ``Trainer`` (built from the
``trainer`` config with Hydra's ``instantiate``), its own epochs and learning rate.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from torch import nn

from dpq import cost
from dpq.data import ClassificationDataModule
from dpq.distill import KDConfig, TeacherLogits
from dpq.errors import ConfigError
from dpq.models import build_model
from dpq.module import ClassifierModule
from dpq.pruning import MaskFreeze, Masks
from dpq.selectors import select_linears
from dpq.stages import KDStageConfig, Stage

log = logging.getLogger(__name__)


class RunState:
    def __init__(self, cfg_dict: dict[str, Any], trainer_cfg, data: ClassificationDataModule, tokenizer=None,
                 logger=None, output_dir: Path | str = "."):
        self.cfg_dict, self.trainer_cfg = cfg_dict, trainer_cfg
        self.task_dict, self.model_spec, self.teacher_spec = cfg_dict["task"], cfg_dict["model"], cfg_dict["teacher"]
        self.data, self.tokenizer, self.logger = data, tokenizer, logger
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
        names = select_linears(model, selector)
        if not names:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ConfigError(key, selector, f"matches no nn.Linear module; the model has e.g. {', '.join(linears[:6])}")
        return names

    def _prunable_names(self, model: nn.Module, role: str) -> list[str]:
        """Names the sparsity metric covers: masked modules, else the model's prune targets (fixed once seen)."""
        if role != "teacher" and self.masks:
            return list(self.masks)
        if id(model) not in self._prunable:
            spec = self.teacher_spec if role == "teacher" else self.model_spec
            self._prunable[id(model)] = select_linears(model, spec.get("prune_targets") or [])
        return self._prunable[id(model)]

    # ---- training -----------------------------------------------------------------------
    def make_trainer(self, callbacks=(), **overrides) -> L.Trainer:
        return hydra.utils.instantiate(self.trainer_cfg, callbacks=list(callbacks), logger=self.logger or False,
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
        trainer = self.make_trainer(callbacks, max_epochs=stage.cfg.epochs, max_steps=stage.cfg.max_steps)
        log.info("stage %s (%s): %d epochs, lr %.2e, kd alpha %.2f", stage.name, stage.kind, stage.cfg.epochs, stage.cfg.lr, kd_alpha)
        trainer.fit(module, datamodule=self.data)
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
        if self.logger is not None:
            scalar = {k: v for k, v in {**metrics, **(self.round or {})}.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            try:
                self.logger.log_metrics({f"result/{k}": v for k, v in scalar.items()} | {"result/stage_index": len(self.records) - 1},
                                        step=len(self.records) - 1)
            except Exception as e:  # a tracker failure must not fail the run
                log.warning("logging results failed: %s", e)
        log.info("after %s: accuracy %.4f, sparsity %.3f, effective GFLOPs %.4f", stage.name, metrics["accuracy"],
                 metrics["sparsity"], metrics["effective_gflops"])
        return rec

    def run(self, stages: list[Stage]) -> None:
        seed = int(self.cfg_dict["seed"])
        for i, stage in enumerate(stages):
            # Re-seed per stage: a stage's result must not depend on how much randomness earlier
            # stages drew (a cached teacher draws none), so a warm run reproduces a cold one.
            L.seed_everything(seed + i, workers=True, verbose=False)
            self.begin_stage()
            stage.run(self)

    def begin_stage(self) -> None:
        """Start the clock of the next record's ``duration_s`` (composite stages call it per sub-stage)."""
        self._stage_started = time.perf_counter()

    @property
    def final_model(self) -> tuple[nn.Module, str]:
        return (self.student, "student") if self.student is not None else (self.teacher, "teacher")
