"""The LightningModule every stage trains: a classifier with an optional distillation term.

One module class serves all stages; what differs between stages (teacher or not, learning
rate, which callbacks hold masks or fake-quantize weights) is configuration, so the
pipeline can reorder stages freely.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dpq.data import model_inputs
from dpq.distill import KDConfig, TeacherLogits, kd_loss


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**model_inputs(batch))
    return getattr(out, "logits", out)


class ClassifierModule(L.LightningModule):
    def __init__(self, model: nn.Module, num_labels: int, stage: str, lr: float = 5e-5, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.06, kd: KDConfig | None = None, teacher: TeacherLogits | None = None):
        super().__init__()
        self.model, self.stage = model, stage
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.kd = kd or KDConfig(alpha=0.0)
        self.teacher = teacher
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")

    def on_fit_start(self) -> None:
        # from_pretrained returns models in eval mode and Lightning keeps each module's mode:
        # without this, fine-tuning would silently run without dropout.
        self.model.train()
        if self.teacher is not None:
            self.teacher.to(self.device)

    def forward(self, batch: dict) -> torch.Tensor:
        return logits_of(self.model, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        t_logits = None
        if self.teacher is not None and self.kd.alpha > 0:
            t_logits = self.teacher(model_inputs(batch), batch["idx"])
        loss, parts = kd_loss(logits, t_logits, batch["labels"], self.kd)
        bs = batch["labels"].shape[0]
        self.log(f"{self.stage}/train_loss", loss, prog_bar=True, batch_size=bs)
        for k, v in parts.items():
            self.log(f"{self.stage}/train_{k}", v, batch_size=bs)
        return loss

    def _eval_step(self, batch: dict, split: str, metric: MulticlassAccuracy) -> None:
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        metric.update(logits, batch["labels"])
        bs = batch["labels"].shape[0]
        self.log(f"{self.stage}/{split}_loss", loss, prog_bar=split == "val", batch_size=bs)
        self.log(f"{self.stage}/{split}_acc", metric, prog_bar=split == "val", batch_size=bs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)

        def linear_warmup_decay(step: int) -> float:  # a pure function of the step: resume needs only the step
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
