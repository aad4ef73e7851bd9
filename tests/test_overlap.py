"""Validation / test examples whose input is also in train (dpq.data.overlap, ``task.overlap``).

Counts are checked against copies planted in local files, for text (and text pairs), feature
vectors and images; ``warn`` keeps them and says so, ``drop`` removes exactly them, ``error``
refuses to run, and a bad policy is refused with the config, before any data is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from dpq.core.errors import ConfigError
from dpq.data import load_task, overlap
from dpq.run.validate import validate

ROOT = Path(__file__).resolve().parents[1]


def base_task(**task) -> dict:
    base = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/task/_base.yaml"))
    return {**base, "name": "planted", **task}


def rows(prefix: str, n: int, label=lambda i: i % 2) -> list[dict]:
    return [{"text": f"{prefix} sentence number {i}", "label": label(i)} for i in range(n)]


@pytest.fixture
def planted(tmp_path):
    """Train: 40 unique sentences. Validation: 10 new, 2 train copies (one relabelled).
    Test: 10 new, 1 train copy, 1 copy of a new validation sentence, 1 differing by case only."""
    train = rows("train", 40)
    val = rows("val", 10) + [dict(train[3]), {**train[4], "label": 1 - train[4]["label"]}]
    test = rows("test", 10) + [dict(train[7]), dict(val[0]), {**train[8], "text": train[8]["text"].upper()}]
    files = {}
    for split, data in (("train", train), ("validation", val), ("test", test)):
        files[split] = str(tmp_path / f"{split}.csv")
        pd.DataFrame(data).to_csv(files[split], index=False)
    return base_task(files={"data_files": files}), {"train": train, "validation": val, "test": test}


EXPECTED = {
    "validation_in_train": 2,
    "validation_in_train_other_label": 1,
    "test_in_train": 1,
    "test_in_train_other_label": 0,
    "test_in_validation": 1,
}


def test_planted_copies_are_counted_warned_and_kept(planted, caplog):
    task, _ = planted
    with caplog.at_level(logging.WARNING, logger="dpq.data.overlap"):
        splits = load_task(task)
    assert splits.overlap == {**EXPECTED, "policy": "warn"}
    assert splits.sizes() == {"train": 40, "validation": 12, "test": 13}  # kept
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "dpq.data.overlap"]
    assert "2 of 12 validation and 1 of 13 test" in msg and "1 of them with another label" in msg
    assert "task.overlap=drop" in msg


def test_drop_removes_exactly_the_copies(planted):
    task, data = planted
    splits = load_task({**task, "overlap": "drop"})
    assert splits.overlap == {**EXPECTED, "policy": "drop", "dropped": {"validation": 2, "test": 2}}
    train = {r["text"] for r in data["train"]}
    assert sorted(splits.validation["text"]) == sorted(r["text"] for r in data["validation"][:10])
    kept = set(splits.test["text"])
    assert not kept & train and not kept & set(splits.validation["text"])
    assert data["train"][8]["text"].upper() in kept  # only identical inputs count
    # idx stays the row number of what is evaluated (the teacher's logits are cached by it)
    assert splits.test["idx"] == list(range(11)) and splits.validation["idx"] == list(range(10))


def test_error_refuses_to_run_and_a_clean_task_passes(planted, tmp_path):
    task, _ = planted
    with pytest.raises(ConfigError) as e:
        load_task({**task, "overlap": "error"})
    assert e.value.key == "task.overlap" and "2 of 12 validation" in str(e.value)
    clean = {}
    for split, n in (("train", 30), ("validation", 6), ("test", 6)):
        clean[split] = str(tmp_path / f"clean_{split}.csv")
        pd.DataFrame(rows(split, n)).to_csv(clean[split], index=False)
    splits = load_task(base_task(files={"data_files": clean}, overlap="error"))
    assert splits.overlap["validation_in_train"] == splits.overlap["test_in_train"] == 0


def test_text_pairs_count_only_when_both_texts_match():
    a = datasets.Dataset.from_dict(
        {"text": ["x", "x", "y"], "text_pair": ["1", "2", "1"], "label": [0, 0, 1]}
    )
    b = datasets.Dataset.from_dict({"text": ["x", "x"], "text_pair": ["2", "3"], "label": [0, 0]})
    keys = {"train": overlap.input_keys(a, "text"), "validation": overlap.input_keys(b, "text")}
    keys["test"] = keys["validation"]
    labels = {"train": [0, 0, 1], "validation": [0, 0], "test": [0, 0]}
    found = overlap.count(keys, labels)
    assert found["validation_in_train"] == 1 and found["test_in_validation"] == 2


def test_images_and_feature_vectors_match_on_their_exact_values():
    from dpq.data.sources import image_features

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    near = images[1].copy()
    near[7, 7] ^= 1  # the last pixel off: another image
    feats = image_features((8, 8), ["a", "b"])
    train = datasets.Dataset.from_dict({"image": list(images[:4]), "label": [0, 1, 0, 1]}, features=feats)
    val = datasets.Dataset.from_dict(
        {"image": [images[0], near, images[5]], "label": [1, 0, 0]}, features=feats
    )
    test = datasets.Dataset.from_dict(
        {"image": [images[5], images[2], images[4]], "label": [0, 0, 1]}, features=feats
    )
    data = {"train": train.select([3, 2, 1, 0]), "validation": val, "test": test}  # an index mapping too
    out, record = overlap.apply(data, "image", "drop", "images")
    assert record["validation_in_train"] == 1 and record["validation_in_train_other_label"] == 1
    assert record["test_in_train"] == 1 and record["test_in_validation"] == 1
    assert record["dropped"] == {"validation": 1, "test": 2}
    assert [np.asarray(im).tolist() for im in out["validation"]["image"]] == [
        near.tolist(),
        images[5].tolist(),
    ]

    vecs = rng.normal(size=(5, 4))
    f = lambda v, y: datasets.Dataset.from_dict({"features": [list(x) for x in v], "label": y})  # noqa: E731
    data = {"train": f(vecs[:3], [0, 1, 0]), "validation": f(vecs[[2, 3]], [0, 1]), "test": f(vecs[[4]], [1])}
    _, record = overlap.apply(data, "features", "warn", "vectors")
    assert record["validation_in_train"] == 1 and record["test_in_train"] == 0
    # Rows of different lengths are read one by one, and still matched exactly; an integer vector is
    # the float vector the model reads.
    ragged = {
        "train": f([[1.0, 2.0], [3.0]], [0, 1]),
        "validation": f([[3.0], [1.0]], [1, 0]),
        "test": f([[2.0]], [0]),
    }
    _, record = overlap.apply(ragged, "features", "warn", "ragged")
    assert record["validation_in_train"] == 1 and record["test_in_train"] == 0
    ints = {"train": f([[1, 2], [3, 4]], [0, 1]), "validation": f([[1, 2]], [0]), "test": f([[3, 5]], [1])}
    _, record = overlap.apply(ints, "features", "warn", "ints")
    assert record["validation_in_train"] == 1 and record["test_in_train"] == 0


def test_drop_that_empties_a_split_is_refused():
    d = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ConfigError, match="leaves no validation examples"):
        overlap.apply({"train": d, "validation": d, "test": d}, "text", "drop", "same")


def test_the_embedded_default_task_records_its_one_shared_sentence(tmp_path):
    cfg = OmegaConf.to_container(compose_cfg(tmp_path, []).task, resolve=True)
    splits = load_task(cfg)
    assert splits.overlap["validation_in_train"] == 1 and splits.overlap["test_in_train"] == 0


def test_a_bad_policy_is_refused_with_the_config(tmp_path):
    cfg = OmegaConf.to_container(compose_cfg(tmp_path, ["task.overlap=sometimes"]), resolve=True)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == "task.overlap" and "warn, drop, error" in str(e.value)
