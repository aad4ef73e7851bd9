"""Local files as a task (``task.source: files``): the ``datasets`` file builders, read offline.

``task.files`` names the data, one of:

- ``data_files`` per split for a builder: ``csv`` (``.csv``, ``.tsv``), ``json`` (``.json``,
  ``.jsonl``), ``parquet``, or ``text`` (one example per line; each split maps a label to its
  file(s), e.g. ``{positive: pos.txt, negative: neg.txt}``);
- ``path`` of a folder written by ``Dataset(Dict).save_to_disk`` (``saved``), or of a folder of
  data files the hub loader understands (``folder``: ``datasets.load_dataset(<folder>)``, split
  names from the file names).

Only the named files are read (a builder without ``data_files`` would scan the working
directory), relative paths are relative to the directory the run starts in, and each split is
loaded on its own, so a file that cannot be parsed is named in the error. Nothing here needs
the network. A split without data is carved from train (``task.split``).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from dpq.core.errors import ConfigError

log = logging.getLogger(__name__)

BUILDERS = ("csv", "json", "parquet", "text")
FORMATS = (*BUILDERS, "saved", "folder")
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
SPLITS = ("train", "validation", "test")
KEYS = ("format", "data_files", "path", "splits", "options")


@dataclass
class Part:
    """One split as loaded: its rows, the config key that names it and where it came from (for messages)."""

    data: datasets.Dataset
    key: str
    where: str


def _resolve(pattern: str, key: str) -> list[str]:
    """Absolute paths of one ``data_files`` entry (a path or a glob), relative to the working directory."""
    if not isinstance(pattern, (str, os.PathLike)) or not str(pattern).strip():
        raise ConfigError(key, pattern, "must be a file path (or a glob) relative to where the run starts")
    path = os.path.abspath(os.path.expanduser(str(pattern)))
    if glob.has_magic(path):
        found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not found:
            raise ConfigError(key, str(pattern), f"no file matches {path}")
        return found
    if not os.path.isfile(path):
        raise ConfigError(
            key, str(pattern), f"no such file: {path}" + (" (a folder)" if os.path.isdir(path) else "")
        )
    return [path]


def _entries(value, key: str) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigError(key, value, "names no file")
    return [f for i, v in enumerate(values) for f in _resolve(v, f"{key}[{i}]" if len(values) > 1 else key)]


def _format_of(files: list[str], key: str) -> str:
    kinds = {EXTENSIONS.get(Path(f).suffix.lower()) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise ConfigError(
            "task.files.format",
            None,
            f"cannot tell the format of {', '.join(Path(f).name for f in files[:4])} ({key}) from their names: "
            f"set it to one of {', '.join(FORMATS)}",
        )
    return kinds.pop()


def _where(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"


class Where(str):
    """Where a split came from, as messages name it; for a split read from several files it also knows each
    file's row count, so that :func:`row_in` names the file and the row within it."""

    spans: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, text: str, spans: list[tuple[str, int]]) -> Where:
        w = cls(text)
        w.spans = tuple(spans)
        return w


def row_in(where: str, i: int) -> str:
    """``row <n> of <file>`` for row ``i`` (0-based) of a split: counted within its own file when the split
    was read from several (``where`` a :class:`Where`), else within ``where``."""
    for f, n in getattr(where, "spans", ()):
        if i < n:
            return f"row {i + 1} of {f}"
        i -= n
    return f"row {i + 1} of {where}"


ONE_BY_ONE = 64  # more files than this (shards of a large dataset) are parsed in one builder call


def _build_each(builder: str, files: list[str], options: dict, key: str) -> tuple[datasets.Dataset, Where]:
    """``files`` parsed one by one and joined: a file that cannot be parsed is the one named, and a row is
    counted within its own file in later messages (one builder call over all of them gave neither). One
    cache folder for all of them (:func:`_content_cache`), so that a change to any is a new parse and new
    tokenization caches. Files whose inferred column types differ (an all-integer column beside floats) are
    parsed in one call, as before, which casts them to the first file's types."""
    options = {**_content_cache(files, options), **options}
    if len(files) == 1 or len(files) > ONE_BY_ONE:
        ds = _build(builder, files, options, key)
        return ds, Where.of(_where(files), [(files[0], len(ds))] if len(files) == 1 else [])
    parts = [_build(builder, [f], options, key) for f in files]
    try:
        ds = datasets.concatenate_datasets(parts)
    except ValueError:
        return _build(builder, files, options, key), Where(_where(files))
    return ds, Where.of(_where(files), [(f, len(p)) for f, p in zip(files, parts)])


def _cause(e: BaseException) -> str:
    """The innermost reason a builder gave (DatasetGenerationError wraps the parser's error)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# Defaults a file builder gets unless task.files.options says otherwise:
# - csv: a cell reading "NA", "N/A", "None", "null" (pandas' NA strings) is that text, not a missing value:
#   a review "N/A" or a class named NA was refused as a null; only an empty cell is missing;
# - text: a byte-order mark opening a file (Windows editors write one) is not part of the first example;
# - .tsv: see _read_tsv.
BUILDER_DEFAULTS = {"csv": {"keep_default_na": False, "na_values": [""]}, "text": {"encoding": "utf-8-sig"}}


def _read_tsv(files: list[str], options: dict, key: str) -> tuple[datasets.Dataset, Where]:
    """A ``.tsv`` split: read with CSV quoting (what pandas and Python's csv module write, doubling quotes
    inside a quoted value), unless that reading fails or leaves a tab inside a value, the mark of a stray
    quote (a text opening one it never closes swallows the lines after it, tabs and labels included): then
    read again without quoting, as GLUE's files are, and said. ``options.quoting`` decides alone."""
    options = {"sep": "\t", **options}
    if "quoting" in options:
        return _build_each("csv", files, options, key)
    try:
        ds, where = _build_each("csv", files, options, key)
        merged = next((c for c in ds.column_names if _has_tab(ds, c)), None)
    except ConfigError as e:
        merged, why = None, str(e)
    else:
        if merged is None:
            return ds, where
        why = f"a value of column {merged!r} holds a tab"
    unquoted = _build_each("csv", files, {**options, "quoting": csv.QUOTE_NONE}, key)
    log.warning(
        "%s: read without quoting (%s, the mark of a stray '\"'); set task.files.options.quoting to choose",
        _where(files),
        why,
    )
    return unquoted


def _has_tab(ds: datasets.Dataset, column: str) -> bool:
    import pyarrow as pa
    import pyarrow.compute as pc

    values = ds.with_format("arrow")[column]
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return False
    return bool(pc.any(pc.match_substring(values, "\t")).as_py())


def _content_cache(files: list[str], options: dict) -> dict:
    """``cache_dir`` keyed on the files' bytes: ``datasets`` keys a local file's parse on its path and mtime
    only, so a file replaced with its mtime kept (``cp -p``, ``rsync -a``, an archive) came back as the old
    parse, and the run's content digest with it. A user's own ``cache_dir`` option is kept."""
    if "cache_dir" in options:
        return {}
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.encode("utf-8", "surrogateescape") + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return {
        "cache_dir": os.path.join(datasets.config.HF_DATASETS_CACHE, "dpq-files", digest.hexdigest()[:20])
    }


def _build(builder: str, files: list[str], options: dict, key: str) -> datasets.Dataset:
    """One split from ``files`` with a ``datasets`` builder; a parse failure names the files."""
    if builder == "csv" and "na_values" in options and "keep_default_na" not in options:
        # the user's NA words, and the empty cell as every CSV read here counts it (not pandas' NA list)
        extra = (
            options["na_values"]
            if isinstance(options["na_values"], (list, tuple))
            else [options["na_values"]]
        )
        options = {**options, "na_values": [*extra, ""]}
    options = {**BUILDER_DEFAULTS.get(builder, {}), **_content_cache(files, options), **options}
    try:
        return datasets.load_dataset(builder, data_files={"train": files}, split="train", **options)
    except ValueError as e:
        if "corresponds to no data" in str(e):  # a header, no rows
            raise ConfigError(key, _where(files), "has no rows") from None
        raise ConfigError(
            key, _where(files), f"the {builder} builder could not read it ({_cause(e)})"
        ) from None
    except Exception as e:  # parser errors, wrapped in DatasetGenerationError
        raise ConfigError(
            key, _where(files), f"the {builder} builder could not read it ({_cause(e)})"
        ) from None


def _text_split(
    value, key: str, label_column: str, options: dict, text_only: bool = False
) -> tuple[datasets.Dataset, str, list[str]]:
    """``text`` files, one example per line, a file (or several) per label: ``{label: file(s)}``."""
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            key,
            value,
            "a text split maps each label to its file(s), one example per line, "
            "e.g. {positive: pos.txt, negative: neg.txt}",
        )
    if flags := [k for k in value if isinstance(k, bool)]:
        raise ConfigError(
            f"{key}.{str(flags[0]).lower()}",
            value[flags[0]],
            "a label YAML read as true/false (yes, no, on, off unquoted; two of them are then one key): quote "
            "it, e.g. {'yes': yes.txt, 'no': no.txt}",
        )
    # Integer keys stay integers, as a label column's would: class ids, or names in numeric order with
    # task.integer_labels=names (as strings, 10 sorted before 2). "1" too: results.json's copy of the task
    # has string keys, and a reloaded run must read the labels it was measured with
    ids = all(re.fullmatch(r"-?\d+", str(k)) for k in value)
    found_by_label = {label: _entries(entry, f"{key}.{label}") for label, entry in value.items()}
    if text_only:  # format unset: per-label files are read line by line, a .csv's header and columns as text
        for label, found in found_by_label.items():
            _only_text_files(found, f"{key}.{label}", value[label])
    options = {**_content_cache([f for fs in found_by_label.values() for f in fs], options), **options}
    parts, files, spans = [], [], []
    for label, found in found_by_label.items():
        ds, where = _build_each("text", found, options, f"{key}.{label}")
        parts.append(ds.add_column(label_column, [int(label) if ids else str(label)] * len(ds)))
        files += found
        spans = spans + list(where.spans) if spans is not None and where.spans else None
    return datasets.concatenate_datasets(parts), Where.of(", ".join(files), spans or []), files


def _only_text_files(found: list[str], key: str, entry) -> None:
    for f in found:
        kind = EXTENSIONS.get(Path(f).suffix.lower())
        if kind not in (None, "text"):
            raise ConfigError(
                key,
                entry,
                f"is a {kind} file, but a split that maps labels to files reads them as text, one example "
                "per line (a header and its columns would become examples): give .txt files, or one "
                f"{kind} file per split with a label column, or set task.files.format=text to read them so",
            )


def load_files(files: dict | None, label_column: str = "label") -> tuple[dict[str, Part], str]:
    """The splits ``task.files`` names (missing ones are carved later) and its format (caches key on
    the loaded content, :attr:`dpq.data.tasks.TaskSplits.content`, so an edited file is another key)."""
    if not isinstance(files, dict):
        raise ConfigError(
            "task.files",
            files,
            "task.source=files needs a files block: {data_files: {train: ..., validation: ..., test: ...}} "
            "or {path: <folder>}",
        )
    unknown = sorted(set(files) - set(KEYS))
    if unknown:
        raise ConfigError(
            f"task.files.{unknown[0]}",
            files[unknown[0]],
            f"is not a files setting; allowed: {', '.join(KEYS)}",
        )
    fmt, data_files, path = files.get("format"), files.get("data_files"), files.get("path")
    options = dict(files.get("options") or {})
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(
            "task.files.format", fmt, f"must be one of {', '.join(FORMATS)} (or null: from the file names)"
        )
    if bool(data_files) == bool(path):
        raise ConfigError(
            "task.files",
            {k: v for k, v in files.items() if v},
            "set either data_files (csv, json, parquet, text files per split) or path (a save_to_disk folder "
            "or a folder of data files)",
        )
    if path:
        return _load_folder(path, fmt, files.get("splits"), options)
    if not isinstance(data_files, dict):
        raise ConfigError(
            "task.files.data_files",
            data_files,
            "must map splits to files: {train: ..., validation: ..., test: ...}",
        )
    unknown = sorted(set(data_files) - set(SPLITS))
    if unknown:
        raise ConfigError(
            f"task.files.data_files.{unknown[0]}",
            data_files[unknown[0]],
            f"not a split; splits are {', '.join(SPLITS)}",
        )
    if not data_files.get("train"):
        raise ConfigError(
            "task.files.data_files.train",
            None,
            "a train split is required (validation and test are carved from it when missing)",
        )
    if fmt in ("saved", "folder"):
        raise ConfigError("task.files.format", fmt, "reads a folder: set task.files.path, not data_files")
    parts, used = {}, []
    for split in SPLITS:
        value = data_files.get(split)
        if not value:
            continue
        key = f"task.files.data_files.{split}"
        if isinstance(value, dict) and fmt in (None, "text"):
            split_fmt = "text"
            ds, where, found = _text_split(value, key, label_column, options, text_only=fmt is None)
        else:
            found = _entries(value, key)
            split_fmt = fmt or _format_of(found, key)
            if split_fmt == "text":
                _text_split(value, key, label_column, options)  # says how text files are laid out
            tsv = split_fmt == "csv" and all(f.lower().endswith(".tsv") for f in found)
            ds, where = _read_tsv(found, options, key) if tsv else _build_each(split_fmt, found, options, key)
        parts[split] = Part(ds, key, where)
        used.append(split_fmt)
    return parts, "+".join(dict.fromkeys(used))


def _load_folder(path, fmt: str | None, splits: dict | None, options: dict) -> tuple[dict[str, Part], str]:
    folder = Path(os.path.abspath(os.path.expanduser(str(path))))
    if not folder.is_dir():
        raise ConfigError("task.files.path", str(path), f"no such folder: {folder}")
    saved = (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()
    fmt = fmt or ("saved" if saved else "folder")
    if fmt not in ("saved", "folder"):
        raise ConfigError("task.files.format", fmt, "a folder (task.files.path) is read as saved or folder")
    try:
        if fmt == "saved":
            raw = datasets.load_from_disk(str(folder))
        else:
            raw = datasets.load_dataset(str(folder), **options)
    except Exception as e:
        what = "a save_to_disk folder" if fmt == "saved" else "a folder of data files datasets can load"
        raise ConfigError("task.files.path", str(path), f"is not {what} ({_cause(e)})") from None
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    wanted = dict(splits) if splits else {s: s for s in SPLITS if s in raw}
    parts = {}
    for split, name in wanted.items():
        if split not in SPLITS:
            raise ConfigError(
                f"task.files.splits.{split}", name, f"not a split; splits are {', '.join(SPLITS)}"
            )
        if name is None:
            continue
        if name not in raw:
            raise ConfigError(
                f"task.files.splits.{split}", name, f"not a split of {folder}; it has {list(raw)}"
            )
        parts[split] = Part(raw[name], f"task.files.splits.{split}", f"{folder} (split {name!r})")
    if "train" not in parts:
        raise ConfigError(
            "task.files.splits.train",
            wanted.get("train"),
            f"a train split is required; {folder} has {list(raw)}",
        )
    return parts, fmt
