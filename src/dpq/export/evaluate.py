"""The exported model measured where it runs: accuracy and agreement with PyTorch, latency, size.

Nobody should have to assume that the ONNX Runtime model is the PyTorch one: :func:`deploy`
exports, runs both over the test and validation splits, and reports the accuracy of each, their
difference and how often their predictions agree, and the exported model's latency (same
batch and sequence as ``cost``) and file size.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpq.core.nn import logits_of, model_inputs
from dpq.cost import _eval_mode, latency_summary
from dpq.export.onnx import OnnxOptions, export_onnx, feed, ort_session

log = logging.getLogger(__name__)


class OrtModel:
    """An ONNX Runtime session called like a model: ``m(**inputs)`` -> logits tensor."""

    def __init__(self, session):
        self.session = session
        self.wants = {i.name for i in session.get_inputs()}

    def __call__(self, **inputs) -> torch.Tensor:
        if "token_type_ids" in self.wants and "token_type_ids" not in inputs and "input_ids" in inputs:
            inputs = {**inputs, "token_type_ids": torch.zeros_like(torch.as_tensor(inputs["input_ids"]))}
        return torch.from_numpy(self.session.run(["logits"], feed(self.session, inputs))[0])


def predictions(model, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted class, label)`` over ``batches`` for a PyTorch module or an :class:`OrtModel`.

    A module is evaluated in eval mode whatever mode it was left in (a model fresh from training
    would otherwise run its dropout and disagree with its own export), and its flags restored."""
    if isinstance(model, nn.Module):
        with _eval_mode(model):
            return _predictions(model, batches)
    return _predictions(model, batches)


def _predictions(model, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    with torch.inference_mode():
        for batch in batches:
            if isinstance(model, nn.Module):
                device = next(model.parameters()).device
                logits = logits_of(model, {k: v.to(device) for k, v in batch.items()})
            else:
                logits = model(**model_inputs(batch))
            preds.append(logits.argmax(-1).cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
    return np.concatenate(preds), np.concatenate(labels)


def ort_latency(model: OrtModel, inputs: dict[str, torch.Tensor], warmup: int = 5, repeats: int = 30) -> dict:
    """Median / p90 / min milliseconds per call, as :func:`dpq.cost.latency` reports PyTorch's."""
    for _ in range(max(0, warmup)):
        model(**inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return latency_summary(times)


def deploy(
    model: nn.Module,
    path: str | Path,
    test: list[dict],
    validation: list[dict],
    cost_inputs: dict,
    cost: dict[str, Any],
    options: OnnxOptions | None = None,
    timer: Callable[..., dict] | None = None,
    reference: dict[str, np.ndarray] | None = None,
) -> tuple[dict, dict]:
    """Export ``model`` to ``path`` and measure it; returns ``(metrics, report)``.

    ``metrics`` are flat numbers for results.json's ``final`` (``onnx_accuracy``,
    ``onnx_agreement``, ``onnx_latency_ms_median``, ``onnx_size_bytes`` ...); ``report`` says what
    was exported and checked (:class:`~dpq.export.onnx.ExportReport`). ``timer(path, inputs, warmup,
    repeats, threads)`` times the file (default: in this process); ``onnx_latency_process`` says where.
    ``reference``: ``model``'s predictions over the same batches, already computed
    (:func:`dpq.predictions.compute`), so that the model is not run over both splits a second time.
    With ``options.compact`` the graph is exported from a copy without the heads and neurons that have
    no effect (:func:`dpq.prune.compact.compact_`; ``report["compact"]``); ``model`` stays as it is and
    the agreement compares the export with it.
    """
    options = options or OnnxOptions()
    example = model_inputs(test[0])
    exported, compacted = model, None
    if options.compact:  # the units pruning left without effect go first; the agreement below checks it
        from dpq.prune.compact import compact_

        exported = copy.deepcopy(model).cpu().eval()
        # The probe that tells constant units is a validation batch: test data only measures.
        probe = model_inputs(validation[0]) if validation else example
        compacted = compact_(exported, {k: v.cpu() for k, v in probe.items()})
        if not compacted.removed:
            exported = model
    report = export_onnx(exported, example, path, options)
    ort = OrtModel(ort_session(path, options.threads))
    out: dict[str, Any] = {}
    for split, name, batches in (("", "test", test), ("val_", "val", validation)):
        if reference is not None:
            torch_pred, labels = reference[f"{name}_pred"], reference[f"{name}_label"]
        else:
            torch_pred, labels = predictions(model, batches)
        ort_pred, _ = predictions(ort, batches)
        out[f"onnx_{split}accuracy"] = float((ort_pred == labels).mean())
        out[f"onnx_{split}agreement"] = float((ort_pred == torch_pred).mean())
        if not split:
            out["onnx_accuracy_delta"] = out["onnx_accuracy"] - float((torch_pred == labels).mean())
    warmup, repeats = int(cost.get("warmup", 5)), int(cost.get("repeats", 30))
    if timer is None:  # in this process; a run passes dpq.latency_process.onnx_latency (a fresh one)
        timing = {**ort_latency(ort, cost_inputs, warmup, repeats), "latency_process": "same"}
    else:
        timing = timer(path, cost_inputs, warmup, repeats, options.threads)
    out.update({f"onnx_{k}": v for k, v in timing.items()})
    out.update(
        onnx_size_bytes=report.size_bytes,
        onnx_threads=options.threads,
        onnx_max_abs_logit_diff=report.max_abs_logit_diff,
    )
    report = report.to_dict()
    if compacted is not None:
        report["compact"] = compacted.to_dict()
        out["onnx_compacted_units"] = compacted.removed
        if compacted.removed:  # the exported graph's FLOPs at the cost inputs (the run's are the model's)
            from dpq.cost import flops

            dense = flops(exported, {k: v.cpu() for k, v in cost_inputs.items()})
            # onnx_params from the export, not compact_: export_onnx trims the position table after it
            out.update(onnx_dense_gflops=dense["dense_gflops"], onnx_params=report["params_total"])
            log.info(
                "onnx: removed %d heads/neurons without effect before export (%s left), %.4g dense GFLOPs",
                compacted.removed,
                ", ".join(f"{k['left']}/{k['before']} {kind}" for kind, k in compacted.by_kind().items()),
                out["onnx_dense_gflops"],
            )
    log.info(
        "onnx: %s, %.2f MB, test accuracy %.4f (PyTorch %+.4f), agreement %.4f, %.2f ms",
        path,
        report["size_bytes"] / 1e6,
        out["onnx_accuracy"],
        -out["onnx_accuracy_delta"],
        out["onnx_agreement"],
        out["onnx_latency_ms_median"],
    )
    return out, report
