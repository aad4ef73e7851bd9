"""A task's columns as dpq uses them: ``text`` [+ ``text_pair``], ``features`` or ``image``, and ``label``.

The task names its data's columns (``task.text_column``, ``text_pair_column``, ``features_column``,
``image_column``, ``label_column``); other columns are dropped. Texts are checked row by row
(with Arrow, no Python loop) so an empty or missing text is reported with its row and file
before any model is loaded, instead of failing in the tokenizer or training on blanks.
"""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpq.core.errors import ConfigError
from dpq.data.files import row_in

DEFAULT_COLUMNS = {"text": "text", "features": "features", "image": "image", "label": "label"}


def wanted(task: dict) -> dict[str, tuple[str, str]]:
    """dpq column -> (the data's column, the task key naming it) for ``task``'s kind."""
    kind = task["kind"]
    cols = {}
    if kind == "text":
        cols["text"] = (task.get("text_column") or "text", "task.text_column")
        if task.get("text_pair_column"):
            cols["text_pair"] = (task["text_pair_column"], "task.text_pair_column")
    else:
        cols[kind] = (task.get(f"{kind}_column") or DEFAULT_COLUMNS[kind], f"task.{kind}_column")
    cols["label"] = (task.get("label_column") or "label", "task.label_column")
    return cols


def standardise(ds: datasets.Dataset, task: dict, where: str) -> datasets.Dataset:
    """Keep the task's columns under dpq's names; a missing one is named with the file and the columns it has."""
    cols = wanted(task)
    for theirs, key in cols.values():
        if theirs not in ds.column_names:
            raise ConfigError(key, theirs, f"not a column of {where}; its columns are {ds.column_names}")
    ds = ds.remove_columns([c for c in ds.column_names if c not in {t for t, _ in cols.values()}])
    renames = {theirs: ours for ours, (theirs, _) in cols.items() if theirs != ours}
    ds = ds.rename_columns(renames) if renames else ds
    if task["kind"] == "image":
        ds = _image_arrays(ds)
    if task["kind"] == "text":
        for ours in ("text", "text_pair"):
            if ours in ds.column_names:
                check_texts(ds, ours, *cols[ours], where)
    return ds


def check_texts(ds: datasets.Dataset, column: str, name: str, key: str, where: str) -> None:
    """Every row has a non-blank string in ``column``."""
    values = ds.with_format("arrow")[column]
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ConfigError(key, name, f"in {where} holds {values.type} values, not text")
    blank = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0))
    rows = np.flatnonzero(blank.to_numpy(zero_copy_only=False))
    if len(rows):
        i = int(rows[0])
        what = "no text (null)" if values[i].as_py() is None else "an empty text"
        more = f"; {len(rows)} rows in all" if len(rows) > 1 else ""
        raise ConfigError(
            key, name, f"{row_in(where, i)} has {what}{more} (rows count from 1, after any header)"
        )


def _image_arrays(ds: datasets.Dataset) -> datasets.Dataset:
    """Hub image datasets store PIL images (``datasets.Image``); dpq keeps uint8 arrays (``image``)."""
    from dpq.data.sources import image_features

    if isinstance(ds.features["image"], (datasets.Array2D, datasets.Array3D)):
        return ds
    first = np.asarray(ds[0]["image"], dtype=np.uint8)
    # The label column as it is: labels.encode reads names and class ids (a ClassLabel made here from one
    # split's values refused ids 1..3 as "greater than num_classes 3", and a split lacking a class)
    features = datasets.Features({**ds.features, "image": image_features(first.shape, ["_"])["image"]})
    return ds.map(
        lambda b: {"image": [np.asarray(im, dtype=np.uint8) for im in b["image"]], "label": b["label"]},
        batched=True,
        features=features,
        desc="images to uint8 arrays",
    )
