"""Per-example predictions of a run's final model: two runs of one seed compared example by example.

Accuracies alone say that one model is 0.85 points above another on a test split of 1,057
examples; they do not say whether nine examples more is more than the two models' disagreements
make likely. A run writes ``predictions.npz`` beside its results.json: for the test and the
validation split, the predicted class and the label of every example, in the split's order, so
that :mod:`dpq.pareto.paired` can pair two runs on the same examples (McNemar's test and an
interval for the paired difference). Pairs are made only when the labels are identical, so two
runs split differently are never compared as if they were not.

The predictions come from the in-memory final model in a plain loop (as the ONNX check does),
not from Lightning's test loop; ``matches`` in results.json's ``predictions`` entry says whether
they reproduce the accuracies results.json records (a run under a mixed-precision trainer may
differ on an example or two; such predictions are then not used for pairing).

``python -m dpq.predictions RUN_DIR [...]`` writes the file for runs that finished before it
existed, from the run's saved model (``--model DIR`` where it lives elsewhere), and refuses to write
predictions that do not reproduce the recorded accuracies.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dpq.core.errors import ConfigError
from dpq.core.files import write_file_atomic

FILE = "predictions.npz"
# split prefix in the file -> the results.json ``final`` key of its accuracy
SPLITS = {"test": "accuracy", "val": "val_accuracy"}


def compute(model, test: Iterable[dict], validation: Iterable[dict]) -> dict[str, np.ndarray]:
    """``{test,val}_{pred,label}`` arrays of ``model`` (a module or an ONNX Runtime model) over both splits."""
    from dpq.export.evaluate import predictions

    out = {}
    for split, batches in (("test", test), ("val", validation)):
        pred, label = predictions(model, batches)
        out[f"{split}_pred"], out[f"{split}_label"] = pred.astype(np.int64), label.astype(np.int64)
    return out


def accuracy(preds: dict[str, np.ndarray], split: str) -> float:
    return float((preds[f"{split}_pred"] == preds[f"{split}_label"]).mean())


def reproduces(right: np.ndarray, recorded) -> bool:
    """Whether per-example correctness ``right`` gives the ``recorded`` accuracy to the example."""
    if recorded is None or (isinstance(recorded, float) and recorded != recorded):
        return False
    return abs(float(np.mean(right)) - float(recorded)) * len(right) < 0.5


def mismatches(preds: dict[str, np.ndarray], final: dict) -> list[str]:
    """Where the predictions' accuracy differs from results.json's by an example or more ([] if none)."""
    out = []
    for split, key in SPLITS.items():
        if f"{split}_pred" not in preds or final.get(key) is None:
            continue
        right = preds[f"{split}_pred"] == preds[f"{split}_label"]
        if not reproduces(right, float(final[key])):
            out.append(
                f"{key}: predictions give {right.mean():.4f}, results.json {float(final[key]):.4f} (n={len(right)})"
            )
    return out


def digest(labels: np.ndarray) -> str:
    """A short hash of a split's labels in order: two runs are paired only on the same examples."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


def summary(preds: dict[str, np.ndarray], final: dict) -> dict:
    """The ``predictions`` entry of results.json: where the file is, its sizes, and whether it reproduces ``final``."""
    bad = mismatches(preds, final)
    out: dict = {"file": FILE, "matches": not bad}
    for split in SPLITS:
        if f"{split}_label" in preds:
            out[f"{split}_n"] = len(preds[f"{split}_label"])
            out[f"{split}_labels"] = digest(preds[f"{split}_label"])
    if bad:
        out["mismatch"] = bad
    return out


def save(run_dir: Path, preds: dict[str, np.ndarray]) -> Path:
    """Write ``run_dir/predictions.npz`` atomically (a reader never sees half a file)."""
    path = Path(run_dir) / FILE

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, numpy would append ".npz" to it
            np.savez_compressed(f, **preds)

    write_file_atomic(path, write)
    return path


def load(run_dir: Path | str) -> dict[str, np.ndarray] | None:
    """The arrays of ``run_dir/predictions.npz``, or None when the run has none."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def predict_run(run_dir: Path, model_dir: Path | None = None) -> dict:
    """Predictions of a finished run's saved model, written to ``run_dir``; returns their summary.

    Raises :class:`ConfigError` when they do not reproduce the accuracies of results.json: then they
    are not the run's, and a paired test on them would describe another model."""
    from dpq.export.finished import load_finished

    run = load_finished(run_dir, model_dir)
    preds = compute(run.model, run.data.test_dataloader(), run.data.val_dataloader())
    bad = mismatches(preds, run.results["final"])
    if bad:
        raise ConfigError(
            "RUN_DIR",
            str(run_dir),
            "its saved model does not reproduce the recorded accuracies (" + "; ".join(bad) + ")",
            "nothing written",
        )
    save(run_dir, preds)
    return summary(preds, run.results["final"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpq.predictions", description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="the saved model's folder (default: RUN_DIR/model; with several runs, the path recorded "
        "in each results.json where RUN_DIR/model is missing)",
    )
    args = ap.parse_args(argv)
    from dpq.loggers import quiet_libraries

    quiet_libraries()  # transformers' "Loading weights" bar at every model load, as in a run
    if args.model is not None and len(args.run_dirs) > 1:
        print("dpq.predictions: --model names one run's model; pass one RUN_DIR with it", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    for run_dir in tqdm(args.run_dirs, desc="predictions", unit="run", disable=len(args.run_dirs) < 2):
        model_dir = args.model
        try:
            if model_dir is None and not (run_dir / "model").is_dir():
                from dpq.export.finished import read_results

                model_dir = Path(read_results(run_dir)["model_dir"])
            s = predict_run(run_dir, model_dir)
        except ConfigError as e:
            print(f"dpq.predictions: {e}", file=sys.stderr)
            return 2
        tqdm.write(
            f"{run_dir / FILE}: {s['test_n']} test and {s.get('val_n', 0)} validation examples, "
            "reproducing results.json's accuracies"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
