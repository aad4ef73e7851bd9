"""Fashion-MNIST, the seed's MLP and the CNNs: data, the seed's pruning numbers, channel shrink.

The data tests read the real IDX files of Debian's ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``); they are skipped where the package is absent.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dpq import cost
from dpq.checkpoints import load_model, save_model
from dpq.core.errors import ConfigError
from dpq.core.selectors import select_linears
from dpq.data import ClassificationDataModule, load_task, model_inputs
from dpq.data.sources import FASHION_MNIST_DIR, IDX_FILES, read_idx
from dpq.models import CNNClassifier, MLPClassifier, build_model, native_from_config
from dpq.prune import structured
from dpq.prune.masks import apply_masks, magnitude_masks

HAVE_IDX = all((Path(FASHION_MNIST_DIR) / f).is_file() for pair in IDX_FILES.values() for f in pair)
needs_idx = pytest.mark.skipif(not HAVE_IDX, reason="apt-get install dataset-fashion-mnist")


def resolved(make_cfg, *overrides) -> dict:
    return OmegaConf.to_container(make_cfg(*overrides), resolve=True)


@pytest.fixture(scope="module")
def fashion():
    """The real task, loaded once for this module (split + normalisation as a run gets them)."""
    from conftest import compose_cfg

    cfg = OmegaConf.to_container(
        compose_cfg(Path("/tmp/dpq-test-vision"), ["task=fashion_mnist"]), resolve=True
    )
    return cfg["task"], load_task(cfg["task"])


# ----------------------------------------------------------------------------- data


@needs_idx
def test_fashion_mnist_standard_split_from_idx(fashion):
    task, splits = fashion
    assert (
        splits.source == "embedded:idx_fashion_mnist" and splits.kind == "image" and splits.num_labels == 10
    )
    # The standard 60k/10k split; validation (5,000, stratified, seed 0) carved from train.
    assert splits.sizes() == {"train": 55000, "validation": 5000, "test": 10000}
    test_labels = np.bincount(splits.test.with_format("arrow")["label"].to_numpy(), minlength=10)
    val_labels = np.bincount(splits.validation.with_format("arrow")["label"].to_numpy(), minlength=10)
    assert test_labels.tolist() == [1000] * 10  # Fashion-MNIST's test set is balanced
    assert val_labels.tolist() == [500] * 10  # stratified carve: 6,000 per class in train -> 500 each
    # The test split is the IDX test file, unshuffled, pixel for pixel.
    raw = read_idx(Path(FASHION_MNIST_DIR) / IDX_FILES["test"][0])
    assert np.array_equal(np.asarray(splits.test.with_format("numpy")[:64]["image"]), raw[:64])
    assert splits.test["idx"][:3] == [0, 1, 2]
    # Seeded: the same validation rows every time (train + validation still cover all 60,000 train images).
    again = load_task(task)
    assert again.validation.with_format("arrow")["idx"].equals(splits.validation.with_format("arrow")["idx"])
    assert np.array_equal(
        np.asarray(again.validation.with_format("numpy")[:32]["image"]),
        np.asarray(splits.validation.with_format("numpy")[:32]["image"]),
    )


@needs_idx
def test_fast_stratified_carve_equals_datasets_own():
    """tasks._stratified_carve reads labels as one Arrow array; the rows must be datasets' own."""
    import datasets

    from dpq.data.sources import fashion_mnist_idx
    from dpq.data.tasks import _carve

    ds = fashion_mnist_idx()["train"].select(range(6000))
    for size, seed in ((500, 0), (0.1, 3)):
        ours = _carve(ds, size, seed, stratify=True)
        theirs = ds.train_test_split(test_size=size, seed=seed, stratify_by_column="label")
        for a, b in zip(ours, (theirs["train"], theirs["test"])):
            assert len(a) == len(b)
            assert a.with_format("arrow")["label"].equals(b.with_format("arrow")["label"])
            assert np.array_equal(
                np.asarray(a.with_format("numpy")[:50]["image"]),
                np.asarray(b.with_format("numpy")[:50]["image"]),
            )
    assert isinstance(ds.features["label"], datasets.ClassLabel)


@needs_idx
def test_image_batches_are_normalised_pixel_values(fashion):
    task, splits = fashion
    dm = ClassificationDataModule(splits, batch_size=16, eval_batch_size=1000)
    batch = next(iter(dm.test_dataloader()))
    x = batch["pixel_values"]
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32
    assert batch["labels"].dtype == torch.int64 and batch["idx"].tolist() == list(range(1000))
    raw = torch.from_numpy(read_idx(Path(FASHION_MNIST_DIR) / IDX_FILES["test"][0])[:1000].astype(np.float32))
    assert torch.allclose(x[:, 0], (raw / 255 - 0.2860) / 0.3530, atol=1e-6)  # ToTensor + Normalize
    assert (
        abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    )  # the config's mean/std fit the data
    assert set(model_inputs(batch)) == {"pixel_values"}


def test_colour_images_become_channels_first():
    """H x W x C uint8 rows (a colour dataset) -> [B, C, H, W], normalised per channel."""
    from dpq.data.datamodule import image_batch

    rng = np.random.default_rng(0)
    rows = [
        {"pixel_values": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "labels": np.int64(i)}
        for i in range(2)
    ]
    out = image_batch(rows, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    assert out["pixel_values"].shape == (2, 3, 4, 5) and out["labels"].tolist() == [0, 1]
    want = (torch.from_numpy(rows[1]["pixel_values"][:, :, 2].astype(np.float32)) / 255 - 0.3) / 2.0
    assert torch.allclose(out["pixel_values"][1, 2], want, atol=1e-6)


def test_missing_idx_files_name_the_debian_package(make_cfg, tmp_path, monkeypatch):
    task = resolved(make_cfg, "task=fashion_mnist", f"task.embedded.path={tmp_path}", "task.source=embedded")[
        "task"
    ]
    with pytest.raises(ConfigError, match=r"task='fashion_mnist'.*apt-get install dataset-fashion-mnist"):
        load_task(task)
    # source=auto falls back to the hub; offline (no network) the error names both ways out.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task["source"] = "auto"
    with pytest.raises(
        ConfigError, match=r"apt-get install dataset-fashion-mnist.*zalando-datasets/fashion_mnist"
    ):
        load_task(task)


@needs_idx
def test_hub_layout_gives_the_same_arrays(make_cfg, monkeypatch):
    """The hub route (PIL images from the hub) ends in the same uint8 columns as the IDX route."""
    import datasets

    import dpq.data.tasks as tasks

    images = read_idx(Path(FASHION_MNIST_DIR) / IDX_FILES["train"][0])[:120]
    labels = read_idx(Path(FASHION_MNIST_DIR) / IDX_FILES["train"][1])[:120].astype(int)
    names = [
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
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def hub(part):  # what datasets.load_dataset("zalando-datasets/fashion_mnist") holds: PIL images
        from PIL import Image

        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a) for a in images[part]], "label": labels[part].tolist()},
            features=feats,
        )

    monkeypatch.setattr(
        tasks,
        "load_hub",
        lambda name, spec: datasets.DatasetDict({"train": hub(slice(0, 100)), "test": hub(slice(100, 120))}),
    )
    task = resolved(make_cfg, "task=fashion_mnist", "task.source=hub", "task.split.validation=20")["task"]
    splits = load_task(task)
    assert splits.source == "hub:zalando-datasets/fashion_mnist"
    assert splits.sizes() == {"train": 80, "validation": 20, "test": 20}
    assert np.array_equal(np.asarray(splits.test.with_format("numpy")["image"]), images[100:120])
    assert splits.test["label"] == labels[100:120].tolist()


# ----------------------------------------------------------------------------- the seed's MLP


def test_seed_mlp_at_half_sparsity_matches_the_seed_numbers(make_cfg):
    """Seed 003: a 784-256-128-10 DNN of "about 233K" parameters, "116K" after removing 50%.

    Its numbers count the two hidden weight matrices, the prune targets here:
    784*256 + 256*128 = 233,472 ("233K"); half of them is 116,736 ("116K"). With the 10-way
    head (1,280 weights, kept dense) and the 394 biases the model has 235,146 parameters, so
    118,410 stay non-zero at 50%.
    """
    cfg = resolved(make_cfg, "task=fashion_mnist", "model=mlp_784_256_128_10")
    model = build_model(cfg["model"], cfg["task"], "model")
    assert isinstance(model, MLPClassifier) and model.config["num_features"] == 784
    targets = select_linears(model, cfg["model"]["prune_targets"])
    assert targets == ["hidden.0", "hidden.1"]
    prunable = sum(model.get_submodule(n).weight.numel() for n in targets)
    assert prunable == 784 * 256 + 256 * 128 == 233_472
    assert cost.parameter_counts(model) == {"params_total": 235_146, "params_nonzero": 235_146}

    apply_masks(model, magnitude_masks(model, targets, 0.5))
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in targets)
    assert zeros == prunable // 2 == 116_736
    assert cost.sparsity(model, targets)["sparsity"] == 0.5
    assert cost.parameter_counts(model) == {"params_total": 235_146, "params_nonzero": 235_146 - 116_736}
    assert int((model.head.weight == 0).sum()) == 0


def test_mlp_neuron_shrink_keeps_logits_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = MLPClassifier(784, 10, [256, 128]).eval()
    x = torch.randn(5, 1, 28, 28)
    sets = structured.find_groups(model, "neurons")
    assert [(s.name, s.count) for s in sets] == [("hidden.0", 256), ("hidden.1", 128)]
    assert [s.consumers[0].module for s in sets] == ["hidden.1", "head"]
    # An MLP's channels are its neurons: the same sets under the other kind.
    assert [(s.name, s.count, s.kind) for s in structured.find_groups(model, "channels")] == [
        ("hidden.0", 256, "channels"),
        ("hidden.1", 128, "channels"),
    ]
    keep = structured.select_groups(
        sets, {n: model.get_submodule(n).weight.abs() for s in sets for n in s.modules}, 0.5
    )
    masked = copy.deepcopy(model)
    apply_masks(masked, structured.group_masks(masked, sets, keep))
    structured.shrink_(model, sets, keep)
    assert model.config["hidden"] == [128, 64]
    assert torch.allclose(masked(pixel_values=x), model(pixel_values=x), atol=1e-5)
    assert cost.parameter_counts(model)["params_total"] == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    save_model(model, tmp_path / "m")
    again = load_model({}, {}, tmp_path / "m").eval()
    assert torch.equal(again(pixel_values=x), model(pixel_values=x))


# ----------------------------------------------------------------------------- CNN channels


def conv_net_flops(channels, hidden, in_channels=1, labels=10, sizes=(28 * 28, 14 * 14, 7 * 7)) -> int:
    """fvcore's count for CNNClassifier by hand: 3x3 conv MACs, batch norm 2/element (eval, affine),
    global average pool 1/element, linear MACs."""
    ins = [in_channels, *channels[:-1]]
    conv = sum(hw * c * i * 9 for hw, c, i in zip(sizes, channels, ins))
    bn = sum(2 * hw * c for hw, c in zip(sizes, channels))
    dims = [channels[-1], *hidden, labels]
    return conv + bn + sizes[-1] * channels[-1] + sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def busy_batch_norm(model: torch.nn.Module) -> None:
    """Non-trivial batch-norm state, so a wrongly sliced running stat or affine would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


def test_cnn_channel_shrink_keeps_logits_with_fewer_flops(make_cfg, tmp_path):
    cfg = resolved(make_cfg, "task=fashion_mnist", "model=cnn_small", "teacher=cnn_wide")
    torch.manual_seed(0)
    model = build_model(cfg["model"], cfg["task"], "model")
    assert isinstance(model, CNNClassifier) and model.config["channels"] == [16, 32, 64]
    busy_batch_norm(model)
    model.eval()
    x = torch.randn(6, 1, 28, 28)
    inputs = cost.example_inputs_for("image", 1, image_shape=(1, 28, 28))
    dense = cost.flops(model, inputs)["dense_gflops"]
    assert round(dense * 1e9) == conv_net_flops([16, 32, 64], [64]) == 1_971_008

    sets = structured.find_groups(model, "channels")
    assert [(s.name, s.count, s.consumers[0].module, s.extra[0].module) for s in sets] == [
        ("blocks.0.conv", 16, "blocks.1.conv", "blocks.0.bn"),
        ("blocks.1.conv", 32, "blocks.2.conv", "blocks.1.bn"),
        ("blocks.2.conv", 64, "fc.0", "blocks.2.bn"),
    ]
    assert [(s.name, s.count) for s in structured.find_groups(model, "neurons")] == [("fc.0", 64)]
    scores = {n: model.get_submodule(n).weight.detach().abs() for s in sets for n in s.modules}
    keep = structured.select_groups(sets, scores, 0.5)
    assert [int(k.sum()) for k in keep.values()] == [8, 16, 32]

    masked = copy.deepcopy(model)
    apply_masks(masked, structured.group_masks(masked, sets, keep))
    shrunk = copy.deepcopy(model)  # shrinking the unmasked model: the removed slices are simply gone
    structured.shrink_(shrunk, sets, keep)
    with torch.no_grad():
        ref, out = masked(pixel_values=x), shrunk(pixel_values=x)
    assert out.dtype == torch.float32 and torch.allclose(ref, out, atol=1e-5)
    assert not torch.allclose(ref, model(pixel_values=x), atol=1e-3)  # the mask did change the function

    # Shapes, config and cost follow the kept channels exactly.
    assert shrunk.config["channels"] == [8, 16, 32] and shrunk.config["hidden"] == [64]
    assert [b.bn.num_features for b in shrunk.blocks] == [8, 16, 32] and shrunk.fc[0].in_features == 32
    assert shrunk.blocks[1].conv.weight.shape == (16, 8, 3, 3)
    fresh = CNNClassifier(1, 10, [8, 16, 32], [64])
    assert cost.parameter_counts(shrunk)["params_total"] == cost.parameter_counts(fresh)["params_total"]
    small = cost.flops(shrunk, inputs)["dense_gflops"]
    assert round(small * 1e9) == conv_net_flops([8, 16, 32], [64]) == 534_240
    assert small < dense / 3.6  # convs 2 and 3 lost half their inputs and half their outputs (4x fewer MACs)

    # The shrunk model saves and reloads as its smaller self.
    save_model(shrunk, tmp_path / "cnn")
    again = load_model(cfg["model"], cfg["task"], tmp_path / "cnn").eval()
    assert again.config == shrunk.config and isinstance(again, CNNClassifier)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x), out)
    assert type(native_from_config({"dpq_arch": "cnn", **shrunk.config})) is CNNClassifier


def test_cnn_needs_an_image_task(make_cfg):
    cfg = resolved(make_cfg, "task=digits", "model=cnn_small")
    with pytest.raises(ConfigError, match=r"model.arch='cnn': a cnn needs an image task"):
        build_model(cfg["model"], cfg["task"], "model")
    cfg = resolved(make_cfg, "task=fashion_mnist", "model=cnn_small", "model.pool=[true]")
    with pytest.raises(ConfigError, match=r"model.pool=\[True\]: needs one true/false per conv block \(3\)"):
        build_model(cfg["model"], cfg["task"], "model")


# ----------------------------------------------------------------------------- pipelines


def run_tiny(make_cfg, experiment: str, *overrides) -> dict:
    """A whole pipeline on 256 training images, 4 batches per stage (trainer=debug)."""
    from dpq.train import train

    return train(
        make_cfg(
            f"experiment={experiment}",
            "task.subsample=256",
            "trainer=debug",
            "cost.repeats=2",
            "cost.warmup=1",
            *overrides,
        )
    )


@needs_idx
def test_dpq_channels_pipeline_on_a_slice(make_cfg):
    """teacher -> distill -> prune (50% channels, shrunk) -> recover -> 4-bit quantize, a few steps each."""
    res = run_tiny(make_cfg, "fashion_cnn", "pipeline=dpq", "pipeline.stages.prune.granularity=channels")
    assert res["status"] == "completed" and res["task"]["sizes"] == {
        "train": 256,
        "validation": 64,
        "test": 64,
    }
    by = {r["stage"]: r for r in res["stages"]}
    assert by["prune"]["structure"]["channels"] == {
        "blocks.0.conv": 8,
        "blocks.1.conv": 16,
        "blocks.2.conv": 32,
    }
    dense, pruned = by["distill"]["metrics"], by["prune"]["metrics"]
    assert round(dense["dense_gflops"] * 1e9) == conv_net_flops([16, 32, 64], [64])
    assert round(pruned["dense_gflops"] * 1e9) == conv_net_flops([8, 16, 32], [64])
    assert by["quantize"]["quantized"] and res["final"]["quantized"]
    again = load_model({}, {}, Path(res["model_dir"]))
    assert again.config["channels"] == [8, 16, 32]


@pytest.mark.slow
@needs_idx
def test_seed_mlp_dpq_pipeline_on_a_slice(make_cfg):
    """The seed's MLP student (CNN teacher) through dpq: the prune stage ends at the seed's numbers."""
    res = run_tiny(make_cfg, "fashion_mlp", "pipeline=dpq")
    by = {r["stage"]: r for r in res["stages"]}
    assert by["prune"]["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert by["prune"]["metrics"]["params_total"] == 235_146
    assert by["prune"]["metrics"]["params_nonzero"] == 235_146 - 116_736


def test_a_saved_image_dataset_with_integer_labels_is_read_as_any_other_task(make_cfg, tmp_path):
    """Image rows stored as PIL images with plain integer labels: a ClassLabel built from one split's values
    refused ids 1..3 ("greater than num_classes 3") and a test split lacking a class; the labels are now read
    as for every other task (class ids, with the warning about an id no example has)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(labels):
        images = [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in labels]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    datasets.DatasetDict({"train": split([0, 1, 2] * 20), "test": split([0, 2] * 5)}).save_to_disk(
        tmp_path / "a"
    )
    task = resolved(make_cfg, "task=fashion_mnist")["task"]
    task = {**task, "source": "files", "files": {"path": str(tmp_path / "a")}, "image_shape": [1, 8, 8]}
    task.update(normalize=None, num_labels=None, label_names=None, split={"validation": 0.1, "seed": 0})
    splits = load_task(task)
    assert splits.label_names == ["0", "1", "2"] and splits.sizes()["test"] == 10
    assert sorted(set(splits.test["label"])) == [0, 2] and np.asarray(splits.train[0]["image"]).shape == (
        8,
        8,
    )
