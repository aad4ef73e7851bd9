"""The LightningModule every stage trains: a classifier with an optional distillation term.

One module class serves all stages; what differs between stages (teacher or not, learning
rate, which callbacks hold masks or fake-quantize weights) is configuration, so the
pipeline can reorder stages freely.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import MeanMetric

from dpq import metrics as task_metrics
from dpq.core.errors import TrainingDiverged
from dpq.core.nn import logits_of, model_inputs
from dpq.distill.features import (
    FeatureKDConfig,
    HiddenProjection,
    attention_dropouts,
    feature_kd_loss,
    resolve_layer_map,
    say_again,
)
from dpq.distill.losses import KDConfig, kd_loss
from dpq.distill.teachers import TeacherSignal

log = logging.getLogger(__name__)


def log_name(metric: str) -> str:
    """What a metric is logged as after ``<stage>/<split>_``: accuracy keeps its short name ``acc``."""
    return "acc" if metric == "accuracy" else metric


class ClassifierModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        num_labels: int,
        stage: str,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        kd: KDConfig | None = None,
        teacher: TeacherSignal | None = None,
        features: FeatureKDConfig | None = None,
        metrics: tuple[str, ...] | list[str] = ("accuracy",),
        positive: int = 1,
    ):
        super().__init__()
        self.model, self.stage = model, stage
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.kd = kd or KDConfig(alpha=0.0)
        self.teacher = teacher
        self.features = features if features is not None and features.active else None
        self.kd_projection: HiddenProjection | None = None
        self._attn_impl: dict = {}
        self._attn_dropout: dict = {}  # attention-probability dropouts switched off (attention transfer) -> p
        if self.features is not None:
            # Intermediate terms need the teacher's hidden states, so it runs every step (no logit cache).
            tmodel = getattr(teacher, "teacher", None)
            if tmodel is None or not hasattr(model, "config") or not hasattr(tmodel, "config"):
                raise ValueError(
                    "hidden/attention/relation distillation needs a Hugging Face student and a single teacher model"
                )
            say_again()  # this stage's head-averaged attention maps, if any, are said once more
            n_s, n_t = model.config.num_hidden_layers, tmodel.config.num_hidden_layers
            self.layer_map = resolve_layer_map(self.features.layer_map, n_s, n_t)
            if self.features.hidden > 0:
                self.kd_projection = HiddenProjection(
                    model.config.hidden_size, tmodel.config.hidden_size, n_s
                )
        # The task's metrics (dpq.metrics) on each evaluated split; logged as <stage>/<split>_<name>.
        self.val_metrics = nn.ModuleDict(task_metrics.build(list(metrics), num_labels, positive))
        self.test_metrics = nn.ModuleDict(task_metrics.build(list(metrics), num_labels, positive))
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()  # cross-entropy per split (_eval_step)
        self._val_position = 0

    def on_fit_start(self) -> None:
        # from_pretrained returns models in eval mode and Lightning keeps each module's mode:
        # without this, fine-tuning would silently run without dropout.
        self.model.train()
        if self.teacher is not None:
            self.teacher.to(self.device)
        if self.features is not None and self.features.needs_attentions:
            # Only eager attention returns attention maps in transformers 5; restored at fit end.
            for m in (self.model, self.teacher.teacher):
                self._attn_impl[m] = m.config._attn_implementation
                m.set_attn_implementation("eager")
            # ... and returns them after the attention-probability dropout: the student's maps would be
            # compared with dropped entries and rescaled rows. Off while this stage trains, restored after.
            for d in attention_dropouts(self.model):
                if d.p > 0:
                    self._attn_dropout[d] = d.p
                    d.p = 0.0
            if self._attn_dropout:
                log.info(
                    "%s: attention transfer: the student's attention-probability dropout (p=%s) is off "
                    "during this stage (eager attention returns the maps after it)",
                    self.stage,
                    ", ".join(sorted({f"{p:g}" for p in self._attn_dropout.values()})),
                )

    def on_fit_end(self) -> None:
        for m, impl in self._attn_impl.items():
            m.set_attn_implementation(impl)
        self._attn_impl.clear()
        for d, p in self._attn_dropout.items():
            d.p = p
        self._attn_dropout.clear()

    def forward(self, batch: dict) -> torch.Tensor:
        return logits_of(self.model, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.features is not None:
            loss, parts = self._feature_step(batch)
        else:
            logits = self(batch)
            t_logits = t_logp = None
            if self.teacher is not None and self.kd.alpha > 0:
                if hasattr(self.teacher, "log_probs"):  # an ensemble: averaged soft labels
                    t_logp = self.teacher.log_probs(model_inputs(batch), batch["idx"], self.kd.temperature)
                else:
                    t_logits = self.teacher(model_inputs(batch), batch["idx"])
            loss, parts = kd_loss(logits, t_logits, batch["labels"], self.kd, teacher_log_probs=t_logp)
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise TrainingDiverged(
                f"stage '{self.stage}', step {self.global_step}: loss is {float(loss)} ({detail}); "
                f"lower pipeline.stages.{self.stage.split('.')[0]}.lr or check the data"
            )
        bs = batch["labels"].shape[0]
        self.log(f"{self.stage}/train_loss", loss, prog_bar=True, batch_size=bs)
        for k, v in parts.items():
            self.log(f"{self.stage}/train_{k}", v, batch_size=bs)
        return loss

    def _feature_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        inputs = model_inputs(batch)
        want = dict(
            output_hidden_states=self.features.needs_hidden, output_attentions=self.features.needs_attentions
        )
        s_out = self.model(**inputs, **want)
        with torch.no_grad():
            t_out = self.teacher.teacher(**inputs, **want)
        loss, parts = kd_loss(
            s_out.logits, t_out.logits if self.kd.alpha > 0 else None, batch["labels"], self.kd
        )
        f_loss, f_parts = feature_kd_loss(
            self.features, s_out, t_out, inputs.get("attention_mask"), self.kd_projection
        )
        return loss + f_loss, {**parts, **f_parts}

    def on_validation_epoch_start(self) -> None:
        self._val_position = 0  # examples of this rank's shard read so far (padding_mask)

    def padding_mask(self, n: int) -> torch.Tensor | None:
        """Which of the next ``n`` validation examples are the split's own, under DDP during fit: Lightning's
        DistributedSampler (shuffle off for validation) pads the split to a multiple of the ranks with the first
        examples again, the last position of some ranks, and the synced metrics would count them (65 examples
        on 2 ranks scored as 66: the fit-time curve read 25/66 where the evaluation read 25/65). Position j of
        rank r is example ``r + j * ranks`` of the padded order, a repeat once that reaches the split's length.
        An unpadded sampler instead would give the ranks unequal batch counts, and DDP's forward (which every
        validation step runs during fit) syncs buffers: a rank with one batch more would wait forever.
        None when nothing is padded (one process; ``evaluate``, where every rank reads the whole split)."""
        from torch.utils.data import DistributedSampler

        sampler = getattr(self.trainer.val_dataloaders, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.shuffle or sampler.drop_last:
            return None
        total = len(sampler.dataset)
        if sampler.total_size == total:
            return None
        start, self._val_position = self._val_position, self._val_position + n
        position = sampler.rank + sampler.num_replicas * torch.arange(start, start + n)
        return position < total

    def _eval_step(self, batch: dict, split: str, metrics: nn.ModuleDict) -> None:
        logits, labels = self(batch).float(), batch["labels"]
        keep = self.padding_mask(labels.shape[0]) if split == "val" else None
        if keep is not None and not keep.all():
            keep = keep.to(labels.device)
            logits, labels = logits[keep], labels[keep]
        bs = labels.shape[0]
        # A torchmetrics mean, weighted by the batch: under DDP its sums are synced, so the logged loss is the
        # split's. (Lightning's own sync_dist mean divides by the ranks' mean batch count as an integer: with
        # 33 and 32 examples it divided by 32, and a loss of 0.6980 was logged as 0.7089; Lightning-AI/
        # pytorch-lightning issue 21859, open in Lightning 2.6.)
        # A batch of repeats only (a split smaller than the ranks) updates nothing but is still logged: every
        # rank must reach the epoch-end sync of every logged metric.
        mean = self.val_loss if split == "val" else self.test_loss
        if bs:
            mean.update(F.cross_entropy(logits, labels).detach(), weight=bs)
        self.log(f"{self.stage}/{split}_loss", mean, prog_bar=split == "val", batch_size=max(bs, 1))
        for name, metric in metrics.items():
            if bs:
                metric.update(logits, labels)
            self.log(
                f"{self.stage}/{split}_{log_name(name)}",
                metric,
                prog_bar=split == "val" and name == "accuracy",
            )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.parameters():  # the model, and the KD projection when there is one
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        opt = torch.optim.AdamW(
            [
                # named: LearningRateMonitor logs <stage>/lr/decay and <stage>/lr/no_decay
                {"params": decay, "weight_decay": self.weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
            ],
            lr=self.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)

        def linear_warmup_decay(
            step: int,
        ) -> float:  # a pure function of the step: resume needs only the step
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": "step", "name": f"{self.stage}/lr"},
        }
