"""Latency measured in a fresh interpreter of its own, so the run's process cannot skew it.

A run measures latency after hours of training, in a process that still holds the trainer, the
tracker's threads, the data and an allocator shaped by training. On a 2-core machine a
``make run`` recorded 31.1 ms for a dense student that timed at 13.1 ms in a quiet process
(issue 18). Whatever the training process shares the CPU with, a fresh process shares none of it:
:func:`latency` saves the model (``torch.save`` of the module itself, so every architecture and
quantized module that pickles is measured as it is) and its inputs to a temporary folder, runs
``python -m dpq.latency_process FOLDER`` and reads back the figures
:func:`dpq.cost.latency` would give, plus ``latency_process`` saying where they were measured.
The run process waits, idle, meanwhile. :func:`onnx_latency` does the same for an ONNX file.

A model that cannot be pickled (a closure hook, say) is timed in the run's process instead, with
a warning; ``latency_process`` then says so and why. Nothing is silently measured elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpq import cost

log = logging.getLogger(__name__)

SEPARATE = "separate"
SAME = "same"
CHOICES = (SEPARATE, SAME)
TIMEOUT_S = 900  # a forward of seconds, 35 times, plus interpreter start: far below this
ENV = "DPQ_LATENCY_PROCESS"  # the default of ``cost.latency_process`` (conf/train.yaml); the fast tests set "same"


def default_process() -> str:
    """``$DPQ_LATENCY_PROCESS`` or ``"separate"``: for callers without a run config (``dpq.export`` of old runs)."""
    return os.environ.get(ENV) or SEPARATE


def _run_child(folder: Path, job: dict) -> dict:
    (folder / "job.json").write_text(json.dumps(job))
    env = dict(os.environ)
    # Thread pools sized in the child as the parent's (set again by torch.set_num_threads there).
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The parent's import path, so a model class from any module it imported unpickles there too
    # (a class defined in a script's __main__ cannot: that model falls back to the run's process).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, "-m", "dpq.latency_process", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    out = folder / "result.json"
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise RuntimeError(f"latency process exited with {proc.returncode}: {' | '.join(tail)}")
    return json.loads(out.read_text())


def _measure(what: str, write, job: dict, here) -> dict:
    """Run ``job`` in a fresh process (``write(folder)`` puts its files there first); on any failure
    measure with ``here()`` in this process instead, saying so in ``latency_process``."""
    with tempfile.TemporaryDirectory(prefix="dpq-latency-") as tmp:
        folder = Path(tmp)
        try:
            write(folder)
            return {**_run_child(folder, job), "latency_process": SEPARATE}
        except Exception as e:  # noqa: BLE001 - any failure falls back to measuring here, said in the record
            why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            log.warning("%s measured in the run's own process: a separate one failed (%s)", what, why)
            return {**here(), "latency_process": f"{SAME} (separate failed: {why})"}


def _check(process: str) -> None:
    if process not in CHOICES:
        raise ValueError(f"process must be one of {CHOICES}, got {process!r}")


# transformers (>= 5) installs these forward hooks the first time a model is asked for hidden states or
# attentions (hidden-state KD, depth pruning's block influence) and never removes them. They are
# closures, so a model carrying them does not pickle; they do nothing unless outputs are being
# recorded, which a latency measurement never asks for.
_CAPTURE_HOOK_MODULE = "transformers.utils.output_capturing"


@contextlib.contextmanager
def without_capture_hooks(model: nn.Module):
    """Detach transformers' output-capturing forward hooks from ``model`` for the block; put them back after."""
    saved = []  # (module, its hook dict as it was): restored whole, so the hooks keep their order
    for m in model.modules():
        hooks = m._forward_hooks
        drop = [k for k, fn in hooks.items() if getattr(fn, "__module__", None) == _CAPTURE_HOOK_MODULE]
        if drop:
            saved.append((m, hooks.copy()))
            for k in drop:
                del hooks[k]
    try:
        yield len(saved)
    finally:
        for m, hooks in saved:
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)


def latency(
    model: nn.Module,
    example_inputs: dict[str, Tensor],
    warmup: int = 5,
    repeats: int = 30,
    device: str | torch.device | None = None,
    process: str = SEPARATE,
) -> dict:
    """:func:`dpq.cost.latency` of ``model``, measured in a separate process unless ``process="same"``.

    The result has ``latency_process``: ``"separate"``, ``"same"``, or ``"same (...)"`` with the
    reason when a separate measurement was asked for and could not be made.
    """
    _check(process)

    def here() -> dict:
        return cost.latency(model, example_inputs, warmup, repeats, device)

    if process == SAME:
        return {**here(), "latency_process": SAME}

    def write(folder: Path) -> None:
        # pickled in eval mode and without transformers' inert capture hooks; the live model is restored
        with cost._eval_mode(model), without_capture_hooks(model):
            torch.save(model, folder / "model.pt")
        torch.save(dict(example_inputs), folder / "inputs.pt")

    dev = str(device) if device is not None else str(cost._model_device(model))
    job = {"kind": "torch", "warmup": int(warmup), "repeats": int(repeats), "device": dev}
    return _measure("latency", write, {**job, "threads": torch.get_num_threads()}, here)


def onnx_latency(
    path: str | Path,
    example_inputs: dict[str, Tensor],
    warmup: int = 5,
    repeats: int = 30,
    threads: int = 2,
    process: str = SEPARATE,
) -> dict:
    """Median / p90 / min ms per call of the ONNX model at ``path`` (ONNX Runtime, CPU, ``threads``).

    Keys as :func:`dpq.cost.latency_summary` plus ``latency_process`` (see :func:`latency`).
    """
    _check(process)

    def here() -> dict:
        return _onnx_here(path, example_inputs, warmup, repeats, threads)

    if process == SAME:
        return {**here(), "latency_process": SAME}
    job = {
        "kind": "onnx",
        "path": str(Path(path).resolve()),
        "warmup": int(warmup),
        "repeats": int(repeats),
        "threads": int(threads),
    }
    return _measure("ONNX latency", lambda f: torch.save(dict(example_inputs), f / "inputs.pt"), job, here)


def _onnx_here(path, example_inputs, warmup, repeats, threads) -> dict:
    from dpq.export.evaluate import OrtModel, ort_latency
    from dpq.export.onnx import ort_session

    return ort_latency(OrtModel(ort_session(path, threads)), example_inputs, warmup, repeats)


def _child(folder: Path) -> None:
    job: dict[str, Any] = json.loads((folder / "job.json").read_text())
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    if job["kind"] == "onnx":
        out = _onnx_here(job["path"], inputs, job["warmup"], job["repeats"], job["threads"])
    else:
        torch.set_num_threads(int(job["threads"]))
        dev = torch.device(job["device"])
        # The parent wrote this file a moment ago from its own model: a trusted pickle.
        model = torch.load(folder / "model.pt", map_location=dev, weights_only=False)
        out = cost.latency(model, inputs, job["warmup"], job["repeats"], dev)
    (folder / "result.json").write_text(json.dumps(out))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
