"""LightningDataModule over a :class:`TaskSplits`: tokenization, dynamic padding, loaders."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from dpq.data.tasks import TaskSplits

NON_INPUT_KEYS = ("labels", "idx")


def model_inputs(batch: dict) -> dict:
    """The part of a batch that is fed to the model (everything but labels and the example index)."""
    return {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}


class ClassificationDataModule(L.LightningDataModule):
    def __init__(self, splits: TaskSplits, tokenizer=None, max_length: int = 64, batch_size: int = 32,
                 eval_batch_size: int = 128, num_workers: int = 0, group_by_length: bool = True):
        super().__init__()
        if splits.kind == "text" and tokenizer is None:
            raise ValueError("a text task needs a tokenizer")
        self.splits, self.tokenizer = splits, tokenizer
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.num_workers, self.group_by_length = num_workers, group_by_length
        self._encoded: dict = {}

    @property
    def num_train(self) -> int:
        return len(self.splits.train)

    def setup(self, stage: str | None = None) -> None:
        if self._encoded:
            return
        for split in ("train", "validation", "test"):
            ds = getattr(self.splits, split)
            if self.splits.kind == "text":
                pair = "text_pair" in ds.column_names

                def encode(b, pair=pair):
                    return self.tokenizer(b["text"], b["text_pair"] if pair else None, truncation=True, max_length=self.max_length)

                ds = ds.map(encode, batched=True, remove_columns=[c for c in ("text", "text_pair") if c in ds.column_names],
                            desc=f"tokenize {split}")
            ds = ds.rename_column("label", "labels").with_format("torch")
            self._encoded[split] = ds

    def _collate(self, rows: list[dict]) -> dict:
        if self.splits.kind != "text":
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        # Dynamic padding to the longest sequence of the batch (cheaper than max_length on CPU).
        return self.tokenizer.pad(rows, return_tensors="pt")

    def _loader(self, split: str, shuffle: bool, batch_size: int, sampler=None) -> DataLoader:
        self.setup()
        return DataLoader(self._encoded[split], batch_size=batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, collate_fn=self._collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.group_by_length and self.splits.kind == "text":
            # Shuffled mega-batches sorted by length (transformers' group_by_length): batches of
            # similar lengths pad less, which roughly halves a CPU step on short sentences.
            from transformers.trainer_pt_utils import LengthGroupedSampler

            self.setup()
            lengths = [len(ids) for ids in self._encoded["train"].with_format(None)["input_ids"]]
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))  # follows the stage's seed
            sampler = LengthGroupedSampler(self.batch_size, lengths=lengths, generator=gen)
        return self._loader("train", True, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
