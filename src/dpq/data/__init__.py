"""Tasks (labelled splits from embedded or hub sources) and their Lightning data module."""

from dpq.data.module import ClassificationDataModule, model_inputs
from dpq.data.tasks import TaskSplits, load_task

__all__ = ["ClassificationDataModule", "TaskSplits", "load_task", "model_inputs"]
