"""The run's services to its stages: build models, train (``fit``), evaluate, record a result.

A stage's ``run(state, ctx)`` reads and writes the passive :class:`~dpq.run.state.State` and
does its work through this object. Each fit gets its own Lightning ``Trainer`` (built from the
``trainer`` config with Hydra's ``instantiate``), its own epochs and learning rate, the masks
held fixed (:class:`~dpq.prune.callbacks.MaskFreeze`) and, when the runner says where
(``stage_dir``), checkpoints every ``checkpoint.every_n_steps`` steps (:mod:`dpq.run.resume`).
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import OmegaConf
from torch import nn

from dpq import cost, latency_process
from dpq import metrics as task_metrics
from dpq.core import devices
from dpq.core.distributed import barrier, is_global_zero
from dpq.core.errors import ConfigError
from dpq.core.provenance import GitState, capture_git
from dpq.core.selectors import select_prunable
from dpq.data import ClassificationDataModule
from dpq.distill.losses import KDConfig
from dpq.distill.module import ClassifierModule, log_name
from dpq.loggers import build_logger, tolerant
from dpq.models import build_model, load_model, skeleton
from dpq.prune.callbacks import MaskFreeze
from dpq.run import records, resume
from dpq.run.state import State
from dpq.stages import KDStageConfig, Stage

log = logging.getLogger(__name__)


def tracker_settings(cfg: dict) -> dict:
    """``cfg["logger"]`` with W&B's ``group`` defaulted to the run's configuration, seeds aside: the
    pipeline, task and model names and the key ``dpq.pareto`` merges seeds by (a point of the front), so a
    dashboard groups a configuration's seeds and an ablation's points never share a group. Run names alone
    cannot: a grid's sparsities, or two experiments of one pipeline, give the same name."""
    logger = dict(cfg.get("logger") or {})
    if logger.get("kind") == "wandb" and not logger.get("group"):
        from dpq.pareto.gather import config_key, identity

        names = [str((cfg.get(k) or {}).get("name", "?")) for k in ("pipeline", "task", "model")]
        logger["group"] = "-".join([*names, config_key(identity(cfg))])
    return logger


class RunContext:
    def __init__(
        self,
        cfg: dict[str, Any],
        trainer_cfg,
        data: ClassificationDataModule,
        tokenizer=None,
        logger=None,
        output_dir: Path | str = ".",
    ):
        self.cfg, self.trainer_cfg = cfg, trainer_cfg
        self.task, self.model_spec, self.teacher_spec = cfg["task"], cfg["model"], cfg["teacher"]
        self.data, self.tokenizer = data, tokenizer
        self.logger = logger
        self.tracker = tolerant(
            logger
        )  # every call to the tracker goes through this: a failing one never ends the run
        self.output_dir = Path(output_dir)
        ck = dict(cfg.get("checkpoint") or {})
        self.every_n_steps, self.keep_checkpoints = int(ck.get("every_n_steps", 100)), int(ck.get("keep", 2))
        self.stage_dir: Path | None = (
            None  # set by the runner: where the current stage's fits checkpoint (None: not at all)
        )
        self._stage_started = time.perf_counter()
        self.git: dict = {}  # the code's git state when this process started (RunContext.open)
        self.git_earlier_starts: list[dict] = []  # a resumed run: the states its earlier starts recorded
        self._prunable: dict[str, list[str]] = {}  # role -> sparsity layers (prunable_names)

    @classmethod
    def open(
        cls, cfg: dict[str, Any], splits, tokenizer, output_dir: Path, git: GitState | None = None
    ) -> RunContext:
        """The context of a run starting (or resuming) in ``output_dir``: its data module and tracker.

        ``git``: the state of the code captured when the process started (default: now); recorded
        under ``<run>/provenance/`` before any training, and reported in results.json."""
        task = cfg["task"]
        data = ClassificationDataModule.for_task(splits, tokenizer, task)
        if is_global_zero():
            data.say_cut()
        output_dir.mkdir(parents=True, exist_ok=True)
        git = git if git is not None else capture_git()
        earlier = records.git_starts(output_dir)
        started = records.save_provenance(output_dir, git) if is_global_zero() else dict(git.info)
        logger = build_logger(tracker_settings(cfg), output_dir, cfg["run_name"], cfg)
        ctx = cls(cfg, OmegaConf.create(cfg["trainer"]), data, tokenizer, logger, output_dir)
        ctx.git, ctx.git_earlier_starts = started, earlier
        return ctx

    def close(self, summary: dict | None = None) -> None:
        """End the tracker's run (W&B gets ``summary``)."""
        if self.tracker is not None:
            self.tracker.close(summary)

    # ---- models -------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return int(self.task["num_labels"])

    @property
    def label_names(self) -> list[str]:
        return [str(n) for n in self.task.get("label_names") or range(self.num_labels)]

    @property
    def metrics(self) -> list[str]:
        """The task's metrics (``task.metrics``, ``task.primary_metric``, accuracy), each evaluated per split."""
        return task_metrics.task_metrics(self.task)

    @property
    def trainer_device(self) -> str:
        return devices.trainer_device(self.cfg["trainer"])

    @property
    def latency_device(self) -> str:
        return devices.latency_device(self.cfg["cost"])

    @property
    def latency_process(self) -> str:
        """``cost.latency_process``: latency timed in a fresh process (``separate``) or in this one."""
        return self.cfg["cost"].get("latency_process") or latency_process.default_process()

    def build_teacher(self) -> nn.Module:
        return build_model(self.teacher_spec, self.task, "teacher")

    def load_model(self, role: str, directory: Path) -> nn.Module:
        """A saved teacher or student (``role``) folder, as :func:`dpq.models.save_model` wrote it."""
        return load_model(
            self.teacher_spec if role == "teacher" else self.model_spec, self.task, Path(directory)
        )

    def ensure_student(self, state: State) -> nn.Module:
        if state.student is None:
            source = None
            if self.model_spec.get("init") == "from_teacher":
                source = state.teacher if state.teacher is not None else self.build_teacher()
            state.student = build_model(self.model_spec, self.task, "model", teacher=source)
        return state.student

    # ---- training -----------------------------------------------------------------------
    def make_trainer(self, callbacks=(), **overrides) -> L.Trainer:
        kwargs = dict(logger=self.tracker or False, default_root_dir=str(self.output_dir))
        return hydra.utils.instantiate(self.trainer_cfg, callbacks=list(callbacks), **{**kwargs, **overrides})

    def module_for(
        self, state: State | None, model: nn.Module, stage_name: str, stage_cfg=None, kd_alpha: float = 0.0
    ) -> ClassifierModule:
        kd = (
            KDConfig(alpha=kd_alpha, temperature=getattr(stage_cfg, "temperature", 1.0))
            if kd_alpha > 0
            else None
        )
        features = stage_cfg.feature_kd() if isinstance(stage_cfg, KDStageConfig) else None
        wants_teacher = kd_alpha > 0 or (features is not None and features.active)
        kw = {}
        if stage_cfg is not None:
            kw = dict(
                lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay, warmup_ratio=stage_cfg.warmup_ratio
            )
        teacher = state.teacher_logits if (wants_teacher and state is not None) else None
        return ClassifierModule(
            model,
            self.num_labels,
            stage_name,
            kd=kd,
            features=features,
            teacher=teacher,
            metrics=self.metrics,
            positive=task_metrics.positive_index(self.task, self.label_names),
            **kw,
        )

    def fit(
        self,
        state: State,
        model: nn.Module,
        stage: Stage,
        kd_alpha: float = 0.0,
        callbacks=(),
        freeze_masks: bool = True,
    ) -> L.Trainer:
        """Train ``model`` for ``stage`` (its epochs, lr, KD weight); masks held fixed unless ``freeze_masks=False``."""
        callbacks = list(callbacks)
        if self.tracker:  # the schedule each stage trained with, beside its losses (Lightning needs a logger)
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if freeze_masks and state.masks:
            callbacks.append(MaskFreeze(f"{stage.name}.masks", state.masks))
        if stage.uses_teacher and state.teacher_logits is None:
            raise ConfigError(
                f"{stage.key}.alpha", kd_alpha, "needs a teacher, and none was trained or loaded"
            )
        module = self.module_for(state, model, stage.name, stage.cfg, kd_alpha)
        # ResumeState carries what Lightning's checkpoint lacks (RNG streams, data position, teacher cache).
        carry = resume.ResumeState(stage.name, None, 1, module.teacher)
        callbacks.append(carry)
        ckpt_path, extra = None, {}
        if self.stage_dir is not None and self.every_n_steps > 0:
            fit_dir = resume.fit_dir(self.stage_dir, stage.name)
            ckpt_path = resume.newest_checkpoint(fit_dir)
            callbacks.append(resume.StageCheckpoint(fit_dir, self.every_n_steps, self.keep_checkpoints))
            extra = dict(enable_checkpointing=True, plugins=[resume.AtomicCheckpointIO()])
        trainer = self.make_trainer(
            callbacks,
            # epochs < 1 with max_steps > 0 trains max_steps (StageConfig.check); Lightning's
            # max_epochs=0 stopped the fit before its first step
            max_epochs=stage.cfg.epochs if stage.cfg.epochs >= 1 else -1,
            max_steps=stage.cfg.max_steps,
            **extra,
        )
        loader, seed = self.data.train_dataloader(), int(torch.randint(0, 2**31 - 1, (1,)))
        if trainer.world_size == 1:
            # The data order becomes a pure function of (seed, epoch), so a resumed fit sees the batches
            # the uninterrupted one would have. (Under DDP, Lightning's DistributedSampler orders the
            # data; a mid-epoch resume there restarts the epoch's order.)
            loader, carry.sampler = resume.resumable_loader(loader, seed)
            carry.batch_size = loader.batch_size or 1
        log.info(
            "stage %s (%s): %s, lr %.2e, kd alpha %.2f%s",
            stage.name,
            stage.kind,
            trains_for(stage.cfg.epochs, stage.cfg.max_steps),
            stage.cfg.lr,
            kd_alpha,
            f"; resuming from {ckpt_path}" if ckpt_path else "",
        )
        with warnings.catch_warnings():
            # Mid-epoch resume is exact here (ResumableSampler skips the batches already seen).
            warnings.filterwarnings(
                "ignore", message=".*resuming from a checkpoint that ended before the epoch ended"
            )
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            # weights_only=False: the checkpoint is this run's own, and callback states (RNG streams,
            # schedules) hold more than tensors.
            trainer.fit(
                module,
                train_dataloaders=loader,
                val_dataloaders=self.data.val_dataloader(),
                ckpt_path=str(ckpt_path) if ckpt_path else None,
                weights_only=False,
            )
        state.fit_steps[stage.name] = int(trainer.global_step)
        return trainer

    def evaluate(self, model: nn.Module, stage_name: str) -> dict[str, float]:
        """The task's metrics (torchmetrics; accuracy always) and cross-entropy on the test split
        (``accuracy``, ``f1``, ...) and the validation split (``val_accuracy``, ``val_f1``, ...)."""
        module = self.module_for(None, model, stage_name)
        # Every rank evaluates the whole split: a DistributedSampler would pad the shards with repeated
        # examples (64 test examples on 3 ranks were scored as 66), so under DDP the recorded accuracy
        # would not be the split's. The synced metrics and losses of identical ranks are the split's own.
        # Not logged: a fresh trainer logs at step 0, so each stage's final scores landed at the start of its
        # curves (TensorBoard, W&B); the tracker gets them as result/* at the stage's step (log_record).
        trainer = self.make_trainer(enable_progress_bar=False, use_distributed_sampler=False, logger=False)
        test = trainer.test(module, dataloaders=self.data.test_dataloader(), verbose=False)[0]
        val = trainer.validate(module, dataloaders=self.data.val_dataloader(), verbose=False)[0]
        out = {
            "accuracy": float(test[f"{stage_name}/test_acc"]),
            "loss": float(test[f"{stage_name}/test_loss"]),
            "val_accuracy": float(val[f"{stage_name}/val_acc"]),
            "val_loss": float(val[f"{stage_name}/val_loss"]),
        }
        for name in self.metrics:
            if name != "accuracy":
                out[name] = float(test[f"{stage_name}/test_{log_name(name)}"])
        for name in self.metrics:
            if name != "accuracy":
                out[f"val_{name}"] = float(val[f"{stage_name}/val_{log_name(name)}"])
        return out

    # ---- results ------------------------------------------------------------------------
    def example_inputs(self) -> dict:
        return cost.task_inputs(self.task, self.cfg["cost"], self.tokenizer)

    def prunable_names(self, state: State, model: nn.Module, role: str) -> list[str]:
        """Names the sparsity metric covers, taken from the config so that a stage that ran and the same
        stage restored from the cache report the same figure: the masked modules once a stage has
        pruned (the prune stages' targets; masks are restored with the state), else the model's
        ``prune_targets`` selected on its architecture as the config builds it. Selecting on the
        live model instead would miss modules that quantization has converted (no longer
        ``nn.Linear``) in a model restored after its quantize stage."""
        if role != "teacher" and state.masks:
            return list(state.masks)
        if role not in self._prunable:
            spec, key = (self.teacher_spec, "teacher") if role == "teacher" else (self.model_spec, "model")
            source = state.teacher if role != "teacher" and spec.get("init") == "from_teacher" else None
            with torch.random.fork_rng(devices=[]):  # dpq's own models are built for real: draw no randomness
                arch = skeleton(spec, self.task, key, teacher=source)
            selector = spec.get("prune_targets") or []
            if arch is None:  # the architecture cannot be built from the config alone here
                log.debug("sparsity layers of the %s: selected on the live model", role)
                arch = model
            have = dict(model.named_modules())
            self._prunable[role] = [n for n in select_prunable(arch, selector) if n in have]
        return self._prunable[role]

    def begin_stage(self) -> None:
        """Start the clock of the next record's ``duration_s`` (composite stages call it per sub-stage)."""
        self._stage_started = time.perf_counter()

    def record(
        self, state: State, stage: Stage, model: nn.Module, role: str = "student", extra: dict | None = None
    ) -> dict:
        """Evaluate and measure ``model`` after ``stage``; append the record to ``state.records`` and log it."""
        metrics = self.evaluate(model, stage.name)
        c = self.cfg["cost"]
        timed = {"warmup": int(c["warmup"]), "repeats": int(c["repeats"]), "device": self.latency_device}

        def measure(latency_kwargs: dict) -> dict:
            return cost.measure(
                model,
                self.example_inputs(),
                self.prunable_names(state, model, role),
                latency_kwargs=latency_kwargs,
                latency_fn=functools.partial(latency_process.latency, process=self.latency_process),
            )

        # DDP: rank 0 (whose record is written) times the model while the other ranks wait, then they take
        # a one-call measurement of their own; timed side by side, the ranks would share the cores (on
        # CPU) and inflate the recorded latency. A single process just measures.
        barrier()
        if is_global_zero():
            metrics.update(measure(timed))
        barrier()
        if not is_global_zero():
            metrics.update(measure({**timed, "warmup": 0, "repeats": 1}))  # not recorded: rank 0 writes
        rec = {
            "stage": stage.name,
            "kind": stage.kind,
            "model": role,
            "quantized": state.quantized and role != "teacher",
            "duration_s": time.perf_counter() - self._stage_started,
            **(state.round or {}),
            "metrics": metrics,
            **(extra or {}),
        }
        state.records.append(rec)
        self.log_record(rec, len(state.records) - 1)
        primary = task_metrics.primary_metric(self.task)
        log.info(
            "after %s: accuracy %.4f%s, sparsity %.3f, effective GFLOPs %.4f",
            stage.name,
            metrics["accuracy"],
            f", {primary} {metrics[primary]:.4f}" if primary != "accuracy" else "",
            metrics["sparsity"],
            metrics["effective_gflops"],
        )
        return rec

    def log_record(self, rec: dict, index: int) -> None:
        """A stage record's numbers to the tracker as ``result/*`` at step ``index`` (the stage's position):
        for a stage that trained here, and for one restored from the stage cache, so every run's history
        has every stage whichever of them the cache served."""
        round_keys = ("round", "round_target")
        scalar = {
            k: v
            for k, v in {**rec["metrics"], **{k: rec[k] for k in round_keys if k in rec}}.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.log_metrics({**scalar, "stage_index": index, "cached": int(bool(rec.get("cached")))}, step=index)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """``result/<name>`` values to the tracker (a failing tracker is dropped, never fatal)."""
        if self.tracker is not None:
            self.tracker.log_metrics({f"result/{k}": v for k, v in values.items()}, step=step)


def trains_for(epochs: int, max_steps: int) -> str:
    """A fit's length in the log: its epochs, ``max_steps`` where that caps them (or replaces them)."""
    if epochs < 1:
        return f"{max_steps} steps"
    said = f"{epochs} epoch{'' if epochs == 1 else 's'}"
    return said + (f", at most {max_steps} steps" if max_steps > 0 else "")
