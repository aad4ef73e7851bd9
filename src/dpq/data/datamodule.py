"""LightningDataModule over a :class:`TaskSplits`: tokenization, dynamic padding, loaders."""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from dpq.data.tasks import TaskSplits

log = logging.getLogger(__name__)
CUT_WARN = 0.10  # of the training examples: max_length cutting more than this is said as a warning


def image_batch(rows: list[dict], mean, std) -> dict:
    """uint8 images (H x W or H x W x C) -> normalised float ``pixel_values`` [B, C, H, W], as torchvision's
    ToTensor + Normalize would give; the other columns stacked as tensors."""
    x = torch.from_numpy(np.stack([r["pixel_values"] for r in rows])).float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    out = {"pixel_values": ((x - mean) / std).contiguous()}
    for k in rows[0]:
        if k != "pixel_values":
            out[k] = torch.as_tensor(np.stack([r[k] for r in rows]))
    return out


class ClassificationDataModule(L.LightningDataModule):
    def __init__(
        self,
        splits: TaskSplits,
        tokenizer=None,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        group_by_length: bool = True,
    ):
        super().__init__()
        if splits.kind == "text" and tokenizer is None:
            raise ValueError("a text task needs a tokenizer")
        self.splits, self.tokenizer = splits, tokenizer
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.num_workers, self.group_by_length = num_workers, group_by_length
        self._encoded: dict = {}
        self._train_lengths: list[int] | None = None

    @classmethod
    def for_task(
        cls, splits: TaskSplits, tokenizer, task: dict, group_by_length: bool | None = None
    ) -> ClassificationDataModule:
        """The data module a task config describes (``max_length``, batch sizes, ``group_by_length``
        unless given: evaluation-only callers pass False)."""
        return cls(
            splits,
            tokenizer,
            max_length=int(task.get("max_length") or 64),  # text tasks state it (dpq.run.validate)
            batch_size=int(task["batch_size"]),
            eval_batch_size=int(task["eval_batch_size"]),
            group_by_length=bool(task.get("group_by_length", True))
            if group_by_length is None
            else group_by_length,
        )

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
                    return self.tokenizer(
                        b["text"],
                        b["text_pair"] if pair else None,
                        truncation=True,
                        max_length=self.max_length,
                    )

                ds = ds.map(
                    encode,
                    batched=True,
                    remove_columns=[c for c in ("text", "text_pair") if c in ds.column_names],
                    desc=f"tokenize {split}",
                )
            ds = ds.rename_column("label", "labels")
            if self.splits.kind == "image":
                # numpy rows are ~3x faster to fetch than torch-formatted ones; image_batch converts.
                ds = ds.rename_column("image", "pixel_values").with_format("numpy")
            else:
                ds = ds.with_format("torch")
            self._encoded[split] = ds

    def cut_by_max_length(self) -> tuple[int, int]:
        """``(cut, n)``: training examples whose tokens fill ``max_length`` (cut there, or exactly that
        long), of ``n``. (0, 0) for tasks without text."""
        if self.splits.kind != "text":
            return 0, 0
        lengths = self.train_lengths()
        return sum(n >= self.max_length for n in lengths), len(lengths)

    def train_lengths(self) -> list[int]:
        """Tokens per training example after the cut (for length grouping and :meth:`cut_by_max_length`)."""
        self.setup()
        if self._train_lengths is None:
            self._train_lengths = [len(ids) for ids in self._encoded["train"].with_format(None)["input_ids"]]
        return self._train_lengths

    def say_cut(self) -> None:
        """How many training texts ``task.max_length`` cuts, said once as a run starts: the tokenizer
        truncates without a word, and a short max_length (chosen for speed) trains and measures on the
        first words only (rotten_tomatoes: 0.1% at 64 tokens, 33% at 32, 84% at 16)."""
        cut, n = self.cut_by_max_length()
        if not n:
            return
        share = cut / n
        said = (
            f"task.max_length={self.max_length}: {cut} of {n} training examples ({share:.1%}) fill it "
            "(cut there, or exactly that long)"
        )
        if share >= CUT_WARN:
            log.warning("%s; a larger max_length keeps the rest of their words", said)
        else:
            log.info("%s", said)

    def _collate(self, rows: list[dict]) -> dict:
        if self.splits.kind == "image":
            return image_batch(rows, self.splits.image_mean, self.splits.image_std)
        if self.splits.kind != "text":
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        # Dynamic padding to the longest sequence of the batch (cheaper than max_length on CPU).
        return self.tokenizer.pad(rows, return_tensors="pt")

    def _loader(self, split: str, shuffle: bool, batch_size: int, sampler=None) -> DataLoader:
        self.setup()
        return DataLoader(
            self._encoded[split],
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=self._collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.group_by_length and self.splits.kind == "text":
            # Shuffled mega-batches sorted by length (transformers' group_by_length): batches of
            # similar lengths pad less, which roughly halves a CPU step on short sentences.
            from transformers.trainer_pt_utils import LengthGroupedSampler

            lengths = self.train_lengths()
            gen = torch.Generator().manual_seed(
                int(torch.randint(0, 2**31 - 1, (1,)))
            )  # follows the stage's seed
            sampler = LengthGroupedSampler(self.batch_size, lengths=lengths, generator=gen)
        return self._loader("train", True, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
