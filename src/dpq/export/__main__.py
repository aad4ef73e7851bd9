"""``python -m dpq.export RUN_DIR [...]``: export a finished run's model to ONNX Runtime and measure it.

For runs that finished before export existed, or with ``export.onnx=false``: writes
``RUN_DIR/model/model.onnx``, runs it over the run's test and validation splits, and adds the
``onnx_*`` figures to ``final`` (and ``onnx_export``) in ``RUN_DIR/results.json``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import fields
from pathlib import Path

import torch

from dpq.core.errors import ConfigError
from dpq.core.files import write_json_atomic

log = logging.getLogger("dpq.export")


def export_run(run_dir: Path, overrides: dict | None = None) -> dict:
    """Export and measure the model of ``run_dir``; returns the updated results.json."""
    from dpq import cost, latency_process
    from dpq.export.evaluate import deploy
    from dpq.export.finished import load_finished
    from dpq.export.onnx import OnnxOptions, max_positions, session_threads

    run = load_finished(run_dir)
    results, task, data, model, tokenizer = run.results, run.task, run.data, run.model, run.tokenizer
    cfg = results["config"]
    names = {f.name for f in fields(OnnxOptions)}
    opts = {k: v for k, v in {**(cfg.get("export") or {}), **(overrides or {})}.items() if k in names}
    from_cli = set(overrides or {})
    opts["max_positions"] = max_positions(
        opts.get("max_positions"),
        task,
        cfg["cost"],
        key="--max-positions" if "max_positions" in from_cli else "export.max_positions",
    )
    threads = opts.get("threads", "auto")
    recorded = results["final"].get("threads")
    if threads == "auto" and isinstance(recorded, int) and recorded > 0:
        # auto means the threads PyTorch's latency was timed with: the run's, recorded in final, not this
        # process's (another OMP_NUM_THREADS, a DDP run, another machine), so both latencies stay comparable
        threads = recorded
        if recorded != torch.get_num_threads():
            log.warning(
                "timing ONNX Runtime with %d threads, as the run timed PyTorch (this process has %d; "
                "--threads N to choose)",
                recorded,
                torch.get_num_threads(),
            )
    opts["threads"] = session_threads(threads, key="--threads" if "threads" in from_cli else "export.threads")
    target = run.model_dir / "model.onnx"
    if target.exists():
        log.warning("replacing %s and the run's onnx_* figures", target)
    metrics, report = deploy(
        model,
        target,
        list(data.test_dataloader()),
        list(data.val_dataloader()),
        cost.task_inputs(task, cfg["cost"], tokenizer),
        cfg["cost"],
        OnnxOptions(**opts),
        timer=functools.partial(
            latency_process.onnx_latency,
            process=cfg["cost"].get("latency_process") or latency_process.default_process(),
        ),
    )
    # an earlier export's figures go first: a key this export does not write must not outlive it
    results["final"] = {k: v for k, v in results["final"].items() if not k.startswith("onnx_")}
    results["final"].update(metrics)
    results["onnx_export"] = report
    write_json_atomic(run_dir / "results.json", results)
    return results


def _positions(value: str | None):
    if value is None or value.lower() == "none":
        return None
    return int(value) if value.isdigit() else value  # "auto" (anything else: a config error, said later)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpq.export", description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--no-fuse", action="store_true", help="skip ONNX Runtime's transformer fusions")
    ap.add_argument("--no-fuse-attention", action="store_true", help="keep Q/K/V as separate MatMul nodes")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for the checks and timing")
    ap.add_argument(
        "--max-positions",
        default=None,
        help="position-table rows kept: auto (the run's task.max_length / cost.seq_len), N, or none "
        "(default: what the run's export config says; runs from before this option keep all)",
    )
    ap.add_argument(
        "--nbits-compute",
        choices=["float", "int8", "int8_matmul"],
        default=None,
        help="4-bit layers: MatMulNBits with float activations (exact, the default) or int8 activations "
        "per block (not exact), or int8_matmul: the codes in uint8 run by quantize_dynamic's integer kernels",
    )
    ap.add_argument(
        "--no-compact",
        action="store_true",
        help="export every head and FFN neuron, also those pruning left without effect (default: removed)",
    )
    args = ap.parse_args(argv)
    from dpq.export.onnx import ExportError
    from dpq.loggers import quiet_libraries

    quiet_libraries()  # transformers' "Loading weights" bar at every model load, as in a run
    overrides = {
        k: v
        for k, v in {
            "fuse": False if args.no_fuse else None,
            "fuse_attention": False if args.no_fuse_attention else None,
            "threads": args.threads,
            "max_positions": _positions(args.max_positions),
            "nbits_compute": args.nbits_compute,
            "compact": False if args.no_compact else None,
        }.items()
        if v is not None
    }
    if args.max_positions is not None and args.max_positions.lower() == "none":
        overrides["max_positions"] = None
    failed = []
    for run_dir in args.run_dirs:
        try:
            final = export_run(run_dir, overrides)["final"]
        except (ConfigError, ExportError) as e:  # said, and the other folders still exported
            print(
                f"dpq.export: {run_dir}: {e}" if isinstance(e, ExportError) else f"dpq.export: {e}",
                file=sys.stderr,
            )
            failed.append((str(run_dir), 2 if isinstance(e, ConfigError) else 1))  # 1: dpq's own failure
            continue
        compacted = (
            f", {final['onnx_compacted_units']} heads/neurons without effect removed "
            f"({final['onnx_dense_gflops']:.4g} dense GFLOPs)"
            if final.get("onnx_compacted_units")
            else ""
        )
        print(
            f"{run_dir}: {final['onnx_size_bytes'] / 1e6:.2f} MB, test accuracy {final['onnx_accuracy']:.4f} "
            f"(agreement with PyTorch {final['onnx_agreement']:.4f}), {final['onnx_latency_ms_median']:.2f} ms"
            f"{compacted}"
        )
    if failed and len(args.run_dirs) > 1:
        print(f"dpq.export: not exported: {', '.join(d for d, _ in failed)}", file=sys.stderr)
    return max((code for _, code in failed), default=0)


if __name__ == "__main__":
    raise SystemExit(main())
