"""Tasks (labelled splits from local files, embedded or hub sources) and their Lightning data module."""

from dpq.core.nn import model_inputs
from dpq.data.datamodule import ClassificationDataModule
from dpq.data.tasks import TaskSplits, labelled, load_task, recorded_task

__all__ = ["ClassificationDataModule", "TaskSplits", "labelled", "load_task", "model_inputs", "recorded_task"]
