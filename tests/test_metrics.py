"""task.metrics: the torchmetrics dpq computes equal scikit-learn's on a fixed prediction set, through the
same LightningModule every stage evaluates with; names, labels and the positive label are checked."""

import lightning as L
import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import DataLoader

from dpq import metrics
from dpq.core.errors import ConfigError
from dpq.distill.module import ClassifierModule

# A fixed prediction set: 60 examples, imbalanced labels, about 70% right.
RNG = np.random.default_rng(7)


def prediction_set(num_labels: int):
    y = RNG.choice(num_labels, size=60, p=[0.6, *[0.4 / (num_labels - 1)] * (num_labels - 1)])
    logits = RNG.normal(size=(60, num_labels)).astype(np.float32)
    right = RNG.random(60) < 0.7
    logits[right, y[right]] += 3.0
    return torch.from_numpy(logits), torch.from_numpy(y)


class Fixed(nn.Module):
    """A "model" whose logits for example i are row i of a fixed table."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, features):
        return self.table[features[:, 0].long()]


def evaluate(logits, y, names, positive=1) -> dict:
    module = ClassifierModule(Fixed(logits), logits.shape[1], "t", metrics=names, positive=positive)
    rows = [
        {"features": torch.tensor([float(i)]), "labels": y[i], "idx": torch.tensor(i)} for i in range(len(y))
    ]
    loader = DataLoader(rows, batch_size=16)  # several batches: the metrics accumulate across them
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return trainer.test(module, dataloaders=loader, verbose=False)[0]


def sklearn_value(name, y, pred, prob, positive):
    return {
        "accuracy": lambda: skm.accuracy_score(y, pred),
        "balanced_accuracy": lambda: skm.balanced_accuracy_score(y, pred),
        "f1": lambda: skm.f1_score(y, pred, pos_label=positive),
        "precision": lambda: skm.precision_score(y, pred, pos_label=positive),
        "recall": lambda: skm.recall_score(y, pred, pos_label=positive),
        "f1_macro": lambda: skm.f1_score(y, pred, average="macro"),
        "f1_micro": lambda: skm.f1_score(y, pred, average="micro"),
        "f1_weighted": lambda: skm.f1_score(y, pred, average="weighted"),
        "precision_macro": lambda: skm.precision_score(y, pred, average="macro"),
        "recall_macro": lambda: skm.recall_score(y, pred, average="macro"),
        "mcc": lambda: skm.matthews_corrcoef(y, pred),
        "cohen_kappa": lambda: skm.cohen_kappa_score(y, pred),
        "auroc": lambda: (
            skm.roc_auc_score(y == positive, prob[:, positive])
            if prob.shape[1] == 2
            else skm.roc_auc_score(y, prob, multi_class="ovr", average="macro")
        ),
    }[name]()


@pytest.mark.parametrize("num_labels, positive", [(2, 1), (2, 0), (3, 1)])
def test_every_metric_matches_scikit_learn_on_a_fixed_prediction_set(num_labels, positive):
    logits, y = prediction_set(num_labels)
    names = [n for n, m in metrics.METRICS.items() if num_labels == 2 or not m.positive]
    got = evaluate(logits, y, names, positive)
    pred, prob = logits.argmax(-1).numpy(), logits.softmax(-1).numpy()
    for name in names:
        want = sklearn_value(name, y.numpy(), pred, prob, positive)
        key = f"t/test_{'acc' if name == 'accuracy' else name}"
        assert got[key] == pytest.approx(want, abs=1e-5), name
    assert got["t/test_f1" if num_labels == 2 else "t/test_f1_macro"] != pytest.approx(got["t/test_acc"])


def test_f1_and_mcc_on_a_hand_checked_binary_set():
    # 10 examples, positive label 1: TP=3, FP=1, FN=2, TN=4 -> F1 = 6/9, MCC = (12-2)/sqrt(4*5*5*6)
    y = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    pred = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    logits = torch.nn.functional.one_hot(torch.tensor(pred), 2).float() * 4
    got = evaluate(logits, y, ["f1", "mcc"])
    assert got["t/test_f1"] == pytest.approx(2 / 3, abs=1e-6)
    assert got["t/test_mcc"] == pytest.approx(10 / np.sqrt(600), abs=1e-6)


def test_balanced_accuracy_averages_only_the_classes_the_targets_hold():
    """A class only predicted (2 here) is no class of the split: scikit-learn leaves it out (2/3, not 4/9)."""
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    pred = torch.tensor([0, 2, 1, 1, 0, 0])
    logits = torch.nn.functional.one_hot(pred, 3).float() * 4
    got = evaluate(logits, y, ["balanced_accuracy"])
    assert got["t/test_balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-6)
    assert got["t/test_balanced_accuracy"] == pytest.approx(2 / 3, abs=1e-6)


def test_metric_names_and_the_positive_label_are_checked():
    assert metrics.task_metrics({"metrics": ["f1", "mcc"], "primary_metric": "f1"}) == [
        "accuracy",
        "f1",
        "mcc",
    ]
    assert metrics.task_metrics({"metrics": None, "primary_metric": "mcc"}) == ["accuracy", "mcc"]
    assert metrics.result_names({"metrics": ["f1"]}) == ["accuracy", "f1", "val_accuracy", "val_f1"]
    with pytest.raises(ConfigError, match=r"task.metrics\[1\]='f2': must be one of accuracy"):
        metrics.check_names({"metrics": ["f1", "f2"]})
    with pytest.raises(ConfigError, match="task.primary_metric='auc': must be one of"):
        metrics.check_names({"primary_metric": "auc"})
    with pytest.raises(
        ConfigError, match="needs a 2-label task; this task has 3 labels .a, b, c.: use f1_macro"
    ):
        metrics.check_for_labels({"primary_metric": "f1"}, ["a", "b", "c"])
    assert metrics.check_for_labels({"metrics": ["f1"], "positive_label": "spam"}, ["ham", "spam"]) == 1
    assert metrics.positive_index({"positive_label": "ham"}, ["ham", "spam"]) == 0
    assert metrics.positive_index({"positive_label": 0}, ["ham", "spam"]) == 0
    assert metrics.positive_index({}, ["ham", "spam"]) == 1
    with pytest.raises(
        ConfigError, match="task.positive_label='eggs': must be one of the task's labels: ham, spam"
    ):
        metrics.positive_index({"positive_label": "eggs"}, ["ham", "spam"])


def test_the_printed_table_shows_the_primary_metric_next_to_accuracy():
    from dpq.run import records

    rec = {
        "stage": "distill",
        "model": "student",
        "duration_s": 3.0,
        "metrics": {"accuracy": 0.9, "val_accuracy": 0.8, "f1": 0.5, "val_f1": 0.25, "size_bytes": 1e6},
    }
    heads = [h for h, _, _ in records.columns("f1")]
    assert heads[:6] == ["stage", "model", "acc", "val acc", "f1", "val f1"]
    assert records.table_rows([rec], "f1")[0][2:6] == ["0.9000", "0.8000", "0.5000", "0.2500"]
    assert records.columns() == records.COLUMNS  # accuracy as primary: the table as before


def test_the_printed_table_says_how_the_exported_model_measured(capsys):
    """The rows time each stage's PyTorch model (a 4-bit W4A8 stage read 8.30 ms against float's 3.68 on the
    default experiment); the ONNX Runtime model it deploys as (1.51 ms) was only in results.json."""
    from dpq.run import records

    rec = {"stage": "quantize", "model": "student", "duration_s": 3.0, "metrics": {"size_bytes": 8e6}}
    final = {
        "onnx_accuracy": 0.8637,
        "onnx_agreement": 0.99905,
        "onnx_size_bytes": 7834972,
        "onnx_latency_ms_median": 1.5073,
        "onnx_threads": 2,
    }
    said = records.deployed_caption(final)
    assert said == (
        "model/model.onnx in ONNX Runtime (2 threads): test acc 0.8637 (the same prediction as the PyTorch "
        "model on 99.91% of the test examples), 7.835 MB, 1.51 ms; the rows' lat ms time each stage's "
        "PyTorch model"
    )
    assert records.deployed_caption({"accuracy": 0.9}) is None  # no export: no caption
    records.print_table([rec], "t", caption=said)
    assert "1.51 ms" in " ".join(capsys.readouterr().out.split())


def test_sweep_objectives_follow_the_primary_metric(make_cfg):
    from omegaconf import OmegaConf

    from dpq.run.validate import check_objective

    cfg = OmegaConf.to_container(make_cfg("task.primary_metric=mcc"), resolve=True)
    assert cfg["objective"]["metrics"] == ["val_mcc"]  # conf/train.yaml: val_${task.primary_metric}
    check_objective(cfg)
    cfg["objective"]["metrics"] = ["val_f1"]  # not a metric this task computes: would fail after training
    with pytest.raises(ConfigError, match="objective.metrics='val_f1': must be a validation or cost metric"):
        check_objective(cfg)
    cfg["objective"]["metrics"] = ["mcc"]  # the test split's: never optimised
    with pytest.raises(
        ConfigError, match="objective.metrics='mcc': is measured on the test split.*'val_mcc'"
    ):
        check_objective(cfg)
    cfg["objective"]["metrics"] = ["onnx_val_accuracy", "onnx_latency_ms_median"]  # the deployed model's
    check_objective(cfg)
    cfg["objective"]["metrics"] = ["onnx_accuracy"]
    with pytest.raises(ConfigError, match="'onnx_val_accuracy'"):
        check_objective(cfg)


def test_balanced_accuracy_pickles():
    import pickle

    m = metrics.METRICS["balanced_accuracy"].build(3, 1)
    m.update(torch.eye(3), torch.tensor([0, 1, 1]))
    assert float(pickle.loads(pickle.dumps(m)).compute()) == pytest.approx(0.75)


def test_auroc_skips_a_class_the_split_lacks_and_is_nan_where_undefined(caplog):
    """torchmetrics scores an absent class 0 and averages it in; scikit-learn's AUROC of the classes present."""
    logits, y = prediction_set(3)
    y = torch.where(y == 2, torch.zeros_like(y), y)  # class 2 absent from the targets
    got = evaluate(logits, y, ["auroc"])["t/test_auroc"]
    prob = logits.softmax(-1).numpy()
    want = np.mean([skm.roc_auc_score(y.numpy() == c, prob[:, c]) for c in (0, 1)])
    assert got == pytest.approx(want, abs=1e-5)
    assert got > 0.7  # the 0 of the absent class would pull it to about 2/3 of this
    # A binary split without a positive example: undefined, NaN and said, not 0.0
    with caplog.at_level("WARNING", logger="dpq.core.auroc"):
        got = evaluate(logits[:, :2], torch.zeros(60, dtype=torch.long), ["auroc"])["t/test_auroc"]
    assert np.isnan(got)
    assert "AUROC is undefined: the split has 0 positive and 60 negative examples" in caplog.text
