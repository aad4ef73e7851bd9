"""Examples shared between splits: a validation or test input that also appears in train.

Such a copy is scored on an example the model was fitted to, so it flatters the split that holds it
(and choosing recipes on validation then rewards memorising). Public sets are not free of them
(the embedded Rotten Tomatoes copy has one validation sentence that is also in train), and a user's
own files can hold many, so every run counts them, records the counts in results.json
(``task.overlap``) and, by ``task.overlap``, warns, drops the copies from validation and test,
or refuses to run.

A copy is an identical input: the same text (and text pair), the same feature vector or the same
image bytes. Near-duplicates (case, spacing, crops) are not looked for. Neither
``datasets`` nor ``sklearn`` offers a cross-split check, so it is written here: one hash per row,
with Arrow / NumPy reading the columns (about a second for Fashion-MNIST's 70,000 images).
"""

from __future__ import annotations

import hashlib
import logging

import datasets
import numpy as np
import pyarrow as pa

from dpq.core.errors import ConfigError

POLICIES = ("warn", "drop", "error")
log = logging.getLogger(__name__)


def input_keys(ds: datasets.Dataset, kind: str) -> list[bytes]:
    """One digest per row of the model's input (``text`` [+ ``text_pair``], ``features`` or ``image``)."""
    if kind == "text":
        table = ds.with_format("arrow")
        texts = table["text"].to_pylist()
        if "text_pair" in ds.column_names:
            texts = [f"{t}\x00{p}" for t, p in zip(texts, table["text_pair"].to_pylist(), strict=True)]
        return [hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts]
    if kind == "image":  # uint8 pixels (dpq.data.columns)
        arrays = _rows(ds.with_format("arrow")["image"])
    else:  # features reach the model as floats: 1 and 1.0 are one input
        arrays = [np.asarray(a, dtype=np.float64) for a in _rows(ds.with_format("arrow")["features"])]
    return [hashlib.blake2b(a.tobytes(), digest_size=16).digest() for a in arrays]


def _rows(col: pa.Array | pa.ChunkedArray) -> np.ndarray | list[np.ndarray]:
    """A numeric column as one flat array per row, read through Arrow in its stored dtype (the
    ``numpy`` format of datasets would cast uint8 images to int64 and float64 features to float32)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr.type, pa.ExtensionType):  # datasets' Array2D / Array3D (images): nested lists stored
        arr = arr.storage
    n, flat, uniform = len(arr), arr, True
    while (
        pa.types.is_list(flat.type)
        or pa.types.is_large_list(flat.type)
        or pa.types.is_fixed_size_list(flat.type)
    ):
        lengths = flat.value_lengths().to_numpy(zero_copy_only=False)
        uniform = uniform and len(set(lengths.tolist())) <= 1
        flat = flat.flatten()
    if uniform and n and (pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type)):
        return flat.to_numpy(zero_copy_only=False).reshape(n, -1)
    return [np.asarray(v).ravel() for v in arr.to_pylist()]  # ragged or unusual rows: one by one


def _labels(ds: datasets.Dataset) -> list:
    return ds.with_format("arrow")["label"].to_pylist()


def count(keys: dict[str, list[bytes]], labels: dict[str, list]) -> dict:
    """How many validation / test rows have their input in train (``*_other_label``: of those, how many
    carry a label no train copy has), and how many test rows have theirs in validation."""
    train_labels: dict[bytes, set] = {}
    for k, y in zip(keys["train"], labels["train"], strict=True):
        train_labels.setdefault(k, set()).add(y)
    out = {}
    for split in ("validation", "test"):
        hits = [(k, y) for k, y in zip(keys[split], labels[split], strict=True) if k in train_labels]
        out[f"{split}_in_train"] = len(hits)
        out[f"{split}_in_train_other_label"] = sum(y not in train_labels[k] for k, y in hits)
    val = set(keys["validation"])
    out["test_in_validation"] = sum(k in val for k in keys["test"])
    return out


def apply(data: dict[str, datasets.Dataset], kind: str, policy: str, task_name: str) -> tuple[dict, dict]:
    """Check the splits for shared inputs under ``policy`` (``task.overlap``); return the splits
    (copies removed from validation and test when ``drop``) and the record results.json keeps."""
    if policy not in POLICIES:
        raise ConfigError(
            "task.overlap",
            policy,
            f"must be one of {', '.join(POLICIES)} (what to do with validation/test examples whose "
            "input is also in train)",
        )
    keys = {s: input_keys(data[s], kind) for s in ("train", "validation", "test")}
    found = count(keys, {s: _labels(data[s]) for s in keys})
    record = {**found, "policy": policy}
    if not (found["validation_in_train"] or found["test_in_train"] or found["test_in_validation"]):
        return data, record
    n_val, n_test = len(data["validation"]), len(data["test"])
    what = (
        f"task {task_name}: {found['validation_in_train']} of {n_val:,} validation and "
        f"{found['test_in_train']} of {n_test:,} test examples have an identical input in train "
        f"({found['validation_in_train_other_label'] + found['test_in_train_other_label']} of them with "
        f"another label), and {found['test_in_validation']} test examples one in validation"
    )
    if policy == "error":
        raise ConfigError("task.overlap", policy, f"{what}; set task.overlap=drop to evaluate without them")
    if policy == "warn":
        log.warning("%s; they are kept (task.overlap=drop evaluates without them)", what)
        return data, record
    train = set(keys["train"])
    keep_val = [i for i, k in enumerate(keys["validation"]) if k not in train]
    val = {keys["validation"][i] for i in keep_val}
    keep_test = [i for i, k in enumerate(keys["test"]) if k not in train and k not in val]
    for split, keep in (("validation", keep_val), ("test", keep_test)):
        if not keep:
            raise ConfigError("task.overlap", policy, f"{what}: dropping them leaves no {split} examples")
    record["dropped"] = {"validation": n_val - len(keep_val), "test": n_test - len(keep_test)}
    log.info("%s; dropped from validation / test: %s (task.overlap=drop)", what, record["dropped"])
    kept = {"validation": data["validation"].select(keep_val), "test": data["test"].select(keep_test)}
    return {**data, **kept}, record
